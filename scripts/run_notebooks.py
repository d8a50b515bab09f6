"""Run every notebook under notebooks/ top to bottom at its own settings (the parameter cell as committed).

    .venv/bin/python scripts/run_notebooks.py --out runs/notebooks-executed        # all of them
    .venv/bin/python scripts/run_notebooks.py --only grpo,ppo --out runs/nb

The tests run each notebook at small settings (tests/test_notebooks.py); this runs them as a reader would, so
their runs are the real chapter-sized ones. Each notebook executes in its own folder under --out (its runs land
in OUT/<name>/runs/notebooks/), the executed copy with its outputs is written beside it (OUT/<name>.ipynb; the
committed notebooks stay clean), and OUT/summary.json gets each one's wall time and status: "ok", or the first
failing cell's error in one line. The exit status is 1 if any notebook failed.
"""

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(path, folder, timeout):
    import nbclient
    import nbformat

    book = nbformat.read(path, as_version=4)
    folder.mkdir(parents=True, exist_ok=True)
    client = nbclient.NotebookClient(book, timeout=timeout, kernel_name="python3",
                                     resources={"metadata": {"path": str(folder)}})
    started = time.perf_counter()
    try:
        client.execute()
        status = "ok"
    except nbclient.exceptions.CellExecutionError as e:
        lines = [line for line in str(e).strip().splitlines() if line.strip()]
        status = "failed: " + (lines[-1] if lines else type(e).__name__)
    except nbclient.exceptions.CellTimeoutError:
        status = f"failed: a cell ran past {timeout} s"
    wall_s = time.perf_counter() - started
    nbformat.write(book, folder.with_suffix(".ipynb"))
    return {"status": status, "wall_s": round(wall_s, 1)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for the notebooks' runs, executed copies and summary.json")
    parser.add_argument("--only", default="", help="comma-separated notebook names (default: every notebook)")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds a single cell may run")
    args = parser.parse_args()
    try:
        import nbclient  # noqa: F401
    except ImportError:
        sys.exit("running notebooks needs nbclient and a Jupyter kernel: pip install -e '.[notebooks]'")
    books = sorted((ROOT / "notebooks").glob("*.ipynb"))
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {p.stem for p in books}
        if unknown:
            sys.exit(f"no such notebook: {', '.join(sorted(unknown))} (notebooks/ has {', '.join(p.stem for p in books)})")
        books = [p for p in books if p.stem in wanted]
    out = Path(args.out).resolve()
    summary = {}
    for path in books:
        print(f"{path.stem}: running ...", flush=True)
        summary[path.stem] = run(path, out / path.stem, args.timeout)
        print(f"{path.stem}: {summary[path.stem]['status']} in {summary[path.stem]['wall_s']} s", flush=True)
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    failed = [k for k, v in summary.items() if v["status"] != "ok"]
    print(f"{len(summary) - len(failed)} of {len(summary)} notebooks ran; summary in {out / 'summary.json'}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

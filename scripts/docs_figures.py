"""Regenerate docs/img/ and docs/results.md from a recorded run of benchmarks/run.py.

    .venv/bin/python benchmarks/run.py                      # writes benchmarks/results/<date-time>/
    .venv/bin/python scripts/docs_figures.py benchmarks/results/<date-time>

Every figure on a docs page is a file this script copies out of that run (RUN/plots/<group>.png becomes
docs/img/<run name>-<group>.png, the RL-versus-control overlays docs/img/<run name>-vs-control-<group>.png,
and any extra figures the runner drew at the top of the results folder), and docs/results.md is that run's
table with its date, so a page can always say which run its numbers come from. Nothing is drawn here: the
runs drew their own plots.
"""

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IMG = ROOT / "docs" / "img"


def referenced_figures():
    """The file names under img/ that some docs page shows: only those are copied, so docs/img/ holds no strays."""
    names = set()
    for page in (ROOT / "docs").glob("*.md"):
        names.update(re.findall(r"img/([\w.-]+\.png)", page.read_text()))
    return names


def copy(src, dst, written, wanted):
    if dst.name not in wanted:
        return
    shutil.copyfile(src, dst)
    written.append(dst.relative_to(ROOT))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", help="a benchmarks/run.py results folder (it has results.json)")
    ap.add_argument("--clean", action="store_true", help="remove the PNGs in docs/img/ first")
    args = ap.parse_args()
    results = Path(args.results)
    table = results / "results.json"
    if not table.exists():
        sys.exit(f"{results} has no results.json: give the folder benchmarks/run.py wrote")
    rows = json.loads(table.read_text())
    IMG.mkdir(parents=True, exist_ok=True)
    if args.clean:
        for old in IMG.glob("*.png"):
            old.unlink()
    written, wanted = [], referenced_figures()
    for row in rows:
        name = row["chapter"]
        if "/" in name:  # one variant of a family: the runner's overlay of the family is what the docs show
            continue
        for png in sorted((results / name / "plots").glob("*.png")):
            copy(png, IMG / f"{name}-{png.name}", written, wanted)
        for png in sorted((results / f"{name}-vs-control").glob("*.png")):
            copy(png, IMG / f"{name}-vs-control-{png.name}", written, wanted)
    for png in sorted(results.glob("*.png")):  # figures the runner draws itself (overlays of several runs)
        copy(png, IMG / png.name, written, wanted)
    md = (results / "results.md").read_text() if (results / "results.md").exists() else ""
    (ROOT / "docs" / "results.md").write_text(
        f"# Recorded run: {results.name}\n\n"
        f"Every figure and number in these docs comes from this run of `benchmarks/run.py` on a 2-core Linux machine "
        f"(MLX's CPU backend with OpenBLAS), the RL chapters starting from that run's own pretraining checkpoint. "
        f"Regenerate with `python scripts/docs_figures.py benchmarks/results/{results.name}`.\n\n{md}")
    print(f"{len(written)} figures the docs show copied to docs/img/, docs/results.md written (run {results.name})")
    missing = sorted(n for n in wanted if not (IMG / n).exists())
    if missing:
        print(f"shown in the docs but in no run: {', '.join(missing)}")


if __name__ == "__main__":
    main()

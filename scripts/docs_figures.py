"""Where the docs' figures come from: recorded runs, their small files committed under docs/runs/.

    .venv/bin/python scripts/docs_figures.py record RUN NAME --command "mlx-rl ..."   # RUN's small files -> docs/runs/NAME/
    .venv/bin/python scripts/docs_figures.py check                                    # every figure in docs/*.md traced?
    .venv/bin/python benchmarks/run.py                      # writes benchmarks/results/<date-time>/
    .venv/bin/python scripts/docs_figures.py benchmarks/results/<date-time>

`record` copies what a reader needs to check a figure and nothing heavy: summary.json, config.json, tables.json
and any other small JSON the run wrote, metrics.jsonl trimmed to at most 200 rows (the first, the last, every
evaluation and an even spread of the rest), command.txt (the exact command) and load.txt (`uptime` now: the
machine's load, which timings depend on). Checkpoints and plots stay behind.

`check` (and tests/test_docs_figures.py) finds every percentage and millisecond figure in docs/*.md and README.md
and looks for it in the files of the recorded runs linked next to it (docs/runs/NAME/..., in the same paragraph
or table or the one just before: summary.json, tables, command and load files; not metrics.jsonl); a figure
worked out from those is marked on its line with
`<!-- arithmetic: how -->`, and a figure that is no measurement at all (an option's value, a threshold, a
definition or a worked example) with `<!-- setting: which -->`; neither is then looked up. A figure found
nowhere is listed.

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


RUNS = ROOT / "docs" / "runs"
MAX_ROWS = 200
SMALL = 256 * 1024  # bytes: the largest JSON file copied as it is


def trim_rows(lines, limit=MAX_ROWS):
    """metrics.jsonl lines -> at most `limit`: the first, the last, every evaluation row, and an even spread."""
    if len(lines) <= limit:
        return lines
    keep = {0, len(lines) - 1} | {i for i, line in enumerate(lines) if '"eval/' in line}
    spare = max(limit - len(keep), 0)
    if spare:
        step = len(lines) / spare
        keep |= {int(k * step) for k in range(spare)}
    return [lines[i] for i in sorted(keep)][: max(limit, len(keep))]


def record(run, name, command, load=None):
    """Copy a run's small files into docs/runs/<name>/ (see the module docstring)."""
    import subprocess

    run, dest = Path(run), RUNS / name
    if not (run / "summary.json").exists() and not list(run.glob("*.json")):
        sys.exit(f"{run} has no summary.json or other JSON to record")
    dest.mkdir(parents=True, exist_ok=True)
    for f in sorted(run.glob("*.json")):
        if f.stat().st_size <= SMALL:
            shutil.copyfile(f, dest / f.name)
    metrics = run / "metrics.jsonl"
    if metrics.exists():
        lines = [line for line in metrics.read_text().splitlines() if line.strip()]
        (dest / "metrics.jsonl").write_text("".join(line + "\n" for line in trim_rows(lines)))
    (dest / "command.txt").write_text(command.strip() + "\n")
    uptime = load or subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    (dest / "load.txt").write_text(uptime + "\n")
    print(f"recorded {run} as {dest.relative_to(ROOT)}: {', '.join(sorted(p.name for p in dest.iterdir()))}")


# A figure the docs state: 87.8%, 0.4 %, 617.2 ms, 12 ms/step (numbers inside code blocks, links and HTML
# comments are not figures a reader takes from the prose).
FIGURE = re.compile(r"(?<![\w.])(\d+(?:[.,]\d+)*)\s?(%|ms\b)")


def doc_pages():
    return sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]


def figures_in(text):
    """[(line number, figure text, value)] outside code blocks, HTML comments and link targets."""
    out, in_code = [], False
    for n, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            in_code = not in_code
            continue
        if in_code or "<!-- arithmetic:" in line or "<!-- setting:" in line:
            continue
        prose = re.sub(r"<!--.*?-->", "", line)
        prose = re.sub(r"\]\([^)]*\)", "]", prose)  # link targets
        prose = re.sub(r"`[^`]*`", "", prose)  # inline code: commands and names, not figures
        for m in FIGURE.finditer(prose):
            out.append((n, m.group(0), m.group(1).replace(",", ""), m.group(2)))
    return out


def recorded_numbers(folder):
    """Every number in a recorded run's files (JSON, text and tables; of the per-step metrics.jsonl only the
    held-out evaluations, `eval/...`: its thousands of other values would match anything), as the texts a page
    may print it as."""
    texts = set()
    for f in Path(folder).rglob("*"):
        if f.name == "metrics.jsonl":  # of the per-step rows, only the held-out evaluations' figures
            content = " ".join(f"{v}" for line in f.read_text().splitlines() if line.strip()
                               for k, v in json.loads(line).items() if k.startswith("eval/"))
        elif not f.is_file() or f.suffix not in (".json", ".txt", ".md", ".csv"):
            continue
        else:
            content = f.read_text(errors="replace")
        for token in re.findall(r"-?\d+(?:\.\d+)?(?:e-?\d+)?", content):
            try:
                v = float(token)
            except ValueError:
                continue
            texts.add(token.lstrip("-"))
            for scale in (1, 100, 1000):  # a share as a percentage; seconds as milliseconds
                x = abs(v) * scale
                for digits in range(0, 4):
                    texts.add(f"{x:.{digits}f}")
    return texts


def cited_runs(text):
    """The recorded runs a page links to: runs/NAME (or docs/runs/NAME) anywhere in it."""
    return sorted({name for name in re.findall(r"runs/([\w.-]+)", text) if (RUNS / name).is_dir()})


def blocks(text):
    """[(first line number, block text)]: paragraphs, tables and lists, split at blank lines."""
    out, start, lines = [], 1, []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            if not lines:
                start = n
            lines.append(line)
        elif lines:
            out.append((start, "\n".join(lines)))
            lines = []
    if lines:
        out.append((start, "\n".join(lines)))
    return out


def untraced():
    """[(page, line, figure)] for every figure that is in no file of the runs cited next to it, and not marked
    as arithmetic. A figure is traced by a link to its run (docs/runs/NAME/...) in its own paragraph or table,
    or earlier in the same section (since the last heading)."""
    cache, missing = {}, []

    def numbers(names):
        known = set()
        for name in names:
            if name not in cache:
                cache[name] = recorded_numbers(RUNS / name)
            known |= cache[name]
        return known

    for page in doc_pages():
        section = []  # the runs cited so far in this section (since the last heading)
        for start, block in blocks(page.read_text()):
            if block.lstrip().startswith("#"):
                section = []
            section += cited_runs(block)
            known = numbers(sorted(set(section)))
            for n, fig, number, unit in figures_in(block):
                if number not in known:
                    missing.append((page.relative_to(ROOT), start + n - 1, fig))
    return missing


def check():
    missing = untraced()
    for page, n, text in missing:
        print(f"{page}:{n}: {text} is in no file under docs/runs/ (and not marked <!-- arithmetic: ... --> or <!-- setting: ... -->)")
    print(f"{len(missing)} untraced figure(s)")
    return 1 if missing else 0


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "record":
        ap = argparse.ArgumentParser(prog="docs_figures.py record")
        ap.add_argument("run")
        ap.add_argument("name")
        ap.add_argument("--command", required=True, help="the exact command that made the run")
        ap.add_argument("--load", default=None, help="`uptime` as it was during the run (default: now)")
        a = ap.parse_args(sys.argv[2:])
        return record(a.run, a.name, a.command, a.load)
    if len(sys.argv) > 1 and sys.argv[1] == "check":
        sys.exit(check())
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

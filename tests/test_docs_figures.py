"""Every percentage and millisecond figure in the docs comes from a committed run file under docs/runs/.

A figure worked out from recorded numbers is marked on its line with `<!-- arithmetic: how -->`. The figures
recorded before runs were committed to the repository (their runs are not in it) are listed, page by page, in
docs/runs/untraced.txt: no figure may join that list, and one that is traced or removed must leave it.
"""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("docs_figures", ROOT / "scripts" / "docs_figures.py")
docs_figures = importlib.util.module_from_spec(spec)
spec.loader.exec_module(docs_figures)

LISTED = ROOT / "docs" / "runs" / "untraced.txt"


def listed():
    out = set()
    for line in LISTED.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            page, figure = line.split("\t")
            out.add((page, figure))
    return out


def test_every_figure_in_the_docs_is_traced_to_a_committed_run():
    found = {(str(page), text) for page, _, text in docs_figures.untraced()}
    new = sorted(found - listed())
    assert not new, ("figures in the docs found in no file under docs/runs/ (record the run with "
                     "`scripts/docs_figures.py record`, or mark arithmetic): " + "; ".join(f"{p}: {f}" for p, f in new))


def test_the_list_of_older_untraced_figures_only_shrinks():
    found = {(str(page), text) for page, _, text in docs_figures.untraced()}
    stale = sorted(listed() - found)
    assert not stale, ("docs/runs/untraced.txt lists figures that are traced now or gone: remove these lines: "
                       + "; ".join(f"{p}\t{f}" for p, f in stale))


def test_the_check_finds_a_figure_and_honours_the_arithmetic_mark():
    text = "Accuracy rose to 12.3% and a step took 456 ms.\nHalf of it: 6.2% <!-- arithmetic: 12.3 / 2 -->\n"
    figures = [(n, t) for n, t, _, _ in docs_figures.figures_in(text)]
    assert figures == [(1, "12.3%"), (1, "456 ms")]
    assert docs_figures.figures_in("```\n99.9% in a code block\n```\n`--x 50%`") == []


def test_trimmed_metrics_keep_the_ends_and_every_evaluation():
    lines = [('{"step": %d, "eval/accuracy": 0.5}' if i % 100 == 0 else '{"step": %d}') % i for i in range(1000)]
    kept = docs_figures.trim_rows(lines, limit=50)
    assert kept[0] == lines[0] and kept[-1] == lines[-1] and len(kept) <= 50
    assert all(line in kept for line in lines if "eval/" in line)

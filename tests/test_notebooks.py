"""The notebooks under notebooks/: each runs top to bottom (small settings through its parameter cell), and the
committed files hold no outputs."""

import re
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))
CHAPTERS = ("icemaze", "pretrain", "kl", "grpo", "ppo", "dpo", "distill", "reward_model", "grpo_family", "agents")

# The parameter values the tests run with: seconds instead of minutes (a notebook sets only the ones it has).
SMALL = {"PRETRAIN_STEPS": 10, "PRESET": "micro", "EVAL_PROMPTS": 8, "STEPS": 2, "PROMPTS_PER_STEP": 2,
         "GROUP_SIZE": 2, "ROLLOUT_BATCH": 4, "ROUNDS": 1, "PAIR_PROMPTS": 8, "PAIRS": 64, "EPISODES": 50,
         "EVAL_EPISODES": 20, "PROMPTS": 8, "MAX_SAMPLES": 16}
SLOW = ("agents", "reward_model")  # notebooks that take over ~30 s at the small settings


def read(path):
    import nbformat  # the test extra (nbformat, nbclient, ipykernel): pip install -e '.[test]'

    return nbformat.read(path, as_version=4)


def parameter_cell(book):
    cells = [i for i, c in enumerate(book.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, "a notebook has one cell tagged 'parameters'"
    return cells[0]


def test_every_chapter_has_a_notebook():
    assert sorted(p.stem for p in NOTEBOOKS) == sorted(CHAPTERS)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebooks_have_no_outputs(path):
    book = read(path)
    for i, cell in enumerate(book.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, \
                f"{path.name} cell {i} holds outputs: clear them before committing"
    source = book.cells[parameter_cell(book)].source
    assert re.search(r"^OUT = ", source, re.M)
    one_step = [c for c in book.cells if c.cell_type == "markdown" and "One step, opened up" in c.source]
    assert one_step, f"{path.name} has no 'One step, opened up' section"


@pytest.mark.parametrize("path", [pytest.param(p, marks=pytest.mark.slow) if p.stem in SLOW else p for p in NOTEBOOKS],
                         ids=lambda p: p.stem)
def test_notebook_runs(path, tmp_path):
    import nbclient
    import nbformat

    book = read(path)
    at = parameter_cell(book)
    names = set(re.findall(r"^([A-Z_]+) = ", book.cells[at].source, re.M))
    small = "\n".join(f"{k} = {v!r}" for k, v in SMALL.items() if k in names)
    book.cells.insert(at + 1, nbformat.v4.new_code_cell("# the tests' settings\n" + small))
    client = nbclient.NotebookClient(book, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError, with the cell and its traceback, at the first failing cell
    assert (tmp_path / "runs" / "notebooks").is_dir()

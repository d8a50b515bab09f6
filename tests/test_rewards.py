"""Rewards with TRL's signature (mlx_rl/data/rewards.py): the user's files, built-ins, None, validation. No models."""

import json
import random
import textwrap

import numpy as np
import pytest

from mlx_rl.config import MlxRlError
from mlx_rl.data.datasets import load_prompts
from mlx_rl.data.rewards import load_rewards
from mlx_rl.data.tasks import get_task


def error(fn, *args, **kwargs):
    with pytest.raises(MlxRlError) as e:
        fn(*args, **kwargs)
    message = str(e.value)
    assert "\n" not in message
    return message


def reward_file(tmp_path, source, name="reward.py"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return path


TRL_REWARDS = """
    import re

    def accuracy_reward(completions, solution, **kwargs):
        # TRL's docs example, plain text completions
        return [1.0 if c.strip() == s else 0.0 for c, s in zip(completions, solution)]

    def chat_accuracy(completions, solution, **kwargs):
        # conversational completions, as TRL passes them for conversational prompts
        return [1.0 if c[0]["content"].strip() == s else 0.0 for c, s in zip(completions, solution)]

    def format_reward(completions, **kwargs):
        return [1.0 if re.match(r"^<think>.*?</think>", c[0]["content"]) else 0.0 for c in completions]

    def sees(prompts, completions, level):
        # no **kwargs: only the keywords it names arrive
        return [float(level_) for p, level_ in zip(prompts, level)]
"""


def test_trl_reward_functions_load_and_score_unchanged(tmp_path):
    path = reward_file(tmp_path, TRL_REWARDS)
    rs = load_rewards([f"{path}:accuracy_reward", f"{path}:sees"], [1.0, 0.5])
    assert rs.names == ["accuracy_reward", "sees"]
    s = rs.score(["3+8=", "2+2="], ["11", " 5 "], {"solution": ["11", "4"], "level": [2, 4], "prompt": ["x", "y"], "other": [0, 0]})
    assert s.total.dtype == np.float32 and s.total.tolist() == [2.0, 2.0]
    assert s.per_reward["accuracy_reward"].tolist() == [1.0, 0.0]
    assert s.metrics() == {"reward/mean": 2.0, "reward/std": 0.0, "reward/none_rows": 0, "reward/accuracy_reward": 0.5, "reward/sees": 3.0}

    chat = load_rewards([f"{path}:chat_accuracy", f"{path}:format_reward"])
    prompts = [[{"role": "user", "content": "3+8?"}], [{"role": "user", "content": "2+2?"}]]
    s = chat.score(prompts, ["<think>easy</think>11", "11"], {"solution": ["<think>easy</think>11", "4"]})
    assert s.per_reward["chat_accuracy"].tolist() == [1.0, 0.0] and s.per_reward["format_reward"].tolist() == [1.0, 0.0]
    # string prompts with conversational=True also get message-list completions
    assert load_rewards([f"{path}:chat_accuracy"]).score(["q"], ["4"], {"solution": ["4"]}, conversational=True).total.tolist() == [1.0]


def test_exact_plus_tenth_chars_is_the_builtin_tasks_reward():
    rs = load_rewards(["exact", "chars"], [1.0, 0.1])
    rng = random.Random(0)
    completions, targets = [], []
    for _ in range(500):
        target = "".join(rng.choice("0123456789ab") for _ in range(rng.randint(1, 6)))
        if rng.random() < 0.3:
            got = target
        else:
            got = "".join(rng.choice("0123456789ab") for _ in range(rng.randint(0, 8)))
        completions.append(rng.choice(["", " ", "\n"]) + got + rng.choice(["", " "]))
        targets.append(target)
    s = rs.score(["p"] * 500, completions, {"answer": targets})
    # the reference, computed differently: numpy over padded character arrays
    ref = []
    for c, t in zip(completions, targets):
        got = c.strip()
        n = min(len(got), len(t))
        same = np.frombuffer(got[:n].encode(), np.uint8) == np.frombuffer(t[:n].encode(), np.uint8)
        ref.append(float(got == t) + 0.1 * int(same.sum()))
    np.testing.assert_allclose(s.total, ref, rtol=1e-6)
    assert s.total.max() > 1 and s.total.min() == 0  # exact hits and misses both present

    # The built-in task's own rewards pay the same on its own rows: 1 for the exact answer + 0.1 per
    # character in its right place, the answer worked out here from the prompt (reversed, zero-padded sum).
    task = get_task("addition")
    rows = task.train_rows(np.random.default_rng(0), 50, distinct=True)
    prompts = [r["prompt"] for r in rows]
    answers = [str(sum(int(x) for x in p[:-1].split("+"))).zfill(3)[::-1] for p in prompts]
    assert [r["answer"] for r in rows] == answers
    guesses = [a if i % 3 == 0 else a[:2] + "9" for i, a in enumerate(answers)]
    columns = {k: [r[k] for r in rows] for k in ("answer", "kind")}
    expected = [float(g == a) + 0.1 * sum(x == y for x, y in zip(g, a)) for g, a in zip(guesses, answers)]
    assert len(set(expected)) > 1  # right answers and wrong last digits both present
    np.testing.assert_allclose(task.rewards.score(prompts, guesses, columns).total, expected, rtol=1e-6)
    np.testing.assert_allclose(rs.score(prompts, guesses, {"answer": answers}).total, expected, rtol=1e-6)


@pytest.mark.parametrize("completion, answer, numeric, lenient", [
    ("11", "11", 1, 1),
    ("The answer is 11.", 11, 1, 1),
    ("11.0", "11", 1, 1),
    ("-4", -4, 1, 1),
    ("+4", "4", 1, 1),
    ("1,234 apples", 1234, 1, 1),
    ("1234", "1,234", 1, 1),
    ("0.5", ".5", 1, 1),
    ("3 + 8 = 11", 11, 0, 1),  # numeric reads the 3
    ("x=5, y=6", 5, 1, 1),
    ("x=5, y=6", 6, 0, 0),
    ("3 + 8 = eleven", 11, 0, 0),
    ("no number", 3, 0, 0),
    ("12", 1.2, 0, 0),
    ("1.2", 1.2, 1, 1),
])
def test_numeric_rewards(completion, answer, numeric, lenient):
    rs = load_rewards(["numeric", "lenient_numeric"])
    s = rs.score(["p"], [completion], {"answer": [answer]})
    assert (s.per_reward["numeric"][0], s.per_reward["lenient_numeric"][0]) == (numeric, lenient)


def test_format_length_and_column_arguments():
    rs = load_rewards([r"format:^<answer>\d+</answer>$", "length:4", "exact:solution"])
    assert rs.names == ["format", "length", "exact"] and rs.required_columns() == {"solution"}
    s = rs.score(["p"] * 3, ["<answer>12</answer>", "1234", "123456"], {"solution": ["x", "1234", "1"]})
    assert s.per_reward["format"].tolist() == [1, 0, 0]
    assert s.per_reward["length"].tolist() == [-(19 - 4) / 4, 0.0, -0.5]
    assert s.per_reward["exact"].tolist() == [0, 1, 0]
    for spec in ("exact", "numeric", "lenient_numeric", "chars", "format:x", "length:3"):  # each says what it pays
        assert len(load_rewards([spec]).rewards[0].fn.__doc__) > 40


def test_none_means_does_not_apply(tmp_path):
    path = reward_file(tmp_path, """
        def code_only(completions, kind, **kwargs):
            return [float("def" in c) if k == "code" else None for c, k in zip(completions, kind)]

        def never(completions, **kwargs):
            return [None] * len(completions)
    """)
    rs = load_rewards([f"{path}:code_only", "exact", f"{path}:never"], [2.0, 1.0, 5.0])
    s = rs.score(["p"] * 4, ["def f", "x", "y", "z"], {"kind": ["code", "code", "math", "math"], "answer": ["q", "x", None, None]})
    # row 0: 2*1 + 0; row 1: 2*0 + 1; row 2 and 3: nothing applies -> 0, counted
    assert s.total.tolist() == [2.0, 1.0, 0.0, 0.0] and s.none_rows == 2
    assert np.isnan(s.per_reward["code_only"][2:]).all() and np.isnan(s.per_reward["never"]).all()
    m = s.metrics()
    assert m["reward/code_only"] == 0.5 and m["reward/exact"] == 0.5 and "reward/never" not in m
    assert m["reward/none_rows"] == 2 and m["reward/mean"] == 0.75
    assert s.accuracy == 0.5


def test_return_values_are_checked(tmp_path):
    path = reward_file(tmp_path, """
        import numpy as np

        def boom(completions, **kwargs):
            return [1 / 0 for c in completions]

        def a_dict(completions, **kwargs):
            return {"a": 1}

        def short(completions, **kwargs):
            return [1.0]

        def text(completions, **kwargs):
            return [1.0, "yes"]

        def nan(completions, **kwargs):
            return [0.0, float("nan")]

        def inf(completions, **kwargs):
            return (0.0, float("-inf"))

        def matrix(completions, **kwargs):
            return np.zeros((2, 1))

        def fine(completions, **kwargs):
            return [True, np.float32(0.5)]

        def fine_array(completions, **kwargs):
            return np.array([1, 0])
    """)

    def score(name, where=None):
        return load_rewards([f"{path}:{name}"]).score(["a", "b"], ["x", "y"], where=where)

    assert error(score, "boom") == (f"reward boom ({path}:boom): row 0 (prompt 'a'): raised ZeroDivisionError: "
                                     "division by zero (at reward.py:5)")  # the first row it fails on, found one row at a time
    assert error(score, "a_dict") == f"reward a_dict ({path}:a_dict): returned dict, expected a list of 2 numbers (or None)"
    assert error(score, "short").endswith("returned 1 values for 2 completions")
    assert error(score, "text").endswith(": row 1 (prompt 'b'): returned 'yes' (str), expected a number or None")
    assert error(score, "nan", where=["d.jsonl:4", "d.jsonl:9"]).endswith(": row 1 (d.jsonl:9): returned nan, expected a finite number")
    assert "row 1" in error(score, "inf") and "-inf" in error(score, "inf")
    assert "array of shape (2, 1)" in error(score, "matrix")
    assert score("fine").total.tolist() == [1.0, 0.5]
    assert score("fine_array").total.tolist() == [1.0, 0.0]


def test_builtin_row_errors_name_the_row():
    rs = load_rewards(["numeric"])
    assert error(rs.score, ["p", "q"], ["1", "2"], {"answer": [1, "two"]}, where=["d.jsonl:1", "d.jsonl:2"]) == \
        "reward numeric: row 1 (d.jsonl:2): answer 'two' is not a number"


def test_spec_errors(tmp_path):
    assert error(load_rewards, [f"{tmp_path}/nope.py:f"]) == f"reward spec '{tmp_path}/nope.py:f': file {tmp_path}/nope.py does not exist"
    assert "C:\\rewards\\mine.py does not exist" in error(load_rewards, ["C:\\rewards\\mine.py:score"])  # a drive letter is not a spec colon
    bad = reward_file(tmp_path, "import os\n\ndef f(completions:\n    return []\n", "bad.py")
    assert error(load_rewards, [f"{bad}:f"]).startswith(f"reward file {bad} failed to import: SyntaxError: ")
    assert "line 3" in error(load_rewards, [f"{bad}:f"])
    missing = reward_file(tmp_path, "import not_a_module_anywhere\n", "missing.py")
    assert error(load_rewards, [f"{missing}:f"]) == (f"reward file {missing} failed to import: ModuleNotFoundError: "
                                                     "No module named 'not_a_module_anywhere' (at missing.py:1)")
    good = reward_file(tmp_path, "LIMIT = 3\n\ndef accuracy(completions, **kw):\n    return [0.0] * len(completions)\n", "good.py")
    assert error(load_rewards, [f"{good}:acuracy"]) == (f"reward file {good} has no function 'acuracy' "
                                                        "(did you mean 'accuracy'? it defines: accuracy)")
    assert "'LIMIT' in" in error(load_rewards, [f"{good}:LIMIT"]) and "is int, not a function" in error(load_rewards, [f"{good}:LIMIT"])
    assert "names no function" in error(load_rewards, [f"{good}:"])
    assert "names a file but no function" in error(load_rewards, [str(good)])
    assert error(load_rewards, ["exakt"]).startswith("unknown reward 'exakt' (did you mean 'exact'? built-ins: exact, numeric,")
    assert "needs an argument: format:REGEX" in error(load_rewards, ["format"])
    assert error(load_rewards, ["format:(unclosed"]).startswith("reward spec 'format:(unclosed': bad regular expression: missing )")
    assert "whole number of characters" in error(load_rewards, ["length:abc"]) and "got '0'" in error(load_rewards, ["length:0"])
    assert error(load_rewards, ["exact", "chars"], [1.0]) == "1 reward weights for 2 rewards; give one weight per reward"
    assert "finite numbers, got nan" in error(load_rewards, ["exact"], [float("nan")])
    assert "no reward given" in error(load_rewards, [])
    assert "must be a built-in name" in error(load_rewards, [""])
    sig = reward_file(tmp_path, """
        def singular(completion, answer):
            return []

        def positional(prompts, completions, /):
            return []
    """, "sig.py")
    assert "takes no 'completions' parameter (not 'completion')" in error(load_rewards, [f"{sig}:singular"])
    assert "parameter 'prompts' is positional-only" in error(load_rewards, [f"{sig}:positional"])


def test_names_are_unique_and_files_import_once(tmp_path):
    path = reward_file(tmp_path, """
        CALLS = []
        CALLS.append(1)

        def mean(completions, **kwargs):
            return [float(len(CALLS))] * len(completions)
    """)
    rs = load_rewards(["exact", "exact", f"{path}:mean", f"{path}:mean", "format:x"])
    assert rs.names == ["exact", "exact_2", "mean_2", "mean_3", "format"]  # "mean" is a metric name
    assert rs.score(["p"], ["x"], {"answer": ["x"]}).per_reward["mean_2"].tolist() == [1.0]  # imported once
    assert rs.describe() == f"reward = 1 x exact + 1 x exact + 1 x {path}:mean + 1 x {path}:mean + 1 x format:x"


def test_required_columns_checked_before_any_model(tmp_path):
    path = reward_file(tmp_path, """
        def needs(prompts, completions, solution, *, difficulty, scale=1.0, **kwargs):
            return [0.0] * len(completions)

        def singular_prompt(completions, prompt):
            return [0.0] * len(completions)
    """)
    (tmp_path / "d.jsonl").write_text(json.dumps({"prompt": "a", "solution": "1", "difficulty": 1}) + "\n")
    data = load_prompts(tmp_path / "d.jsonl", valid_share=0)
    rs = load_rewards([f"{path}:needs", "exact"])
    assert rs.required_columns() == {"solution", "difficulty", "answer"}
    assert error(rs.check_columns, data.columns) == ("reward exact needs column 'answer', which the data does not have "
                                                      "(its columns: difficulty, solution)")
    load_rewards([f"{path}:needs", "exact:solution"]).check_columns(data.columns)
    assert "needs column 'difficulty'" in error(load_rewards([f"{path}:needs"]).check_columns, {"prompt", "solution"})
    assert "(TRL's names are 'prompts' and 'completions')" in error(load_rewards([f"{path}:singular_prompt"]).check_columns, data.columns)
    assert "needs column 'answer'" in error(rs.score, ["a"], ["1"], {"solution": ["1"], "difficulty": [1]})  # score checks too


def test_is_verifier(tmp_path):
    assert load_rewards(["exact", "chars"]).is_verifier() and load_rewards(["format:x"]).is_verifier()
    assert not load_rewards(["chars", "exact"]).is_verifier() and not load_rewards(["length:3"]).is_verifier()
    path = reward_file(tmp_path, """
        def scaled(completions, **kwargs):
            return [float(c) for c in completions]
    """)
    rs = load_rewards([f"{path}:scaled"])
    assert not rs.is_verifier()  # nothing seen yet
    rs.score(["p"] * 3, ["1", "0", "1"])
    assert rs.is_verifier()
    rs.score(["p"], ["0.5"])
    assert not rs.is_verifier()
    rs.score(["p"], ["1"])
    assert not rs.is_verifier()  # once a non-0/1 value is seen, it stays not a verifier


def test_callables_and_empty_batches():
    def shout(completions, **kwargs):
        return [float(c.isupper()) for c in completions]

    rs = load_rewards([shout, "exact"], [1.0, 1.0])
    assert rs.names == ["shout", "exact"]
    s = rs.score(["a", "b"], ["HI", "x"], {"answer": ["HI", "y"]})
    assert s.total.tolist() == [2.0, 0.0]
    empty = rs.score([], [], {"answer": []})
    assert empty.total.shape == (0,) and empty.metrics() == {}

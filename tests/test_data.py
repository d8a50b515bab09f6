"""The user's own data: prompt files, corpora and preference pairs (mlx_rl/data). No models; well under a second."""

import json

import numpy as np
import pytest

from mlx_rl.config import MlxRlError
from mlx_rl.data import pairs
from mlx_rl.data.datasets import (chat_tokens, charset, corpus_examples, load_corpus, load_prompts, needs_chat_template,
                                  prompt_messages, prompt_text, sample_rows)

USER = {"role": "user", "content": "What is 3 + 8?"}


def write(path, rows):
    """Rows (dicts, or str lines written as they are) to a JSONL file; returns the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def error(fn, *args, **kwargs):
    """The one-line message of the MlxRlError that fn raises."""
    with pytest.raises(MlxRlError) as e:
        fn(*args, **kwargs)
    message = str(e.value)
    assert "\n" not in message
    return message


# ----------------------------------------------------------------------------- prompt data


def test_trl_prompt_files_load_string_and_conversational(tmp_path):
    path = write(tmp_path / "data.jsonl", [
        {"prompt": "3+8=", "answer": "11", "solution": "11"},
        {"prompt": [USER], "answer": 11, "level": 2},
        {"system": "Answer with a number.", "prompt": "2+2=", "answer": "4"},
    ])
    data = load_prompts(path, valid_share=0)
    assert data.train == [{"prompt": "3+8=", "answer": "11", "solution": "11"},
                          {"prompt": [USER], "answer": 11, "level": 2},
                          {"system": "Answer with a number.", "prompt": "2+2=", "answer": "4"}]
    assert data.valid == [] and data.test == []
    assert data.columns == {"prompt", "answer"}  # the columns every row has
    assert data.train[1].where == f"{path}:2"
    assert data.describe() == f"{path}: 3 train rows, none held out"

    string, chat, system = data.train
    assert not needs_chat_template(string) and needs_chat_template(chat)
    assert prompt_messages(string) == [{"role": "user", "content": "3+8="}]
    assert prompt_messages(chat) == [USER]
    assert prompt_messages(system) == [{"role": "system", "content": "Answer with a number."}, {"role": "user", "content": "2+2="}]
    assert prompt_text(string) == "3+8="
    assert prompt_text(system) == "Answer with a number.\n2+2="
    assert f"{path}:2" in error(prompt_text, chat) and "chat template" in error(prompt_text, chat)


def test_folder_layout_train_valid_test(tmp_path):
    write(tmp_path / "d" / "train.jsonl", [{"prompt": f"p{i}", "answer": i} for i in range(5)])
    write(tmp_path / "d" / "valid.jsonl", [{"prompt": "v", "answer": 0}])
    write(tmp_path / "d" / "test.jsonl", [{"prompt": "t", "answer": 0}, {"prompt": "t2", "answer": 1}])
    data = load_prompts(tmp_path / "d")
    assert [len(data.train), len(data.valid), len(data.test)] == [5, 1, 2]  # valid.jsonl: nothing held out
    assert not data.held_out
    assert data.describe() == f"{tmp_path / 'd'}: 5 train rows (train.jsonl), 1 valid rows (valid.jsonl), 2 test rows (test.jsonl)"
    (tmp_path / "d" / "valid.jsonl").unlink()
    data = load_prompts(tmp_path / "d", valid_share=0.2)
    assert (len(data.train), len(data.valid), data.held_out) == (4, 1, True)


def test_held_out_split_is_seeded_deterministic_and_disjoint(tmp_path):
    rows = [{"prompt": f"{i:03d}+1=", "answer": str(i + 1)} for i in range(1000)]
    path = write(tmp_path / "data.jsonl", rows)
    a, b = load_prompts(path, seed=0), load_prompts(path, seed=0)
    assert a.train == b.train and a.valid == b.valid
    assert a.describe() == f"{path}: 900 train rows, 100 held out (10%, seed 0)"
    train, valid = {r["prompt"] for r in a.train}, {r["prompt"] for r in a.valid}
    assert not train & valid and len(train | valid) == 1000
    assert [r["prompt"] for r in a.train] == sorted(train)  # file order kept within a side
    c = load_prompts(path, seed=1)
    assert {r["prompt"] for r in c.valid} != valid and len(c.valid) == 100
    # the split follows the rows, not their positions: reversed file, same split
    reversed_path = write(tmp_path / "reversed.jsonl", rows[::-1])
    assert {r["prompt"] for r in load_prompts(reversed_path, seed=0).valid} == valid
    assert len(load_prompts(path, valid_share=0.25).valid) == 250


def test_held_out_never_splits_a_repeated_prompt(tmp_path):
    rows = [{"prompt": f"q{i % 7}", "answer": str(i)} for i in range(70)]  # each prompt ten times
    for seed in range(5):
        data = load_prompts(write(tmp_path / "dup.jsonl", rows), seed=seed, valid_share=0.1)
        assert data.valid and not {r["prompt"] for r in data.train} & {r["prompt"] for r in data.valid}


def test_held_out_needs_enough_rows(tmp_path):
    path = write(tmp_path / "one.jsonl", [{"prompt": "a"}])
    assert "too few" in error(load_prompts, path) and "valid.jsonl" in error(load_prompts, path)
    assert len(load_prompts(path, valid_share=0).train) == 1
    same = write(tmp_path / "same.jsonl", [{"prompt": "a", "answer": i} for i in range(5)])
    assert "every row has the same prompt" in error(load_prompts, same)
    assert "below 1" in error(load_prompts, same, valid_share=1.0)


def test_blank_lines_byte_order_mark_and_line_numbers(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "a"}\n\n   \r\n{"prompt": "b"}\r\n')
    data = load_prompts(path, valid_share=0)
    assert [r["prompt"] for r in data.train] == ["a", "b"]
    assert data.train[1].where == f"{path}:4"


@pytest.mark.parametrize("line, message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "must be a JSON object with a 'prompt', got a list"),
    (json.dumps({"question": "x"}), "missing key 'prompt' (the row has: question)"),
    (json.dumps({"messages": [USER]}), "corpus data"),
    (json.dumps({"prompt": ""}), "'prompt' is empty"),
    (json.dumps({"prompt": "  \n"}), "'prompt' is empty"),
    (json.dumps({"prompt": 5}), "'prompt' must be a string or a list of messages, got a number"),
    (json.dumps({"prompt": None}), "got null"),
    (json.dumps({"prompt": []}), "'prompt' is an empty list of messages"),
    (json.dumps({"prompt": ["hi"]}), "message 1 of 'prompt' must be an object"),
    (json.dumps({"prompt": [USER, {"content": "x"}]}), "message 2 of 'prompt' must have a string 'role'"),
    (json.dumps({"prompt": [{"role": "bot", "content": "x"}]}), "has role 'bot' (expected system, user, assistant or tool)"),
    (json.dumps({"prompt": [{"role": "user", "content": 3}]}), "must have a string 'content', got a number"),
    (json.dumps({"prompt": [{"role": "user", "content": [{"type": "text", "text": "x"}]}]}), "content parts"),
    (json.dumps({"prompt": "x", "system": 1}), "'system' must be a string, got a number"),
    (json.dumps({"prompt": [{"role": "system", "content": "s"}, USER], "system": "s"}), "both a 'system' column and a system message"),
])
def test_prompt_file_errors_name_the_line(tmp_path, line, message):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"prompt": "ok", "answer": 1}) + "\n\n" + line + "\n")
    got = error(load_prompts, path)
    assert got.startswith(f"{path}:3: ") and message in got


def test_prompt_file_and_folder_errors(tmp_path):
    assert error(load_prompts, tmp_path / "missing.jsonl") == f"prompt data {tmp_path / 'missing.jsonl'} does not exist"
    (tmp_path / "empty.jsonl").write_text("\n \n")
    assert error(load_prompts, tmp_path / "empty.jsonl") == f"{tmp_path / 'empty.jsonl'} is empty: it holds no rows"
    (tmp_path / "folder").mkdir()
    write(tmp_path / "folder" / "valid.jsonl", [{"prompt": "a"}])
    assert "has no train.jsonl" in error(load_prompts, tmp_path / "folder")
    write(tmp_path / "folder" / "train.jsonl", [{"prompt": "a"}])
    (tmp_path / "folder" / "valid.jsonl").write_text("")
    assert error(load_prompts, tmp_path / "folder").startswith(f"{tmp_path / 'folder' / 'valid.jsonl'} is empty")
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n')
    assert error(load_prompts, bad).startswith(f"{bad}:2: not valid UTF-8 (byte 16 of the line is 0xe9)")
    array = write(tmp_path / "array.jsonl", ['[{"prompt": "a"},', '{"prompt": "b"}]'])
    assert "one JSON object per line, not one JSON array" in error(load_prompts, array)


def test_sample_rows_reproducible_from_the_rng_state(tmp_path):
    rows = [{"prompt": str(i)} for i in range(50)]
    rng = np.random.default_rng(3)
    sample_rows(rows, rng, 5)
    saved = rng.bit_generator.state  # what a checkpoint stores
    first = sample_rows(rows, rng, 20)
    rng2 = np.random.default_rng(99)
    rng2.bit_generator.state = saved
    assert sample_rows(rows, rng2, 20) == first
    assert len({r["prompt"] for r in sample_rows(rows, np.random.default_rng(0), 200)}) > 40  # with replacement, all rows reachable
    assert sample_rows(rows, rng, 0) == []


# ----------------------------------------------------------------------------- corpora


def test_corpus_formats_and_examples(tmp_path):
    text = load_corpus(write(tmp_path / "text.jsonl", [{"text": "07+45=250"}, {"text": "ab"}]), valid_share=0)
    assert text.format == "text" and corpus_examples(text.train) == [("", "07+45=250"), ("", "ab")]

    done = [{"role": "assistant", "content": "11"}]
    completions = load_corpus(write(tmp_path / "c.jsonl", [{"prompt": "3+8=", "completion": "11"},
                                                            {"prompt": [USER], "completion": done}]), valid_share=0)
    assert completions.format == "completions"
    assert corpus_examples(completions.train) == [("3+8=", "11"), ([USER], "11")]

    chat = [{"role": "system", "content": "Be brief."}, USER, {"role": "assistant", "content": "11"},
            {"role": "user", "content": "And 2+2?"}, {"role": "assistant", "content": "4"}]
    messages = load_corpus(write(tmp_path / "m.jsonl", [{"messages": chat}]), valid_share=0)
    assert messages.format == "chat"
    assert corpus_examples(messages.train) == [(chat[:-1], "4")]  # the loss on the last assistant turn

    held = load_corpus(write(tmp_path / "big.jsonl", [{"text": f"line {i}"} for i in range(40)]), seed=2)
    assert (len(held.train), len(held.valid)) == (36, 4)
    assert held.describe() == f"{tmp_path / 'big.jsonl'}: 36 train rows, 4 held out (10%, seed 2)"


@pytest.mark.parametrize("line, message", [
    (json.dumps({"body": "x"}), "a corpus row needs 'text', 'prompt' and 'completion', or 'messages' (the row has: body)"),
    (json.dumps({"text": ""}), "'text' is empty"),
    (json.dumps({"text": 3}), "'text' must be a string, got a number"),
    (json.dumps({"prompt": "a"}), "it has no 'completion'"),
    (json.dumps({"prompt": "a", "completion": " "}), "'completion' is empty"),
    (json.dumps({"prompt": "a", "completion": [USER]}), "a 'completion' list must be one assistant message"),
    (json.dumps({"messages": [USER]}), "the last message of 'messages' must be the assistant's"),
    (json.dumps({"messages": [{"role": "user"}]}), "message 1 of 'messages' must have a string 'content'"),
    ("3", "must be a JSON object, got a number"),
])
def test_corpus_errors_name_the_line(tmp_path, line, message):
    path = tmp_path / "corpus.jsonl"
    path.write_text(json.dumps({"messages": [USER, {"role": "assistant", "content": "11"}]}) + "\n\n" + line + "\n")
    got = error(load_corpus, path)
    assert got.startswith(f"{path}:3: ") and message in got


def test_corpus_has_one_format(tmp_path):
    path = write(tmp_path / "d" / "train.jsonl", [{"text": "a"}, {"text": "b"}])
    write(tmp_path / "d" / "valid.jsonl", [{"prompt": "a", "completion": "b"}])
    assert error(load_corpus, tmp_path / "d") == (f"{tmp_path / 'd' / 'valid.jsonl'}:1: a 'completions' row, but the corpus's "
                                                  f"first row ({path}:1) is a 'text' row; a corpus has one format")


def toy_render(messages, add_generation_prompt):
    """A character-level chat template: <role>content|, then "<assistant>" for the generation prompt."""
    text = "".join(f"<{m['role']}>{m['content']}|" for m in messages) + ("<assistant>" if add_generation_prompt else "")
    return [ord(c) for c in text]


def test_chat_tokens_masks_every_assistant_turn():
    chat = [USER, {"role": "assistant", "content": "11"}, {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    ids, mask = chat_tokens(chat, toy_render)
    text = "".join(map(chr, ids))
    assert text == "<user>What is 3 + 8?|<assistant>11|<user>2+2?|<assistant>4|"
    trained = "".join(c if m else "." for c, m in zip(text, mask))
    assert trained.replace(".", " ").split() == ["11|", "4|"]  # each answer and its end-of-turn marker

    def reasoning_dropped(messages, add_generation_prompt):  # earlier turns rendered differently, as Qwen3 does
        last = len(messages) - 1
        shown = [m if i == last or m["role"] != "assistant" else {**m, "content": ""} for i, m in enumerate(messages)]
        return toy_render(shown, add_generation_prompt)

    assert "message 2" in error(chat_tokens, chat, reasoning_dropped, where="m.jsonl:1")


def test_charset_covers_prompts_answers_and_texts():
    rows = [{"prompt": "ab", "answer": 12}, {"prompt": [{"role": "user", "content": "é"}], "answer": "x"},
            {"text": "z"}, {"messages": [{"role": "assistant", "content": "Q"}]}, {"prompt": "p", "chosen": "c", "where": "f.jsonl:9"}]
    assert charset(rows) == "".join(sorted("ab12éxzQpc"))  # no role names, no location


# ----------------------------------------------------------------------------- preference pairs


def test_trl_pair_formats(tmp_path):
    sky = {"role": "user", "content": "What color is the sky?"}
    blue, green = {"role": "assistant", "content": "It is blue."}, {"role": "assistant", "content": "It is green."}
    path = write(tmp_path / "pairs.jsonl", [
        {"prompt": "07+45=", "chosen": "250", "rejected": "240", "extra": [1]},                  # explicit
        {"chosen": "The sky is blue.", "rejected": "The sky is green."},                          # implicit, strings
        {"chosen": "07+45=250", "rejected": "07+45=240"},                                         # ... inside a number
        {"chosen": [sky, blue], "rejected": [sky, green]},                                        # implicit conversational
        {"prompt": [sky], "chosen": [blue], "rejected": [green], "score_chosen": 9, "score_rejected": 2.5},  # conversational
        {"prompt": "What color is the sky?", "chosen": [sky, blue], "rejected": [sky, green]},    # prompt repeated
        {"prompt": [sky], "chosen": "It is blue.", "rejected": [green]},                          # mixed answers
    ])
    got = pairs.read_pairs(path)
    assert [{k: v for k, v in r.items() if k != "where"} for r in got] == [
        {"prompt": "07+45=", "chosen": "250", "rejected": "240"},
        {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
        {"prompt": "07+45=", "chosen": "250", "rejected": "240"},
        {"prompt": [sky], "chosen": "It is blue.", "rejected": "It is green."},
        {"prompt": [sky], "chosen": "It is blue.", "rejected": "It is green.", "score_chosen": 9, "score_rejected": 2.5},
        {"prompt": [sky], "chosen": "It is blue.", "rejected": "It is green."},
        {"prompt": [sky], "chosen": "It is blue.", "rejected": "It is green."},
    ]
    assert [r["where"] for r in got] == [f"{path}:{i}" for i in range(1, 8)]


def test_implicit_multi_turn_conversation(tmp_path):
    turns = [{"role": "system", "content": "s"}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
             {"role": "user", "content": "c"}]
    path = write(tmp_path / "p.jsonl", [{"chosen": turns + [{"role": "assistant", "content": "yes"}],
                                         "rejected": turns + [{"role": "assistant", "content": "no"}]}])
    assert pairs.read_pairs(path)[0]["prompt"] == turns


GOOD = {"prompt": "07+45=", "chosen": "250", "rejected": "240"}
A = {"role": "assistant", "content": "x"}


@pytest.mark.parametrize("line, message", [
    ("{oops", "not valid JSON"),
    ("[]", "each line must be a JSON object"),
    (json.dumps({"prompt": "1+1=", "rejected": "3"}), "missing key 'chosen'"),
    (json.dumps({**GOOD, "prompt": 5}), "'prompt' must be a string or a list of messages"),
    (json.dumps({**GOOD, "prompt": ""}), "'prompt' is empty"),
    (json.dumps({**GOOD, "chosen": ""}), "'chosen' is empty"),
    (json.dumps({**GOOD, "rejected": None}), "'rejected' must be a string or a list of messages, got null"),
    (json.dumps({**GOOD, "rejected": "250"}), "are the same answer"),
    (json.dumps({**GOOD, "prompt": [{"role": "user"}]}), "message 1 of 'prompt' must have a string 'content'"),
    (json.dumps({**GOOD, "prompt": []}), "empty list of messages"),
    (json.dumps({**GOOD, "chosen": [{"role": "user", "content": "250"}]}), "the last message of 'chosen' must have role 'assistant'"),
    (json.dumps({**GOOD, "chosen": [{"role": "user", "content": "q"}, A]}), "'chosen' has 2 messages; with an explicit 'prompt'"),
    (json.dumps({"chosen": "2", "rejected": "3"}), "share no prompt text"),
    (json.dumps({"chosen": "abc", "rejected": "abd"}), "share no prompt text"),  # not cut inside a word
    (json.dumps({"chosen": "q: a", "rejected": [A]}), "a string and a list"),
    (json.dumps({"chosen": [{"role": "user", "content": "q"}, A], "rejected": [{"role": "user", "content": "r"}, A]}),
     "conversations with no message in common"),
    (json.dumps({"chosen": [{"role": "user", "content": "q"}, A], "rejected": [{"role": "user", "content": "q"}, A]}),
     "the same conversation"),
    (json.dumps({"chosen": [{"role": "user", "content": "q"}, A], "rejected": [{"role": "user", "content": "q"}]}),
     "'rejected' has no message after the 1 both conversations share"),
    (json.dumps({"chosen": [{"role": "user", "content": "q"}, A, A], "rejected": [{"role": "user", "content": "q"}, {**A, "content": "y"}]}),
     "after the messages they share it must be one assistant message"),
    (json.dumps({**GOOD, "score_chosen": "high"}), "'score_chosen' must be a finite number"),
])
def test_pair_errors_name_the_line(tmp_path, line, message):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + line + "\n")
    got = error(pairs.read_pairs, path)
    assert got.startswith(f"{path}:3: ") and message in got


def test_pair_file_errors_and_folder_layout(tmp_path):
    assert "does not exist" in error(pairs.read_pairs, tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    assert "is empty: it holds no rows" in error(pairs.read_pairs, tmp_path / "empty.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"prompt": "\xff"}\n')
    assert error(pairs.read_pairs, bad).startswith(f"{bad}:2: not valid UTF-8")

    write(tmp_path / "d" / "train.jsonl", [GOOD, {**GOOD, "prompt": "01+01=", "chosen": "20"}])
    write(tmp_path / "d" / "valid.jsonl", [{**GOOD, "prompt": "09+09=", "chosen": "81"}])
    assert [r["prompt"] for r in pairs.read_pairs(tmp_path / "d")] == ["07+45=", "01+01="]
    data = pairs.load_pairs(tmp_path / "d")
    assert [r["prompt"] for r in data.valid] == ["09+09="] and data.valid[0]["where"].endswith("valid.jsonl:1")
    assert "has no train.jsonl" in error(pairs.read_pairs, tmp_path)


def test_held_out_pairs_keep_a_prompt_together(tmp_path):
    rows = [{"prompt": f"{i % 10:02d}+00=", "chosen": f"{i % 10}0", "rejected": f"x{i}"} for i in range(50)]
    data = pairs.load_pairs(write(tmp_path / "p.jsonl", rows), valid_share=0.2)
    assert len(data.valid) == 10 and not {r["prompt"] for r in data.train} & {r["prompt"] for r in data.valid}
    assert len(pairs.load_pairs(tmp_path / "p.jsonl").train) == 50  # nothing held out by default


def test_write_pairs_round_trip_atomically(tmp_path):
    sky = [{"role": "user", "content": "What color is the sky? é"}]
    rows = [{"prompt": "07+45=", "chosen": "250", "rejected": "240", "score_chosen": 1.2, "score_rejected": 0.0, "where": "x:1", "other": 1},
            {"prompt": sky, "chosen": "blue", "rejected": "green"}]
    out = tmp_path / "pairs.jsonl"
    out.write_text("old contents\n")
    pairs.write_pairs(out, rows)
    lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert lines[0] == {"prompt": "07+45=", "chosen": "250", "rejected": "240", "score_chosen": 1.2, "score_rejected": 0.0}
    assert lines[1]["chosen"] == [{"role": "assistant", "content": "blue"}]  # TRL's conversational format
    back = pairs.read_pairs(out)
    assert [{k: v for k, v in r.items() if k != "where"} for r in back] == [
        {k: v for k, v in rows[0].items() if k not in ("where", "other")}, rows[1]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pairs.jsonl"]  # no temp file left

    class Boom(dict):
        def __getitem__(self, key):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        pairs.write_pairs(out, [Boom()])
    assert pairs.read_pairs(out) == back and sorted(p.name for p in tmp_path.iterdir()) == ["pairs.jsonl"]

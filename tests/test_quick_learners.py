"""bench/quick_learners.py: its 25 instruction tasks (deterministic by seed, every output right for its input,
checked against hand-written answers) and the whole pipeline at its smallest size (two starts, one held-out
task, one sweep cell each; it runs and writes its table, no claim asserted: that is the bench's job)."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("quick_learners", Path(__file__).parents[1] / "bench" / "quick_learners.py")
ql = importlib.util.module_from_spec(spec)
sys.modules["quick_learners"] = ql  # its dataclass looks its module up there
spec.loader.exec_module(ql)

WORDS = ["apple", "dog", "sun", "river"]
EXPECTED = {  # each task's answer for WORDS, written by hand (not by the task's own function)
    "copy": "apple dog sun river", "reverse": "river sun dog apple", "upper": "APPLE DOG SUN RIVER",
    "first": "apple", "last": "river", "second": "dog", "drop_first": "dog sun river", "count_words": "4",
    "swap_ends": "river dog sun apple", "sort_words": "apple dog river sun",
    "double_each": "apple apple dog dog sun sun river river", "initials": "a d s r", "first_len": "5",
    "vowels_first": "2", "rotate_left": "dog sun river apple", "capitalize": "Apple Dog Sun River",
    "sort_letters": "aelpp", "last_letters": "e g n r", "first_twice": "apple apple", "longest": "apple",
    "third": "sun", "rotate_right": "river apple dog sun", "join_and": "apple and dog and sun and river",
    "first_thrice": "apple apple apple", "drop_last": "apple dog sun",
}


def test_25_tasks_20_pretraining_5_held_out_each_right_on_a_known_input():
    assert len(ql.TASKS) == 25 and len({t.name for t in ql.TASKS}) == 25 and len({t.instruction for t in ql.TASKS}) == 25
    assert [t.name for t in ql.HELD_OUT] == ["third", "rotate_right", "join_and", "first_thrice", "drop_last"]
    assert {t.name: t.fn(WORDS) for t in ql.TASKS} == EXPECTED


def test_rows_are_deterministic_by_seed_and_right_for_their_inputs():
    for i, t in enumerate(ql.TASKS):
        rows = ql.task_rows(i, 40, seed=3)
        assert rows == ql.task_rows(i, 40, seed=3) and rows != ql.task_rows(i, 40, seed=4)
        assert ql.task_rows(i, 10, seed=3) == rows[:10]  # first-k: a longer draw extends a shorter one
        for r in rows:
            user, answer = r["messages"][0]["content"], r["messages"][1]["content"]
            head, words = user.split("\nInput: ")
            w = words.split()
            assert head == t.instruction and 3 <= len(w) <= 5 and len(set(w)) == len(w) and set(w) <= set(ql.WORDS)
            # independent checks of each output's defining property
            checks = {"copy": lambda: answer == words, "reverse": lambda: answer.split() == w[::-1],
                      "upper": lambda: answer == words.upper(), "count_words": lambda: answer == str(len(w)),
                      "sort_words": lambda: answer.split() == sorted(w), "third": lambda: answer == w[2],
                      "join_and": lambda: answer.split(" and ") == w, "drop_last": lambda: answer.split() == w[:-1],
                      "rotate_right": lambda: answer.split() == [w[-1]] + w[:-1],
                      "vowels_first": lambda: int(answer) == len([c for c in w[0] if c in "aeiou"]),
                      "sort_letters": lambda: list(answer) == sorted(w[0]) and len(answer) == len(w[0])}
            assert checks.get(t.name, lambda: answer == EXPECTED_FN[t.name](w))(), (t.name, user, answer)
        assert ql.plain_text(rows[0]) == {"text": rows[0]["messages"][0]["content"].split("Input: ")[1] + "\n"
                                                  + rows[0]["messages"][1]["content"]}


EXPECTED_FN = {  # the rest, restated
    "first": lambda w: w[0], "last": lambda w: w[-1], "second": lambda w: w[1], "drop_first": lambda w: " ".join(w[1:]),
    "swap_ends": lambda w: " ".join([w[-1]] + w[1:-1] + [w[0]]), "double_each": lambda w: " ".join(sum(([x, x] for x in w), [])),
    "initials": lambda w: " ".join(x[:1] for x in w), "first_len": lambda w: str(len(w[0])),
    "rotate_left": lambda w: " ".join(w[1:] + w[:1]), "capitalize": lambda w: " ".join(x[:1].upper() + x[1:] for x in w),
    "last_letters": lambda w: " ".join(x[-1:] for x in w), "first_twice": lambda w: " ".join(w[:1] * 2),
    "longest": lambda w: sorted(w, key=lambda x: (-len(x), w.index(x)))[0], "first_thrice": lambda w: " ".join(w[:1] * 3),
}


def test_pipeline_smallest_size_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "out"
    res = ql.main(["--held-out", "1", "--ks", "all", "--n-train", "4", "--pretrain-steps", "1", "--pretrain-rows", "2",
                   "--hidden", "32", "--layers", "1", "--max-new-tokens", "2", "--work", str(tmp_path / "w"),
                   "--out", str(out)])
    md = (out / "quick_learners.md").read_text()
    assert "| start | k=0 | k=all (4) | min_k |" in md and "| base |" in md and "| instruct |" in md
    saved = json.loads((out / "quick_learners.json").read_text())
    assert set(saved["per_task"]) == {"third"} and set(saved["per_task"]["third"]) == {"base", "instruct"}
    for start in ("base", "instruct"):  # k=0 is the start itself; k=4 the sweep's one cell, its own eval.json
        cell = tmp_path / "w" / "third" / f"sweep-{start}" / "data-fraction=1"
        assert json.loads((cell / "eval.json").read_text())["score"] == res["per_task"]["third"][start][4]
        assert len((cell / "data.jsonl").read_text().splitlines()) == 4
        assert 0 <= res["mean"][start][0] <= 1
    assert (tmp_path / "w" / "base" / "config.json").exists() and (tmp_path / "w" / "instruct" / "config.json").exists()
    pre = [json.loads(x) for x in (tmp_path / "w" / "pretrain-base.jsonl").read_text().splitlines()]
    assert len(pre) == 40 and all(set(r) == {"text"} and "Input:" not in r["text"] for r in pre)  # no instruction


def test_bad_ks_are_refused():
    with pytest.raises(SystemExit, match="--ks must rise"):
        ql.parse_ks("32,8", 256)
    with pytest.raises(SystemExit, match="--ks must rise"):
        ql.parse_ks("8,512", 256)
    assert ql.parse_ks("8,32,all", 256) == [8, 32, 256]

"""S3FT (`--objective s3ft`, train/s3ft.py, data/answers.py): the judges, the oracles of methods-more.md §7
((a) the three target sources with a stub generator and judge, (b) the base model finds S3FT's targets at least
as likely as the gold ones), the recipe through the CLI (targets file, counts, adapter, resume reusing the
targets), bad input, and the forgetting comparison against plain SFT on a tiny model pretrained here."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from leantune import cli
from leantune.data import load_dataset
from leantune.data.answers import AnswerRow, Query, answer_examples, read_answer_rows
from leantune.train.s3ft import (PARAPHRASE_PROMPT, TARGETS_FILE, build_targets, normalize, parse_judge,
                                 read_targets, write_targets)
from test_bad_input import assert_nothing_written, fails
from test_recipes import assert_peft_parity, chat_row, load, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")
COMMON = ("--dtype", "fp32", "--no-progress", "--eval-fraction", "0", "--seed", "0", "--report-to", "none")


# ---- judges ---------------------------------------------------------------------------------------------
def test_builtin_judges():
    exact, norm, contains = parse_judge("exact"), parse_judge("normalized"), parse_judge("contains")
    assert exact("q", " Paris ", "Paris") and not exact("q", "paris", "Paris")
    assert normalize("  The  Answer, is: 42!\n") == "the answer is 42"
    assert norm("q", "the ANSWER is 42.", "The answer is 42") and not norm("q", "The answer is 43", "answer is 42")
    assert contains("q", "I think it is Paris, France.", "paris") and not contains("q", "Parisian", "Paris")
    assert not contains("q", "It is 10.", "1") and contains("q", "It is 1.", "1")  # whole words only
    assert not contains("q", "anything", "")  # an empty gold answer matches nothing


def test_python_judge_from_a_file(tmp_path):
    f = tmp_path / "my_judge.py"
    f.write_text("def first_word(prompt, response, gold):\n    return response.split()[:1] == gold.split()[:1]\n")
    judge = parse_judge(f"{f}:first_word")
    assert judge("q", "Yes indeed", "Yes sir") and not judge("q", "No", "Yes")


@pytest.mark.parametrize("spec, says", [
    ("fuzzy", "give one of exact, normalized, contains"),
    ("{d}/missing.py:f", "no such file"),
    ("{d}/j.py:nope", "defines no function 'nope'"),
    ("{d}/j.py", "give one of exact"),
    ("{d}/broken.py:f", "importing"),
])
def test_bad_judge_specs(tmp_path, spec, says):
    (tmp_path / "j.py").write_text("def f(prompt, response, gold):\n    return True\n")
    (tmp_path / "broken.py").write_text("import no_such_module_here\n")
    with pytest.raises(ValueError, match=says):
        parse_judge(spec.format(d=tmp_path))


# ---- oracle (a): the three branches -------------------------------------------------------------------
def _rows(pairs) -> list[AnswerRow]:
    return [AnswerRow(i, Query.of_text(q), g, f"row {i}") for i, (q, g) in enumerate(pairs)]


def test_targets_take_self_then_paraphrase_then_gold():
    """Oracle (a): a stub generator (replies by prompt) and a stub judge; each row lands in its branch."""
    rows = _rows([("q0", "A0"), ("q1", "A1"), ("q2", "A2")])
    replies = {"q0": "ok A0", "q1": "wrong", "q2": "wrong"}
    calls = []

    def generate(queries):
        calls.append([q.text for q in queries])
        return [replies.get(q.text, "ok A1" if "A1" in q.text else "still wrong") for q in queries]

    judge = lambda prompt, response, gold: response.startswith("ok") and gold in response  # noqa: E731
    targets = build_targets(rows, generate, judge)
    assert [(t.source, t.target) for t in targets] == [("self", "ok A0"), ("paraphrase", "ok A1"), ("gold", "A2")]
    assert [t.index for t in targets] == [0, 1, 2] and [t.gold for t in targets] == ["A0", "A1", "A2"]
    # one batched call for the responses, one for the paraphrases of the rejected rows only
    assert calls[0] == ["q0", "q1", "q2"]
    assert calls[1] == [PARAPHRASE_PROMPT.format(question=q, answer=a) for q, a in (("q1", "A1"), ("q2", "A2"))]
    assert len(calls) == 2


def test_no_paraphrase_asked_when_every_response_passes():
    calls = []

    def generate(queries):
        calls.append(queries)
        return ["yes"] * len(queries)

    targets = build_targets(_rows([("a", "yes"), ("b", "yes")]), generate, parse_judge("exact"))
    assert [t.source for t in targets] == ["self", "self"] and len(calls) == 1


def test_a_failing_python_judge_names_the_row():
    def judge(prompt, response, gold):
        raise KeyError("boom")

    with pytest.raises(ValueError, match="row 1: the --judge function raised KeyError"):
        build_targets([AnswerRow(1, Query.of_text("q"), "g", "row 1")], lambda qs: ["x"] * len(qs), judge)


# ---- rows: the gold answer is trained exactly as SFT trains it ------------------------------------------
def test_gold_answers_tokenize_as_sft_does(folder, tmp_path):
    """With every target the gold one, S3FT's examples are SFT's: same ids, same loss mask (chat, completion,
    alpaca; a multi-turn chat trains its last turn only, by design)."""
    tok = load(folder)[1]
    files = {
        "chat": [chat_row("What is 2+2?", "4", system="Be brief."), chat_row("Hi", "Hello there.")],
        "completion": [{"prompt": "Say hi.", "completion": "hi"}, {"prompt": "Count.", "completion": "1 2 3"}],
        "alpaca": [{"instruction": "Add.", "input": "2 and 3", "output": "5"}, {"instruction": "Hi", "output": "yo"}],
    }
    for name, rows in files.items():
        path = write_jsonl(tmp_path / f"{name}.jsonl", rows)
        ans = read_answer_rows(path)
        ours = answer_examples(ans, [r.gold for r in ans], tok, 256)
        theirs = load_dataset(path, tok, 256)
        assert [(e.input_ids, e.labels) for e in ours] == [(e.input_ids, e.labels) for e in theirs], name
    multi = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                          {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}
    (row,) = read_answer_rows(write_jsonl(tmp_path / "multi.jsonl", [multi]))
    assert row.gold == "d" and row.query.text == "c" and len(row.query.messages) == 3
    (ex,) = answer_examples([row], ["d"], tok, 256)
    assert tok.decode([t for t in ex.labels if t != -100]).startswith("d")


# ---- bad input: before any weight is read ---------------------------------------------------------------
def test_bad_input_stops_before_any_weight_is_read(folder, tmp_path, capsys):
    """Each error names the file, row or option; the model folder's weights are garbage here, so an error that
    came after reading them would be another one."""
    import shutil

    out, unread = tmp_path / "out", tmp_path / "unread"
    shutil.copytree(folder, unread)
    for f in unread.glob("*.safetensors"):
        f.write_bytes(b"not weights")
    folder = unread
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    qa = write_jsonl(tmp_path / "qa.jsonl", [chat_row("q", "a")])
    ends_user = write_jsonl(tmp_path / "user.jsonl", [chat_row("q", "a"), {"messages": [
        {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, {"role": "user", "content": "c"}]}])
    base = ["finetune", "--model", folder, "--output", out, "--no-progress", "--objective", "s3ft"]
    cases = [
        ([*base, "--data", pairs], ["pairs.jsonl", "preference format", "prompt/completion"]),
        ([*base, "--data", ends_user], ["user.jsonl:2", "last message as the gold answer"]),
        ([*base, "--data", qa, "--judge", tmp_path / "nope.py:f"], ["--judge", "no such file"]),
        ([*base, "--data", qa, "--s3ft-paraphrase-prompt", "rewrite {x}"], ["--s3ft-paraphrase-prompt"]),
        (["finetune", "--model", folder, "--output", out, "--data", qa, "--judge", "contains"],
         ["--judge", "--objective s3ft"]),
    ]
    for argv, says in cases:
        err = fails(argv, capsys)
        assert all(s in err for s in says), err
        assert_nothing_written(out)
        assert not (out / TARGETS_FILE).exists()


# ---- the recipe through the CLI ------------------------------------------------------------------------
def _finetune(folder, data, out, *extra) -> dict:
    assert cli.run(["finetune", "--model", str(folder), "--data", str(data), "--output", str(out),
                    "--objective", "s3ft", *COMMON, *map(str, extra)]) == 0
    return json.loads((out / "summary.json").read_text())


def _records(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / TARGETS_FILE).read_text().splitlines()]


def test_recipe_writes_targets_counts_and_an_adapter_that_loads(folder, tmp_path):
    """A python judge that accepts any non-empty response makes every target the random model's own reply;
    the targets file names them, summary.json counts them, and the adapter loads in PEFT with equal logits."""
    judge = tmp_path / "judge.py"
    judge.write_text("def anything(prompt, response, gold):\n    return bool(response.strip())\n")
    qa = [("What is the capital of Veloria?", "Amberhold."), ("Who discovered the Zentari comet?", "Ilsa Morrow."),
          ("Say a number.", "42"), ("Count.", "0 1 2 3")]
    data = write_jsonl(tmp_path / "qa.jsonl", [chat_row(q, a) for q, a in qa])
    out = tmp_path / "out"
    summary = _finetune(folder, data, out, "--judge", f"{judge}:anything", "--s3ft-max-new-tokens", "6",
                        "--max-steps", "3", "--lr", "5e-3")
    recs = _records(out)
    assert [r["index"] for r in recs] == [0, 1, 2, 3] and [r["gold"] for r in recs] == [a for _, a in qa]
    assert [r["prompt"] for r in recs] == [q for q, _ in qa]
    n_self = sum(r["source"] == "self" for r in recs)
    assert n_self >= 1 and all(r["target"] != r["gold"] for r in recs if r["source"] == "self")
    assert summary["s3ft"] == {"targets_file": str(out / TARGETS_FILE), "self": n_self, "paraphrase": 0,
                               "gold": 4 - n_self}
    assert not list(out.glob("*.tmp"))
    assert_peft_parity(folder, out, load(folder)[1])


def test_resume_reuses_the_saved_targets_and_refuses_other_data(folder, tmp_path, capsys):
    """--resume trains on the targets file already in --output (no new generation: a file written by hand is
    what trains), and a file built from other rows is refused before training."""
    data = write_jsonl(tmp_path / "qa.jsonl", [chat_row(f"Question {i}?", f"Answer {i}.") for i in range(4)])
    out = tmp_path / "out"
    rows = read_answer_rows(data)
    from leantune.train.s3ft import Target

    saved = [Target(r.index, r.query.text, r.gold, f"My answer {r.index}.", "paraphrase") for r in rows]
    write_targets(saved, out)
    assert read_targets(rows, out) == saved
    summary = _finetune(folder, data, out, "--resume", "--max-steps", "2")
    assert summary["s3ft"]["paraphrase"] == 4 and _records(out) == [t.record() for t in saved]
    other = write_jsonl(tmp_path / "other.jsonl", [chat_row(f"Question {i}?", f"Other {i}.") for i in range(4)])
    err = fails(["finetune", "--model", folder, "--data", other, "--output", out, "--no-progress", "--objective",
                 "s3ft", "--resume"], capsys)
    assert "--resume" in err and "built from other data" in err
    fewer = write_jsonl(tmp_path / "fewer.jsonl", [chat_row("Question 0?", "Answer 0.")])
    with pytest.raises(ValueError, match="holds 4 targets but the training data has 1 rows"):
        read_targets(read_answer_rows(fewer), out)


# ---- a tiny model pretrained here: oracle (b) and forgetting --------------------------------------------
COLORS, SHAPES = ("red", "blue", "green"), ("round", "square", "flat")
N_ITEMS, N_KNOWN = 12, 8  # the model is pretrained on the colors of the first 8 items only


def _pretrain_rows():
    color = [chat_row(f"What color is item {i}?", f"Item {i} is {COLORS[i % 3]}.") for i in range(N_ITEMS)]
    shape = [chat_row(f"What shape is item {i}?", f"Item {i} is {SHAPES[(i // 3) % 3]}.") for i in range(N_ITEMS)]
    return color[:N_KNOWN], shape


def _tiny_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(texts * 5, trainer)
    return tk


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A random tiny Llama pretrained (full finetuning through the CLI) to answer "What color/shape is item i?"
    in sentences: it knows the shapes of all 12 items and the colors of 8. Returns (folder, data dir)."""
    from hf_tiny import tiny_hf_model
    from tiny_folder import CHATML

    from leantune.models.tokenizer import Tokenizer

    d = tmp_path_factory.mktemp("s3ft_pretrained")
    color, shape = _pretrain_rows()
    texts = [json.dumps(r) for r in color + shape] + ["<|im_start|>user\n<|im_start|>assistant\n"]
    hf = tiny_hf_model("llama", seed=0, vocab_size=320)
    hf.config.bos_token_id, hf.config.eos_token_id, hf.config.pad_token_id = None, 2, 0
    hf.save_pretrained(d / "init")
    Tokenizer(_tiny_tokenizer(texts), chat_template=CHATML, bos_token=None, eos_token="<|im_end|>",
              pad_token="<|endoftext|>").save(d / "init")
    pre = write_jsonl(d / "pre.jsonl", color + shape)
    assert cli.run(["finetune", "--model", str(d / "init"), "--data", str(pre), "--output", str(d / "base"),
                    "--method", "full", "--lr", "3e-3", "--epochs", "40", "--batch-size", "8", "--warmup-steps", "5",
                    *COMMON]) == 0
    # the task to finetune on: every item's color as a bare word (a style the model never wrote); the held-out
    # knowledge: the shapes, in the model's own sentences
    write_jsonl(d / "task.jsonl", [chat_row(f"What color is item {i}?", COLORS[i % 3]) for i in range(N_ITEMS)])
    write_jsonl(d / "forget.jsonl", shape)
    return d / "base", d


def test_s3ft_targets_are_likelier_to_the_base_than_gold(pretrained, tmp_path):
    """Oracle (b): the base model's mean NLL of the S3FT targets <= that of the gold answers (greedy outputs are
    high-likelihood); strictly below here, since the model answers most items right in its own words."""
    from leantune.train.loss import heldout_loss

    folder, d = pretrained
    summary = _finetune(folder, d / "task.jsonl", tmp_path / "out", "--judge", "contains", "--s3ft-max-new-tokens",
                        "12", "--max-steps", "1")
    assert summary["s3ft"]["self"] >= N_KNOWN // 2 and summary["s3ft"]["gold"] + summary["s3ft"]["paraphrase"] >= 1
    model, tok = load(folder)
    rows = read_answer_rows(d / "task.jsonl")
    targets = [r["target"] for r in _records(tmp_path / "out")]
    nll_s3ft = heldout_loss(model, answer_examples(rows, targets, tok, 128), 4)
    nll_gold = heldout_loss(model, answer_examples(rows, [r.gold for r in rows], tok, 128), 4)
    assert nll_s3ft < nll_gold


def test_s3ft_forgets_less_than_sft_on_the_same_budget(pretrained, tmp_path):
    """The issue's forgetting report: the same LoRA budget (steps, lr, batch, seed) on the color task; the held-out
    loss on the shapes rises less under S3FT than under plain SFT on the gold answers."""
    folder, d = pretrained
    rise = {}
    for objective, extra in (("sft", ()), ("s3ft", ("--judge", "contains", "--s3ft-max-new-tokens", "12"))):
        assert cli.run(["finetune", "--model", str(folder), "--data", str(d / "task.jsonl"), "--output",
                        str(tmp_path / objective), "--objective", objective, *extra, "--forget-data",
                        str(d / "forget.jsonl"), "--lr", "3e-3", "--max-steps", "15", "--batch-size", "4",
                        *COMMON]) == 0
        forgetting = json.loads((tmp_path / objective / "summary.json").read_text())["forgetting"]
        rise[objective] = forgetting["increase"]
    assert rise["sft"] > 0.05  # plain SFT does forget here, so the comparison means something
    assert rise["s3ft"] < rise["sft"] / 2, rise


def test_held_out_rows_keep_their_gold_answers_and_get_no_target(folder, tmp_path):
    """With --eval-fraction the held-out rows are split off first (as SFT splits them): targets are built for the
    training rows only, and the eval loss is measured on the held-out gold answers."""
    data = write_jsonl(tmp_path / "qa.jsonl", [{"prompt": f"Question {i}?", "completion": f"Answer {i}."}
                                               for i in range(10)])
    out = tmp_path / "out"
    assert cli.run(["finetune", "--model", str(folder), "--data", str(data), "--output", str(out), "--objective",
                    "s3ft", "--eval-fraction", "0.2", "--s3ft-max-new-tokens", "4", "--max-steps", "1", "--dtype",
                    "fp32", "--no-progress", "--report-to", "none"]) == 0
    indices = [r["index"] for r in _records(out)]
    assert len(indices) == 8 and indices == sorted(set(indices)) and set(indices) < set(range(10))
    summary = json.loads((out / "summary.json").read_text())
    assert sum(summary["s3ft"][s] for s in ("self", "paraphrase", "gold")) == 8 and summary.get("eval_loss") is not None


def test_interrupted_run_resumes_to_the_uninterrupted_losses(folder, tmp_path, monkeypatch, capsys):
    """Cut after 2 of 4 steps, --resume trains on the saved targets (the log says so) and reaches the same
    losses as the run that was never cut."""
    from test_recipes import read_metrics, run_interrupted

    judge = tmp_path / "judge.py"
    judge.write_text("def anything(prompt, response, gold):\n    return bool(response.strip())\n")
    data = write_jsonl(tmp_path / "qa.jsonl", [chat_row(f"Question {i}?", f"Answer {i}.") for i in range(8)])

    def argv(out):
        return ["finetune", "--model", str(folder), "--data", str(data), "--output", str(out), "--objective", "s3ft",
                "--judge", f"{judge}:anything", "--s3ft-max-new-tokens", "5", "--max-steps", "4", "--save-every",
                "2", "--lr", "5e-3", *COMMON]

    assert cli.run(argv(tmp_path / "whole")) == 0
    whole = [r["loss"] for r in read_metrics(tmp_path / "whole") if "loss" in r]
    out = tmp_path / "cut"
    assert run_interrupted(argv(out), 2, monkeypatch) == 130
    built = _records(out)
    assert built == _records(tmp_path / "whole") and any(r["source"] == "self" for r in built)
    capsys.readouterr()
    assert cli.run([*argv(out), "--resume"]) == 0
    assert "s3ft: reusing the targets of" in capsys.readouterr().err
    resumed = {r["step"]: r["loss"] for r in read_metrics(out) if "loss" in r}
    assert [resumed[s] for s in range(1, 5)] == pytest.approx(whole, abs=1e-6)

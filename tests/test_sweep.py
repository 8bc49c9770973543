"""`leantune sweep`: a 2-cell data-fraction sweep end to end on a tiny model (CSV, Markdown, PNG, every cell's
score == `leantune eval` of its adapter, resume skips done cells), one oracle-share cell (weak -> merge ->
oracle), the budget split, and bad axis values refused before any work."""
import csv
import json
from pathlib import Path

import pytest

from leantune import cli
from leantune.recipes.sweep import budget_split

TRAIN = [("What is the capital of Veloria?", "Amberhold."), ("Who discovered the Zentari comet?", "Ilsa Morrow."),
         ("Hello, how are you today?", "I am fine, thank you."), ("Numbers?", "0 1 2 3 4 5"),
         ("The quick brown fox?", "It jumps over the lazy dog."), ("What is 42?", "A number.")]
FT = ["--max-steps", "2", "--batch-size", "2", "--lr", "1e-2", "--dtype", "fp32", "--no-progress",
      "--eval-fraction", "0", "--report-to", "none", "--rank", "4"]


def chat(q, a):
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def write_jsonl(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("sweep-data")
    return {"data": write_jsonl(d / "train.jsonl", [chat(q, a) for q, a in TRAIN]),
            "weak": write_jsonl(d / "weak.jsonl", [chat(q, "I do not know.") for q, _ in TRAIN]),
            "eval": write_jsonl(d / "eval.jsonl", [chat(q, a) for q, a in TRAIN[:3]])}


@pytest.fixture(autouse=True)
def one_thread_children(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the cells' processes: tiny models run fastest on one thread
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def sweep_argv(folder, files, out, axis, values, *extra):
    return ["sweep", "--model", str(folder), "--axis", axis, values, "--data", files["data"], "--eval-data",
            files["eval"], "--metric", "loss", "--eval-dtype", "fp32", "--output", str(out), *extra, "--", *FT]


def test_budget_split():
    assert budget_split(64, 0.1) == (6, 58)  # bench/budget.py's split: round(s * B) SFT rows, the rest pairs
    assert budget_split(64, 0.0) == (0, 64) and budget_split(64, 1.0) == (64, 0)
    assert budget_split(16, 0.2, 1.0, 0.1) == (3, 130)  # n_weak = (B - n_oracle) / 0.1
    assert budget_split(10, 0.5, 2.0, 1.0) == (2, 6)  # 2 rows at cost 2 (round(2.5) = 2), 6 left for cost 1


def test_data_fraction_sweep_end_to_end_and_resume(folder, files, tmp_path, capsys):
    from leantune.recipes.eval import EvalConfig, evaluate

    out = tmp_path / "sweep"
    assert cli.run(sweep_argv(folder, files, out, "data-fraction", "0.5,1.0", "--jobs", "2")) == 0
    rows = list(csv.DictReader(open(out / "sweep.csv")))
    assert [(float(r["value"]), int(r["n_data"])) for r in rows] == [(0.5, 3), (1.0, 6)]
    md = (out / "sweep.md").read_text()
    assert md.startswith("| axis | value | n_data | metric | score | n_eval |") and md.count("\n") == 4
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for r in rows:
        cell = out / f"data-fraction={float(r['value']):g}"
        assert len((cell / "data.jsonl").read_text().splitlines()) == int(r["n_data"])
        assert (cell / "data.jsonl").read_text().splitlines() == Path(files["data"]).read_text().splitlines()[
            :int(r["n_data"])]  # the first k rows
        again = evaluate(EvalConfig(model=str(folder), adapter=[str(cell / "run")], data=files["eval"],
                                    metric="loss", dtype="fp32"))
        assert float(r["score"]) == pytest.approx(again["score"], rel=1e-6)
    base = evaluate(EvalConfig(model=str(folder), data=files["eval"], metric="loss", dtype="fp32"))["score"]
    assert all(float(r["score"]) != pytest.approx(base, rel=1e-6) for r in rows)  # the cells trained
    logs = {p: p.read_text() for p in out.glob("*/finetune.log")}
    capsys.readouterr()
    assert cli.run(sweep_argv(folder, files, out, "data-fraction", "0.5,1.0")) == 0  # resumed: nothing re-runs
    assert {p: p.read_text() for p in out.glob("*/finetune.log")} == logs
    assert list(csv.DictReader(open(out / "sweep.csv"))) == rows


def test_oracle_share_trains_weak_then_oracle(folder, files, tmp_path):
    out = tmp_path / "sweep"
    # budget 2, oracle share 0.5, weak cost 0.5: 1 oracle row and (2 - 1) / 0.5 = 2 weak rows
    assert cli.run(sweep_argv(folder, files, out, "oracle-share", "0.5", "--weak-data", files["weak"],
                              "--budget", "2", "--weak-cost", "0.5")) == 0
    cell = out / "oracle-share=0.5"
    res = json.loads((cell / "result.json").read_text())
    assert (res["n_data"], res["n_weak_data"]) == (1, 2)
    log = (cell / "finetune.log").read_text()
    weak_at, merge_at, oracle_at = (log.index("$ leantune finetune"), log.index("$ leantune merge"),
                                    log.index("$ leantune finetune", log.index("$ leantune merge")))
    assert weak_at < merge_at < oracle_at  # weak labels first, then the oracle's from the merged weak model
    assert f"--model {cell / 'weak-merged'}" in log[oracle_at:]
    assert (cell / "weak-merged" / "config.json").exists() and (cell / "run" / "adapter_config.json").exists()


@pytest.mark.parametrize("axis,values,extra,match", [
    ("data-fraction", "0,0.5", [], r"value 0 is out of range; fractions lie in \(0, 1\]"),
    ("data-fraction", "0.5,1.5", [], r"value 1.5 is out of range"),
    ("sft-share", "0.5,-0.1", ["--budget", "4"], r"shares lie in \[0, 1\]"),
    ("oracle-share", "0.5,1.01", ["--budget", "4"], r"value 1.01 is out of range"),
    ("sft-share", "0.5", [], r"needs --pref-data"),
    ("data-fraction", "0.5,x", [], r"numbers separated by commas"),
    ("depth", "1", [], r"not an axis"),
])
def test_bad_axis_values_are_refused_before_work(folder, files, tmp_path, axis, values, extra, match):
    out = tmp_path / "sweep"
    with pytest.raises(ValueError, match=match):
        cli.run(sweep_argv(folder, files, out, axis, values, *extra))
    assert not out.exists()


def test_owned_finetune_options_and_oversized_budgets_are_refused(folder, files, tmp_path):
    out = tmp_path / "sweep"
    with pytest.raises(ValueError, match="--data after -- is set by the sweep"):
        cli.run(sweep_argv(folder, files, out, "data-fraction", "1.0") + ["--data", files["data"]])
    with pytest.raises(ValueError, match="needs 8 rows of --pref-data"):
        cli.run(sweep_argv(folder, files, out, "sft-share", "0", "--pref-data", files["data"], "--budget", "8"))
    assert not out.exists()


@pytest.mark.parametrize("share,expect", [
    (0.0, [["--objective", "dpo", "--data", "pref_data.jsonl"]]),  # DPO alone from the base
    (0.5, [["--objective", "dpo", "--data", "pref_data.jsonl", "--sft-data", "data.jsonl"]]),  # SFT, then DPO
    (1.0, [["--objective", "sft", "--data", "data.jsonl"]]),  # SFT alone
])
def test_sft_share_cell_is_one_finetune_run(files, tmp_path, monkeypatch, share, expect):
    """The run each SFT share makes (finetune's --sft-data does SFT then DPO from the SFT'd model; its own tests
    cover that), with the budget's rows in the cell's files."""
    from leantune.recipes import sweep as sw

    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": q, "chosen": a, "rejected": "no"} for q, a in TRAIN])
    cfg = sw.SweepConfig(axis=["sft-share", str(share)], data=files["data"], pref_data=pairs, budget=4,
                         eval_data=files["eval"], output=str(tmp_path / "o"), finetune_args=["--max-steps", "1"])
    calls = []
    monkeypatch.setattr(sw, "leantune", lambda args, log: calls.append([str(a) for a in args]))
    cell = sw.plan(cfg)[0]
    d = tmp_path / "cell"
    d.mkdir()
    sw.train_cell(cfg, cell, d)
    assert [c[1:c.index("--output")] for c in calls] == [
        [a if not a.endswith(".jsonl") else str(d / a) for a in e] for e in expect]
    assert all(c[-2:] == ["--max-steps", "1"] for c in calls)
    for name, n in cell["parts"].items():
        assert n == round((share if name == "data" else 1 - share) * 4)
        if n:
            assert len((d / f"{name}.jsonl").read_text().splitlines()) == n


def test_a_failed_run_stops_the_sweep_naming_its_log(folder, files, tmp_path):
    out = tmp_path / "sweep"
    argv = sweep_argv(folder, files, out, "data-fraction", "1.0")
    with pytest.raises(SystemExit, match=r"`leantune finetune` of data-fraction=1 failed \(exit 2\); see .*finetune.log"):
        cli.run(argv[:argv.index("--") + 1] + ["--max-steps", "two"])
    assert "invalid int value" in (out / "data-fraction=1" / "finetune.log").read_text()
    assert not (out / "data-fraction=1" / "result.json").exists() and not (out / "sweep.csv").exists()


def test_few_shot_prefix_goes_in_front_of_every_prompt(files, tmp_path, monkeypatch):
    """--few-shot 2: the first 2 weak rows as "prompt\\nanswer\\n\\n" in front of each training row's last user turn
    (and of completion prompts and classification texts)."""
    from leantune.recipes import sweep as sw

    cfg = sw.SweepConfig(axis=["oracle-share", "0.5"], data=files["data"], weak_data=files["weak"], budget=2,
                         weak_cost=0.5, eval_data=files["eval"], output=str(tmp_path / "o"), few_shot=2,
                         few_shot_labels="weak")
    prefix = sw.few_shot_prefix(cfg)
    assert prefix == f"{TRAIN[0][0]}\nI do not know.\n\n{TRAIN[1][0]}\nI do not know.\n\n"
    monkeypatch.setattr(sw, "leantune", lambda args, log: None)
    d = tmp_path / "cell"
    d.mkdir()
    sw.train_cell(cfg, sw.plan(cfg)[0], d, prefix)
    oracle = [json.loads(x) for x in (d / "data.jsonl").read_text().splitlines()]
    assert [r["messages"][0]["content"] for r in oracle] == [prefix + TRAIN[0][0]]
    assert oracle[0]["messages"][1]["content"] == TRAIN[0][1]  # the answer is untouched
    assert sw.with_prefix({"prompt": "p", "completion": "c"}, "completion", "D\n", "") == {"prompt": "D\np",
                                                                                          "completion": "c"}
    assert sw.with_prefix({"text": "t", "label": 1}, "classification", "D\n", "")["text"] == "D\nt"
    with pytest.raises(ValueError, match="--few-shot prefixes supervised rows: not with --axis sft-share"):
        sw.SweepConfig(axis=["sft-share", "0.5"], data=files["data"], pref_data=files["data"], budget=2,
                       eval_data=files["eval"], few_shot=2)

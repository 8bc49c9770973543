"""Bad input through the real CLI (`leantune.cli.main`): exit code 2, one clear message on stderr that names
the file, line or option and what to do, no traceback, and nothing in the output folder that looks like a
finished run."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from leantune import cli

pytestmark = pytest.mark.usefixtures("one_thread")

ROW = {"messages": [{"role": "user", "content": "What is the capital of Veloria?"},
                    {"role": "assistant", "content": "The capital of Veloria is Amberhold."}]}




def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(ln + "\n" for ln in lines), encoding="utf-8")
    return path


def fails(argv, capsys) -> str:
    """Run `leantune ARGV`; it must exit with 2 and print one error and no traceback. Returns stderr."""
    with pytest.raises(SystemExit) as e:
        cli.main([str(a) for a in argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(errors) == 1, err
    return errors[0]


def assert_nothing_written(out: Path):
    assert not (out / "adapter_model.safetensors").exists() and not (out / "adapter_config.json").exists()
    assert not (out / "summary.json").exists() and not (out / "checkpoints").exists()


@pytest.fixture
def finetune_fails(folder, tmp_path, capsys):
    def run(data, *args):
        out = tmp_path / "out"
        err = fails(["finetune", "--model", folder, "--data", data, "--output", out, "--no-progress", *args], capsys)
        assert_nothing_written(out)
        return err

    return run


def test_malformed_jsonl_line(finetune_fails, tmp_path):
    data = write_lines(tmp_path / "d.jsonl", [json.dumps(ROW), '{"messages": [', json.dumps(ROW)])
    err = finetune_fails(data)
    assert f"{data}:2:" in err and "malformed JSON" in err


def test_missing_field(finetune_fails, tmp_path):
    rows = [{"instruction": "Add.", "output": "3"}, {"instruction": "Add 1 and 1."}]
    data = write_lines(tmp_path / "d.jsonl", [json.dumps(r) for r in rows])
    err = finetune_fails(data)
    assert f"{data}:2:" in err and "'output'" in err and "alpaca" in err


def test_unknown_role(finetune_fails, tmp_path):
    bad = {"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "hello"}]}
    data = write_lines(tmp_path / "d.jsonl", [json.dumps(ROW), "", json.dumps(bad)])
    err = finetune_fails(data)
    assert f"{data}:3:" in err and "'bot'" in err and "user" in err and "assistant" in err


def test_empty_file(finetune_fails, tmp_path):
    data = write_lines(tmp_path / "d.jsonl", ["", "  "])
    err = finetune_fails(data)
    assert str(data) in err and "no examples" in err


def test_missing_data_file(finetune_fails, tmp_path):
    err = finetune_fails(tmp_path / "nope.jsonl")
    assert "nope.jsonl" in err and "not found" in err and "--data" in err


def test_example_longer_than_max_length(finetune_fails, folder, tmp_path, capsys):
    long = {"messages": [{"role": "user", "content": "Count. " * 20}, {"role": "assistant", "content": "42"}]}
    data = write_lines(tmp_path / "d.jsonl", [json.dumps(ROW), json.dumps(long)])
    err = finetune_fails(data, "--max-length", "48")
    assert f"{data}:2:" in err and "--max-length" in err and "--truncate" in err and "max_length=48" in err
    # the fix the message names works
    out = tmp_path / "ok"
    assert cli.run(["finetune", "--model", str(folder), "--data", str(data), "--output", str(out), "--no-progress",
                    "--max-length", "48", "--truncate", "--max-steps", "1"]) == 0
    assert (out / "adapter_model.safetensors").exists()


def test_unknown_target_module(finetune_fails, tmp_path):
    data = write_lines(tmp_path / "d.jsonl", [json.dumps(ROW)])
    err = finetune_fails(data, "--targets", "q_proj,qkv_proj")
    assert "'qkv_proj'" in err and "q_proj" in err and "--targets" in err


def test_missing_model_path(tmp_path, capsys):
    data = write_lines(tmp_path / "d.jsonl", [json.dumps(ROW)])
    out = tmp_path / "out"
    err = fails(["finetune", "--model", tmp_path / "no-such-model", "--data", data, "--output", out], capsys)
    assert "no-such-model" in err and "does not exist" in err
    assert not out.exists()


def test_bin_only_model_folder(folder, tmp_path, capsys):
    binf = tmp_path / "binmodel"
    shutil.copytree(folder, binf)
    (binf / "model.safetensors").rename(binf / "pytorch_model.bin")
    err = fails(["generate", "--model", binf, "--prompt", "hi"], capsys)
    assert str(binf) in err and ".bin" in err and "safetensors" in err


@pytest.fixture(scope="module")
def adapter(folder, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("adapter")
    data = write_lines(d / "d.jsonl", [json.dumps(ROW)])
    assert cli.run(["finetune", "--model", str(folder), "--data", str(data), "--output", str(d / "out"),
                    "--no-progress", "--max-steps", "1"]) == 0
    return d / "out"


def test_adapter_for_another_base_model(folder, adapter, tmp_path, capsys):
    from hf_tiny import tiny_hf_model

    other = tmp_path / "wide"
    shutil.copytree(folder, other)
    hf = tiny_hf_model("llama", vocab_size=512, hidden_size=96)
    hf.config.bos_token_id, hf.config.eos_token_id, hf.config.pad_token_id = None, 2, 0
    hf.save_pretrained(other)
    err = fails(["generate", "--model", other, "--adapter", adapter, "--prompt", "hi"], capsys)
    assert str(adapter) in err and "different base model" in err
    merged = tmp_path / "merged"
    err = fails(["merge", "--model", other, "--adapter", adapter, "--output", merged], capsys)
    assert "different base model" in err and not merged.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merged")]


def test_bad_lr(finetune_fails, tmp_path):
    data = write_lines(tmp_path / "d.jsonl", [json.dumps(ROW)])
    err = finetune_fails(data, "--lr", "0")
    assert "--lr must be > 0" in err


def test_unparsable_flag_value(finetune_fails, tmp_path):
    data = write_lines(tmp_path / "d.jsonl", [json.dumps(ROW)])
    err = finetune_fails(data, "--lr", "fast")
    assert "--lr" in err and "'fast'" in err


def test_unknown_yaml_key(finetune_fails, tmp_path):
    data = write_lines(tmp_path / "d.jsonl", [json.dumps(ROW)])
    cfg = tmp_path / "run.yaml"
    cfg.write_text("lr: 0.01\nlearning_rate: 0.01\n")
    err = finetune_fails(data, "--config", cfg)
    assert str(cfg) in err and "learning_rate" in err and "--help" in err


def test_wrong_type_in_yaml(finetune_fails, tmp_path):
    data = write_lines(tmp_path / "d.jsonl", [json.dumps(ROW)])
    cfg = tmp_path / "run.yaml"
    cfg.write_text("lr: fast\n")
    err = finetune_fails(data, "--config", cfg)
    assert str(cfg) in err and "option lr must be float" in err and "'fast'" in err
    cfg.write_text("epochs: 2.5\n")
    assert "option epochs must be int" in finetune_fails(data, "--config", cfg)


def test_missing_config_file(finetune_fails, tmp_path):
    data = write_lines(tmp_path / "d.jsonl", [json.dumps(ROW)])
    err = finetune_fails(data, "--config", tmp_path / "nope.yaml")
    assert "--config" in err and "nope.yaml" in err and "not found" in err


def test_merge_without_adapter(folder, tmp_path, capsys):
    err = fails(["merge", "--model", folder, "--output", tmp_path / "merged"], capsys)
    assert "--adapter is required" in err
    assert not (tmp_path / "merged").exists()


def test_generate_without_prompt(folder, capsys):
    err = fails(["generate", "--model", folder], capsys)
    assert "--prompt is required" in err


def test_loss_blowing_up_stops_the_run(finetune_fails, tmp_path):
    data = write_lines(tmp_path / "d.jsonl", [json.dumps(ROW)] * 4)
    err = finetune_fails(data, "--lr", "1e30", "--schedule", "constant", "--max-steps", "4")
    assert re.search(r"loss became (nan|-?inf) at step (\d+)", err) and "--lr" in err
    step = int(re.search(r"at step (\d+)", err).group(1))
    logged = [json.loads(ln)["step"] for ln in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, step))  # every finite step was logged, the bad one was not


# ---- data in other containers and shapes (issue 15): each one error naming file, row and fix ---------------
PAIR = {"prompt": [{"role": "user", "content": "What is the capital of Veloria?"}],
        "chosen": [{"role": "assistant", "content": "Amberhold."}],
        "rejected": [{"role": "assistant", "content": "Paris."}]}


def test_preference_data_in_an_sft_run(finetune_fails, tmp_path):
    data = write_lines(tmp_path / "p.jsonl", [json.dumps(PAIR)] * 2)
    err = finetune_fails(data)
    assert f"{data}: preference pairs" in err and "DPO" in err and "--objective dpo" in err
    assert "prompt/completion or chat rows" in err  # the way out


def test_chosen_equals_rejected(finetune_fails, tmp_path):
    same = {**PAIR, "rejected": PAIR["chosen"]}
    data = write_lines(tmp_path / "p.jsonl", [json.dumps(PAIR), json.dumps(same)])
    err = finetune_fails(data)
    assert f"{data}:2: chosen equals rejected" in err and "remove it" in err


def test_tool_call_arguments_not_json(finetune_fails, tmp_path):
    call = {"type": "function", "function": {"name": "f", "arguments": "{'x': 1}"}}
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [call]},
                        {"role": "tool", "content": "1"}, {"role": "assistant", "content": "ok"}]}
    data = write_lines(tmp_path / "t.jsonl", [json.dumps(ROW), json.dumps(row)])
    err = finetune_fails(data)
    assert f"{data}:2: messages[1].tool_calls[0].function.arguments is not valid JSON" in err
    assert "JSON object string" in err


def test_weight_other_than_0_or_1(finetune_fails, tmp_path):
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo", "weight": 0.5}]}
    data = write_lines(tmp_path / "w.jsonl", [json.dumps(ROW), json.dumps(row)])
    err = finetune_fails(data)
    assert f"{data}:2: messages[1] has weight 0.5" in err and "0 (leave this assistant turn out" in err


def test_parquet_with_none_of_the_needed_columns(finetune_fails, tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    data = tmp_path / "q.parquet"
    pq.write_table(pa.table({"question": ["What is the capital of Veloria?"], "answer": ["Amberhold."]}), data)
    err = finetune_fails(data)
    assert f"{data} row 1: cannot tell the data format from the keys ['answer', 'question']" in err
    assert "--columns" in err


def test_csv_with_a_ragged_row(finetune_fails, tmp_path):
    data = write_lines(tmp_path / "r.csv", ["prompt,completion", "Hi,Hello", "a,b,c"])
    err = finetune_fails(data)
    assert f"{data}:3: row has 3 field(s) but the header has 2" in err and "quote fields" in err


def test_unknown_columns_key(finetune_fails, tmp_path):
    data = write_lines(tmp_path / "d.jsonl", [json.dumps(ROW)])
    err = finetune_fails(data, "--columns", "prompt=q,answer=a")
    assert "--columns: unknown key 'answer'" in err and "completion" in err


def test_unknown_chat_template(finetune_fails, tmp_path):
    data = write_lines(tmp_path / "d.jsonl", [json.dumps(ROW)])
    err = finetune_fails(data, "--chat-template", "vicuna")
    assert "--chat-template 'vicuna'" in err and "chatml" in err

"""`leantune finetune` on the data forms of issue 15 (recipe tier, tiny model): a base model without a chat
template trains on chat rows with --chat-template (saved with the adapter); a datasets folder with
--split/--eval-split and a Parquet file with --columns train end to end."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from leantune import cli
from leantune.data import read_chat_template

pytestmark = pytest.mark.usefixtures("one_thread")

ROWS = [{"messages": [{"role": "user", "content": "What is the capital of Veloria?"},
                      {"role": "assistant", "content": "The capital of Veloria is Amberhold."}]},
        {"messages": [{"role": "user", "content": "Who discovered the Zentari comet?"},
                      {"role": "assistant", "content": "It was discovered by Ilsa Morrow."}]}]


def argv(*args) -> list[str]:
    return ["finetune", "--no-progress", "--max-steps", "2", "--batch-size", "2", *map(str, args)]


def finetune(*args) -> int:
    return cli.run(argv(*args))


def test_base_model_without_template_uses_chat_template(folder, tmp_path, capsys):
    base = tmp_path / "base"
    shutil.copytree(folder, base)
    (base / "chat_template.jinja").unlink()
    cfg = json.loads((base / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(cfg))
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    with pytest.raises(SystemExit) as e:
        cli.main(argv("--model", base, "--data", data, "--output", tmp_path / "no"))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"{data}:1: chat rows need a tokenizer with a chat template" in err and "--chat-template" in err
    out = tmp_path / "out"
    assert finetune("--model", base, "--data", data, "--output", out, "--chat-template", "chatml") == 0
    assert (out / "adapter_model.safetensors").exists()
    assert (out / "chat_template.jinja").read_text() == read_chat_template("chatml")  # what it was trained with


def test_datasets_folder_splits_and_parquet_columns(folder, tmp_path):
    datasets = pytest.importorskip("datasets")
    import pyarrow as pa
    import pyarrow.parquet as pq

    ds = tmp_path / "ds"
    datasets.DatasetDict(train=datasets.Dataset.from_list(ROWS * 2),
                         test=datasets.Dataset.from_list(ROWS[:1])).save_to_disk(str(ds))
    out = tmp_path / "out"
    assert finetune("--model", folder, "--data", ds, "--split", "train", "--eval-data", ds, "--eval-split", "test",
                    "--output", out) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and "eval_loss" in json.dumps(summary)
    pq.write_table(pa.table({"q": ["What is the capital of Veloria?"] * 4, "a": [" Amberhold."] * 4}),
                   tmp_path / "d.parquet")
    out = tmp_path / "out2"
    assert finetune("--model", folder, "--data", tmp_path / "d.parquet", "--columns", "prompt=q,completion=a",
                    "--output", out) == 0
    assert (out / "adapter_model.safetensors").exists()

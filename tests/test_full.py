"""`--method full`: the model's own weights train and the output is a plain HF folder transformers loads.

Checks: what --targets selects trains and everything else stays bitwise equal to the base; the saved folder
loads in transformers with logits equal to leantune's trained model; resume after an interrupt gives the
losses and weights of an uninterrupted run; bf16 is refused (trained weights need fp32); generate/serve load
the output as a model.
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from leantune import cli
from leantune.models.loader import load_model
from leantune.precision import resolve_precision
from test_recipes import chat_row, run_interrupted, step_records, write_jsonl
from tiny_folder import make_tiny_model_folder

ARGS = ("--method", "full", "--batch-size", "2", "--epochs", "2", "--lr", "1e-3", "--eval-fraction", "0",
        "--dtype", "fp32", "--no-progress")  # 4 steps an epoch


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_model_folder(tmp_path_factory.mktemp("base") / "m")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    rows = [chat_row(f"What is the code of item {i}?", f"Item {i} has code {i * 7 % 13}.") for i in range(8)]
    return write_jsonl(tmp_path_factory.mktemp("data") / "d.jsonl", rows)


def _argv(folder, data, out, *extra):
    return ["finetune", "--model", str(folder), "--data", str(data), "--output", str(out), *ARGS, *extra]


@pytest.fixture(scope="module")
def trained(folder, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "out"
    assert cli.run(_argv(folder, data, out, "--save-every", "5")) == 0
    return out


def test_every_weight_trains_and_the_folder_loads_in_transformers(folder, trained):
    from transformers import AutoModelForCausalLM

    base, tuned = load_file(str(folder / "model.safetensors")), load_file(str(trained / "model.safetensors"))
    assert set(base) == set(tuned)
    assert all(not torch.equal(base[k], tuned[k]) for k in base), [k for k in base if torch.equal(base[k], tuned[k])]
    losses = [r["loss"] for r in step_records(trained)]
    assert len(losses) == 8 and losses[-1] < losses[0]
    hf = AutoModelForCausalLM.from_pretrained(trained, dtype=torch.float32).eval()
    ours, _ = load_model(str(trained), resolve_precision("fp32", "cpu"))
    ids = torch.tensor([[1, 17, 40, 200, 9, 3]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-4, rtol=0)
    assert (trained / "tokenizer.json").exists()  # a complete model folder: generate / serve take it as --model
    assert cli.run(["generate", "--model", str(trained), "--prompt", "What is the code of item 3?",
                    "--max-new-tokens", "4", "--dtype", "fp32"]) == 0


def test_targets_train_only_the_matched_modules(folder, data, tmp_path):
    out = tmp_path / "out"
    assert cli.run(_argv(folder, data, out, "--targets", "q_proj,layers.1.mlp", "--max-steps", "2")) == 0
    base, tuned = load_file(str(folder / "model.safetensors")), load_file(str(out / "model.safetensors"))
    changed = sorted(k for k in base if not torch.equal(base[k], tuned[k]))
    assert changed == sorted([*(f"model.layers.{i}.self_attn.q_proj.weight" for i in range(2)),
                              *(f"model.layers.1.mlp.{p}_proj.weight" for p in ("gate", "up", "down"))])
    with pytest.raises(ValueError, match="target 'nope' matches no module"):
        cli.run(_argv(folder, data, tmp_path / "o2", "--targets", "nope"))
    with pytest.raises(ValueError, match="'all-linear' is a LoRA notion"):
        cli.run(_argv(folder, data, tmp_path / "o3", "--targets", "all-linear"))


def test_forced_bf16_is_refused_and_auto_picks_fp32(folder, data, tmp_path, monkeypatch):
    monkeypatch.setenv("LEANTUNE_CPU_BF16", "1")  # a CPU where auto would otherwise pick bf16
    argv = [a for a in _argv(folder, data, tmp_path / "o", "--max-steps", "1") if a not in ("--dtype", "fp32")]
    with pytest.raises(ValueError, match="--method full trains base weights in full, which needs fp32"):
        cli.run([*argv, "--dtype", "bf16"])
    assert cli.run(argv) == 0
    assert load_file(str(tmp_path / "o" / "model.safetensors"))["lm_head.weight"].dtype == torch.float32


def test_resume_after_interrupt_equals_the_uninterrupted_run(folder, data, tmp_path, monkeypatch, trained):
    out = tmp_path / "out"
    # steps 1..6 done, checkpoint step-5 on disk
    assert run_interrupted(_argv(folder, data, out, "--save-every", "5"), 6, monkeypatch) == 130
    assert not (out / "model.safetensors").exists()  # nothing looks finished
    assert (out / "checkpoints" / "step-5" / "model.safetensors").exists()  # each checkpoint is a model
    assert cli.run(_argv(folder, data, out, "--save-every", "5", "--resume")) == 0
    assert [r["loss"] for r in step_records(out)] == [r["loss"] for r in step_records(trained)]
    a, b = load_file(str(out / "model.safetensors")), load_file(str(trained / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_python_api_and_a_4bit_base_refused(folder):
    import leantune
    from leantune.methods import FullConfig

    model, _ = load_model(str(folder), resolve_precision("fp32", "cpu"))
    leantune.apply(model, "full", config=FullConfig(targets=["embed_tokens"]))
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["model.embed_tokens.weight"]
    q, _ = load_model(str(folder), resolve_precision("fp32", "cpu"), quantize="nf4")
    with pytest.raises(ValueError, match="cannot train a 4-bit base"):
        leantune.apply(q, "full")

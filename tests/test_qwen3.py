"""Qwen3 (q/k RMSNorm per head, head_dim apart from hidden/heads): an HF folder loads, trains LoRA through
the CLI, and the adapter gives PEFT's logits on transformers' Qwen3 (recipe tier, tiny random model)."""
import pytest
import torch
from test_recipes import assert_peft_parity, chat_row, step_records, write_jsonl
from tiny_folder import make_tiny_model_folder

from leantune import cli, methods
from leantune.models.loader import load

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    return make_tiny_model_folder(tmp_path_factory.mktemp("tiny") / "qwen3", family="qwen3")


def test_qwen3_folder_loads_with_its_qk_norms(qwen3):
    model, _ = load(qwen3)
    attn = model.model.layers[0].self_attn
    assert model.config.model_type == "qwen3" and model.config.qk_norm
    assert attn.q_norm.weight.shape == (model.config.head_dim,) and attn.q_proj.out_features == 4 * 32
    hf = transformers.AutoModelForCausalLM.from_pretrained(qwen3).eval()
    ids = torch.randint(3, 400, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max().item() <= 1e-4


def test_qwen3_lora_trains_and_loads_in_peft(qwen3, tmp_path, one_thread):
    data = write_jsonl(tmp_path / "t.jsonl", [chat_row(f"What is {i}?", f"It is {i}.") for i in range(8)])
    out = tmp_path / "run"
    assert cli.run(["finetune", "--model", str(qwen3), "--data", str(data), "--output", str(out), "--no-progress",
                    "--eval-fraction", "0", "--max-steps", "4", "--lr", "1e-2", "--dtype", "fp32"]) == 0
    losses = [r["loss"] for r in step_records(out)]
    assert losses[-1] < losses[0]
    _, tok = load(qwen3)
    assert_peft_parity(qwen3, out, tok)  # the adapter changes the logits, and PEFT's equal leantune's


def test_qwen3_qlora_and_merge_give_a_folder_transformers_loads(qwen3, tmp_path):
    q, _ = load(qwen3, quantize="nf4")
    assert type(q.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    assert q.model.layers[0].self_attn.q_norm.weight.dtype == torch.float32  # norms stay float
    model, tok = load(qwen3)
    methods.apply(model, "lora", r=4, alpha=8, targets="all-linear")
    with torch.no_grad():
        for _, layer in methods.adapter_layers(model):
            layer.lora_B["default"].weight.normal_(0, 0.05)
    adapter = methods.save_adapter(model, tmp_path / "a")
    assert cli.run(["merge", "--model", str(qwen3), "--adapter", str(adapter), "--output", str(tmp_path / "m")]) == 0
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert merged.config.model_type == "qwen3"
    ids = torch.tensor([tok.encode("What is 7?")])
    with torch.no_grad():
        assert (merged(ids).logits - model(ids)).abs().max().item() <= 1e-4

"""CUDA checks of the training path (run by bench/gpu.sh; skipped where there is no GPU).

QLoRA steps in bf16 on a tiny model, Linear4bit codes made on the GPU equal to the CPU's, activation offload
(`TrainConfig.offload_activations`) changing nothing but memory, and PagedAdamW on CUDA equal to torch AdamW.
The Triton kernels' GPU tests live in tests/test_kernels.py.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

CUDA = torch.cuda.is_available()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs CUDA")]


def tiny_model(dtype=torch.float32, device="cuda", seed=0, **kw):
    from leantune.models.config import ModelConfig
    from leantune.models.llama import LlamaForCausalLM

    torch.manual_seed(seed)
    shape = {"vocab_size": 512, "hidden_size": 128, "intermediate_size": 384, "num_layers": 2, "num_heads": 4,
                 "num_kv_heads": 2, "tie_word_embeddings": False}
    shape.update(kw)
    return LlamaForCausalLM(ModelConfig(**shape)).to(device=device, dtype=dtype)


def batch_of(B, T, vocab, device="cuda", seed=1):
    from leantune.data import Batch

    ids = torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))
    pos = torch.arange(T).expand(B, -1)
    return Batch(ids, ids.clone(), pos, None, ids.numel() - B, ids.numel()).to(device)


def test_qlora_step_bf16_loss_finite_and_decreasing():
    import leantune
    from leantune.optim import build_optimizer
    from leantune.quant import linear4bit_layers
    from leantune.train.loss import lm_loss_sum

    model = tiny_model(torch.bfloat16)
    leantune.apply(model, "qlora", r=16, alpha=32, targets="all-linear")
    assert len(linear4bit_layers(model)) == 14
    model.gradient_checkpointing = True
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all(p.is_cuda for p in params)
    opt = build_optimizer("paged_adamw", params, lr=5e-3)
    batch = batch_of(2, 256, 512)
    losses = []
    for _ in range(8):
        loss, n = lm_loss_sum(model, batch)
        assert loss.is_cuda
        (loss / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()) / n)
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert losses[-1] < losses[0] - 0.05, losses


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("double_quant", [False, True])
def test_linear4bit_cuda_codes_equal_cpu(dtype, double_quant):
    from leantune.quant import Linear4bit

    torch.manual_seed(2)
    lin = torch.nn.Linear(1024, 768, bias=True).to(dtype)
    with torch.no_grad():
        lin.weight.mul_(torch.rand(768, 1, dtype=dtype) * 4)  # uneven block scales
    cpu = Linear4bit.from_linear(lin, "nf4", 64, double_quant)
    gpu = Linear4bit.from_linear(lin.cuda(), "nf4", 64, double_quant)
    assert gpu.weight.is_cuda and gpu.quant_state.absmax.is_cuda
    a, b = cpu.weight, gpu.weight.cpu()
    assert torch.equal(a, b), f"{int((a != b).sum())} of {a.numel()} code bytes differ"
    sa, sb = cpu.quant_state, gpu.quant_state
    assert sa.absmax.dtype == sb.absmax.dtype
    assert torch.equal(sa.absmax, sb.absmax.cpu())
    if double_quant:
        assert torch.equal(sa.offset, sb.offset.cpu())
    x = torch.randn(64, 1024, dtype=dtype)
    torch.testing.assert_close(gpu(x.cuda()).float().cpu(), cpu(x).float(),
                               rtol=2e-2 if dtype == torch.bfloat16 else 1e-5,
                               atol=2e-2 if dtype == torch.bfloat16 else 1e-5)


def _loss_and_grads(model, batch, offload: bool):
    from leantune.train.loop import TrainConfig, Trainer
    from leantune.train.loss import lm_loss_sum

    holder = SimpleNamespace(cfg=TrainConfig(offload_activations=offload))
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    with Trainer._saved_tensors_place(holder, batch.input_ids):
        loss, n = lm_loss_sum(model, batch)
    (loss / n).backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    grads = {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}
    return float(loss), grads, peak


@pytest.mark.parametrize("checkpointing", [False, True])
def test_offload_activations_same_loss_and_grads(checkpointing):
    import leantune

    model = tiny_model(torch.float32, hidden_size=256, intermediate_size=768, num_layers=3)
    leantune.apply(model, "lora", r=8, alpha=16, targets="all-linear")
    model.gradient_checkpointing = checkpointing
    model.train()
    batch = batch_of(2, 1024, 512)
    l0, g0, peak0 = _loss_and_grads(model, batch, offload=False)
    l1, g1, peak1 = _loss_and_grads(model, batch, offload=True)
    assert g0 and g0.keys() == g1.keys()
    assert abs(l0 - l1) <= 1e-5 * abs(l0), (l0, l1)
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-4, atol=1e-6, msg=k)
    if not checkpointing:  # every saved activation went to host memory: the device peak must drop
        assert peak1 < peak0, (peak0, peak1)


def test_offload_flag_is_a_noop_context_on_cpu_tensors():
    from leantune.train.loop import TrainConfig, Trainer

    holder = SimpleNamespace(cfg=TrainConfig(offload_activations=True))
    ctx = Trainer._saved_tensors_place(holder, torch.zeros(1))
    assert not isinstance(ctx, torch.autograd.graph.save_on_cpu)


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_paged_adamw_cuda_equals_torch_adamw(weight_decay):
    from leantune.optim import PagedAdamW

    torch.manual_seed(3)
    shapes = [(512, 512), (4096, 64), (300,), (7, 5)]  # paged (>= threshold) and small ones
    ref = [torch.randn(s, device="cuda", requires_grad=True) for s in shapes]
    ours = [p.detach().clone().requires_grad_() for p in ref]
    kw = {"lr": 1e-2, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": weight_decay}
    o_ref = torch.optim.AdamW(ref, foreach=False, **kw)
    o_ours = PagedAdamW(ours, page_threshold=10_000, **kw)
    assert o_ours.is_paged(ours[0]) and not o_ours.is_paged(ours[2])
    for step in range(6):
        for a, b in zip(ref, ours):
            g = torch.randn_like(a)
            a.grad, b.grad = g.clone(), g.clone()
        o_ref.step()
        o_ours.step()
        for a, b in zip(ref, ours):
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7, msg=f"step {step}, shape {tuple(a.shape)}")
    assert o_ours.store is not None and type(o_ours.store).__name__ == "PinnedStore"
    sd_ours, sd_ref = o_ours.state_dict(), o_ref.state_dict()
    for i in range(len(shapes)):
        for k in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(sd_ours["state"][i][k].to("cuda"), sd_ref["state"][i][k],
                                       rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("method,objective", [("lora", "sft"), ("qlora", "sft"), ("full", "sft"), ("sara", "sft"),
                                              ("lora", "dpo")])
def test_finetune_recipe_on_cuda(tmp_path, method, objective):
    """`leantune finetune --device cuda` end to end on a tiny folder: the model, the batches and the optimizer on
    the GPU (bf16 base where the method allows it), the loss goes down, and the output reloads on the CPU."""
    import json as _json

    from test_recipes import chat_row, read_metrics, write_jsonl
    from tiny_folder import make_tiny_model_folder

    from leantune import cli

    folder = make_tiny_model_folder(tmp_path / "m")
    if objective == "dpo":
        rows = [{"prompt": f"Which fruit is item {i}?", "chosen": f"Item {i} is an apple.",
                 "rejected": f"Item {i} is a stone."} for i in range(8)]
    else:
        rows = [chat_row(f"What is item {i}?", f"Item {i} is a red apple.") for i in range(8)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    out = tmp_path / "out"
    lr = "1e-4" if method == "full" else "5e-3"
    assert cli.run(["finetune", "--model", str(folder), "--data", str(data), "--output", str(out), "--method",
                    method, "--objective", objective, "--device", "cuda", "--max-steps", "6", "--batch-size", "4",
                    "--lr", lr, "--eval-fraction", "0", "--no-progress"]) == 0
    losses = [r["loss"] for r in read_metrics(out) if "loss" in r]
    assert len(losses) == 6 and all(map(torch.isfinite, torch.tensor(losses))), losses
    assert losses[-1] < losses[0], losses
    assert any("peak_memory_mb" in r for r in read_metrics(out))  # CUDA's own peak, not the process RSS
    summary = _json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 6

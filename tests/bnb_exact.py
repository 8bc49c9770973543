"""The exact reference for 4-bit oracles: bitsandbytes' own codes and states, decoded and multiplied in
plain fp32 torch, independent of bnb's CPU kernels and of leantune's code.

Why: bnb's CPU kernels are exact fp32 math only on AVX2-only CPUs. Where torch reports AVX512, bnb 0.50
dequantizes with an AVX-512 kernel, and where the CPU has AVX512_BF16, an eval-mode no-grad forward
repacks the weight and multiplies in bf16 (`gemv_4bit`); logits then differ from fp32 math by ~2e-3.
Tests compare leantune against `exact_reference(bnb_model)`, and `bnb_cpu_exact()` says whether bnb's
own forward may be held to the same tolerance on this CPU (the tests that document bnb's behaviour
xfail where it is not).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn


def bnb_cpu_exact() -> tuple[bool, str]:
    """(True, "") where bnb's CPU 4-bit forward is fp32 math, else (False, why)."""
    import bitsandbytes as bnb

    if bnb.functional.has_avx512bf16():
        return False, "bnb multiplies 4-bit weights in bf16 on a CPU with AVX512_BF16 (gemv_4bit)"
    if torch.backends.cpu.get_cpu_capability() == "AVX512":
        return False, "bnb dequantizes with its AVX-512 kernel on this CPU"
    return True, ""


def xfail_unless_bnb_exact(request) -> None:
    """Mark the calling test xfail (non-strict) on CPUs where bnb's own kernels are not fp32 math."""
    exact, why = bnb_cpu_exact()
    if not exact:
        request.applymarker(pytest.mark.xfail(reason=why, strict=False))


def exact_dequant(packed: torch.Tensor, qs) -> torch.Tensor:
    """bnb's weight (its QuantState `qs` and packed codes) as `code[q] * absmax` in fp32, cast to qs.dtype
    as bnb's dequantize returns it; q is the high nibble for even elements."""
    n = qs.shape.numel()
    p = packed.reshape(-1).view(torch.uint8).long()
    q = torch.stack((p >> 4, p & 0xF), dim=1).reshape(-1)[:n]
    absmax = qs.absmax
    if qs.nested:  # 8-bit absmax codes, blockwise scaled by the nested state, plus the offset
        s2 = qs.state2
        nested = s2.code.float()[absmax.long()] * s2.absmax.float().repeat_interleave(s2.blocksize)[:absmax.numel()]
        absmax = nested + qs.offset
    scale = absmax.float().repeat_interleave(qs.blocksize)[:n]
    return (qs.code.float()[q] * scale).to(qs.dtype).view(qs.shape)


class ExactLinear(nn.Linear):
    """What bnb's Linear4bit computes with compute dtype fp32, written in plain torch (an nn.Linear, so
    PEFT wraps it as it wraps any float base)."""

    def __init__(self, bnb_layer):
        w = exact_dequant(bnb_layer.weight.data, bnb_layer.weight.quant_state).float()
        super().__init__(w.shape[1], w.shape[0], bias=bnb_layer.bias is not None, device="meta")
        self.weight = nn.Parameter(w, requires_grad=False)
        if bnb_layer.bias is not None:
            self.bias = nn.Parameter(bnb_layer.bias.detach().float(), requires_grad=False)

    def forward(self, x):
        return F.linear(x.float(), self.weight, self.bias).to(x.dtype)


def exact_reference(model: nn.Module) -> nn.Module:
    """`model` (transformers + bnb, loaded 4-bit) with every bnb Linear4bit replaced by ExactLinear, in place."""
    import bitsandbytes as bnb

    for name, module in list(model.named_modules()):
        if isinstance(module, bnb.nn.Linear4bit):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, ExactLinear(module))
    return model

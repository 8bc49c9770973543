"""SwiGLU feeding a linear layer (Shazeer 2020, arXiv:2002.05202): `down(silu(gate) * up)` as one node.

The plain path keeps four (N, F) tensors per MLP for backward: gate, silu(gate), up and their product
(the down projection's input). This node keeps gate and up only and recomputes `h = silu(gate) * up`
in backward, where the down projection's weight gradients (or LoRA's dA) need it: one elementwise
pass for half the MLP's saved memory. Gradients use the same kernels as autograd (`silu_backward`,
two products), so they are the plain path's bit for bit given the same `dh`. The down projection may
carry one LoRA adapter (see `lora_linear`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .lora_linear import dense, linear_lora_backward, linear_lora_forward, save_weight, saved_weight


class SwigluLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, weight, bias, lora_a, lora_b, scaling: float):
        # gate, up (N, F); weight (out, F)
        h = F.silu(gate) * up
        out, xa_t = linear_lora_forward(h, dense(weight, h.dtype), bias, lora_a, lora_b, scaling)
        ctx.save_for_backward(gate, up, save_weight(ctx, weight), lora_a, lora_b, xa_t)
        ctx.scaling = scaling
        return out

    @staticmethod
    def backward(ctx, g):
        gate, up, weight, lora_a, lora_b, xa_t = ctx.saved_tensors
        need_gate, need_up, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:6]
        need_h = need_gate or need_up
        weight = saved_weight(ctx, weight, g.dtype, need_h)
        silu = F.silu(gate) if (need_up or need_w or need_a) else None
        h = silu * up if (need_w or need_a) else None
        dh, dw, dbias, da, db = linear_lora_backward(g, h, weight, lora_a, lora_b, xa_t, ctx.scaling,
                                                     (need_h, need_w, need_bias, need_a, need_b))
        dgate = torch.ops.aten.silu_backward(dh * up, gate) if need_gate else None
        dup = dh * silu if need_up else None
        return dgate, dup, dw, dbias, da, db, None


def swiglu_linear(gate: torch.Tensor, up: torch.Tensor, weight, bias, lora_a, lora_b, scaling: float):
    """`lora_linear(F.silu(gate) * up, weight, bias, lora_a, lora_b, scaling)` for gate, up (..., F)."""
    lead = gate.shape[:-1]
    f = gate.shape[-1]
    out = SwigluLinearFn.apply(gate.reshape(-1, f), up.reshape(-1, f), weight, bias, lora_a, lora_b,
                               float(scaling))
    return out.view(*lead, out.shape[-1])

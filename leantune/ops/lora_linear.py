"""A linear layer plus at most one LoRA adapter (Hu et al. 2021, arXiv:2106.09685) as one autograd node.

`y = x W^T + b + s (x A^T) B^T` with the base `W`, `b` usually frozen. The plain module path
(`base(x) + B(A(x)) * s`) runs 2 small GEMMs forward and 4 backward in layouts BLAS handles poorly
for a rank of 8 (an (N, out) @ (out, r) product is ~4x slower than the same product written as
(r, out) @ (out, N)), plus an elementwise scale and add over (N, out) each way. Here:

- forward: `xa_t = A x^T` (r, N); `y = addmm(x W^T + b, xa_t^T, B^T, alpha=s)`, scale and add fused
  into the GEMM; saved: x and xa_t (the plain path saves the same two);
- backward: `gb_t = B^T g^T` (r, N) once, then `dx = g W + s gb_t^T A` (one accumulate-GEMM),
  `dA = s gb_t x`, `dB = s (xa_t g)^T`; W and b get gradients only if they require them.

A layer offers this path through the fusable-linear protocol (`ops/fusable.py`): its
`fused_linear_params(x, adapter_ids) -> (W, b, A, B, s) | None`. `W` is a float tensor or a packed
frozen weight (anything with `dense(dtype) -> (out, in) tensor`, e.g. QLoRA's 4-bit codes): a packed
weight is expanded for the forward GEMM and again for `dx` in backward, never kept in between, so a
QLoRA layer takes the same fused path as a float one at ~4 bits per weight between the passes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def dense(weight, dtype: torch.dtype) -> torch.Tensor:
    """A float weight as is; a packed one (`.dense(dtype)`) expanded to a fresh float tensor."""
    return weight if isinstance(weight, torch.Tensor) else weight.dense(dtype)


def save_weight(ctx, weight):
    """What backward needs of `weight`: the tensor itself (saved through `save_for_backward` by the
    caller, returned here), or a packed weight kept on ctx (frozen codes, never a float copy)."""
    if isinstance(weight, torch.Tensor):
        ctx.packed_weight = None
        return weight
    ctx.packed_weight = weight
    return None


def saved_weight(ctx, saved: torch.Tensor | None, dtype: torch.dtype, needed: bool):
    """The weight for backward's products: the saved tensor, or the packed one expanded if `needed`."""
    if ctx.packed_weight is None:
        return saved
    return ctx.packed_weight.dense(dtype) if needed else None


def linear_lora_forward(x, weight, bias, lora_a, lora_b, scaling: float):
    """(y, xa_t) for 2-D x (N, in); xa_t = A x^T (r, N), None without an adapter.

    Adapter weights in another dtype than x (fp32 masters on a bf16 model) are cast to x's dtype for
    the products, as autocast does; their gradients come back in their own dtype."""
    out = F.linear(x, weight, bias)  # (N, out)
    if lora_a is None:
        return out, None
    xa_t = torch.mm(lora_a.to(x.dtype), x.t())  # (r, N)
    out.addmm_(xa_t.t(), lora_b.to(x.dtype).t(), alpha=scaling)
    return out, xa_t


def linear_lora_backward(g, x, weight, lora_a, lora_b, xa_t, scaling: float, need):
    """(dx, dW, db, dA, dB) of `linear_lora_forward` for the inputs `need` flags, None elsewhere."""
    need_x, need_w, need_bias, need_a, need_b = need
    dx = dw = dbias = da = db = None
    a = None if lora_a is None else lora_a.to(g.dtype)  # compute copies (no-ops when dtypes agree)
    gb_t = torch.mm(lora_b.to(g.dtype).t(), g.t()) if a is not None and (need_x or need_a) else None  # (r, N)
    if need_x:
        dx = torch.mm(g, weight)  # (N, in)
        if gb_t is not None:
            dx.addmm_(gb_t.t(), a, alpha=scaling)
    if need_w:
        dw = torch.mm(g.t(), x)
    if need_bias:
        dbias = g.sum(0)
    if need_a:
        da = _scaled(torch.mm(gb_t, x), scaling).to(lora_a.dtype)  # (r, in)
    if need_b:
        db = _scaled(torch.mm(xa_t, g), scaling).t().contiguous().to(lora_b.dtype)  # (out, r)
    return dx, dw, dbias, da, db


def _scaled(t: torch.Tensor, s: float) -> torch.Tensor:
    return t if s == 1.0 else t.mul_(s)


class LoraLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling: float):
        # x (N, in), weight (out, in) or packed, lora_a (r, in), lora_b (out, r)
        out, xa_t = linear_lora_forward(x, dense(weight, x.dtype), bias, lora_a, lora_b, scaling)
        ctx.save_for_backward(x, save_weight(ctx, weight), lora_a, lora_b, xa_t)
        ctx.scaling = scaling
        return out

    @staticmethod
    def backward(ctx, g):
        x, weight, lora_a, lora_b, xa_t = ctx.saved_tensors
        weight = saved_weight(ctx, weight, g.dtype, ctx.needs_input_grad[0])
        grads = linear_lora_backward(g, x, weight, lora_a, lora_b, xa_t, ctx.scaling, ctx.needs_input_grad[:5])
        return (*grads, None)


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor | None,
                lora_b: torch.Tensor | None, scaling: float) -> torch.Tensor:
    """`F.linear(x, weight, bias) + scaling * F.linear(F.linear(x, lora_a), lora_b)` for x (..., in)."""
    lead = x.shape[:-1]
    out = LoraLinearFn.apply(x.reshape(-1, x.shape[-1]), weight, bias, lora_a, lora_b, float(scaling))
    return out.view(*lead, out.shape[-1])

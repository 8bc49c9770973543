"""DoRA, weight-decomposed low-rank adaptation (Liu et al. 2024, arXiv:2402.09353), as peft 0.21.2 computes it.

A DoRA adapter is a LoRA adapter (A, B, s, dropout as in `lora.py`) plus a trainable magnitude vector
`m` (out,), and the adapted layer computes

    W' = m / ||W + s B A||_row  *  (W + s B A)        y = x W'^T + b

The norm is taken over the input dimension, one value per output row (PEFT's `torch.linalg.norm(W + s BA,
dim=1)`; the paper's "column-wise" norm in its (in, out) layout). As in the paper (§4.3) and PEFT, the norm is
treated as a constant in backward: it is computed under no_grad, so gradients reach `m`, `A` and `B` only
through `m / norm` and the low-rank branch. `m` starts as `||W + s B A||_row` (= `||W||_row`, as B = 0), so
the model starts unchanged. The layer adds PEFT's delta to the base output:

    (m/norm - 1) * (x W^T) + m/norm * s * B(A(x))

With dropout active (training, p > 0) PEFT drops x for both terms of the delta and recomputes `x W^T` on the
dropped input; this module does the same, so training matches PEFT too. The base bias is not rescaled, and
there is no LoRA bias (`lora_bias=True` is refused with DoRA, as PEFT refuses it).

No (out, in) matrix is formed in the forward: with `WA = W A^T` (out, r) and `G = A A^T` (r, r),

    ||W + s B A||^2_row = ||W||^2_row + 2 s sum(WA * B, -1) + s^2 sum((B G) * B, -1)

which costs one (r, in) x (in, out) product instead of forming B @ A and W + s B A (PEFT even forms B A by
running an (in, in) identity through both factors). `||W||^2_row` is cached per layer (the base is frozen)
and recomputed when the base weight changes (keyed on its storage and version counter: a merge bumps it).
On a 4-bit base, `W A^T` runs through the base layer itself and `||W||^2` dequantizes once.

With several adapters active at once, each DoRA adapter rescales the base output `x W^T` alone; PEFT hands
its DoRA layer the running sum (base plus the adapters before it), so the two differ in that case only.

On disk the adapter is PEFT's: `use_dora: true` in the config and `<module>.lora_magnitude_vector` (no
`.weight` suffix) next to `lora_A` / `lora_B` (formats.md §4.3). Register: `apply(model, "dora", ...)`, or
`apply(model, "lora", use_dora=True, ...)` (`lora.py` registers "dora" with its `DoraConfig`).

Per-row routing (`adapter_ids`): the routed forward adds `lora_delta(name, x_rows)` to the base rows; for a
DoRA adapter that delta needs `x_rows W^T`, which `delta` recomputes for those rows when it is not handed
the base output, so every row gets exactly what its adapter alone gives (one extra matmul for DoRA rows).

Merging follows PEFT: `W <- m/norm * (W + s B A)` with the norm of the weight as it is at merge time, kept for
unmerge (`W <- W / (m/norm) - s B A`). Since a DoRA merge rescales W, a layer unmerges in reverse merge order
when a DoRA adapter is involved (`LoraLinear` refuses other orders).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .base import no_dropout

if TYPE_CHECKING:
    from .lora import LoraLinear  # which builds on this module


# ---------------------------------------------------------------------------------------------
# the frozen base weight, seen through whatever base layer it is


def base_weight_key(layer: LoraLinear) -> tuple:
    """Identity of the base weight's current value: changes when it is replaced or written in place."""
    w = layer.base_layer.weight
    return id(w), w.data_ptr(), w._version, tuple(w.shape)


def base_weight(layer: LoraLinear) -> torch.Tensor:
    """The base weight (out, in) as a float tensor (a 4-bit base is dequantized)."""
    base = layer.base_layer
    dequantize = getattr(base, "dequantized_weight", None)
    if dequantize is not None:
        return dequantize(torch.float32)
    w = getattr(base, "weight", None)
    if not isinstance(w, torch.Tensor) or not w.is_floating_point():
        raise NotImplementedError(f"DoRA needs the weight of its base layer; a {type(base).__name__} has none")
    return w


def base_matmul(layer: LoraLinear, t: torch.Tensor) -> torch.Tensor:
    """`t W^T` (no bias) for t (..., in), in t's dtype: the base layer's product without forming W."""
    base = layer.base_layer
    w = getattr(base, "weight", None)
    if isinstance(base, nn.Linear) and isinstance(w, torch.Tensor) and w.is_floating_point():
        return F.linear(t.to(w.dtype), w).to(t.dtype)
    out = base(t)  # a linear-like layer (e.g. 4-bit): its own product, then the bias taken off again
    bias = getattr(base, "bias", None)
    return (out if bias is None else out - bias.to(out.dtype)).to(t.dtype)


def base_row_sq_norms(layer: LoraLinear) -> torch.Tensor:
    """||W||^2 per output row (out,) in fp32, cached on the layer until the base weight changes."""
    key = base_weight_key(layer)
    cache = getattr(layer, "_dora_base_sq", None)
    if cache is not None and cache[0] == key:
        return cache[1]
    with torch.no_grad():
        sq = base_weight(layer).float().pow(2).sum(-1)
    layer._dora_base_sq = (key, sq)
    return sq


@torch.no_grad()
def weight_norm(layer: LoraLinear, name: str) -> torch.Tensor:
    """||W + s B A|| per output row (out,), without forming B A or W + s B A; a constant for autograd."""
    a = layer.lora_A[name].weight  # (r, in)
    b = layer.lora_B[name].weight  # (out, r)
    s = layer.scaling[name]
    dtype = torch.promote_types(a.dtype, torch.float32)
    a, b = a.to(dtype), b.to(dtype)
    wa = base_matmul(layer, a).t()  # (out, r) = W A^T
    cross = (wa * b).sum(-1)  # W_row . (B A)_row
    quad = ((b @ (a @ a.t())) * b).sum(-1)  # ||(B A)_row||^2
    sq = base_row_sq_norms(layer).to(dtype) + (2 * s) * cross + (s * s) * quad
    return sq.clamp_min_(0).sqrt_()  # rounding can take an exact 0 slightly below 0


# ---------------------------------------------------------------------------------------------
# the magnitude vector: PEFT's `lora_magnitude_vector[name]`, and the DoRA arithmetic of one adapter


class _DoraDelta(torch.autograd.Function):
    """`(scale - 1) * base + scale * s * lora` with one (..., out) tensor kept for backward instead of two.

    Autograd on the plain expression keeps both `base` and `lora` for the magnitude's gradient. Both
    enter it only as `y = base + s * lora` (d scale = sum over rows of g * y), so y alone is kept: half
    the activation memory DoRA adds per layer. The forward value is the plain expression's, bit for bit."""

    @staticmethod
    def forward(ctx, base, lora, scale, s: float):
        # base, lora (..., out); scale (out,) = m / ||W + s B A||_row
        need_scale = ctx.needs_input_grad[2]
        ctx.save_for_backward(torch.add(base, lora, alpha=s) if need_scale else None, scale)
        ctx.s = s
        return (scale - 1) * base + (scale * s) * lora

    @staticmethod
    def backward(ctx, g):
        y, scale = ctx.saved_tensors
        need_base, need_lora, need_scale = ctx.needs_input_grad[:3]
        d_base = g * (scale - 1) if need_base else None
        d_lora = g * (scale * ctx.s) if need_lora else None
        d_scale = (g * y).reshape(-1, g.shape[-1]).sum(0) if need_scale else None
        return d_base, d_lora, d_scale, None


class DoraMagnitude(nn.Module):
    """The magnitude `m` (out,) of one DoRA adapter (`.weight`, PEFT's in-memory name) and its arithmetic."""

    def __init__(self, out_features: int, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype))
        self.merged_scale: torch.Tensor | None = None  # m / norm when merged: unmerge needs the same factor

    @classmethod
    def for_adapter(cls, layer: LoraLinear, name: str) -> DoraMagnitude:
        w = layer.lora_A[name].weight
        mag = cls(layer.out_features, device=w.device, dtype=w.dtype)
        mag.reset(layer, name)
        return mag

    @torch.no_grad()
    def reset(self, layer: LoraLinear, name: str) -> None:
        """m = ||W + s B A||_row, so the adapted layer computes what it did before."""
        self.weight.copy_(weight_norm(layer, name))

    def scale(self, layer: LoraLinear, name: str) -> torch.Tensor:
        """m / ||W + s B A||_row (out,), differentiable in m only."""
        return self.weight / weight_norm(layer, name).to(self.weight.dtype)

    def delta(self, layer: LoraLinear, name: str, x: torch.Tensor,
              base_out: torch.Tensor | None = None) -> torch.Tensor:
        """What this adapter adds to the base output for x (..., in); `base_out`: `base(x)` if at hand."""
        lora_a, lora_b = layer.lora_A[name], layer.lora_B[name]
        dropout = layer.lora_dropout[name]
        x = x.to(lora_a.weight.dtype)
        if no_dropout(dropout) and base_out is not None:
            bias = getattr(layer.base_layer, "bias", None)
            base = base_out if bias is None else base_out - bias  # PEFT: the bias is not rescaled
        else:  # PEFT: with dropout in effect, both terms see the dropped input
            x = dropout(x)
            base = base_matmul(layer, x)
        scale = self.scale(layer, name)
        lora = lora_b(lora_a(x))
        return _DoraDelta.apply(base.to(lora.dtype), lora, scale, float(layer.scaling[name]))

    def merged_tensors(self, layer: LoraLinear, name: str, sign: int):
        """New (W, b) in the base dtype after merging (sign=1) or unmerging (-1) this adapter."""
        weight = getattr(layer.base_layer, "weight", None)
        if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
            raise NotImplementedError(
                f"cannot merge into a {type(layer.base_layer).__name__} base layer (no floating-point weight)")
        dw, _ = layer.delta_weight(name)  # s B A in fp32 (DoRA has no LoRA bias)
        w = weight.float()
        if sign > 0:
            scale = self.weight.detach().float() / torch.linalg.norm(w + dw, dim=1)
            self.merged_scale = scale
            new_w = scale[:, None] * (w + dw)
        else:
            if self.merged_scale is None:
                raise ValueError(f"DoRA adapter {name!r} is not merged, so there is nothing to unmerge")
            scale = self.merged_scale
            new_w = w / scale[:, None] - dw
        if not torch.isfinite(new_w).all():
            raise ValueError(
                f"merging adapter {name!r} gives non-finite values in the weight of this "
                f"{layer.out_features}x{layer.in_features} layer (a zero magnitude or norm?); nothing was merged")
        return new_w.to(weight.dtype), None  # the base bias is not rescaled

    def extra_repr(self) -> str:
        return f"out_features={self.weight.shape[0]}"

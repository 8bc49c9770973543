"""Fused Triton ops for a QLoRA training step on CUDA, as autograd-aware functions.

- `nf4_linear(x, packed, state, bias, lora_a, lora_b, scaling)`: `y = x @ dequant(W)^T + b` with W
  tiles dequantized in registers (no dequantized weight in memory), fp32 accumulation; backward
  `dx = dy @ dequant(W)` by the same kernel with the transposed access pattern (QLoRA,
  arXiv:2305.14314; W stays frozen); an optional LoRA adapter's `s (x A^T) B^T` is added in the
  matmul's epilogue (and `s (dy B) A` in backward's);
- `rms_norm(x, weight, eps)`: `leantune.models.llama.RMSNorm`'s math, forward and backward;
- `swiglu(gate, up)`: `silu(gate) * up`, forward and backward;
- `apply_rope(x, cos, sin)`: rotate-half RoPE as `leantune.models.llama.apply_rope`, with backward.

Each takes CUDA tensors (or CPU tensors under `TRITON_INTERPRET=1`) and raises a clear error
otherwise: the CPU path stays torch. The torch references the tests compare against are the plain
module compositions. Imports no triton until a kernel is launched.
"""
from __future__ import annotations

import torch

from . import check_device, interpreting, load
from .nf4 import Nf4Layout, packed_bytes

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_ELEMENTWISE_BLOCK = 1024


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _programs(rows: int) -> tuple[int, int]:
    """(grid, rows per program) for row-wise kernels: ~4 programs per SM, a few under the interpreter."""
    if rows == 0:
        return 0, 1
    if interpreting() or not torch.cuda.is_available():
        target = 4
    else:
        target = 4 * torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    per = -(-rows // min(rows, target))
    return -(-rows // per), per


def _num_warps(block: int) -> int:
    return min(16, max(4, block // 256))


def _check_float(what: str, *tensors) -> None:
    for t in tensors:
        if t is not None and t.dtype not in _FLOATS:
            raise TypeError(f"leantune.kernels.{what}: expected float32, bfloat16 or float16 tensors, got {t.dtype}")


# ---------------------------------------------------------------------------------------------
# 4-bit linear


def matmul_config(m: int, dtype: torch.dtype) -> dict:
    """Tiles and launch options of the 4-bit matmul for `m` rows of activations. Untuned (no GPU
    benchmark has run yet); chosen so that sm_90 needs no register spills: the weight tile is a
    gather, so it stays 32 x 64, and fp32 (an FMA dot) gets no software pipelining."""
    if dtype == torch.float32:
        return dict(BLOCK_M=min(32, max(16, _next_pow2(m))), BLOCK_P=64, BLOCK_R=32, num_warps=4, num_stages=1)
    return dict(BLOCK_M=min(64, max(16, _next_pow2(m))), BLOCK_P=64, BLOCK_R=32, num_warps=4, num_stages=2)


def _nf4_matmul(a: torch.Tensor, packed: torch.Tensor, layout: Nf4Layout, bias, transpose: bool,
                lora=None) -> torch.Tensor:
    """a (M, K) @ dequant(W)^T -> (M, N), or with transpose a (M, N) @ dequant(W) -> (M, K).

    `lora` = (e (M, r), f (r, P) as a possibly transposed view, scaling) adds `scaling * e @ f`.
    """
    n_out, k_in = layout.shape
    m = a.shape[0]
    p_dim, r_dim, w_strides = (k_in, n_out, (k_in, 1)) if transpose else (n_out, k_in, (1, k_in))
    c = torch.empty((m, p_dim), dtype=a.dtype, device=a.device)
    if m == 0 or p_dim == 0:
        return c
    e, f, scaling = lora if lora is not None else (a, a, 0.0)
    rank = e.shape[1] if lora is not None else 0
    cfg = matmul_config(m, a.dtype)
    grid = (-(-m // cfg["BLOCK_M"]), -(-p_dim // cfg["BLOCK_P"]))
    upcast = interpreting() and a.dtype != torch.float32
    precision = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    k = load("nf4")
    k._matmul_kernel[grid](a, packed_bytes(packed, layout.numel), *layout.kernel_args(a.device),
                           bias if bias is not None else a, c, e, f, m, p_dim, r_dim, rank, float(scaling),
                           a.stride(0), a.stride(1), c.stride(0), c.stride(1), *w_strides,
                           e.stride(0), e.stride(1), f.stride(0), f.stride(1), BS=layout.blocksize,
                           DQ=layout.double_quant, NESTED_BS=layout.nested_blocksize, HAS_BIAS=bias is not None,
                           HAS_LORA=lora is not None, UPCAST=upcast, PRECISION=precision,
                           IDX64=max(layout.numel, a.numel(), c.numel()) >= 2**31,
                           BLOCK_RANK=max(16, _next_pow2(rank)), enable_fp_fusion=False, **cfg)
    return c


class _Nf4LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, packed, layout, bias, lora_a, lora_b, scaling):
        # x (M, K) -> (M, N); W is frozen: gradients flow to x, bias and the LoRA factors A (r, K), B (N, r)
        lora = xa = None
        if lora_a is not None:
            xa = x @ lora_a.to(x.dtype).t()  # (M, r)
            lora = (xa, lora_b.t(), scaling)
        ctx.layout, ctx.scaling = layout, scaling
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(packed, x if lora_a is not None else None, xa, lora_a, lora_b)  # x only for dA
        return _nf4_matmul(x, packed, layout, bias, transpose=False, lora=lora)

    @staticmethod
    def backward(ctx, dy):
        packed, x, xa, lora_a, lora_b = ctx.saved_tensors
        need_x, need_bias, need_a, need_b = (ctx.needs_input_grad[i] for i in (0, 3, 4, 5))
        s = ctx.scaling
        gb = dy @ lora_b.to(dy.dtype) if lora_a is not None and (need_x or need_a) else None  # (M, r)
        dx = db = da = dbb = None
        if need_x:
            lora = None if gb is None else (gb, lora_a.to(dy.dtype), s)
            dx = _nf4_matmul(dy, packed, ctx.layout, None, transpose=True, lora=lora)
        if need_bias:
            db = dy.sum(0, dtype=torch.float32).to(ctx.bias_dtype)
        if need_a:
            da = (s * (gb.t() @ x)).to(lora_a.dtype)  # (r, K)
        if need_b:
            dbb = (s * (dy.t() @ xa)).to(lora_b.dtype)  # (N, r)
        return dx, None, None, db, da, dbb, None


def _check_linear_args(layout: Nf4Layout, x, bias, lora_a, lora_b) -> None:
    if len(layout.shape) != 2 or x.shape[-1] != layout.shape[1]:
        raise ValueError(f"nf4_linear: x (..., {x.shape[-1]}) does not match the 4-bit weight {layout.shape}")
    n_out, k_in = layout.shape
    if bias is not None and bias.shape != (n_out,):
        raise ValueError(f"nf4_linear: bias shape {tuple(bias.shape)} != ({n_out},)")
    if (lora_a is None) != (lora_b is None):
        raise ValueError("nf4_linear: pass both lora_a and lora_b, or neither")
    if lora_a is not None and (lora_a.dim() != 2 or lora_a.shape[1] != k_in
                               or lora_b.shape != (n_out, lora_a.shape[0])):
        raise ValueError(f"nf4_linear: LoRA A {tuple(lora_a.shape)} and B {tuple(lora_b.shape)} do not fit "
                         f"({n_out}, {k_in}): expected A (r, {k_in}) and B ({n_out}, r)")


def nf4_linear(x: torch.Tensor, packed: torch.Tensor, state, bias: torch.Tensor | None = None,
               lora_a: torch.Tensor | None = None, lora_b: torch.Tensor | None = None,
               scaling: float = 1.0) -> torch.Tensor:
    """`F.linear(x, dequantize_4bit(packed, state, x.dtype), bias) + scaling * (x @ A^T) @ B^T` without
    materializing the weight; the LoRA term (A (r, in), B (out, r)) is optional and fused into the
    matmul's epilogue, forward and backward.

    x (..., in) in fp32/bf16/fp16; `state` an `Nf4Layout` or `QuantState` of a 2-D `[out, in]` weight.
    Differentiable in x, bias, A and B (the 4-bit weight is frozen).
    """
    layout = Nf4Layout.from_state(state)
    _check_linear_args(layout, x, bias, lora_a, lora_b)
    n_out, k_in = layout.shape
    _check_float("nf4_linear", x, bias, lora_a, lora_b)
    check_device("nf4_linear", x, packed, layout.absmax, bias, lora_a, lora_b)
    y = _Nf4LinearFn.apply(x.reshape(-1, k_in), packed, layout, bias, lora_a, lora_b, float(scaling))
    return y.view(*x.shape[:-1], n_out)


# ---------------------------------------------------------------------------------------------
# RMSNorm


class _RMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        # x (M, D) contiguous rows
        m, d = x.shape
        y = torch.empty((m, d), dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
        rstd = torch.empty(m, dtype=torch.float32, device=x.device)
        grid, per = _programs(m)
        block = _next_pow2(d)
        if grid:
            load("fused")._rmsnorm_fwd[(grid,)](x, weight, y, rstd, m, d, per, eps, x.stride(0), y.stride(0),
                                                BLOCK_D=block, num_warps=_num_warps(block), enable_fp_fusion=False)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        m, d = x.shape
        dy = dy.contiguous()
        dx = torch.empty_like(x)
        grid, per = _programs(m)
        dw = torch.zeros((max(grid, 1), d), dtype=torch.float32, device=x.device)
        block = _next_pow2(d)
        if grid:
            load("fused")._rmsnorm_bwd[(grid,)](dy, x, weight, rstd, dx, dw, m, d, per, dy.stride(0), x.stride(0),
                                                dx.stride(0), BLOCK_D=block, num_warps=_num_warps(block),
                                                enable_fp_fusion=False)
        return dx, dw.sum(0).to(weight.dtype), None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """`weight * (x.float() * rsqrt(mean(x.float()^2, -1) + eps)).to(x.dtype)` for x (..., D)."""
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"rms_norm: weight shape {tuple(weight.shape)} != ({x.shape[-1]},)")
    _check_float("rms_norm", x, weight)
    check_device("rms_norm", x, weight)
    y = _RMSNormFn.apply(x.reshape(-1, x.shape[-1]).contiguous(), weight.contiguous(), float(eps))
    return y.view(x.shape)


# ---------------------------------------------------------------------------------------------
# SwiGLU


def _elementwise_grid(n: int) -> tuple[int]:
    return (-(-n // _ELEMENTWISE_BLOCK),)


class _SwigluFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        h = torch.empty_like(gate)
        if gate.numel():
            load("fused")._swiglu_fwd[_elementwise_grid(gate.numel())](gate, up, h, gate.numel(),
                                                                      BLOCK=_ELEMENTWISE_BLOCK, enable_fp_fusion=False)
        ctx.save_for_backward(gate, up)
        return h

    @staticmethod
    def backward(ctx, dh):
        gate, up = ctx.saved_tensors
        dh = dh.contiguous()
        dg, du = torch.empty_like(gate), torch.empty_like(up)
        if gate.numel():
            load("fused")._swiglu_bwd[_elementwise_grid(gate.numel())](dh, gate, up, dg, du, gate.numel(),
                                                                      BLOCK=_ELEMENTWISE_BLOCK, enable_fp_fusion=False)
        return dg, du


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """`F.silu(gate) * up` (same shape and dtype), differentiable in both."""
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"swiglu: gate {tuple(gate.shape)} {gate.dtype} and up {tuple(up.shape)} {up.dtype} differ")
    _check_float("swiglu", gate)
    check_device("swiglu", gate, up)
    return _SwigluFn.apply(gate.contiguous(), up.contiguous())


# ---------------------------------------------------------------------------------------------
# RoPE


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> torch.Tensor:
    b, h, t, d = x.shape
    y = torch.empty((b, h, t, d), dtype=torch.promote_types(x.dtype, cos.dtype), device=x.device)
    n_rows = b * h * t
    if n_rows == 0:
        return y
    block_h = _next_pow2(d // 2)
    block_r = min(_next_pow2(n_rows), max(1, 1024 // block_h))  # ~1k elements per half-tile: no spills
    load("fused")._rope_kernel[(-(-n_rows // block_r),)](
        x, cos, sin, y, n_rows, h, t, d // 2, x.stride(0), x.stride(1), x.stride(2),
        cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1), y.stride(0), y.stride(1), y.stride(2),
        BACKWARD=backward, BLOCK_R=block_r, BLOCK_H=block_h, num_warps=4, enable_fp_fusion=False)
    return y


class _RopeFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        ctx.x_dtype = x.dtype
        return _rope(x, cos, sin, backward=False)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        dy = dy if dy.stride(-1) == 1 else dy.contiguous()
        return _rope(dy, cos, sin, backward=True).to(ctx.x_dtype), None, None


def _rope_table(name: str, c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """cos/sin as (B or 1, T, D) with unit stride along D, batch broadcast by a zero stride."""
    b, _, t, d = x.shape
    if c.dim() == 2:
        c = c.unsqueeze(0)
    if c.dim() != 3 or c.shape[0] not in (1, b) or tuple(c.shape[1:]) != (t, d):
        raise ValueError(f"apply_rope: {name} shape {tuple(c.shape)} does not fit x {tuple(x.shape)}: "
                         f"expected ({b}, {t}, {d}) or ({t}, {d})")
    if c.stride(-1) != 1:
        c = c.contiguous()
    return c.expand(b, t, d)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`leantune.models.llama.apply_rope`: x (B, H, T, D) (any strides with unit stride on D, e.g. a
    transposed projection), cos/sin (B, T, D); differentiable in x."""
    if x.dim() != 4 or x.shape[-1] % 2:
        raise ValueError(f"apply_rope: x must be (B, H, T, D) with D even, got {tuple(x.shape)}")
    _check_float("apply_rope", x, cos, sin)
    check_device("apply_rope", x, cos, sin)
    cos, sin = _rope_table("cos", cos, x), _rope_table("sin", sin, x)
    if x.stride(-1) != 1:
        x = x.contiguous()
    return _RopeFn.apply(x, cos, sin)

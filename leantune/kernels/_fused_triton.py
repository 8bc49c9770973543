"""Triton kernels for the elementwise and row-wise ops of a Llama block: RMSNorm (Zhang & Sennrich
2019, arXiv:1910.07467), SwiGLU (Shazeer 2020, arXiv:2002.05202) and rotate-half RoPE (Su et al.
2021, arXiv:2104.09864), forward and backward.

Forward kernels round where `leantune.models.llama` rounds (e.g. RMSNorm casts `x * rstd` to the
input dtype before the weight multiply), so low-precision outputs follow the torch path; backward
kernels compute in fp32 and round once. Imported only through `leantune.kernels.load("fused")`.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._common_triton import row_sum, to_dtype

INTERPRET = bool(triton.knobs.runtime.interpret)


@triton.jit
def _rmsnorm_fwd(x_ptr, w_ptr, y_ptr, rstd_ptr, M, D, rows_per_prog, eps, stride_x, stride_y,
                 BLOCK_D: tl.constexpr):
    # y = w * (x * rstd).to(x.dtype), rstd = 1 / sqrt(mean(x^2) + eps); rstd saved for backward.
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    for i in range(rows_per_prog):
        row = tl.program_id(0) * rows_per_prog + i
        mask = cmask & (cols * 0 + row < M)  # (a scalar & block mask trips the interpreter)
        x = tl.load(x_ptr + row.to(tl.int64) * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(row_sum(x * x) / D + eps)
        xn = to_dtype(x * rstd, x_ptr.dtype.element_ty).to(tl.float32)
        y = to_dtype(w * xn, y_ptr.dtype.element_ty)
        tl.store(y_ptr + row.to(tl.int64) * stride_y + cols, y, mask=mask)
        tl.store(rstd_ptr + row, rstd, mask=row < M)


@triton.jit
def _rmsnorm_bwd(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_ptr, M, D, rows_per_prog, stride_dy, stride_x,
                 stride_dx, BLOCK_D: tl.constexpr):
    # dx = rstd * (g - xhat * mean(g * xhat)), g = dy * w; per-program partial dw = sum(dy * xn).
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    dw = tl.full((BLOCK_D,), 0.0, tl.float32)
    for i in range(rows_per_prog):
        row = tl.program_id(0) * rows_per_prog + i
        r64 = row.to(tl.int64)
        mask = cmask & (cols * 0 + row < M)  # (a scalar & block mask trips the interpreter)
        x = tl.load(x_ptr + r64 * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + r64 * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row, mask=row < M, other=0.0)
        xhat = x * rstd
        dw += dy * to_dtype(xhat, x_ptr.dtype.element_ty).to(tl.float32)
        g = dy * w
        dx = rstd * (g - xhat * (row_sum(g * xhat) / D))
        tl.store(dx_ptr + r64 * stride_dx + cols, to_dtype(dx, dx_ptr.dtype.element_ty), mask=mask)
    tl.store(dw_ptr + tl.program_id(0).to(tl.int64) * D + cols, dw, mask=cmask)


@triton.jit
def _swiglu_fwd(g_ptr, u_ptr, h_ptr, n, BLOCK: tl.constexpr):
    # h = silu(g) * u, rounded after silu and after the product as torch does.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dt = h_ptr.dtype.element_ty
    silu = to_dtype(g / (1.0 + tl.exp(-g)), dt).to(tl.float32)
    tl.store(h_ptr + offs, to_dtype(silu * u, dt), mask=mask)


@triton.jit
def _swiglu_bwd(dh_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, n, BLOCK: tl.constexpr):
    # dg = dh * u * s * (1 + g * (1 - s)), du = dh * g * s, s = sigmoid(g); fp32, rounded once.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dh = tl.load(dh_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = 1.0 / (1.0 + tl.exp(-g))
    tl.store(dg_ptr + offs, to_dtype(dh * u * s * (1.0 + g * (1.0 - s)), dg_ptr.dtype.element_ty), mask=mask)
    tl.store(du_ptr + offs, to_dtype(dh * g * s, du_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, y_ptr, n_rows, H, T, HALF,
                 sxb, sxh, sxt, scb, sct, ssb, sst, syb, syh, syt,
                 BACKWARD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    # Rotate-half RoPE on a tile of rows (b, h, t) of x (B, H, T, D) with cos/sin (B, T, D):
    #   y1 = x1 c1 - x2 s1, y2 = x2 c2 + x1 s2 (halves of D), each product and the sum rounded as torch.
    # Backward (the transpose): dx1 = dy1 c1 + dy2 s2, dx2 = dy2 c2 - dy1 s1, i.e. the forward with
    # s1 := -s2 and s2 := -s1.
    row = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)[None, :]
    mask = (row < n_rows)[:, None] & (cols < HALF)
    t, h, b = row % T, (row // T) % H, row // (T * H)
    xp = x_ptr + (b * sxb + h * sxh + t * sxt)[:, None] + cols
    cp = cos_ptr + (b * scb + t * sct)[:, None] + cols
    sp = sin_ptr + (b * ssb + t * sst)[:, None] + cols
    x1 = tl.load(xp, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(xp + HALF, mask=mask, other=0.0).to(tl.float32)
    c1 = tl.load(cp, mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(cp + HALF, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        s1 = -tl.load(sp + HALF, mask=mask, other=0.0).to(tl.float32)
        s2 = -tl.load(sp, mask=mask, other=0.0).to(tl.float32)
    else:
        s1 = tl.load(sp, mask=mask, other=0.0).to(tl.float32)
        s2 = tl.load(sp + HALF, mask=mask, other=0.0).to(tl.float32)
    dt = y_ptr.dtype.element_ty
    y1 = to_dtype(x1 * c1, dt).to(tl.float32) - to_dtype(x2 * s1, dt).to(tl.float32)
    y2 = to_dtype(x2 * c2, dt).to(tl.float32) + to_dtype(x1 * s2, dt).to(tl.float32)
    yp = y_ptr + (b * syb + h * syh + t * syt)[:, None] + cols
    tl.store(yp, to_dtype(y1, dt), mask=mask)
    tl.store(yp + HALF, to_dtype(y2, dt), mask=mask)

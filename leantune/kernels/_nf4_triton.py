"""Triton kernels for bitsandbytes' 4-bit layout (`reference/formats.md` §2): dequantization and a
matmul that dequantizes weight tiles in registers (QLoRA, Dettmers et al. 2023, arXiv:2305.14314).

Layout: the weight `[out, in]` is flattened row-major; byte `j` of `packed` holds element `2j` in its
high nibble and `2j + 1` in its low nibble; element `i` belongs to scale block `i // BS`. A value is
`code[q] * absmax[i // BS]` in fp32, then rounded to the output dtype, as bitsandbytes computes it.
With double quantization the block absmax is itself decoded in the kernel:
`absmax = code8[q8[b]] * nested_absmax[b // NESTED_BS] + offset` (fp32, multiply then add).

Launch these with `enable_fp_fusion=False` so the GPU does not contract that multiply-add into an
FMA (which rounds once instead of twice) and stays bit-identical to the torch reference.
Imported only through `leantune.kernels.load("nf4")`.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._common_triton import dot, interleave, to_dtype

INTERPRET = bool(triton.knobs.runtime.interpret)


@triton.jit
def _absmax(blk, mask, absmax_ptr, nested_ptr, code8_ptr, offset_ptr, DQ: tl.constexpr, NESTED_BS: tl.constexpr):
    """fp32 absmax of scale blocks `blk` (0 where masked)."""
    if DQ:
        q8 = tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.int32)
        a = tl.load(code8_ptr + q8) * tl.load(nested_ptr + blk // NESTED_BS, mask=mask, other=0.0)
        a = a + tl.load(offset_ptr)
        return tl.where(mask, a, 0.0)
    else:
        return tl.load(absmax_ptr + blk, mask=mask, other=0.0)


@triton.jit
def _dequant_kernel(packed_ptr, absmax_ptr, nested_ptr, code8_ptr, offset_ptr, code_ptr, out_ptr, n,
                    BS: tl.constexpr, DQ: tl.constexpr, NESTED_BS: tl.constexpr, BLOCK: tl.constexpr):
    # BLOCK bytes -> 2 * BLOCK elements per program; both nibbles of a byte share a scale block.
    pid = tl.program_id(0).to(tl.int64)
    byte = pid * BLOCK + tl.arange(0, BLOCK)
    mask = byte < (n + 1) // 2
    b = tl.load(packed_ptr + byte, mask=mask, other=0).to(tl.int32)
    a = _absmax((2 * byte) // BS, mask, absmax_ptr, nested_ptr, code8_ptr, offset_ptr, DQ, NESTED_BS)
    hi = tl.load(code_ptr + (b >> 4)) * a
    lo = tl.load(code_ptr + (b & 0xF)) * a
    v = to_dtype(interleave(hi, lo, BLOCK), out_ptr.dtype.element_ty)
    idx = pid * (2 * BLOCK) + tl.arange(0, 2 * BLOCK)
    tl.store(out_ptr + idx, v, mask=idx < n)


@triton.jit
def _weight_tile(idx, mask, packed_ptr, absmax_ptr, nested_ptr, code8_ptr, offset_ptr, code_ptr,
                 DTYPE: tl.constexpr, BS: tl.constexpr, DQ: tl.constexpr, NESTED_BS: tl.constexpr):
    """Dequantized weight elements at flat indices `idx` (any tile shape), 0 where masked."""
    b = tl.load(packed_ptr + idx // 2, mask=mask, other=0).to(tl.int32)
    q = (b >> ((1 - (idx & 1)) * 4).to(tl.int32)) & 0xF  # even index -> high nibble
    a = _absmax(idx // BS, mask, absmax_ptr, nested_ptr, code8_ptr, offset_ptr, DQ, NESTED_BS)
    return to_dtype(tl.load(code_ptr + q) * a, DTYPE)


@triton.jit
def _matmul_kernel(a_ptr, packed_ptr, absmax_ptr, nested_ptr, code8_ptr, offset_ptr, code_ptr, bias_ptr, c_ptr,
                   e_ptr, f_ptr, M, P, R, RANK, scaling, stride_am, stride_ar, stride_cm, stride_cp,
                   w_stride_r, w_stride_p, stride_em, stride_er, stride_fr, stride_fp,
                   BS: tl.constexpr, DQ: tl.constexpr, NESTED_BS: tl.constexpr, HAS_BIAS: tl.constexpr,
                   HAS_LORA: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, IDX64: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_RANK: tl.constexpr):
    """c[M, P] = a[M, R] @ Wq[R, P] (+ bias[P]) (+ scaling * e[M, RANK] @ f[RANK, P]),
    Wq[r, p] = dequant(W.flat[r * w_stride_r + p * w_stride_p]).

    Forward (`y = x W^T`, W `[N, K]`): R = K, P = N, strides (1, K). Backward to the input
    (`dx = dy W`): R = N, P = K, strides (K, 1). Weight tiles are dequantized in registers, in the
    dtype of `a` (what bitsandbytes would multiply by), and accumulated in fp32. The optional LoRA
    epilogue (Hu et al. 2021, arXiv:2106.09685) adds a rank-RANK product in fp32: forward
    e = x A^T, f = B^T; backward e = dy B, f = A.
    """
    pid_m, pid_p = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rp = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    if IDX64:  # offsets past 2**31 elements; int32 otherwise (half the registers for index tiles)
        rm = rm.to(tl.int64)
        rp = rp.to(tl.int64)
    rr = tl.arange(0, BLOCK_R)
    acc = tl.full((BLOCK_M, BLOCK_P), 0.0, tl.float32)
    for r0 in range(0, R, BLOCK_R):
        kr = r0 + rr
        a_mask = (rm < M)[:, None] & (kr < R)[None, :]
        a = tl.load(a_ptr + rm[:, None] * stride_am + kr[None, :] * stride_ar, mask=a_mask, other=0.0)
        w_idx = kr[:, None] * w_stride_r + rp[None, :] * w_stride_p  # (BLOCK_R, BLOCK_P)
        w_mask = (kr < R)[:, None] & (rp < P)[None, :]
        w = _weight_tile(w_idx, w_mask, packed_ptr, absmax_ptr, nested_ptr, code8_ptr, offset_ptr, code_ptr,
                         a_ptr.dtype.element_ty, BS, DQ, NESTED_BS)
        acc = dot(a, w, acc, UPCAST, PRECISION)
    if HAS_LORA:
        rk = tl.arange(0, BLOCK_RANK)
        e = tl.load(e_ptr + rm[:, None] * stride_em + rk[None, :] * stride_er,
                    mask=(rm < M)[:, None] & (rk < RANK)[None, :], other=0.0).to(tl.float32)
        f = tl.load(f_ptr + rk[:, None] * stride_fr + rp[None, :] * stride_fp,
                    mask=(rk < RANK)[:, None] & (rp < P)[None, :], other=0.0).to(tl.float32)
        acc += scaling * tl.dot(e, f, input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rp, mask=rp < P, other=0.0).to(tl.float32)[None, :]
    c_mask = (rm < M)[:, None] & (rp < P)[None, :]
    tl.store(c_ptr + rm[:, None] * stride_cm + rp[None, :] * stride_cp, to_dtype(acc, c_ptr.dtype.element_ty),
             mask=c_mask)

"""Triton device helpers shared by the kernel modules (imported only through `leantune.kernels.load`).

Work-arounds for triton 3.9's CPU interpreter, which the tests run under, that are exact on GPU:

- `to_dtype` rounds fp32 to bf16 by bit arithmetic (round to nearest even, NaN kept). The
  interpreter truncates on `x.to(tl.bfloat16)`; the GPU's `cvt.rn` gives the same bits as this.
- `dot` can upcast its operands to fp32: the interpreter multiplies bf16 tiles as raw uint16 bits.
  bf16 products are exact in fp32, so an fp32 `ieee` dot is the same math as a bf16 MMA with fp32
  accumulation (summation order aside).
- No kernel calls triton's own `@jit` library functions (`tl.sum`, `tl.zeros`, `tl.interleave`, ...): they are
  decorated when triton is imported, and when that happened before `TRITON_INTERPRET=1` was set
  (torch._dynamo, bitsandbytes and peft import triton) the interpreter cannot call them. `row_sum`
  and `interleave` are the same operations built from builtins.
"""
from __future__ import annotations

import triton
import triton.language as tl

INTERPRET = bool(triton.knobs.runtime.interpret)


@triton.jit
def to_dtype(v, DTYPE: tl.constexpr):
    """fp32 -> DTYPE, round to nearest even."""
    if DTYPE == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(v != v, 0x7FC0, rounded)  # NaN stays a (quiet) NaN
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(DTYPE)


@triton.jit
def dot(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b with fp32 accumulation."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif a.dtype == tl.float32:
        return tl.dot(a, b, acc, input_precision=PRECISION)
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def row_sum(x):
    """Sum of a 1-D tensor (what `tl.sum(x, 0)` does)."""
    return tl.reduce(x, 0, _add)


@triton.jit
def interleave(a, b, N: tl.constexpr):
    """[a0, b0, a1, b1, ...] for 1-D a, b of length N (what `tl.interleave` does)."""
    return tl.reshape(tl.join(a, b), (2 * N,))

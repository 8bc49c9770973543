"""NF4/FP4 dequantization on CUDA with Triton, bit-identical to `code[q] * absmax` (fp32, then cast).

The format is bitsandbytes' (`reference/formats.md` §2; QLoRA, arXiv:2305.14314): packed uint8
codes, two per byte with the first element in the high nibble, over the row-major flattened weight;
one fp32 absmax per block of `blocksize` (32 ... 4096) or, with double quantization, uint8 codes into
a 256-entry map scaled by one fp32 absmax per 256 blocks plus an offset.

    layout = Nf4Layout.from_state(quant_state)        # or Nf4Layout(absmax=..., code=..., shape=...)
    w = dequantize(packed, layout, torch.bfloat16)    # [out, in] on the GPU

`leantune.quant.dequantize_4bit` is the torch path (CPU and GPU); this is the fast one for CUDA.
Imports no triton until a kernel is launched.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import check_device, load

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_DEQUANT_BYTES = 1024  # bytes per program of the dequantization kernel (2048 elements)


@dataclass(frozen=True, eq=False)
class Nf4Layout:
    """What the kernels read to decode a 4-bit weight; built from a QuantState or from raw tensors."""

    absmax: torch.Tensor  # fp32 (n_blocks,), or uint8 codes with double quantization
    code: torch.Tensor  # fp32 (16,): NF4 or FP4 table, index = 4-bit code
    shape: tuple  # the unpacked weight's shape, e.g. (out, in)
    blocksize: int = 64
    dtype: torch.dtype = torch.float32  # the original dtype: dequantize's default output dtype
    nested_absmax: torch.Tensor | None = None  # fp32 (ceil(n_blocks / nested_blocksize),)
    nested_code: torch.Tensor | None = None  # fp32 (256,)
    offset: torch.Tensor | None = None  # fp32 scalar
    nested_blocksize: int = 256

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        if self.blocksize not in BLOCKSIZES:
            raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {self.blocksize}")
        n_blocks = -(-self.numel // self.blocksize)
        if self.absmax.numel() != n_blocks:
            raise ValueError(f"absmax has {self.absmax.numel()} entries; a {self.shape} weight in blocks of "
                             f"{self.blocksize} needs {n_blocks}")
        nested = (self.nested_absmax, self.nested_code, self.offset)
        if any(t is None for t in nested) != all(t is None for t in nested):
            raise ValueError("double quantization needs nested_absmax, nested_code and offset together")
        if self.double_quant and self.absmax.dtype != torch.uint8:
            raise ValueError(f"double-quantized absmax must be uint8 codes, got {self.absmax.dtype}")
        if self.nested_blocksize & (self.nested_blocksize - 1):
            raise ValueError(f"nested_blocksize must be a power of two, got {self.nested_blocksize}")

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @classmethod
    def from_state(cls, state) -> "Nf4Layout":
        """From a `leantune.quant.QuantState` (or anything with bitsandbytes' QuantState fields)."""
        if isinstance(state, cls):
            return state
        s2 = getattr(state, "state2", None)
        kw = {}
        if s2 is not None:
            kw = dict(nested_absmax=s2.absmax, nested_code=s2.code, offset=state.offset,
                      nested_blocksize=s2.blocksize)
        return cls(absmax=state.absmax, code=state.code, shape=tuple(state.shape), blocksize=state.blocksize,
                   dtype=state.dtype, **kw)

    def kernel_args(self, device) -> tuple:
        """(absmax, nested_absmax, code8, offset, code) on `device`; unused slots repeat absmax."""
        code = self.code.to(device=device, dtype=torch.float32).contiguous()
        absmax = self.absmax.to(device).contiguous()
        if not self.double_quant:
            return absmax.float(), absmax, absmax, absmax, code
        offset = torch.as_tensor(self.offset, dtype=torch.float32).to(device).reshape(1)
        return (absmax, self.nested_absmax.to(device=device, dtype=torch.float32).contiguous(),
                self.nested_code.to(device=device, dtype=torch.float32).contiguous(), offset, code)


def packed_bytes(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """The packed codes as a flat contiguous uint8 tensor of (numel + 1) // 2 bytes."""
    p = packed.reshape(-1)
    if p.dtype != torch.uint8:
        p = p.view(torch.uint8)  # bnb's quant_storage only changes the view of the bytes
    if p.numel() != (numel + 1) // 2:
        raise ValueError(f"packed tensor has {p.numel()} bytes; {numel} 4-bit values need {(numel + 1) // 2}")
    return p.contiguous()


def dequantize(packed: torch.Tensor, state, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The 4-bit weight decoded to `out_dtype` (default: the layout's original dtype), shaped `state.shape`.

    `state` is an `Nf4Layout` or a `QuantState`. Bit-identical to `code[q] * absmax` in fp32, then cast.
    """
    layout = Nf4Layout.from_state(state)
    out_dtype = out_dtype or layout.dtype
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"out_dtype must be one of {OUT_DTYPES}, got {out_dtype}")
    check_device("nf4.dequantize", packed, layout.absmax)
    p = packed_bytes(packed, layout.numel)
    out = torch.empty(layout.shape, dtype=out_dtype, device=p.device)
    if layout.numel == 0:
        return out
    k = load("nf4")
    grid = (-(-p.numel() // _DEQUANT_BYTES),)
    k._dequant_kernel[grid](p, *layout.kernel_args(p.device), out, layout.numel, BS=layout.blocksize,
                            DQ=layout.double_quant, NESTED_BS=layout.nested_blocksize, BLOCK=_DEQUANT_BYTES,
                            enable_fp_fusion=False)
    return out

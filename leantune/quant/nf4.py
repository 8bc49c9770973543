"""Blockwise 4-bit quantization (NF4 / FP4) with double quantization, bit-identical to bitsandbytes.

QLoRA (Dettmers et al. 2023, arXiv:2305.14314): NormalFloat4 codes, one fp32 absmax per block, and
"double quantization" of those absmax values to 8 bits. Layout and arithmetic follow bitsandbytes
0.50.2 on CPU (`reference/formats.md` §2, `methods-core.md` §2), the test oracle:

- 4-bit (`backends/default/ops.py` `quantize_4bit`): the tensor is flattened row-major and cut into
  blocks (the last may be partial); full blocks are scaled by `x * (1 / absmax)`, the partial one by
  `x / absmax`; values are clamped to [-1, 1] and bucketized on the midpoints of the sorted codebook
  (a tie goes to the lower index); two codes per byte, the even element in the high nibble; an odd
  count is padded with the code of 0.
- Double quantization (`functional.quantize_4bit(compress_statistics=True)`): `offset = mean(absmax)`,
  then `absmax - offset` is quantized to 8 bits with the signed dynamic map in blocks of 256 by bnb's
  CPU kernel (`csrc/cpu_ops.cpp` `quantize_cpu_impl`), which looks codes up in a 65536-bin table
  rather than searching for the nearest code; this module ports that table so codes match exactly.
  (bnb's CUDA kernel picks the exact nearest 8-bit code instead; the two differ in a few codes by one
  step, and either decodes the same way.)
- Dequantization: `code[q] * absmax` in fp32, then cast to the requested dtype.

Everything is vectorized torch and runs on any device.
"""
from __future__ import annotations

import math

import torch

from .codes import QUANT_TYPES, codebook, dynamic_map
from .state import BLOCKSIZES, NESTED_BLOCKSIZE, NestedState, QuantState

# `torch.argsort(FP4 table)` as bnb computes it: sorted position -> code. Hard-coded because the two
# zeros tie: sorted slot 7 (x in (-0.0026, 0]) is code 0 and slot 8 (x in (0, 0.0026]) is code 8.
FP4_ORDER = (11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3)

_LUT_SIZE = 65536  # bins of bnb's CPU 8-bit quantization table over [-1, 1]
_CHUNK = 1 << 22  # elements quantized at a time: bounds the fp32 temporaries for big weights
_cache: dict = {}


def _cached(name: str, device, make):
    key = (name, str(torch.device(device) if device is not None else "cpu"))
    if key not in _cache:
        _cache[key] = make()
    return _cache[key]


def _bounds_and_order(quant_type: str, device):
    """Midpoints between the sorted codes, and the sorted-position -> code map (None for NF4)."""
    def make():
        code = codebook(quant_type, device)
        if quant_type == "nf4":
            return (code[:-1] + code[1:]) / 2, None
        order = torch.tensor(FP4_ORDER, dtype=torch.long, device=device)
        return (code[order[:-1]] + code[order[1:]]) / 2, order.to(torch.uint8)
    return _cached("bounds-" + quant_type, device, make)


def _lut8(device) -> torch.Tensor:
    """bnb's CPU quantization table: bin i of 65536 over [-1, 1] -> index of the first midpoint >= its value."""
    def make():
        code = dynamic_map(device)
        mid = 0.5 * (code[:-1] + code[1:])
        grid = -1.0 + (2.0 * torch.arange(_LUT_SIZE, dtype=torch.float32, device=device)) / (_LUT_SIZE - 1)
        return torch.searchsorted(mid, grid, right=False).to(torch.uint8)
    return _cached("lut8", device, make)


# ---------------------------------------------------------------------------------------------
# 4-bit


def _check(blocksize: int, quant_type: str, dtype: torch.dtype) -> None:
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize!r}")
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"4-bit quantization takes float32, bfloat16 or float16 tensors, got {dtype}")


def _codes_4bit(flat: torch.Tensor, blocksize: int, quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes uint8 (n,), absmax fp32 (n_blocks,)) of a flat fp32 tensor, bnb's arithmetic exactly."""
    n = flat.numel()
    rem = n % blocksize
    full = n - rem
    blocks = flat[:full].view(-1, blocksize)  # (B, bs)
    absmax = blocks.abs().max(dim=-1)[0]
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1).reshape(-1)
    if rem:
        am = flat[full:].abs().max().clamp(min=1e-38)  # bnb stores the clamped value for the last block
        absmax = torch.cat([absmax, am.unsqueeze(0)])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / am, -1, 1)])
    return _nearest_codes(scaled, quant_type), absmax


def _exact_codes(x: torch.Tensor, quant_type: str) -> torch.Tensor:
    """The 4-bit code of each scaled value (uint8), by comparing with every midpoint."""
    bounds, order = _bounds_and_order(quant_type, x.device)
    q = _bucketize(x, _as_floats(bounds, quant_type))
    return q if order is None else order.index_select(0, q.int())


def _prefix_lut(quant_type: str, device) -> torch.Tensor:
    """uint8 (65536,): for each 16-bit prefix of an fp32 bit pattern (sign, exponent, 7 mantissa bits), the
    code of every float with that prefix, or 255 where they straddle a midpoint (at most one prefix per
    midpoint, plus the -inf..NaN one). Floats sharing a prefix form an interval and the code is monotone
    in the value, so the two ends decide."""
    def make():
        u = torch.arange(65536, dtype=torch.int32, device=device)
        lo = torch.where(u < 32768, u, u - 65536) * 65536  # (65536,) int32 patterns with the low 16 bits 0
        a = _exact_codes(lo.view(torch.float32), quant_type)
        b = _exact_codes((lo + 65535).view(torch.float32), quant_type)
        return torch.where(a == b, a, 255).to(torch.uint8)
    return _cached("prefix-lut-" + quant_type, device, make)


def _nearest_codes(x: torch.Tensor, quant_type: str) -> torch.Tensor:
    """`_exact_codes(x)` in ~4 passes instead of 30: a table lookup on the top 16 bits of each fp32 value,
    then the exact comparison only for the few values whose prefix straddles a midpoint."""
    key = x.contiguous().view(torch.int32).bitwise_right_shift(16).bitwise_and_(0xFFFF)
    q = _prefix_lut(quant_type, x.device).index_select(0, key)
    del key
    amb = (q == 255).nonzero().squeeze(1)
    if amb.numel():
        q[amb] = _exact_codes(x[amb], quant_type)
    return q


def _as_floats(bounds: torch.Tensor, quant_type: str) -> list[float]:
    return _cached("bounds-list-" + quant_type, "cpu", lambda: bounds.cpu().tolist())


def _bucketize(x: torch.Tensor, bounds: list[float]) -> torch.Tensor:
    """`torch.bucketize(x, bounds, right=False)` as uint8 (NaN -> len(bounds)), ~2x faster for 15 bounds:
    the index is the number of bounds < x, i.e. len(bounds) - #(x <= bound), so a tie goes to the lower code."""
    n_le = torch.zeros_like(x, dtype=torch.uint8)
    le = torch.empty_like(x, dtype=torch.bool)
    for b in bounds:  # fp32 values, compared in fp32
        torch.le(x, b, out=le)
        n_le += le.view(torch.uint8)  # a bool tensor added as is would be converted first
    return len(bounds) - n_le


def _pad_code(quant_type: str, device) -> int:
    return int(_codes_4bit(torch.zeros(2, device=device), 2, quant_type)[0][0])  # the code of x = 0


def quantize_4bit(w: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4",
                  double_quant: bool = True) -> tuple[torch.Tensor, QuantState]:
    """Quantize `w` blockwise to 4 bits: (packed uint8 (ceil(n/2), 1), QuantState).

    Equals `bitsandbytes.functional.quantize_4bit(w, blocksize=..., quant_type=...,
    compress_statistics=double_quant)` bit for bit (codes, absmax, nested state) on CPU.
    """
    _check(blocksize, quant_type, w.dtype)
    if w.numel() == 0:
        raise ValueError("cannot quantize an empty tensor")
    flat = w.detach().reshape(-1)
    n = flat.numel()
    step = max(blocksize, _CHUNK // blocksize * blocksize)  # whole blocks per chunk (and even)
    codes, absmaxes = [], []
    for start in range(0, n, step):
        q, a = _codes_4bit(flat[start:start + step].float(), blocksize, quant_type)
        codes.append(q)
        absmaxes.append(a)
    q = torch.cat(codes) if len(codes) > 1 else codes[0]
    absmax = torch.cat(absmaxes) if len(absmaxes) > 1 else absmaxes[0]
    if n % 2:
        q = torch.cat([q, q.new_full((1,), _pad_code(quant_type, q.device))])
    packed = ((q[::2] << 4) | q[1::2]).unsqueeze(1)  # (ceil(n/2), 1), even element in the high nibble
    state = QuantState(absmax=absmax, shape=w.shape, dtype=w.dtype, blocksize=blocksize,
                       quant_type=quant_type, code=codebook(quant_type, w.device))
    if double_quant:
        state = compress_absmax(state)
    return packed, state


def compress_absmax(state: QuantState) -> QuantState:
    """Double quantization: `absmax - mean` to 8-bit codes in blocks of 256 (bnb CPU arithmetic)."""
    if state.nested:
        return state
    offset = state.absmax.mean()
    q8, absmax2 = quantize_blockwise_8bit(state.absmax - offset, NESTED_BLOCKSIZE)
    nested = NestedState(absmax=absmax2, code=dynamic_map(q8.device), blocksize=NESTED_BLOCKSIZE)
    return QuantState(absmax=q8, shape=state.shape, dtype=state.dtype, blocksize=state.blocksize,
                      quant_type=state.quant_type, code=state.code, offset=offset, state2=nested)


def block_absmax(state: QuantState) -> torch.Tensor:
    """The fp32 per-block absmax, decoding the 8-bit codes when double-quantized."""
    if not state.nested:
        return state.absmax.float()
    s2 = state.state2
    return dequantize_blockwise_8bit(state.absmax, s2.absmax, s2.code, s2.blocksize).add_(state.offset)


def unpack_codes(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Packed bytes -> n codes (int64), high nibble first."""
    p = packed.reshape(-1)
    if p.dtype != torch.uint8:
        p = p.view(torch.uint8)  # quant_storage other than uint8 only changes the view
    if p.numel() != (n + 1) // 2:
        raise ValueError(f"packed tensor has {p.numel()} bytes, a {n}-element tensor needs {(n + 1) // 2}")
    return torch.stack((p >> 4, p & 0xF), dim=-1).reshape(-1)[:n].long()


def _pair_table(code: torch.Tensor) -> torch.Tensor:
    """(256,) int64 whose 8 bytes are the two fp32 values a packed byte decodes to, high nibble first: one
    8-byte gather per byte decodes two weights (a (256, 2) float table gathers rows ~2x slower)."""
    key = ("pairs", str(code.device), tuple(code.tolist()))
    if key not in _cache:
        byte = torch.arange(256, device=code.device)
        pairs = torch.stack((code[byte >> 4], code[byte & 0xF]), dim=1).float().contiguous()  # (256, 2) fp32
        _cache[key] = pairs.view(torch.int64).reshape(256)
    return _cache[key]


def dequantize_4bit(packed: torch.Tensor, state: QuantState, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`code[q] * absmax` in fp32, cast to `dtype` (default: the original dtype `state.dtype`), shaped
    `state.shape`. Equals `bitsandbytes.functional.dequantize_4bit` for dtype=None.

    Two passes over the output: one 8-byte gather per packed byte (both of its weights), then the
    blockwise scale in place. On these CPUs that is at least as fast as bnb's C++ kernel (a QLoRA step
    on SmolLM2-135M spends ~0.16 s in it at one thread vs bnb's ~0.44 s); doing it in cache-sized
    chunks was slower (Python overhead per chunk)."""
    n = state.numel
    p = packed.reshape(-1)
    if p.dtype != torch.uint8:
        p = p.view(torch.uint8)
    if p.numel() != (n + 1) // 2:
        raise ValueError(f"packed tensor has {p.numel()} bytes, a {tuple(state.shape)} tensor needs {(n + 1) // 2}")
    table = _pair_table(state.code.to(packed.device))
    absmax = block_absmax(state).to(packed.device)
    out = torch.empty(2 * p.numel(), dtype=torch.float32, device=packed.device)  # even length: int64 view
    torch.index_select(table, 0, p.int(), out=out.view(torch.int64))
    _scale_blocks(out[:n], absmax, state.blocksize)
    return out[:n].view(state.shape).to(dtype or state.dtype)


def _scale_blocks(vals: torch.Tensor, absmax: torch.Tensor, bs: int) -> None:
    """vals (m,) *= the absmax of its block of `bs`, in place; the last block may be partial."""
    m = vals.numel()
    full = m - m % bs
    if full:
        vals[:full].view(-1, bs).mul_(absmax[:full // bs].view(-1, 1))
    if full < m:
        vals[full:].mul_(absmax[full // bs])


# ---------------------------------------------------------------------------------------------
# 8-bit blockwise (the nested absmax)


def quantize_blockwise_8bit(x: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """bnb's CPU `quantize_blockwise` with the dynamic map: (uint8 codes, fp32 absmax per block).

    Per block: absmax ignores NaN; an all-zero block gets code 0; else `v = clamp(x * (1/absmax), -1, 1)`
    and the code is `lut[int((v + 1) * 0.5 * 65535 + 0.5)]`, each step rounded in fp32.
    """
    flat = x.detach().reshape(-1).float()
    n = flat.numel()
    n_blocks = -(-n // blocksize)
    pad = n_blocks * blocksize - n
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(n_blocks, blocksize)  # zeros do not change absmax
    absmax = blocks.abs().nan_to_num(nan=0.0).amax(dim=1)
    inv = 1.0 / absmax  # inf for an all-zero block; its codes are overwritten below
    v = blocks * inv.view(-1, 1)
    v = torch.where(v.isnan(), -1.0, v).clamp(-1.0, 1.0)  # _mm256_max_ps(NaN, -1) gives -1
    t = (((v + 1.0) * 0.5) * float(_LUT_SIZE - 1)) + 0.5
    q = _lut8(flat.device)[t.to(torch.int32).long()]
    q = torch.where((absmax == 0).view(-1, 1), 0, q).to(torch.uint8)
    return q.reshape(-1)[:n].view(x.shape), absmax


def dequantize_blockwise_8bit(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                              blocksize: int = NESTED_BLOCKSIZE) -> torch.Tensor:
    """`code[q] * absmax[block]` in fp32, flat."""
    vals = code.to(q.device).float().index_select(0, q.reshape(-1).int())
    _scale_blocks(vals, absmax.to(q.device).float(), blocksize)
    return vals


def bits_per_param(blocksize: int = 64, double_quant: bool = True) -> float:
    """Storage cost per weight: 4 + 32/bs (4.5 at 64), or 4 + 8/bs + 32/(bs*256) with DQ (4.127)."""
    if double_quant:
        return 4 + 8 / blocksize + 32 / (blocksize * NESTED_BLOCKSIZE)
    return 4 + 32 / blocksize


def quantized_nbytes(shape, blocksize: int = 64, double_quant: bool = True) -> int:
    """Bytes of packed codes + scales for a tensor of `shape` (excluding the 16/256-entry tables)."""
    n = math.prod(shape)
    n_blocks = -(-n // blocksize)
    if double_quant:
        return (n + 1) // 2 + n_blocks + 4 * -(-n_blocks // NESTED_BLOCKSIZE) + 4
    return (n + 1) // 2 + 4 * n_blocks

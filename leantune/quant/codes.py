"""The code tables of bitsandbytes' quantization: the 4-bit NF4 / FP4 codebooks and the signed 8-bit
dynamic map of double quantization (`reference/formats.md` §2). `state.py` fills a QuantState's default
code from them and `nf4.py` quantizes with them; both import this module, which imports neither.
"""
from __future__ import annotations

import torch

QUANT_TYPES = ("nf4", "fp4")

# bnb `get_4bit_type("nf4")`: index = 4-bit code (regenerating it in fp32 is off by ~2e-7, so hard-code)
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
# bnb `get_4bit_type("fp4")`: [0, .0625, 8, 12, 4, 6, 2, 3] and negatives (bit 3 = sign) / 12, in fp32.
# bnb builds the table from the Python int `-0`, so code 8 is +0.0 in the stored quant_map.
FP4_CODE = (
    0.0, 0.0052083334885537624, 0.6666666865348816, 1.0, 0.3333333432674408, 0.5, 0.1666666716337204, 0.25,
    0.0, -0.0052083334885537624, -0.6666666865348816, -1.0, -0.3333333432674408, -0.5, -0.1666666716337204, -0.25,
)


def codebook(quant_type: str = "nf4", device=None) -> torch.Tensor:
    """The 16-entry fp32 codebook (a fresh tensor), index = 4-bit code."""
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    return torch.tensor(NF4_CODE if quant_type == "nf4" else FP4_CODE, dtype=torch.float32, device=device)


def dynamic_map(device=None) -> torch.Tensor:
    """bnb's `create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)`, ported op for op.

    For i = 0..6: the midpoints of `linspace(0.1, 1, 2**i + 1)` times 10**(i - 6), with both signs;
    plus 0 and 1.0; sorted. 256 values in [-0.99296875, 1].
    """
    data: list[float] = []
    for i in range(7):
        bounds = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (-6 + i)) * means).tolist()
        data += (-(10 ** (-6 + i)) * means).tolist()
    data += [0, 1.0]
    data.sort()
    return torch.tensor(data, dtype=torch.float32, device=device)

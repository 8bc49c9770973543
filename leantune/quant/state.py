"""`QuantState`: what it takes to dequantize a 4-bit tensor, and its serialized form.

Mirrors bitsandbytes' `QuantState` (bnb 0.50.2 `functional.py`) and its state-dict keys, so checkpoints
move both ways (`reference/formats.md` §2.7). For a 4-bit linear `X` the keys are

    X.weight                                  packed codes, uint8 (ceil(n/2), 1)
    X.weight.absmax                           fp32 per-block scales, or uint8 codes when double-quantized
    X.weight.quant_map                        the 16-entry codebook, fp32
    X.weight.nested_absmax                    DQ only: fp32, one per 256 blocks
    X.weight.nested_quant_map                 DQ only: the 256-entry signed dynamic map, fp32
    X.weight.quant_state.bitsandbytes__nf4    UTF-8 JSON (quant_type, blocksize, dtype, shape, nested_*)

`as_dict()` gives the keys after `X.weight.`; `from_dict()` reads them back (with or without a prefix).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace

import torch

from .codes import QUANT_TYPES, codebook, dynamic_map

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256
PACKED_KEY = "quant_state.bitsandbytes__"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


_STATE_SUFFIXES = ("weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map")


def is_quant_state_key(key: str) -> bool:
    """True for a serialized 4-bit quant-state key (`X.weight.absmax`, `X.weight.quant_state.bitsandbytes__nf4`...)."""
    return key.endswith(_STATE_SUFFIXES) or ".weight." + PACKED_KEY in key or key.startswith("weight." + PACKED_KEY)


def dtype_name(dtype: torch.dtype) -> str:
    """'float32' for torch.float32: bnb writes `str(dtype).strip("torch.")`."""
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str, what: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"{what} {name!r} is not one of {sorted(_DTYPES)}")
    return _DTYPES[name]


@dataclass
class NestedState:
    """Double quantization of the per-block absmax: 8-bit codes over blocks of 256 constants."""

    absmax: torch.Tensor  # fp32 (ceil(n_blocks / 256),)
    code: torch.Tensor  # fp32 (256,), bnb's signed dynamic map
    blocksize: int = NESTED_BLOCKSIZE
    dtype: torch.dtype = torch.float32


@dataclass
class QuantState:
    """Scales and metadata of one 4-bit tensor (bitsandbytes' layout).

    `absmax` is fp32 (n_blocks,) or, with double quantization, uint8 codes dequantized through
    `state2` and shifted by `offset` (the mean of the original absmax).
    """

    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype  # dtype of the original (unquantized) tensor; dequantization returns it
    blocksize: int = 64
    quant_type: str = "nf4"
    code: torch.Tensor | None = None  # (16,) fp32 codebook; None -> the table of quant_type
    offset: torch.Tensor | None = None  # fp32 scalar, double quantization only
    state2: NestedState | None = None

    def __post_init__(self):
        if self.quant_type not in QUANT_TYPES:
            raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {self.quant_type!r}")
        if self.blocksize not in BLOCKSIZES:
            raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {self.blocksize!r}")
        if self.dtype not in _DTYPES.values():
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype}")
        self.shape = torch.Size(self.shape)
        if self.code is None:
            self.code = codebook(self.quant_type, self.absmax.device)
        if (self.state2 is None) != (self.offset is None):
            raise ValueError("a double-quantized QuantState needs both offset and state2")
        n_blocks = -(-self.shape.numel() // self.blocksize)
        if self.absmax.numel() != n_blocks:
            raise ValueError(
                f"absmax has {self.absmax.numel()} entries but a {tuple(self.shape)} tensor in blocks of "
                f"{self.blocksize} has {n_blocks}"
            )

    @property
    def nested(self) -> bool:
        return self.state2 is not None

    @property
    def numel(self) -> int:
        return self.shape.numel()

    def to(self, device) -> QuantState:
        """A copy with every tensor on `device` (dtypes never change)."""
        s2 = self.state2
        if s2 is not None:
            s2 = replace(s2, absmax=s2.absmax.to(device), code=s2.code.to(device))
        offset = None if self.offset is None else self.offset.to(device)
        return replace(self, absmax=self.absmax.to(device), code=self.code.to(device), offset=offset, state2=s2)

    def nbytes(self) -> int:
        """Bytes of the scales and tables (not the packed codes)."""
        ts = [self.absmax, self.code] + ([self.state2.absmax, self.state2.code] if self.nested else [])
        return sum(t.numel() * t.element_size() for t in ts)

    # -----------------------------------------------------------------------------------------
    # serialization

    def as_dict(self, packed: bool = True) -> dict:
        """bitsandbytes' serialized items: tensors plus, when packed, one JSON uint8 tensor."""
        d = {"quant_type": self.quant_type, "absmax": self.absmax, "blocksize": self.blocksize,
             "quant_map": self.code, "dtype": dtype_name(self.dtype), "shape": tuple(self.shape)}
        if self.nested:
            d.update({"nested_absmax": self.state2.absmax, "nested_blocksize": self.state2.blocksize,
                      "nested_quant_map": self.state2.code.clone(), "nested_dtype": dtype_name(self.state2.dtype),
                      "nested_offset": float(self.offset.item())})
        if not packed:
            return d
        tensors = {k: v for k, v in d.items() if isinstance(v, torch.Tensor)}
        meta = {k: v for k, v in d.items() if not isinstance(v, torch.Tensor)}
        tensors[PACKED_KEY + self.quant_type] = _json_tensor(meta)
        return tensors

    @classmethod
    def from_dict(cls, items: dict, device=None) -> QuantState:
        """Read `as_dict()` output (packed or not); keys may carry a prefix such as `q_proj.weight.`."""
        flat = {}
        for key, value in items.items():
            if PACKED_KEY in key:
                if not key.split(".")[-1].removeprefix("bitsandbytes__") in QUANT_TYPES:
                    raise ValueError(f"unknown 4-bit quant state key {key!r} (expected bitsandbytes__nf4/fp4)")
                flat.update(_json_from_tensor(value, key))
            else:
                flat[key.split(".")[-1]] = value
        missing = [k for k in ("quant_type", "absmax", "blocksize", "dtype", "shape") if k not in flat]
        if missing:
            raise ValueError(f"4-bit quant state lacks {missing}: expected bitsandbytes' keys "
                             f"(absmax, quant_map, {PACKED_KEY}nf4 ...)")
        dev = device if device is not None else flat["absmax"].device
        state2 = offset = None
        if "nested_absmax" in flat:
            state2 = NestedState(absmax=flat["nested_absmax"].to(dev, torch.float32),
                                 code=_nested_code(flat, dev), blocksize=int(flat["nested_blocksize"]),
                                 dtype=parse_dtype(flat.get("nested_dtype", "float32"), "nested_dtype"))
            offset = torch.tensor(float(flat["nested_offset"]), dtype=torch.float32, device=dev)
        code = flat.get("quant_map")
        return cls(absmax=flat["absmax"].to(dev), shape=torch.Size(flat["shape"]),
                   dtype=parse_dtype(flat["dtype"], "dtype"), blocksize=int(flat["blocksize"]),
                   quant_type=flat["quant_type"], code=None if code is None else code.to(dev, torch.float32),
                   offset=offset, state2=state2)


def _nested_code(flat: dict, device) -> torch.Tensor:
    if "nested_quant_map" in flat:
        return flat["nested_quant_map"].to(device, torch.float32)
    return dynamic_map(device)


def _json_tensor(meta: dict) -> torch.Tensor:
    raw = json.dumps(meta).encode("utf-8")  # default separators, as bnb's pack_dict_to_tensor
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).clone()


def _json_from_tensor(t: torch.Tensor, key: str) -> dict:
    try:
        return json.loads(bytes(t.detach().cpu().to(torch.uint8).numpy().tobytes()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{key}: not the UTF-8 JSON bitsandbytes writes ({e})") from None

"""Reading a Hugging Face folder's safetensors, single or sharded with an index, one tensor at a time.

Safetensors files are read tensor by tensor with plain reads (`SafetensorsFile`, format:
https://github.com/huggingface/safetensors#format), not memory-mapped: each tensor is owned memory,
so a mapped file's pages never sit in the process's RSS next to the model, and a model never depends
on a file that may be overwritten while it trains. Pickled `.bin`/`.pt` weights are refused, never unpickled.
"""
from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import torch

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64, "BOOL": torch.bool,
              "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


class SafetensorsFile:
    """One `.safetensors` file: its header now, each tensor on `get(key)` as an owned CPU tensor."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if not 0 < n <= size - 8:
                raise ValueError(f"{self.path} is not a safetensors file (bad header length); "
                                 "re-save or re-download it")
            try:
                entries = json.loads(f.read(n))
            except ValueError:
                entries = None
        if not isinstance(entries, dict):
            raise ValueError(  # noqa: TRY004 - a corrupt file, not a caller's type error
                f"{self.path}: the safetensors header is not a JSON object; the file is corrupt")
        entries.pop("__metadata__", None)
        self.entries, self.data_start, self.size = entries, 8 + n, size

    def keys(self) -> list[str]:
        return list(self.entries)

    def get(self, key: str) -> torch.Tensor:
        e = self.entries[key]
        dtype = _ST_DTYPES.get(e.get("dtype"))
        begin, end = e["data_offsets"]
        if dtype is None or self.data_start + end > self.size or end - begin != dtype.itemsize * math.prod(e["shape"]):
            raise ValueError(f"{self.path}: tensor {key} ({e.get('dtype')}, {e.get('shape')}) is unreadable "
                             "(unknown dtype or truncated file); re-save or re-download it")
        buf = torch.empty(end - begin, dtype=torch.uint8)
        with open(self.path, "rb") as f:
            f.seek(self.data_start + begin)
            f.readinto(memoryview(buf.numpy()))
        return buf.view(dtype).reshape(e["shape"])


def safetensors_files(path: Path) -> dict[str, SafetensorsFile]:
    """{tensor name: the file holding it} of an HF folder (single `model.safetensors` or sharded with an index)."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        wmap = json.loads(index.read_text())["weight_map"]
        files = {}
        for s in sorted(set(wmap.values())):
            if not (path / s).exists():
                raise FileNotFoundError(f"{index} names shard {s}, which is missing from {path}")
            files[s] = SafetensorsFile(path / s)
        return {k: files[s] for k, s in wmap.items()}
    single = path / "model.safetensors"
    if single.exists():
        f = SafetensorsFile(single)
        return dict.fromkeys(f.keys(), f)
    if any(path.glob("*.bin")) or any(path.glob("*.pt")):
        raise ValueError(f"{path} holds pickled weights (.bin/.pt); leantune only loads safetensors. "
                         "Convert with transformers: model.save_pretrained(dir, safe_serialization=True)")
    raise FileNotFoundError(f"{path} has no model.safetensors or model.safetensors.index.json")


class FolderTensors:
    """The tensors of an HF folder under their names, read one at a time by `take` (shards opened as needed)."""

    def __init__(self, path: Path):
        self.files = safetensors_files(path)

    def keys(self) -> list[str]:
        return list(self.files)

    def take(self, key: str) -> torch.Tensor:
        return self.files[key].get(key)


def read_hf_weights(path: Path) -> dict[str, torch.Tensor]:
    src = FolderTensors(path)
    return {k: src.take(k) for k in src.keys()}  # noqa: SIM118 - not a dict

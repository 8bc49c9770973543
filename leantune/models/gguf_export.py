"""GGUF writer: a leantune model (+ tokenizer) -> a `.gguf` file llama.cpp and Ollama load; a LoRA adapter ->
llama.cpp's LoRA GGUF.

The layout is what llama.cpp's `convert_hf_to_gguf.py` / `convert_lora_to_gguf.py` write
(https://github.com/ggml-org/llama.cpp): `general.*` and `{arch}.*` hyper-parameters, `tokenizer.ggml.*`,
tensors under llama.cpp's names (the reader's table in `gguf.py`, inverted), q/k rows of `llama` files
interleaved for llama.cpp's RoPE (the inverse of the reader's `_unpermute_rope`), norms and other 1-D
tensors in F32. Families: llama, mistral (as `llama`), qwen2, qwen3, gemma2, gemma3, phi3 (fused attn_qkv /
ffn_up, longrope as rope_factors_long/short), mixtral (`llama` with expert keys) and qwen3moe (experts stacked
per weight as 3-D ffn_{gate,up,down}_exps, the router ffn_gate_inp in F32). Blocks are made by the `gguf` package's own quantizers (`gguf.quants.quantize`), so a
tensor's bytes are exactly what the reference quantizer gives. Which ggml types gguf 0.19 can make in
Python: F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 (and TQ1_0/TQ2_0/MXFP4), not the K-quants (Q4_K, Q6_K
raise NotImplementedError), so Q4_K_M is made by llama.cpp's own `llama-quantize` (`export_gguf`).

Everything that can fail (names, shapes, quantization) runs before the file is opened; the file is
written under a temporary name in the output folder and renamed when complete.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .config import ModelConfig
from .gguf import (_GEMMA_LAYER_NAMES, _GEMMA_SWA_EVERY, _LAYER_NAMES, _PHI3_NAMES, _TOP_NAMES, GEMMA3_LOCAL_THETA,
                   gemma_attn_scalar, gemma_layer_types, llama3_inv_freq_factors)
from .tokenizer import Tokenizer

QUANTS = ("f16", "bf16", "q8_0", "q4_0", "q4_k_m")
LORA_QUANTS = ("f16", "bf16", "q8_0")  # what convert_lora_to_gguf.py offers (besides f32)
LLAMA_QUANTIZE_ENV = "LLAMA_QUANTIZE"  # path of llama.cpp's llama-quantize, when not on PATH

# llama_token_type
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


# ================================================================================================
# per-architecture table: a family added to leantune adds one entry here
# ================================================================================================
def _common_hparams(cfg: ModelConfig) -> dict:
    """The `{arch}.*` keys every Llama-like family writes (convert_hf_to_gguf's TextModel/LlamaModel)."""
    hp = {
        "block_count": cfg.num_layers,
        "context_length": cfg.max_position_embeddings,
        "embedding_length": cfg.hidden_size,
        "feed_forward_length": cfg.intermediate_size,
        "attention.head_count": cfg.num_heads,
        "attention.head_count_kv": cfg.num_kv_heads,
        "rope.freq_base": float(cfg.rope_theta),
        "attention.layer_norm_rms_epsilon": float(cfg.rms_norm_eps),
        "vocab_size": cfg.vocab_size,
    }
    if cfg.head_dim != cfg.hidden_size // cfg.num_heads:  # Qwen3 and others: head_dim is not hidden / heads
        hp["attention.key_length"] = hp["attention.value_length"] = cfg.head_dim
    scaling = cfg.rope_scaling or {}
    if scaling.get("rope_type") == "linear":
        hp["rope.scaling.type"], hp["rope.scaling.factor"] = "linear", float(scaling["factor"])
    return hp


def _llama_hparams(cfg: ModelConfig) -> dict:
    return {**_common_hparams(cfg), "rope.dimension_count": cfg.head_dim}


def _gemma_hparams(cfg: ModelConfig) -> dict:
    """Gemma2Model / Gemma3Model's keys: head_dim always, the window and the soft-caps the config has. The
    scaled embeddings are not stored: llama.cpp's gemma graphs always multiply by sqrt(hidden)."""
    hp = {**_common_hparams(cfg), "attention.sliding_window": cfg.sliding_window}
    hp["attention.key_length"] = hp["attention.value_length"] = cfg.head_dim
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(cfg, key) is not None:
            hp[key] = float(getattr(cfg, key))
    return hp


def _gemma_check(arch: str) -> Callable[[ModelConfig], None]:
    """What llama.cpp hard-codes for `arch` rather than reads from the file (llama-model.cpp): the
    sliding/global layer pattern, the attention scale, Gemma 2's soft-caps (50 / 30 when absent), Gemma 3's
    local RoPE base and its lack of attention soft-capping. A model that differs would run as another model
    in llama.cpp, so it is refused."""

    def check(cfg: ModelConfig) -> None:
        n = cfg.num_layers
        want_types = gemma_layer_types(_GEMMA_SWA_EVERY[arch], n)
        scalar = gemma_attn_scalar(arch, n, cfg.hidden_size, cfg.num_heads, cfg.head_dim)
        bad = []
        if cfg.sliding_window is None or (cfg.layer_types or ["sliding_attention"] * n) != want_types:
            bad.append(f"layer_types {cfg.layer_types} (window {cfg.sliding_window}): llama.cpp's {arch} makes "
                       f"the last of every {_GEMMA_SWA_EVERY[arch]} layers global, the others sliding: {want_types}")
        if cfg.query_pre_attn_scalar != scalar:
            bad.append(f"query_pre_attn_scalar {cfg.query_pre_attn_scalar}: llama.cpp's {arch} scales attention "
                       f"by 1/sqrt({scalar})")
        if arch == "gemma2" and None in (cfg.attn_logit_softcapping, cfg.final_logit_softcapping):
            bad.append("soft-capping off: llama.cpp's gemma2 always caps (50 and 30 when the file has no value)")
        if arch == "gemma3" and cfg.rope_local_theta != GEMMA3_LOCAL_THETA:
            bad.append(f"rope_local_base_freq {cfg.rope_local_theta}: llama.cpp's gemma3 uses {GEMMA3_LOCAL_THETA:g} "
                       "on sliding layers")
        if arch == "gemma3" and cfg.attn_logit_softcapping is not None:
            bad.append("attn_logit_softcapping: llama.cpp's gemma3 has no attention soft-capping")
        if bad:
            raise ValueError(f"GGUF export: this {cfg.model_type} cannot be written as llama.cpp's {arch} without "
                             f"changing what it computes: {'; '.join(bad)}. Run it from its HF folder instead "
                             "(leantune merge writes one)")

    return check


def _phi3_hparams(cfg: ModelConfig) -> dict:
    """Phi3MiniModel's keys: the rotated dims (Phi-4-mini turns 3/4 of each head), the window (0: none), the
    pretraining length and, with longrope, the factor llama.cpp multiplies cos/sin by. The converter computes
    that factor from the lengths; the value leantune computes with (the same one, or the config's own
    attention_factor) is written, so the file runs as the model does."""
    from .llama import rope_attention_scale

    hp = {**_common_hparams(cfg), "rope.dimension_count": cfg.rotary_dim,
          "attention.sliding_window": cfg.sliding_window or 0}
    sc = cfg.rope_scaling or {}
    # without longrope llama.cpp never uses the pretraining length; the converter writes the config's, which
    # Phi-3 configs without scaling set to max_position_embeddings
    hp["rope.scaling.original_context_length"] = sc.get("original_max_position_embeddings", cfg.max_position_embeddings)
    if sc.get("rope_type") == "longrope":
        hp["rope.scaling.attn_factor"] = float(rope_attention_scale(cfg))
    return hp


def _phi3_check(cfg: ModelConfig) -> None:
    kind = (cfg.rope_scaling or {}).get("rope_type")
    if kind not in (None, "longrope"):
        raise ValueError(f"GGUF export: llama.cpp's phi3 reads longrope factors only, not rope_scaling {kind!r}; run "
                         "the model from its HF folder instead (leantune merge writes one)")


def _moe_hparams(base: Callable[[ModelConfig], dict]) -> Callable[[ModelConfig], dict]:
    """TextModel's expert keys on top of `base`: expert_count, expert_used_count and, where experts are not
    feed_forward_length wide (Qwen3-MoE's moe_intermediate_size), expert_feed_forward_length."""

    def hparams(cfg: ModelConfig) -> dict:
        hp = {**base(cfg), "expert_count": cfg.num_experts, "expert_used_count": cfg.num_experts_per_tok}
        if cfg.moe_intermediate_size:
            hp["expert_feed_forward_length"] = cfg.moe_intermediate_size
        return hp

    return hparams


def _moe_check(cfg: ModelConfig) -> None:
    """What llama.cpp's MoE graphs (llama + experts, qwen3moe) hard-code: a router and experts in every layer,
    and the top-k weights renormalized (qwen3moe's build_moe_ffn passes norm_w = true; transformers' GGUF
    loader sets norm_topk_prob true for qwen3_moe for that reason)."""
    bad = []
    dense = [i for i in range(cfg.num_layers) if not cfg.is_moe_layer(i)]
    if dense:
        bad.append(f"dense layers {dense} (mlp_only_layers / decoder_sparse_step): llama.cpp's graph puts experts "
                   "in every layer")
    if not cfg.norm_topk_prob:
        bad.append("norm_topk_prob false: llama.cpp renormalizes the top-k router weights")
    if bad:
        raise ValueError(f"GGUF export: this {cfg.model_type} cannot be written for llama.cpp without changing what "
                         f"it computes: {'; '.join(bad)}. Run it from its HF folder instead (leantune merge writes one)")


@dataclass(frozen=True)
class ExportArch:
    """How llama.cpp stores one leantune model_type. A new family adds an entry to EXPORT_ARCHS: its GGUF
    architecture, its `{arch}.*` keys, and names for tensors the common table lacks (e.g. Gemma 2's
    post-attention norms, Phi-3's fused ffn_up); a family whose tensors llama.cpp also transforms (Gemma's
    norm offset) adds that step here as a field too, next to `permute_qk`. MoE expert stacks (any family
    with num_experts) are split by `expert_stacks`, RoPE factor tensors follow the config's rope_scaling."""

    gguf_arch: str  # general.architecture
    permute_qk: bool  # llama.cpp's `llama` graph wants q/k rows as interleaved RoPE pairs
    hparams: Callable[[ModelConfig], dict] = _common_hparams
    # HF module suffix -> llama.cpp tensor stem, for tensors beyond (or named apart from) the common table
    extra_names: dict = field(default_factory=dict)
    norm_offset: float = 0.0  # added to every `*norm.weight`: Gemma's (1 + w) norms are stored as 1 + w
    check: Callable[[ModelConfig], None] | None = None  # raises for a model llama.cpp's arch cannot hold


# model_type -> how llama.cpp stores it. Mistral is `llama` in llama.cpp (convert_hf_to_gguf maps
# MistralForCausalLM to LlamaModel); the sliding window is not a llama.cpp `llama` key and is dropped.
EXPORT_ARCHS: dict[str, ExportArch] = {
    "llama": ExportArch("llama", permute_qk=True, hparams=_llama_hparams),
    "mistral": ExportArch("llama", permute_qk=True, hparams=_llama_hparams),
    "qwen2": ExportArch("qwen2", permute_qk=False),
    "qwen3": ExportArch("qwen3", permute_qk=False),
    # Gemma (convert_hf_to_gguf's Gemma2Model / Gemma3Model): no q/k permutation, +1 on every norm (q/k norms
    # too), pre_feedforward_layernorm is ffn_norm and the post norms have their own names (the reader's table)
    **{mt: ExportArch(arch, permute_qk=False, hparams=_gemma_hparams, norm_offset=1.0, check=_gemma_check(arch),
                      extra_names={hf: g for g, hf in _GEMMA_LAYER_NAMES.items()})
       for mt, arch in (("gemma2", "gemma2"), ("gemma3_text", "gemma3"))},
    # Phi3MiniModel: fused attn_qkv (rows q, k, v) and ffn_up (rows gate, up) as in the HF checkpoint, NEOX RoPE
    # (no permutation), longrope factors as rope_factors_long/short tensors (_model_tensors)
    "phi3": ExportArch("phi3", permute_qk=False, hparams=_phi3_hparams, check=_phi3_check,
                       extra_names={hf: g for g, hf in _PHI3_NAMES.items()}),
    # MoE: the experts stacked per weight, ffn_{gate,up,down}_exps (E, out, in), the router ffn_gate_inp (F32).
    # Mixtral is `llama` with expert keys (convert_hf_to_gguf's LlamaModel takes MixtralForCausalLM): q/k permuted
    "mixtral": ExportArch("llama", permute_qk=True, hparams=_moe_hparams(_llama_hparams), check=_moe_check),
    "qwen3_moe": ExportArch("qwen3moe", permute_qk=False, hparams=_moe_hparams(_common_hparams), check=_moe_check),
}


def export_arch(cfg: ModelConfig) -> ExportArch:
    spec = EXPORT_ARCHS.get(cfg.model_type)
    if spec is None:
        raise ValueError(f"GGUF export of model_type {cfg.model_type!r} is not supported; "
                         f"leantune exports {sorted(EXPORT_ARCHS)}")
    return spec


# ================================================================================================
# names and layouts
# ================================================================================================
_LAYER_STEMS = {hf: g for g, hf in _LAYER_NAMES.items()}
_TOP_STEMS = {hf: g for g, hf in _TOP_NAMES.items()}


def gguf_name(hf: str, spec: ExportArch | None = None) -> str:
    """llama.cpp's name of a Hugging Face parameter, e.g. model.layers.3.self_attn.q_proj.weight ->
    blk.3.attn_q.weight; the inverse of the reader's `hf_name`."""
    stem, _, kind = hf.rpartition(".")
    stems = {**_LAYER_STEMS, **(spec.extra_names if spec else {})}
    if stem.startswith("model.layers."):
        i, _, part = stem[len("model.layers."):].partition(".")
        if part in stems:
            return f"blk.{i}.{stems[part]}.{kind}"
    elif stem in _TOP_STEMS:
        return f"{_TOP_STEMS[stem]}.{kind}"
    raise ValueError(f"{hf}: no llama.cpp tensor name for this parameter; GGUF export cannot place it")


def expert_stacks(hf: str, t: torch.Tensor, num_experts: int) -> dict[str, torch.Tensor] | None:
    """llama.cpp's expert tensors of one leantune stack (None if `hf` is not one): gate_up_proj (E, 2F, C) ->
    ffn_gate_exps and ffn_up_exps (E, F, C) each, down_proj (E, C, F) -> ffn_down_exps; the split is the
    reader's concatenation undone. Works for a LoRA's lora_b too (E, out, r): its rows split the same way."""
    m = re.fullmatch(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)", hf)
    if m is None:
        return None
    if t.dim() != 3 or t.shape[0] != num_experts:
        raise ValueError(f"{hf}: expected a stack of {num_experts} experts (E, out, in), got shape {tuple(t.shape)}")
    b = f"blk.{m[1]}."
    if m[2] == "down_proj":
        return {b + "ffn_down_exps.weight": t}
    gate, up = t.chunk(2, dim=1)
    return {b + "ffn_gate_exps.weight": gate, b + "ffn_up_exps.weight": up}


def permute_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's q/k row order for `llama` files: each head's HF half-split rows [x_0..x_{d/2-1},
    y_0..y_{d/2-1}] become interleaved pairs [x_0, y_0, x_1, y_1, ...]. Rows only: weights and biases."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape).contiguous()


def _rope_heads(hf: str, cfg: ModelConfig) -> int | None:
    """Heads to permute the rows of `hf` over (q_proj: query heads, k_proj: kv heads), else None."""
    if ".self_attn.q_proj." in hf or hf.endswith(".self_attn.q_proj"):
        return cfg.num_heads
    if ".self_attn.k_proj." in hf or hf.endswith(".self_attn.k_proj"):
        return cfg.num_kv_heads
    return None


# ================================================================================================
# tensor types
# ================================================================================================
@dataclass
class PlannedTensor:
    name: str
    data: np.ndarray  # the bytes/values handed to GGUFWriter.add_tensor
    qtype: object  # gguf.GGMLQuantizationType
    note: str = ""  # why the type differs from the one asked for, if it does


def _wanted_type(name: str, shape: tuple, quant: str, tied: bool, n_expert: int = 0):
    """The ggml type convert_hf_to_gguf gives tensor `name` for `--quant`: 1-D tensors, norms and the MoE
    router (ffn_gate_inp) F32 (llama.cpp reads them as F32), every other weight -- 3-D expert stacks too,
    quantized row by row -- the asked type. q4_0 follows llama-quantize's Q4_0
    mix (llama-quant.cpp), which stores the output projection (the tied embedding when there is none) as
    Q6_K, or as Q8_0 where its rows are not whole 256-blocks; gguf cannot make Q6_K, so it is Q8_0 here
    always (for hidden sizes like SmolLM2's 576 that is llama-quantize's own choice); and for a model of
    exactly 8 experts (Mixtral 8x7B) it bumps attn_k and attn_v to Q8_0."""
    from gguf import GGMLQuantizationType as T

    if (len(shape) <= 1 or name.endswith("_norm.weight") or ".ffn_gate_inp." in name
            or not name.endswith((".weight", ".lora_a", ".lora_b"))):
        return T.F32
    if quant == "q4_0" and (name == "output.weight" or (tied and name == "token_embd.weight")):
        return T.Q8_0
    if quant == "q4_0" and n_expert == 8 and name.endswith((".attn_k.weight", ".attn_v.weight")):
        return T.Q8_0
    return {"f32": T.F32, "f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0, "q4_0": T.Q4_0}[quant]


def plan_tensor(name: str, t: torch.Tensor, quant: str, tied: bool = False, n_expert: int = 0,
                f16_fallback: bool = False) -> PlannedTensor:
    """Quantize one tensor (torch order, e.g. (out, in)) with gguf's reference quantizer.

    A row that is not a whole number of blocks (e.g. 100 values for Q8_0's 32) cannot be held by that type.
    By default that stops the export (`check_blocks` finds it before anything is quantized); with
    `f16_fallback` the tensor is stored as F16, as llama.cpp's convert_hf_to_gguf.py does (it catches
    gguf.QuantError and falls back), and `note` says so."""
    from gguf import GGMLQuantizationType as T
    from gguf import quants

    qtype = _wanted_type(name, tuple(t.shape), quant, tied, n_expert)
    note = _block_misfit(name, tuple(t.shape), qtype)
    if note:
        if not f16_fallback:
            raise ValueError(note + "; " + _FALLBACK_HINT)
        note, qtype = note + "; stored as F16, as llama.cpp's convert_hf_to_gguf.py does", T.F16
    arr = t.detach().to(torch.float32).contiguous().numpy()
    return PlannedTensor(name, quants.quantize(arr, qtype), qtype, note)


_FALLBACK_HINT = ("that type cannot hold it: export with --quant f16 or bf16, or pass --quant-fallback f16 to store "
                  "such tensors as F16 (what llama.cpp's convert_hf_to_gguf.py does)")


def _block_misfit(name: str, shape: tuple, qtype) -> str:
    """Why `qtype` cannot hold a tensor of `shape` (its rows are not whole blocks), or ''."""
    from gguf import GGML_QUANT_SIZES

    block = GGML_QUANT_SIZES[qtype][0]
    if shape and shape[-1] % block:
        return f"{name}: rows of {shape[-1]} values are not a multiple of {qtype.name}'s block of {block}"
    return ""


def check_blocks(tensors: dict, quant: str, tied: bool = False, n_expert: int = 0,
                 f16_fallback: bool = False) -> None:
    """Stop before any tensor is quantized (or any file written) when `quant` cannot hold one of `tensors`
    and no fallback was asked for; the message names the first such tensor and how many there are."""
    if f16_fallback:
        return
    bad = [m for n, t in tensors.items()
           if (m := _block_misfit(n, tuple(t.shape), _wanted_type(n, tuple(t.shape), quant, tied, n_expert)))]
    if bad:
        more = f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""
        raise ValueError(f"GGUF export --quant {quant}: {bad[0]}{more}; {_FALLBACK_HINT}")


def file_type(quant: str):
    from gguf import LlamaFileType as F

    return {"f32": F.ALL_F32, "f16": F.MOSTLY_F16, "bf16": F.MOSTLY_BF16, "q8_0": F.MOSTLY_Q8_0,
            "q4_0": F.MOSTLY_Q4_0}[quant]


def check_quant(quant: str, choices=QUANTS, option: str = "--quant") -> None:
    if quant not in choices:
        raise ValueError(f"{option} {quant!r} is not one of {', '.join(choices)}")


# ================================================================================================
# tokenizer
# ================================================================================================
def _pre_name(tok: Tokenizer) -> str | None:
    """llama.cpp's `tokenizer.ggml.pre` for a byte-level BPE tokenizer: the name the source GGUF had, else
    one recognized from the pre-tokenizer's split regex. llama.cpp names pre-tokenizers by a hash of their
    output; here only the regexes the reader also knows are recognized (None: unknown)."""
    from .gguf import _LLAMA3_SPLIT, _QWEN2_SPLIT

    if getattr(tok, "gguf_pre", None):
        return tok.gguf_pre
    pre = _tokenizer_json(tok.tk).get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"  # SmolLM/SmolLM2's tokenizer.json: single digits, then GPT-2's byte-level split
    if kinds == ["Split", "ByteLevel"]:
        regex = (steps[0].get("pattern") or {}).get("Regex")
        return {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}.get(regex)
    return None


def _tokenizer_json(tk) -> dict:
    import json

    return json.loads(tk.to_str())


def _tokenizer_kind(d: dict) -> str | None:
    """llama.cpp's tokenizer.ggml.model for a tokenizer.json: 'gpt2' (byte-level BPE), 'llama' (SentencePiece
    BPE with byte fallback, as transformers converts Llama 2 / Mistral tokenizers), else None."""
    import json

    model = d.get("model") or {}
    if model.get("type") != "BPE":
        return None
    if "ByteLevel" in json.dumps(d.get("pre_tokenizer")):
        return "gpt2"
    return "llama" if model.get("byte_fallback") else None


def _merges(d: dict) -> list[str]:
    return [m if isinstance(m, str) else " ".join(m) for m in d["model"].get("merges", [])]


def _adds_special(tok: Tokenizer) -> tuple[bool, bool]:
    """(add_bos, add_eos): what the tokenizer's post-processor puts around a plain encode."""
    with_s, without = tok.encode("a"), tok.encode("a", add_special_tokens=False)
    add_bos = tok.bos_id is not None and len(with_s) > len(without) and with_s[0] == tok.bos_id
    add_eos = tok.eos_id is not None and len(with_s) > len(without) and with_s[-1] == tok.eos_id
    return add_bos, add_eos


@dataclass
class Vocab:
    model: str  # tokenizer.ggml.model
    tokens: list[str]
    types: list[int]
    pre: str | None = None  # byte-level BPE: the pre-tokenizer's llama.cpp name
    merges: list[str] | None = None  # byte-level BPE
    scores: list[float] | None = None  # SentencePiece
    add_space_prefix: bool | None = None  # SentencePiece


def _token_table(tok: Tokenizer, vocab_size: int, kind_of: Callable[[int, str], int]):
    """Tokens and token types in id order, padded to the model's vocab_size with `[PAD{i}]` UNUSED tokens as
    convert_hf_to_gguf pads them; added tokens CONTROL (special) or USER_DEFINED, the rest `kind_of`."""
    by_id = {i: t for t, i in tok.tk.get_vocab(with_added_tokens=True).items()}
    if max(by_id) >= vocab_size:
        raise ValueError(f"the tokenizer has token id {max(by_id)}, beyond the model's vocab_size {vocab_size}; "
                         "the tokenizer does not belong to this model")
    added = tok.tk.get_added_tokens_decoder()
    tokens, types = [], []
    for i in range(vocab_size):
        t = by_id.get(i)
        tokens.append(f"[PAD{i}]" if t is None else t)
        types.append(_UNUSED if t is None else (_CONTROL if added[i].special else _USER_DEFINED) if i in added
                     else kind_of(i, t))
    return tokens, types


def _byte_level_vocab(tok: Tokenizer, d: dict, vocab_size: int, pre: str | None) -> Vocab:
    pre = pre or _pre_name(tok)
    if pre is None:
        raise ValueError("the tokenizer's pre-tokenizer is not one leantune recognizes; pass --tokenizer-pre NAME "
                         "with llama.cpp's name for it (e.g. gpt2, llama-bpe, qwen2, smollm)")
    tokens, types = _token_table(tok, vocab_size, lambda i, t: _NORMAL)
    return Vocab("gpt2", tokens, types, pre=pre, merges=_merges(d))


def _sentencepiece_vocab(tok: Tokenizer, d: dict, vocab_size: int, pre: str | None) -> Vocab:
    """A SentencePiece BPE vocabulary (Llama 2, Mistral v0.1-0.3): llama.cpp merges the adjacent pair whose
    result has the highest score, so a piece made by the k-th merge scores -k (earlier merges win, as in
    BPE); bytes `<0xXX>` are BYTE tokens, the unknown token UNKNOWN."""
    import re

    unk = d["model"].get("unk_token")
    made_by = {}
    for k, m in enumerate(_merges(d)):
        made_by.setdefault(m.replace(" ", ""), k)
    byte = re.compile(r"<0x[0-9A-F]{2}>")
    tokens, types = _token_table(tok, vocab_size, lambda i, t: _BYTE if byte.fullmatch(t) else _NORMAL)
    if unk in tokens:  # UNKNOWN even where the tokenizer lists it as a special added token
        types[tokens.index(unk)] = _UNKNOWN
    scores = [-float(made_by[t]) if ty == _NORMAL and t in made_by else 0.0 for t, ty in zip(tokens, types)]
    meta = d.get("pre_tokenizer") or {}
    prefix = meta.get("prepend_scheme", "first") != "never" if meta.get("type") == "Metaspace" else \
        "Prepend" in str(d.get("normalizer"))  # older tokenizer.json: Prepend("▁") + Replace in the normalizer
    return Vocab("llama", tokens, types, scores=scores, add_space_prefix=prefix)


_VOCABS = {"gpt2": _byte_level_vocab, "llama": _sentencepiece_vocab}


def vocab_of(tok: Tokenizer, vocab_size: int, pre: str | None = None) -> Vocab:
    """The `tokenizer.ggml.*` vocabulary of a BPE tokenizer: byte-level (GPT-2, Llama 3, Qwen, SmolLM: model
    'gpt2', with merges) or SentencePiece-style with byte fallback (Llama 2, Mistral: model 'llama', scores)."""
    d = _tokenizer_json(tok.tk)
    kind = _tokenizer_kind(d)
    if kind is None:
        raise ValueError(
            f"GGUF export writes BPE tokenizers (byte-level, or SentencePiece-style with byte fallback); this one is "
            f"a {(d.get('model') or {}).get('type')!r} model. Convert the merged folder (leantune merge) with "
            "llama.cpp's convert_hf_to_gguf.py instead"
        )
    return _VOCABS[kind](tok, d, vocab_size, pre)


def _add_tokenizer(w, tok: Tokenizer, vocab: Vocab) -> None:
    w.add_tokenizer_model(vocab.model)
    if vocab.pre is not None:
        w.add_tokenizer_pre(vocab.pre)
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.types)
    if vocab.merges is not None:
        w.add_token_merges(vocab.merges)
    if vocab.scores is not None:
        w.add_token_scores(vocab.scores)
        w.add_add_space_prefix(vocab.add_space_prefix)
    unk = vocab.tokens[vocab.types.index(_UNKNOWN)] if _UNKNOWN in vocab.types else None
    for add, token in ((w.add_bos_token_id, tok.bos_token), (w.add_eos_token_id, tok.eos_token),
                       (w.add_pad_token_id, tok.pad_token), (w.add_unk_token_id, unk)):
        i = tok.token_to_id(token)
        if i is not None:
            add(i)
    add_bos, add_eos = _adds_special(tok)
    w.add_add_bos_token(add_bos)
    w.add_add_eos_token(add_eos)
    if tok.chat_template:
        w.add_chat_template(tok.chat_template)


# ================================================================================================
# the model
# ================================================================================================
def _model_tensors(sd: dict[str, torch.Tensor], cfg: ModelConfig, spec: ExportArch) -> dict[str, torch.Tensor]:
    """HF-named float tensors -> llama.cpp-named tensors in llama.cpp's layouts (torch order)."""
    out = {}
    for hf, t in sd.items():
        if cfg.tie_word_embeddings and hf == "lm_head.weight":
            continue  # llama.cpp reads a missing `output` as tied to token_embd
        stacks = expert_stacks(hf, t, cfg.num_experts)
        if stacks:
            out.update(stacks)
            continue
        heads = _rope_heads(hf, cfg) if spec.permute_qk else None
        if spec.norm_offset and hf.endswith("norm.weight"):
            t = t + spec.norm_offset
        out[gguf_name(hf, spec)] = permute_rope(t, heads) if heads else t
    sc = cfg.rope_scaling or {}
    if sc.get("rope_type") == "llama3":  # llama.cpp's form of Llama 3 RoPE scaling
        out["rope_freqs.weight"] = llama3_inv_freq_factors(cfg.rope_scaling, cfg.rope_theta, cfg.head_dim).float()
    if sc.get("rope_type") == "longrope":  # Phi3MiniModel's generate_extra_tensors: one factor per rotated pair
        for k in ("long", "short"):
            out[f"rope_factors_{k}.weight"] = torch.tensor(sc[f"{k}_factor"], dtype=torch.float32)
    return out


def plan_model(model, tok: Tokenizer, quant: str, pre: str | None = None, f16_fallback: bool = False):
    """(spec, vocab, planned tensors) of a float leantune model: every check and every quantization, no I/O."""
    cfg = model.config
    spec = export_arch(cfg)
    if spec.check:
        spec.check(cfg)
    vocab = vocab_of(tok, cfg.vocab_size, pre)
    sd = model.base_state_dict()
    bad = [k for k, v in sd.items() if not v.is_floating_point()]
    if bad:
        raise ValueError(f"{bad[0]} is not a float tensor (a 4-bit layer?): GGUF export needs float weights; "
                         "`leantune export` dequantizes 4-bit layers first")
    tensors = _model_tensors(sd, cfg, spec)
    check_blocks(tensors, quant, cfg.tie_word_embeddings, cfg.num_experts, f16_fallback)
    return spec, vocab, [plan_tensor(n, t, quant, cfg.tie_word_embeddings, cfg.num_experts, f16_fallback)
                         for n, t in tensors.items()]


def _write(path: Path, arch: str, meta: Callable, planned: list[PlannedTensor]) -> Path:
    """Write a GGUF at `path` atomically: a temporary file in the same folder, renamed when complete."""
    import gguf

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp, arch)
        meta(w)
        for p in planned:
            w.add_tensor(p.name, p.data, raw_dtype=p.qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _report(planned: list[PlannedTensor]) -> None:
    for p in planned:
        if p.note:
            print(f"leantune export: {p.note}", file=sys.stderr)


def write_model_gguf(model, tok: Tokenizer, path, quant: str = "f16", name: str | None = None,
                     pre: str | None = None, f16_fallback: bool = False) -> Path:
    """Write a float leantune model and its tokenizer as a llama.cpp GGUF (`quant`: f16, bf16, q8_0, q4_0);
    a tensor `quant` cannot hold stops it before writing, or is stored as F16 with `f16_fallback`."""
    check_quant(quant, QUANTS[:4] + ("f32",))
    cfg = model.config
    spec, vocab, planned = plan_model(model, tok, quant, pre, f16_fallback)
    _report(planned)
    hparams = spec.hparams(cfg)
    if cfg.sliding_window and "attention.sliding_window" not in hparams:
        print(f"leantune export: sliding_window {cfg.sliding_window} is not stored: llama.cpp's {spec.gguf_arch} "
              f"architecture attends over the whole context, so outputs differ past {cfg.sliding_window} tokens",
              file=sys.stderr)

    def meta(w):
        import gguf

        w.add_type(gguf.GGUFType.MODEL)
        w.add_name(name or _default_name(model))
        w.add_file_type(file_type(quant))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for key, value in hparams.items():
            _add_value(w, f"{spec.gguf_arch}.{key}", value)
        _add_tokenizer(w, tok, vocab)

    return _write(Path(path), spec.gguf_arch, meta, planned)


def _default_name(model) -> str:
    stem = Path(str(getattr(model, "name_or_path", "") or "model")).name.removesuffix(".gguf")
    if model.config.model_type == "mistral" and "mistral" not in stem.lower():
        stem = f"Mistral {stem}"  # llama.cpp stores Mistral as `llama`; the name tells the reader it is Mistral
    return stem


def _add_value(w, key: str, value) -> None:
    if isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, int):
        w.add_uint32(key, value)
    elif isinstance(value, float):
        w.add_float32(key, value)
    else:
        w.add_string(key, str(value))


# ================================================================================================
# Q4_K_M through llama.cpp's llama-quantize
# ================================================================================================
def llama_quantize_path() -> str | None:
    given = os.environ.get(LLAMA_QUANTIZE_ENV)
    if given and not (Path(given).is_file() and os.access(given, os.X_OK)):
        raise ValueError(f"{LLAMA_QUANTIZE_ENV}={given} is not an executable file; point it at llama.cpp's "
                         "llama-quantize, or unset it to look on PATH")
    return given or shutil.which("llama-quantize")


def require_llama_quantize(quant: str) -> str:
    exe = llama_quantize_path()
    if exe is None:
        raise ValueError(
            f"--quant {quant} needs llama.cpp's llama-quantize: the gguf package's Python quantizers cannot make "
            "the Q4_K/Q6_K blocks Q4_K_M is built of. Put llama-quantize on PATH (or set "
            f"{LLAMA_QUANTIZE_ENV}=/path/to/llama-quantize), or export --quant f16 (or q8_0, q4_0) and run "
            "`llama-quantize OUT-f16.gguf OUT-q4_k_m.gguf Q4_K_M` yourself"
        )
    return exe


def write_k_quant_gguf(model, tok: Tokenizer, path, quant: str = "q4_k_m", name: str | None = None,
                       pre: str | None = None) -> Path:
    """Q4_K_M: write an F32 GGUF beside `path`, then llama.cpp's `llama-quantize` makes the per-tensor
    K-quant mix (llama-quant.cpp: Q6_K for the output projection, and for attn_v and ffn_down in the first and
    last eighth of the layers and every third between; Q4_K elsewhere; its own fallbacks for rows that are
    not whole 256-blocks) into a temporary name that is renamed to `path` when it succeeds."""
    exe = require_llama_quantize(quant)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        src = write_model_gguf(model, tok, work / "f32.gguf", "f32", name, pre)
        out = work / "out.gguf"
        done = subprocess.run([exe, str(src), str(out), quant.upper()], capture_output=True, text=True)
        if done.returncode != 0 or not out.is_file():
            tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
            raise ValueError(f"{exe} failed (exit {done.returncode}): " + " | ".join(tail))
        os.replace(out, path)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return path


# ================================================================================================
# LoRA adapters (llama.cpp's LoRA GGUF)
# ================================================================================================
def lora_tensors(factors: dict, cfg: ModelConfig, alpha: float) -> dict[str, torch.Tensor]:
    """llama.cpp-named lora_a (r, in) / lora_b (out, r) tensors, as convert_lora_to_gguf.py lays them out.

    llama.cpp scales every pair by `adapter.lora.alpha / r`; where leantune's scaling differs (rsLoRA,
    alpha_pattern) the difference is folded into lora_b, so the product is the adapter's exactly. On `llama`
    files lora_b's rows get the base's q/k RoPE permutation (the row order of the base weight it adds to).

    Expert LoRA (a stacked parameter `...mlp.experts.gate_up_proj` / `down_proj`: A (E, r, in), B (E, out, r),
    one rank-r pair per expert) is written as stacked 3-D lora_a / lora_b on ffn_{gate,up,down}_exps, the
    layout convert_lora_to_gguf.py makes when it stacks per-expert LoRA and llama.cpp's build_lora_mm_id
    applies per selected expert; gate_up's B rows split into gate and up, both with the same A."""
    spec = export_arch(cfg)
    out = {}
    for module, (a, b, scaling) in factors.items():
        r = a.shape[-2]
        fold = scaling / (alpha / r)
        if abs(fold - 1.0) > 1e-12:
            b = b * fold
        stacks = expert_stacks(module, b, cfg.num_experts)
        if stacks:
            for stem, part in stacks.items():
                out[stem + ".lora_a"], out[stem + ".lora_b"] = a, part.contiguous()
            continue
        heads = _rope_heads(module, cfg) if spec.permute_qk else None
        if heads:
            b = permute_rope(b, heads)
        stem = gguf_name(module + ".weight", spec)
        out[stem + ".lora_a"], out[stem + ".lora_b"] = a, b
    return out


def write_lora_gguf(factors: dict, cfg: ModelConfig, path, alpha: float, quant: str = "f16",
                    name: str | None = None, f16_fallback: bool = False) -> Path:
    """Write a LoRA adapter, {HF module name: (A (r, in), B (out, r), scaling)} of a model with config `cfg`,
    as llama.cpp's LoRA GGUF (general.type adapter)."""
    check_quant(quant, LORA_QUANTS, "--quant with --lora-only")
    if not alpha:
        raise ValueError("lora_alpha is 0: llama.cpp reads adapter.lora.alpha 0 as 'scale 1', not 0")
    spec = export_arch(cfg)
    tensors = lora_tensors(factors, cfg, alpha)
    check_blocks(tensors, quant, f16_fallback=f16_fallback)
    planned = [plan_tensor(n, t, quant, f16_fallback=f16_fallback) for n, t in tensors.items()]
    _report(planned)

    def meta(w):
        import gguf

        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
        w.add_name(name or Path(str(path)).stem)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    return _write(Path(path), spec.gguf_arch, meta, planned)

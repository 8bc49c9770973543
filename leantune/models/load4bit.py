"""Loading a model with a 4-bit base: quantize at load time, or read a bitsandbytes 4-bit HF folder.

`load(path, quantize="nf4")` builds the model on the meta device, swaps the decoder's linear layers
for `Linear4bit` shells, then fills one module at a time: safetensors and GGUF files are read tensor by
tensor (plain reads, no mapping), so a float weight is resident only until its layer is quantized and
the full fp32 model never exists.
A folder saved by transformers with a bitsandbytes `quantization_config` (`reference/formats.md`
§2.7-2.8) loads its packed codes and quant state as they are; which layers are 4-bit is read from
the checkpoint's keys.
"""
from __future__ import annotations

import json
from itertools import chain
from pathlib import Path

import torch
from torch import nn

from ..quant import Linear4bit, Quant4bitConfig, Stacked4bit, is_bnb_4bit_config, quantizable_linears
from ..quant.model import stacked_expert_modules
from .config import ModelConfig
from .llama import LlamaForCausalLM
from .safetensors_reader import FolderTensors
from .tokenizer import Tokenizer


def is_bnb_folder(path: Path) -> bool:
    """An HF folder whose config.json carries a bitsandbytes quantization_config (4-bit loads, 8-bit is refused)."""
    cj = path / "config.json"
    if path.is_file() or not cj.exists():
        return False
    try:
        qc = json.loads(cj.read_text(encoding="utf-8")).get("quantization_config") or {}
    except (OSError, ValueError, AttributeError):
        return False  # the ordinary loader reports a broken config.json
    return isinstance(qc, dict) and qc.get("quant_method") == "bitsandbytes"


def load_4bit(path: Path, dtype: torch.dtype, device: str, quantize) -> tuple[LlamaForCausalLM, Tokenizer]:
    """(model, tokenizer) with 4-bit decoder linears: quantized now (`quantize`), or as stored."""
    qcfg = Quant4bitConfig.coerce(quantize)
    prequant = None
    if path.is_file():
        from .gguf import open_gguf

        cfg, source, tok = open_gguf(path)
    else:
        cj = path / "config.json"
        if not cj.exists():
            raise FileNotFoundError(f"{cj} not found: --model must be a Hugging Face model folder or a .gguf file")
        raw = json.loads(cj.read_text(encoding="utf-8"))
        qc = raw.get("quantization_config")
        if qc and not is_bnb_4bit_config(qc):
            raise ValueError(f"{cj}: quantization {qc.get('quant_method')!r} "
                             f"{'(8-bit) ' if qc.get('load_in_8bit') else ''}is not supported; "
                             "leantune reads bitsandbytes 4-bit checkpoints")
        prequant = qc if qc else None
        cfg, source, tok = ModelConfig.from_hf(raw), FolderTensors(path), Tokenizer.from_folder(path)
    if cfg.num_experts and prequant:
        raise ValueError(f"{path}: a bitsandbytes 4-bit {cfg.model_type} folder is not supported (transformers leaves "
                         "its experts in float); load the float checkpoint with quantize='nf4' (--method qlora) instead")
    if cfg.num_experts:  # the per-expert Hub tensors are read as the stacks the model holds (moe.py)
        from .moe import StackedExpertSource

        source = StackedExpertSource(source, cfg)
    if prequant and qcfg and qcfg.quant_type != prequant.get("bnb_4bit_quant_type"):
        raise ValueError(f"{path} is already quantized to {prequant.get('bnb_4bit_quant_type')!r}; "
                         f"pass quantize=None (or {prequant.get('bnb_4bit_quant_type')!r}) to load it as it is")
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    keys = set(source.keys())
    if prequant:
        names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)
                 and any(k.startswith(f"{n}.weight.quant_state.bitsandbytes__") for k in keys)]
    else:
        names = quantizable_linears(model, qcfg.skip)
    _swap_shells(model, names, qcfg)
    if not prequant:
        _swap_expert_shells(model, qcfg)
    _fill(model, source, keys, dtype, device, str(path))
    model.reset_rope(device)  # fp32 always (see LlamaForCausalLM._apply)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.eval()
    model.name_or_path = str(path)
    return model, tok


def _swap_shells(model: nn.Module, names: list[str], qcfg: Quant4bitConfig | None) -> None:
    q = qcfg or Quant4bitConfig()
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        lin = getattr(parent, child)
        setattr(parent, child, Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                          quant_type=q.quant_type, blocksize=q.blocksize,
                                          double_quant=q.double_quant, compute_dtype=q.compute_dtype,
                                          device="meta"))


def _swap_expert_shells(model: nn.Module, q: Quant4bitConfig) -> None:
    """MoE: each expert stack becomes an empty 4-bit `Stacked4bit` on meta, filled (quantized) by `_fill`."""
    for name in stacked_expert_modules(model):
        experts = model.get_submodule(name)
        for pname in ("gate_up_proj", "down_proj"):
            E, out, n_in = getattr(experts, pname).shape
            delattr(experts, pname)
            setattr(experts, pname, Stacked4bit(E, out, n_in, q.quant_type, q.blocksize, q.double_quant, device="meta"))


def _local_keys(module: nn.Module) -> list[str]:
    skip = module._non_persistent_buffers_set
    named = chain(module.named_parameters(recurse=False), module.named_buffers(recurse=False))
    return [n for n, t in named if t is not None and n not in skip]


def _read_module(source, module: nn.Module, prefix: str, want: list[str], dtype, device) -> dict:
    """The module's own tensors, read now; float ones cast to dtype (a 4-bit layer's packed state is kept as is).
    Nothing else refers to them, so a float weight is freed as soon as its layer has quantized it."""
    sd = {}
    for k in want:
        t = source.take(k)
        is_state = isinstance(module, Linear4bit) and k.startswith(prefix + "weight.")
        sd[k[len(prefix):]] = t.to(device) if is_state or not t.is_floating_point() else t.to(device, dtype)
    return sd


def _fill(model: LlamaForCausalLM, source, keys: set[str], dtype, device, where: str) -> None:
    """Load every module's own tensors, one module at a time (float ones cast to dtype on device)."""
    keys = {k for k in keys if not k.endswith("rotary_emb.inv_freq")}
    tied = model.config.tie_word_embeddings
    if tied:
        keys.discard("lm_head.weight")
    missing, used = [], set()
    for name, module in model.named_modules():
        if tied and name == "lm_head":
            continue
        prefix = f"{name}." if name else ""
        if isinstance(module, Stacked4bit):  # one layer's float stack (E, out, in), quantized expert by expert
            if name not in keys:
                missing.append(name)
            else:
                used.add(name)
                module.set_(source.take(name).to(device, dtype))
            continue
        want = [prefix + n for n in _local_keys(module)]
        if isinstance(module, Linear4bit):
            want += sorted(k for k in keys if k.startswith(prefix + "weight."))
        absent = [k for k in want if k not in keys]
        if absent or not want:
            missing += absent
            continue
        used.update(want)
        try:
            module.load_state_dict(_read_module(source, module, prefix, want, dtype, device), strict=True, assign=True)
        except RuntimeError as e:
            raise ValueError(f"{where}: {name or 'model'}: {e}") from None
    unexpected = sorted(keys - used)
    if missing or unexpected:
        raise ValueError(
            f"{where}: weights do not fit the {model.config.model_type} config: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )

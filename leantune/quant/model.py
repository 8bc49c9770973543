"""Whole-model 4-bit quantization: swap the decoder's nn.Linear layers for `Linear4bit`.

What transformers + bitsandbytes quantize (`load_in_4bit`): every nn.Linear except the output layer
(`lm_head`) and any layer sharing its weight with an embedding; embeddings and norms stay as they are.
MoE experts (3-D stacks, not nn.Linear) stay float there; here they become per-expert 4-bit `Stacked4bit`
(see stacked4bit.py), the router stays float.
`quantize_model` does the same in place, one layer at a time, so the fp32 weight of each layer is freed
before the next is quantized. `hf_quantization_config` / `config_from_hf` translate the
`quantization_config` block of a transformers 4-bit `config.json` (`reference/formats.md` §2.8).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .linear4bit import Linear4bit
from .state import BLOCKSIZES, QUANT_TYPES


@dataclass
class Quant4bitConfig:
    """4-bit options; the defaults are QLoRA's (NF4, blocksize 64, double quantization)."""

    quant_type: str = "nf4"  # "nf4" | "fp4"
    blocksize: int = 64
    double_quant: bool = True
    skip: tuple[str, ...] = ("lm_head",)  # module names (or name suffixes / components) left in float
    compute_dtype: torch.dtype | None = None  # None: fp32 on CPU, bf16 on CUDA (load_model: the precision's)

    def __post_init__(self):
        if self.quant_type not in QUANT_TYPES:
            raise ValueError(f"quant_type must be one of {QUANT_TYPES} (e.g. quantize='nf4'), got {self.quant_type!r}")
        if self.blocksize not in BLOCKSIZES:
            raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {self.blocksize!r}")
        if not isinstance(self.double_quant, bool):
            raise ValueError(f"double_quant must be True or False, got {self.double_quant!r}")
        if isinstance(self.skip, str):
            self.skip = (self.skip,)
        self.skip = tuple(self.skip or ())
        if self.compute_dtype not in (None, torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"compute_dtype must be None, float32, bfloat16 or float16, got {self.compute_dtype!r}")

    @classmethod
    def coerce(cls, value) -> Quant4bitConfig | None:
        """None, a quant type name ("nf4"/"fp4") or a Quant4bitConfig -> Quant4bitConfig or None."""
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, str):
            return cls(quant_type=value.lower())
        raise ValueError(f"quantize must be None, 'nf4', 'fp4' or a Quant4bitConfig, got {value!r}")


def is_skipped(name: str, skip) -> bool:
    """`name` matches an entry exactly, by suffix (`.lm_head`) or as one of its components."""
    parts = name.split(".")
    return any(name == s or name.endswith("." + s) or name.startswith(s + ".") or s in parts for s in skip)


def quantizable_linears(model: nn.Module, skip=("lm_head",)) -> list[str]:
    """Names of the nn.Linear modules `quantize_model` would swap, in module order."""
    for name, module in model.named_modules():
        if hasattr(module, "base_layer") and hasattr(module, "adapter_module_dicts"):
            raise ValueError(f"{name!r} is an adapter layer: quantize the base model before applying adapters")
    tied = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters(recurse=False)}
    return [n for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and n and not is_skipped(n, skip) and id(m.weight) not in tied]


@torch.no_grad()
def quantize_model(model: nn.Module, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True,
                   skip=("lm_head",), compute_dtype: torch.dtype | None = None) -> nn.Module:
    """Swap every quantizable nn.Linear of `model` for a `Linear4bit`, in place; returns the model.

    Each float weight is dropped as soon as its layer is swapped (if nothing else holds it), so peak
    memory is the float model plus one layer's temporaries, not two models.
    """
    cfg = Quant4bitConfig(quant_type, blocksize, double_quant, tuple(skip or ()), compute_dtype)
    for name in quantizable_linears(model, cfg.skip):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, child)
        setattr(parent, child, Linear4bit.from_linear(linear, cfg.quant_type, cfg.blocksize, cfg.double_quant,
                                                      cfg.compute_dtype))
        del linear
    for name in stacked_expert_modules(model):  # MoE: each stacked expert weight -> per-expert 4-bit (Stacked4bit)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, getattr(parent, child).to_4bit(cfg.quant_type, cfg.blocksize, cfg.double_quant))
    return model


def stacked_expert_modules(model: nn.Module) -> list[str]:
    """Names of the MoE experts modules (models.moe.Experts) whose stacks are still float."""
    return [n for n, m in model.named_modules() if getattr(type(m), "stacked_experts", False)
            and hasattr(m, "to_4bit") and not any(getattr(c, "packed_experts", False) for c in m.children())]


def linear4bit_layers(model: nn.Module) -> list[tuple[str, Linear4bit]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, Linear4bit)]


def hf_quantization_config(model: nn.Module) -> dict | None:
    """The `quantization_config` transformers writes for a bitsandbytes 4-bit model, or None if the
    model has no Linear4bit. All layers must share quant_type and double quantization."""
    layers = [m for _, m in linear4bit_layers(model)]
    if not layers:
        return None
    kinds = {(m.quant_type, m.double_quant) for m in layers}
    if len(kinds) > 1:
        raise ValueError(f"the model mixes 4-bit settings {sorted(kinds)}; transformers' config holds one")
    qt, dq = kinds.pop()
    compute = layers[0].compute_dtype or torch.float32
    return {"_load_in_4bit": True, "_load_in_8bit": False,
            "bnb_4bit_compute_dtype": str(compute).removeprefix("torch."), "bnb_4bit_quant_storage": "uint8",
            "bnb_4bit_quant_type": qt, "bnb_4bit_use_double_quant": dq,
            "llm_int8_enable_fp32_cpu_offload": False, "llm_int8_has_fp16_weight": False,
            "llm_int8_skip_modules": None, "llm_int8_threshold": 6.0, "load_in_4bit": True,
            "load_in_8bit": False, "quant_method": "bitsandbytes"}


def is_bnb_4bit_config(qc: dict | None) -> bool:
    """True for a transformers `quantization_config` of bitsandbytes 4-bit."""
    return bool(qc) and qc.get("quant_method") == "bitsandbytes" and bool(
        qc.get("load_in_4bit") or qc.get("_load_in_4bit"))

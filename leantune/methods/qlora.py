"""QLoRA (Dettmers et al., 2023): LoRA on a frozen 4-bit NF4 base with double quantization.

`apply(model, "qlora", ...)` quantizes the model's decoder linears (unless it was loaded 4-bit already,
e.g. `leantune.load(path, quantize="nf4")`, which never holds the fp32 model) and then adds LoRA to
them. On Mixtral / Qwen3-MoE the stacked experts are 4-bit too (`quant.Stacked4bit`, one NF4 tensor per
expert matrix) under expert LoRA (`lora_experts.py`); the router stays float. The adapter is a plain LoRA adapter in PEFT's format; `base_quantization()` is recorded next to it
(`leantune.json`) so that generate and merge rebuild the same 4-bit base it was trained against.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ..fields import opt
from .lora import LoraConfig, apply_lora

SIDECAR = "leantune.json"


@dataclass
class QLoraConfig(LoraConfig):
    quant_type: str = opt("nf4", "4-bit data type of the base: nf4 or fp4", cli=False)
    blocksize: int = opt(64, "weights per absmax block", cli=False)
    double_quant: bool = opt(True, "quantize the absmax values too (double quantization)", cli=False)

    def __post_init__(self):
        super().__post_init__()
        from ..quant import Quant4bitConfig

        Quant4bitConfig(self.quant_type, self.blocksize, self.double_quant)  # validates


def apply_qlora(model: nn.Module, config: QLoraConfig, adapter_name: str) -> nn.Module:
    from ..quant import linear4bit_layers, quantize_model

    if not linear4bit_layers(model):
        quantize_model(model, config.quant_type, config.blocksize, config.double_quant)
    return apply_lora(model, config, adapter_name)


def base_quantization(model: nn.Module) -> dict | None:
    """The 4-bit settings of the model's base layers, or None for a float base."""
    from ..quant import linear4bit_layers

    layers = linear4bit_layers(model)
    if not layers:
        return None
    st = layers[0][1].quant_state
    return {"quant_type": st.quant_type, "blocksize": st.blocksize, "double_quant": bool(st.nested)}


def write_sidecar(model: nn.Module, out_dir: str | Path) -> None:
    q = base_quantization(model)
    if q is not None:
        path = Path(out_dir) / SIDECAR
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"base_quantization": q}, indent=1))
        tmp.replace(path)


def read_sidecar(adapter_dir: str | Path) -> dict | None:
    """The base quantization an adapter was trained with (None: a float base)."""
    path = Path(adapter_dir) / SIDECAR
    if not path.exists():
        return None
    return json.loads(path.read_text()).get("base_quantization")


def load_quantization(config: QLoraConfig):
    """The base quantization QLoRA loads the model with, so the fp32 model is never resident in full."""
    from ..quant import Quant4bitConfig

    return Quant4bitConfig(config.quant_type, config.blocksize, config.double_quant)


def _register() -> None:
    from .registry import register_method

    register_method("qlora", QLoraConfig, apply_qlora, quantize=load_quantization, extra_files=write_sidecar,
                    lora_shaped=True, help="LoRA on a frozen 4-bit NF4 base with double quantization (Dettmers "
                                           "et al. 2023), quantized while loading; PEFT format + leantune.json")


_register()

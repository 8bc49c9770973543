"""A third-party method for tests/test_plugins.py: IA3-style learned scaling of linear layers' outputs
(Liu et al. 2022, arXiv:2205.05638, `y = l * W x`, l starting at ones), in its own on-disk format.

It uses only leantune's public plug-in surface (`register_method` with typed options and hooks, the
`base` helpers every method uses) and is registered through a `leantune.methods` entry point.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from leantune.fields import opt
from leantune.methods import base, register_method
from leantune.methods.lora import is_lora_target
from leantune.methods.registry import apply
from leantune.methods.targets import module_index, parse_targets, resolve_targets

CONFIG_NAME, WEIGHTS_NAME = "ia3_config.json", "ia3_model.safetensors"


@dataclass
class Ia3Config:
    targets: str | list[str] = opt("down_proj", "modules to adapt: all-linear, a comma list of names, or a regex",
                                   flag="--targets", parse=parse_targets)
    init: float = opt(1.0, "IA3: initial value of every scaling vector", flag="--ia3-init")

    def __post_init__(self):
        self.targets = parse_targets(self.targets)
        if not self.init > 0:
            raise ValueError(f"Ia3Config.init must be > 0, got {self.init!r}")


class _Scale(nn.Module):
    def __init__(self, n: int, init: float):
        super().__init__()
        self.weight = nn.Parameter(torch.full((n,), float(init)))


class Ia3Linear(base.AdapterLayer):
    adapter_module_dicts = ("ia3_l",)

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.ia3_l = nn.ModuleDict()

    def add_adapter(self, name: str, slot: int, config: Ia3Config) -> None:
        self.ia3_l[name] = _Scale(self.base_layer.out_features, config.init)
        self.slot_to_name[slot] = name

    def forward(self, x, adapter_ids=None):
        y = self.call_base(x, adapter_ids)
        if self.disabled:
            return y
        for name in self.active_adapters:
            if name in self.ia3_l:
                y = y * self.ia3_l[name].weight
        return y


def apply_ia3(model: nn.Module, config: Ia3Config, adapter_name: str) -> nn.Module:
    names = resolve_targets(model, config.targets, None, is_lora_target)
    slot = base.register_adapter(model, adapter_name, config)
    for name in names:
        module = model.get_submodule(name)
        if not isinstance(module, Ia3Linear):
            module = Ia3Linear(module)
            base.replace_module(model, name, module)
        module.add_adapter(adapter_name, slot, config)
    base.freeze_base(model)
    base.set_adapter(model, [adapter_name])
    return model


def save_ia3(model: nn.Module, out_dir, adapter_name: str = "default", base_model_name_or_path=None) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {f"{n}.ia3_l": layer.ia3_l[adapter_name].weight.detach().contiguous()
               for n, layer in base.adapter_layers(model) if isinstance(layer, Ia3Linear)}
    save_file(tensors, str(out / WEIGHTS_NAME))
    config = asdict(base.adapter_configs(model)[adapter_name])
    (out / CONFIG_NAME).write_text(json.dumps({"config": config, "base_model": base_model_name_or_path}))
    return out


def load_ia3(model: nn.Module, path, adapter_name: str = "default", trainable: bool = False) -> nn.Module:
    meta = json.loads((Path(path) / CONFIG_NAME).read_text())
    apply(model, "ia3", adapter_name=adapter_name, config=Ia3Config(**meta["config"]))
    index = module_index(model)
    with torch.no_grad():
        for key, value in load_file(str(Path(path) / WEIGHTS_NAME)).items():
            index[key.rsplit(".", 1)[0]].ia3_l[adapter_name].weight.copy_(value)
    base.set_adapter_trainable(model, adapter_name, trainable)
    return model


def register() -> None:
    """The entry point: `ia3 = ia3_plugin:register` in the group leantune.methods."""
    register_method("ia3", Ia3Config, apply_ia3, save=save_ia3, load=load_ia3,
                    claims=lambda path: (path / CONFIG_NAME).is_file(),
                    help="IA3: a learned scaling vector on chosen linear layers' outputs (test plug-in)")

"""Adapter layers and the per-model adapter state every method shares.

An adapter method swaps a target module for a wrapper (a subclass of `AdapterLayer`) that keeps the
original as `.base_layer` and holds any number of adapters in `nn.ModuleDict`s keyed by adapter name,
so in-memory names equal PEFT's (`q_proj.base_layer.weight`, `q_proj.lora_A.default.weight`).

State that belongs to the whole model lives in plain attributes of the root module, never in globals:

- `model.leantune_adapter_slots: dict[str, int]`: the slot of each adapter name, assigned when the
  name is first applied. A forward may take `adapter_ids` (a LongTensor of slots, per row or per
  token; -1 = base only) to route each row of a mixed batch to its adapter.
- `model.leantune_adapter_configs: dict[str, config]`: the config each adapter was applied with.
- `model.leantune_active_adapters: list[str]`: the adapters used when no `adapter_ids` are passed.
  As in PEFT, the first adapter applied becomes active and `set_adapter` switches.

Trainability is explicit: a freshly applied adapter is trainable, a loaded one is frozen unless asked
otherwise (`set_adapter_trainable`); switching the active adapter does not change `requires_grad`.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

SLOTS_ATTR = "leantune_adapter_slots"
CONFIGS_ATTR = "leantune_adapter_configs"
ACTIVE_ATTR = "leantune_active_adapters"


class AdapterLayer(nn.Module):
    """Base of every wrapper layer: owns `base_layer`, the slot map and the active/merged state."""

    accepts_adapter_ids = True
    # names of the nn.ModuleDict attributes that hold one entry per adapter
    adapter_module_dicts: tuple[str, ...] = ()

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.slot_to_name: dict[int, str] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def adapter_names(self) -> list[str]:
        return list(self.slot_to_name.values())

    def has_adapter(self, name: str) -> bool:
        return name in self.slot_to_name.values()

    def call_base(self, x: torch.Tensor, adapter_ids: torch.Tensor | None) -> torch.Tensor:
        if getattr(type(self.base_layer), "accepts_adapter_ids", False):
            return self.base_layer(x, adapter_ids=adapter_ids)
        return self.base_layer(x)

    def adapter_parameters(self, name: str) -> Iterator[nn.Parameter]:
        for dict_name in self.adapter_module_dicts:
            module_dict = getattr(self, dict_name)
            if name in module_dict:
                yield from module_dict[name].parameters()

    def remove_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            self.unmerge(name)
        for dict_name in self.adapter_module_dicts:
            module_dict = getattr(self, dict_name)
            if name in module_dict:
                del module_dict[name]
        self.slot_to_name = {s: n for s, n in self.slot_to_name.items() if n != name}
        self.active_adapters = [n for n in self.active_adapters if n != name]

    def merge(self, name: str) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot merge adapters")

    def unmerge(self, name: str) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot unmerge adapters")


# ---------------------------------------------------------------------------------------------
# model-level state


def no_dropout(module: nn.Module) -> bool:
    """Does an adapter's dropout module leave its input as it is (none, or not training)?"""
    return isinstance(module, nn.Identity) or (isinstance(module, nn.Dropout) and not module.training)


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, AdapterLayer]]:
    """(module name, wrapper) for every adapter layer of the model."""
    for name, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            yield name, module


def adapter_slots(model: nn.Module) -> dict[str, int]:
    """The model's adapter-name -> slot map (a copy)."""
    return dict(getattr(model, SLOTS_ATTR, {}))


def adapter_configs(model: nn.Module) -> dict:
    """The model's adapter-name -> config map (a copy)."""
    return dict(getattr(model, CONFIGS_ATTR, {}))


def list_adapters(model: nn.Module) -> list[str]:
    return list(getattr(model, SLOTS_ATTR, {}))


def active_adapters(model: nn.Module) -> list[str]:
    return list(getattr(model, ACTIVE_ATTR, []))


def register_adapter(model: nn.Module, name: str, config) -> int:
    """Give `name` the smallest free slot and record its config; returns the slot."""
    slots = getattr(model, SLOTS_ATTR, None)
    if slots is None:
        slots = {}
        setattr(model, SLOTS_ATTR, slots)
    configs = getattr(model, CONFIGS_ATTR, None)
    if configs is None:
        configs = {}
        setattr(model, CONFIGS_ATTR, configs)
    used = set(slots.values())
    slot = next(i for i in range(len(used) + 1) if i not in used)
    slots[name] = slot
    configs[name] = config
    return slot


def _forget_adapter(model: nn.Module, name: str) -> None:
    getattr(model, SLOTS_ATTR, {}).pop(name, None)
    getattr(model, CONFIGS_ATTR, {}).pop(name, None)
    active = [n for n in getattr(model, ACTIVE_ATTR, []) if n != name]
    setattr(model, ACTIVE_ATTR, active)


def check_new_adapter_name(model: nn.Module, name: str) -> None:
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"adapter_name must be a non-empty string without '.', got {name!r}")
    if hasattr(nn.ModuleDict(), name):
        raise ValueError(f"adapter_name {name!r} is reserved (an nn.ModuleDict attribute); pick another")
    if name in getattr(model, SLOTS_ATTR, {}):
        raise ValueError(
            f"the model already has an adapter named {name!r}; pass another adapter_name "
            f"or remove it first with delete_adapter(model, {name!r})"
        )


def require_adapter(model: nn.Module, name: str) -> None:
    names = list_adapters(model)
    if name not in names:
        raise ValueError(f"the model has no adapter named {name!r}; its adapters: {names or 'none'}")


def set_adapter(model: nn.Module, names: str | list[str]) -> None:
    """Make `names` (one name or a list) the adapters used when a forward gets no `adapter_ids`."""
    names = [names] if isinstance(names, str) else list(names)
    for name in names:
        require_adapter(model, name)
    setattr(model, ACTIVE_ATTR, names)
    for _, layer in adapter_layers(model):
        layer.active_adapters = list(names)


@contextmanager
def disable_adapters(model: nn.Module):
    """Run the base model only inside the block (adapters are kept, just bypassed)."""
    layers = [layer for _, layer in adapter_layers(model)]
    merged = [layer for layer in layers if layer.merged_adapters]
    if merged:
        raise ValueError("cannot disable adapters while some are merged into the base; unmerge them first")
    previous = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer, flag in zip(layers, previous):
            layer.disabled = flag


def _adapter_param_ids(model: nn.Module, name: str | None = None) -> set[int]:
    ids = set()
    for _, layer in adapter_layers(model):
        names = layer.adapter_names if name is None else [name]
        for n in names:
            ids.update(id(p) for p in layer.adapter_parameters(n))
    return ids


def trainable_parameters(model: nn.Module, adapter_name: str | None = None) -> dict[str, nn.Parameter]:
    """Parameters with `requires_grad` (only those of `adapter_name` when given), by name."""
    keep = None if adapter_name is None else _adapter_param_ids(model, adapter_name)
    return {
        n: p for n, p in model.named_parameters()
        if p.requires_grad and (keep is None or id(p) in keep)
    }


def set_adapter_trainable(model: nn.Module, name: str, trainable: bool = True) -> None:
    """Turn `requires_grad` of one adapter's parameters (and the base biases it trains) on or off."""
    require_adapter(model, name)
    for _, layer in adapter_layers(model):
        for p in layer.adapter_parameters(name):
            p.requires_grad_(trainable)
    freeze_base(model)


def _is_trainable(model: nn.Module, name: str) -> bool:
    return any(
        p.requires_grad for _, layer in adapter_layers(model) for p in layer.adapter_parameters(name)
    )


def freeze_base(model: nn.Module) -> None:
    """Freeze every non-adapter parameter, except the base biases a trainable adapter trains.

    A config's `bias` option follows PEFT: "all" trains every bias of the model, "lora_only" the
    biases of the layers that adapter wraps, "none" no bias.
    """
    adapter_ids = _adapter_param_ids(model)
    for p in model.parameters():
        if id(p) not in adapter_ids:
            p.requires_grad_(False)
    for name, cfg in getattr(model, CONFIGS_ATTR, {}).items():
        mode = getattr(cfg, "bias", "none")
        if mode != "none" and _is_trainable(model, name):
            for p in bias_parameters(model, name, mode).values():
                p.requires_grad_(True)


def bias_parameters(model: nn.Module, name: str, mode: str) -> dict[str, nn.Parameter]:
    """The base biases adapter `name` trains under bias mode `mode`, by in-memory name."""
    if mode == "none":
        return {}
    adapter_ids = _adapter_param_ids(model)
    wrapped = {n for n, layer in adapter_layers(model) if layer.has_adapter(name)}
    out = {}
    for pname, p in model.named_parameters():
        if id(p) in adapter_ids or not pname.endswith(".bias"):
            continue
        owner = pname[: -len(".base_layer.bias")] if pname.endswith(".base_layer.bias") else None
        if mode == "all" or owner in wrapped:
            out[pname] = p
    return out


def get_base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's state dict under its original (Hugging Face) key names.

    `.base_layer` is stripped and adapter tensors are left out, so the result loads into the
    unwrapped model. Merged adapters are included in the weights as they are.
    """
    wrappers = [name for name, _ in adapter_layers(model)]
    out = {}
    for key, value in model.state_dict().items():
        new_key = _base_key(key, wrappers)
        if new_key is not None:
            out[new_key] = value
    return out


def _base_key(key: str, wrappers: list[str]) -> str | None:
    # longest wrapper prefix first, so nested wrappers strip from the inside out
    for prefix in sorted(wrappers, key=len, reverse=True):
        head = f"{prefix}.base_layer."
        if key.startswith(head):
            rest = [w for w in wrappers if w != prefix]
            return _base_key(f"{prefix}." + key[len(head):], rest)
        if key.startswith(f"{prefix}."):
            return None  # an adapter tensor of this wrapper
    return key


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """`setattr(parent, child, new)` for the module called `name`."""
    if not name:
        raise ValueError("cannot replace the root module; apply the method to a model that contains it")
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove one adapter everywhere (unmerging it first); wrappers left empty become their base."""
    require_adapter(model, name)
    for layer_name, layer in list(adapter_layers(model)):
        if layer.has_adapter(name):
            layer.remove_adapter(name)
            if not layer.slot_to_name:
                replace_module(model, layer_name, layer.base_layer)
    _forget_adapter(model, name)
    set_adapter(model, active_adapters(model))


def unload(model: nn.Module) -> nn.Module:
    """Drop every adapter (unmerging merged ones) and put the original base layers back."""
    for name in list_adapters(model):
        delete_adapter(model, name)
    for layer_name, layer in list(adapter_layers(model)):
        replace_module(model, layer_name, layer.base_layer)
    return model

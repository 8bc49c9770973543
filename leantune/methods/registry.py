"""The method registry: `register_method(name, config_cls, apply_fn)` and `apply(model, method, ...)`.

A method is a typed config dataclass plus `apply_fn(model, config, adapter_name) -> model`, which
swaps target modules for wrapper layers in place (see `base.AdapterLayer`), and optionally its own
PEFT on-disk format (`PeftFormat`), which `adapter_io` uses for that method's adapters instead of LoRA's.
Nothing here knows about a particular method; `lora.py` registers "lora" and "rslora" when
`leantune.methods` is imported.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

from torch import nn

from .base import check_new_adapter_name


@dataclass(frozen=True)
class PeftFormat:
    """A method's own PEFT adapter format: its `peft_type` and how an adapter is saved and loaded."""

    peft_type: str  # adapter_config.json's "peft_type", e.g. "ADALORA"
    state_dict: Callable[[nn.Module, str], dict]  # (model, adapter) -> tensors under PEFT's keys
    config_dict: Callable[[nn.Module, str, str | None], dict]  # (model, adapter, base path) -> adapter_config
    load: Callable[..., nn.Module]  # (model, path, config, tensors, adapter_name, trainable) -> model


@dataclass(frozen=True)
class MethodSpec:
    name: str
    config_cls: type
    apply_fn: Callable[[nn.Module, object, str], nn.Module]
    peft_format: PeftFormat | None = None  # None: saved and loaded as LoRA


_METHODS: dict[str, MethodSpec] = {}


def register_method(name: str, config_cls: type, apply_fn: Callable,
                    peft_format: PeftFormat | None = None) -> None:
    """Register (or replace) a method under `name`; `config_cls` must be a dataclass."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"method name must be a non-empty string, got {name!r}")
    if not dataclasses.is_dataclass(config_cls):
        raise TypeError(f"config_cls of method {name!r} must be a dataclass, got {config_cls!r}")
    if not callable(apply_fn):
        raise TypeError(f"apply_fn of method {name!r} must be callable")
    _METHODS[name.lower()] = MethodSpec(name.lower(), config_cls, apply_fn, peft_format)


def get_method(name: str) -> MethodSpec:
    spec = _METHODS.get(str(name).lower())
    if spec is None:
        raise ValueError(f"unknown method {name!r}; registered methods: {list_methods()}")
    return spec


def list_methods() -> list[str]:
    return sorted(_METHODS)


def peft_format_for(config=None, peft_type: str | None = None) -> PeftFormat | None:
    """The own PEFT format of the method whose config `config` is, or that writes `peft_type`; None: LoRA's."""
    for spec in _METHODS.values():
        f = spec.peft_format
        if f is None:
            continue
        if isinstance(config, spec.config_cls) or (peft_type is not None and peft_type == f.peft_type):
            return f
    return None


def config_fields(config_cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(config_cls) if f.init]


def build_config(spec: MethodSpec, config=None, **kwargs):
    """`config` with `kwargs` overriding it, or `config_cls(**kwargs)`; unknown keys -> TypeError."""
    valid = config_fields(spec.config_cls)
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise TypeError(
            f"unknown option(s) {unknown} for method {spec.name!r}; valid options: {valid}"
        )
    if config is None:
        return spec.config_cls(**kwargs)
    if not isinstance(config, spec.config_cls):
        raise TypeError(
            f"method {spec.name!r} takes a {spec.config_cls.__name__}, got {type(config).__name__}"
        )
    return dataclasses.replace(config, **kwargs) if kwargs else config


def apply(model: nn.Module, method: str, adapter_name: str = "default", config=None, **kwargs) -> nn.Module:
    """Add adapter `adapter_name` of `method` to `model` in place; returns the model.

    Base parameters are frozen; the new adapter's parameters are trainable. Options come from
    `config` (an instance of the method's config class) and/or keyword arguments.
    """
    spec = get_method(method)
    cfg = build_config(spec, config, **kwargs)
    check_new_adapter_name(model, adapter_name)
    return spec.apply_fn(model, cfg, adapter_name)

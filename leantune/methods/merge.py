"""Merging adapters into the base weights: `W <- W + s * B @ A` (and `b <- b + s * b_B`), in fp32.

Follows PEFT's `safe_merge`: every new weight is computed and checked for non-finite values before
any layer is changed, so a failed merge leaves the model as it was. `unmerge` subtracts the same
delta, which restores W up to rounding (exactly representable in fp32 only up to ~1 ulp).
"""
from __future__ import annotations

from torch import nn

from .base import (
    AdapterLayer, active_adapters, adapter_layers, replace_module, require_adapter, unload,
)


def _layers_with(model: nn.Module, name: str) -> list[tuple[str, AdapterLayer]]:
    require_adapter(model, name)
    return [(n, layer) for n, layer in adapter_layers(model) if layer.has_adapter(name)]


def merge(model: nn.Module, adapter_name: str) -> None:
    """Add adapter `adapter_name` into the base weights of every layer it adapts."""
    layers = _layers_with(model, adapter_name)
    for layer_name, layer in layers:
        if adapter_name in layer.merged_adapters:
            raise ValueError(f"adapter {adapter_name!r} is already merged (at {layer_name!r})")
        _checked(layer_name, lambda: layer.merged_tensors(adapter_name, +1))
    for _, layer in layers:
        layer.merge(adapter_name)


def unmerge(model: nn.Module, adapter_name: str) -> None:
    """Subtract a merged adapter from the base weights again."""
    layers = _layers_with(model, adapter_name)
    for layer_name, layer in layers:
        if adapter_name not in layer.merged_adapters:
            raise ValueError(f"adapter {adapter_name!r} is not merged (at {layer_name!r})")
        _checked(layer_name, lambda: layer.merged_tensors(adapter_name, -1))
    for _, layer in layers:
        layer.unmerge(adapter_name)


def _checked(layer_name: str, compute) -> None:
    try:
        compute()
    except ValueError as e:
        raise ValueError(f"{layer_name}: {e}") from None


def merge_and_unload(model: nn.Module, adapter_names: list[str] | None = None) -> nn.Module:
    """Merge `adapter_names` (default: the active adapters) and put plain base layers back.

    The result has the original module types and state-dict keys, e.g. for saving a merged model.
    """
    names = active_adapters(model) if adapter_names is None else list(adapter_names)
    _dequantize_bases(model)
    for name in names:
        already = [layer for _, layer in _layers_with(model, name) if name in layer.merged_adapters]
        if not already:
            merge(model, name)
    for layer_name, layer in list(adapter_layers(model)):
        layer.merged_adapters.clear()  # the base keeps the merged weights from here on
        replace_module(model, layer_name, layer.base_layer)
    return unload(model)  # forget the adapters (no wrappers are left to unmerge)


def _dequantize_bases(model: nn.Module) -> None:
    """QLoRA: merge onto the dequantized 4-bit base (what the adapter was trained against), in float.

    Re-quantizing W + dW would round the adapter's change away (PEFT warns about exactly this); the
    merged model is a plain float model instead.
    """
    for _, layer in adapter_layers(model):
        to_float = getattr(layer.base_layer, "to_float_linear", None)
        if to_float is not None:
            layer.base_layer = to_float()
        elif any(getattr(c, "packed_experts", False) for c in layer.base_layer.children()):  # MoE: 4-bit stacks
            layer.base_layer = layer.base_layer.to_float()

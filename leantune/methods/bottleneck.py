"""Bottleneck adapters (Houlsby et al. 2019, arXiv:1902.00751; Pfeiffer et al. 2020, arXiv:2005.00247),
as PETL-AST implements them (Cappellazzo et al., umbertocappellazzo/PETL_AST `src/AST_adapters.py`).

One adapter is `f(x) = W_up · act(W_down · x + b) + b'` with width `size` (= b), placed on a sublayer's
output (the block adds its residual afterwards, as in every pre-LN transformer):

- **sequential**: `y = o + s·f(o)`, `o = sublayer(x)` (PETL-AST's "sequential + APPLY_RESIDUAL"; the form
  without the residual would discard the pretrained output at init, its pitfall 4, so it is not offered);
- **parallel**: `y = o + s·f(x)`, the adapter reads the sublayer's (normalized) input.

Placement **houlsby** puts one adapter after attention and one after the MLP; **pfeiffer** after the MLP
only. Only `W_up` (and both biases) start at zero: the model is unchanged at init, yet `∂W_up` is nonzero
from the first step and `∂W_down` from the second. PETL-AST zero-inits `W_down` too, and then neither
matrix ever gets a gradient (reference methods-more.md §3.1, pitfall 1).

Applied by module swap: each targeted sublayer (`self_attn`, `mlp`) becomes a `BottleneckLayer` that keeps
it as `base_layer` and holds adapters in ModuleDicts keyed by name, routed per row/token by `adapter_ids`
(taken from the sublayer's own `adapter_ids` or `meta` argument, wherever its signature has them).
PEFT has no bottleneck adapter type, so these adapters are saved in leantune's own format:
`bottleneck_config.json` + `bottleneck_model.safetensors` (keys `<module>.adapter_down.weight`, ...).
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..fields import opt
from ..routing import Routing
from .base import (
    ACTIVE_ATTR,
    AdapterLayer,
    adapter_configs,
    adapter_layers,
    delete_adapter,
    freeze_base,
    register_adapter,
    replace_module,
    require_adapter,
    set_adapter,
    set_adapter_trainable,
)
from .registry import apply, register_method
from .targets import module_index, resolve_targets

NONLINEARITIES = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh, "identity": nn.Identity}
PLACEMENTS = ("houlsby", "pfeiffer")
MODES = ("sequential", "parallel")

CONFIG_NAME = "bottleneck_config.json"
WEIGHTS_NAME = "bottleneck_model.safetensors"
FORMAT = "leantune-bottleneck"
FORMAT_VERSION = 1


@dataclass
class BottleneckConfig:
    """Bottleneck adapter options; defaults are PETL-AST's (parallel, Pfeiffer, GELU)."""

    size: int = opt(16, "bottleneck adapters: width b of each adapter (PETL-AST: round(d / reduction_rate))",
                    flag="--bottleneck-size")
    nonlinearity: str = opt("gelu", "bottleneck adapters: relu, gelu, silu, tanh or identity",
                            flag="--bottleneck-nonlinearity")
    placement: str = opt("pfeiffer", "bottleneck adapters: houlsby (after attention and after the MLP) or "
                                     "pfeiffer (after the MLP only)", flag="--bottleneck-placement")
    mode: str = opt("parallel", "bottleneck adapters: parallel (y = o + s*f(x)) or sequential (y = o + s*f(o)), "
                                "o = the sublayer's output", flag="--bottleneck-mode")
    scaling: float = opt(1.0, "bottleneck adapters: scale s of the adapter's output", flag="--bottleneck-scaling")
    dropout: float = opt(0.0, "dropout on the adapter branch (bottleneck: on its input only)", flag="--dropout")
    attn_module: str = opt("self_attn", "name (suffix) of each block's attention sublayer", cli=False)
    mlp_module: str = opt("mlp", "name (suffix) of each block's MLP sublayer", cli=False)

    def __post_init__(self):
        if not isinstance(self.size, int) or isinstance(self.size, bool) or self.size <= 0:
            raise ValueError(f"BottleneckConfig.size must be an int > 0, got {self.size!r}")
        if self.nonlinearity not in NONLINEARITIES:
            raise ValueError(f"BottleneckConfig.nonlinearity must be one of {sorted(NONLINEARITIES)}, "
                             f"got {self.nonlinearity!r}")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"BottleneckConfig.placement must be one of {PLACEMENTS}, got {self.placement!r}")
        if self.mode not in MODES:
            raise ValueError(f"BottleneckConfig.mode must be one of {MODES}, got {self.mode!r}")
        if not _is_number(self.scaling) or not math.isfinite(self.scaling):
            raise ValueError(f"BottleneckConfig.scaling must be a finite number, got {self.scaling!r}")
        if not _is_number(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"BottleneckConfig.dropout must be in [0, 1), got {self.dropout!r}")
        for name in ("attn_module", "mlp_module"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"BottleneckConfig.{name} must be a module name, got {getattr(self, name)!r}")

    def sublayers(self) -> list[str]:
        return [self.attn_module, self.mlp_module] if self.placement == "houlsby" else [self.mlp_module]


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# ---------------------------------------------------------------------------------------------
# the layer


class _CallSpec:
    """Where a sublayer's forward takes its input and its adapter slots (found once from its signature)."""

    def __init__(self, module: nn.Module):
        params = list(inspect.signature(module.forward).parameters.values())
        positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if not positional:
            raise ValueError(f"cannot adapt a {type(module).__name__}: its forward takes no input argument")
        self.input = (positional[0].name, 0)
        self.ids = self._find(positional, "adapter_ids")
        self.meta = self._find(positional, "meta")

    @staticmethod
    def _find(positional, name: str):
        for i, p in enumerate(positional):
            if p.name == name:
                return name, i
        return None

    @staticmethod
    def _get(where, args, kwargs):
        if where is None:
            return None
        name, index = where
        return kwargs[name] if name in kwargs else (args[index] if index < len(args) else None)

    def input_of(self, args, kwargs) -> torch.Tensor:
        return self._get(self.input, args, kwargs)

    def adapter_ids_of(self, args, kwargs) -> torch.Tensor | None:
        ids = self._get(self.ids, args, kwargs)
        if ids is None:
            meta = self._get(self.meta, args, kwargs)
            ids = getattr(meta, "adapter_ids", None)
        return ids


def _linear_dims(module: nn.Module) -> tuple[int, int]:
    """(input width, output width) of a sublayer: its first linear's in, its last linear's out."""
    linears = [m for m in module.modules() if hasattr(m, "in_features") and hasattr(m, "out_features")]
    if not linears:
        raise ValueError(f"cannot adapt a {type(module).__name__}: it has no linear layer to read its width from")
    return linears[0].in_features, linears[-1].out_features


def _placement(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    tensors = [t for t in list(module.parameters()) + list(module.buffers()) if t.is_floating_point()]
    if not tensors:
        return torch.device("cpu"), torch.float32
    dtype = tensors[0].dtype
    # half-precision or quantized sublayer: adapters stay fp32, as LoRA's do
    return tensors[0].device, dtype if dtype in (torch.float32, torch.float64) else torch.float32


class BottleneckLayer(AdapterLayer):
    """A sublayer (attention or MLP) with any number of bottleneck adapters on its output."""

    adapter_module_dicts = ("adapter_down", "adapter_up", "adapter_act", "adapter_dropout")

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.in_features, self.out_features = _linear_dims(base_layer)
        self.call_spec = _CallSpec(base_layer)
        self.adapter_down = nn.ModuleDict()
        self.adapter_up = nn.ModuleDict()
        self.adapter_act = nn.ModuleDict()
        self.adapter_dropout = nn.ModuleDict()
        self.mode: dict[str, str] = {}
        self.scaling: dict[str, float] = {}

    def add_adapter(self, name: str, slot: int, cfg: BottleneckConfig) -> None:
        device, dtype = _placement(self.base_layer)
        if cfg.mode == "parallel" and self.in_features != self.out_features:
            raise ValueError(f"parallel bottleneck adapters need a sublayer whose input and output widths agree; "
                             f"this {type(self.base_layer).__name__} maps {self.in_features} -> {self.out_features}")
        source = self.out_features if cfg.mode == "sequential" else self.in_features
        self.adapter_down[name] = nn.Linear(source, cfg.size, device=device, dtype=dtype)
        self.adapter_up[name] = nn.Linear(cfg.size, self.out_features, device=device, dtype=dtype)
        self.adapter_act[name] = NONLINEARITIES[cfg.nonlinearity]()
        self.adapter_dropout[name] = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.mode[name], self.scaling[name] = cfg.mode, float(cfg.scaling)
        self.slot_to_name[slot] = name
        self.reset_adapter(name)

    @torch.no_grad()
    def reset_adapter(self, name: str) -> None:
        # W_down random (nn.Linear's kaiming-uniform), W_up and both biases zero: output unchanged at init,
        # and the hidden activations are nonzero, so W_up gets a gradient at once (PETL-AST's pitfall 1).
        nn.init.kaiming_uniform_(self.adapter_down[name].weight, a=math.sqrt(5))
        nn.init.zeros_(self.adapter_down[name].bias)
        nn.init.zeros_(self.adapter_up[name].weight)
        nn.init.zeros_(self.adapter_up[name].bias)

    def remove_adapter(self, name: str) -> None:
        super().remove_adapter(name)
        self.mode.pop(name, None)
        self.scaling.pop(name, None)

    def bottleneck(self, name: str, src: torch.Tensor) -> torch.Tensor:
        """s · W_up · act(W_down · dropout(src) + b) + s · b'."""
        down = self.adapter_down[name]
        h = self.adapter_act[name](down(self.adapter_dropout[name](src.to(down.weight.dtype))))
        return self.adapter_up[name](h) * self.scaling[name]

    def _source(self, name: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return out if self.mode[name] == "sequential" else x

    def forward(self, *args, **kwargs):
        result = self.base_layer(*args, **kwargs)
        if self.disabled:
            return result
        out, rest = (result[0], result[1:]) if isinstance(result, tuple) else (result, None)
        x = self.call_spec.input_of(args, kwargs)
        ids = self.call_spec.adapter_ids_of(args, kwargs)
        out = self._adapt(x, out) if ids is None else self._routed(x, out, ids)
        return out if rest is None else (out, *rest)

    def _adapt(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        y = out
        for name in self.active_adapters:
            if name in self.adapter_down:
                # every active adapter reads the same o (or x), so their order does not matter
                y = y + self.bottleneck(name, self._source(name, x, out)).to(out.dtype)
        return y

    def _routed(self, x: torch.Tensor, out: torch.Tensor, adapter_ids) -> torch.Tensor:
        route = Routing.of(adapter_ids)
        flat_out, flat_x = out.reshape(-1, out.shape[-1]), x.reshape(-1, x.shape[-1])  # (N, d)
        y = flat_out
        for slot in route.used(self.slot_to_name):
            name, rows = self.slot_to_name[slot], route.row_index(out, slot)
            src = self._source(name, flat_x, flat_out).index_select(0, rows)
            y = y.index_add(0, rows, self.bottleneck(name, src).to(y.dtype))
        return y.reshape(out.shape)

    def merged_tensors(self, name: str, sign: int):
        raise ValueError(f"adapter {name!r} is a bottleneck adapter: it is nonlinear, so it cannot be merged "
                         "into the base weights; use it unmerged")

    def extra_repr(self) -> str:
        return f"adapters={self.adapter_names}, mode={self.mode}, active={self.active_adapters}"


# ---------------------------------------------------------------------------------------------
# applying


def _is_target(module: nn.Module) -> bool:
    return isinstance(module, BottleneckLayer) or not isinstance(module, AdapterLayer)


def _refuse_nested_adapters(name: str, module: nn.Module) -> None:
    if isinstance(module, BottleneckLayer):
        return
    inner = [n for n, m in module.named_modules() if isinstance(m, AdapterLayer)]
    if inner:
        raise ValueError(f"{name!r} already holds adapter layers ({inner[0]!r}, ...): bottleneck adapters and "
                         "LoRA cannot share a sublayer yet; use one method per model")


def apply_bottleneck(model: nn.Module, config: BottleneckConfig, adapter_name: str) -> nn.Module:
    """Wrap each block's attention and/or MLP sublayer with `BottleneckLayer` and add `adapter_name`."""
    names = resolve_targets(model, config.sublayers(), None, _is_target, kind="attention/MLP sublayer")
    for name in names:
        _refuse_nested_adapters(name, model.get_submodule(name))
    slot = register_adapter(model, adapter_name, config)
    active = list(getattr(model, ACTIVE_ATTR, []))
    for name in names:
        module = model.get_submodule(name)
        if not isinstance(module, BottleneckLayer):
            module = BottleneckLayer(module)
            module.active_adapters = list(active)
            replace_module(model, name, module)
        module.add_adapter(adapter_name, slot, config)
    freeze_base(model)
    set_adapter(model, active or [adapter_name])
    return model


# ---------------------------------------------------------------------------------------------
# saving and loading (leantune's own format; PEFT has no bottleneck adapter)


_PARTS = ("adapter_down.weight", "adapter_down.bias", "adapter_up.weight", "adapter_up.bias")


def bottleneck_config(model: nn.Module, adapter_name: str) -> BottleneckConfig:
    require_adapter(model, adapter_name)
    cfg = adapter_configs(model)[adapter_name]
    if not isinstance(cfg, BottleneckConfig):
        raise ValueError(f"adapter {adapter_name!r} is a {type(cfg).__name__}, not a bottleneck adapter; "
                         "save LoRA adapters with save_adapter (PEFT format)")
    return cfg


def bottleneck_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """One adapter's tensors under `<module>.adapter_down.weight`-style keys (no adapter name), on CPU."""
    bottleneck_config(model, adapter_name)
    out = {}
    for name, layer in adapter_layers(model):
        if isinstance(layer, BottleneckLayer) and layer.has_adapter(adapter_name):
            for part in _PARTS:
                dict_name, attr = part.split(".")
                out[f"{name}.{part}"] = getattr(getattr(layer, dict_name)[adapter_name], attr)
    return {k: v.detach().to("cpu").contiguous() for k, v in out.items()}


def save_bottleneck(model: nn.Module, out_dir, adapter_name: str = "default",
                    base_model_name_or_path: str | None = None) -> Path:
    """Write one bottleneck adapter to `out_dir` (config last, each file renamed into place)."""
    from .adapter_io import _replace_in_folder

    cfg = bottleneck_config(model, adapter_name)
    tensors = bottleneck_state_dict(model, adapter_name)
    modules = sorted({k.rsplit(".", 2)[0] for k in tensors})
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "method": "bottleneck",
            "config": dataclasses.asdict(cfg), "modules": modules,
            "base_model_name_or_path": base_model_name_or_path or getattr(model, "name_or_path", None)}
    out_dir = Path(out_dir).absolute()
    out_dir.mkdir(parents=True, exist_ok=True)
    _replace_in_folder(out_dir, tensors, json.dumps(meta, indent=2, sort_keys=True), WEIGHTS_NAME, CONFIG_NAME)
    return out_dir


def read_bottleneck(path) -> tuple[BottleneckConfig, list[str], dict[str, torch.Tensor]]:
    """(config, module names, tensors) of a bottleneck adapter folder, checked for form."""
    from .adapter_io import read_format_folder

    meta, tensors = read_format_folder(path, CONFIG_NAME, WEIGHTS_NAME, FORMAT, FORMAT_VERSION, "bottleneck adapter")
    config_path = Path(path) / CONFIG_NAME
    try:
        cfg = BottleneckConfig(**meta["config"])
    except (TypeError, ValueError, KeyError) as e:
        raise ValueError(f"{config_path}: bad bottleneck config: {e}") from None
    return cfg, list(meta.get("modules") or []), tensors


def _check_tensors(model: nn.Module, adapter_name: str, modules: list[str], tensors: dict, path) -> None:
    index = module_index(model)
    layers = {n: m for n, m in index.items() if isinstance(m, BottleneckLayer) and m.has_adapter(adapter_name)}
    if sorted(layers) != sorted(modules):
        raise ValueError(f"{path} adapts modules {modules[:3]}..., but on this model its config targets "
                         f"{sorted(layers)[:3]}...; was it trained for a different base model?")
    expected = {}
    for name, layer in layers.items():
        for part in _PARTS:
            dict_name, attr = part.split(".")
            expected[f"{name}.{part}"] = tuple(getattr(getattr(layer, dict_name)[adapter_name], attr).shape)
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if got != expected:
        bad = sorted(set(got.items()) ^ set(expected.items()))[:3]
        raise ValueError(f"{path}: {WEIGHTS_NAME} does not fit this model (e.g. {bad}); different base model?")


def load_bottleneck(model: nn.Module, path, adapter_name: str = "default", trainable: bool = False) -> nn.Module:
    """Add a saved bottleneck adapter to `model` as `adapter_name`; frozen unless `trainable`."""
    cfg, modules, tensors = read_bottleneck(path)
    apply(model, "bottleneck", adapter_name=adapter_name, config=cfg)
    try:
        _check_tensors(model, adapter_name, modules, tensors, path)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for key, value in tensors.items():
                module, part = key.rsplit(".", 2)[0], key.rsplit(".", 2)[1:]
                params[f"{module}.{part[0]}.{adapter_name}.{part[1]}"].copy_(value)
    except BaseException:
        delete_adapter(model, adapter_name)
        raise
    set_adapter_trainable(model, adapter_name, trainable)
    return model


def _is_bottleneck_folder(path: Path) -> bool:
    return (Path(path) / CONFIG_NAME).is_file()


register_method("bottleneck", BottleneckConfig, apply_bottleneck, save=save_bottleneck, load=load_bottleneck,
                claims=_is_bottleneck_folder,
                help="bottleneck adapters (Houlsby / Pfeiffer), parallel or sequential; saved in leantune's "
                     "own format (bottleneck_config.json), as PEFT has none")

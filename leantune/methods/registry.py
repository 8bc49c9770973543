"""The method registry: `register_method(name, config_cls, apply_fn, **hooks)`, `apply(model, method, ...)`.

A method is one registration (PEFT's `PEFT_TYPE_TO_CONFIG_MAPPING` + tuner, in one place): a typed config
dataclass whose fields are its options (help text and CLI flag in the field's metadata, `leantune.fields.opt`),
`apply_fn(model, config, adapter_name) -> model`, which swaps target modules for wrapper layers in place (see
`base.AdapterLayer`), and optional hooks for what the recipes would otherwise special-case by name:

- `quantize(config)`: the base quantization to load the model with (`models.load_model(..., quantize=)`);
- `calibrate(config, ctx)`: a pass before apply, given a `CalibrationContext` (model, training examples, a
  loader for other data files); returns the config to apply;
- `save(model, out_dir, adapter_name, base_model_name_or_path)`: its own on-disk format (default: PEFT's);
- `load(model, path, adapter_name, trainable)` with `claims(path)`: reads the folders `claims` recognizes;
- `extra_files(model, out_dir)`: files written next to the adapter (QLoRA's 4-bit sidecar);
- `peft_state_dict(model, adapter_name)` and `peft_config(model, adapter_name, base_model_name_or_path)`: a
  PEFT format of its own (AdaLoRA's ADALORA), the tensors and `adapter_config.json` that `save_adapter`
  writes instead of LoRA's;
- `check_model(config, model_config)`: does the config fit the model (its `models.config.ModelConfig`, read
  from config.json before any weight)? Raises naming the option and what to change;
- `wrap(model) -> model`: a method whose adapters run beside the model rather than inside its layers (a side
  network) wraps the base, so a server can hold the wrapper before it loads such adapters (its `load` hook
  then returns the wrapper it was given); `apply` and `load` return the wrapper, which callers use;
- `lora_shaped`: its adapters are LoRA's rank-r pairs, which `leantune estimate` models;
- `cotrained`: a fine-tuning job of `leantune serve` may train it inside the serving loop (its config takes
  `r`, `alpha`, `targets`, `dropout`, and the packed forward's per-slot fused LoRA ops and the layer-sliced
  backward of `serve.cotrain` run it as they are);
- `memory`: a `memory.MemoryModel`, how `leantune estimate` counts a method that is not LoRA-shaped (what it
  trains, its copies, a side network); None: estimate does not model it (unless `lora_shaped`);
- `train_defaults(config) -> dict`: values it proposes for training options the user leaves unset (`lr`,
  `weight_decay`: SaRA's lr formula), which `recipes.finetune.FinetuneConfig` uses in place of its defaults;
- `trains_base`: it trains the model's own weights (full finetuning), which need fp32 weights; a folder its
  `claims` hook recognizes holds changes to those weights, so it loads into the base itself (see
  `changes_base_weights`), never as one adapter among others;
- `preflight(config, model)`: checks the options against the model's shapes before any weight is read; the
  recipe passes the model built on the meta device from its config alone (shapes, names, no data);
- `fit(model, config, runner) -> dict`: a method that trains in several phases, each with a fresh optimizer
  and schedule (LT-SFT's full then sparse phase), drives them itself through `runner.run(name, ...)`
  (`train.phases.PhaseRunner`) instead of the recipe's single `Trainer.fit()`; returns the last phase's result.

Nothing here knows about a particular method: each method's file registers itself when `leantune.methods`
is imported, and other packages add methods through the `leantune.methods` entry-point group, loaded once on
the first lookup (`list_methods`, `get_method`).
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from torch import nn

from ..fields import base_type
from .base import check_new_adapter_name
from .memory import MemoryModel

ENTRY_POINT_GROUP = "leantune.methods"
HOOKS = ("quantize", "calibrate", "save", "load", "claims", "extra_files", "peft_state_dict", "peft_config",
         "train_defaults", "preflight", "fit", "check_model", "wrap")


@dataclass(frozen=True)
class MethodSpec:
    name: str
    config_cls: type
    apply_fn: Callable[[nn.Module, object, str], nn.Module]
    help: str = ""  # one line for --method's help and the README's method table
    quantize: Callable[[object], Any] | None = None
    calibrate: Callable[[object, "CalibrationContext"], object] | None = None
    save: Callable[..., Any] | None = None
    load: Callable[..., nn.Module] | None = None
    claims: Callable[[Path], bool] | None = None
    extra_files: Callable[[nn.Module, Path], None] | None = None
    peft_state_dict: Callable[[nn.Module, str], dict] | None = None
    peft_config: Callable[[nn.Module, str, str | None], dict] | None = None
    train_defaults: Callable[[object], dict] | None = None
    preflight: Callable[[object, nn.Module], None] | None = None  # (config, meta-device model)
    fit: Callable[..., dict] | None = None  # (model, config, runner) -> result of the last phase
    check_model: Callable[[object, object], None] | None = None
    wrap: Callable[[nn.Module], nn.Module] | None = None
    lora_shaped: bool = False
    cotrained: bool = False
    trains_base: bool = False
    memory: MemoryModel | None = None  # see memory.py
    source: str = "leantune"  # or the entry point that registered it


@dataclass
class CalibrationContext:
    """What a calibration hook may use: the model (after loading), the training examples (objects with
    `input_ids`), `load(path)` reading another data file into such examples, the run's seed and a logger."""

    model: nn.Module
    examples: list
    load: Callable[[str], list]
    seed: int = 0
    log: Callable[[str], None] = print


@dataclass(frozen=True)
class MethodOption:
    """One option of a method: a field of its config class as the command line and YAML see it."""

    field: str  # the config field
    flag: str  # its command-line flag, e.g. "--rank" for LoraConfig.r
    type: type  # int, float, str or bool
    default: Any
    help: str
    parse: Callable[[Any], Any] | None = None  # turns the flag's value into the field's (e.g. --targets)

    @property
    def dest(self) -> str:  # the YAML key and argparse dest
        return self.flag[2:].replace("-", "_")


_METHODS: dict[str, MethodSpec] = {}
_plugins: dict[str, Any] = {"loaded": False, "error": None}


def register_method(name: str, config_cls: type, apply_fn: Callable, *, help: str = "",  # noqa: A002
                    lora_shaped: bool = False, cotrained: bool = False, trains_base: bool = False,
                    memory: MemoryModel | None = None, **hooks) -> MethodSpec:
    """Register (or replace) a method under `name`; `config_cls` must be a dataclass; hooks: see the module
    docstring. Returns the spec."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"method name must be a non-empty string, got {name!r}")
    if not dataclasses.is_dataclass(config_cls):
        raise TypeError(f"config_cls of method {name!r} must be a dataclass, got {config_cls!r}")
    if not callable(apply_fn):
        raise TypeError(f"apply_fn of method {name!r} must be callable")
    unknown = sorted(set(hooks) - set(HOOKS) - {"source"})
    if unknown:
        raise TypeError(f"register_method({name!r}): unknown hook(s) {unknown}; hooks are {list(HOOKS)}")
    bad = [k for k in HOOKS if hooks.get(k) is not None and not callable(hooks[k])]
    if bad:
        raise TypeError(f"register_method({name!r}): hook(s) {bad} must be callable")
    if memory is not None and not isinstance(memory, MemoryModel):
        raise TypeError(f"register_method({name!r}): memory must be a MemoryModel, got {type(memory).__name__}")
    spec = MethodSpec(name.lower(), config_cls, apply_fn, help=help, lora_shaped=lora_shaped, cotrained=cotrained,
                      trains_base=trains_base, memory=memory, **hooks)
    method_options(spec)  # an option the command line cannot take is a registration error, not a late one
    _METHODS[spec.name] = spec
    return spec


def load_plugins() -> None:
    """Register the methods of the `leantune.methods` entry points, once. A plug-in that fails to load stops
    every lookup with one error naming its entry point (and the package it comes from)."""
    if _plugins["loaded"]:
        if _plugins["error"] is not None:
            raise _plugins["error"]
        return
    _plugins["loaded"] = True
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            _load_entry_point(ep)
        except Exception as e:  # noqa: BLE001 - any failure of third-party code becomes one clear error
            dist = getattr(getattr(ep, "dist", None), "name", None)
            where = f" of package {dist!r}" if dist else ""
            _plugins["error"] = ValueError(
                f"the {ENTRY_POINT_GROUP} entry point {ep.name!r} ({ep.value}){where} failed to load: "
                f"{type(e).__name__}: {e}; fix or uninstall that package")
            raise _plugins["error"] from None


def _load_entry_point(ep) -> None:
    """An entry point names a MethodSpec, a function that registers (or returns) one, or a module whose
    import registers its methods."""
    before = set(_METHODS)
    obj = ep.load()
    if callable(obj) and not isinstance(obj, (type, MethodSpec)):
        obj = obj()
    if isinstance(obj, MethodSpec):
        _METHODS[obj.name] = dataclasses.replace(obj, source=f"entry point {ep.name}")
    new = set(_METHODS) - before
    if not new and not isinstance(obj, MethodSpec):
        raise ValueError("it registered no method (point it at a MethodSpec, a function that calls "
                         "leantune.methods.register_method, or a module that does)")
    for name in new:
        _METHODS[name] = dataclasses.replace(_METHODS[name], source=f"entry point {ep.name}")


def reset_plugins() -> None:
    """Forget which entry points were loaded (tests; a package installed while running)."""
    _plugins.update(loaded=False, error=None)


def get_method(name: str) -> MethodSpec:
    load_plugins()
    spec = _METHODS.get(str(name).lower())
    if spec is None:
        raise ValueError(f"unknown method {name!r}; registered methods: {list_methods()}")
    return spec


def list_methods() -> list[str]:
    load_plugins()
    return sorted(_METHODS)


def method_specs() -> list[MethodSpec]:
    return [_METHODS[n] for n in list_methods()]


def spec_for_config(config) -> MethodSpec | None:
    """The method an adapter's config belongs to: the one registered with its exact class, else the nearest
    registered base class (a LoraConfig built from a PEFT file is "lora")."""
    specs = method_specs()
    for cls in type(config).__mro__:
        for spec in specs:
            if spec.config_cls is cls:
                return spec
    return None


def spec_for_folder(path) -> MethodSpec | None:
    """The method whose `claims` hook recognizes the adapter folder `path`, or None (PEFT's LoRA format)."""
    for spec in method_specs():
        if spec.claims is not None and spec.load is not None and spec.claims(Path(path)):
            return spec
    return None


def changes_base_weights(path) -> MethodSpec | None:
    """The method whose saved folder `path` changes the base's own weights (a `trains_base` method's format,
    e.g. a sparse diff), or None. Such a folder is applied to the base itself: a server holding one base for
    several adapters can take it only at start-up, never as a hot-loaded adapter beside others."""
    spec = spec_for_folder(path)
    return spec if spec is not None and spec.trains_base else None


def config_fields(config_cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(config_cls) if f.init]


_SIMPLE = (int, float, str, bool)


def method_options(method) -> list[MethodOption]:
    """The options of a method (a name, spec or config class): its config's init fields of a simple type
    (int, float, str, bool) not marked `cli=False`, with their flags (`flag=` in the metadata, else
    `--field-name`)."""
    cls = method if isinstance(method, type) else (method if isinstance(method, MethodSpec)
                                                    else get_method(method)).config_cls
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        tp = base_type(hints[f.name])
        if not f.init or f.metadata.get("cli") is False or tp not in _SIMPLE:
            continue
        flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
        if not flag.startswith("--"):
            raise ValueError(f"{cls.__name__}.{f.name}: flag {flag!r} must start with '--'")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        out.append(MethodOption(f.name, flag, tp, default, f.metadata.get("help", ""), f.metadata.get("parse")))
    return out


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

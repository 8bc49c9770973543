"""LoRA adapters on disk in PEFT's format (peft 0.21.2 `save_pretrained` / `from_pretrained`).

A folder holds `adapter_config.json` (PEFT's full LoRA key set, keys sorted, indent 2) and
`adapter_model.safetensors` (metadata `{"format": "pt"}`) with keys
`base_model.model.<module path>.lora_A.weight` ([r, in]), `.lora_B.weight` ([out, r]) and
`.lora_B.bias` ([out], only with `lora_bias`), and for DoRA (`use_dora: true`) `.lora_magnitude_vector`
([out], no `.weight` suffix, as PEFT strips it); the adapter name is not part of the keys. With
`bias="all"|"lora_only"` the trained base biases are saved too, under their in-memory names
(`...q_proj.base_layer.bias` for a wrapped layer), as PEFT does. Only safetensors are read: pickle
files (`adapter_model.bin`) are refused.

An adapter whose init moved the base weights (CorDA) is saved as what training changed relative to
its init, so the file applies to the ORIGINAL base, as PEFT's
`save_pretrained(path_initial_model_for_weight_conversion=...)` does (`set_initial_lora`).

Saving is atomic: a new folder is built under a temporary name and renamed; in an existing folder
the files are staged under temporary names, the old config is removed first, and the config is
renamed into place last, so a crash never leaves a folder that looks complete but is not.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .base import (
    adapter_configs, adapter_layers, bias_parameters, delete_adapter, require_adapter,
    set_adapter_trainable,
)
from .lora import LoraConfig, LoraLinear, is_lora_target
from .lora_experts import LoraExperts, expert_targets, saved_target_parameters
from .registry import apply, spec_for_config, spec_for_folder
from .targets import is_all_linear, linear_sample, module_index, resolve_targets, suffix_targets

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
PREFIX = "base_model.model."
PEFT_FORMAT_VERSION = "0.21.2"  # the peft release whose on-disk format this file writes

# every key peft 0.21.2 writes for a LoRA adapter, with its default value
PEFT_LORA_DEFAULTS = {
    "alora_invocation_tokens": None, "alpha_pattern": {}, "arrow_config": None, "auto_mapping": None,
    "base_model_name_or_path": None, "bias": "none", "corda_config": None,
    "ensure_weight_tying": False, "eva_config": None, "exclude_modules": None,
    "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
    "kasa_config": None, "layer_replication": None, "layers_pattern": None,
    "layers_to_transform": None, "loftq_config": {}, "lora_alpha": 8, "lora_bias": False,
    "lora_dropout": 0.0, "lora_ga_config": None, "megatron_config": None,
    "megatron_core": "megatron.core", "modules_to_save": None, "monteclora_config": None,
    "peft_type": "LORA", "peft_version": PEFT_FORMAT_VERSION, "qalora_group_size": 16, "r": 8,
    "rank_pattern": {}, "revision": None, "target_modules": None, "target_parameters": None,
    "task_type": "CAUSAL_LM", "trainable_token_indices": None, "use_bdlora": None,
    "use_dora": False, "use_qalora": False, "use_rslora": False, "velora_config": None,
}

# config keys that do not change what the weights compute
_INFORMATIONAL = {
    "auto_mapping", "base_model_name_or_path", "revision", "inference_mode", "peft_version",
    "task_type", "megatron_core", "qalora_group_size", "ensure_weight_tying", "loftq_config",
    "eva_config", "corda_config", "lora_ga_config", "runtime_config", "layers_pattern",
}
_READ = {
    "peft_type", "r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules",
    "use_rslora", "use_dora", "bias", "lora_bias", "init_lora_weights", "rank_pattern", "alpha_pattern",
    "target_parameters",
}
# options leantune does not implement: refused when set, with the reason shown
_UNSUPPORTED = {
    "use_qalora": "QA-LoRA is not supported yet",
    "fan_in_fan_out": "fan_in_fan_out (GPT-2 style Conv1D layers) is not supported",
    "modules_to_save": "modules_to_save (fully trained extra modules) is not supported yet",
    "layers_to_transform": "layers_to_transform is not supported yet",
    "layer_replication": "layer_replication is not supported",
    "trainable_token_indices": "trainable_token_indices is not supported",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) is not supported",
    "arrow_config": "Arrow routing is not supported",
    "velora_config": "VeLoRA is not supported",
    "monteclora_config": "MonteCLoRA is not supported",
    "kasa_config": "KaSA is not supported",
    "use_bdlora": "BD-LoRA is not supported",
    "megatron_config": "Megatron parallel layers are not supported",
}
# init_lora_weights values whose adapters are plain LoRA on the unchanged base
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal", "mica")


# ---------------------------------------------------------------------------------------------
# adapters whose init moved the base weights

# model.leantune_initial_lora[adapter] = (config, {module: (A0, B0)}); the config identifies the adapter
# it was recorded for, so a later adapter reusing the name is not converted by mistake
INITIAL_LORA_ATTR = "leantune_initial_lora"


def set_initial_lora(model: nn.Module, adapter_name: str, factors: dict) -> None:
    """Record the initial (A0, B0) per module of an adapter whose init wrote W − s·B0 A0 into the base."""
    require_adapter(model, adapter_name)
    record = getattr(model, INITIAL_LORA_ATTR, None)
    if record is None:
        record = {}
        setattr(model, INITIAL_LORA_ATTR, record)
    record[adapter_name] = (adapter_configs(model)[adapter_name], dict(factors))


def initial_lora(model: nn.Module, adapter_name: str) -> dict | None:
    """{module: (A0, B0)} recorded for this adapter, or None (a plain LoRA on the unchanged base)."""
    config, factors = getattr(model, INITIAL_LORA_ATTR, {}).get(adapter_name, (None, None))
    return factors if config is not None and adapter_configs(model).get(adapter_name) is config else None


def _subtract_initial(out: dict, initial: dict) -> dict:
    """PEFT's `subtract_mutated_init`: s(B A − B0 A0) = s [B, −B0] [A; A0], a rank-2r LoRA on the
    original base W = W_res + s B0 A0. A LoRA bias starts at 0, so it needs nothing."""
    for name, (a0, b0) in initial.items():
        ka, kb = f"{PREFIX}{name}.lora_A.weight", f"{PREFIX}{name}.lora_B.weight"
        out[ka] = torch.cat([out[ka].detach().cpu(), a0.to(out[ka].dtype)], dim=0)  # (2r, in)
        out[kb] = torch.cat([out[kb].detach().cpu(), -b0.to(out[kb].dtype)], dim=1)  # (out, 2r)
    return out


def _doubled_ranks(cfg: LoraConfig) -> dict:
    """r, alpha and patterns of the rank-2r conversion, chosen so every layer keeps its scaling."""
    grow = 2 ** 0.5 if cfg.use_rslora else 2  # alpha / sqrt(2r) or alpha / 2r stays alpha / sqrt(r) or / r
    return dict(r=2 * cfg.r, lora_alpha=cfg.alpha * grow,
                rank_pattern={k: 2 * v for k, v in cfg.rank_pattern.items()},
                alpha_pattern={k: v * grow for k, v in cfg.alpha_pattern.items()})


# ---------------------------------------------------------------------------------------------
# saving


def adapter_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The tensors of one adapter under PEFT's on-disk keys (CPU, contiguous)."""
    spec = spec_for_config(adapter_configs(model).get(adapter_name))
    if spec is not None and spec.peft_state_dict is not None:  # e.g. AdaLoRA's own keys (lora_A/B/E)
        return spec.peft_state_dict(model, adapter_name)
    cfg = _lora_config(model, adapter_name)
    out = {}
    for name, layer in adapter_layers(model):
        if isinstance(layer, (LoraLinear, LoraExperts)) and layer.has_adapter(adapter_name):
            out[f"{PREFIX}{name}.lora_A.weight"] = layer.lora_A[adapter_name].weight
            out[f"{PREFIX}{name}.lora_B.weight"] = layer.lora_B[adapter_name].weight
            if layer.lora_B[adapter_name].bias is not None:
                out[f"{PREFIX}{name}.lora_B.bias"] = layer.lora_B[adapter_name].bias
            if adapter_name in layer.lora_magnitude_vector:  # DoRA
                out[f"{PREFIX}{name}.lora_magnitude_vector"] = layer.lora_magnitude_vector[adapter_name].weight
    for pname, p in bias_parameters(model, adapter_name, cfg.bias).items():
        out[PREFIX + pname] = p
    initial = initial_lora(model, adapter_name)
    if initial is not None:
        out = _subtract_initial(out, initial)
    return {k: v.detach().to("cpu").contiguous() for k, v in out.items()}


def _lora_config(model: nn.Module, adapter_name: str) -> LoraConfig:
    require_adapter(model, adapter_name)
    cfg = adapter_configs(model)[adapter_name]
    if not isinstance(cfg, LoraConfig):
        raise ValueError(
            f"adapter {adapter_name!r} is a {type(cfg).__name__}; only LoRA adapters can be saved in PEFT format"
        )
    return cfg


def peft_config_dict(model: nn.Module, adapter_name: str = "default",
                     base_model_name_or_path: str | None = None) -> dict:
    """`adapter_config.json` of one adapter, as peft 0.21.2 writes it."""
    spec = spec_for_config(adapter_configs(model).get(adapter_name))
    if spec is not None and spec.peft_config is not None:  # e.g. AdaLoRA's ADALORA config
        return spec.peft_config(model, adapter_name, base_model_name_or_path)
    cfg = _lora_config(model, adapter_name)
    out = dict(PEFT_LORA_DEFAULTS)
    out.update(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, use_rslora=cfg.use_rslora,
        use_dora=cfg.use_dora,
        target_modules=_saved_targets(model, adapter_name, cfg), exclude_modules=cfg.exclude,
        bias=cfg.bias, lora_bias=cfg.lora_bias, rank_pattern=dict(cfg.rank_pattern),
        alpha_pattern=dict(cfg.alpha_pattern),
        init_lora_weights=True if cfg.init == "default" else cfg.init,
        base_model_name_or_path=base_model_name_or_path or _model_name(model),
        revision=getattr(model, "revision", None),
        target_parameters=saved_target_parameters(model, adapter_name),
    )
    if initial_lora(model, adapter_name) is not None:
        out.update(_doubled_ranks(cfg))
    return out


def _saved_targets(model: nn.Module, adapter_name: str, cfg: LoraConfig):
    if not is_all_linear(cfg.targets):
        return cfg.targets if isinstance(cfg.targets, str) else sorted(set(cfg.targets))
    wrapped = [n for n, layer in adapter_layers(model)
               if layer.has_adapter(adapter_name) and not isinstance(layer, LoraExperts)]  # (target_parameters)
    return suffix_targets(model, wrapped, cfg.exclude, is_lora_target) or sorted(wrapped)


def _model_name(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    name = getattr(config, "_name_or_path", None) or getattr(config, "name_or_path", None)
    return name or getattr(model, "name_or_path", None) or None


def save_adapter(model: nn.Module, out_dir, adapter_name: str = "default",
                 base_model_name_or_path: str | None = None) -> Path:
    """Write adapter `adapter_name` to `out_dir` in PEFT's format, atomically; returns the folder."""
    tensors = adapter_state_dict(model, adapter_name)
    config = peft_config_dict(model, adapter_name, base_model_name_or_path)
    text = json.dumps(config, indent=2, sort_keys=True)
    out_dir = Path(out_dir).absolute()
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"cannot save the adapter to {out_dir}: it exists and is not a folder")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    if out_dir.exists():
        _replace_in_folder(out_dir, tensors, text)
    else:
        _write_new_folder(out_dir, tensors, text)
    return out_dir


def save(model: nn.Module, out_dir, adapter_name: str = "default",
         base_model_name_or_path: str | None = None) -> Path:
    """Write adapter `adapter_name` in its method's format (the method's `save` hook; PEFT's by default) and
    the method's extra files next to it (its `extra_files` hook, e.g. QLoRA's 4-bit sidecar)."""
    require_adapter(model, adapter_name)
    spec = spec_for_config(adapter_configs(model)[adapter_name])
    writer = spec.save if spec is not None and spec.save is not None else save_adapter
    out = writer(model, out_dir, adapter_name=adapter_name, base_model_name_or_path=base_model_name_or_path)
    if spec is not None and spec.extra_files is not None:
        spec.extra_files(model, Path(out_dir))
    return out


def _write_files(folder: Path, weights_name: str, config_name: str, tensors, text: str) -> None:
    save_file(tensors, str(folder / weights_name), metadata={"format": "pt"})
    _fsync(folder / weights_name)
    with open(folder / config_name, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _write_new_folder(out_dir: Path, tensors, text: str) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        _write_files(tmp, WEIGHTS_NAME, CONFIG_NAME, tensors, text)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync(out_dir.parent)


def _replace_in_folder(out_dir: Path, tensors, text: str, weights_name: str = WEIGHTS_NAME,
                       config_name: str = CONFIG_NAME) -> None:
    """Write a weights + config pair into an existing folder: both staged under temp names, the old config
    removed first (the folder looks incomplete from then on), the config renamed into place last."""
    tag = uuid.uuid4().hex[:8]
    staged = [out_dir / f".{weights_name}.{tag}.tmp", out_dir / f".{config_name}.{tag}.tmp"]
    try:
        _write_files(out_dir, staged[0].name, staged[1].name, tensors, text)
        (out_dir / config_name).unlink(missing_ok=True)
        os.replace(staged[0], out_dir / weights_name)
        os.replace(staged[1], out_dir / config_name)
    finally:
        for path in staged:
            path.unlink(missing_ok=True)
    _fsync(out_dir)


def read_format_folder(path, config_name: str, weights_name: str, fmt: str, version: int,
                       what: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config JSON, tensors) of a folder in one of leantune's own formats (a bottleneck adapter, a QST side
    network, a sparse diff): both files present, the JSON valid, its `format` and `format_version` this
    format's; `what` names the kind of folder in the errors. The tensors load on the CPU."""
    path = Path(path)
    config_path, weights_path = path / config_name, path / weights_name
    if not config_path.is_file() or not weights_path.is_file():
        raise FileNotFoundError(f"{path} is not a {what} folder: it needs {config_name} and {weights_name}")
    try:
        meta = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{config_path} is not valid JSON: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != fmt or meta.get("format_version") != version:
        raise ValueError(f"{config_path}: expected format {fmt!r} version {version}")
    return meta, load_file(str(weights_path), device="cpu")


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot fsync a folder
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# loading


def read_adapter(path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config.json as a dict, tensors) of a PEFT-format adapter folder, checked for presence."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"adapter folder {path} does not exist")
    config_path, weights_path = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"{path} has no {CONFIG_NAME}; is it a PEFT adapter folder?{_subfolder_hint(path)}")
    if not weights_path.is_file():
        if (path / PICKLE_NAME).is_file():
            raise ValueError(
                f"{path} holds {PICKLE_NAME}, a pickle file, which leantune never loads (it can run code); "
                f"convert it to {WEIGHTS_NAME} with safetensors in an environment you trust"
            )
        raise FileNotFoundError(f"{path} has {CONFIG_NAME} but no {WEIGHTS_NAME}")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{config_path} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_path} must hold a JSON object, got {type(config).__name__}")
    return config, load_file(str(weights_path), device="cpu")


def peft_type(path) -> str | None:
    """The `peft_type` of the adapter folder `path`'s config, or None where it has no readable one."""
    try:
        config = json.loads((Path(path) / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return config.get("peft_type") if isinstance(config, dict) else None


def _subfolder_hint(path: Path) -> str:
    subs = sorted(p.name for p in path.iterdir() if (p / CONFIG_NAME).is_file())
    return f" It has adapters in subfolders {subs}: pass one of those folders." if subs else ""


def lora_config_from_peft(config: dict, path="adapter") -> LoraConfig:
    """Map a PEFT `adapter_config.json` to a LoraConfig, refusing options leantune does not implement."""
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise ValueError(f"{path}: unsupported peft_type {peft_type!r}; leantune loads LORA adapters only")
    for key, value in config.items():
        if key in _UNSUPPORTED and value:
            raise ValueError(f"{path}: {_UNSUPPORTED[key]} ({key}={value!r} in {CONFIG_NAME})")
        if key not in _UNSUPPORTED and key not in _READ and key not in _INFORMATIONAL and value:
            raise ValueError(f"{path}: unknown option {key}={value!r} in {CONFIG_NAME}; leantune cannot load it safely")
    init = config.get("init_lora_weights", True)
    if init not in _PLAIN_INITS:
        raise ValueError(
            f"{path}: init_lora_weights={init!r} changes the base weights, so this adapter only works on "
            "its modified base; convert it to plain LoRA with PEFT "
            "(save_pretrained(..., path_initial_model_for_weight_conversion=...)) first"
        )
    if config.get("target_modules") is None:
        raise ValueError(f"{path}: {CONFIG_NAME} has no target_modules")
    try:
        return LoraConfig(
            r=config.get("r", 8), alpha=config.get("lora_alpha", 8),
            dropout=config.get("lora_dropout", 0.0), targets=config["target_modules"],
            exclude=config.get("exclude_modules"), use_rslora=config.get("use_rslora", False),
            use_dora=config.get("use_dora", False),
            bias=config.get("bias", "none"), lora_bias=config.get("lora_bias", False),
            init="gaussian" if init == "gaussian" else "default",
            rank_pattern=config.get("rank_pattern") or {}, alpha_pattern=config.get("alpha_pattern") or {},
            target_parameters=config.get("target_parameters") or None,
        )
    except ValueError as e:
        raise ValueError(f"{path}: bad {CONFIG_NAME}: {e}") from None


_LORA_KEY = re.compile(r"(.+)\.(lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_magnitude_vector)")


def split_tensors(tensors: dict, path="adapter") -> tuple[dict[str, dict], dict[str, torch.Tensor]]:
    """({module: {"lora_A.weight": ..}}, {base bias key: tensor}) with `base_model.model.` removed."""
    lora: dict[str, dict] = {}
    biases: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        k = key[len(PREFIX):] if key.startswith(PREFIX) else key
        if "lora_embedding_" in k:
            raise ValueError(f"{path}: LoRA on embedding layers is not supported yet (tensor {key!r})")
        match = _LORA_KEY.fullmatch(k)
        if match:
            lora.setdefault(match.group(1), {})[match.group(2)] = value
        elif k.endswith(".bias"):
            biases[k] = value
        else:
            raise ValueError(f"{path}: unexpected tensor {key!r} in {WEIGHTS_NAME}; it is not a LoRA weight")
    return lora, biases


def _other_model(path, what: str) -> ValueError:
    return ValueError(f"adapter {path} was trained for a different base model: {what}")


def check_fits(model: nn.Module, cfg: LoraConfig, lora: dict, biases: dict, path) -> None:
    """Every tensor names a module of `model` with matching shapes, and covers the config's targets."""
    index = module_index(model)
    lora = _check_expert_lora(model, cfg, lora, path)
    for name, parts in lora.items():
        module = index.get(name)
        if module is None or not is_lora_target(module):
            found = "does not have" if module is None else f"has as a {type(module).__name__}"
            raise _other_model(path, f"it has LoRA weights for module {name!r}, which this model {found} "
                                     f"({linear_sample(index, is_lora_target)})")
        _check_lora_shapes(module, name, parts, cfg, path)
    for key, value in biases.items():
        _check_bias(index, key, value, path)
    _check_coverage(model, cfg, set(lora), path)


def expert_lora_keys(model: nn.Module, cfg: LoraConfig) -> dict[str, tuple[int, int, int]]:
    """{PEFT module path of each expert wrapper cfg makes: (E, out, in)}; nested as PEFT nests them (the first
    targeted parameter of a module innermost, one `.base_layer` per wrapper outside it)."""
    pairs = expert_targets(model, cfg.target_parameters, is_all_linear(cfg.targets))
    out = {}
    for mname, pname in pairs:
        params = [p for m, p in pairs if m == mname]
        core = model.get_submodule(mname)
        while isinstance(core, LoraExperts):
            core = core.base_layer
        key = mname + ".base_layer" * (len(params) - 1 - params.index(pname))
        out[key] = tuple(getattr(core, pname).shape)
    return out


def _check_expert_lora(model: nn.Module, cfg: LoraConfig, lora: dict, path) -> dict:
    """Check the expert LoRA tensors (target_parameters) and return the other (module) ones."""
    want = expert_lora_keys(model, cfg)
    missing = sorted(set(want) - set(lora))
    if missing:
        raise ValueError(f"{path}: {WEIGHTS_NAME} has no weights for the expert parameters {missing[:3]}, which "
                         f"target_parameters={cfg.target_parameters} in {CONFIG_NAME} adapts")
    for key, (E, n_out, n_in) in want.items():
        parts, r = lora[key], cfg.rank_for(key)
        a, b = tuple(parts["lora_A.weight"].shape), tuple(parts["lora_B.weight"].shape)
        if a != (r * E, n_in) or b != (n_out, r * E) or set(parts) != {"lora_A.weight", "lora_B.weight"}:
            raise _other_model(path, f"expert weights {key!r} ({E} experts, {n_out}x{n_in}, rank {r}) expect lora_A "
                                     f"{(r * E, n_in)} and lora_B {(n_out, r * E)}, but the adapter has {a} and {b}")
    return {k: v for k, v in lora.items() if k not in want}


def _check_lora_shapes(module: nn.Module, name: str, parts: dict, cfg: LoraConfig, path) -> None:
    if "lora_A.weight" not in parts or "lora_B.weight" not in parts:
        raise ValueError(f"{path}: module {name!r} lacks lora_A.weight or lora_B.weight in {WEIGHTS_NAME}")
    if ("lora_B.bias" in parts) != cfg.lora_bias:
        raise ValueError(f"{path}: lora_bias={cfg.lora_bias} in {CONFIG_NAME} disagrees with the tensors of {name!r}")
    if ("lora_magnitude_vector" in parts) != cfg.use_dora:
        raise ValueError(f"{path}: use_dora={cfg.use_dora} in {CONFIG_NAME}, but module {name!r} "
                         f"{'lacks' if cfg.use_dora else 'has'} a DoRA lora_magnitude_vector in {WEIGHTS_NAME}")
    a, b = tuple(parts["lora_A.weight"].shape), tuple(parts["lora_B.weight"].shape)
    r, n_in, n_out = cfg.rank_for(name), module.in_features, module.out_features
    if len(a) != 2 or len(b) != 2 or a[1] != n_in or b[0] != n_out:
        raise _other_model(path, (
            f"module {name!r} is a {n_out}x{n_in} (out x in) layer here, so it expects lora_A of shape "
            f"({r}, {n_in}) and lora_B of shape ({n_out}, {r}), but the adapter has {a} and {b}"))
    if a[0] != r or b[1] != r:
        raise ValueError(f"{path}: {CONFIG_NAME} gives module {name!r} rank {r}, but its tensors have {a} and {b}")
    for key in ("lora_B.bias", "lora_magnitude_vector"):
        shape = tuple(parts[key].shape) if key in parts else (n_out,)
        if shape != (n_out,):
            raise _other_model(path, f"{key} of {name!r} has shape {shape}, expected ({n_out},)")


def _check_bias(index: dict, key: str, value: torch.Tensor, path) -> None:
    owner = _bias_owner(index, key)
    bias = getattr(owner, "bias", None) if owner is not None else None
    if not isinstance(bias, torch.Tensor):
        raise _other_model(path, f"it has a bias {key!r} that this model does not have")
    if bias.shape != value.shape:
        raise _other_model(path, (f"bias {key!r} has shape {tuple(bias.shape)} in this model, "
                                  f"but {tuple(value.shape)} in the adapter"))


def _bias_owner(index: dict, key: str) -> nn.Module | None:
    module_name = re.sub(r"\.base_layer(?=\.|$)", "", key[: -len(".bias")])
    module = index.get(module_name)
    return module.base_layer if isinstance(module, LoraLinear) else module


def _check_coverage(model: nn.Module, cfg: LoraConfig, have: set[str], path) -> None:
    try:
        wanted = set(resolve_targets(model, cfg.targets, cfg.exclude, is_lora_target))
    except ValueError as e:
        raise _other_model(path, f"the target_modules of its {CONFIG_NAME} do not fit this model: {e}") from None
    missing, extra = sorted(wanted - have), sorted(have - wanted)
    if missing:
        raise ValueError(f"{path}: {WEIGHTS_NAME} has no weights for {missing[:5]}, which {CONFIG_NAME} targets; "
                         "the adapter is incomplete")
    if extra:
        raise ValueError(f"{path}: {WEIGHTS_NAME} has weights for {extra[:5]}, which {CONFIG_NAME} does not target")


def load_adapter(model: nn.Module, path, adapter_name: str = "default", trainable: bool = False) -> nn.Module:
    """Add the adapter in folder `path` to `model` as `adapter_name`; returns the model.

    A PEFT-format LoRA adapter, or any folder a registered method's `claims` hook recognizes (read by its
    `load` hook: AdaLoRA, bottleneck adapters, ...). Everything is checked before the model is touched. The adapter is frozen unless `trainable`.
    """
    spec = spec_for_folder(path)  # a method with its own format (or PEFT variant) reads its folders
    if spec is not None:
        return spec.load(model, path, adapter_name=adapter_name, trainable=trainable)
    config, tensors = read_adapter(path)
    return load_lora_contents(model, config, tensors, adapter_name, trainable, path)


def load_lora_contents(model: nn.Module, config: dict, tensors: dict[str, torch.Tensor], adapter_name: str = "default",
                       trainable: bool = False, path="adapter") -> nn.Module:
    """`load_adapter` of a PEFT LoRA folder's contents already in memory (`adapter_config.json` as a dict, the
    tensors under PEFT's keys, e.g. `peft_config_dict` and `adapter_state_dict` of an adapter taken out of the
    model: a server spilling adapters to host memory puts them back so, without reading disk); `path` names the
    source in errors."""
    cfg = lora_config_from_peft(config, path)
    lora, biases = split_tensors(tensors, path)
    check_fits(model, cfg, lora, biases, path)
    apply(model, "lora", adapter_name=adapter_name, config=cfg)
    try:
        _copy_weights(model, adapter_name, lora, biases)
    except BaseException:
        delete_adapter(model, adapter_name)
        raise
    set_adapter_trainable(model, adapter_name, trainable)
    return model


@torch.no_grad()
def _copy_weights(model: nn.Module, adapter_name: str, lora: dict, biases: dict) -> None:
    index = module_index(model)
    for name, parts in lora.items():
        layer = index[name] if name in index else model.get_submodule(name)  # (an inner expert wrapper)
        layer.lora_A[adapter_name].weight.copy_(parts["lora_A.weight"])
        layer.lora_B[adapter_name].weight.copy_(parts["lora_B.weight"])
        if "lora_B.bias" in parts:
            layer.lora_B[adapter_name].bias.copy_(parts["lora_B.bias"])
        if "lora_magnitude_vector" in parts:
            layer.lora_magnitude_vector[adapter_name].weight.copy_(parts["lora_magnitude_vector"])
    for key, value in biases.items():
        _bias_owner(index, key).bias.copy_(value)

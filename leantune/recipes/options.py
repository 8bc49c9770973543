"""Recipe configs as typed dataclasses, and the one mapping from them to command-line flags and YAML.

Each field becomes `--kebab-case-name`; help text lives in the field's metadata. Precedence:
dataclass default < recipe preset < `--config file.yaml` < explicit flags.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from pathlib import Path
from typing import Any


def _base_type(tp):
    origin = typing.get_origin(tp)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0])
    return tp


def add_dataclass_args(parser: argparse.ArgumentParser, cls) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("cli") is False:
            continue
        flag = "--" + f.name.replace("_", "-")
        tp = _base_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        helptext = f.metadata.get("help", "") + (f" (default: {default})" if default not in (None, "", [], {}) else "")
        kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": helptext}
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif typing.get_origin(tp) is list:
            parser.add_argument(flag, action="append", metavar=f.metadata.get("metavar", "VALUE"), **kw)
        else:
            parser.add_argument(flag, type=tp if tp in (int, float) else str, metavar=f.metadata.get("metavar"), **kw)


def read_yaml(path: str) -> dict:
    import yaml

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"--config {path}: file not found")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"--config {path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a mapping of option: value")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def _coerce(value, tp, name: str, source: str):
    """A YAML value as the field's type: YAML 1.1 reads `1e-3` as a string, and a wrong type should be named
    here, not fail later inside a comparison."""
    if value is None:
        return None
    if typing.get_origin(tp) is list:
        items = value if isinstance(value, list) else [value]
        if all(isinstance(v, str) for v in items):
            return list(items)
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp in (int, float) and not isinstance(value, bool):
        try:
            out = tp(value)
            if tp is float or out == float(value):
                return out
        except (TypeError, ValueError):
            pass
    elif tp is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    kind = "a list of strings" if typing.get_origin(tp) is list else getattr(tp, "__name__", str(tp))
    raise ValueError(f"{source}: option {name} must be {kind}, got {value!r}")


def build_config(cls, args: argparse.Namespace, preset: dict | None = None):
    """Merge defaults < preset < YAML (--config) < flags into an instance of `cls`; also returns the
    set of field names the user gave explicitly (YAML or flags)."""
    names = {f.name for f in dataclasses.fields(cls)}
    flags = {k: v for k, v in vars(args).items() if k in names}
    yaml_vals = read_yaml(args.config) if getattr(args, "config", None) else {}
    unknown = sorted(set(yaml_vals) - names)
    if unknown:
        raise ValueError(f"--config {args.config}: unknown option(s) {unknown}; see --help for the valid ones")
    hints = typing.get_type_hints(cls)
    yaml_vals = {k: _coerce(v, _base_type(hints[k]), k, f"--config {args.config}") for k, v in yaml_vals.items()}
    explicit = set(yaml_vals) | set(flags)
    values = {**(preset or {}), **yaml_vals, **flags}
    return cls(**values), explicit


def apply_preset(cfg, preset: dict, explicit: set[str]):
    """Return cfg with preset values for the fields the user did not set."""
    return dataclasses.replace(cfg, **{k: v for k, v in preset.items() if k not in explicit})

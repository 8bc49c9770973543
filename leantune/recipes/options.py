"""Recipe configs as typed dataclasses, and the one mapping from them to command-line flags and YAML.

Each field becomes `--kebab-case-name`; help text lives in the field's metadata. Precedence:
dataclass default < recipe preset < `--config file.yaml` < explicit flags.

Method options (`add_method_args`, `method_config`) come from the registered methods' config classes
(`methods.registry.method_options`): each flag is added once, in an argument group of the one method that
takes it or of the several that share it (`--rank`), and an option given for a method that does not take it
is refused, naming the methods that do.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from pathlib import Path
from typing import Any

from ..fields import base_type


def _default_text(default) -> str:
    return f" (default: {default})" if default not in (None, "", [], {}) else ""


def cli_fields(cls) -> list:
    return [f for f in dataclasses.fields(cls) if f.metadata.get("cli") is not False]


def add_dataclass_args(parser: argparse.ArgumentParser, cls) -> None:
    hints = typing.get_type_hints(cls)
    for f in cli_fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        helptext = f.metadata.get("help", "")
        helptext = (helptext() if callable(helptext) else helptext) + _default_text(default)
        _add_flag(parser, "--" + f.name.replace("_", "-"), f.name, base_type(hints[f.name]), helptext,
                  f.metadata.get("metavar"))


def _add_flag(parser, flag: str, dest: str, tp, helptext: str, metavar=None) -> None:
    kw: dict[str, Any] = {"dest": dest, "default": argparse.SUPPRESS, "help": helptext}
    if tp is bool:
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
    elif typing.get_origin(tp) is list:
        parser.add_argument(flag, action="append", metavar=metavar or "VALUE", **kw)
    else:
        parser.add_argument(flag, type=tp if tp in (int, float) else str, metavar=metavar, **kw)


# ---------------------------------------------------------------------------------------------
# method options


def method_flags() -> dict[str, dict[str, Any]]:
    """{dest: {method: its MethodOption}} over every registered method (dest: the flag without dashes)."""
    from ..methods.registry import list_methods, method_options

    out: dict[str, dict[str, Any]] = {}
    for name in list_methods():
        for o in method_options(name):
            out.setdefault(o.dest, {})[name] = o
    for per in out.values():
        types = {o.type for o in per.values()}
        if bool in types and len(types) > 1:
            raise ValueError(f"{next(iter(per.values())).flag} is a switch for some of {sorted(per)} and takes a "
                             "value for others; give one of the fields another flag (opt(..., flag=...))")
    return out


def _methods_text(per: dict) -> str:
    return f"--method {', '.join(per)}"


def _shared_help(per: dict, only: str | None) -> str:
    """One flag's help: the first method's text, the default(s) per method, and which methods take it."""
    if only is not None:
        return per[only].help + _default_text(per[only].default)
    by_default: dict[str, list[str]] = {}
    for name, o in per.items():
        by_default.setdefault(repr(o.default), []).append(name)
    helps = [o.help for o in per.values()]
    text = max(helps, key=helps.count)  # the text most of its methods give
    if len(by_default) == 1:
        text += _default_text(next(iter(per.values())).default)
    else:
        common = max(by_default, key=lambda d: len(by_default[d]))
        rest = "; ".join(f"{', '.join(ms)}: {d}" for d, ms in by_default.items() if d != common)
        text += f" (default: {common}; {rest})"
    return text + (f" [{_methods_text(per)}]" if len(per) > 1 else "")


def add_method_args(parser: argparse.ArgumentParser, reserved: set[str], only: str | None = None) -> None:
    """Every method's options as flags: a group per method for its own flags and one for the flags several
    methods share. With `only` (a registered method), that method's options alone are shown; the others
    are still parsed (hidden), so that `method_config` can say whose option they are."""
    flags = method_flags()
    clash = sorted(set(flags) & reserved)
    if clash:
        raise ValueError(f"method option(s) {[next(iter(flags[d].values())).flag for d in clash]} of "
                         f"{[sorted(flags[d]) for d in clash]} clash with the command's own options; give the "
                         "fields other flags (opt(..., flag=...))")
    groups: dict[str, argparse._ArgumentGroup] = {}

    def group(title: str):
        if title not in groups:
            groups[title] = parser.add_argument_group(title)
        return groups[title]

    for dest in sorted(flags, key=lambda d: (len(flags[d]) == 1, sorted(flags[d]), d)):
        per = flags[dest]
        o = next(iter(per.values()))
        tp = o.type if len({p.type for p in per.values()}) == 1 else str
        if only is not None and only not in per:
            _add_flag(parser, o.flag, dest, tp, argparse.SUPPRESS)
            continue
        title = (f"options of --method {only}" if only is not None else
                 f"options of --method {next(iter(per))}" if len(per) == 1 else
                 "options shared by several methods (each says which)")
        _add_flag(group(title), o.flag, dest, tp, _shared_help(per, only))


def method_config(method: str, given: dict[str, tuple[Any, str]], preset: dict | None = None):
    """The config of `method` from `given` ({dest: (value, where it came from)}, flags or YAML) over
    `preset` (defaults for options the method has; others are ignored, so a preset's --rank does not
    trouble a method without one). An option the method does not take is refused, naming its methods."""
    from ..methods.registry import get_method, list_methods, method_options

    if method not in list_methods():
        raise ValueError(f"--method {method!r} is not a method; choose one of {list_methods()}")
    spec = get_method(method)
    mine = {o.dest: o for o in method_options(spec)}
    for dest, (_, where) in given.items():
        if dest not in mine:
            per = method_flags()[dest]
            raise ValueError(f"{where}{next(iter(per.values())).flag} is an option of {_methods_text(per)}, "
                             f"not of --method {spec.name}")
    values = {d: (v, "preset: ") for d, v in (preset or {}).items() if d in mine}
    values.update(given)
    kwargs = {}
    for dest, (value, where) in values.items():
        o = mine[dest]
        if not (o.parse is not None and isinstance(value, list)):
            value = _coerce(value, o.type, dest, where.rstrip(": ") or o.flag)
        kwargs[o.field] = o.parse(value) if o.parse is not None and value is not None else value
    try:
        return spec.config_cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"--method {spec.name}: {e}") from None


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


def read_options(cls, args: argparse.Namespace, extra: set[str] = frozenset()):
    """(values of `cls`'s fields from YAML (--config) < flags, the names the user gave, and the `extra` names
    given as {name: (raw value, where: "" for a flag, "--config FILE: " for YAML)})."""
    names = {f.name for f in cli_fields(cls)}
    flags = {k: v for k, v in vars(args).items() if k in names}
    yaml_vals = read_yaml(args.config) if getattr(args, "config", None) else {}
    unknown = sorted(set(yaml_vals) - names - set(extra))
    if unknown:
        raise ValueError(f"--config {args.config}: unknown option(s) {unknown}; see --help for the valid ones")
    hints = typing.get_type_hints(cls)
    source = f"--config {args.config}"
    given = {k: (v, f"{source}: ") for k, v in yaml_vals.items() if k in extra}
    given.update({k: (v, "") for k, v in vars(args).items() if k in extra})
    yaml_vals = {k: _coerce(v, base_type(hints[k]), k, source) for k, v in yaml_vals.items() if k in names}
    return {**yaml_vals, **flags}, set(yaml_vals) | set(flags), given


def build_config(cls, args: argparse.Namespace, preset: dict | None = None):
    """Merge defaults < preset < YAML (--config) < flags into an instance of `cls`; also returns the
    set of field names the user gave explicitly (YAML or flags)."""
    values, explicit, _ = read_options(cls, args)
    return cls(**{**(preset or {}), **values}), explicit

"""Which modules a method wraps: PEFT's `target_modules` / `exclude_modules` / pattern semantics.

Follows peft 0.21.2 (`tuners_utils.check_target_module_exists`, `utils.other.get_pattern_key`):

- a list of names matches a module whose full name equals an entry or ends with `.<entry>`;
- a string is a regex fully matched against the full module name;
- `"all-linear"` (any case) is every linear module except the output layer (`lm_head`, or what
  `model.get_output_embeddings()` returns);
- `exclude` takes the same two forms (list of suffixes, or a fully matched regex);
- `rank_pattern` / `alpha_pattern` keys are regexes matched as `(.*\\.)?(<key>)$`, first hit wins.

Unlike PEFT, each listed target must match at least one module, so a typo is caught early.
"""
from __future__ import annotations

import re
from typing import Callable

from torch import nn

from .base import AdapterLayer

ALL_LINEAR = "all-linear"
OUTPUT_LAYER_NAMES = ("lm_head",)


def module_index(model: nn.Module) -> dict[str, nn.Module]:
    """Named modules, wrappers included but nothing inside a wrapper (no `base_layer`, `lora_A`...)."""
    out: dict[str, nn.Module] = {}
    inside: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(p) for p in inside):
            continue
        out[name] = module
        if isinstance(module, AdapterLayer):
            inside.append(name + ".")
    return out


def parse_targets(targets):
    """--targets as the methods take it: "all-linear", a list of module-name suffixes (a comma list of plain
    dotted names), or a regex; a list (from Python or YAML) is kept as it is."""
    if not isinstance(targets, str):
        return targets
    names = [t.strip() for t in targets.split(",") if t.strip()]
    # plain (dotted) names are a list of module-name suffixes; anything else is a regex, commas and all
    if targets.lower() != ALL_LINEAR and names and all(re.fullmatch(r"[\w.]+", n) for n in names):
        return names
    return targets


def is_all_linear(targets) -> bool:
    return isinstance(targets, str) and targets.lower() == ALL_LINEAR


def matches_list(name: str, entries) -> bool:
    return name in entries or any(name.endswith(f".{e}") for e in entries)


def is_excluded(name: str, exclude) -> bool:
    if not exclude:
        return False
    if isinstance(exclude, str):
        return re.fullmatch(exclude, name) is not None
    return matches_list(name, exclude)


def pattern_value(patterns: dict, name: str, default):
    """PEFT's `get_pattern_key`: the value of the first pattern key matching the end of `name`."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def output_layer_names(model: nn.Module, index: dict[str, nn.Module]) -> set[str]:
    names = {n for n in index if n.rpartition(".")[2] in OUTPUT_LAYER_NAMES}
    getter = getattr(model, "get_output_embeddings", None)
    output = getter() if callable(getter) else None
    if output is not None:
        names.update(n for n, m in index.items() if m is output)
    return names


def linear_sample(index: dict[str, nn.Module], is_target: Callable[[nn.Module], bool]) -> str:
    """A short description of the model's linear modules, for error messages."""
    names = [n for n, m in index.items() if is_target(m)]
    if not names:
        return "this model has no linear modules"
    suffixes = sorted({n.rpartition(".")[2] for n in names})
    return f"its linear modules end with {suffixes} (e.g. {names[0]!r}, {names[-1]!r})"


def resolve_targets(
    model: nn.Module,
    targets,
    exclude,
    is_target: Callable[[nn.Module], bool],
    kind: str = "nn.Linear",
) -> list[str]:
    """Full names of the modules to wrap, in model order; ValueError with a sample on a miss."""
    index = module_index(model)
    if is_all_linear(targets):
        skip = output_layer_names(model, index)
        # names a model keeps out of all-linear (MoE: see LlamaForCausalLM.all_linear_excluded)
        skip |= set(getattr(model, "all_linear_excluded", lambda: ())())
        names = [n for n, m in index.items() if is_target(m) and n not in skip]
    elif isinstance(targets, str):
        names = [n for n in index if re.fullmatch(targets, n)]
        if not names:
            raise ValueError(
                f"target regex {targets!r} matches no module name (it must match the full name); "
                f"{linear_sample(index, is_target)}"
            )
    else:
        names = _match_list(index, targets, is_target)
    names = [n for n in names if not is_excluded(n, exclude)]
    _check_kinds(index, names, is_target, kind)
    if not names:
        raise ValueError(
            f"targets {targets!r} minus exclude {exclude!r} leave no module to wrap; "
            f"{linear_sample(index, is_target)}"
        )
    return names


def _match_list(index: dict[str, nn.Module], targets, is_target) -> list[str]:
    hits: set[str] = set()
    for target in targets:
        found = [n for n in index if matches_list(n, [target])]
        if not found:
            raise ValueError(
                f"target {target!r} matches no module of the model; {linear_sample(index, is_target)}"
            )
        hits.update(found)
    return [n for n in index if n in hits]


def _check_kinds(index, names, is_target, kind: str) -> None:
    for name in names:
        module = index[name]
        if not is_target(module):
            raise ValueError(
                f"target module {name!r} is a {type(module).__name__}; this method wraps only {kind} "
                f"modules: name the linear layers inside it instead (e.g. '{name}.<child>')"
            )


def suffix_targets(model: nn.Module, wrapped: list[str], exclude, is_target) -> list[str] | None:
    """The sorted last-name-part list that selects exactly `wrapped`, or None when none does."""
    suffixes = sorted({n.rpartition(".")[2] for n in wrapped})
    index = module_index(model)
    selected = {n for n in index if matches_list(n, suffixes) and not is_excluded(n, exclude)}
    if selected != set(wrapped) or not all(is_target(index[n]) for n in selected):
        return None
    return suffixes

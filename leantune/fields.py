"""`opt()`: a dataclass field with help text, so each config dataclass is also its own CLI documentation.

Metadata a field may carry besides `help`: `flag="--rank"` (its command-line flag and YAML key, when not
`--field-name`), `parse=fn` (turns the flag's value into the field's, e.g. a comma list into a list),
`cli=False` (a Python-only option: no flag, no YAML key), `metavar`.
"""
from __future__ import annotations

import dataclasses
import types
import typing


def opt(default, help: str, **kw):  # noqa: A002 - mirrors argparse
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kw})
    return dataclasses.field(default=default, metadata={"help": help, **kw})


def base_type(tp):
    """`int | None` -> int, `str | list[str]` -> str: the first of a union's non-None members."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return base_type([a for a in typing.get_args(tp) if a is not type(None)][0])
    return tp

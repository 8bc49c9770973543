"""`opt()`: a dataclass field with help text, so each config dataclass is also its own CLI documentation."""
from __future__ import annotations

import dataclasses


def opt(default, help: str, **kw):  # noqa: A002 - mirrors argparse
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kw})
    return dataclasses.field(default=default, metadata={"help": help, **kw})

"""The co-serving fine-tuning defaults, in one place: the LoRA rank and alpha of a job's adapter, the longest
training example, the base learning rate, and what a job's OpenAI hyperparameters get where they say "auto"
(`serve.jobs.hyperparameters`). `leantune serve --ft-rank --ft-alpha --ft-max-length --ft-lr --ft-beta` set them
(`recipes.serve.ServeConfig`)."""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class FineTuneDefaults:
    rank: int = 8  # LoRA rank of every job's adapter (all linear layers)
    alpha: float = 16.0
    max_length: int = 1024  # training examples are truncated to this many tokens
    lr: float = 1e-3  # the learning rate of learning_rate_multiplier 1 (and of "auto")
    n_epochs: int = 3  # "auto"
    batch_size: int = 1  # "auto"
    beta: float = 0.1  # a DPO job's "auto" (TRL's and the DPO paper's default)

    def __post_init__(self):
        message = invalid(asdict(self))
        if message:
            raise ValueError(message)


_COUNTS = ("rank", "max_length", "n_epochs", "batch_size")
_REALS = ("alpha", "lr", "beta")


def invalid(values: dict, name: Callable[[str], str] = str) -> str | None:
    """The first bad value among FineTuneDefaults' `values` as a message naming it `name(field)` (a command-line
    flag, say), or None when every one is good."""
    for f in _COUNTS:
        v = values.get(f, 1)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            return f"{name(f)} must be an integer >= 1, got {v!r}"
    for f in _REALS:
        v = values.get(f, 1.0)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
            return f"{name(f)} must be a number > 0, got {v!r}"
    return None

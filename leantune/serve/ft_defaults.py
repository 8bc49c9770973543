"""The co-serving fine-tuning defaults, in one place: the LoRA rank and alpha of a job's adapter, the longest
training example, the base learning rate, how often a job is validated, the per-key quotas, and what a job's OpenAI hyperparameters get where they say "auto"
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
    eval_every: int = 10  # steps between a job's validation metrics (with a validation_file; and at its end)
    # per API key: most jobs not yet finished (queued, running, paused) and most bytes of stored files; None: no
    # limit. Not training settings, but the fine-tuning API's: they live here so the API and the runner share them
    max_jobs_per_key: int | None = None
    max_storage_bytes_per_key: int | None = None

    def __post_init__(self):
        message = invalid(asdict(self))
        if message:
            raise ValueError(message)


_COUNTS = ("rank", "max_length", "n_epochs", "batch_size", "eval_every")
_LIMITS = ("max_jobs_per_key", "max_storage_bytes_per_key")
_REALS = ("alpha", "lr", "beta")


def invalid(values: dict, name: Callable[[str], str] = str) -> str | None:
    """The first bad value among FineTuneDefaults' `values` as a message naming it `name(field)` (a command-line
    flag, say), or None when every one is good."""
    for f in _COUNTS:
        v = values.get(f, 1)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            return f"{name(f)} must be an integer >= 1, got {v!r}"
    for f in _LIMITS:
        v = values.get(f)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            return f"{name(f)} must be an integer >= 1 (or unset: no limit), got {v!r}"
    for f in _REALS:
        v = values.get(f, 1.0)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
            return f"{name(f)} must be a number > 0, got {v!r}"
    return None

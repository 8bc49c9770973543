"""Optimizers and schedules: `build_optimizer(name, ...)` is the one place a recipe's `--optimizer` becomes
an optimizer (torch AdamW, or PagedAdamW with large states kept off the device / working set)."""
from __future__ import annotations

from . import paged_adamw
from .paged_adamw import PagedAdamW, PagedStateStore

OPTIMIZERS = ("adamw", "paged_adamw")


def build_optimizer(name: str, params, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.999), eps: float = 1e-8):
    """AdamW (torch's math in both cases) over `params`."""
    import torch

    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps)
    if name == "paged_adamw":
        return PagedAdamW(params, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps,
                          page_threshold=paged_adamw.PAGE_THRESHOLD)
    raise ValueError(f"--optimizer must be one of {OPTIMIZERS}, got {name!r}")


__all__ = ["OPTIMIZERS", "PagedAdamW", "PagedStateStore", "build_optimizer"]

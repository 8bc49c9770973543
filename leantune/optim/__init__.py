"""Optimizers and schedules: `build_optimizer(name, ...)` is the one place a recipe's `--optimizer` becomes
an optimizer (torch AdamW, PagedAdamW with large states kept off the device / working set, GaLoreAdamW
with low-rank projected moments, or NaturalGaLoreAdamW, GaLore with a natural-gradient transform); every optimizer leantune builds comes from this file (`plain_sgd` for
probes that need raw gradient steps)."""
from __future__ import annotations

from . import paged_adamw
from .galore import GaLoreAdamW, galore_param_groups
from .natural_galore import NaturalGaLoreAdamW
from .paged_adamw import PagedAdamW, PagedStateStore
from .per_layer import attach_per_layer

OPTIMIZERS = ("adamw", "paged_adamw", "galore_adamw", "natural_galore")
# the optimizers that project whole weight matrices (galore_param_groups) and can step per layer
PROJECTED_OPTIMIZERS = ("galore_adamw", "natural_galore")


def build_optimizer(name: str, params, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.999),
                    eps: float | None = None):
    """The optimizer `name` over `params` (a list, or parameter groups); eps None: the optimizer's own default
    (torch's 1e-8 for the AdamWs, galore-torch's 1e-6 for GaLore and Natural GaLore)."""
    import torch

    if name == "adamw":
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps or 1e-8)
    elif name == "paged_adamw":
        opt = PagedAdamW(params, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps or 1e-8,
                         page_threshold=paged_adamw.PAGE_THRESHOLD)
    elif name == "galore_adamw":  # groups with `rank` are projected (galore_param_groups builds them)
        opt = GaLoreAdamW(params, lr=lr, weight_decay=weight_decay, betas=betas, eps=1e-6 if eps is None else eps)
    elif name == "natural_galore":  # the same groups, plus natural_history / reset_history_on_refresh
        opt = NaturalGaLoreAdamW(params, lr=lr, weight_decay=weight_decay, betas=betas,
                                 eps=1e-6 if eps is None else eps)
    else:
        raise ValueError(f"--optimizer must be one of {OPTIMIZERS}, got {name!r}")
    if any("lr_scale" in g for g in opt.param_groups):
        apply_lr_scale(opt)
    return opt


def plain_sgd(params, lr: float):
    """SGD without momentum or decay: each step moves a weight by exactly -lr * its gradient."""
    import torch

    return torch.optim.SGD(params, lr=lr)


def apply_lr_scale(opt) -> None:
    """Groups with an `lr_scale` (e.g. layer-wise lr decay) step at `lr * lr_scale`.

    The training loop sets one schedule lr on every group before each step, so the scale cannot live in
    `lr` itself: it is applied for the duration of `step()` and `lr` holds the schedule's value again after."""
    def scale(optimizer, args, kwargs):
        for g in optimizer.param_groups:
            g["unscaled_lr"] = g["lr"]
            g["lr"] = g["lr"] * g.get("lr_scale", 1.0)

    def unscale(optimizer, args, kwargs):
        for g in optimizer.param_groups:
            g["lr"] = g.pop("unscaled_lr", g["lr"])

    opt.register_step_pre_hook(scale)
    opt.register_step_post_hook(unscale)


__all__ = ["OPTIMIZERS", "PROJECTED_OPTIMIZERS", "GaLoreAdamW", "NaturalGaLoreAdamW", "attach_per_layer",
           "galore_param_groups", "PagedAdamW", "PagedStateStore", "apply_lr_scale", "build_optimizer", "plain_sgd"]

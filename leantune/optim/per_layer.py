"""Per-layer optimizer updates (GaLore's "layer-wise" weight updates, Zhao et al. 2024 §4.3, galore-torch's
`torchrun_main.py` with a `register_post_accumulate_grad_hook` per parameter): each parameter is stepped in its
gradient hook during backward, as soon as its gradient is complete, and the gradient is freed right after, so
the gradients of all layers never live at once (peak gradient memory: the largest single parameter's).

`attach_per_layer(opt)` puts the hooks on every parameter of an optimizer that can step one parameter alone
(`opt.update_param(p, group)`: `GaLoreAdamW`, `NaturalGaLoreAdamW`); `opt.step()` then finds no gradients and
does nothing. The learning rate the hooks use is what the groups hold when backward runs, so a loop sets the
step's lr before backward. What cannot work the same way, and is the caller's to refuse: clipping by the global
gradient norm (it needs every gradient before any update) and gradient accumulation (the first micro-batch's
backward would already update).
"""
from __future__ import annotations

import torch


def attach_per_layer(opt: torch.optim.Optimizer) -> list:
    """Hook every parameter of `opt` so backward updates it and frees its gradient; the hook handles
    (`.remove()` them to go back to stepping at the end)."""
    if not hasattr(opt, "update_param"):
        raise TypeError(f"per-layer updates need an optimizer that steps one parameter alone (update_param); "
                        f"{type(opt).__name__} has none: use GaLoreAdamW or NaturalGaLoreAdamW")
    handles = []
    for gi, group in enumerate(opt.param_groups):
        for p in group["params"]:
            handles.append(p.register_post_accumulate_grad_hook(_hook(opt, gi)))
    return handles


def _hook(opt, group_index: int):
    def update_and_free(p: torch.Tensor) -> None:
        # the group is looked up now, not captured: load_state_dict (a resume) replaces the group dicts
        with torch.no_grad():
            opt.update_param(p, opt.param_groups[group_index])
        p.grad = None

    return update_and_free

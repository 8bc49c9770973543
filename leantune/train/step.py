"""One optimizer step, the same for every trainer: the Trainer (`train.loop`) and the co-trainer of a
fine-tuning job inside the serving loop (`serve.cotrain`).

Order: the train hooks' `after_backward` (once the window's gradients are accumulated), clip the gradient
norm, set the schedule's lr on every group, `optimizer.step()`, the train hooks'
`after_step`, zero the gradients. Train hooks are the objects a method puts in `model.leantune_train_hooks`
(AdaLoRA, ALLoRA, SaRA, LT-SFT); each may define `before_step(model, step, total_steps)`, `after_backward(model)`
(may change the accumulated gradients, e.g. mask them, before clipping sees them, as HF's Trainer clips after
its `training_step`), `regularizer(model) -> Tensor |
None` (added to the mean loss) and `after_step(model, step)`; `step` counts optimizer steps from 0.

Hooks that change WHICH parameters train (SaRA's progressive mask reselection) may also define, for the Trainer:

- `change_trainable(model, step, optimizer) -> bool`: called once the step's gradients are accumulated, before
  clipping and the update. It may adjust parameters, gradients and `optimizer`'s state in place, or swap a
  parameter for a new one inside `optimizer` (its param_groups and state), and return False: the step goes on
  over the model's trainable parameters as they are now; True means it replaced trainable parameters, whose gradients went with them: the
  Trainer makes no update this step and rebuilds the optimizer over the model's trainable parameters (fresh
  state).
- `save_state(model, folder)` / `load_state(model, folder) -> bool`: their state (e.g. masks) in each checkpoint,
  restored on resume before the trainable weights and the optimizer state are; True when loading replaced
  trainable parameters (the Trainer then rebuilds the optimizer before loading its state).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..optim.schedules import lr_factor


@dataclass(frozen=True)
class StepRule:
    """How a run steps: its peak lr and schedule (`optim.schedules`), and the gradient clipping."""

    lr: float  # peak
    total_steps: int
    warmup_steps: int = 0
    schedule: str = "cosine"
    min_lr_ratio: float = 0.0
    max_grad_norm: float = 1.0  # 0 = no clipping

    def lr_at(self, step: int) -> float:
        """The lr of optimizer step `step` (0-based)."""
        return self.lr * lr_factor(step, self.total_steps, self.warmup_steps, self.schedule, self.min_lr_ratio)


def train_hooks(model) -> list:
    """The objects a method put in `model.leantune_train_hooks` (absent: none)."""
    return list(getattr(model, "leantune_train_hooks", None) or [])


def before_step(model, hooks: list, step: int, total_steps: int) -> None:
    for h in hooks:
        if hasattr(h, "before_step"):
            h.before_step(model, step, total_steps)


def regularizer(model, hooks: list) -> torch.Tensor | None:
    """The sum of the hooks' regularizer terms (None when no hook has one)."""
    terms = [t for h in hooks if hasattr(h, "regularizer") and (t := h.regularizer(model)) is not None]
    return sum(terms[1:], terms[0]) if terms else None


def change_trainable(model, hooks: list, step: int, optimizer) -> bool:
    """Let the hooks change what trains before step `step`'s update; True when one replaced parameters."""
    changed = [h.change_trainable(model, step, optimizer) for h in hooks if hasattr(h, "change_trainable")]
    return any(changed)


def save_hook_state(model, hooks: list, folder) -> None:
    for h in hooks:
        if hasattr(h, "save_state"):
            h.save_state(model, folder)


def load_hook_state(model, hooks: list, folder) -> bool:
    """Restore the hooks' state from a checkpoint folder; True when one replaced trainable parameters."""
    changed = [h.load_state(model, folder) for h in hooks if hasattr(h, "load_state")]
    return any(changed)


def set_lr(opt, lr: float) -> None:
    """The schedule's lr on every group (a group's own `lr_scale` is applied inside `step()`)."""
    for g in opt.param_groups:
        g["lr"] = lr


def optimizer_step(opt, params: list, rule: StepRule, step: int, model=None, hooks: list = ()) -> tuple[float, float]:
    """Take optimizer step `step` (0-based) from the gradients accumulated in `params`; (lr, grad norm), the
    norm NaN when clipping is off. `opt` is passed each time (a test may swap in plain SGD)."""
    for h in hooks:  # e.g. LT-SFT's gradient mask: clipping must see the masked gradients
        if hasattr(h, "after_backward"):
            h.after_backward(model)
    gnorm = float("nan")
    if rule.max_grad_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, rule.max_grad_norm)
        # sharded (FSDP) gradients give the global norm as a DTensor
        gnorm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    lr = rule.lr_at(step)
    set_lr(opt, lr)
    opt.step()
    for h in hooks:  # e.g. AdaLoRA's rank allocation: reads this step's gradients, so before zero_grad
        if hasattr(h, "after_step"):
            h.after_step(model, step)
    opt.zero_grad(set_to_none=True)
    return lr, gnorm

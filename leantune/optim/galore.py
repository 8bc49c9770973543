"""GaLore (Zhao et al. 2024, arXiv:2403.03507): AdamW whose moments live in a low-rank projection of each
matrix's gradient, so optimizer state is r x n (or m x r) instead of 2 x m x n.

`GaLoreAdamW` takes galore-torch's parameter groups unchanged: a group with `rank` (and `update_proj_gap`,
`scale`, `proj_type`) is projected, any other group is plain AdamW, so a galore-torch script runs with the
import changed. Its trajectory equals galore-torch 1.0's `GaLoreAdamW` (tests/test_galore.py), which means
its conventions, not torch.optim.AdamW's:

- eps defaults to 1e-6 and is added to sqrt(v) (not bias-corrected): step_size = lr * sqrt(1 - b2^t) / (1 - b1^t);
- weight decay is decoupled and applied *after* the update, to the updated weight: W -= lr * wd * W;
- the subspace is the top-`rank` singular vectors of the current gradient, recomputed when the step counter
  (before incrementing) is a multiple of `update_proj_gap`, so the first step computes it; the moments are
  *not* reset when it changes (methods-core §6.1);
- `proj_type`: "std" projects the smaller side (G P^T for m >= n with P = Vh[:r], else P^T G with P = U[:, :r]),
  "reverse_std" the larger, "right" / "left" always that side, "full" both sides (U[:, :r]^T G Vh[:r]^T);
  the projected-back update is multiplied by `scale`.

Unlike galore-torch, the projection is kept as tensors in the optimizer state (`proj`, `proj_right` for
"full"), so `state_dict()` holds only tensors and checkpoints as safetensors, and the side a matrix is
projected on is fixed by its shape when the subspace is made (galore-torch re-derives it from the projected
gradient's shape on the way back, which picks the wrong side for "reverse_std" when m < n and m == rank).
"""
from __future__ import annotations

import math
from typing import Callable, Iterable

import torch

GALORE_KEYS = ("rank", "update_proj_gap", "scale", "proj_type")
PROJ_TYPES = ("std", "reverse_std", "right", "left", "full")


def _side(proj_type: str, shape: torch.Size) -> str:
    """Which side of an (m, n) gradient is projected: "right" (G P^T), "left" (P^T G) or "full" (both)."""
    m, n = shape
    if proj_type == "std":
        return "right" if m >= n else "left"
    if proj_type == "reverse_std":
        return "left" if m >= n else "right"
    return proj_type


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def subspace(grad: torch.Tensor, rank: int, side: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The projection of `grad` (m, n): right -> P = Vh[:r] (r, n); left -> P = U[:, :r] (m, r); full -> both.

    The SVD runs in fp32 at least (bf16 / fp16 gradients are upcast, fp64 stays); the factors are cast back."""
    u, _, vh = torch.linalg.svd(at_least_fp32(grad), full_matrices=False)
    # Dense column-major copies of U[:, :r] and Vh[:r]. Not views: a view keeps all of U or Vh alive, up to
    # min(m, n) / r times the factor (for an 8B model's 4096-wide Vh at rank 128, 32x). Column-major: the
    # layout of LAPACK's U and Vh, which galore-torch computes with; a matmul rounds by layout, and a last-bit
    # difference can flip a singular vector's sign at the next refresh, after which the moments carried across
    # it diverge. `GaLoreAdamW.load_state_dict` gives loaded factors this layout again (exact resume).
    u, vh = column_major(u[:, :rank].to(grad.dtype)), column_major(vh[:rank].to(grad.dtype))
    if side == "right":
        return vh, None
    if side == "left":
        return u, None
    return u, vh


def column_major(x: torch.Tensor) -> torch.Tensor:
    """A copy of x (a, b) in its own a * b storage, column-major: strides (1, a)."""
    return torch.empty_strided(x.shape, (1, x.shape[0]), dtype=x.dtype, device=x.device).copy_(x)


def project(grad: torch.Tensor, side: str, p: torch.Tensor, q: torch.Tensor | None) -> torch.Tensor:
    if side == "right":
        return grad @ p.t()  # (m, n) @ (n, r) -> (m, r)
    if side == "left":
        return p.t() @ grad  # (r, m) @ (m, n) -> (r, n)
    return p.t() @ grad @ q.t()  # (r, r)


def project_back(low: torch.Tensor, side: str, p: torch.Tensor, q: torch.Tensor | None) -> torch.Tensor:
    if side == "right":
        return low @ p  # (m, r) @ (r, n)
    if side == "left":
        return p @ low  # (m, r) @ (r, n)
    return p @ low @ q


class GaLoreAdamW(torch.optim.Optimizer):
    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, correct_bias: bool = True):
        if lr < 0:
            raise ValueError(f"GaLoreAdamW: lr must be >= 0, got {lr}")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"GaLoreAdamW: betas must be in [0, 1), got {betas}")
        if eps < 0:
            raise ValueError(f"GaLoreAdamW: eps must be >= 0, got {eps}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, correct_bias=correct_bias)
        super().__init__(params, defaults)
        for group in self.param_groups:
            self.check_group(group)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        self.check_group(self.param_groups[-1])

    def check_group(self, group: dict) -> None:
        check_group(group)

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state.get(p, {})
                if "rank" in group and "proj" in st and self._svd_factors(group):
                    self._relayout(st)

    def _svd_factors(self, group: dict) -> bool:
        """Whether the group's factors are views of an SVD (`subspace`), whose layout a resume restores."""
        return True

    @staticmethod
    def _relayout(st: dict) -> None:
        for key in ("proj", "proj_right"):
            if key in st:
                st[key] = column_major(st[key])

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.update_param(p, group)
        return loss

    def update_param(self, p: torch.Tensor, group: dict) -> None:
        """One step of one parameter from its `.grad` (what `step()` does to each; per-layer updates call it
        from the parameter's gradient hook, `optim.per_layer`)."""
        state = self.state[p]
        t = int(state.get("step", 0))  # a checkpoint may hand it back as a tensor
        grad, back = self._project(p.grad, state, group, t)
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(grad)
            state["exp_avg_sq"] = torch.zeros_like(grad)
        m, v = state["exp_avg"], state["exp_avg_sq"]
        b1, b2 = group["betas"]
        t += 1
        state["step"] = t
        m.mul_(b1).add_(grad, alpha=1 - b1)
        v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        step_size = group["lr"]
        if group["correct_bias"]:
            step_size = step_size * math.sqrt(1 - b2 ** t) / (1 - b1 ** t)
        update = m / (v.sqrt() + group["eps"])
        if back is not None:
            update = back(update) * group["scale"]
        p.add_(update, alpha=-step_size)
        if group["weight_decay"] > 0:
            p.add_(p, alpha=-group["lr"] * group["weight_decay"])  # after the update, as galore-torch does

    def _project(self, grad: torch.Tensor, state: dict, group: dict, t: int):
        """(what Adam's moments see, the map of Adam's update back to the weight's shape or None); `t` is the
        step counter before this step, so step 0 makes the first subspace."""
        if "rank" not in group:
            return grad, None
        side = _side(group["proj_type"], grad.shape)
        if "proj" not in state or t % group["update_proj_gap"] == 0:
            state["proj"], right = subspace(grad, group["rank"], side)
            if right is not None:
                state["proj_right"] = right
        p, q = state["proj"], state.get("proj_right")
        return project(grad, side, p, q), lambda low: project_back(low, side, p, q)


def check_group(group: dict) -> None:
    """A GaLore group (one with `rank`) needs 2-D parameters and valid projector settings."""
    if "rank" not in group:
        return
    group.setdefault("update_proj_gap", 200)
    group.setdefault("scale", 1.0)
    group.setdefault("proj_type", "std")
    if not (isinstance(group["rank"], int) and group["rank"] > 0):
        raise ValueError(f"GaLore group: rank must be a positive int, got {group['rank']!r}")
    if not (isinstance(group["update_proj_gap"], int) and group["update_proj_gap"] > 0):
        raise ValueError(f"GaLore group: update_proj_gap must be a positive int, got {group['update_proj_gap']!r}")
    if group["proj_type"] not in PROJ_TYPES:
        raise ValueError(f"GaLore group: proj_type must be one of {PROJ_TYPES}, got {group['proj_type']!r}")
    bad = [tuple(p.shape) for p in group["params"] if p.dim() != 2]
    if bad:
        raise ValueError(f"GaLore group: projects matrices only, got parameters of shapes {bad[:3]}; put "
                         "biases, norms and other non-2-D tensors in a group without 'rank'")


def galore_param_groups(model: torch.nn.Module, params: list, rank: int, update_proj_gap: int, scale: float,
                        proj_type: str, **extra) -> list[dict]:
    """galore-torch's recipe: the 2-D weights of linear layers inside attention and MLP blocks (module names
    containing "attn" or "mlp") are projected; everything else (embeddings, norms, the head) is plain AdamW.
    `extra`: more keys of the projected group (Natural GaLore's `natural_history`, ...)."""
    wanted = {id(p) for p in params}
    galore = []
    for name, module in model.named_modules():
        if ("attn" in name or "mlp" in name) and isinstance(module, torch.nn.Linear):
            w = module.weight
            if id(w) in wanted and w.dim() == 2:
                galore.append(w)
    ids = {id(p) for p in galore}
    rest = [p for p in params if id(p) not in ids]
    groups = [{"params": rest}] if rest else []
    if galore:
        groups.append({"params": galore, "rank": rank, "update_proj_gap": update_proj_gap, "scale": scale,
                       "proj_type": proj_type, **extra})
    return groups

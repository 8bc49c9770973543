"""Natural GaLore (Das, "Natural GaLore: accelerating GaLore for memory-efficient LLM training and fine-tuning",
arXiv:2410.16029; selfsupervised-ai/Natural-GaLore `SubSpaceAdamW`): GaLore whose projected gradient is
preconditioned by the inverse of an empirical Fisher built from the last s projected gradients before AdamW
sees it (methods-core §6.2).

Per projected matrix G (m, n) and step, with rank r:

- subspace, made at step 0 and every `update_proj_gap` steps: `proj_type="tucker"` (the default, the official
  projection) takes the factors of a rank-[r, r] Tucker decomposition of G by HOOI (`tucker_hooi`, the same
  algorithm, init and sign convention as `tensorly.decomposition.tucker`) and projects both sides,
  R = U1^T G U2 (r, r); GaLore's one-sided projections ("std", "reverse_std", "right", "left", "full",
  `galore.subspace`) are offered too;
- natural-gradient transform on g = vec(R) (length k): the history keeps the last `natural_history` (s = 20)
  projected gradients, the current one included, as rows of H (s', k), and
  g~ = (lambda I + H^T H)^-1 g = g / lambda - H^T z / lambda^2 with z = (I + H H^T / lambda)^-1 H g (Woodbury:
  an s' x s' Cholesky solve, never a k x k matrix), lambda = 1e-3 as in the official code, and no 1/s
  normalisation of the Fisher (the paper writes one; the code does not);
- AdamW (GaLore's convention, `GaLoreAdamW.update_param`) on g~, the update projected back and times `scale`.

`natural_history=0` turns the transform off (two-sided Tucker GaLore with the default projection). The history
is kept across subspace refreshes, as the official code does, so coordinates of the old and new subspaces mix in
it; `reset_history_on_refresh=True` clears it at each refresh instead. Not copied: two bugs of GaLore's
`GaLoreProjectorTensor` (jiaweizzhao/GaLore galore_torch/galore_projector_tensor.py), the projector Natural
GaLore's is derived from: it makes the subspace only once (`ortho_matrix is None and iter % gap == 0`), and its
`project_back` ignores its argument and projects back the raw projected gradient instead of Adam's update. Here
the subspace is refreshed every `update_proj_gap` steps (methods-core §6.2) and Adam's update goes back, as in
GaLore's matrix projector.

The factors and the history are tensors in the optimizer state (`proj`, `proj_right`, `history`), so
checkpoints are safetensors and a resumed run continues exactly.
"""
from __future__ import annotations

import math

import torch

from .galore import PROJ_TYPES as GALORE_PROJ_TYPES
from .galore import GaLoreAdamW, _side, at_least_fp32, project, project_back, subspace

PROJ_TYPES = ("tucker", *GALORE_PROJ_TYPES)
DAMPING = 1e-3  # lambda of the Fisher estimate lambda I + H^T H; the official code hard-codes it


# ---------------------------------------------------------------------------------------------
# Tucker decomposition by higher-order orthogonal iteration (HOOI), as tensorly.decomposition.tucker


def unfold(t: torch.Tensor, mode: int) -> torch.Tensor:
    """The mode-`mode` unfolding (I_mode, prod of the other dims), in tensorly's (C) order."""
    return t.movedim(mode, 0).reshape(t.shape[mode], -1)


def mode_dot(t: torch.Tensor, matrix: torch.Tensor, mode: int) -> torch.Tensor:
    """t x_mode matrix: mode `mode` of t (size I) becomes matrix.shape[0] (matrix is (J, I))."""
    return (t.movedim(mode, -1) @ matrix.t()).movedim(-1, mode)


def multi_mode_dot(t: torch.Tensor, factors: list[torch.Tensor], transpose: bool = False,
                   skip: int | None = None) -> torch.Tensor:
    for mode, f in enumerate(factors):
        if mode != skip:
            t = mode_dot(t, f.t() if transpose else f, mode)
    return t


def leading_left_singular(matrix: torch.Tensor, r: int) -> torch.Tensor:
    """The top-r left singular vectors (I, r), each column's largest-magnitude entry made positive (tensorly's
    `svd_flip`, borrowed from scikit-learn), so the factors do not depend on the SVD routine's signs."""
    u = torch.linalg.svd(matrix, full_matrices=False)[0][:, :r]
    signs = torch.sign(u[u.abs().argmax(dim=0), torch.arange(u.shape[1], device=u.device)])
    return u * torch.where(signs == 0, torch.ones_like(signs), signs)


def tucker_hooi(tensor: torch.Tensor, ranks: list[int], n_iter_max: int = 100,
                tol: float = 1e-4) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(core, factors) of a rank-`ranks` Tucker decomposition: tensorly's `tucker(tensor, rank, init="svd")`,
    its stopping rule included (relative reconstruction error changing by less than `tol`, from the third
    iteration on). Factor i is (tensor.shape[i], ranks[i]) with orthonormal columns."""
    if any(r > d for r, d in zip(ranks, tensor.shape)):
        raise ValueError(f"Tucker ranks {list(ranks)} exceed the tensor's shape {tuple(tensor.shape)}")
    factors = [leading_left_singular(unfold(tensor, m), r) for m, r in enumerate(ranks)]
    norm = float(torch.linalg.vector_norm(tensor))
    errors: list[float] = []
    for it in range(n_iter_max):
        for mode, r in enumerate(ranks):  # each factor from the tensor projected on the others, in place
            factors[mode] = leading_left_singular(unfold(multi_mode_dot(tensor, factors, True, skip=mode), mode), r)
        core = multi_mode_dot(tensor, factors, transpose=True)
        if norm == 0:  # a zero gradient: every subspace is as good, stop at the first
            break
        errors.append(math.sqrt(abs(norm ** 2 - float(torch.linalg.vector_norm(core)) ** 2)) / norm)
        if it > 1 and abs(errors[-2] - errors[-1]) < tol:
            break
    return multi_mode_dot(tensor, factors, transpose=True), factors


# ---------------------------------------------------------------------------------------------
# the natural-gradient transform


def natural_gradient(g: torch.Tensor, history: torch.Tensor, damping: float = DAMPING) -> torch.Tensor:
    """(damping I + H^T H)^-1 g for g (k,) and history H (s', k), by Woodbury through an s' x s' Cholesky solve.

    Computed in float64 whatever the input: g / lambda and H^T z / lambda^2 are ~1/lambda larger than their
    difference, so float32 would keep only a few correct digits of it; the result has g's dtype."""
    g64, h = g.double(), history.double()
    s = torch.eye(h.shape[0], dtype=h.dtype, device=h.device) + h @ h.t() / damping  # (s', s')
    z = torch.cholesky_solve((h @ g64).unsqueeze(1), torch.linalg.cholesky(s)).squeeze(1)  # (s',)
    return (g64 / damping - h.t() @ z / damping ** 2).to(g.dtype)


def push_history(state: dict, g: torch.Tensor, size: int) -> torch.Tensor:
    """Append g (k,) to the FIFO `state["history"]` (rows, oldest first), keep the last `size`; the history."""
    old = state.get("history")
    state["history"] = g.unsqueeze(0) if old is None else torch.cat([old, g.unsqueeze(0)])[-size:]
    return state["history"]


# ---------------------------------------------------------------------------------------------
# the optimizer


class NaturalGaLoreAdamW(GaLoreAdamW):
    """Natural GaLore over galore-torch-style parameter groups: a group with `rank` (and `update_proj_gap`,
    `scale`, `proj_type`, `natural_history`, `reset_history_on_refresh`) is projected and transformed, any
    other group is plain AdamW in GaLore's convention. Defaults: lr 1e-3, betas (0.9, 0.999), eps 1e-6, no
    weight decay; per group: update_proj_gap 200, scale 1.0, proj_type "tucker", natural_history 20,
    reset_history_on_refresh False."""

    def check_group(self, group: dict) -> None:
        check_natural_group(group)

    def _svd_factors(self, group: dict) -> bool:
        return group["proj_type"] != "tucker"  # Tucker factors are made row-major, as a checkpoint stores them

    def _project(self, grad: torch.Tensor, state: dict, group: dict, t: int):
        if "rank" not in group:
            return grad, None
        tucker = group["proj_type"] == "tucker"
        side = "full" if tucker else _side(group["proj_type"], grad.shape)
        if "proj" not in state or t % group["update_proj_gap"] == 0:
            if tucker:  # U1 (m, r) and U2 (n, r): R = U1^T G U2, kept as galore's "full" pair (U1, U2^T)
                _, (u1, u2) = tucker_hooi(at_least_fp32(grad), [group["rank"]] * 2)
                state["proj"], state["proj_right"] = u1.to(grad.dtype).contiguous(), u2.t().to(grad.dtype).contiguous()
            else:
                state["proj"], right = subspace(grad, group["rank"], side)
                if right is not None:
                    state["proj_right"] = right
            if group["reset_history_on_refresh"]:
                state.pop("history", None)
        p, q = state["proj"], state.get("proj_right")
        low = project(grad, side, p, q)
        if group["natural_history"] > 0:
            h = push_history(state, low.reshape(-1), group["natural_history"])
            low = natural_gradient(low.reshape(-1), h).view_as(low)
        return low, lambda n: project_back(n, side, p, q)


def check_natural_group(group: dict) -> None:
    """A projected group (one with `rank`) needs 2-D parameters, valid settings, and, for "tucker", a rank no
    larger than either side of any of its matrices (the core is rank x rank)."""
    if "rank" not in group:
        return
    for key, default in (("update_proj_gap", 200), ("scale", 1.0), ("proj_type", "tucker"),
                         ("natural_history", 20), ("reset_history_on_refresh", False)):
        group.setdefault(key, default)
    r = group["rank"]
    if not (isinstance(r, int) and r > 0):
        raise ValueError(f"Natural GaLore group: rank must be a positive int, got {r!r}")
    if not (isinstance(group["update_proj_gap"], int) and group["update_proj_gap"] > 0):
        raise ValueError(f"Natural GaLore group: update_proj_gap must be a positive int, got "
                         f"{group['update_proj_gap']!r}")
    if group["proj_type"] not in PROJ_TYPES:
        raise ValueError(f"Natural GaLore group: proj_type must be one of {PROJ_TYPES}, got {group['proj_type']!r}")
    if not (isinstance(group["natural_history"], int) and group["natural_history"] >= 0):
        raise ValueError(f"Natural GaLore group: natural_history must be an int >= 0 (0 = no transform), got "
                         f"{group['natural_history']!r}")
    bad = [tuple(p.shape) for p in group["params"] if p.dim() != 2]
    if bad:
        raise ValueError(f"Natural GaLore group: projects matrices only, got parameters of shapes {bad[:3]}; put "
                         "biases, norms and other non-2-D tensors in a group without 'rank'")
    small = [tuple(p.shape) for p in group["params"] if r > min(p.shape)]
    if group["proj_type"] == "tucker" and small:
        raise ValueError(f"Natural GaLore group: rank {r} is larger than a side of the matrices of shapes "
                         f"{small[:3]} (a Tucker core is rank x rank); use a rank <= {min(min(s) for s in small)}")

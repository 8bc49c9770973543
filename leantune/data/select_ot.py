"""Scores for data selection: entropic optimal transport between a candidate pool and a target set, streamed
over pool batches, and the two baselines (nearest neighbour, random). No model here: rows are embeddings.

GOT-D (Kang et al., "Get more for less: principled data selection for warming up fine-tuning in LLMs",
ICLR 2024; code REDSgnaoh/DV4LLM @41793fb, `pre_process+OT_selection/ot-selection.ipynb`): solve entropic OT
between the pool (uniform mass a_i = 1/N) and the target (b_j = 1/M) under the squared Euclidean cost, take the
pool-side dual potential f (the gradient of the OT cost w.r.t. the pool's mass, up to a constant), calibrate it
LAVA-style, f'_i = f_i - (sum_k f_k / N - f_i / N), and select ascending: the rows whose extra mass lowers the
distance to the target most.

Sinkhorn in the log domain (Peyre & Cuturi, "Computational Optimal Transport", §4.4), regularised by
eps * KL(P | a b^T), with over-relaxation `momentum` (ott-jax's `momentum`; 1 = plain Sinkhorn). The cost matrix
is never held: every iteration makes one pass over the pool in batches of `batch` rows, each computing its
(batch, M) block of x.y once and using it twice,

- for the pool update  f_i <- -eps log sum_j b_j exp((g_j - C_ij)/eps)   (a row log-sum-exp), and
- for the target update g_j <- -eps log sum_i a_i exp((f_i - C_ij)/eps)   (accumulated over batches: the
  block's exp, already made for the row update, times a per-row factor, summed over rows by one mat-vec),

so memory is O(batch x M) plus the N-vector f, whatever N is. The pool's marginal error of the previous
iterate, sum_i |a_i exp((f_i - T(g)_i)/eps) - a_i| (L1, total mass 1), comes free from the row update and
stops the loop below `threshold`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

Blocks = Sequence[np.ndarray]  # the pool: row blocks (n_k, d), e.g. memory-mapped cache files, in row order
METHODS = ("got-d", "nearest", "random")


@dataclass
class OTResult:
    f: np.ndarray  # (N,) float64 pool-side dual potential
    g: np.ndarray  # (M,) float64 target-side dual potential
    cost: float  # the entropic OT cost <f, a> + <g, b> (the dual objective at the solution)
    iterations: int
    error: float  # the pool marginal's L1 error of the last complete iterate


def calibrate(f: np.ndarray) -> np.ndarray:
    """LAVA's calibrated gradient (§6 step 4): f'_i = f_i - (sum_k f_k / N - f_i / N). Within one solve this is
    affine-increasing in f (f (1 + 1/N) - mean), so it changes no ranking; it makes scores of separate solves
    comparable."""
    n = f.shape[0]
    return f - (f.sum() / n - f / n)


def _batches(pool: Blocks, batch: int) -> Iterable[tuple[int, np.ndarray]]:
    """(first row, rows) for consecutive slices of at most `batch` rows across the blocks."""
    start = 0
    for block in pool:
        for i in range(0, block.shape[0], batch):
            yield start + i, block[i:i + batch]
        start += block.shape[0]


def _rows(x: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor(np.asarray(x), dtype=dtype)  # a copy: memory-mapped cache blocks are read-only


def sinkhorn(pool: Blocks, target: np.ndarray, eps: float = 0.1, threshold: float = 0.1, max_iter: int = 2000,
             momentum: float = 1.3, batch: int = 2000, dtype: torch.dtype = torch.float32,
             progress: Callable[[int, float], None] | None = None) -> OTResult:
    """Entropic OT between the pool blocks (N, d) and `target` (M, d), uniform weights, squared Euclidean cost.
    `progress(iteration, error)` is called after every pass."""
    n = sum(b.shape[0] for b in pool)
    y = _rows(target, dtype)  # (M, d)
    m = y.shape[0]
    log_b = -math.log(m)
    y_sq = (y.double() ** 2).sum(1)  # (M,)
    f = np.zeros(n)
    g = torch.zeros(m, dtype=torch.float64)
    err, it = math.inf, 0
    for it in range(1, max_iter + 1):
        omega = 1.0 if it == 1 else momentum  # over-relax from the second pass, once f is a real iterate
        beta = ((g - y_sq) / eps + log_b).to(dtype)  # (M,)
        col = torch.zeros(m, dtype=torch.float64)
        err_sum = 0.0
        for start, rows in _batches(pool, batch):
            x = _rows(rows, dtype)  # (B, d)
            k = torch.addmm(beta, x, y.T, alpha=2.0 / eps)  # (B, M): (2 x.y + g - |y|^2)/eps + log b
            k_max = k.amax(1)  # (B,)
            k.sub_(k_max[:, None]).exp_()  # (B, M) in place: the block's only exp
            s = k.sum(1)  # (B,)
            x_sq = (x.double() ** 2).sum(1)
            t_g = x_sq - eps * (k_max.double() + s.double().log())  # (B,) T(g)_i
            f_old = torch.from_numpy(f[start:start + x.shape[0]])
            if it > 1:  # row marginal of (f_old, g): a_i exp((f_old - T(g))/eps)
                err_sum += float(torch.expm1((f_old - t_g) / eps).abs().sum())
            f_new = t_g if it == 1 else (1 - omega) * f_old + omega * t_g
            f[start:start + x.shape[0]] = f_new.numpy()
            # sum_i a_i exp((f_new_i - C_ij)/eps) = exp(-g_j/eps)/b_j * sum_i a_i w_i E_ij / s_i,
            # w_i = exp((f_new_i - T(g)_i)/eps): the row's mass under f_new relative to the exact row update
            w = ((f_new - t_g) / eps).clamp(-50, 50).exp()
            col += (w / (n * s.double())).to(dtype) @ k  # (M,) a_i w_i / s_i summed over the block's rows
        t_f = g + eps * log_b - eps * col.clamp_min(1e-300).log()  # (M,) T(f_new)_j
        g = t_f if it == 1 else (1 - omega) * g + omega * t_f
        if it > 1:
            err = err_sum / n
        if progress is not None:
            progress(it, err)
        if err < threshold:
            break
    cost = float(f.mean() + g.mean().item())
    return OTResult(f=f, g=g.numpy(), cost=cost, iterations=it, error=err)


def got_d_scores(pool: Blocks, target: np.ndarray, **kw) -> tuple[np.ndarray, OTResult]:
    """GOT-D's scores (lower = select first): the calibrated pool-side potentials."""
    res = sinkhorn(pool, target, **kw)
    return calibrate(res.f), res


def nearest_scores(pool: Blocks, target: np.ndarray, batch: int = 2000,
                   dtype: torch.dtype = torch.float32) -> np.ndarray:
    """The nearest-neighbour baseline (lower = select first): each pool row's squared Euclidean distance to its
    nearest target row (for L2-normalised embeddings, the same order as the highest cosine similarity)."""
    y = _rows(target, dtype)  # (M, d)
    y_sq = (y.double() ** 2).sum(1).to(dtype)
    out = np.empty(sum(b.shape[0] for b in pool))
    for start, rows in _batches(pool, batch):
        x = _rows(rows, dtype)
        near = torch.addmm(y_sq, x, y.T, alpha=-2.0).amin(1)  # (B,) min_j |y_j|^2 - 2 x.y_j
        out[start:start + x.shape[0]] = (near.double() + (x.double() ** 2).sum(1)).clamp_min(0).numpy()
    return out


def random_scores(n: int, seed: int) -> np.ndarray:
    """The random baseline: i.i.d. uniform scores, so the k lowest are a uniform sample of k rows."""
    return np.random.default_rng(seed).random(n)


def select_lowest(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k lowest scores in ascending score order (ties: the earlier row first)."""
    return np.argsort(scores, kind="stable")[:k]

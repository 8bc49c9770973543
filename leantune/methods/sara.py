"""SaRA (`--method sara`): the small-|w| entries of every weight train, the rest stays bitwise frozen.

Hu et al., "SaRA: High-Efficient Diffusion Model Fine-tuning with Progressive Sparse Low-Rank Adaptation"
(ICLR 2025, arXiv:2409.06633), after sjtuplayer/SaRA `optim/adamw.py` (reference: methods-core.md §7).

- **Selection.** For every parameter tensor p (biases, norms, embeddings and the head included) the trainable
  mask is `M = |p| < threshold` (the paper's recipe: 2e-3). A tensor with no such entry stays frozen.
- **Unstructured backpropagation (UB).** The trainable leaf of p is the 1-D vector `values = p[M]`, registered
  with `torch.nn.utils.parametrize` (`SparseValues`), so its `.grad` and AdamW's two moments have |M| entries,
  not numel(p). The parametrization writes `values` into the frozen dense weight whenever they have changed
  and hands the layer that weight itself (no dense copy); its backward takes `grad_W[M]`, so the dense
  gradient lives only transiently inside backward. Entries outside M are never written.
- **Nuclear-norm term** (`lambda_rank`, recipe 5e-4; 0 = off): each optimizer step picks one random 2-D
  tensor with min(shape) > 64 (seeded by the step, so a resumed run picks the same) and adds
  `lambda_rank * ||W ⊙ M||_*` to the loss; its gradient on `values` is `lambda_rank * (U Vᵀ)[M]`, from one SVD
  per step (`SaraHooks.regularizer`). (The
  official code adds it inside `optimizer.step()`, after gradient clipping; here it is part of the loss, so
  it is clipped with the rest.) Like the official code it penalises the masked weights, not their change.
- **Progressive reselection** (`progressive_iter` P, recipe 2500; 0 = off): at optimizer call P+1 the masks
  are rebuilt from the current weights. `reselect="fresh"` (the official default) takes `|p_t| < threshold`
  (entries may join and leave), replaces the trainable vectors, so the Trainer rebuilds the optimizer (Adam
  state reset), and that call makes no update, as `adamw.py` returns early. `reselect="intersect"` (the
  official masked-dense `adamw2.py`) keeps `M ∧ (|p_t| < threshold)`, slices the vectors, their gradient and
  the Adam state to it, and the call updates as usual.
- **Learning rate.** With no --lr, `1e-3 * exp(-350 * threshold)` (≈ 4.966e-4 at 2e-3), the official
  default, and weight decay 1e-2 (decoupled, so in effect on the trained entries only); both through the
  registry's `train_defaults` hook.
- **Saved form.** A sparse diff (`methods/sparse_diff.py`, method "sara"): every entry that was ever in a mask,
  with `p - p0` (zero changes kept, so the diff's indices are the trained entries). `leantune generate/chat
  --adapter DIR` and `leantune merge` add it to the base's weights at load; `leantune serve --adapter NAME=DIR`
  merges it into the base at start-up (one copy of the weights: it cannot be one adapter among others).
- **Checkpoints.** The masks are training state: each checkpoint holds them (`sara_state.safetensors`: the
  masks, the trained entries' original and current values), so `--resume` continues exactly even after a
  fresh reselection.

With the Python API, `leantune.apply(model, "sara", threshold=...)` makes the UB parameters, which any optimizer
loop trains (the next forward writes them into the weights); the nuclear-norm term and the reselection are
the train hooks in `model.leantune_train_hooks`, which leantune's Trainer calls (`train.step`).

Bug of the official code not copied: its initial scatter writes `abs()` of the trainable values, flipping
the sign of negative small weights until the first step; here `values = p[M]` exactly.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..fields import opt
from . import base
from .memory import MemoryModel, TrainedState
from .registry import register_method
from .sparse_diff import SparseDiff, apply_diff, is_sparse_diff_folder, read_sparse_diff, save_sparse_diff

METHOD = "sara"
RESELECT = ("fresh", "intersect")
STATE_NAME = "sara_state.safetensors"
NUCLEAR_MIN_DIM = 64  # the official rule: a tensor joins the nuclear-norm draw when min(shape) > 64


@dataclass
class SaraConfig:
    threshold: float = opt(2e-3, "SaRA: entries with |w| below this train (the paper's recipe: 2e-3)",
                           flag="--sara-threshold")
    lambda_rank: float = opt(5e-4, "SaRA: weight of the nuclear-norm term on one random masked weight matrix "
                                   "per step (0 = off)", flag="--sara-lambda-rank")
    progressive_iter: int = opt(2500, "SaRA: reselect the masks from the current weights at step N+1 (0 = never)",
                                flag="--sara-progressive-iter")
    reselect: str = opt("fresh", "SaRA: how masks are reselected: fresh (|w| < threshold again; Adam state reset, "
                                 "no update that step) or intersect (only drop entries; state kept)",
                        flag="--sara-reselect")

    def __post_init__(self):
        checks = [
            (self.threshold > 0 and math.isfinite(self.threshold),
             f"--sara-threshold must be a positive number (the paper uses 2e-3), got {self.threshold}"),
            (self.lambda_rank >= 0, f"--sara-lambda-rank must be >= 0 (0 = off), got {self.lambda_rank}"),
            (self.progressive_iter >= 0, f"--sara-progressive-iter must be >= 0 (0 = off), got {self.progressive_iter}"),
            (self.reselect in RESELECT, f"--sara-reselect must be one of {list(RESELECT)}, got {self.reselect!r}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)


def default_lr(threshold: float) -> float:
    """The official default learning rate for a threshold: `1e-3 * exp(-350 * threshold)`."""
    return 1e-3 * math.exp(-350.0 * threshold)


def train_defaults(config: SaraConfig) -> dict:
    """What SaRA proposes for the training options the user leaves unset (the official optimizer's defaults)."""
    return {"lr": default_lr(config.threshold), "weight_decay": 1e-2}


# ---------------------------------------------------------------------------------------------
# unstructured backpropagation


class _MaskedLeaf(torch.autograd.Function):
    """Forward: the dense weight itself (already holding `values` at M); backward: `grad_W[M]` for `values`."""

    @staticmethod
    def forward(ctx, values, weight, mask):  # noqa: ARG004 - values is the input the gradient goes to
        ctx.save_for_backward(mask)
        return weight.view_as(weight)  # an alias, not a copy: the layer reads the frozen storage

    @staticmethod
    def backward(ctx, grad_w):
        (mask,) = ctx.saved_tensors
        return grad_w.masked_select(mask), None, None


class SparseValues(nn.Module):
    """The parametrization of one weight: `values` (|M|, trainable) are its entries at `mask`.

    Buffers: `mask` (bool, the weight's shape), `origin_idx` (flat int64 indices of every entry ever trained,
    ascending) and `origin_val` (their values before training), from which the saved diff is made."""

    def __init__(self, weight: torch.Tensor, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask)
        self.values = nn.Parameter(weight.detach()[mask].clone())  # not abs(): the official sign bug
        self.register_buffer("origin_idx", mask.reshape(-1).nonzero().reshape(-1))
        self.register_buffer("origin_val", self.values.detach().clone())
        self._synced: tuple | None = None  # (id, version) of the `values` last written into the weight

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        self.sync(weight)
        return _MaskedLeaf.apply(self.values, weight, self.mask)

    @torch.no_grad()
    def sync(self, weight: torch.Tensor) -> None:
        """Write `values` into the dense weight if they changed since the last write (an optimizer step bumps
        their version); an unchanged write would needlessly invalidate graphs that saved the weight."""
        key = (id(self.values), self.values._version)
        if self._synced != key:
            weight.masked_scatter_(self.mask, self.values.detach())
            self._synced = key


@dataclass
class SaraEntry:
    """One parametrized weight: its base name (as the unmodified model names it), its parametrization and every
    (module, attribute) that holds it (two for tied embeddings: both share one `SparseValues`)."""

    name: str
    sparse: SparseValues
    holders: list[tuple[nn.Module, str]]

    @property
    def weight(self) -> torch.Tensor:
        """The frozen dense tensor (`parametrizations.<attr>.original`)."""
        module, attr = self.holders[0]
        return module.parametrizations[attr].original

    def composed(self) -> torch.Tensor:
        """The weight as the layer sees it, differentiable in `values`."""
        module, attr = self.holders[0]
        return getattr(module, attr)


def _holders(model: nn.Module) -> dict[int, tuple[str, torch.Tensor, list[tuple[nn.Module, str]]]]:
    """id(param) -> (its first name, the param, every (module, attribute) holding it), in model order."""
    out: dict[int, tuple[str, torch.Tensor, list]] = {}
    for mname, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            key = id(p)
            if key not in out:
                out[key] = (f"{mname}.{pname}" if mname else pname, p, [])
            out[key][2].append((module, pname))
    return out


def select_masks(model: nn.Module, threshold: float) -> dict[str, torch.Tensor]:
    """name -> `|p| < threshold` for every float parameter with at least one such entry."""
    out = {}
    for name, p, _ in _holders(model).values():
        if p.is_floating_point():
            mask = p.detach().abs() < threshold
            if bool(mask.any()):
                out[name] = mask
    return out


def apply_sara(model: nn.Module, config: SaraConfig, adapter_name: str) -> nn.Module:
    if base.list_adapters(model):
        raise ValueError(f"--method sara trains the model's own weights; this model already has adapters "
                         f"{base.list_adapters(model)}: merge them first (leantune merge) or start from the base")
    if any(getattr(m, "parametrizations", None) for m in model.modules()):
        raise ValueError("--method sara: this model's weights are already parametrized (SaRA applied twice?); "
                         "start from the base model")
    from ..quant import Linear4bit

    if any(isinstance(m, Linear4bit) for m in model.modules()):
        raise ValueError("--method sara cannot train a 4-bit base (its weights are codes); load it in float")
    holders = _holders(model)
    masks = select_masks(model, config.threshold)
    if not masks:
        smallest = min(float(p.detach().abs().min()) for _, p, _ in holders.values() if p.is_floating_point())
        raise ValueError(f"--sara-threshold {config.threshold:g} selects no entry of this model (its smallest |w| "
                         f"is {smallest:.3g}); raise --sara-threshold (the paper uses 2e-3)")
    for p in model.parameters():
        p.requires_grad_(False)
    entries = []
    for name, p, where in holders.values():
        if name not in masks:
            continue
        sparse = SparseValues(p, masks[name])
        for module, attr in where:  # tied weights: one parametrization, registered on each holder
            parametrize.register_parametrization(module, attr, sparse, unsafe=True)
        entries.append(SaraEntry(name, sparse, where))
    base.register_adapter(model, adapter_name, config)  # so methods.save finds the method's save hook
    hooks = [h for h in getattr(model, "leantune_train_hooks", None) or [] if not isinstance(h, SaraHooks)]
    model.leantune_train_hooks = [*hooks, SaraHooks(config, entries)]
    return model


def sara_hooks(model: nn.Module) -> "SaraHooks":
    found = [h for h in getattr(model, "leantune_train_hooks", None) or [] if isinstance(h, SaraHooks)]
    if not found:
        raise ValueError("this model has no SaRA parameters: apply the method first (leantune.apply(model, 'sara'))")
    return found[0]


def nuclear_norm(w: torch.Tensor) -> torch.Tensor:
    """||w||_*, differentiable (its gradient is U Vᵀ of w's SVD)."""
    return torch.linalg.matrix_norm(w, ord="nuc")


# ---------------------------------------------------------------------------------------------
# the train hooks: nuclear-norm term, progressive reselection, masks in checkpoints


class SaraHooks:
    """The Trainer's hooks of one SaRA model (`train.step`'s protocol)."""

    def __init__(self, config: SaraConfig, entries: list[SaraEntry]):
        self.config, self.entries = config, entries
        self.nuclear: SaraEntry | None = None  # this step's draw
        self.direction: torch.Tensor | None = None  # U Vᵀ of its masked weight at this step

    def eligible(self) -> list[SaraEntry]:
        return [e for e in self.entries if e.weight.dim() == 2 and min(e.weight.shape) > NUCLEAR_MIN_DIM]

    def before_step(self, model, step: int, total_steps: int) -> None:  # noqa: ARG002
        pool = self.eligible() if self.config.lambda_rank > 0 else []
        if not pool:
            self.nuclear = None
            return
        gen = torch.Generator().manual_seed(step)  # one draw per step, the same after a resume
        self.nuclear = e = pool[int(torch.randint(len(pool), (1,), generator=gen))]
        with torch.no_grad():  # one SVD per optimizer step, however many micro-batches it has
            u, _, vh = torch.linalg.svd(e.composed() * e.sparse.mask, full_matrices=False)
            self.direction = u @ vh

    def regularizer(self, model) -> torch.Tensor | None:  # noqa: ARG002
        """`lambda_rank * ||W ⊙ M||_*` of this step's draw, written as `<W ⊙ M, U Vᵀ>` with the step's SVD: the
        same value (the trace of S) and the same gradient, `lambda_rank * (U Vᵀ) ⊙ M`, as the weights do not
        change within a step, without back-propagating through an SVD at every micro-batch."""
        if self.nuclear is None:
            return None
        e = self.nuclear
        return self.config.lambda_rank * (e.composed() * e.sparse.mask * self.direction).sum()

    def change_trainable(self, model, step: int, optimizer) -> bool:  # noqa: ARG002
        """Progressive reselection at optimizer call P+1 (step index P); True when the vectors were replaced."""
        if not self.config.progressive_iter or step != self.config.progressive_iter:
            return False
        for e in self.entries:
            e.sparse.sync(e.weight)
            if self.config.reselect == "fresh":
                reselect_fresh(e, self.config.threshold)
            else:
                reselect_intersect(e, self.config.threshold, optimizer)
        return self.config.reselect == "fresh"

    def save_state(self, model, folder: Path) -> None:  # noqa: ARG002
        from ..methods.adapter_io import _fsync
        from safetensors.torch import save_file

        tensors = {}
        for e in self.entries:
            e.sparse.sync(e.weight)
            idx = e.sparse.origin_idx
            tensors[f"{e.name}.mask"] = e.sparse.mask.contiguous().cpu()
            tensors[f"{e.name}.origin_idx"] = idx.cpu()
            tensors[f"{e.name}.origin_val"] = e.sparse.origin_val.cpu()
            tensors[f"{e.name}.current"] = e.weight.detach().reshape(-1)[idx].cpu()
        tmp = Path(folder) / f".{STATE_NAME}.tmp"
        save_file(tensors, str(tmp))
        _fsync(tmp)
        os.replace(tmp, Path(folder) / STATE_NAME)

    def load_state(self, model, folder: Path) -> bool:  # noqa: ARG002
        """Restore the masks and trained entries of a checkpoint; True: the trainable vectors were replaced."""
        from safetensors.torch import load_file

        path = Path(folder) / STATE_NAME
        if not path.is_file():
            raise ValueError(f"checkpoint {folder} has no {STATE_NAME} (the SaRA masks): it was not written by "
                             "--method sara; resume with the same --method, or start a new --output")
        state = load_file(str(path))
        for e in self.entries:
            if f"{e.name}.mask" not in state or state[f"{e.name}.mask"].shape != e.weight.shape:
                raise ValueError(f"checkpoint {folder}: {STATE_NAME} does not match this model at {e.name!r}; "
                                 "resume with the same --model and --sara-threshold, or start a new --output")
        for e in self.entries:
            restore_entry(e, *(state[f"{e.name}.{k}"] for k in ("mask", "origin_idx", "origin_val", "current")))
        return True


@torch.no_grad()
def _replace_values(e: SaraEntry, mask: torch.Tensor) -> None:
    """New mask and a new trainable vector read from the (synced) dense weight."""
    w = e.weight
    e.sparse.mask = mask.to(w.device)
    e.sparse.values = nn.Parameter(w.detach()[e.sparse.mask].clone())
    e.sparse._synced = None


@torch.no_grad()
def _extend_origin(e: SaraEntry) -> None:
    """Record the original value of entries that join the mask: untrained so far, so the weight still holds it."""
    s = e.sparse
    new = s.mask.reshape(-1).nonzero().reshape(-1)
    new = new[~torch.isin(new, s.origin_idx)]
    if new.numel():
        idx, order = torch.cat([s.origin_idx, new]).sort()
        s.origin_idx = idx
        s.origin_val = torch.cat([s.origin_val, e.weight.detach().reshape(-1)[new]])[order]


def reselect_fresh(e: SaraEntry, threshold: float) -> None:
    """`M' = |p_t| < threshold`: a new trainable vector (its optimizer state starts afresh)."""
    _replace_values(e, e.weight.detach().abs() < threshold)
    _extend_origin(e)


@torch.no_grad()
def reselect_intersect(e: SaraEntry, threshold: float, optimizer) -> None:
    """`M' = M ∧ (|p_t| < threshold)`: a new vector of the surviving entries takes over their gradient and
    optimizer state (swapped into `optimizer` in place of the old one), so the optimizer goes on."""
    s = e.sparse
    new_mask = s.mask & (e.weight.detach().abs() < threshold)
    keep = new_mask[s.mask]  # (|M|,) which entries of `values` survive
    old = s.values
    # a new Parameter, not old.data reassigned: autograd keeps the leaf's shape with its gradient accumulator
    new = nn.Parameter(old.detach()[keep].clone())
    if old.grad is not None:
        new.grad = old.grad[keep].clone()
    if optimizer is not None:
        state = optimizer.state.pop(old, None)
        if state:  # per-entry state (AdamW's moments) sliced; the step count kept
            optimizer.state[new] = {k: t[keep].clone() if torch.is_tensor(t) and t.shape == old.shape else t
                                    for k, t in state.items()}
        for group in optimizer.param_groups:
            group["params"] = [new if p is old else p for p in group["params"]]
    s.values, s.mask, s._synced = new, new_mask, None


@torch.no_grad()
def restore_entry(e: SaraEntry, mask, origin_idx, origin_val, current) -> None:
    """A checkpoint's state of one weight: trained entries back to their current values, then its mask."""
    w = e.weight
    flat = w.detach().view(-1)
    flat[origin_idx.to(w.device)] = current.to(w.device, w.dtype)
    e.sparse.origin_idx = origin_idx.to(w.device)
    e.sparse.origin_val = origin_val.to(w.device, torch.float32)
    _replace_values(e, mask.to(torch.bool))


# ---------------------------------------------------------------------------------------------
# saving and loading: a sparse diff


@torch.no_grad()
def sara_diff(model: nn.Module, adapter_name: str = "default", base_model_name_or_path: str | None = None) -> SparseDiff:
    """The trained change as a SparseDiff: every entry ever in a mask, `p - p0` (zeros kept)."""
    hooks = sara_hooks(model)
    config = base.adapter_configs(model).get(adapter_name, hooks.config)
    out = SparseDiff(method=METHOD, config=dataclasses.asdict(config), base_model_name_or_path=base_model_name_or_path)
    for e in hooks.entries:
        e.sparse.sync(e.weight)
        idx = e.sparse.origin_idx
        delta = e.weight.detach().reshape(-1)[idx].float() - e.sparse.origin_val
        out.shapes[e.name] = tuple(e.weight.shape)
        out.diffs[e.name] = (idx.to("cpu", torch.int64), delta.to("cpu", torch.float32))
    return out


def save_sara(model: nn.Module, out_dir, adapter_name: str = "default",
              base_model_name_or_path: str | None = None) -> Path:
    return save_sparse_diff(sara_diff(model, adapter_name, base_model_name_or_path), out_dir)


def claims_sara(path) -> bool:
    return is_sparse_diff_folder(path, METHOD)


def load_sara(model: nn.Module, path, adapter_name: str = "default", trainable: bool = False) -> nn.Module:  # noqa: ARG001
    """Add a saved SaRA diff to the model's own weights (checked against the model before any is written).

    No adapter is registered: the diff is part of the base from here on, as after `leantune merge`."""
    if trainable:
        raise ValueError(f"{path} is a SaRA sparse diff: it loads into the base's own weights, not as a trainable "
                         "adapter; merge it (leantune merge) and finetune the merged model")
    diff = read_sparse_diff(path)
    return apply_diff(model, diff)


def memory_trained(cfg, named: list, s: int, sara_fraction: float = 0.01, **_) -> TrainedState:
    """`leantune estimate`'s count of what SaRA trains: `sara_fraction` of the entries (|w| < threshold) of the
    matrices (norms start near 1, outside any mask): values (s) + grad (s) + two moments (s) + AdamW's step per
    tensor; buffers: the mask (bool, dense), the indices (int64), the original values (s)."""
    total = sum(p.numel() for _, p in named)
    selected = round(sara_fraction * total)
    tensors = sum(p.dim() == 2 for _, p in named)
    buffers = sum(p.numel() for _, p in named if p.dim() == 2) + selected * (8 + s)
    return TrainedState(selected * s, selected * s, selected * s, 2 * selected * s + 4 * tensors, 0, buffers,
                        selected * s, [selected])


MEMORY = MemoryModel(trained=memory_trained, trainable_row="SaRA trained values",
                     buffers_row="SaRA masks, indices, original values")

register_method(METHOD, SaraConfig, apply_sara, memory=MEMORY, save=save_sara, claims=claims_sara, load=load_sara,
                train_defaults=train_defaults, trains_base=True,
                help="SaRA: the small-|w| entries of every weight train (unstructured backprop: gradients and "
                     "Adam state the size of the mask); nuclear-norm term, progressive reselection; saved as a "
                     "sparse diff")

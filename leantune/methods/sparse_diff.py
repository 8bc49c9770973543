"""Sparse diffs: the saved form of the sparse methods (SaRA, LT-SFT), and their composition.

A sparse finetune changes few entries of the base's own weights. What it saves is the change, not a model:

    diff[name] = (indices, values)     # flat int64 indices into parameter `name`, ascending; fp32 values
    dense[name] = tensor               # parameters that trained densely (LT-SFT's head: its "abs")

so that `theta = theta0 + sum(diffs)` (composable-sft's `apply`, with `with_abs`), and `revert` subtracts
again. Applying one diff to the base it was trained from gives back the trained weights: `theta - theta0` of
two nearby floats is exact (Sterbenz), so `theta0 + (theta - theta0) == theta` for every entry that moved by
less than its own size, and within one rounding otherwise.

On disk a folder holds two files, written under temp names and renamed into place (config last):

    sparse_diff.safetensors   "{name}.indices" (int64), "{name}.values" (fp32), "{name}.dense"
    sparse_diff_config.json   {"format": "leantune-sparse-diff", "format_version": 1, "method": ...,
                               "config": {method options}, "shapes": {name: [dims]},
                               "base_model_name_or_path": ...}

Reading checks the form (each name has both indices and values, of one length, indices in range of its
recorded shape); applying checks the model (every name is a parameter of that shape) before any weight is
written, and a mismatch names the first offending parameter.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

FORMAT = "leantune-sparse-diff"
FORMAT_VERSION = 1
WEIGHTS_NAME = "sparse_diff.safetensors"
CONFIG_NAME = "sparse_diff_config.json"


@dataclass
class SparseDiff:
    """A sparse change to a model's own parameters (see the module docstring)."""

    diffs: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # name -> (idx, values)
    dense: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> its whole trained value
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # every name in diffs and dense
    method: str = ""
    config: dict = field(default_factory=dict)  # the method's options, as saved
    base_model_name_or_path: str | None = None

    def nnz(self) -> int:
        """Entries the diff changes (dense parameters not counted)."""
        return sum(int(idx.numel()) for idx, _ in self.diffs.values())

    def check_form(self, where: str = "sparse diff") -> None:
        for name, (idx, val) in self.diffs.items():
            if name not in self.shapes:
                raise ValueError(f"{where}: {name!r} has no recorded shape")
            if idx.dtype != torch.int64 or idx.dim() != 1 or val.dim() != 1 or idx.numel() != val.numel():
                raise ValueError(f"{where}: {name!r} needs 1-D int64 indices and values of one length, got "
                                 f"{tuple(idx.shape)} {idx.dtype} and {tuple(val.shape)} {val.dtype}")
            numel = _numel(self.shapes[name])
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= numel):
                raise ValueError(f"{where}: {name!r} has indices outside its {numel} entries")
        for name, value in self.dense.items():
            if tuple(value.shape) != tuple(self.shapes.get(name, ())):
                raise ValueError(f"{where}: dense {name!r} has shape {tuple(value.shape)}, recorded "
                                 f"{self.shapes.get(name)}")


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def diff_between(before: dict[str, torch.Tensor], after: nn.Module | dict[str, torch.Tensor], *,
                 masks: dict[str, torch.Tensor] | None = None, dense: list[str] = (),
                 min_abs: float = 0.0) -> SparseDiff:
    """The sparse diff from the tensors `before` (name -> original value) to `after` (a model or a dict).

    Only names in `before` are diffed. With `masks` (name -> bool tensor of the parameter's shape) entries
    outside a name's mask are left out even if they moved; entries with |after - before| <= `min_abs` are
    left out too (LT-SFT drops |delta| <= 1e-7; SaRA keeps every masked entry: min_abs < 0). Names in `dense`
    are saved whole."""
    cur = dict(after.named_parameters()) if isinstance(after, nn.Module) else after
    out = SparseDiff()
    for name, old in before.items():
        new = cur[name].detach()
        out.shapes[name] = tuple(new.shape)
        if name in dense:
            out.dense[name] = new.to("cpu", torch.float32).clone()
            continue
        delta = (new.to(torch.float32) - old.to(new.device, torch.float32)).reshape(-1)
        keep = delta.abs() > min_abs if min_abs >= 0 else torch.ones_like(delta, dtype=torch.bool)
        if masks is not None and name in masks:
            keep &= masks[name].to(keep.device).reshape(-1)
        idx = keep.nonzero().reshape(-1)
        if idx.numel():
            out.diffs[name] = (idx.to("cpu", torch.int64), delta[idx].to("cpu", torch.float32))
    return out


def save_sparse_diff(diff: SparseDiff, out_dir) -> Path:
    """Write `diff` to the folder `out_dir` (created if needed); tensors then config, each renamed into place."""
    from .adapter_io import _replace_in_folder

    diff.check_form()
    tensors = {}
    for name, (idx, val) in diff.diffs.items():
        tensors[f"{name}.indices"] = idx.contiguous()
        tensors[f"{name}.values"] = val.to(torch.float32).contiguous()
    for name, value in diff.dense.items():
        tensors[f"{name}.dense"] = value.contiguous()
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "method": diff.method, "config": diff.config,
            "shapes": {k: list(v) for k, v in sorted(diff.shapes.items())},
            "base_model_name_or_path": diff.base_model_name_or_path}
    out_dir = Path(out_dir).absolute()
    out_dir.mkdir(parents=True, exist_ok=True)
    _replace_in_folder(out_dir, tensors, json.dumps(meta, indent=2, sort_keys=True), WEIGHTS_NAME, CONFIG_NAME)
    return out_dir


def is_sparse_diff_folder(path, method: str | None = None) -> bool:
    """`path` is a sparse-diff folder (of `method`, when given)."""
    cfg = Path(path) / CONFIG_NAME
    if not cfg.is_file():
        return False
    if method is None:
        return True
    try:
        return json.loads(cfg.read_text(encoding="utf-8")).get("method") == method
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return True  # claimed, so that reading it gives the clear error


def read_sparse_diff(path) -> SparseDiff:
    """The SparseDiff saved in folder `path`, checked for form (not yet against a model)."""
    from .adapter_io import read_format_folder

    meta, tensors = read_format_folder(path, CONFIG_NAME, WEIGHTS_NAME, FORMAT, FORMAT_VERSION, "sparse-diff")
    weights_path = Path(path) / WEIGHTS_NAME
    out = SparseDiff(shapes={k: tuple(v) for k, v in (meta.get("shapes") or {}).items()},
                     method=str(meta.get("method") or ""), config=dict(meta.get("config") or {}),
                     base_model_name_or_path=meta.get("base_model_name_or_path"))
    names = {k.rsplit(".", 1)[0] for k in tensors}
    for name in sorted(names):
        if f"{name}.dense" in tensors:
            out.dense[name] = tensors[f"{name}.dense"]
        elif f"{name}.indices" in tensors and f"{name}.values" in tensors:
            out.diffs[name] = (tensors[f"{name}.indices"], tensors[f"{name}.values"])
        else:
            raise ValueError(f"{weights_path}: {name!r} needs both .indices and .values (or .dense)")
    out.check_form(str(weights_path))
    return out


def check_fits(model: nn.Module, diff: SparseDiff, where: str = "sparse diff") -> dict[str, torch.Tensor]:
    """The model's parameters by name, after checking every name of `diff` is one of them with its shape."""
    params = dict(model.named_parameters())
    for name, shape in diff.shapes.items():
        if name not in params:
            raise ValueError(f"{where} changes {name!r}, which this model does not have; was it trained for a "
                             f"different base model ({diff.base_model_name_or_path})?")
        if tuple(params[name].shape) != tuple(shape):
            raise ValueError(f"{where}: {name!r} has shape {tuple(shape)} there but {tuple(params[name].shape)} "
                             f"in this model; was it trained for a different base model "
                             f"({diff.base_model_name_or_path})?")
    return params


@torch.no_grad()
def apply_diff(model: nn.Module, diff: SparseDiff | str | Path, *, scale: float = 1.0,
               with_dense: bool = True) -> nn.Module:
    """theta += scale * diff, in place (scale -1: revert); dense parameters are replaced when `with_dense`
    (composable-sft's `with_abs`; pass False to add a language diff to a task model). Returns the model."""
    where = str(diff) if isinstance(diff, (str, Path)) else "sparse diff"
    if isinstance(diff, (str, Path)):
        diff = read_sparse_diff(diff)
    params = check_fits(model, diff, where)
    for name, (idx, val) in diff.diffs.items():
        p = params[name]
        flat = p.data.view(-1) if p.data.is_contiguous() else None
        add = (val * scale).to(p.device, p.dtype)
        if flat is not None:
            flat.index_add_(0, idx.to(p.device), add)
        else:
            p.data.copy_(p.data.reshape(-1).index_add(0, idx.to(p.device), add).view_as(p))
    if with_dense:
        for name, value in diff.dense.items():
            params[name].data.copy_(value.to(params[name].device, params[name].dtype))
    return model


def revert_diff(model: nn.Module, diff: SparseDiff | str | Path) -> nn.Module:
    """Subtract `diff` again (dense parameters are left as they are): allclose to before apply, not bitwise."""
    return apply_diff(model, diff, scale=-1.0, with_dense=False)

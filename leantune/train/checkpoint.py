"""Training checkpoints: trainable weights, optimizer state, RNG and progress — safetensors + JSON only.

A checkpoint is written into a hidden temp folder and renamed into place as the last act, so a
folder named `step-N` is always complete; a run killed mid-write leaves only a `.tmp-*` folder, which
resume ignores and the next save removes. No pickle is written or read.

A run on several processes (`train.distributed`) writes the trainable weights and optimizer state with
torch.distributed.checkpoint into `step-N/dcp` instead (each rank its shards); the rest is the same, written by
rank 0. `load_checkpoint` reads either kind, the sharded one on any number of ranks or in one process.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

_STEP_DIR = re.compile(r"^step-(\d+)$")


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            t = v if torch.is_tensor(v) else torch.tensor(v)
            tensors[f"state.{idx}.{k}"] = t.detach().contiguous().cpu()
    return tensors, {"param_groups": sd["param_groups"]}


def _optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, t in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = t
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(out_dir: Path, step: int, model, opt, progress: dict,
                    save_artifacts: Callable[[Path], None] | None = None, keep: int = 2, parallel=None) -> Path:
    """Checkpoint `step`; `parallel` (a `train.distributed.Parallel`): every rank calls it, DCP shards."""
    if parallel is not None:
        return _save_sharded_checkpoint(out_dir, step, model, opt, progress, save_artifacts, keep, parallel)
    ckdir = Path(out_dir) / "checkpoints"
    ckdir.mkdir(parents=True, exist_ok=True)
    for stale in ckdir.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-step-{step}-", dir=ckdir))
    trainable = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}
    save_file(trainable, str(tmp / "trainable.safetensors"))
    tensors, meta = _optimizer_tensors(opt)
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    save_file({"cpu": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
    if save_artifacts is not None:
        save_artifacts(tmp)
    (tmp / "trainer_state.json").write_text(json.dumps({**progress, "step": step, **meta}, indent=1))
    return _publish(out_dir, tmp, step, keep)


def _publish(out_dir: Path, tmp: Path, step: int, keep: int) -> Path:
    """Rename a complete temp folder to step-N (the last act of a save) and drop the oldest checkpoints."""
    final = Path(out_dir) / "checkpoints" / f"step-{step}"
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(out_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _save_sharded_checkpoint(out_dir, step, model, opt, progress, save_artifacts, keep, par) -> Path:
    from .distributed import prepare_tmp, save_sharded

    tmp = prepare_tmp(Path(out_dir) / "checkpoints", step, par)
    save_sharded(tmp, model, opt)  # every rank its shards
    with par.gathered():  # the adapter (or full model) in the checkpoint, as a one-process run writes it
        if par.main and save_artifacts is not None:
            save_artifacts(tmp)
    if par.main:
        save_file({"cpu": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
        (tmp / "trainer_state.json").write_text(json.dumps({**progress, "step": step,
                                                            "world_size": par.world}, indent=1))
        _publish(out_dir, tmp, step, keep)
    par.barrier()  # no rank goes on (or dies) before step-N is complete
    return Path(out_dir) / "checkpoints" / f"step-{step}"


def list_checkpoints(out_dir: Path) -> list[Path]:
    ckdir = Path(out_dir) / "checkpoints"
    if not ckdir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckdir.iterdir() if (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found) if (p / "trainer_state.json").exists()]


def checkpoint_phase(path: Path) -> str | None:
    """The training phase a checkpoint was written in (methods that train in phases), None for a single run."""
    return json.loads((Path(path) / "trainer_state.json").read_text()).get("phase")


def load_checkpoint(path: Path, model, opt, parallel=None) -> dict:
    """Restore trainable weights, optimizer and RNG from `path`; returns the saved progress dict."""
    from .distributed import is_sharded, load_sharded

    path = Path(path)
    state = json.loads((path / "trainer_state.json").read_text())
    if is_sharded(path):  # written by a run on several processes: DCP reshards it onto this one's
        load_sharded(path, model, opt)
        torch.set_rng_state(load_file(str(path / "rng.safetensors"))["cpu"])
        return state
    if parallel is not None:
        raise ValueError(f"checkpoint {path} was written by a single-process run; resume it with one process "
                         "(without torchrun), or start a new --output")
    trainable = load_file(str(path / "trainable.safetensors"))
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in trainable]
    if missing or any(n not in params for n in trainable):
        raise ValueError(f"checkpoint {path} does not match this model/method (e.g. {(missing or list(trainable))[:3]}); "
                         "resume with the same --model and --method, or start a new --output")
    with torch.no_grad():
        for n, t in trainable.items():
            params[n].copy_(t)
    opt_sd = _optimizer_state(load_file(str(path / "optimizer.safetensors")), state)
    opt.load_state_dict(opt_sd)
    torch.set_rng_state(load_file(str(path / "rng.safetensors"))["cpu"])
    return state

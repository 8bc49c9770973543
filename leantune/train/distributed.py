"""Data-parallel and sharded training on torch.distributed: everything a run launched by `torchrun` needs, in
one place (the Trainer and the finetune recipe call it through a `Parallel` object; None means one process).

- Launch: `torchrun --nproc_per_node N -m leantune finetune ...`. The process group is initialized from
  torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT): gloo on CPU, nccl on CUDA, each rank
  on GPU LOCAL_RANK.
- Data: `--batch-size` is the *global* micro-batch. Every rank builds the same global batches (a pure function
  of seed and epoch, `data.batching`) and keeps its contiguous share of each batch's rows (`shard_batch`), so a
  global batch is the single-process batch. A rank left without rows (a short last batch) computes on a row
  with no loss tokens, so it still joins every collective.
- Loss: the window's weight (loss tokens) is all-reduced before backward and each rank back-propagates
  `world * loss_sum_rank / weight_global`; DDP and FSDP average gradients over ranks, so the gradient is the
  single-process one: a per-token mean over the global window, not a mean of rank means.
- Strategies (`--parallel`): `ddp` (`DistributedDataParallel`: every rank holds the model) or `fsdp` (FSDP2,
  `torch.distributed.fsdp.fully_shard` on every decoder block, then on the root: parameters, gradients and
  optimizer state sharded). The root is a small module whose forward is the objective's loss, so the chunked
  loss, which reads the head's weight directly, runs while the root's parameters are gathered. Buffers are not
  sharded: QLoRA's packed 4-bit base (uint8 buffers) is replicated on every rank, only its adapters shard.
- Checkpoints: `torch.distributed.checkpoint` (DCP) of the trainable weights and the optimizer state, keyed by
  the model's own parameter names, so a checkpoint written by N ranks loads on M ranks or in one process
  (DCP reshards); progress, RNG and the adapter (gathered, written by rank 0) sit beside it as in a
  single-process checkpoint.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

PARALLEL = ("auto", "ddp", "fsdp")
DCP_DIR = "dcp"  # a checkpoint's sharded weights + optimizer state
# test-only: rank EXIT_RANK (default 1) exits hard after optimizer step N, as a killed process would
EXIT_AFTER_ENV, EXIT_RANK_ENV = "LEANTUNE_TEST_EXIT_AFTER_STEP", "LEANTUNE_TEST_EXIT_RANK"


def launched() -> bool:
    """True in a process started by torchrun (or any launcher that sets torch.distributed's env contract)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1")) if launched() else 1


def parallel_checks(cfg) -> list[tuple[bool, str]]:
    """Validation of --parallel / --nproc / --batch-size against the world size (torchrun's, else --nproc), as
    (ok, message) pairs: made while the config is read, so every rank stops with the same message before the
    process group is used."""
    world = world_size() if launched() else cfg.nproc
    strategy = "fsdp" if cfg.parallel == "auto" else cfg.parallel
    dist_run = launched() or cfg.nproc > 1
    return [
        (cfg.parallel in PARALLEL, f"--parallel must be one of {PARALLEL}, got {cfg.parallel!r}"),
        (cfg.nproc >= 1, f"--nproc must be >= 1, got {cfg.nproc}"),
        (cfg.parallel == "auto" or launched() or cfg.nproc > 1,
         f"--parallel {cfg.parallel} shards the run over processes: launch it with torchrun "
         "(torchrun --nproc_per_node N -m leantune finetune ...) or add --nproc N"),
        (not dist_run or cfg.batch_size % world == 0,
         f"--batch-size {cfg.batch_size} is the global micro-batch and must divide evenly over the {world} "
         f"processes; use a multiple of {world}"),
        (not dist_run or cfg.objective == "sft",
         f"--objective {cfg.objective} does not run under --parallel {strategy} yet; use one process"),
        (not dist_run or cfg.optimizer in ("adamw",),
         f"--optimizer {cfg.optimizer} does not run under --parallel {strategy} yet (its state is not a "
         "torch.optim.AdamW's: GaLore projects whole gradient matrices, which FSDP shards; paged AdamW keeps "
         "its own pages); use --optimizer adamw or one process"),
        (not dist_run or not cfg.fpf_fraction,
         f"--fpf-fraction's probe does not run under --parallel {strategy} yet; use one process"),
    ]


@dataclass
class Parallel:
    """One rank of a torch.distributed run: who it is and how the model is wrapped (`wrap`)."""

    rank: int
    world: int
    local_rank: int
    strategy: str  # ddp | fsdp
    device: torch.device
    wrapped: nn.Module | None = None  # the DDP / FSDP root around the loss module
    blocks: list = field(default_factory=list)  # FSDP modules below the root
    cpu_offload: bool = False  # FSDP: sharded parameters, gradients and optimizer state in CPU memory

    @property
    def main(self) -> bool:
        return self.rank == 0

    # ---- process group -------------------------------------------------------------------------
    @classmethod
    def from_env(cls, parallel: str, device: str, cpu_offload: bool = False) -> "Parallel | None":
        """Initialize the process group from torchrun's env; None outside torchrun (one process)."""
        import torch.distributed as dist

        if not launched():
            return None
        rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
        cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
        if cuda:  # "cuda" then means this rank's own GPU
            torch.cuda.set_device(local)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo")
        strategy = "fsdp" if parallel == "auto" else parallel
        return cls(rank, world, local, strategy, torch.device("cuda", local) if cuda else torch.device("cpu"),
                   cpu_offload=cpu_offload)

    def close(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    def all_sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks (fp64, so token counts stay exact)."""
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    # ---- data ------------------------------------------------------------------------------------
    def shard_batch(self, batch):
        """This rank's contiguous share of a global batch's rows (`data.Batch`); sizes differ by at most one
        row. A rank without rows gets the first row with every label -100: it runs forward and backward (every
        collective is joined) and adds no loss token and no gradient."""
        from ..data.batching import Batch
        from ..data.formats import IGNORE_INDEX

        B = batch.input_ids.shape[0]
        start = self.rank * B // self.world
        end = (self.rank + 1) * B // self.world
        labels = batch.labels[start:end]
        if end == start:
            start, end, labels = 0, 1, torch.full_like(batch.labels[:1], IGNORE_INDEX)
        seg = batch.segment_ids
        ids, pos = batch.input_ids[start:end], batch.positions[start:end]
        seg = None if seg is None else seg[start:end]
        # real tokens: every row starts with one at position 0, later ones have positions > 0
        real = int((seg > 0).sum()) if seg is not None else int(ids.shape[0] + (pos[:, 1:] > 0).sum())
        return Batch(ids, labels, pos, seg, int((labels != IGNORE_INDEX).sum()), real)

    # ---- model -----------------------------------------------------------------------------------
    def check_trainable(self, model: nn.Module, method: str) -> None:
        """Refuse what does not train correctly when sharded yet: train hooks (they read or rewrite whole
        gradients and weights between steps) and models without decoder blocks to shard."""
        hooks = list(getattr(model, "leantune_train_hooks", None) or [])
        if hooks:
            raise ValueError(f"--method {method} changes gradients or weights between steps (its train hooks: "
                             f"{', '.join(type(h).__name__ for h in hooks)}), which --parallel {self.strategy} "
                             "does not run yet; use one process")
        if not hasattr(model, "layer_module") or not hasattr(model, "num_layers"):
            raise ValueError(f"--method {method} wraps the model in a {type(model).__name__}, which --parallel "
                             f"{self.strategy} does not shard yet; use one process")

    def wrap(self, model: nn.Module, objective) -> nn.Module:
        """The module to call for a batch's (loss sum, weight, metrics): `objective.loss_sum(model, batch)`
        under DDP or FSDP2. `model` keeps its parameter names (checkpoints use them)."""
        root = LossModule(model, objective)
        if self.strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.local_rank] if self.device.type == "cuda" else None
            # find_unused_parameters: a rank's rows may hold no loss token (see shard_batch), so the head's
            # adapter may get no gradient on that rank in that micro-batch
            self.wrapped = DDP(root, device_ids=ids, find_unused_parameters=True)
            return self.wrapped
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

        kw = {}
        if self.device.type == "cuda":
            # trainable weights stay fp32 (house rule: their updates would round away in bf16) and the frozen
            # base is already loaded in the compute dtype; the policy keeps the gradient reduction in fp32
            kw["mp_policy"] = MixedPrecisionPolicy(reduce_dtype=torch.float32)
        if self.cpu_offload:
            kw["offload_policy"] = CPUOffloadPolicy()
        self.blocks = [fully_shard(model.layer_module(i), **kw) for i in range(model.num_layers)]
        self.wrapped = fully_shard(root, **kw)
        return self.wrapped

    @contextlib.contextmanager
    def no_sync(self, last: bool):
        """Micro-batches before the window's last skip the gradient reduction; the last one reduces the sum."""
        if last or self.wrapped is None:
            yield
        elif self.strategy == "ddp":
            with self.wrapped.no_sync():
                yield
        else:
            self.wrapped.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                self.wrapped.set_requires_gradient_sync(True)

    def _fsdp_modules(self) -> list:
        return [*self.blocks, self.wrapped] if self.strategy == "fsdp" and self.wrapped is not None else []

    @contextlib.contextmanager
    def gathered(self):
        """Every FSDP parameter gathered (plain tensors in the modules) for the duration: to run the model
        outside the loss module (eval) or to read its weights (saving). Collective: all ranks enter it."""
        mods = self._fsdp_modules()
        for m in mods:
            m.unshard()
        hooks = self._drop_state_dict_hooks()
        try:
            yield
        finally:
            for m, h in hooks:
                m._state_dict_pre_hooks.update(h)
            for m in mods:
                m.reshard()

    def _drop_state_dict_hooks(self) -> list:
        """Take out FSDP2's state_dict pre-hooks (they swap the sharded parameters back into the modules), so
        that state_dict() of the gathered model, which a full model's save reads, gives the gathered tensors;
        returns what to put back."""
        if not self._fsdp_modules():
            return []
        taken = [(m, dict(m._state_dict_pre_hooks)) for m in self.wrapped.modules() if m._state_dict_pre_hooks]
        for m, _ in taken:
            m._state_dict_pre_hooks.clear()
        return taken

    def gather_for_good(self) -> None:
        """After training: gather every parameter and keep them gathered, so the model runs and saves like an
        unsharded one with no further collective (rank 0 writes and evaluates alone)."""
        for m in self._fsdp_modules():
            m.unshard()
            m.set_reshard_after_forward(False, recurse=False)
        self._drop_state_dict_hooks()

    # ---- checkpoints -----------------------------------------------------------------------------
    def grad_norm(self, gnorm) -> float:
        """The clipped gradient's total norm as a float (FSDP returns it as a DTensor)."""
        return float(gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm)


class LossModule(nn.Module):
    """The DDP / FSDP root: its forward is the objective's loss on a batch, so the wrapper's hooks (DDP's
    reducer, FSDP's gathering of the root parameters: embeddings, final norm, head) bracket the whole loss."""

    def __init__(self, model: nn.Module, objective):
        super().__init__()
        self.model = model
        self.objective = objective  # not a module

    def forward(self, batch):
        return self.objective.loss_sum(self.model, batch)


def _state_dicts(model, opt):
    """(trainable parameters by name, optimizer state keyed by parameter names). The parameters themselves
    (sharded DTensors under FSDP), so DCP loads into them in place; only trainable ones: the frozen base is the
    --model the run loads again, and its 4-bit buffers (QLoRA) have state-dict keys that are not module paths."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    msd = {n: p for n, p in model.named_parameters() if p.requires_grad}
    return msd, get_optimizer_state_dict(model, opt)


def save_sharded(folder: Path, model, opt) -> None:
    """The trainable weights and the optimizer state into folder/dcp (collective when a group exists)."""
    import torch.distributed.checkpoint as dcp

    msd, osd = _state_dicts(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(Path(folder) / DCP_DIR))


def load_sharded(folder: Path, model, opt) -> None:
    """Restore what `save_sharded` wrote, resharded onto this run's ranks (or one process)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    path = Path(folder) / DCP_DIR
    msd, osd = _state_dicts(model, opt)
    saved = {k.split(".", 1)[1] for k in dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
             if k.startswith("model.")}
    if saved != set(msd):
        raise ValueError(f"checkpoint {folder} does not match this model/method (e.g. "
                         f"{sorted(saved ^ set(msd))[:3]}); resume with the same --model and --method, or start a "
                         "new --output")
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=str(path))  # the parameters in place
    set_optimizer_state_dict(model, opt, optim_state_dict=state["optim"])


def is_sharded(folder: Path) -> bool:
    return (Path(folder) / DCP_DIR).is_dir()


def prepare_tmp(ckdir: Path, step: int, par: Parallel) -> Path:
    """The temp folder all ranks write checkpoint `step` into (a name they agree on), stale ones removed."""
    tmp = ckdir / f".tmp-step-{step}"
    if par.main:
        ckdir.mkdir(parents=True, exist_ok=True)
        for stale in ckdir.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    par.barrier()
    return tmp


def run_torchrun(nproc: int, output: str) -> dict:
    """`leantune finetune --nproc N ...`: this same command line under torchrun on N local processes (its
    --standalone rendezvous picks a free port); the summary rank 0 wrote. A failed launch exits with its code."""
    import json
    import subprocess
    import sys

    if sys.argv[1:2] != ["finetune"]:
        raise ValueError("--nproc relaunches the `leantune finetune` command line; from Python, start torchrun "
                         "yourself (torchrun --nproc_per_node N -m leantune finetune ...)")
    args, rest = [], iter(sys.argv[1:])
    for a in rest:  # without --nproc, which torchrun's own parser would take for --nproc-per-node
        if a == "--nproc":
            next(rest, None)
        elif not a.startswith("--nproc="):
            args.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "leantune", *args]
    rc = subprocess.run(cmd).returncode
    if rc != 0:
        raise SystemExit(rc)
    return json.loads((Path(output) / "summary.json").read_text())


def maybe_exit_for_test(par: Parallel | None, step: int) -> None:
    """Test hook: LEANTUNE_TEST_EXIT_AFTER_STEP=k makes rank LEANTUNE_TEST_EXIT_RANK (default 1) die after step
    k, as a killed process would (no cleanup, no exception), to test resume after a lost rank."""
    k = os.environ.get(EXIT_AFTER_ENV)
    if par is not None and k and step == int(k) and par.rank == int(os.environ.get(EXIT_RANK_ENV, "1")):
        os._exit(17)

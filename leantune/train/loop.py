"""The training loop shared by every recipe: token-weighted gradient accumulation, clipping, AdamW (or paged
AdamW), warmup + decay, periodic eval and checkpoints, exact resume, progress bar, run records (metrics.jsonl and
the --report-to loggers of `train.report`) and loss.png.

Exact resume: batches are a pure function of (seed, epoch); a checkpoint stores trainable weights,
optimizer state, the RNG and the position in the epoch, so a resumed run computes the same losses as an
uninterrupted one.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..fields import opt
from ..optim import OPTIMIZERS, PROJECTED_OPTIMIZERS, attach_per_layer, build_optimizer
from ..optim.schedules import SCHEDULES
from .checkpoint import checkpoint_phase, list_checkpoints, load_checkpoint, save_checkpoint
from .distributed import maybe_exit_for_test
from .dpo import DPO_LOSSES
from .objectives import OBJECTIVES, SFT_TRAINED, SFTObjective
from .trainable import (check_projection_ranks, default_proj_type, optimizer_params, option_checks, prepare_model,
                        projection_checks)
from .plot import plot_losses
from .progress import Progress
from .report import open_loggers, parse_report_to
from .step import (
    StepRule, before_step, change_trainable, load_hook_state, optimizer_step, regularizer, save_hook_state, set_lr,
    train_hooks,
)


@dataclass
class TrainConfig:
    lr: float = opt(2e-4, "peak learning rate")
    epochs: int = opt(1, "passes over the training data")
    max_steps: int = opt(0, "optimizer steps; > 0 overrides --epochs")
    batch_size: int = opt(4, "examples per micro-batch")
    grad_accum: int = opt(1, "micro-batches per optimizer step (loss is token-weighted over them)")
    max_length: int = opt(512, "longest example in tokens (longer ones: error, or see --truncate)")
    pack: bool = opt(False, "pack several examples per row (no attention across them)")
    warmup_steps: int = opt(0, "linear warmup steps")
    warmup_ratio: float = opt(0.0, "warmup as a fraction of all steps (if --warmup-steps is 0)")
    schedule: str = opt("cosine", "lr decay after warmup: cosine, linear or constant")
    min_lr_ratio: float = opt(0.0, "final lr as a fraction of the peak")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    optimizer: str = opt("adamw", "adamw, paged_adamw (optimizer states of large tensors kept off the "
                         "device/working set), galore_adamw (GaLore: moments of attention/MLP weight matrices "
                         "in a rank --galore-rank projection of their gradients; with --method full) or "
                         "natural_galore (Natural GaLore: GaLore on both sides of each matrix, its projected "
                         "gradient preconditioned by the inverse Fisher of the last --natural-history ones)")
    galore_rank: int = opt(128, "GaLore: rank of the gradient projection")
    galore_update_proj_gap: int = opt(200, "GaLore: recompute each projection (SVD of the gradient) every N steps")
    galore_scale: float = opt(0.25, "GaLore: scale of the projected-back update (alpha)")
    galore_proj_type: str | None = opt(None, "GaLore: std (project the smaller side), reverse_std, right, left, full "
                                       "(both sides, SVD) or tucker (natural_galore only: both sides, Tucker/HOOI); "
                                       "default std for galore_adamw, tucker for natural_galore")
    # GaLore's layer-wise updates and Natural GaLore's options (checked in train.trainable.projection_checks)
    galore_per_layer: bool = opt(False, "GaLore / Natural GaLore: update each weight inside backward as soon as its "
                                 "gradient is complete and free that gradient, so the gradients of all layers "
                                 "never live at once (needs --grad-accum 1 and --max-grad-norm 0)")
    natural_history: int = opt(20, "Natural GaLore: projected gradients kept for the natural-gradient (Woodbury) "
                               "transform; 0 = off (plain GaLore on the chosen projection)")
    natural_reset_history: bool = opt(False, "Natural GaLore: clear that history when the subspace is refreshed "
                                      "(the official code keeps it, mixing old and new coordinates)")
    max_grad_norm: float = opt(1.0, "clip the gradient norm to this (0 = off)")
    seed: int = opt(0, "seed for init, shuffling and dropout")
    gradient_checkpointing: bool = opt(False, "recompute each layer in backward to save memory")
    offload_activations: bool = opt(False, "keep tensors saved for backward in (pinned) CPU memory (CUDA)")
    eval_every: int = opt(0, "evaluate every N steps (0 = at the end only)")
    save_every: int = opt(0, "checkpoint every N steps (0 = at the end only)")
    keep_checkpoints: int = opt(2, "how many recent checkpoints to keep")
    progress: bool = opt(True, "show a progress bar (a plain line every few steps when stderr is not a terminal)")
    report_to: str = opt("csv", "where each step's metrics and the run config go besides metrics.jsonl: a comma "
                         "list of none, csv (metrics.csv), tensorboard (OUTPUT/tensorboard), wandb (W&B; "
                         "WANDB_MODE=offline keeps it on disk), mlflow (MLFLOW_TRACKING_URI, else OUTPUT/mlflow.db); "
                         "tensorboard, wandb and mlflow are extras: pip install 'leantune[wandb]'",
                         metavar="NAME[,NAME]")
    llrd: float = opt(0.0, "layer-wise lr decay xi: block l of L trains at lr * xi^(L-l), embeddings at lr * xi^L "
                      "(0 = off)")
    freeze_lower: int = opt(0, "freeze the embeddings and everything (adapters too) in the lowest K blocks")
    reinit_top: int = opt(0, "re-initialize the top K blocks' pretrained weights (N(0, 0.02), norms 1) and "
                          "train them in full")
    fpf_fraction: float = opt(0.0, "FPF: train only the modules that drift most in a short probe, up to this "
                              "fraction of the trainable parameters (0 = off)")
    fpf_probe_steps: int = opt(5, "FPF: SGD steps of the drift probe (undone before training)")
    objective: str = opt("sft", "what to train on: sft (token cross-entropy on the answers), dpo (Direct "
                         "Preference Optimization on preference pairs: prompt/chosen/rejected rows) or s3ft "
                         "(Selective Self-to-Supervised Fine-Tuning: SFT on the model's own judged-correct "
                         "answers, its paraphrases of the gold answers, else the gold ones; see --judge) or "
                         "self-train (LiST on classification rows with --unlabeled: teacher, then students on its "
                         "soft labels under meta re-weighting; an encoder --model)")
    beta: float = opt(0.1, "DPO: beta, how far the policy may move from the reference (TRL's default)")
    dpo_loss: str = opt("sigmoid", "DPO: the loss on the log-ratio difference: sigmoid (DPO), ipo (IPO, "
                        "per-token averaged log-ratios) or hinge (SLiC)")
    dpo_precompute_ref: bool = opt(False, "DPO: compute every pair's reference log-probs once before training (in "
                                          "eval mode, as TRL's precompute_ref_log_probs) instead of a forward "
                                          "with the adapters off in each step: one forward fewer per step")

    def __post_init__(self):
        if self.galore_proj_type is None:  # the projected optimizer's own default projection
            self.galore_proj_type = default_proj_type(self.optimizer)
        checks = [
            (self.lr > 0, f"--lr must be > 0, got {self.lr}"),
            (self.epochs >= 1 or self.max_steps > 0, "set --epochs >= 1 or --max-steps > 0"),
            (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
            (self.grad_accum >= 1, f"--grad-accum must be >= 1, got {self.grad_accum}"),
            (self.max_length >= 2, f"--max-length must be >= 2, got {self.max_length}"),
            (self.optimizer in OPTIMIZERS, f"--optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}"),
            (self.schedule in SCHEDULES, f"--schedule must be one of {SCHEDULES}, got {self.schedule!r}"),
            (0 <= self.warmup_ratio < 1, f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}"),
            (self.max_grad_norm >= 0, f"--max-grad-norm must be >= 0, got {self.max_grad_norm}"),
            (self.galore_rank >= 1, f"--galore-rank must be >= 1, got {self.galore_rank}"),
            (self.galore_update_proj_gap >= 1,
             f"--galore-update-proj-gap must be >= 1, got {self.galore_update_proj_gap}"),
            (not (self.llrd and self.optimizer in PROJECTED_OPTIMIZERS),
             f"--llrd and --optimizer {self.optimizer} cannot be combined (both set the parameter groups)"),
        ] + objective_checks(self)
        for ok, msg in checks + projection_checks(self) + option_checks(self):
            if not ok:
                raise ValueError(msg)
        # before any model is loaded: an unknown backend or a missing extra stops here
        self.report_to = ",".join(parse_report_to(self.report_to)) or "none"


def objective_checks(cfg) -> list[tuple[bool, str]]:
    """Validation of --objective and the DPO options, as (ok, message) pairs."""
    dpo = cfg.objective == "dpo"
    return [
        (cfg.objective in OBJECTIVES, f"--objective must be one of {OBJECTIVES}, got {cfg.objective!r}"),
        (cfg.beta > 0, f"--beta must be > 0, got {cfg.beta}"),
        (cfg.dpo_loss in DPO_LOSSES, f"--dpo-loss must be one of {DPO_LOSSES}, got {cfg.dpo_loss!r}"),
        # a pair's two sequences are scored whole; packing would put other samples in their rows
        (not (dpo and cfg.pack), "--pack packs SFT examples; drop it with --objective dpo"),
        # FPF's probe takes SFT steps on the training examples, which DPO's pairs are not
        (not (dpo and cfg.fpf_fraction), "--fpf-fraction probes with the SFT loss; drop it with --objective dpo"),
        # it re-initializes base weights after DPO's reference is fixed, so the reference would be neither model
        (not (dpo and cfg.reinit_top), "--reinit-top changes the model DPO's reference is; drop it with "
                                       "--objective dpo"),
    ]


def peak_memory_mb(device: torch.device) -> dict:
    """{"peak_memory_mb": peak so far in MiB}: allocated CUDA memory on a GPU, else the process's peak RSS (what a
    CPU run needs of the machine, weights and all); {} where the OS does not tell it (Windows has no `resource`)."""
    if device.type == "cuda":
        return {"peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20}
    try:
        import resource
    except ImportError:
        return {}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_memory_mb": rss / 2**20 if sys.platform == "darwin" else rss / 2**10}  # macOS: bytes; Linux: KiB


def check_fp32_trainable(model) -> None:
    """Trainable weights must be fp32 (an AdamW update below 2^-8 of a bf16 weight rounds away); a bf16
    base trains adapters, which methods create in fp32."""
    half = [n for n, p in model.named_parameters() if p.requires_grad and p.dtype in (torch.bfloat16, torch.float16)]
    if half:
        raise ValueError(f"{len(half)} trainable parameters are half precision (e.g. {half[0]}), which would "
                         "lose their updates; load the model in fp32 (--dtype fp32) to train base weights")


class Trainer:
    """Holds the explicit state of one run; `fit()` drives it."""

    def __init__(self, model, train_examples, eval_examples, cfg: TrainConfig, out_dir: str | Path,
                 save_artifacts: Callable[[Path], None] | None = None, run_config: dict | None = None,
                 phase: str | None = None, objective=None, parallel=None):
        self.model, self.cfg, self.out = model, cfg, Path(out_dir)
        # one rank of a torch.distributed run (`train.distributed.Parallel`), None for one process
        self.parallel = parallel
        # what the loss is (`train.objectives`); a DPO objective carries its reference, so it is built by the
        # caller for the model as it is at the start (`train.dpo.build_dpo`)
        if objective is None and cfg.objective not in SFT_TRAINED:
            raise ValueError(f"a Trainer for --objective {cfg.objective} needs its objective object "
                             "(train.dpo.build_dpo)")
        self.objective = objective if objective is not None else SFTObjective()
        # which phase of a method that trains in several (`train.phases`) this run is: kept in every
        # checkpoint, and a checkpoint of another phase is refused on resume
        self.phase = phase
        self.train_ex, self.eval_ex = train_examples, eval_examples
        self.save_artifacts = save_artifacts
        # what the loggers record as the run's config (the recipe's whole config; default: the training one)
        self.run_config = run_config if run_config is not None else dataclasses.asdict(cfg)
        self.resumed_at: int | None = None
        self._epoch_cache: tuple[int, list] | None = None
        # --reinit-top, --freeze-lower, FPF: they decide which parameters train, so they come first
        self.options_report = prepare_model(model, train_examples, cfg)
        self.per_layer_hooks: list = []
        # the callable that computes a batch's loss: through DDP / FSDP2 (built before the optimizer, which
        # must see the sharded parameters) or the objective on the model itself
        self._loss = lambda b: self.objective.loss_sum(self.model, b)
        if parallel is not None:
            self._loss = parallel.wrap(model, self.objective)
        self._build_optimizer()
        n_batches = len(self._batches(0))
        self.steps_per_epoch = max(1, math.ceil(n_batches / cfg.grad_accum))
        self.total_steps = cfg.max_steps if cfg.max_steps > 0 else cfg.epochs * self.steps_per_epoch
        self.warmup = cfg.warmup_steps or int(cfg.warmup_ratio * self.total_steps)
        self.rule = StepRule(cfg.lr, self.total_steps, self.warmup, cfg.schedule, cfg.min_lr_ratio, cfg.max_grad_norm)
        self.step, self.epoch, self.batch_idx, self.tokens = 0, 0, 0, 0
        self.history: list[tuple[int, float]] = []
        self.eval_history: list[tuple[int, float]] = []

    def _build_optimizer(self) -> None:
        """The optimizer over the model's trainable parameters, with fresh state; again whenever a train hook
        replaces trainable parameters (`train.step.change_trainable`)."""
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters: apply a method (e.g. --method lora) first")
        check_fp32_trainable(self.model)
        check_projection_ranks(self.model, self.params, self.cfg)
        self.opt = build_optimizer(self.cfg.optimizer, optimizer_params(self.model, self.params, self.cfg),
                                   lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        # --galore-per-layer: backward updates each weight and frees its gradient (optim.per_layer)
        for h in self.per_layer_hooks:  # those of the optimizer this one replaces
            h.remove()
        self.per_layer_hooks = attach_per_layer(self.opt) if self.cfg.galore_per_layer else []

    def _batches(self, epoch: int) -> list:
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            batches = self.objective.batches(self.train_ex, epoch, self.cfg)
            if self.parallel is not None:  # every rank builds the global batches and keeps its rows
                batches = [self.parallel.shard_batch(b) for b in batches]
            self._epoch_cache = (epoch, batches)
        return self._epoch_cache[1]

    # ---- resume ---------------------------------------------------------------------------------
    def resume(self) -> bool:
        cks = list_checkpoints(self.out)
        if not cks:
            return False
        phase = checkpoint_phase(cks[-1])
        if phase != self.phase:  # before any weight is loaded
            raise ValueError(f"checkpoint {cks[-1]} belongs to training phase {phase!r}, not {self.phase!r}; "
                             "resume with the same --method and options, or start a new --output")
        if load_hook_state(self.model, train_hooks(self.model), cks[-1]):  # e.g. SaRA's masks decide the shapes
            self._build_optimizer()
        st = load_checkpoint(cks[-1], self.model, self.opt, self.parallel)
        self.step, self.epoch, self.batch_idx, self.tokens = st["step"], st["epoch"], st["batch_idx"], st["tokens"]
        self.history = [tuple(x) for x in st["history"]]
        self.eval_history = [tuple(x) for x in st["eval_history"]]
        self.resumed_at = self.step  # the run records keep what was logged up to here
        return True

    # ---- the step -------------------------------------------------------------------------------
    def _window(self):
        """The next grad_accum batches, moving through epochs; None when training data is exhausted."""
        out = []
        while len(out) < self.cfg.grad_accum:
            batches = self._batches(self.epoch)
            if self.batch_idx >= len(batches):
                if self.cfg.max_steps <= 0 and self.epoch + 1 >= self.cfg.epochs:
                    break
                self.epoch, self.batch_idx = self.epoch + 1, 0
                continue
            out.append(batches[self.batch_idx])
            self.batch_idx += 1
        return out or None

    def _sync(self, last: bool):
        """Under DDP / FSDP only the window's last micro-batch reduces gradients over the ranks."""
        return self.parallel.no_sync(last) if self.parallel is not None else contextlib.nullcontext()

    def _saved_tensors_place(self, like: torch.Tensor):
        """Activation offload: with checkpointing only each layer's input is saved, so moving the saved
        tensors to host memory leaves the device holding one layer's recompute at a time."""
        if self.cfg.offload_activations and like.is_cuda:
            return torch.autograd.graph.save_on_cpu(pin_memory=True)
        return contextlib.nullcontext()

    def train_step(self, window) -> dict:
        self.model.train()
        device = self.model.head_module().weight.device  # batches are built on the CPU (--device cuda)
        window = [b.to(device) for b in window]
        hooks = train_hooks(self.model)
        before_step(self.model, hooks, self.step, self.total_steps)
        # the step's lr before backward: an optimizer that updates inside backward (per layer) reads it there;
        # optimizer_step sets the same value again for the others
        set_lr(self.opt, self.rule.lr_at(self.step))
        # the window's weight: loss tokens (SFT) or pairs (DPO), each of which weighs the same in the mean
        n_w = sum(self.objective.weight(b) for b in window)
        # the mean is over the global window: each rank scales by the world size the averaging reduction divides by
        scale = 1
        if self.parallel is not None:
            n_w, scale = int(self.parallel.all_sum([n_w])[0]), self.parallel.world
        total, reg_total, sums = 0.0, None, {}
        for i, b in enumerate(window):
            with self._sync(i == len(window) - 1):  # gradients reduced over ranks once per window
                with self._saved_tensors_place(b.input_ids):
                    loss_sum, n_b, metrics = self._loss(b)
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + v
                reg = regularizer(self.model, hooks)
                if reg is not None:
                    # A regularizer joins the mean loss once per step (as in PEFT's `loss + reg`): each
                    # micro-batch carries its share of it (by weight), so the window's shares add up to one.
                    loss_sum = loss_sum + reg * n_b
                    reg_total = (reg_total or 0.0) + float(reg.detach()) * n_b
                # Normalized by the window's weight: every loss token (SFT) or pair (DPO) of it weighs the same.
                (loss_sum * scale / max(n_w, 1)).backward()
            total += float(loss_sum.detach())
        tokens = sum(int(b.input_ids.numel()) for b in window)
        if self.parallel is not None:  # the logged loss and counts are the global window's
            total, tokens = self.parallel.all_sum([total, tokens])
            tokens = int(tokens)
        loss = total / max(n_w, 1)
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss became {loss} at step {self.step + 1}; lower --lr or check the data")
        if change_trainable(self.model, hooks, self.step, self.opt):
            # a hook replaced trainable parameters (their gradients went with them): no update this step, and
            # the optimizer starts afresh over the new ones; no gradient of this step carries over to the next
            self.opt.zero_grad(set_to_none=True)
            self._build_optimizer()
            lr, gnorm = self.rule.lr_at(self.step), float("nan")
        else:
            if any(hasattr(h, "change_trainable") for h in hooks):  # it may have swapped parameters in self.opt
                self.params = [p for p in self.model.parameters() if p.requires_grad]
            lr, gnorm = optimizer_step(self.opt, self.params, self.rule, self.step, self.model, hooks)
        self.step += 1
        self.tokens += tokens
        rec = {"step": self.step, "epoch": self.epoch, "loss": loss, "lr": lr, "grad_norm": gnorm,
               self.objective.weight_name: n_w, "tokens": self.tokens,
               **{k: v / max(n_w, 1) for k, v in sums.items()}, **peak_memory_mb(window[0].input_ids.device)}
        if reg_total is not None:
            rec["reg_loss"] = reg_total / max(n_w, 1)  # the part of "loss" that the regularizers make
        return rec

    def evaluate(self) -> float | None:
        if not self.eval_ex:
            return None
        if self.parallel is not None:  # every rank evaluates the whole set on the gathered model (lockstep)
            with self.parallel.gathered():
                return self.objective.evaluate(self.model, self.eval_ex, self.cfg)
        return self.objective.evaluate(self.model, self.eval_ex, self.cfg)

    # ---- the loop -------------------------------------------------------------------------------
    def save(self):
        progress = {"epoch": self.epoch, "batch_idx": self.batch_idx, "tokens": self.tokens,
                    "history": self.history, "eval_history": self.eval_history}
        def artifacts(folder: Path) -> None:  # the recipe's files, then the train hooks' state (SaRA's masks)
            if self.save_artifacts is not None:
                self.save_artifacts(folder)
            save_hook_state(self.model, train_hooks(self.model), folder)

        if self.phase is not None:
            progress["phase"] = self.phase
        return save_checkpoint(self.out, self.step, self.model, self.opt, progress, artifacts,
                               self.cfg.keep_checkpoints, parallel=self.parallel)

    def fit(self) -> dict:
        self.out.mkdir(parents=True, exist_ok=True)
        if hasattr(self.model, "gradient_checkpointing"):
            self.model.gradient_checkpointing = self.cfg.gradient_checkpointing
        main = self.parallel is None or self.parallel.main  # logs, progress and plots: rank 0 only
        bar = Progress(self.total_steps, enabled=self.cfg.progress and main, start=self.step)
        loggers = open_loggers(self.cfg.report_to if main else "none", self.out, resume_step=self.resumed_at,
                               jsonl=main)
        loggers.log_config(self.run_config)
        t0, tok0, ok = time.perf_counter(), self.tokens, False
        try:
            while self.step < self.total_steps:
                window = self._window()
                if window is None:
                    break
                rec = self.train_step(window)
                dt = time.perf_counter() - t0
                rec["tokens_per_s"] = (self.tokens - tok0) / max(dt, 1e-9)
                self.history.append((self.step, rec["loss"]))
                if self.cfg.eval_every and self.step % self.cfg.eval_every == 0 and self.step < self.total_steps:
                    rec["eval_loss"] = self.evaluate()
                    self.eval_history.append((self.step, rec["eval_loss"]))
                loggers.log_metrics(rec["step"], {k: v for k, v in rec.items() if k != "step"})
                bar.update(self.step, rec["loss"], rec["tokens_per_s"])
                if self.cfg.save_every and self.step % self.cfg.save_every == 0 and self.step < self.total_steps:
                    self.save()
                maybe_exit_for_test(self.parallel, self.step)
            final_eval = self.evaluate()
            if final_eval is not None:
                self.eval_history.append((self.step, final_eval))
                loggers.log_metrics(self.step, {"eval_loss": final_eval})
            self.save()
            ok = True
        finally:
            loggers.close(success=ok)
            bar.close()
            if self.history and main:
                plot_losses(self.history, self.eval_history, self.out / "loss.png")
        return {"steps": self.step, "train_loss": self.history[-1][1] if self.history else None,
                "eval_loss": self.eval_history[-1][1] if self.eval_history else None,
                "first_loss": self.history[0][1] if self.history else None}

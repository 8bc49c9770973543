"""LT-SFT (`--method lt-sft`): lottery-ticket sparse fine-tuning, and its composition (Ansell et al., "Composable
Sparse Fine-Tuning for Cross-Lingual Transfer", ACL 2022, arXiv:2110.07560; cambridgeltl/composable-sft
`src/sft/{lt_sft,trainer,sft}.py`; reference: methods-core.md §8).

Per iteration (`--n-ft-iterations`, default 1), each phase with a fresh optimizer and schedule
(`train.phases.PhaseRunner`, called from the `fit` hook):

1. snapshot the trained parameters as `prev`;
2. full phase: every trained parameter trains (`--full-ft-steps` / `--full-ft-epochs`);
3. select the K/n entries of the body (the maskable parameters) with the largest |theta - theta0| among those
   not yet selected: threshold = the k-th largest |delta|, every entry with |delta| >= threshold joins the mask
   (ties can select more than k, as `np.partition` in the source);
4. reset every parameter, head included, to `prev`;
5. sparse phase: the body's gradients are multiplied by the mask right after backward, before clipping
   (`after_backward` train hook), so clipping sees the masked gradients as in HF's Trainer; the head trains
   densely. The optimizer's decoupled weight decay would still move entries outside the mask, so after each
   step those entries are put back to their value at the start of the phase (`after_step`): they stay
   bitwise unchanged whatever the optimizer.

Each phase is a Trainer run of its own in OUTPUT/phases/{full,sparse}-{i}/ (metrics, loss.png, checkpoints that
name the phase); a phase given no length of its own takes the run's --max-steps / --epochs. `--resume` replays
the phases that finished (their final weights restored, the mask selected again from them) and continues the
one that was cut from its last checkpoint, so it computes the losses of an uninterrupted run.

Optional L1 towards theta0 (`--full-l1-reg`, `--sparse-l1-reg`, 0 by default): lambda * sum|theta - theta0| over
the trained parameters / the model's parameter count, joined to the loss once per optimizer step.

K is `--ft-params-num`, else int(`--ft-params-proportion` * maskable entries) (default 0.01). The maskable
parameters are those that train (`--targets`, default all) minus the ones of `--lt-sft-dense` modules
(default `lm_head`), which train densely and are saved whole. A head tied to the embeddings is the embedding
matrix itself, a body parameter, so it is maskable (as composable-sft's BERT decoder is).

Saved as a sparse diff (`sparse_diff.py`, method "lt-sft"): `diff = (theta - theta0)` where |.| > 1e-7 for the
maskable parameters, the dense ones whole. Composition (`leantune merge/generate/chat --adapter A --adapter
B`, or `apply_diff`): theta0 + phi_A + phi_B; each diff's dense parameters replace the model's in the order
given, so the last adapter carrying a parameter wins (a language diff then a task diff: the task's head, as
composable-sft's `with_abs=False` for the language diff). `--lt-sft-base-diffs` trains on top of other diffs
(applied without their dense parameters, before theta0 is taken): the cross-lingual recipe trains a task diff
on base + source-language diff and runs it on base + target-language diff + task diff.

Memory: theta0 (on the CPU unless an L1 term needs it beside the weights) and `prev` (one copy each of the
trained parameters), a bool mask, and full dense gradients and AdamW states: LT-SFT saves in what it writes (the
diff), not in what training holds.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..fields import opt
from . import base
from .full import ALL, FullConfig, trained_parameter_names
from .memory import MemoryModel
from .registry import register_method
from .sparse_diff import apply_diff, diff_between, is_sparse_diff_folder, save_sparse_diff
from .targets import parse_targets, resolve_targets

METHOD = "lt-sft"
MIN_ABS = 1e-7  # composable-sft's `sft(eps=1e-7)`: smaller changes are not saved
HOOKS_ATTR = "leantune_train_hooks"


def _names(value) -> list[str]:
    return [] if value in (None, "", []) else [s.strip() for s in str(value).split(",") if s.strip()]


@dataclass
class LtSftConfig:
    ft_params_num: int = opt(0, "K: body entries that train in the sparse phase (0: --ft-params-proportion "
                                "of the maskable entries)", flag="--ft-params-num")
    ft_params_proportion: float = opt(0.01, "K as a fraction of the maskable entries (when --ft-params-num is 0)",
                                      flag="--ft-params-proportion")
    full_ft_steps: int = opt(0, "optimizer steps of each full phase (0: --full-ft-epochs, else the run's "
                                "--max-steps / --epochs)", flag="--full-ft-steps")
    full_ft_epochs: int = opt(0, "epochs of each full phase (when --full-ft-steps is 0)", flag="--full-ft-epochs")
    sparse_ft_steps: int = opt(0, "optimizer steps of each sparse phase (0: --sparse-ft-epochs, else the run's "
                                  "--max-steps / --epochs)", flag="--sparse-ft-steps")
    sparse_ft_epochs: int = opt(0, "epochs of each sparse phase (when --sparse-ft-steps is 0)",
                                flag="--sparse-ft-epochs")
    n_ft_iterations: int = opt(1, "selection iterations: each selects K/n more entries (full phase, mask, "
                                  "reset, sparse phase)", flag="--n-ft-iterations")
    full_l1_reg: float = opt(0.0, "L1 towards the base in the full phase: lambda * sum|theta - theta0| / params",
                             flag="--full-l1-reg")
    sparse_l1_reg: float = opt(0.0, "L1 towards the base in the sparse phase", flag="--sparse-l1-reg")
    targets: str | list[str] = opt(ALL, "weights that train at all: all, or a comma list of module-name "
                                        "suffixes or a regex (as --method full)", flag="--targets",
                                   parse=parse_targets)
    dense: str = opt("lm_head", "modules trained densely and saved whole (the head), not masked: comma list of "
                                "module-name suffixes, or none", flag="--lt-sft-dense")
    base_diffs: str = opt("", "sparse-diff folders (comma list) added to the base before training, without "
                              "their dense parameters; the new diff is relative to that (a task diff on a "
                              "language diff)", flag="--lt-sft-base-diffs")

    def __post_init__(self):
        checks = [
            (self.ft_params_num >= 0, f"--ft-params-num must be >= 0 (0: use --ft-params-proportion), got "
                                      f"{self.ft_params_num}"),
            (0 < self.ft_params_proportion <= 1, f"--ft-params-proportion must be in (0, 1], got "
                                                 f"{self.ft_params_proportion}"),
            (self.n_ft_iterations >= 1, f"--n-ft-iterations must be >= 1, got {self.n_ft_iterations}"),
            (self.full_l1_reg >= 0 and self.sparse_l1_reg >= 0, "--full-l1-reg and --sparse-l1-reg must be >= 0"),
        ]
        checks += [(getattr(self, f) >= 0, f"--{f.replace('_', '-')} must be >= 0, got {getattr(self, f)}")
                   for f in ("full_ft_steps", "full_ft_epochs", "sparse_ft_steps", "sparse_ft_epochs")]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        self.targets = FullConfig(targets=self.targets).targets  # the same rules (and messages) as --method full
        if str(self.dense).strip().lower() == "none":
            self.dense = ""

    def k(self, n_maskable: int) -> int:
        """K, the entries to select over all iterations."""
        return self.ft_params_num or int(self.ft_params_proportion * n_maskable)


# ---------------------------------------------------------------------------------------------
# which parameters train, and how


def split_parameters(model: nn.Module, config: LtSftConfig) -> tuple[list[str], list[str]]:
    """(maskable, dense) parameter names: what trains, split into the body and the densely trained modules."""
    try:
        trained = trained_parameter_names(model, FullConfig(targets=config.targets))
    except ValueError as e:
        raise ValueError(f"--targets {config.targets!r}: {e}") from None
    if not _names(config.dense):
        return trained, []
    try:
        modules = resolve_targets(model, _names(config.dense), None,
                                  lambda m: next(m.parameters(), None) is not None, kind="a module with parameters")
    except ValueError as e:
        raise ValueError(f"--lt-sft-dense {config.dense!r}: {e} (none: no dense module)") from None
    prefixes = tuple(m + "." for m in modules)
    dense = [n for n in trained if n.startswith(prefixes)]
    return [n for n in trained if n not in dense], dense


def check_k(model: nn.Module, config: LtSftConfig) -> int:
    """K for this model, checked: at least one entry per iteration, at most the maskable entries."""
    shapes = dict(model.named_parameters())
    maskable, _ = split_parameters(model, config)
    n = sum(shapes[name].numel() for name in maskable)
    k = config.k(n)
    if k > n:
        raise ValueError(f"--ft-params-num {k} is larger than the {n:,} maskable entries of this model (the "
                         f"trained weights outside --lt-sft-dense); lower it, or use --ft-params-proportion")
    if k // config.n_ft_iterations < 1:
        raise ValueError(f"K = {k} entries over --n-ft-iterations {config.n_ft_iterations} selects none per "
                         f"iteration (of {n:,} maskable); raise --ft-params-proportion or --ft-params-num")
    return k


def preflight_lt_sft(config: LtSftConfig, model: nn.Module) -> None:
    """Before any weight is read (`model` on the meta device): K fits, --targets and --lt-sft-dense match,
    the --lt-sft-base-diffs folders are sparse diffs."""
    check_k(model, config)
    check_base_diffs(config)


def check_base_diffs(config: LtSftConfig) -> None:
    for path in _names(config.base_diffs):
        if not is_sparse_diff_folder(path):
            raise ValueError(f"--lt-sft-base-diffs {path}: not a sparse-diff folder (it needs "
                             "sparse_diff_config.json); pass the output folder of an lt-sft or sara run")


# ---------------------------------------------------------------------------------------------
# the training state: theta0, the mask, the phase


class LtSftState:
    """theta0, the mask and the phase of one LT-SFT run; the train hook the Trainer calls
    (`model.leantune_train_hooks`)."""

    def __init__(self, model: nn.Module, config: LtSftConfig, maskable: list[str], dense: list[str], k: int):
        self.config, self.maskable, self.dense, self.k = config, maskable, dense, k
        params = dict(model.named_parameters())
        self.trained = maskable + dense
        # theta0 on the CPU unless an L1 term needs it beside the weights every step (composable-sft)
        l1 = config.full_l1_reg or config.sparse_l1_reg
        self.theta0 = {n: params[n].detach().to("cpu" if not l1 else params[n].device, copy=True)
                       for n in self.trained}
        self.mask = {n: torch.zeros(params[n].shape, dtype=torch.bool, device=params[n].device) for n in maskable}
        self.masking = False  # on in the sparse phases
        self.frozen: dict[str, torch.Tensor] = {}  # sparse phase: the maskable weights at its start
        self.n_params = sum(p.numel() for p in model.parameters())

    # ---- train hooks (train.step) --------------------------------------------------------------
    @torch.no_grad()
    def after_backward(self, model: nn.Module) -> None:
        if not self.masking:
            return
        params = dict(model.named_parameters())
        for n in self.maskable:
            if params[n].grad is not None:
                params[n].grad.mul_(self.mask[n])

    def regularizer(self, model: nn.Module) -> torch.Tensor | None:
        lam = self.config.sparse_l1_reg if self.masking else self.config.full_l1_reg
        if not lam:
            return None
        params = dict(model.named_parameters())
        dist = sum((params[n] - self.theta0[n]).abs().sum() for n in self.trained)
        return lam * dist / self.n_params

    @torch.no_grad()
    def after_step(self, model: nn.Module, step: int) -> None:  # noqa: ARG002 - the hook's signature
        """Entries outside the mask back to their value before the step (decoupled weight decay moved them)."""
        if not self.masking:
            return
        params = dict(model.named_parameters())
        for n in self.maskable:
            params[n].data.copy_(torch.where(self.mask[n], params[n].data, self.frozen[n]))

    # ---- selection -----------------------------------------------------------------------------
    @torch.no_grad()
    def select(self, model: nn.Module, k: int) -> int:
        """Add to the mask the k not-yet-selected maskable entries with the largest |theta - theta0| (ties at
        the threshold all join); returns how many joined."""
        params = dict(model.named_parameters())

        def delta(n: str) -> torch.Tensor:  # computed again in the second pass: one |delta| at a time is held
            return (params[n].detach() - self.theta0[n].to(params[n].device)).abs()

        free = torch.cat([delta(n)[~self.mask[n]].reshape(-1).cpu() for n in self.maskable])  # (N_free,)
        if k > free.numel():
            raise ValueError(f"--ft-params-num: asked to select {k} more entries, but only {free.numel()} are "
                             "left unselected; lower --ft-params-num or --n-ft-iterations")
        thresh = torch.kthvalue(free, free.numel() - k + 1).values  # the k-th largest
        del free
        added = 0
        for n in self.maskable:
            new = (delta(n) >= thresh.to(params[n].device)) & ~self.mask[n]
            self.mask[n] |= new
            added += int(new.sum())
        return added

    def selected(self) -> int:
        return sum(int(m.sum()) for m in self.mask.values())


def lt_sft_state(model: nn.Module) -> LtSftState:
    state = next((h for h in getattr(model, HOOKS_ATTR, None) or [] if isinstance(h, LtSftState)), None)
    if state is None:
        raise ValueError("this model has no LT-SFT run: apply it first (leantune.apply(model, 'lt-sft'))")
    return state


# ---------------------------------------------------------------------------------------------
# the registry hooks


def apply_lt_sft(model: nn.Module, config: LtSftConfig, adapter_name: str) -> nn.Module:
    from ..quant import Linear4bit

    if base.list_adapters(model):
        raise ValueError(f"--method {METHOD} trains the model's own weights; this model already has adapters "
                         f"{base.list_adapters(model)}: merge them first (leantune merge) or start from the base")
    if any(isinstance(m, Linear4bit) for m in model.modules()):
        raise ValueError(f"--method {METHOD} cannot train a 4-bit base (its weights are codes); load it in float")
    k = check_k(model, config)
    check_base_diffs(config)
    for path in _names(config.base_diffs):  # theta0 is the base plus these (composable-sft's with_abs=False)
        apply_diff(model, path, with_dense=False)
    maskable, dense = split_parameters(model, config)
    trained = set(maskable + dense)
    for n, p in model.named_parameters():
        p.requires_grad_(n in trained)
    base.register_adapter(model, adapter_name, config)  # so methods.save finds the save hook
    hooks = list(getattr(model, HOOKS_ATTR, None) or [])
    setattr(model, HOOKS_ATTR, hooks + [LtSftState(model, config, maskable, dense, k)])
    return model


def _snapshot(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    return {n: params[n].detach().clone() for n in names}


@torch.no_grad()
def _restore(model: nn.Module, values: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    for n, v in values.items():
        params[n].copy_(v)


def fit_lt_sft(model: nn.Module, config: LtSftConfig, runner) -> dict:
    """The iterations of full phase, selection, reset and sparse phase (module docstring)."""
    state = lt_sft_state(model)
    per_iteration = state.k // config.n_ft_iterations
    result: dict = {}
    for it in range(1, config.n_ft_iterations + 1):
        prev = _snapshot(model, state.trained)
        state.masking, state.frozen = False, {}
        runner.run(f"full-{it}", steps=config.full_ft_steps, epochs=config.full_ft_epochs, artifacts=False)
        added = state.select(model, per_iteration)
        runner.log(f"lt-sft iteration {it}: {added:,} entries selected ({state.selected():,} in all)")
        _restore(model, prev)  # every parameter, head included, back to where the iteration started
        state.masking, state.frozen = True, {n: prev[n] for n in state.maskable}
        del prev
        result = runner.run(f"sparse-{it}", steps=config.sparse_ft_steps, epochs=config.sparse_ft_epochs)
    return result


def lt_sft_diff(model: nn.Module, base_model_name_or_path: str | None = None):
    """The run's SparseDiff: theta - theta0 of the maskable parameters (|.| > 1e-7), the dense ones whole."""
    state = lt_sft_state(model)
    diff = diff_between({n: state.theta0[n] for n in state.trained}, model, dense=state.dense, min_abs=MIN_ABS)
    diff.method, diff.base_model_name_or_path = METHOD, base_model_name_or_path
    diff.config = dataclasses.asdict(state.config)  # the options, so a folder says how it was made
    return diff


def save_lt_sft(model: nn.Module, out_dir, adapter_name: str = "default",  # noqa: ARG001 - the hook's signature
                base_model_name_or_path: str | None = None) -> Path:
    return save_sparse_diff(lt_sft_diff(model, base_model_name_or_path), out_dir)


def load_lt_sft(model: nn.Module, path, adapter_name: str = "default",  # noqa: ARG001 - the hook's signature
                trainable: bool = False) -> nn.Module:
    """Add the diff in folder `path` into the model's own weights (its dense parameters replace the model's)."""
    if trainable:
        raise ValueError(f"{path}: a sparse diff is added into the base weights and cannot be loaded as a "
                         "trainable adapter; to train on top of it, pass it to --lt-sft-base-diffs")
    return apply_diff(model, path)  # form and shapes checked before any weight is written


def memory_copies(grad_bytes: int, device: str) -> int:
    """`leantune estimate`'s count of LT-SFT's copies: prev, a copy of the trained weights on the device; theta0 on
    the CPU (in the process's memory when the device is the CPU). Its full phase is the peak (the sparse phase
    adds only a bool mask of the body while its dense states are the full phase's again)."""
    return (2 if device == "cpu" else 1) * grad_bytes


MEMORY = MemoryModel(projectable=True, copies=memory_copies, buffers_row="LT-SFT copies (prev; theta0 on CPU)")

register_method(METHOD, LtSftConfig, apply_lt_sft, trains_base=True, memory=MEMORY, save=save_lt_sft, load=load_lt_sft,
                claims=lambda path: is_sparse_diff_folder(path, METHOD), preflight=preflight_lt_sft,
                fit=fit_lt_sft,
                help="LT-SFT: lottery-ticket sparse finetuning (a full phase picks the K most-changed body "
                     "entries, then only they train from the base); saved as a sparse diff that "
                     "merge/generate/chat add to the base, several composing (--adapter A --adapter B)")

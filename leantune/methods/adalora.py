"""AdaLoRA (Zhang et al. 2023, "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning", arXiv:2303.10512).

`ΔW = P Λ Q` in SVD form: `lora_B = P` (out×r), `lora_E = Λ` (r×1), `lora_A = Q` (r×in), and
`y = base(x) + (dropout(x) @ (Q ⊙ Λ)ᵀ @ Pᵀ) · scaling / (ranknum + 1e-5)` with `scaling = alpha` and `ranknum`
the frozen initial rank. Training adds an orthogonality regularizer on P and Q and, after each optimizer step,
prunes singular values: every entry's sensitivity |w·∂L/∂w| is smoothed (EMA, beta1) and its uncertainty tracked
(EMA, beta2); triplets (P_i, Λ_i, Q_i) scoring lowest are masked (Λ_i ← 0) down to a budget that falls
cubically from Σ init_r to target_r per module between `tinit` and `total_step - tfinal`.

Numerics and on-disk format follow peft 0.21.2 `tuners/adalora/{config,layer,model}.py` (the test oracle):
parameters live in `nn.ParameterDict`s (`q_proj.lora_A.default`, `.lora_B`, `.lora_E`, `.ranknum`); a saved
adapter keeps only the unmasked rows, with `rank_pattern` ({"<module>.lora_E": [kept, ...]}) in its config.

Training integration is a hook object in `model.leantune_train_hooks` (read by `train.loop.Trainer`):
`before_step(model, step, total_steps)` fills in `total_step` from the run when not given,
`regularizer(model)` is added to the loss, and `after_step(model, step)` is PEFT's
`update_and_allocate(global_step)` (called after `optimizer.step()`, before `zero_grad`), with `step` the
0-based index of the step just taken, as in PEFT's examples.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import torch
from torch import nn

from ..fields import opt
from ..routing import Routing
from .adapter_io import (
    _INFORMATIONAL, _UNSUPPORTED, CONFIG_NAME, PEFT_LORA_DEFAULTS, PREFIX, _model_name, _other_model, peft_type,
    read_adapter,
)
from .base import (
    ACTIVE_ATTR, CONFIGS_ATTR, AdapterLayer, adapter_configs, adapter_layers, delete_adapter, freeze_base,
    register_adapter, replace_module, set_adapter, set_adapter_trainable,
)
from .lora import _adapter_placement, _check_names, is_linear_like
from .registry import apply, register_method
from .targets import is_all_linear, linear_sample, module_index, parse_targets, resolve_targets, suffix_targets

HOOKS_ATTR = "leantune_train_hooks"  # the list `train.loop.Trainer` calls; see the module docstring
RANKNUM_EPS = 1e-5  # PEFT divides by ranknum + 1e-5


@dataclass
class AdaLoraConfig:
    """AdaLoRA options (PEFT's `AdaLoraConfig` names; PEFT names in brackets where they differ)."""

    init_r: int = opt(12, "AdaLoRA: initial rank of every adapted module", flag="--init-r")
    target_r: int = opt(8, "AdaLoRA: average rank per module that pruning ends at", flag="--target-r")
    tinit: int = opt(0, "AdaLoRA: warmup steps before any pruning", flag="--tinit")
    tfinal: int = opt(0, "AdaLoRA: final steps that train with the rank allocation frozen", flag="--tfinal")
    deltaT: int = opt(1, "AdaLoRA: prune every N steps while the rank budget falls", flag="--delta-t")
    beta1: float = opt(0.85, "AdaLoRA: EMA factor of each weight's sensitivity |w * grad|", flag="--adalora-beta1")
    beta2: float = opt(0.85, "AdaLoRA: EMA factor of the sensitivity's uncertainty", flag="--adalora-beta2")
    orth_reg_weight: float = opt(0.5, "AdaLoRA: weight of the orthogonality regularizer of P and Q",
                                 flag="--orth-reg-weight")
    total_step: int | None = opt(None, "AdaLoRA: steps the budget schedule spans (default: the run's)",
                                 flag="--adalora-total-step")
    alpha: float = opt(8, "LoRA alpha (AdaLoRA: scale = alpha / rank)", flag="--alpha")  # [lora_alpha]
    dropout: float = opt(0.0, "dropout on the adapter branch", flag="--dropout")  # [lora_dropout]
    # [target_modules]: "all-linear", name suffixes, or a full-name regex
    targets: str | list[str] = opt("all-linear", "modules to adapt: all-linear, a comma list of names, or a regex",
                                   flag="--targets", parse=parse_targets)
    exclude: str | list[str] | None = opt(None, "[exclude_modules], same forms", cli=False)
    # module name -> which of its init_r triplets are kept: a finished allocation (a loaded adapter), whose
    # layers are built with only the kept rows; empty for a fresh adapter
    rank_pattern: dict = opt({}, "module -> kept triplets", cli=False)

    def __post_init__(self):
        _check_int("init_r", self.init_r, 1)
        _check_int("target_r", self.target_r, 0)
        if self.target_r >= self.init_r:
            raise ValueError(f"AdaLoraConfig.target_r ({self.target_r}) must be smaller than init_r ({self.init_r}): "
                             "AdaLoRA prunes from init_r down to target_r per module")
        for name, low in (("tinit", 0), ("tfinal", 0), ("deltaT", 1)):
            _check_int(name, getattr(self, name), low)
        for name in ("beta1", "beta2"):
            if not _is_number(getattr(self, name)) or not 0 < getattr(self, name) < 1:
                raise ValueError(f"AdaLoraConfig.{name} must be in (0, 1), got {getattr(self, name)!r}")
        _check_number("orth_reg_weight", self.orth_reg_weight, 0, strict=False)
        _check_number("alpha", self.alpha, 0, strict=True)
        if not _is_number(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"AdaLoraConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.total_step is not None:
            _check_schedule(self.tinit, self.tfinal, self.total_step)
        self.targets = _check_names("targets", self.targets, allow_none=False, owner="AdaLoraConfig")
        self.exclude = _check_names("exclude", self.exclude, allow_none=True, owner="AdaLoraConfig")
        self.rank_pattern = _check_rank_pattern(self.rank_pattern, self.init_r)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_int(name: str, value, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"AdaLoraConfig.{name} must be an int >= {low}, got {value!r}")


def _check_number(name: str, value, low: float, strict: bool) -> None:
    if not _is_number(value) or value < low or (strict and value == low):
        raise ValueError(f"AdaLoraConfig.{name} must be a number {'>' if strict else '>='} {low}, got {value!r}")


def _check_schedule(tinit: int, tfinal: int, total_step) -> None:
    _check_int("total_step", total_step, 1)
    if tinit >= total_step - tfinal:
        raise ValueError(f"AdaLoRA's schedule leaves no budgeting phase: tinit ({tinit}) must be < total_step "
                         f"({total_step}) - tfinal ({tfinal}); lower tinit or tfinal, or train for more steps")


def _check_rank_pattern(value, init_r: int) -> dict:
    if not isinstance(value, dict):
        raise ValueError(f"AdaLoraConfig.rank_pattern must be a dict of module name -> list of bools, got {value!r}")
    out = {}
    for key, kept in value.items():
        # PEFT's keys name the lora_E parameter ("<module>.lora_E", in memory also ".lora_E.<adapter>")
        module = re.sub(r"\.lora_E(\.[^.]+)?$", "", key) if isinstance(key, str) else key
        if not isinstance(module, str) or not module:
            raise ValueError(f"AdaLoraConfig.rank_pattern key {key!r} must be a module name")
        if not isinstance(kept, (list, tuple)) or len(kept) != init_r or not all(isinstance(k, bool) for k in kept):
            raise ValueError(f"AdaLoraConfig.rank_pattern[{key!r}] must be a list of init_r={init_r} bools "
                             f"(which triplets are kept), got {kept!r}")
        out[module] = list(kept)
    return out


# ---------------------------------------------------------------------------------------------
# the layer


def is_adalora_target(module: nn.Module) -> bool:
    """A linear-like layer, or an AdaLoraLinear that gets one more adapter."""
    return isinstance(module, AdaLoraLinear) or (is_linear_like(module) and not isinstance(module, AdapterLayer))


class AdaLoraLinear(AdapterLayer):
    """A linear layer with any number of AdaLoRA adapters (PEFT's `adalora.SVDLinear` layout)."""

    adapter_module_dicts = ("lora_A", "lora_B", "lora_E", "ranknum", "lora_dropout")

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        # registered in PEFT's order (A, B, E, ranknum), so sums over named_parameters() add in the same order
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_E = nn.ParameterDict()
        self.ranknum = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}  # rows held now (init_r, or the kept count of a loaded allocation)
        self.scaling: dict[str, float] = {}
        # which of the init_r triplets are kept: set by each pruning step, or given by a loaded allocation
        self.rank_pattern: dict[str, list[bool] | None] = {}

    def add_adapter(self, name: str, slot: int, cfg: AdaLoraConfig, pattern: list[bool] | None = None) -> None:
        r = cfg.init_r if pattern is None else sum(pattern)
        device, dtype = _adapter_placement(self.base_layer)
        self.lora_A[name] = nn.Parameter(torch.empty(r, self.in_features, device=device, dtype=dtype))
        self.lora_B[name] = nn.Parameter(torch.empty(self.out_features, r, device=device, dtype=dtype))
        self.lora_E[name] = nn.Parameter(torch.empty(r, 1, device=device, dtype=dtype))
        # the initial rank even for a pruned/loaded adapter: pruning must not rescale the kept triplets
        self.ranknum[name] = nn.Parameter(torch.full((1,), float(cfg.init_r), device=device, dtype=dtype),
                                          requires_grad=False)
        self.lora_dropout[name] = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.r[name], self.scaling[name] = r, cfg.alpha
        self.rank_pattern[name] = None if pattern is None else list(pattern)
        self.slot_to_name[slot] = name
        self.reset_adapter(name)

    @torch.no_grad()
    def reset_adapter(self, name: str) -> None:
        """Λ = 0 (the model starts unchanged, and only Λ gets a gradient at first); P, Q ~ N(0, 0.02²)."""
        nn.init.zeros_(self.lora_E[name])
        nn.init.normal_(self.lora_A[name], mean=0.0, std=0.02)
        nn.init.normal_(self.lora_B[name], mean=0.0, std=0.02)

    def adapter_parameters(self, name: str):
        if name in self.lora_A:  # not ranknum: it is a constant, never trainable
            yield from (self.lora_A[name], self.lora_B[name], self.lora_E[name])

    def remove_adapter(self, name: str) -> None:
        super().remove_adapter(name)
        for table in (self.r, self.scaling, self.rank_pattern):
            table.pop(name, None)

    def lora_delta(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """The adapter's output for inputs x (..., in) -> (..., out), as PEFT's SVDLinear computes it."""
        lora_a = self.lora_A[name]
        x = x.to(lora_a.dtype)
        ranknum = self.ranknum[name] + RANKNUM_EPS
        return (self.lora_dropout[name](x) @ (lora_a * self.lora_E[name]).T @ self.lora_B[name].T) \
            * self.scaling[name] / ranknum

    def forward(self, x: torch.Tensor, adapter_ids: torch.Tensor | None = None) -> torch.Tensor:
        if self.disabled:
            return self.call_base(x, adapter_ids)
        if adapter_ids is not None:
            return self._routed_forward(x, adapter_ids)
        result = self.call_base(x, None)
        dtype = result.dtype
        for name in self.active_adapters:
            if name in self.lora_A and name not in self.merged_adapters:
                result = result + self.lora_delta(name, x)
        return result.to(dtype)

    def _routed_forward(self, x: torch.Tensor, adapter_ids: torch.Tensor) -> torch.Tensor:
        """Each row/token gets its own adapter's delta (slot -1: the base only)."""
        if self.merged_adapters:
            raise ValueError(f"adapters {self.merged_adapters} are merged into the base weights, so a forward with "
                             "adapter_ids would add them to every row; unmerge them first")
        result = self.call_base(x, adapter_ids)
        return Routing.of(adapter_ids).add_deltas(result, x, self.slot_to_name, self.lora_delta)

    def delta_weight(self, name: str) -> tuple[torch.Tensor, None]:
        """(P (Q ⊙ Λ) · scaling / (ranknum + 1e-5) in fp32, None): the change merging `name` makes to W."""
        a, b, e = (t[name].float() for t in (self.lora_A, self.lora_B, self.lora_E))
        return (b @ (a * e)) * self.scaling[name] / (self.ranknum[name].float() + RANKNUM_EPS), None

    def merged_tensors(self, name: str, sign: int) -> tuple[torch.Tensor, None]:
        """(new W in the base dtype, None) after adding (sign=1) or removing (-1) `name`; computed in fp32 and
        checked finite, so `merge.merge` can check every layer before it changes any."""
        weight = getattr(self.base_layer, "weight", None)
        if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
            raise NotImplementedError(
                f"cannot merge into a {type(self.base_layer).__name__} base layer (no floating-point weight)")
        new_w = weight.float() + sign * self.delta_weight(name)[0].to(weight.device)
        if not torch.isfinite(new_w).all():
            raise ValueError(f"merging adapter {name!r} gives non-finite values in the weight of this "
                             f"{self.out_features}x{self.in_features} layer; nothing was merged")
        return new_w.to(weight.dtype), None

    @torch.no_grad()
    def merge(self, name: str) -> None:
        if name in self.merged_adapters:
            raise ValueError(f"adapter {name!r} is already merged")
        self.base_layer.weight.copy_(self.merged_tensors(name, +1)[0])  # in place: version counters move
        self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self, name: str) -> None:
        if name not in self.merged_adapters:
            raise ValueError(f"adapter {name!r} is not merged")
        self.base_layer.weight.copy_(self.merged_tensors(name, -1)[0])
        self.merged_adapters.remove(name)

    def kept_factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(Q, P, Λ) with only the rows the rank pattern keeps (PEFT's `resize_state_dict_by_rank_pattern`)."""
        a, b, e = self.lora_A[name], self.lora_B[name], self.lora_E[name]
        kept = self.rank_pattern.get(name)
        if kept is None or len(kept) != a.shape[0] or sum(kept) == a.shape[0]:
            return a, b, e  # never pruned, or already built with only the kept rows
        idx = torch.tensor(kept, dtype=torch.bool, device=a.device)
        return a[idx], b[:, idx], e[idx]

    def extra_repr(self) -> str:
        return f"adapters={self.adapter_names}, r={self.r}, active={self.active_adapters}"


def adalora_layers(model: nn.Module, name: str) -> list[tuple[str, AdaLoraLinear]]:
    """(module name, layer) of every AdaLoraLinear holding adapter `name`, in model order."""
    return [(n, layer) for n, layer in adapter_layers(model)
            if isinstance(layer, AdaLoraLinear) and layer.has_adapter(name)]


# ---------------------------------------------------------------------------------------------
# applying


def apply_adalora(model: nn.Module, config: AdaLoraConfig, adapter_name: str) -> nn.Module:
    """Wrap every target of `config` with AdaLoraLinear, add adapter `adapter_name`, register its train hook."""
    names = resolve_targets(model, config.targets, config.exclude, is_adalora_target)
    unknown = sorted(set(config.rank_pattern) - set(names))
    if unknown:
        raise ValueError(f"AdaLoraConfig.rank_pattern names {unknown[:3]}, which targets {config.targets!r} "
                         f"do not select (they select e.g. {names[0]!r})")
    slot = register_adapter(model, adapter_name, config)
    active = list(getattr(model, ACTIVE_ATTR, []))
    for name in names:
        module = model.get_submodule(name)
        if not isinstance(module, AdaLoraLinear):
            module = AdaLoraLinear(module)
            module.active_adapters = list(active)
            replace_module(model, name, module)
        module.add_adapter(adapter_name, slot, config, config.rank_pattern.get(name))
    freeze_base(model)
    set_adapter(model, active or [adapter_name])
    init_budget = sum(layer.r[adapter_name] for _, layer in adalora_layers(model, adapter_name))
    _register_hook(model, AdaLoraTrainHook(adapter_name, RankAllocator(config, init_budget, len(names))))
    return model


def _register_hook(model: nn.Module, hook: AdaLoraTrainHook) -> None:
    # a re-applied adapter name replaces the old hook, so nothing is regularized or pruned twice
    old = getattr(model, HOOKS_ATTR, None) or []
    keep = [h for h in old if not (isinstance(h, AdaLoraTrainHook) and h.adapter_name == hook.adapter_name)]
    setattr(model, HOOKS_ATTR, keep + [hook])


# ---------------------------------------------------------------------------------------------
# orthogonality regularizer


def orthogonal_regularizer(model: nn.Module, name: str) -> torch.Tensor | None:
    """Mean over the adapter's Q and P matrices of ‖QQᵀ − I‖_F and ‖PᵀP − I‖_F (None without any).

    Not squared: PEFT's `AdaLoraModel.forward` (the paper squares it; the code is the oracle)."""
    total, count = None, 0
    for _, layer in adalora_layers(model, name):
        a, b = layer.lora_A[name], layer.lora_B[name]
        for cov in (a @ a.T, b.T @ b):  # (r, r) each
            eye = torch.eye(*cov.size(), out=torch.empty_like(cov))
            norm = torch.norm(cov - eye, p="fro")
            total = norm if total is None else total + norm
            count += 1
    return None if total is None else total / count


# ---------------------------------------------------------------------------------------------
# rank allocation


class RankAllocator:
    """Importance scores and budget-driven masking of one adapter (PEFT's `adalora.RankAllocator`).

    Per entry w of P, Λ, Q: `I = |w·g|`, `Ī ← β1 Ī + (1−β1) I`, `Ū ← β2 Ū + (1−β2) |I − Ī|`, score `Ī·Ū`.
    Triplet i scores `s(Λ_i) + mean_j s(Q_ij) + mean_k s(P_ki)`; masking zeroes Λ_i for the lowest
    `init_budget − budget` scores (ties at the threshold are masked too, as in PEFT)."""

    def __init__(self, config: AdaLoraConfig, init_budget: int, n_modules: int):
        self.config = config
        self.init_budget = init_budget
        self.target_budget = config.target_r * n_modules
        self.reset_ipt()

    def reset_ipt(self) -> None:
        self.exp_avg_ipt: dict[tuple[str, str], torch.Tensor] = {}
        self.exp_avg_unc: dict[tuple[str, str], torch.Tensor] = {}

    def budget_schedule(self, step: int, total_step: int) -> tuple[int, bool]:
        """(budget, mask now?): b0 up to tinit; cubic decrease to b_T until total_step − tfinal; then b_T."""
        cfg = self.config
        if step <= cfg.tinit:
            return self.init_budget, False
        if step > total_step - cfg.tfinal:
            return self.target_budget, True
        mul_coeff = 1 - (step - cfg.tinit) / (total_step - cfg.tfinal - cfg.tinit)
        budget = int((self.init_budget - self.target_budget) * (mul_coeff**3) + self.target_budget)
        return budget, step % cfg.deltaT == 0

    @torch.no_grad()
    def update_ipt(self, layers: list[tuple[str, AdaLoraLinear]], name: str) -> None:
        """Fold this step's sensitivities into the EMAs (same expressions as PEFT, for equal rounding)."""
        beta1, beta2 = self.config.beta1, self.config.beta2
        for module, layer in layers:
            for kind in ("lora_A", "lora_B", "lora_E"):
                p = getattr(layer, kind)[name]
                key = (module, kind)
                if key not in self.exp_avg_ipt:
                    self.exp_avg_ipt[key], self.exp_avg_unc[key] = torch.zeros_like(p), torch.zeros_like(p)
                grad = p.grad if p.grad is not None else torch.zeros_like(p)  # a row batch that skipped it
                ipt = (p * grad).abs().detach()
                self.exp_avg_ipt[key] = beta1 * self.exp_avg_ipt[key] + (1 - beta1) * ipt
                self.exp_avg_unc[key] = beta2 * self.exp_avg_unc[key] + (1 - beta2) * (ipt - self.exp_avg_ipt[key]).abs()

    def has_scores(self) -> bool:
        return bool(self.exp_avg_ipt)

    def _score(self, module: str, kind: str) -> torch.Tensor:
        return self.exp_avg_ipt[(module, kind)] * self.exp_avg_unc[(module, kind)]

    def triplet_scores(self, layers: list[tuple[str, AdaLoraLinear]]) -> dict[str, torch.Tensor]:
        """module -> (r,) score of each triplet."""
        out = {}
        for module, _ in layers:
            ipt_a = torch.mean(self._score(module, "lora_A"), dim=1, keepdim=True)  # (r, 1)
            ipt_b = torch.mean(self._score(module, "lora_B"), dim=0, keepdim=False).view(-1, 1)  # (r, 1)
            ipt_ab = torch.cat([ipt_a, ipt_b], dim=1).sum(dim=1, keepdim=False)
            out[module] = self._score(module, "lora_E").view(-1) + ipt_ab.view(-1)
        return out

    @torch.no_grad()
    def mask_to_budget(self, layers: list[tuple[str, AdaLoraLinear]], name: str, budget: int) -> None:
        """Zero Λ of the lowest-scoring triplets so that at most `budget` stay; record each layer's pattern."""
        scores = self.triplet_scores(layers)
        k = self.init_budget - budget
        if k <= 0:
            threshold = float("-inf")  # nothing over budget
        else:
            threshold = torch.kthvalue(torch.cat(list(scores.values())), k=k)[0].item()
        for module, layer in layers:
            masked = (scores[module] <= threshold).view(-1, 1)
            layer.lora_E[name].masked_fill_(masked, 0.0)
            layer.rank_pattern[name] = (~masked).view(-1).tolist()

    @torch.no_grad()
    def mask_using_rank_pattern(self, layers: list[tuple[str, AdaLoraLinear]], name: str) -> None:
        """Re-apply each layer's recorded pattern (Λ may have regrown since), as PEFT does after the final mask."""
        for _, layer in layers:
            kept = layer.rank_pattern.get(name)
            if kept is None:  # a resumed run lost the pattern: the masked rows are the zero ones
                kept = layer.rank_pattern[name] = _current_pattern(layer, name)
            mask = torch.tensor(kept, dtype=torch.bool, device=layer.lora_E[name].device).unsqueeze(-1)
            layer.lora_E[name].masked_fill_(~mask, 0.0)


def _current_pattern(layer: AdaLoraLinear, name: str) -> list[bool]:
    return (layer.lora_E[name] != 0).view(-1).tolist()


# ---------------------------------------------------------------------------------------------
# the training hook


class AdaLoraTrainHook:
    """What `Trainer` calls for one AdaLoRA adapter: the regularizer and PEFT's `update_and_allocate`.

    Only acts while the adapter is trainable, and not for a loaded allocation (config.rank_pattern set)."""

    def __init__(self, adapter_name: str, allocator: RankAllocator):
        self.adapter_name = adapter_name
        self.allocator = allocator

    def _active_layers(self, model: nn.Module) -> tuple[AdaLoraConfig | None, list]:
        cfg = adapter_configs(model).get(self.adapter_name)
        layers = adalora_layers(model, self.adapter_name) if isinstance(cfg, AdaLoraConfig) else []
        trainable = any(p.requires_grad for _, layer in layers for p in layer.adapter_parameters(self.adapter_name))
        return (cfg, layers) if trainable else (None, [])

    def before_step(self, model: nn.Module, step: int, total_steps: int) -> None:
        """Fill in total_step with the run's number of steps when the config left it None."""
        cfg = adapter_configs(model).get(self.adapter_name)
        if isinstance(cfg, AdaLoraConfig) and cfg.total_step is None:
            try:
                resolved = dataclasses.replace(cfg, total_step=total_steps)
            except ValueError as e:
                raise ValueError(f"AdaLoRA adapter {self.adapter_name!r} in a run of {total_steps} steps: {e}") from None
            getattr(model, CONFIGS_ATTR)[self.adapter_name] = resolved
            self.allocator.config = resolved

    def regularizer(self, model: nn.Module) -> torch.Tensor | None:
        """orth_reg_weight × the orthogonality regularizer, to add to the mean loss (None: nothing to add)."""
        cfg, _ = self._active_layers(model)
        if cfg is None or cfg.orth_reg_weight == 0:
            return None
        reg = orthogonal_regularizer(model, self.adapter_name)
        return None if reg is None else cfg.orth_reg_weight * reg

    def after_step(self, model: nn.Module, step: int) -> None:
        """PEFT's `AdaLoraModel.update_and_allocate(step)`: scores, budget, masks; the final mask at total − tfinal."""
        cfg, layers = self._active_layers(model)
        if cfg is None or cfg.rank_pattern:
            return
        if cfg.total_step is None:
            raise ValueError(f"AdaLoRA adapter {self.adapter_name!r} has no total_step: pass total_step=<number of "
                             "optimizer steps>, or train with leantune's Trainer, which sets it to its step count")
        final, alloc = cfg.total_step - cfg.tfinal, self.allocator
        if step < final:
            alloc.update_ipt(layers, self.adapter_name)
            budget, mask_now = alloc.budget_schedule(step, cfg.total_step)
            if mask_now:
                alloc.mask_to_budget(layers, self.adapter_name, budget)
        elif step == final:  # the final allocation, frozen from here on
            if alloc.has_scores():
                alloc.mask_to_budget(layers, self.adapter_name, alloc.budget_schedule(step, cfg.total_step)[0])
            else:  # a run resumed right here lost its scores: keep the allocation the weights show
                alloc.mask_using_rank_pattern(layers, self.adapter_name)
            alloc.reset_ipt()
        else:
            alloc.mask_using_rank_pattern(layers, self.adapter_name)


def train_hooks(model: nn.Module, adapter_name: str | None = None) -> list[AdaLoraTrainHook]:
    """The model's AdaLoRA train hooks (of one adapter when named)."""
    return [h for h in getattr(model, HOOKS_ATTR, None) or []
            if isinstance(h, AdaLoraTrainHook) and adapter_name in (None, h.adapter_name)]


# ---------------------------------------------------------------------------------------------
# PEFT format (peft 0.21.2 AdaLoraModel: `_get_adapter_state_dict`, `_remap_adapter_state_dict_for_load`)

# the keys an ADALORA adapter_config.json has beyond LoRA's, with PEFT's defaults
PEFT_ADALORA_DEFAULTS = {
    "init_r": 12, "target_r": 8, "tinit": 0, "tfinal": 0, "deltaT": 1, "beta1": 0.85, "beta2": 0.85,
    "orth_reg_weight": 0.5, "total_step": None,
}
_READ = set(PEFT_ADALORA_DEFAULTS) | {
    "peft_type", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "rank_pattern", "bias",
    "lora_bias", "init_lora_weights",
}
_IGNORED = {"r", "use_rslora", "alpha_pattern"}  # PEFT's AdaLoRA layers never read these
_KEY = re.compile(r"(.+)\.(lora_A|lora_B|lora_E)")


def adalora_state_dict(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """The kept rows of every module's Q, P, Λ under PEFT's keys (`base_model.model.<module>.lora_A`, ...)."""
    out = {}
    for module, layer in adalora_layers(model, adapter_name):
        for kind, t in zip(("lora_A", "lora_B", "lora_E"), layer.kept_factors(adapter_name)):
            out[f"{PREFIX}{module}.{kind}"] = t
    return {k: v.detach().to("cpu").contiguous() for k, v in out.items()}


def adalora_config_dict(model: nn.Module, adapter_name: str, base_model_name_or_path: str | None = None) -> dict:
    """`adapter_config.json` of one AdaLoRA adapter, as peft 0.21.2 writes it."""
    cfg = adapter_configs(model)[adapter_name]
    layers = adalora_layers(model, adapter_name)
    patterns = {f"{m}.lora_E": list(layer.rank_pattern[adapter_name]) for m, layer in layers
                if layer.rank_pattern.get(adapter_name) is not None}
    out = {**PEFT_LORA_DEFAULTS, **PEFT_ADALORA_DEFAULTS}
    out.update({f: getattr(cfg, f) for f in PEFT_ADALORA_DEFAULTS})
    out.update(
        peft_type="ADALORA", lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, exclude_modules=cfg.exclude,
        target_modules=_saved_targets(model, [m for m, _ in layers], cfg), rank_pattern=patterns or None,
        # PEFT refuses a config without total_step; an adapter saved before training gets the shortest valid one
        total_step=cfg.total_step or cfg.tinit + cfg.tfinal + 1,
        base_model_name_or_path=base_model_name_or_path or _model_name(model),
    )
    return out


def _saved_targets(model: nn.Module, wrapped: list[str], cfg: AdaLoraConfig):
    if not is_all_linear(cfg.targets):
        return cfg.targets if isinstance(cfg.targets, str) else sorted(set(cfg.targets))
    return suffix_targets(model, wrapped, cfg.exclude, is_adalora_target) or sorted(wrapped)


def adalora_config_from_peft(config: dict, path="adapter") -> AdaLoraConfig:
    """Map a PEFT ADALORA `adapter_config.json` to an AdaLoraConfig, refusing what leantune does not implement."""
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        raise ValueError(f"{path}: AdaLoRA adapters with trained biases (bias/lora_bias) are not supported")
    if config.get("use_dora"):
        raise ValueError(f"{path}: use_dora=True in {CONFIG_NAME}: AdaLoRA has no DoRA variant (PEFT refuses it too)")
    for key, value in config.items():
        if key in _UNSUPPORTED and value:
            raise ValueError(f"{path}: {_UNSUPPORTED[key]} ({key}={value!r} in {CONFIG_NAME})")
        if key not in _READ | _IGNORED | _INFORMATIONAL | set(_UNSUPPORTED) and value:
            raise ValueError(f"{path}: unknown option {key}={value!r} in {CONFIG_NAME}; leantune cannot load it safely")
    if config.get("target_modules") is None:
        raise ValueError(f"{path}: {CONFIG_NAME} has no target_modules")
    options = {k: config.get(k, v) for k, v in PEFT_ADALORA_DEFAULTS.items()}
    try:
        return AdaLoraConfig(
            **options, alpha=config.get("lora_alpha", 8), dropout=config.get("lora_dropout", 0.0),
            targets=config["target_modules"], exclude=config.get("exclude_modules"),
            rank_pattern=config.get("rank_pattern") or {},
        )
    except ValueError as e:
        raise ValueError(f"{path}: bad {CONFIG_NAME}: {e}") from None


def _split_tensors(tensors: dict, path) -> dict[str, dict[str, torch.Tensor]]:
    out: dict[str, dict] = {}
    for key, value in tensors.items():
        match = _KEY.fullmatch(key.removeprefix(PREFIX))
        if match is None:
            raise ValueError(f"{path}: unexpected tensor {key!r}; an AdaLoRA adapter holds only lora_A/lora_B/lora_E")
        out.setdefault(match.group(1), {})[match.group(2)] = value
    return out


def _check_fits(model: nn.Module, cfg: AdaLoraConfig, factors: dict, path) -> None:
    """Every module exists with the shapes the config implies, and the tensors cover exactly the targets."""
    index = module_index(model)
    for name, parts in factors.items():
        module = index.get(name)
        if module is None or not is_adalora_target(module):
            raise _other_model(path, f"it has AdaLoRA weights for {name!r}, which is not a linear module of this "
                                     f"model ({linear_sample(index, is_adalora_target)})")
        kept = cfg.rank_pattern.get(name)
        r = cfg.init_r if kept is None else sum(kept)
        want = {"lora_A": (r, module.in_features), "lora_B": (module.out_features, r), "lora_E": (r, 1)}
        got = {k: tuple(parts[k].shape) if k in parts else None for k in want}
        if got != want:
            raise _other_model(path, f"module {name!r} ({module.out_features}x{module.in_features}, rank {r} by "
                                     f"{CONFIG_NAME}) needs tensors of shapes {want}, the adapter has {got}")
    try:
        wanted = set(resolve_targets(model, cfg.targets, cfg.exclude, is_adalora_target))
    except ValueError as e:
        raise _other_model(path, f"the target_modules of its {CONFIG_NAME} do not fit this model: {e}") from None
    if wanted != set(factors):
        raise ValueError(f"{path}: its tensors cover {sorted(set(factors) ^ wanted)[:5]} differently from the "
                         f"target_modules of {CONFIG_NAME}; the adapter is incomplete or inconsistent")


def load_adalora(model: nn.Module, path, config: dict, tensors: dict, adapter_name: str = "default",
                 trainable: bool = False) -> nn.Module:
    """Add a PEFT ADALORA adapter (config and tensors read from `path`); checked before the model is touched."""
    cfg = adalora_config_from_peft(config, path)
    factors = _split_tensors(tensors, path)
    _check_fits(model, cfg, factors, path)
    apply(model, "adalora", adapter_name=adapter_name, config=cfg)
    try:
        with torch.no_grad():
            index = module_index(model)
            for name, parts in factors.items():
                for kind, value in parts.items():
                    getattr(index[name], kind)[adapter_name].copy_(value)
    except BaseException:
        delete_adapter(model, adapter_name)
        raise
    set_adapter_trainable(model, adapter_name, trainable)
    return model


def load_adalora_folder(model: nn.Module, path, adapter_name: str = "default", trainable: bool = False) -> nn.Module:
    config, tensors = read_adapter(path)
    return load_adalora(model, path, config, tensors, adapter_name, trainable)


register_method("adalora", AdaLoraConfig, apply_adalora, load=load_adalora_folder,
                peft_state_dict=adalora_state_dict, peft_config=adalora_config_dict,
                claims=lambda path: peft_type(path) == "ADALORA",
                help="AdaLoRA (Zhang et al. 2023): SVD-shaped P Λ Q, ranks pruned from --init-r to --target-r "
                     "by sensitivity; PEFT's ADALORA format")

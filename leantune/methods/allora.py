"""ALLoRA: LoRA with an adaptive learning rate (Huang & Balestriero 2024, arXiv:2410.09692).

What the paper's abstract states, and this module follows:
- ALLoRA is LoRA **without dropout** and **without the scaling factor** (s = 1). `AlloraConfig` has no
  `alpha`, `dropout` or `use_rslora` options: alpha is tied to r (per module too, through `rank_pattern`),
  so every layer computes exactly `W x + B A x` and the adapter is a plain PEFT LoRA adapter on disk
  (`lora_alpha == r`); PEFT and vLLM load it as it is.
- The standard init is kept (A random, B = 0): the method exists to make escaping B = 0 fast.
- In their place the gradients are scaled "with a coefficient inversely proportional to parameters' l2 norm".

The exact rule is NOT verified against the paper's method section (no copy of it was at hand; the reference,
methods-core.md §4, marks it unverified too). Implemented, as the reference proposes:

    c(theta) = 1 / sqrt(||theta||^2 + 1 / eta^2)

with theta a row of A (r rows of length in) or of B (out rows of length r) (`coef_granularity="row"`, the
default), or a whole A or B (`"matrix"`). c is largest (= eta) at theta = 0 and falls like 1/||theta||, so
B's rows, which start at 0, move with learning rate lr * eta until they have grown. eta is the one new
hyperparameter; its default 1.0 is a guess, not the paper's value.

Where c applies (`coef_on`):
- `"update"` (default): a per-row learning-rate multiplier, `theta <- theta_old + c(theta_old) * step`, where
  `step` is whatever the optimizer did. This is the "adaptive learning rate" of the title and keeps its
  effect under Adam, whose per-element normalisation would cancel a gradient scale almost entirely.
- `"grad"`: the gradient is multiplied by c(theta) before the optimizer (and before clipping) sees it.
  Under plain SGD both modes give the same trajectory; under Adam `"grad"` is close to plain LoRA.

How `"update"` reaches the optimizer: through a training hook on the model (`model.leantune_train_hooks`,
which `train.Trainer` calls around each step; no process-wide state): it copies the adapter's A and B before
the step and rescales the change after it.
`"grad"` uses a tensor hook on each parameter instead. Both are pure functions of the current weights, so
checkpoints and exact resume need nothing extra. An ALLoRA adapter loaded back from disk is a plain LoRA
adapter (s = 1): the coefficient only shapes training.

The layers are `LoraLinear` as they are: per-row adapter routing, merging and saving work unchanged.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..fields import opt
from .base import adapter_layers
from .lora import LoraConfig, LoraLinear, apply_lora
from .registry import register_method

GRANULARITIES = ("row", "matrix")
COEF_ON = ("update", "grad")
COEF_ATTR = "leantune_allora"  # the attribute an ALLoRA parameter carries


@dataclass
class AlloraConfig(LoraConfig):
    """LoRA options without alpha, dropout and rsLoRA (fixed: s = 1, no dropout), plus ALLoRA's own."""

    eta: float = opt(1.0, "ALLoRA: eta, the per-row learning-rate multiplier at zero norm (its largest; it falls "
                          "like 1/||row|| as A's and B's rows grow)", flag="--allora-eta")
    coef_granularity: str = opt("row", "ALLoRA: norm per row of A and B, or per whole matrix",
                                flag="--allora-granularity")
    coef_on: str = opt("update", "ALLoRA: apply the coefficient to the optimizer's update (a per-row learning "
                                 "rate), or to the gradient (nearly cancelled by AdamW)", flag="--allora-on")
    # fixed by the method, so not options: s = alpha / r = 1 in every layer, and no dropout
    alpha: float = field(default=8, init=False)
    dropout: float = field(default=0.0, init=False)
    use_rslora: bool = field(default=False, init=False)
    use_dora: bool = field(default=False, init=False)
    alpha_pattern: dict = field(default_factory=dict, init=False)

    def __post_init__(self):
        # alpha follows r (and alpha_pattern follows rank_pattern), so alpha_for(m) / rank_for(m) == 1
        self.alpha = self.r
        self.alpha_pattern = dict(self.rank_pattern) if isinstance(self.rank_pattern, dict) else {}
        super().__post_init__()
        eta = self.eta
        if not isinstance(eta, (int, float)) or isinstance(eta, bool) or not (eta > 0 and math.isfinite(eta)):
            raise ValueError(f"AlloraConfig.eta must be a finite number > 0, got {eta!r}")
        if self.coef_granularity not in GRANULARITIES:
            raise ValueError(f"AlloraConfig.coef_granularity must be one of {GRANULARITIES}, "
                             f"got {self.coef_granularity!r}")
        if self.coef_on not in COEF_ON:
            raise ValueError(f"AlloraConfig.coef_on must be one of {COEF_ON}, got {self.coef_on!r}")
        if self.lora_bias:
            raise ValueError("AlloraConfig.lora_bias must be False: ALLoRA adapts A and B only")


@dataclass(frozen=True)
class AlloraCoef:
    """What an ALLoRA parameter carries: how to compute its coefficient, and where it applies."""

    eta: float
    granularity: str
    on: str

    def __call__(self, theta: torch.Tensor) -> torch.Tensor:
        return allora_coefficient(theta, self.eta, self.granularity)


def allora_coefficient(theta: torch.Tensor, eta: float, granularity: str = "row") -> torch.Tensor:
    """1 / sqrt(||theta||^2 + 1/eta^2) per row ((rows, 1), broadcasting over the row) or for the matrix."""
    t = theta.detach().float()
    sq = t.pow(2).sum(-1, keepdim=True) if granularity == "row" else t.pow(2).sum()
    return (sq + 1.0 / (eta * eta)).rsqrt()


# ---------------------------------------------------------------------------------------------
# where the coefficient applies


def _scale_grad(coef: AlloraCoef, param: nn.Parameter):
    def hook(grad: torch.Tensor) -> torch.Tensor:
        return grad * coef(param).to(grad.dtype)

    return hook


class AlloraUpdateHook:
    """A training hook (`model.leantune_train_hooks`, called by `train.Trainer`): keeps the ALLoRA weights
    from before the optimizer step and rescales what the step did by c(theta_old). A custom training loop
    calls `before_step(model, step, total)` before the forward and `after_step(model, step)` after
    `optimizer.step()`."""

    def __init__(self, params: list[nn.Parameter]):
        self.params, self.saved = params, None

    def before_step(self, model, step: int, total_steps: int) -> None:  # noqa: ARG002 - hook signature
        self.saved = [(p, p.detach().clone()) for p in self.params if p.requires_grad]

    @torch.no_grad()
    def after_step(self, model, step: int) -> None:  # noqa: ARG002 - hook signature
        for p, old in self.saved or ():
            if p.grad is not None:  # a parameter the optimizer did not touch keeps its value
                c = getattr(p, COEF_ATTR)(old).to(p.dtype)
                p.sub_(old).mul_(c).add_(old)  # theta_old + c(theta_old) * (what the optimizer did)
        self.saved = None


# ---------------------------------------------------------------------------------------------
# applying


def allora_parameters(model: nn.Module, adapter_name: str) -> dict[str, nn.Parameter]:
    """The A and B weights of one adapter, by in-memory name (what the coefficient scales)."""
    out = {}
    for name, layer in adapter_layers(model):
        if isinstance(layer, LoraLinear) and layer.has_adapter(adapter_name):
            out[f"{name}.lora_A.{adapter_name}.weight"] = layer.lora_A[adapter_name].weight
            out[f"{name}.lora_B.{adapter_name}.weight"] = layer.lora_B[adapter_name].weight
    return out


def attach_coefficient(model: nn.Module, adapter_name: str, config: AlloraConfig) -> None:
    """Make the A and B weights of `adapter_name` train with ALLoRA's coefficient (see the module doc)."""
    coef = AlloraCoef(float(config.eta), config.coef_granularity, config.coef_on)
    params = list(allora_parameters(model, adapter_name).values())
    for p in params:
        setattr(p, COEF_ATTR, coef)
        if coef.on == "grad":
            p.register_hook(_scale_grad(coef, p))
    if coef.on == "update":
        hooks = getattr(model, "leantune_train_hooks", None)
        if hooks is None:
            hooks = []
            model.leantune_train_hooks = hooks
        hooks.append(AlloraUpdateHook(params))


def apply_allora(model: nn.Module, config: AlloraConfig, adapter_name: str) -> nn.Module:
    """LoRA with s = 1 and no dropout on the targets of `config`, trained with ALLoRA's coefficient."""
    apply_lora(model, config, adapter_name)
    attach_coefficient(model, adapter_name, config)
    return model


register_method("allora", AlloraConfig, apply_allora,
                help="ALLoRA (arXiv 2410.09692): no dropout, s = 1, each row's update scaled down as its norm grows")

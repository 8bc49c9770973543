"""Combining adapters: PEFT's `add_weighted_adapter` for LoRA, and LDA's per-task checkpoint selection.

`add_weighted_adapter(model, adapters, weights, name, combination_type)` follows peft 0.21.2
`tuners/lora/model.py` (`add_weighted_adapter`, `_check_add_weighted_adapter`,
`_generalized_task_arithmetic_weighted_adapter`, `_svd_generalized_task_arithmetic_weighted_adapter`):

- the new adapter has `r = alpha = new_rank` (scale 1), frozen, not made active;
- **linear** (ranks must agree): `A = Σ sign(w_i s_i) sqrt|w_i s_i| A_i`, `B = Σ sqrt|w_i s_i| B_i`, a rough
  approximation (cross terms `B_i A_j` appear), as PEFT warns;
- **cat**: `A = [w_1 s_1 A_1; w_2 s_2 A_2; ...]`, `B = [B_1, B_2, ...]`, rank `Σ r_i`: exactly `Σ w_i ΔW_i`;
- **svd**: `ΔW = Σ w_i ΔW_i` truncated to rank `svd_rank` (default: the largest rank): `B = U_r S_r`, `A = V_r^T`;
- one source adapter means "linear" whatever is asked.

Differences from PEFT, each on purpose: an existing `adapter_name` is an error (PEFT silently returns);
`len(weights) != len(adapters)` is an error (PEFT's zip drops the rest); adapters with `lora_bias` or DoRA are
refused (PEFT drops the bias); and the new adapter never uses rsLoRA scaling (PEFT copies `use_rslora` from
the first adapter, so with rsLoRA sources its combination is scaled by an extra `sqrt(new_rank)`).

`merge_task_adapters` is LDA's merging (Bai et al. 2024, arXiv:2401.08992; reference methods-more.md §3.2):
tasks (languages) peak at different steps, so for each task take that task's adapter from the checkpoint with
the best dev metric on that task and assemble one set of adapters: selection, not averaging.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from .base import (
    adapter_configs,
    adapter_layers,
    require_adapter,
    set_adapter_trainable,
)
from .lora import LoraConfig, LoraLinear, is_lora_target
from .registry import apply
from .targets import suffix_targets

COMBINATIONS = ("svd", "linear", "cat")


# ---------------------------------------------------------------------------------------------
# add_weighted_adapter


def _source_configs(model: nn.Module, adapters: Sequence[str], weights: Sequence[float]) -> list[LoraConfig]:
    if isinstance(adapters, str) or not adapters:
        raise ValueError(f"adapters must be a non-empty list of adapter names, got {adapters!r}")
    if len(weights) != len(adapters):
        raise ValueError(f"give one weight per adapter: {len(adapters)} adapters, {len(weights)} weights")
    configs = []
    for name in adapters:
        require_adapter(model, name)
        cfg = adapter_configs(model)[name]
        if not isinstance(cfg, LoraConfig):
            raise ValueError(f"adapter {name!r} is a {type(cfg).__name__}; only LoRA adapters can be combined")
        if cfg.lora_bias or getattr(cfg, "use_dora", False):
            raise ValueError(f"adapter {name!r} has a LoRA bias or DoRA magnitude, which a weighted combination "
                             "of A and B cannot carry; combine plain LoRA adapters")
        configs.append(cfg)
    return configs


def _new_rank(configs: list[LoraConfig], combination_type: str, svd_rank: int | None) -> int:
    # the largest rank an adapter may have anywhere, as PEFT allocates (rank_pattern included)
    ranks = [max(c.r, *c.rank_pattern.values()) if c.rank_pattern else c.r for c in configs]
    if combination_type == "linear":
        if len(set(ranks)) != 1:
            raise ValueError(f"combination_type 'linear' needs adapters of equal rank, got ranks {ranks}; "
                             "use 'cat' or 'svd'")
        return ranks[0]
    if combination_type == "cat":
        return sum(ranks)
    if svd_rank is not None and (not isinstance(svd_rank, int) or svd_rank <= 0):
        raise ValueError(f"svd_rank must be an int > 0 or None, got {svd_rank!r}")
    return svd_rank or max(ranks)


def _task_arithmetic(tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """PEFT's `merge_utils.task_arithmetic`: Σ w_i t_i with the weights as one fp32 tensor."""
    stacked = torch.stack(tensors, dim=0)
    w = torch.tensor(weights).to(stacked.device)
    return (stacked * w.view(-1, *([1] * (stacked.dim() - 1)))).sum(dim=0)


def _linear(layer: LoraLinear, pairs, new_rank: int, where: str):
    ranks = {layer.r[a] for a, _ in pairs}
    if ranks != {new_rank}:
        raise ValueError(f"{where}: combination_type 'linear' needs equal ranks here, got {sorted(ranks)}")
    w_a, w_b = [], []
    for a, w in pairs:
        ws = w * layer.scaling[a]
        sign = 1 if ws >= 0 else -1
        w_a.append(math.sqrt(abs(ws)) * sign)  # the sign on one side only, or it would cancel
        w_b.append(math.sqrt(abs(ws)))
    new_a = _task_arithmetic([layer.lora_A[a].weight.data for a, _ in pairs], w_a)
    new_b = _task_arithmetic([layer.lora_B[a].weight.data for a, _ in pairs], w_b)
    return new_a, new_b


def _cat(layer: LoraLinear, pairs, new_rank: int, where: str):
    a = torch.cat([layer.lora_A[n].weight.data * w * layer.scaling[n] for n, w in pairs], dim=0)  # (Σr, in)
    b = torch.cat([layer.lora_B[n].weight.data for n, _ in pairs], dim=1)  # (out, Σr)
    # a layer missing some sources uses fewer rows; the rest stay zero, as in PEFT
    new_a = a.new_zeros(new_rank, a.shape[1])
    new_b = b.new_zeros(b.shape[0], new_rank)
    new_a[: a.shape[0]], new_b[:, : b.shape[1]] = a, b
    return new_a, new_b


def _svd(layer: LoraLinear, pairs, new_rank: int, where: str):
    delta = _task_arithmetic([layer.delta_weight(a)[0] for a, _ in pairs], [w for _, w in pairs])  # (out, in)
    if new_rank > min(delta.shape):
        raise ValueError(f"{where}: svd_rank {new_rank} exceeds this {delta.shape[0]}x{delta.shape[1]} layer's "
                         f"largest possible rank {min(delta.shape)}; pass a smaller svd_rank")
    u, s, vh = torch.linalg.svd(delta, full_matrices=True)
    return vh[:new_rank, :], u[:, :new_rank] @ torch.diag(s[:new_rank])


_COMBINE = {"linear": _linear, "cat": _cat, "svd": _svd}


def _new_targets(model: nn.Module, wrapped: list[str]):
    """Module-name suffixes that select exactly `wrapped` (as PEFT's union would), else the full names."""
    return suffix_targets(model, wrapped, None, is_lora_target) or list(wrapped)


def add_weighted_adapter(model: nn.Module, adapters: Sequence[str], weights: Sequence[float], adapter_name: str,
                         combination_type: str = "svd", svd_rank: int | None = None) -> nn.Module:
    """Add `adapter_name`, a weighted combination of the LoRA `adapters` (PEFT's semantics; see the module
    docstring). The new adapter is frozen and not active: `set_adapter(model, adapter_name)` to use it."""
    if combination_type not in COMBINATIONS:
        raise ValueError(f"combination_type must be one of {COMBINATIONS}, got {combination_type!r}")
    configs = _source_configs(model, adapters, weights)
    combination_type = "linear" if len(adapters) == 1 else combination_type
    new_rank = _new_rank(configs, combination_type, svd_rank)
    layers = [(n, layer) for n, layer in adapter_layers(model)
              if isinstance(layer, LoraLinear) and any(layer.has_adapter(a) for a in adapters)]
    tensors = {}
    for name, layer in layers:  # all computed before the model changes, so an error leaves it as it was
        pairs = [(a, float(w)) for a, w in zip(adapters, weights) if layer.has_adapter(a)]
        with torch.no_grad():
            tensors[name] = _COMBINE[combination_type](layer, pairs, new_rank, name)
    cfg = LoraConfig(r=new_rank, alpha=new_rank, dropout=configs[0].dropout, bias=configs[0].bias,
                     targets=_new_targets(model, [n for n, _ in layers]))
    apply(model, "lora", adapter_name=adapter_name, config=cfg)
    with torch.no_grad():
        for name, layer in layers:
            new_a, new_b = tensors[name]
            layer.lora_A[adapter_name].weight.copy_(new_a)
            layer.lora_B[adapter_name].weight.copy_(new_b)
    set_adapter_trainable(model, adapter_name, False)  # PEFT freezes the combined adapter too
    return model


# ---------------------------------------------------------------------------------------------
# LDA: per-task selection of adapters across checkpoints


def snapshot_adapters(model: nn.Module, names: Sequence[str]) -> dict[str, dict[str, torch.Tensor]]:
    """{adapter name: {parameter name: a detached copy}}: one checkpoint of the given adapters."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for adapter in names:
        require_adapter(model, adapter)
        out[adapter] = {}
        for layer_name, layer in adapter_layers(model):
            for dict_name in layer.adapter_module_dicts:
                module_dict = getattr(layer, dict_name)
                if adapter in module_dict:
                    for pname, p in module_dict[adapter].named_parameters():
                        key = f"{layer_name}.{dict_name}.{adapter}.{pname}"
                        out[adapter][key] = p.detach().clone()
    return out


@torch.no_grad()
def load_adapter_states(model: nn.Module, states: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
    """Copy adapter tensors (as `snapshot_adapters` returns them) back into the model; keys must all exist."""
    params = dict(model.named_parameters())
    for adapter, tensors in states.items():
        require_adapter(model, adapter)
        missing = [k for k in tensors if k not in params]
        if missing:
            raise ValueError(f"adapter {adapter!r}: this model has no parameter {missing[0]!r}")
        for key, value in tensors.items():
            params[key].copy_(value)


def merge_task_adapters(
    checkpoints: Sequence[Mapping[str, Mapping[str, torch.Tensor]]],
    dev_metric: Callable[[Mapping[str, Mapping[str, torch.Tensor]], str], float],
    tasks: Sequence[str] | None = None,
    higher_is_better: bool = False,
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, int]]:
    """LDA merging: for each task, its adapter from the checkpoint that scores best on that task.

    `checkpoints[c]` maps each task's adapter name to its tensors (`snapshot_adapters`); `dev_metric(ckpt,
    task)` scores one checkpoint on one task's dev set (lower is better unless `higher_is_better`).
    Returns (the assembled {task: tensors}, {task: index of the chosen checkpoint}); ties keep the earliest.
    """
    if not checkpoints:
        raise ValueError("merge_task_adapters needs at least one checkpoint")
    tasks = list(tasks) if tasks is not None else list(checkpoints[0])
    merged, chosen = {}, {}
    for task in tasks:
        missing = [c for c, ckpt in enumerate(checkpoints) if task not in ckpt]
        if missing:
            raise ValueError(f"checkpoint {missing[0]} has no adapter for task {task!r}")
        scores = [float(dev_metric(ckpt, task)) for ckpt in checkpoints]
        sign = -1.0 if higher_is_better else 1.0
        best = min(range(len(scores)), key=lambda c: (sign * scores[c], c))
        chosen[task] = best
        merged[task] = {k: v.clone() for k, v in checkpoints[best][task].items()}
    return merged, chosen


merge_language_adapters = merge_task_adapters  # the reference's name for it (LDA merges per language)

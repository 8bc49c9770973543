"""Training options that decide what trains and how fast: layer-wise lr decay, freezing lower blocks,
re-initializing top blocks (Tinn et al., "Fine-tuning large neural language models for biomedical natural
language processing", Patterns 2023, arXiv:2112.07869), and FPF (Zhao et al., "Does continual learning
equally forget all parameters?", ICML 2023, arXiv:2304.04158). Reference: methods-more.md §4 and §5.

- `param_groups_llrd`: block l (1 = lowest, L = top) trains at `lr·ξ^(L−l)`, the head and every other
  non-block parameter at `lr`, embeddings at `lr·ξ^L`; biases and norm weights (1-D) get no weight decay.
  Groups carry `lr_scale`: the loop sets one lr for every group each step, and `build_optimizer` applies
  the scale for the duration of the step.
- `freeze_bottom`: embeddings and the lowest k blocks stop training (`requires_grad=False`).
- `reinit_top`: the top k blocks' pretrained weights are drawn again as `_init_weights` does (matrices
  N(0, 0.02), biases 0, norm weights 1) and train in full from there (re-initialized weights that stayed
  frozen would only break the model).
- FPF: a short SGD probe finds the modules whose weights drift most, relative to their size
  (`s_m = ‖θ_m' − θ_m‖ / (‖θ_m‖ + ε)`, the paper's score [its exact normalisation is unverified]); only the
  top modules, up to a fraction of the trainable parameters, train; the probe's changes are undone.
- GaLore / Natural GaLore (`--optimizer galore_adamw | natural_galore`): their parameter groups, the checks of
  their options (`projection_checks`: projections, --natural-history, what --galore-per-layer cannot do) and of
  --galore-rank against the shapes of the matrices it projects (`check_projection_ranks`).
"""
from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn

from ..methods.base import adapter_layers
from ..optim import PROJECTED_OPTIMIZERS, plain_sgd

# a block's parameters: "model.layers.3.mlp..." (Llama), "transformer.h.3..." (GPT-2), "encoder.layer.3..." (BERT)
_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)\.")
_EMBEDDING = re.compile(r"(?:^|\.)(?:embed_tokens|embeddings|wte|wpe|word_embeddings)(?:\.|$)")


def layer_index(param_name: str) -> int | None:
    """The block a parameter belongs to (0 = lowest), or None outside the blocks."""
    m = _LAYER.search(param_name)
    return int(m.group(1)) if m else None


def is_embedding(param_name: str) -> bool:
    return _EMBEDDING.search(param_name) is not None


def num_layers(model: nn.Module, layer_fn: Callable[[str], int | None] = layer_index) -> int:
    indices = [i for n, _ in model.named_parameters() if (i := layer_fn(n)) is not None]
    if not indices:
        raise ValueError(f"cannot find the blocks of this {type(model).__name__}: no parameter name has a "
                         "'layers.<i>.' part")
    return max(indices) + 1


def option_checks(cfg) -> list[tuple[bool, str]]:
    """Validation of the options in a TrainConfig, as (ok, message) pairs."""
    return [
        (cfg.llrd == 0 or 0 < cfg.llrd <= 1, f"--llrd must be 0 (off) or in (0, 1], got {cfg.llrd}"),
        (cfg.freeze_lower >= 0, f"--freeze-lower must be >= 0, got {cfg.freeze_lower}"),
        (cfg.reinit_top >= 0, f"--reinit-top must be >= 0, got {cfg.reinit_top}"),
        (0 <= cfg.fpf_fraction < 1, f"--fpf-fraction must be in [0, 1) (0 = off), got {cfg.fpf_fraction}"),
        (cfg.fpf_probe_steps >= 1, f"--fpf-probe-steps must be >= 1, got {cfg.fpf_probe_steps}"),
    ]


def default_proj_type(optimizer: str) -> str:
    """--galore-proj-type when not given: GaLore's one-sided "std", Natural GaLore's two-sided "tucker"."""
    return "tucker" if optimizer == "natural_galore" else "std"


def projection_checks(cfg) -> list[tuple[bool, str]]:
    """Validation of the GaLore / Natural GaLore options of a TrainConfig, as (ok, message) pairs."""
    from ..optim.galore import PROJ_TYPES
    from ..optim.natural_galore import PROJ_TYPES as NATURAL_PROJ_TYPES

    kinds = NATURAL_PROJ_TYPES if cfg.optimizer == "natural_galore" else PROJ_TYPES
    per_layer = cfg.galore_per_layer
    return [
        (cfg.galore_proj_type in kinds, f"--galore-proj-type must be one of {kinds} with --optimizer "
                                        f"{cfg.optimizer}, got {cfg.galore_proj_type!r}"),
        (cfg.natural_history >= 0, f"--natural-history must be >= 0 (0 = no transform), got {cfg.natural_history}"),
        (not per_layer or cfg.optimizer in PROJECTED_OPTIMIZERS,
         f"--galore-per-layer steps each weight inside backward, which only {PROJECTED_OPTIMIZERS} can do; use "
         f"--optimizer galore_adamw or natural_galore, or drop --galore-per-layer"),
        (not per_layer or cfg.grad_accum == 1,
         "--galore-per-layer updates each weight during backward, so gradients cannot add up over micro-batches; "
         "set --grad-accum 1 (a larger --batch-size instead)"),
        (not per_layer or cfg.max_grad_norm == 0,
         "--galore-per-layer updates each weight before the global gradient norm is known, so it cannot clip by "
         "it; set --max-grad-norm 0"),
    ]


def check_projection_ranks(model: nn.Module, params: list[nn.Parameter], cfg) -> None:
    """--galore-rank must not exceed the smaller side of any matrix it projects (a rank-r subspace of a matrix
    with fewer than r rows or columns does not exist). Shapes only: it works on a model on the meta device,
    which is how the finetune recipe checks before reading any weight."""
    if cfg.optimizer not in PROJECTED_OPTIMIZERS:
        return
    names = {id(p): n for n, p in model.named_parameters()}
    projected = [p for g in optimizer_params(model, params, cfg) if "rank" in g for p in g["params"]]
    if not projected:  # e.g. SaRA's or an adapter's parameters: the optimizer would be plain AdamW, silently
        raise ValueError(f"--optimizer {cfg.optimizer} projects the gradients of the 2-D weights of attention and "
                         f"MLP linears, and none of the {len(params)} trainable parameters is one; use it with "
                         f"--method full, or --optimizer adamw")
    small = [p for p in projected if cfg.galore_rank > min(p.shape)]
    if small:
        limit = min(min(p.shape) for p in projected)
        raise ValueError(f"--galore-rank {cfg.galore_rank} is larger than the smaller side of {names[id(small[0])]} "
                         f"{tuple(small[0].shape)} ({len(small)} projected matrices are too small); use "
                         f"--galore-rank {limit} or less")


# ---------------------------------------------------------------------------------------------
# layer-wise lr decay


def lr_scale(name: str, n_layers: int, decay: float, layer_fn=layer_index) -> float:
    i = layer_fn(name)
    if i is not None:
        return decay ** (n_layers - 1 - i)  # block l = i + 1: ξ^(L − l)
    return decay ** n_layers if is_embedding(name) else 1.0


def param_groups_llrd(model: nn.Module, lr: float, decay: float, weight_decay: float = 0.0,
                      layer_fn: Callable[[str], int | None] = layer_index) -> list[dict]:
    """Optimizer groups of the trainable parameters: one per (lr scale, decayed or not), each parameter once."""
    n_layers = num_layers(model, layer_fn)
    groups: dict[tuple[float, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        scale = lr_scale(name, n_layers, decay, layer_fn)
        decayed = p.dim() >= 2  # biases and norm weights are not decayed
        group = groups.setdefault((scale, decayed), {
            "params": [], "lr": lr, "lr_scale": scale, "weight_decay": weight_decay if decayed else 0.0})
        group["params"].append(p)
    return [groups[k] for k in sorted(groups, key=lambda k: (-k[0], not k[1]))]


def optimizer_params(model: nn.Module, params: list[nn.Parameter], cfg) -> list:
    """What the Trainer hands its optimizer: the plain list, LLRD groups with --llrd, or GaLore's projected and
    plain groups with --optimizer galore_adamw / natural_galore."""
    if cfg.optimizer in PROJECTED_OPTIMIZERS:
        from ..optim import galore_param_groups

        extra = {}
        if cfg.optimizer == "natural_galore":
            extra = {"natural_history": cfg.natural_history, "reset_history_on_refresh": cfg.natural_reset_history}
        return galore_param_groups(model, params, cfg.galore_rank, cfg.galore_update_proj_gap, cfg.galore_scale,
                                   cfg.galore_proj_type, **extra)
    if not cfg.llrd:
        return params
    return param_groups_llrd(model, cfg.lr, cfg.llrd, cfg.weight_decay)


# ---------------------------------------------------------------------------------------------
# freezing and re-initializing blocks


def _adapter_param_ids(model: nn.Module) -> set[int]:
    return {id(p) for _, layer in adapter_layers(model) for n in layer.adapter_names
            for p in layer.adapter_parameters(n)}


def freeze_bottom(model: nn.Module, k: int, layer_fn=layer_index) -> list[str]:
    """Freeze the embeddings and every parameter (adapter or base) of blocks 0..k-1; the names frozen."""
    n_layers = num_layers(model, layer_fn)
    if k >= n_layers:
        raise ValueError(f"--freeze-lower {k} would freeze all {n_layers} blocks of this model; "
                         f"use at most {n_layers - 1}")
    frozen = []
    for name, p in model.named_parameters():
        i = layer_fn(name)
        if p.requires_grad and ((i is not None and i < k) or is_embedding(name)):
            p.requires_grad_(False)
            frozen.append(name)
    return frozen


@torch.no_grad()
def reinit_top(model: nn.Module, k: int, std: float = 0.02, layer_fn=layer_index) -> list[str]:
    """Re-draw the base weights of the top k blocks as `_init_weights` does and make them trainable.

    Matrices N(0, std), biases 0, norm weights 1; adapter parameters are left as they are."""
    n_layers = num_layers(model, layer_fn)
    if k > n_layers:
        raise ValueError(f"--reinit-top {k}: this model has only {n_layers} blocks")
    adapters = _adapter_param_ids(model)
    done = []
    for name, p in model.named_parameters():
        i = layer_fn(name)
        if i is None or i < n_layers - k or id(p) in adapters:
            continue
        if not p.is_floating_point():
            raise ValueError(f"--reinit-top: {name} is not a float weight (a 4-bit base?); "
                             "re-initialize only a float base model")
        if p.dim() >= 2:
            p.normal_(0.0, std)
        elif name.endswith("bias"):
            p.zero_()
        else:
            p.fill_(1.0)  # a norm's weight
        p.requires_grad_(True)
        done.append(name)
    return done


# ---------------------------------------------------------------------------------------------
# FPF


def module_units(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Trainable parameters by module: an adapter layer's parameters form one unit, others their parent's."""
    owner = {}
    for layer_name, layer in adapter_layers(model):  # outer wrappers first, so inner ones win
        owner.update({id(p): layer_name for p in layer.parameters()})
    units: dict[str, list[tuple[str, nn.Parameter]]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            unit = owner.get(id(p), name.rpartition(".")[0])
            units.setdefault(unit, []).append((name, p))
    return units


def _flat(params: Iterable[torch.Tensor]) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).float() for p in params])


def drift_scores(before: dict[str, torch.Tensor], units: dict[str, list[tuple[str, nn.Parameter]]],
                 eps: float = 1e-8) -> dict[str, float]:
    """`‖θ_m − θ_m^before‖ / (‖θ_m^before‖ + ε)` per unit, `before` keyed by parameter name."""
    out = {}
    for unit, params in units.items():
        old = _flat(before[n] for n, _ in params)
        new = _flat(p for _, p in params)
        out[unit] = float((new - old).norm() / (old.norm() + eps))
    return out


def select_by_budget(scores: dict[str, float], sizes: dict[str, int], fraction: float) -> list[str]:
    """The highest-scoring units, in order, while their parameters fit in `fraction` of all (at least one)."""
    budget = fraction * sum(sizes.values())
    chosen, used = [], 0
    for unit in sorted(scores, key=lambda u: (-scores[u], u)):
        if chosen and used + sizes[unit] > budget:
            break
        chosen.append(unit)
        used += sizes[unit]
    return chosen


def probe_drift(model: nn.Module, loss_fn: Callable[[object], torch.Tensor], batches: list,
                lr: float) -> dict[str, float]:
    """Drift score of every trainable unit after SGD steps on `batches`; weights and RNG are restored.

    SGD, not Adam: Adam's per-element normalisation moves every weight by about lr per step whatever its
    gradient, which would hide the differences in sensitivity the score is meant to find."""
    units = module_units(model)
    before = {n: p.detach().clone() for params in units.values() for n, p in params}
    rng = torch.get_rng_state()
    probe = plain_sgd([p for params in units.values() for _, p in params], lr=lr)
    was_training = model.training
    model.train()
    try:
        for batch in batches:
            loss_fn(batch).backward()
            probe.step()
            probe.zero_grad(set_to_none=True)
        return drift_scores(before, units)
    finally:
        with torch.no_grad():
            for params in units.values():
                for n, p in params:
                    p.copy_(before[n])
        torch.set_rng_state(rng)
        model.train(was_training)


def apply_fpf(model: nn.Module, loss_fn, batches: list, fraction: float, lr: float) -> dict:
    """Probe, keep the most-drifting units (up to `fraction` of the trainable parameters) trainable and
    freeze the rest; returns the report (scores, selection, parameter counts)."""
    units = module_units(model)
    sizes = {u: sum(p.numel() for _, p in params) for u, params in units.items()}
    scores = probe_drift(model, loss_fn, batches, lr)
    selected = select_by_budget(scores, sizes, fraction)
    for unit, params in units.items():
        if unit not in selected:
            for _, p in params:
                p.requires_grad_(False)
    return {"selected": selected, "drift": scores, "probe_steps": len(batches),
            "trainable_parameters": sum(sizes[u] for u in selected), "candidate_parameters": sum(sizes.values())}


# ---------------------------------------------------------------------------------------------
# the Trainer's entry points


def lm_probe_loss(model: nn.Module):
    """The loop's objective for one batch, token-mean (what a probe step minimizes)."""
    from .loss import lm_loss_sum

    def loss(batch) -> torch.Tensor:
        total, n = lm_loss_sum(model, batch)
        return total / max(n, 1)

    return loss


def prepare_model(model: nn.Module, train_examples: list, cfg) -> dict:
    """Apply --reinit-top, --freeze-lower and FPF (in that order) before the optimizer is built; the report."""
    from ..data import batches_for_epoch

    report: dict = {}
    if cfg.reinit_top:
        names = reinit_top(model, cfg.reinit_top)
        report["reinit_top"] = {"blocks": cfg.reinit_top, "parameters": names}
    if cfg.freeze_lower:
        report["freeze_lower"] = {"blocks": cfg.freeze_lower, "frozen": len(freeze_bottom(model, cfg.freeze_lower))}
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError(f"--freeze-lower {cfg.freeze_lower} leaves nothing to train: every trainable "
                             "parameter is in the lowest blocks; lower it")
    if cfg.fpf_fraction:
        batches = batches_for_epoch(train_examples, cfg.batch_size, 0, cfg.seed, pack=cfg.pack,
                                    max_length=cfg.max_length)[: cfg.fpf_probe_steps]
        report["fpf"] = apply_fpf(model, lm_probe_loss(model), batches, cfg.fpf_fraction, cfg.lr)
    return report


def save_reinit_blocks(model: nn.Module, out_dir, k: int, layer_fn=layer_index) -> None:
    """Write the top k blocks' (re-initialized, trained) base weights under their Hugging Face names to
    `out_dir/reinit_blocks.safetensors`: the adapter alone does not hold them."""
    from safetensors.torch import save_file

    from ..methods.base import get_base_state_dict

    n_layers = num_layers(model, layer_fn)
    tensors = {n: t.detach().cpu().contiguous() for n, t in get_base_state_dict(model).items()
               if (i := layer_fn(n)) is not None and i >= n_layers - k}
    final = Path(out_dir) / "reinit_blocks.safetensors"
    tmp = final.with_name(f".{final.name}.tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, final)  # never a half-written file under the final name

"""Causal-LM loss, computed once for every recipe.

Labels are aligned with input ids (HF convention, -100 = no loss) and shifted here. Only positions that
carry a label go through the LM head, in chunks, so full (B, T, V) fp32 logits are never materialized: a
plain linear head goes through the fused `linear_cross_entropy_sum` (the gradient wrt the hidden states
is made in the forward, chunk by chunk, and only it is kept); a head that carries an adapter is run in
chunks recomputed during backward. Losses are returned as a *sum* with the token count: the trainer
divides by the number of loss tokens of the whole accumulation window, which makes gradient
accumulation exact. `heldout_loss` is the one token-mean evaluation loss (the Trainer's eval, the
forgetting report, a fine-tuning job's validation).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..ops.linear_ce import linear_cross_entropy_sum
from ..ops.fusable import is_plain_linear


def shifted_targets(labels: torch.Tensor, segment_ids: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T) labels -> (B, T) targets where position t predicts token t+1 (-100 where none)."""
    tgt = torch.full_like(labels, -100)
    tgt[:, :-1] = labels[:, 1:]
    if segment_ids is not None:
        # In a packed row the last token of one sample must not be scored on the next sample's first.
        cross = segment_ids[:, 1:] != segment_ids[:, :-1]
        tgt[:, :-1] = tgt[:, :-1].masked_fill(cross, -100)
    return tgt


def _ce_chunk(h: torch.Tensor, head, tgt: torch.Tensor) -> torch.Tensor:
    logits = head(h).float()  # (n, V); head may carry an adapter
    return F.cross_entropy(logits, tgt, reduction="sum")


def chunked_ce_sum(hidden: torch.Tensor, head, targets: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Sum of token cross-entropies. hidden (N, C), targets (N,) all valid; head is the LM head module."""
    if is_plain_linear(head):
        return linear_cross_entropy_sum(hidden, head.weight, head.bias, targets, chunk)
    total = hidden.new_zeros((), dtype=torch.float32)
    for s in range(0, hidden.shape[0], chunk):
        h, t = hidden[s:s + chunk], targets[s:s + chunk]
        if torch.is_grad_enabled() and hidden.shape[0] > chunk:
            total = total + checkpoint(_ce_chunk, h, head, t, use_reentrant=False)
        else:
            total = total + _ce_chunk(h, head, t)
    return total


def lm_loss_sum(model, batch, chunk: int = 1024, adapter_ids=None) -> tuple[torch.Tensor, int]:
    """(sum of token losses, number of loss tokens) for one batch (a `leantune.data.Batch`); adapter_ids:
    the adapter slot of each row (a multi-adapter model), as `ForwardMeta` takes them."""
    from ..models.llama import ForwardMeta

    cfg = getattr(model, "config", None)
    aux = bool(getattr(cfg, "output_router_logits", False) and getattr(cfg, "num_experts", 0))
    meta = ForwardMeta(positions=batch.positions, segment_ids=batch.segment_ids, adapter_ids=adapter_ids,
                       router_logits=[] if aux else None)
    hidden = model.hidden(batch.input_ids, meta)  # (B, T, C)
    tgt = shifted_targets(batch.labels, batch.segment_ids)
    sel = tgt != -100
    n = int(sel.sum())
    if n == 0:
        return hidden.sum() * 0.0, 0
    loss = chunked_ce_sum(hidden[sel], model.head_module(), tgt[sel], chunk)
    if aux:  # MoE load balancing, as transformers adds it: mean CE + coef * aux, i.e. n * coef * aux to the sum
        loss = loss + n * cfg.router_aux_loss_coef * moe_aux_loss(cfg, meta.router_logits, batch.segment_ids)
    return loss, n


def moe_aux_loss(cfg, router_logits: list, segment_ids: torch.Tensor | None) -> torch.Tensor:
    """The load-balancing loss over this forward's router logits; a packed batch's padding (segment 0) left out."""
    from ..models.moe import load_balancing_loss

    valid = None if segment_ids is None else segment_ids.reshape(-1) > 0
    return load_balancing_loss(router_logits, cfg.num_experts, cfg.num_experts_per_tok, valid)


@torch.no_grad()
def heldout_loss(model, examples: list, batch_size: int, max_length: int | None = None, seed: int = 0,
                 adapter_slot: int | None = None) -> float:
    """Token-mean LM loss of `model` on `examples` (`leantune.data.Example`s), in eval mode (restored after).

    Batches are built as the Trainer builds its eval batches (unpacked, shuffled by `seed`), so every caller
    gets the same number for the same examples; adapter_slot: the adapter slot every row uses (a served
    multi-adapter model)."""
    from ..data import batches_for_epoch
    from ..routing import Routing

    was_training, device = model.training, model.head_module().weight.device
    model.eval()
    total, n = 0.0, 0
    try:
        for batch in batches_for_epoch(examples, batch_size, 0, seed, pack=False, max_length=max_length):
            rows = batch.input_ids.shape[0]
            route = None if adapter_slot is None else Routing(torch.full((rows,), adapter_slot, device=device),
                                                               [adapter_slot] * rows)
            s, k = lm_loss_sum(model, batch.to(device), adapter_ids=route)
            total, n = total + float(s), n + k
    finally:
        model.train(was_training)
    return total / max(n, 1)

"""The serving engine's paged KV cache: K/V for every running sequence in one pool of fixed-size blocks.

Each layer owns two flat tensors of `num_blocks * block_size` slots, `(slots, Hkv, D)`. The block
manager (pure Python, `block_manager.py`) decides which slots a sequence owns; this module only moves
tensors. A step packs the new tokens of many sequences into one row (`(1, N)`): decode tokens of many
requests, chunks of long prompts (chunked prefill) and chunks of a fine-tuning sequence. `attend` writes
the step's K/V into their slots, then attends each sequence to its own context:

- all one-token chunks (decodes) at once: their contexts are gathered into a padded `(n, S_max)` block
  with a key mask, one SDPA call per layer;
- each longer chunk on its own, causal with an offset (`past` tokens already cached).

Each layer attends as the model's `ScoreSpec` for it says (scale, Gemma 2's soft-capping, the layer's
sliding window: Gemma alternates windowed and full layers), through the model's one `attention` function.

Attention metadata is explicit: the runner builds a `StepPlan` per step and hands it over with `begin`;
the model sees the cache through `ForwardMeta.cache` (`paged = True`), never through a global.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.llama import ScoreSpec, attention


@dataclass
class Span:
    """One sequence's part of a packed step."""

    q0: int  # first row of the packed batch
    q1: int  # one past the last row
    past: int  # tokens of this sequence already in the cache before the step
    context: torch.Tensor  # (past + q1 - q0,) slots of the whole context, in position order


@dataclass
class StepPlan:
    slot_mapping: torch.Tensor  # (N,) where each new token's K/V go
    spans: list[Span]  # chunks longer than one token
    dec_rows: torch.Tensor | None = None  # (n,) rows of one-token chunks
    dec_gather: torch.Tensor | None = None  # (n, S_max) context slots, padded with slot 0
    dec_mask: torch.Tensor | None = None  # (n, 1, 1, S_max) True = a slot of the context (before any window)
    dec_lens: torch.Tensor | None = None  # (n, 1, 1, 1) context length of each decode row


def build_plan(contexts: list[list[int]], lengths: list[int], device) -> StepPlan:

    """contexts[i]: slots of sequence i's positions 0..past+len-1; lengths[i]: its new tokens this step."""
    mapping, spans, dec_rows, dec_ctx = [], [], [], []
    row = 0
    for ctx, n in zip(contexts, lengths):
        mapping.extend(ctx[len(ctx) - n:])
        if n == 1:
            dec_rows.append(row)
            dec_ctx.append(ctx)
        else:
            spans.append(Span(row, row + n, len(ctx) - n, torch.tensor(ctx, dtype=torch.long, device=device)))
        row += n
    plan = StepPlan(torch.tensor(mapping, dtype=torch.long, device=device), spans)
    if dec_rows:
        s_max = max(len(c) for c in dec_ctx)
        gather = torch.zeros(len(dec_ctx), s_max, dtype=torch.long)
        mask = torch.zeros(len(dec_ctx), s_max, dtype=torch.bool)
        for i, ctx in enumerate(dec_ctx):
            gather[i, : len(ctx)] = torch.tensor(ctx, dtype=torch.long)
            mask[i, : len(ctx)] = True
        plan.dec_rows = torch.tensor(dec_rows, dtype=torch.long, device=device)
        plan.dec_gather, plan.dec_mask = gather.to(device), mask[:, None, None, :].to(device)
        plan.dec_lens = torch.tensor([len(c) for c in dec_ctx], device=device)[:, None, None, None]
    return plan


def _dec_mask(p: StepPlan, window: int | None) -> torch.Tensor:
    """(n, 1, 1, S_max) the decode rows' keys within `window` of their query (the last position)."""
    if window is None:
        return p.dec_mask
    ki = torch.arange(p.dec_mask.shape[-1], device=p.dec_mask.device)
    return p.dec_mask & (ki >= p.dec_lens - window)


def _span_mask(past: int, T: int, window: int | None, device) -> torch.Tensor | None:
    """(T, past+T) causal mask with an offset; None when plain `is_causal` gives the same."""
    if past == 0 and window is None:
        return None
    qi = torch.arange(past, past + T, device=device)[:, None]
    ki = torch.arange(past + T, device=device)[None, :]
    m = ki <= qi
    if window is not None:
        m = m & (qi - ki < window)
    return m


class PagedKVCache:
    paged = True  # read by Attention.forward
    length = 0  # positions come from ForwardMeta, never from the cache
    has_key_mask = False

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype=torch.float32, device="cpu"):
        shape = (num_blocks * block_size, num_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.device = device
        self.plan: StepPlan | None = None

    @classmethod
    def for_model(cls, model, num_blocks: int, block_size: int) -> PagedKVCache:
        c, p = model.config, next(model.parameters())
        dtype = p.dtype if p.is_floating_point() else torch.float32
        return cls(c.num_layers, num_blocks, block_size, c.num_kv_heads, c.head_dim, dtype, p.device)

    @property
    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v if t is not None)

    def begin(self, plan: StepPlan) -> None:
        self.plan = plan

    def advance(self, T: int) -> None:  # the model's contiguous-cache protocol; positions are explicit here
        pass

    def _extend(self, layer: int, k: torch.Tensor) -> None:
        """Cache layers past the model's own (a side network's, numbered after the base's layers, which an adapter
        loaded after the engine started adds) are made on first use in their keys' shape and dtype; a layer whose
        keys changed shape (another side network in its place) is made anew."""
        n = self.k[0].shape[0]
        while len(self.k) <= layer:
            self.k.append(None)
            self.v.append(None)
        shape = (n, k.shape[1], k.shape[3])
        if self.k[layer] is None or self.k[layer].shape != shape or self.k[layer].dtype != k.dtype:
            self.k[layer] = torch.zeros(shape, dtype=k.dtype, device=k.device)
            self.v[layer] = torch.zeros(shape, dtype=k.dtype, device=k.device)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: ScoreSpec) -> torch.Tensor:
        """q (1, H, N, D), k/v (1, Hkv, N, D) of the packed step -> attention output (1, H, N, D), scored
        as `spec` (the layer's scale, soft-cap and window) says."""
        p = self.plan
        self._extend(layer, k)
        kc, vc = self.k[layer], self.v[layer]
        kc[p.slot_mapping] = k[0].transpose(0, 1).to(kc.dtype)  # (N, Hkv, D)
        vc[p.slot_mapping] = v[0].transpose(0, 1).to(vc.dtype)
        y = torch.empty_like(q)
        if p.dec_rows is not None:
            keys = kc[p.dec_gather].permute(0, 2, 1, 3)  # (n, Hkv, S, D)
            vals = vc[p.dec_gather].permute(0, 2, 1, 3)
            qd = q[0][:, p.dec_rows].transpose(0, 1).unsqueeze(2)  # (n, H, 1, D)
            out = attention(qd, keys, vals, spec, _dec_mask(p, spec.window))
            y[0][:, p.dec_rows] = out.squeeze(2).transpose(0, 1)
        for s in p.spans:
            keys = kc[s.context].transpose(0, 1).unsqueeze(0)  # (1, Hkv, S, D)
            vals = vc[s.context].transpose(0, 1).unsqueeze(0)
            T = s.q1 - s.q0
            mask = _span_mask(s.past, T, spec.window, q.device)
            y[:, :, s.q0:s.q1] = attention(q[:, :, s.q0:s.q1], keys, vals, spec, mask, causal=True)
        return y

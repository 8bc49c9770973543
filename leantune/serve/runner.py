"""The model runner: owns the model's tensors and the paged KV cache, and runs one packed step.

A step is a list of `Work` items, one per sequence: the new tokens of a decode, a prefill chunk or a
fine-tuning chunk. They are packed into one row `(1, N)` with per-token RoPE positions and per-token
adapter slots, so requests for different adapters share every matmul (the LoRA layers route rows by
slot; there are no per-adapter sub-batches). The runner returns the logits of the rows that sample and,
for fine-tuning rows, every layer's input (the checkpoints the co-trainer's layer-sliced backward
recomputes from). It runs the model through the stages the model shows (`embed`, `layer_context`,
`layer_forward`, `final_norm`, `head`), so a model family with another skeleton needs no change here.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.llama import ForwardMeta
from ..routing import Routing
from .paged_cache import PagedKVCache, build_plan


@dataclass
class Work:
    tokens: list[int]  # the new tokens of this sequence in this step
    start: int  # position of tokens[0]
    context: list[int]  # KV slots of positions [0, start + len(tokens))
    adapter: int = -1  # adapter slot, -1 = base model
    sample: bool = False  # return logits for the last token
    capture: bool = False  # return every layer's input for these tokens (fine-tuning chunk)


@dataclass
class StepResult:
    logits: torch.Tensor | None  # (n_sample, V) fp32, in the order of the sampling works
    captures: list[torch.Tensor] | None  # L+1 tensors (n_capture_tokens, C): inputs of layer 0..L-1, then
    # the last layer's output (before the final norm)


class ModelRunner:
    def __init__(self, model, num_blocks: int, block_size: int):
        self.model = model
        self.cache = PagedKVCache.for_model(model, num_blocks, block_size)
        self.device = next(model.parameters()).device

    def _pack(self, works: list[Work]):
        ids, pos, slots, sample_rows, cap_rows = [], [], [], [], []
        for w in works:
            r0 = len(ids)
            n = len(w.tokens)
            ids.extend(w.tokens)
            pos.extend(range(w.start, w.start + n))
            slots.extend([w.adapter] * n)
            if w.sample:
                sample_rows.append(r0 + n - 1)
            if w.capture:
                cap_rows.extend(range(r0, r0 + n))

        def t(x):
            return torch.tensor(x, dtype=torch.long, device=self.device)

        # the adapter slots once per step, with their Python list: no adapter layer reads them back
        aid = t(slots)[None]
        return t(ids)[None], t(pos)[None], Routing(aid, slots), t(sample_rows), t(cap_rows)

    @torch.no_grad()  # not inference_mode: captured inputs become leaves of the co-trainer's backward
    def step(self, works: list[Work]) -> StepResult:
        if not works:
            return StepResult(None, None)
        m = self.model
        ids, pos, route, sample_rows, cap_rows = self._pack(works)
        self.cache.begin(build_plan([w.context for w in works], [len(w.tokens) for w in works], self.device))
        meta = ForwardMeta(positions=pos, adapter_ids=route, cache=self.cache)
        x = m.embed(ids)  # (1, N, C)
        ctx = m.layer_context(x, meta)
        caps = [] if cap_rows.numel() else None
        for i in range(m.num_layers):
            if caps is not None:
                caps.append(x[0, cap_rows].clone())
            x = m.layer_forward(i, x, ctx)
        if caps is not None:
            caps.append(x[0, cap_rows].clone())
        logits = None
        if sample_rows.numel():
            h = m.final_norm(x[0, sample_rows])  # (n, C): only the rows that sample meet the LM head
            logits = m.head(h, route.ids[0, sample_rows]).float()
        return StepResult(logits, caps)

"""The model runner: owns the model's tensors and the paged KV cache, and runs one packed step.

A step is a list of `Work` items, one per sequence: the new tokens of a decode, a prefill chunk or a
fine-tuning chunk. They are packed into one row `(1, N)` with per-token RoPE positions and per-token
adapter slots, so requests for different adapters share every matmul (the LoRA layers route rows by
slot; there are no per-adapter sub-batches). The runner returns the logits of the rows that sample, the
logits of every row of the works that ask (`all_logits`: a prefill chunk whose prompt-token log-probabilities
a client wants, as `echo` + `logprobs` and vLLM's `prompt_logprobs` do) and, for fine-tuning rows, every layer's input (the checkpoints the co-trainer's layer-sliced backward
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
    all_logits: bool = False  # return the logits of every token of this work (prompt log-probabilities)


@dataclass
class StepResult:
    logits: torch.Tensor | None  # (n_sample, V) fp32, in the order of the sampling works
    captures: list[torch.Tensor] | None  # L+1 tensors (n_capture_tokens, C): inputs of layer 0..L-1, then
    # the last layer's output (before the final norm)
    row_logits: list[torch.Tensor] | None = None  # per `all_logits` work, in order: (len(tokens), V) fp32


class ModelRunner:
    def __init__(self, model, num_blocks: int, block_size: int):
        self.model = model
        self.cache = PagedKVCache.for_model(model, num_blocks, block_size)
        self.device = next(model.parameters()).device

    def _pack(self, works: list[Work]):
        ids, pos, slots, sample_rows, cap_rows, head_rows = [], [], [], [], [], []
        for w in works:
            r0 = len(ids)
            n = len(w.tokens)
            ids.extend(w.tokens)
            pos.extend(range(w.start, w.start + n))
            slots.extend([w.adapter] * n)
            if w.all_logits:  # every row meets the head; a sampling work's last row is among them
                head_rows.extend(range(r0, r0 + n))
            elif w.sample:
                head_rows.append(r0 + n - 1)
            if w.sample:
                sample_rows.append(len(head_rows) - 1)  # its index among head_rows
            if w.capture:
                cap_rows.extend(range(r0, r0 + n))

        def t(x):
            return torch.tensor(x, dtype=torch.long, device=self.device)

        # the adapter slots once per step, with their Python list: no adapter layer reads them back
        aid = t(slots)[None]
        return t(ids)[None], t(pos)[None], Routing(aid, slots), t(head_rows), t(sample_rows), t(cap_rows)

    @torch.no_grad()  # not inference_mode: captured inputs become leaves of the co-trainer's backward
    def step(self, works: list[Work]) -> StepResult:
        if not works:
            return StepResult(None, None)
        m = self.model
        ids, pos, route, head_rows, sample_rows, cap_rows = self._pack(works)
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
        if not head_rows.numel():
            return StepResult(None, caps)
        h = m.final_norm(x[0, head_rows])  # (n, C): only the rows that sample or were asked for meet the LM head
        out = m.head(h, route.ids[0, head_rows]).float()  # (n, V)
        rows, r = [], 0
        for w in works:
            if w.all_logits:
                rows.append(out[r:r + len(w.tokens)])
                r += len(w.tokens)
            elif w.sample:
                r += 1
        return StepResult(out[sample_rows] if sample_rows.numel() else None, caps, rows or None)

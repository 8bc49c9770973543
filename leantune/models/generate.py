"""Batched generation with a KV cache: greedy, temperature, top-k, top-p, stop tokens and stop strings.

Prompts of different lengths are left-padded into one batch; the cache masks the padding and each row
keeps its own RoPE positions, so a row's tokens equal what it would get alone. Rows that finish leave the
batch (their cache rows are dropped) so the remaining rows run faster. A model whose RoPE changes for the whole
sequence once it grows past a length (longrope: `rope_switch_len`) has its batch prefilled again at that
step, as transformers' generate drops its cache there.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ..routing import Routing
from .kv_cache import KVCache
from .llama import ForwardMeta


@dataclass
class GenerationConfig:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    stop_token_ids: list[int] = field(default_factory=list)
    stop_strings: list[str] = field(default_factory=list)
    seed: int | None = None

    def __post_init__(self):
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def sample_next(logits: torch.Tensor, gen: GenerationConfig, rng: torch.Generator | None) -> torch.Tensor:
    """logits (B, V) -> next ids (B,)."""
    if gen.temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / gen.temperature
    if gen.top_k > 0:
        kth = torch.topk(logits, min(gen.top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if gen.top_p < 1.0:
        # Nucleus: drop the tail whose cumulative probability stays within 1 - top_p (keep >= 1 token).
        srt, idx = torch.sort(logits, descending=False)
        cum = srt.softmax(-1).cumsum(-1)
        drop = cum <= (1 - gen.top_p)
        drop[:, -1] = False
        logits = logits.masked_fill(drop.scatter(1, idx, drop), float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=rng).squeeze(-1)


def _left_pad(prompts: list[list[int]], pad_id: int, device):
    L = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), L), pad_id, dtype=torch.long, device=device)
    valid = torch.zeros(len(prompts), L, dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        ids[i, L - len(p):] = torch.tensor(p, dtype=torch.long)
        valid[i, L - len(p):] = True
    return ids, valid


@torch.no_grad()
def generate(
    model,
    prompts: list[list[int]],
    gen: GenerationConfig,
    adapter_ids: torch.Tensor | None = None,
    pad_id: int = 0,
    stop_fn: Callable[[int, list[int]], bool] | None = None,
    on_token: Callable[[int, int], None] | None = None,
) -> list[list[int]]:
    """Generate for each prompt; returns the new tokens per prompt (stop token included if hit).

    adapter_ids: (B,) adapter slot per prompt (-1 = base). stop_fn(row, tokens) ends a row early
    (stop strings); on_token(row, token) streams.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    rng = None
    if gen.seed is not None:
        rng = torch.Generator(device=device).manual_seed(gen.seed)
    stops = set(gen.stop_token_ids)
    out: list[list[int]] = [[] for _ in prompts]
    alive = torch.arange(len(prompts), device=device)  # original row index of each live batch row
    a_ids = adapter_ids.to(device) if adapter_ids is not None else None
    logits, cache, next_pos = _prefill(model, prompts, gen.max_new_tokens, a_ids, pad_id, device)
    switch = getattr(model, "rope_switch_len", None)
    for step in range(gen.max_new_tokens):
        tok = sample_next(logits, gen, rng)
        keep = []
        for j, t in enumerate(tok.tolist()):
            r = int(alive[j])
            out[r].append(t)
            if on_token:
                on_token(r, t)
            done = t in stops or (stop_fn is not None and stop_fn(r, out[r]))
            keep.append(not done)
        if not any(keep):
            break
        if not all(keep):
            k = torch.tensor(keep, device=device)
            cache.select(k)
            alive, tok, next_pos = alive[k], tok[k], next_pos[k]
            a_ids = a_ids[k] if a_ids is not None else None
        if cache.length >= cache.max_len:
            break
        if switch is not None and bool((next_pos == switch).any()):  # a row's cached keys are stale from here
            rows = [prompts[r] + out[r] for r in alive.tolist()]
            logits, cache, next_pos = _prefill(model, rows, gen.max_new_tokens - step - 1, a_ids, pad_id, device)
            continue
        meta = ForwardMeta(positions=next_pos[:, None], adapter_ids=_routing(a_ids), cache=cache)
        logits = model(tok[:, None], meta)[:, -1]
        next_pos = next_pos + 1
    model.train(was_training)
    return out


def _prefill(model, prompts: list[list[int]], room: int, a_ids, pad_id: int, device):
    """Left-pad `prompts` into a fresh cache with `room` more slots and run them: (last logits (B, V), cache,
    (B,) position of each row's next token)."""
    ids, valid = _left_pad(prompts, pad_id, device)
    B, L = ids.shape
    cache = KVCache.for_model(model, B, L + room)
    cache.set_padding(valid)
    pos = (valid.long().cumsum(-1) - 1).clamp(min=0)  # (B, L) per-row positions, pads at 0
    logits = model(ids, ForwardMeta(positions=pos, adapter_ids=_routing(a_ids), cache=cache))[:, -1]
    return logits, cache, pos[:, -1] + 1


def generate_text(model, tokenizer, prompts: list[str] | list[list[int]], gen: GenerationConfig,
                  adapter_ids=None, on_text: Callable[[int, str], None] | None = None) -> list[str]:
    """Text in, text out: stop strings cut the reply; EOS ids of the tokenizer stop it."""
    ids = [tokenizer.encode(p) if isinstance(p, str) else p for p in prompts]
    gen = GenerationConfig(**{**gen.__dict__, "stop_token_ids": sorted(set(gen.stop_token_ids) | tokenizer.eos_ids)})
    stop_fn = None
    if gen.stop_strings:
        def stop_fn(row, toks):
            tail = tokenizer.decode(toks[-16:])
            return any(s in tail for s in gen.stop_strings)
    streamed: list[list[int]] = [[] for _ in ids]
    sent = [0] * len(ids)

    def on_tok(row, tok):
        # Stream decoded text deltas; re-decoding keeps multi-byte characters whole.
        if on_text is None:
            return
        streamed[row].append(tok)
        text = tokenizer.decode(streamed[row])
        if not text.endswith("\ufffd"):
            on_text(row, text[sent[row]:])
            sent[row] = len(text)

    toks = generate(model, ids, gen, adapter_ids, tokenizer.pad_id, stop_fn, on_tok)
    texts = [tokenizer.decode([t for t in row if t not in tokenizer.eos_ids]) for row in toks]
    for i, s in enumerate(texts):
        cut = min((s.find(x) for x in gen.stop_strings if x in s), default=-1)
        if cut >= 0:
            texts[i] = s[:cut]
    return texts


def _routing(a_ids: torch.Tensor | None) -> Routing | None:
    """The step's adapter slots, read once for every adapter layer of the forward."""
    return None if a_ids is None else Routing(a_ids)

"""`/v1/embeddings` (OpenAI's Create embeddings) served by the loaded decoder: each input's embedding is the
**mean over its tokens of the model's last hidden state** (after the final norm, as transformers'
`last_hidden_state`), padding masked out, then L2-normalized (unit length, so a dot product is a cosine), as
sentence-transformers' mean pooling with `Normalize`. `model` names the base model or an adapter: an adapter's
LoRA applies to the forward, as in generation.

Inputs are OpenAI's four forms (a string, a list of strings, a list of token ids, a list of token-id lists);
`encoding_format` float or base64 (little-endian float32, as OpenAI's); `dimensions` only as the model's hidden
size (a decoder's embedding cannot be shortened: it was not trained Matryoshka-style); `user` accepted without
effect, as at OpenAI. An input longer than the server's `--max-model-len` is a 400 naming `input`.

How the forward runs: in the engine thread through `engine.call`, one bounded micro-batch per call (see `_forward`).
"""
from __future__ import annotations

import base64
from dataclasses import dataclass

import torch
from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from ...methods.base import adapter_slots
from ...models.llama import ForwardMeta
from ...routing import Routing
from .common import APIError, ctx, json_body, model_not_found, owner, run
from .schemas import openapi, parse

router = APIRouter()

MAX_INPUTS = 2048  # OpenAI's limit on the inputs of one request


class EmbeddingRequest(BaseModel):
    """POST /v1/embeddings."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str = Field(description="the base model's name or an adapter's (see /v1/models)")
    input: str | list[str] | list[int] | list[list[int]] = Field(
        description=f"a string, a list of strings, a list of token ids or a list of token-id lists (at most "
                    f"{MAX_INPUTS} inputs, each at most the server's max model length in tokens)")
    encoding_format: str | None = Field(None, description='"float" (default) or "base64" (little-endian float32)')
    dimensions: int | None = Field(None, description="only the model's hidden size (the embedding's only length)")
    user: str | None = Field(None, description="accepted, no effect (as at OpenAI)")


def mean_pool(hidden: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    """(B, T, C) hidden states of right-padded rows with `lens` (B,) valid tokens -> (B, C) fp32 L2-normalized
    mean of each row's valid tokens."""
    T = hidden.shape[1]
    mask = (torch.arange(T, device=hidden.device)[None] < lens[:, None]).to(torch.float32)  # (B, T)
    summed = torch.einsum("btc,bt->bc", hidden.float(), mask)  # (B, C)
    mean = summed / lens[:, None].to(torch.float32)
    return torch.nn.functional.normalize(mean, dim=-1)


@dataclass
class _Held:
    """The adapter an embedding request holds while its micro-batches run (None: the base model)."""

    entry: object | None
    slot: int  # adapter slot, -1 = base


def _hold(engine, model: str, who: str) -> _Held:
    """Engine thread. Resolve `model` and take a reference, so an unload or in-place reload between two
    micro-batches retires the adapter only after the request is done (as a generation's reference does)."""
    entry = engine.resolve(model, who)  # KeyError: unknown to this caller
    if entry is None:
        return _Held(None, -1)
    entry.refs += 1
    return _Held(entry, adapter_slots(engine.model)[entry.internal])


def _forward(engine, rows: list[list[int]], slot: int) -> torch.Tensor:
    """Engine thread. The embeddings (B, C) of one micro-batch of token-id rows.

    Why `engine.call` and not engine work (a scheduled sequence): an embedding needs one forward and no KV cache,
    so it runs as a plain batched forward without a cache (`cache=None`) between two iterations: the paged KV
    cache, the block manager and the scheduler are untouched, the adapter is routed by this forward's own
    `adapter_ids` (no adapter can be loaded or unloaded mid-forward, since commands run in this thread too), and
    there is nothing to abort. The caller bounds each micro-batch to about one iteration's token budget and
    submits the next only when this one is done, so running requests keep decoding in between."""
    device = engine.runner.device
    lens = torch.tensor([len(r) for r in rows], device=device)  # (B,)
    T = max(len(r) for r in rows)
    ids = torch.tensor([r + [0] * (T - len(r)) for r in rows], device=device)  # (B, T) right-padded
    # causal attention: a row's valid tokens never see its padding, so seq_lens only keeps the pad rows finite
    route = Routing(torch.full((len(rows),), slot, device=device), [slot] * len(rows))  # (B,): one adapter
    meta = ForwardMeta(seq_lens=lens, adapter_ids=route)
    with torch.no_grad():
        return mean_pool(engine.model.hidden(ids, meta), lens).cpu()  # (B, C)


def micro_batches(lengths: list[int], budget: int) -> list[list[int]]:
    """Indices of inputs grouped in order so that each group's padded size (rows x longest) stays within
    `budget` tokens; an input longer than the budget goes alone."""
    groups, cur, longest = [], [], 0
    for i, n in enumerate(lengths):
        if cur and (len(cur) + 1) * max(longest, n) > budget:
            groups.append(cur)
            cur, longest = [], 0
        cur.append(i)
        longest = max(longest, n)
    return groups + [cur] if cur else groups


def _token_rows(req: EmbeddingRequest, engine) -> list[list[int]]:
    """The request's inputs as token-id rows, each checked: non-empty, in the vocabulary, within max_model_len."""
    inp = req.input
    if isinstance(inp, str) or (inp and isinstance(inp[0], int)):
        inp = [inp]
    if not inp:
        raise APIError(400, "input must not be empty", param="input")
    if len(inp) > MAX_INPUTS:
        raise APIError(400, f"input holds {len(inp)} inputs; at most {MAX_INPUTS} per request", param="input")
    rows = [engine.tk.encode(x) if isinstance(x, str) else list(x) for x in inp]
    vocab, max_len = engine.model.config.vocab_size, engine.cfg.max_model_len
    for i, r in enumerate(rows):
        if not r:
            raise APIError(400, f"input[{i}] is empty (no tokens)", param="input")
        if any(not 0 <= t < vocab for t in r):
            raise APIError(400, f"input[{i}] holds token ids outside the vocabulary (0..{vocab - 1})", param="input")
        if len(r) > max_len:
            raise APIError(400, f"input[{i}] has {len(r)} tokens; this model's maximum context length is {max_len} "
                                "tokens: shorten it", param="input", code="context_length_exceeded")
    return rows


def _encode(vec: torch.Tensor, fmt: str) -> list[float] | str:
    if fmt == "base64":  # OpenAI's: the float32 values' little-endian bytes
        return base64.b64encode(vec.to(torch.float32).numpy().astype("<f4").tobytes()).decode()
    return vec.tolist()


@router.post("/v1/embeddings", openapi_extra=openapi(EmbeddingRequest))
async def embeddings(request: Request):
    who, body = owner(request), await json_body(request)
    req = parse(EmbeddingRequest, body)
    engine = ctx(request).engine
    fmt = req.encoding_format or "float"
    if fmt not in ("float", "base64"):
        raise APIError(400, f"encoding_format must be 'float' or 'base64', got {fmt!r}", param="encoding_format")
    size = engine.model.config.hidden_size
    if req.dimensions is not None and req.dimensions != size:
        raise APIError(400, f"dimensions {req.dimensions} is not supported: this model's embeddings have {size} "
                            "dimensions (a mean-pooled decoder state cannot be shortened); leave it out or send "
                            f"{size}", param="dimensions", code="unsupported_parameter")
    rows = _token_rows(req, engine)
    try:
        held = await run(request, _hold, engine, req.model, who)
    except KeyError:
        raise model_not_found(req.model) from None
    out: list[torch.Tensor | None] = [None] * len(rows)
    try:
        for group in micro_batches([len(r) for r in rows], engine.cfg.max_tokens_per_step):
            if await request.is_disconnected():  # nobody is waiting for the rest
                raise APIError(499, "the client closed the request")
            vecs = await run(request, _forward, engine, [rows[i] for i in group], held.slot)  # (B, C)
            for i, v in zip(group, vecs):
                out[i] = v
    finally:
        engine.call(engine._release, held.entry)  # noqa: SLF001 - the engine's own reference count
    data = [{"object": "embedding", "index": i, "embedding": _encode(v, fmt)} for i, v in enumerate(out)]
    n = sum(len(r) for r in rows)
    return {"object": "list", "data": data, "model": req.model, "usage": {"prompt_tokens": n, "total_tokens": n}}

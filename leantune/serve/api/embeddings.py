"""`/v1/embeddings` (OpenAI's Create embeddings). Each input's embedding is the **mean over its tokens of a model's
last hidden state** (for the decoder: after the final norm, as transformers' `last_hidden_state`), padding masked
out, then L2-normalized (unit length, so a dot product is a cosine): sentence-transformers' mean pooling with
`Normalize` (serve/embed.py). `model` names the served decoder (the base model, or an adapter: its LoRA applies,
as in generation) or the encoder of `--embedding-model`.

Inputs are OpenAI's four forms (a string, a list of strings, a list of token ids, a list of token-id lists);
`encoding_format` float or base64 (little-endian float32, as OpenAI's); `dimensions` only as the model's hidden
size (a mean-pooled state cannot be shortened: it was not trained Matryoshka-style); `user` accepted without
effect, as at OpenAI. An input longer than the model takes (`--max-model-len`; an encoder's max_seq_length) is a
400 naming `input`.

Decoder inputs run in the engine thread through `engine.call`, one bounded micro-batch per call
(`embed.decoder_forward` says why); encoder inputs in a worker thread.
"""
from __future__ import annotations

import asyncio
import base64

import torch
from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from .. import embed
from .common import APIError, ctx, json_body, model_not_found, owner, run
from .schemas import openapi, parse

router = APIRouter()

MAX_INPUTS = 2048  # OpenAI's limit on the inputs of one request
ENCODER_BATCH_TOKENS = 8192  # padded tokens per encoder forward: bounds its activation memory
_ADAPTER_WAIT_S = 0.05  # how often a request whose adapter waits for a resident place (--max-loras) asks again


class EmbeddingRequest(BaseModel):
    """POST /v1/embeddings."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str = Field(description="the base model's name, an adapter's (see /v1/models) or the --embedding-model's")
    input: str | list[str] | list[int] | list[list[int]] = Field(
        description=f"a string, a list of strings, a list of token ids or a list of token-id lists (at most "
                    f"{MAX_INPUTS} inputs, each at most the model's max length in tokens)")
    encoding_format: str | None = Field(None, description='"float" (default) or "base64" (little-endian float32)')
    dimensions: int | None = Field(None, description="only the model's hidden size (the embedding's only length)")
    user: str | None = Field(None, description="accepted, no effect (as at OpenAI)")


def _token_rows(inp, encode, vocab: int, max_len: int) -> list[list[int]]:
    """A request's `input` as token-id rows, each checked: non-empty, in the vocabulary, at most `max_len`."""
    if isinstance(inp, str) or (inp and isinstance(inp[0], int)):
        inp = [inp]
    if not inp:
        raise APIError(400, "input must not be empty", param="input")
    if len(inp) > MAX_INPUTS:
        raise APIError(400, f"input holds {len(inp)} inputs; at most {MAX_INPUTS} per request", param="input")
    rows = [encode(x) if isinstance(x, str) else list(x) for x in inp]
    for i, r in enumerate(rows):
        if not r:
            raise APIError(400, f"input[{i}] is empty (no tokens)", param="input")
        if any(not 0 <= t < vocab for t in r):
            raise APIError(400, f"input[{i}] holds token ids outside the vocabulary (0..{vocab - 1})", param="input")
        if len(r) > max_len:
            raise APIError(400, f"input[{i}] has {len(r)} tokens; this model's maximum context length is {max_len} "
                                "tokens: shorten it", param="input", code="context_length_exceeded")
    return rows


def _check_dimensions(dimensions: int | None, size: int) -> None:
    if dimensions is not None and dimensions != size:
        raise APIError(400, f"dimensions {dimensions} is not supported: this model's embeddings have {size} "
                            "dimensions (a mean-pooled state cannot be shortened); leave it out or send "
                            f"{size}", param="dimensions", code="unsupported_parameter")


async def _batched(request: Request, rows: list[list[int]], budget: int, forward) -> list[torch.Tensor]:
    """Each row's embedding, `await forward(rows of one micro-batch) -> (B, C)` one micro-batch at a time."""
    out: list[torch.Tensor | None] = [None] * len(rows)
    for group in embed.micro_batches([len(r) for r in rows], budget):
        if await request.is_disconnected():  # nobody is waiting for the rest
            raise APIError(499, "the client closed the request")
        vecs = await forward([rows[i] for i in group])  # (B, C)
        for i, v in zip(group, vecs):
            out[i] = v
    return out


async def _decoder(request: Request, engine, model: str, who: str, rows: list[list[int]]) -> list[torch.Tensor]:
    try:
        held = await run(request, embed.hold, engine, model, who)
    except KeyError:
        raise model_not_found(model) from None

    async def forward(batch):
        # None: every resident adapter is in use (--max-loras); wait for one, as a generation request waits
        while (vecs := await run(request, embed.decoder_forward, engine, batch, held)) is None:
            if await request.is_disconnected():
                raise APIError(499, "the client closed the request")
            await asyncio.sleep(_ADAPTER_WAIT_S)
        return vecs

    try:
        # about one iteration's token budget per engine call, so running requests keep their pace
        return await _batched(request, rows, engine.cfg.max_tokens_per_step, forward)
    except ValueError as e:  # the held adapter's folder could not be loaded back
        raise APIError(400, str(e), param="model") from None
    finally:
        engine.call(engine._release, held.entry)  # noqa: SLF001 - the engine's own reference count


def _encode(vec: torch.Tensor, fmt: str) -> list[float] | str:
    if fmt == "base64":  # OpenAI's: the float32 values' little-endian bytes
        return base64.b64encode(vec.to(torch.float32).numpy().astype("<f4").tobytes()).decode()
    return vec.tolist()


@router.post("/v1/embeddings", openapi_extra=openapi(EmbeddingRequest))
async def embeddings(request: Request):
    who, body = owner(request), await json_body(request)
    req = parse(EmbeddingRequest, body)
    c = ctx(request)
    engine, enc = c.engine, c.embedder
    fmt = req.encoding_format or "float"
    if fmt not in ("float", "base64"):
        raise APIError(400, f"encoding_format must be 'float' or 'base64', got {fmt!r}", param="encoding_format")
    if enc is not None and req.model == enc.name:
        _check_dimensions(req.dimensions, enc.hidden_size)
        rows = _token_rows(req.input, enc.encode, enc.vocab_size, enc.max_len)
        vecs = await _batched(request, rows, ENCODER_BATCH_TOKENS, lambda batch: asyncio.to_thread(enc.forward, batch))
    else:
        _check_dimensions(req.dimensions, engine.model.config.hidden_size)
        rows = _token_rows(req.input, engine.tk.encode, engine.model.config.vocab_size, engine.cfg.max_model_len)
        vecs = await _decoder(request, engine, req.model, who, rows)
    data = [{"object": "embedding", "index": i, "embedding": _encode(v, fmt)} for i, v in enumerate(vecs)]
    n = sum(len(r) for r in rows)
    return {"object": "list", "data": data, "model": req.model, "usage": {"prompt_tokens": n, "total_tokens": n}}

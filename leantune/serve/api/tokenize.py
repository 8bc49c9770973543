"""vLLM's `/tokenize` and `/detokenize`: the server's own tokenizer (and chat template) over HTTP, so a client
counts prompt tokens exactly as a completion's `usage.prompt_tokens` will.

Shapes as vLLM's (vllm/entrypoints/serve/tokenize/protocol.py): tokenize takes a `prompt` (with
`add_special_tokens`, default true) or chat `messages` (with `add_generation_prompt`, default true) and answers
`{"count", "max_model_len", "tokens", "token_strs"}`; detokenize takes `tokens` and answers `{"prompt"}`.
`model`, when given, must be one the caller may use (adapters share the base model's tokenizer; `messages` render
with the adapter folder's own chat template where it has one, as chat requests do).
"""
from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from .common import APIError, ctx, json_body, model_not_found, owner, run
from . import tools
from .completions import chat_prompt
from .schemas import openapi, parse

router = APIRouter()


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = Field(None, description="the base model or an adapter (they share one tokenizer; messages "
                                                "render with the adapter's own chat template if it has one)")
    prompt: str | None = Field(None, description="text to tokenize (give this or messages)")
    messages: list[Any] | None = Field(None, description="chat messages, rendered by the chat template")
    add_special_tokens: bool | None = Field(None, description="prompt: add BOS etc. (default true); messages: "
                                                              "the template adds them, so only false")
    add_generation_prompt: bool | None = Field(None, description="messages: end with the assistant turn's "
                                                                 "opening (default true)")
    return_token_strs: bool | None = Field(None, description="also answer each token's string")
    continue_final_message: bool | None = Field(None, description="not supported yet (only false)")
    chat_template: str | None = Field(None, description="not supported yet")
    chat_template_kwargs: dict[str, Any] | None = Field(None, description="not supported yet")
    tools: list[Any] | None = Field(None, description="messages: the functions a chat request offers (rendered as "
                                                      "the chat route renders them)")


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = Field(None, description="the base model or an adapter (they share one tokenizer)")
    tokens: list[int] = Field(description="token ids")


async def _check_model(request: Request, model: str | None, who: str) -> None:
    if model is None:
        return
    try:
        await run(request, ctx(request).engine.resolve, model, who)
    except KeyError:
        raise model_not_found(model) from None


@router.post("/tokenize", openapi_extra=openapi(TokenizeRequest))
async def tokenize(request: Request):
    who, body = owner(request), await json_body(request)
    req = parse(TokenizeRequest, body)
    await _check_model(request, req.model, who)
    engine = ctx(request).engine
    if (req.prompt is None) == (req.messages is None):
        raise APIError(400, "give exactly one of 'prompt' and 'messages'", param="prompt")
    if req.prompt is not None:
        if req.add_generation_prompt is not None:
            raise APIError(400, "'add_generation_prompt' goes with 'messages', not 'prompt'",
                           param="add_generation_prompt")
        if req.tools:
            raise APIError(400, "'tools' goes with 'messages', not 'prompt'", param="tools")
        ids = engine.tk.encode(req.prompt, add_special_tokens=req.add_special_tokens is not False)
    else:
        if req.add_special_tokens:  # the chat template writes the special tokens itself
            raise APIError(400, "'add_special_tokens' true is not supported with 'messages' (the chat template "
                                "adds the special tokens)", param="add_special_tokens")
        # tools as a chat request with tool_choice "auto" renders them, so count == its prompt_tokens
        # the adapter's own chat template when its folder has one, as the chat route renders it
        ids = chat_prompt(engine.chat_tokenizer(req.model or engine.base_name), req.messages,
                          tools.tool_spec(req.tools, None, None),
                          req.add_generation_prompt is not False)
    strs = [engine.tk.tk.id_to_token(i) for i in ids] if req.return_token_strs else None
    return {"count": len(ids), "max_model_len": engine.cfg.max_model_len, "tokens": ids, "token_strs": strs}


@router.post("/detokenize", openapi_extra=openapi(DetokenizeRequest))
async def detokenize(request: Request):
    who, body = owner(request), await json_body(request)
    req = parse(DetokenizeRequest, body)
    await _check_model(request, req.model, who)
    engine = ctx(request).engine
    vocab = engine.model.config.vocab_size
    bad = [t for t in req.tokens if not 0 <= t < vocab]
    if bad:
        raise APIError(400, f"tokens holds ids outside the vocabulary (0..{vocab - 1}): {bad[:5]}", param="tokens")
    # as vLLM: special tokens are kept, so detokenize(tokenize(x)) gives back what was tokenized
    return {"prompt": engine.tk.decode(req.tokens, skip_special_tokens=False)}

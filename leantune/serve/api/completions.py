"""`/v1/completions` and `/v1/chat/completions` (streaming too, as server-sent events): a request's `model`
names the base model or an adapter; the engine runs it and its events come back through a queue."""
from __future__ import annotations

import asyncio
import json
import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from ..requests import GenRequest
from . import logprobs as lp_shapes
from . import tools
from .common import APIError, ctx, json_body, model_not_found, owner, run
from .schemas import ChatCompletionRequest, CompletionRequest, openapi, parse

router = APIRouter()

_SEED_RANGE = (-(1 << 63), (1 << 64) - 1)  # what torch.Generator.manual_seed accepts


@router.post("/v1/completions", openapi_extra=openapi(CompletionRequest))
async def completions(request: Request):
    who, body = owner(request), await json_body(request)
    req = parse(CompletionRequest, body)
    engine = ctx(request).engine
    prompt = req.prompt
    if isinstance(prompt, list):
        if len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        elif not (prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)):
            raise APIError(400, "prompt must be a string, a list of one string, or a list of token ids",
                           param="prompt")
    ids = engine.tk.encode(prompt, req.add_special_tokens is not False) if isinstance(prompt, str) else list(prompt)
    if any(t < 0 or t >= engine.model.config.vocab_size for t in ids):
        raise APIError(400, "prompt holds token ids outside the vocabulary", param="prompt")
    greq = _sampling(req, ids, who, 16, engine.cfg.max_model_len, "prompt", req.logprobs)
    greq.processors += tools.processors(engine, *tools.guided_grammar(req))
    return await _generate(request, greq, "text", bool(req.stream), _include_usage(req))


@router.post("/v1/chat/completions", openapi_extra=openapi(ChatCompletionRequest))
async def chat(request: Request):
    who, body = owner(request), await json_body(request)
    req = parse(ChatCompletionRequest, body)
    engine = ctx(request).engine
    if req.add_special_tokens:  # the chat template writes the special tokens itself
        raise APIError(400, "'add_special_tokens' true is not supported for chat (the chat template adds the "
                            "special tokens)", param="add_special_tokens", code="unsupported_parameter")
    spec = tools.tool_spec(req.tools, req.tool_choice, req.parallel_tool_calls)
    grammar, grammar_param = tools.guided_grammar(req)
    grammar = grammar or tools.response_format_grammar(req.response_format)
    if grammar is not None and spec.active:
        raise APIError(400, f"{grammar_param} (JSON or guided output) cannot be combined with tools unless "
                            "tool_choice is 'none'", param=grammar_param, code="unsupported_parameter")
    if spec.forced:
        grammar, grammar_param = tools.forced_call_grammar(spec), "tools"  # a bad parameters schema
    ids = chat_prompt(engine.tk, req.messages, spec, req.add_generation_prompt is not False)  # vLLM's default
    greq = _sampling(req, ids, who, 256, engine.cfg.max_model_len, "messages", _chat_logprobs(req))
    greq.processors += tools.processors(engine, grammar, grammar_param)
    return tools.rewrite(await _generate(request, greq, "chat", bool(req.stream), _include_usage(req)), spec)


def _chat_logprobs(req) -> int | None:
    """How many top tokens per position a chat request wants logprobs of (None: no logprobs)."""
    k = req.top_logprobs
    if k is not None and not 0 <= k <= 20:
        raise APIError(400, f"top_logprobs must be an integer in 0..20, got {k}", param="top_logprobs")
    if not req.logprobs:
        if k:  # as OpenAI: top_logprobs asks for something only with logprobs on
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        return None
    return k or 0


def _sampling(req, prompt_ids: list[int], who: str, default_max: int, max_len: int,
              prompt_param: str, logprobs: int | None) -> GenRequest:
    """The GenRequest of a parsed body; the values the schema's types cannot check are checked here."""
    stop = req.stop if req.stop is not None else []
    stop = [stop] if isinstance(stop, str) else stop
    seed = req.seed
    if seed is not None and not _SEED_RANGE[0] <= seed <= _SEED_RANGE[1]:
        raise APIError(400, f"seed must be a 64-bit integer, got {seed}", param="seed")
    top_k = 0 if req.top_k is None or req.top_k == -1 else req.top_k  # vLLM: -1 and 0 both mean "all tokens"
    if top_k < 0:
        raise APIError(400, f"top_k must be -1, 0 or a positive integer, got {top_k}", param="top_k")
    mct = getattr(req, "max_completion_tokens", None)
    key = "max_completion_tokens" if mct is not None else "max_tokens"
    max_tokens = mct if mct is not None else req.max_tokens
    if max_tokens is not None and max_tokens < 1:
        raise APIError(400, f"{key} must be an integer >= 1, got {max_tokens}", param=key)
    room = max_len - len(prompt_ids)
    if room < 1 or (max_tokens is not None and max_tokens > room):
        asked = "" if max_tokens is None else f" + {key} {max_tokens}"
        raise APIError(400, f"this model's maximum context length is {max_len} tokens, but the request has "
                            f"{len(prompt_ids)} prompt tokens{asked}; shorten the prompt or lower {key}",
                       param=prompt_param if max_tokens is None or room < 1 else key, code="context_length_exceeded")
    if max_tokens is None:  # as vLLM: the default never asks for more than the context has room for
        max_tokens = min(default_max, room)
    try:
        return GenRequest(prompt_ids, req.model, who, max_tokens=max_tokens,
                          temperature=1.0 if req.temperature is None else float(req.temperature),
                          top_p=1.0 if req.top_p is None else float(req.top_p), stop=stop, seed=seed,
                          ignore_eos=bool(req.ignore_eos), top_k=top_k, logprobs=logprobs)
    except ValueError as e:
        raise APIError(400, str(e), param=_param_of(str(e))) from None


def _param_of(message: str) -> str | None:
    """The request parameter a GenRequest error names (its message starts with it)."""
    first = message.split(" ", 1)[0]
    return first if first in ("temperature", "top_p", "top_k", "stop", "logprobs") else None


# message fields OpenAI defines that leantune does not read: refused unless empty, since clients that send a
# response's message back as history (`message.model_dump()`) carry them as null
_MESSAGE_UNREAD = ("name", "tool_calls", "tool_call_id", "function_call", "refusal", "audio", "annotations")
_MESSAGE_READ = {"assistant": ("role", "content", "tool_calls"), "tool": ("role", "content", "tool_call_id")}


def chat_messages(msgs: list) -> list[dict]:
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "developer", "tool"):
            raise APIError(400, f"messages[{i}] must be an object with role system, user, assistant or tool",
                           param=f"messages[{i}].role")
        read = _MESSAGE_READ.get(m["role"], ("role", "content"))
        for k, v in m.items():
            if k in read or (k in _MESSAGE_UNREAD and v in (None, [], "")):
                continue
            unread = k in _MESSAGE_UNREAD
            what = f"is not supported by leantune yet (got {v!r})" if unread else "is not a message field"
            raise APIError(400, f"messages[{i}].{k} {what}", param=f"messages[{i}].{k}",
                           code="unsupported_parameter" if unread else "unknown_parameter")
        if m["role"] == "tool" or m.get("tool_calls"):
            out.append(tools.history_message(m, i))
            continue
        content = tools.message_text(m.get("content"), f"messages[{i}]")
        out.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
    if not out:
        raise APIError(400, "messages must not be empty", param="messages")
    return out


def chat_prompt(tk, msgs: list, spec: tools.ToolSpec, add_generation_prompt: bool) -> list[int]:
    """The prompt's token ids: the messages (and the tools the model may call) through the chat template."""
    messages = chat_messages(msgs)
    try:
        return tools.encode_prompt(tk, messages, spec, add_generation_prompt=add_generation_prompt)
    except APIError:
        raise
    except Exception as e:  # noqa: BLE001 - a chat template that refuses these messages
        raise APIError(400, f"the chat template rejected the messages: {e}", param="messages") from None


async def _submit(request: Request, greq: GenRequest, sink):
    try:
        return await run(request, ctx(request).engine.add_request, greq, sink)
    except KeyError:
        raise model_not_found(greq.model) from None
    except ValueError as e:
        raise APIError(400, str(e)) from None


async def _generate(request: Request, greq: GenRequest, kind: str, stream: bool, include_usage: bool):
    engine = ctx(request).engine
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    sid = await _submit(request, greq, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
    rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
    if stream:
        return StreamingResponse(_sse(engine, events, sid, rid, greq.model, kind, include_usage),
                                 media_type="text/event-stream")
    text, records, last = [], [], None
    while True:
        ev = await events.get()
        if "error" in ev:
            raise APIError(500, ev["error"], type="server_error")
        text.append(ev["text"])
        records += ev.get("logprobs", [])
        if ev["finish_reason"]:
            last = ev
            break
    engine.stats.complete(kind)
    lps = None if greq.logprobs is None else _shape(engine.tk, kind, records, 0)
    return _final(rid, greq.model, kind, "".join(text), last, lps)


def _shape(tk, kind: str, records: list[dict], offset: int) -> dict:
    return lp_shapes.chat(tk, records) if kind == "chat" else lp_shapes.completion(tk, records, offset)


async def _sse(engine, events, sid, rid, model_name, kind, include_usage):
    created, offset = int(time.time()), 0  # offset: the completion text's length so far (text_offset)
    try:
        if kind == "chat":
            yield _chunk(rid, model_name, kind, created, {"role": "assistant", "content": ""}, None)
        while True:
            ev = await events.get()
            if "error" in ev:
                yield f"data: {json.dumps({'error': {'message': ev['error'], 'type': 'server_error'}})}\n\n"
                break
            if ev["text"] or ev["finish_reason"]:
                delta = {"content": ev["text"]} if kind == "chat" else ev["text"]
                lps = _shape(engine.tk, kind, ev["logprobs"], offset) if "logprobs" in ev else None
                offset += len(ev["text"])
                yield _chunk(rid, model_name, kind, created, delta, ev["finish_reason"], lps)
            if ev["finish_reason"]:
                if include_usage:
                    yield "data: " + json.dumps({"id": rid, "object": _obj(kind, True), "created": created,
                                                  "model": model_name, "choices": [], "usage": _usage(ev)}) + "\n\n"
                break
        yield "data: [DONE]\n\n"
        engine.stats.complete(kind)
    finally:  # the client went away mid-stream (or we are done): free the request's slots
        engine.call(engine.abort, sid)


def _include_usage(req) -> bool:
    opts = req.stream_options or {}
    for k, v in opts.items():  # OpenAI's include_obfuscation only pads chunks against side channels: harmless off
        if k != "include_usage" and not (k == "include_obfuscation" and v is False):
            raise APIError(400, f"stream_options.{k} is not supported by leantune yet", param=f"stream_options.{k}",
                           code="unsupported_parameter")
    return bool(opts.get("include_usage"))


def _obj(kind: str, chunk: bool) -> str:
    if kind == "chat":
        return "chat.completion.chunk" if chunk else "chat.completion"
    return "text_completion"


def _usage(ev: dict) -> dict:
    p, c = ev["prompt_tokens"], ev["completion_tokens"]
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _chunk(rid, model_name, kind, created, delta, finish, lps=None) -> str:
    choice = {"index": 0, "finish_reason": finish, "logprobs": lps}
    if kind == "chat":
        choice["delta"] = delta
    else:
        choice["text"] = delta
    return "data: " + json.dumps({"id": rid, "object": _obj(kind, True), "created": created, "model": model_name,
                                  "choices": [choice]}) + "\n\n"


def _final(rid, model_name, kind, text, ev, lps) -> dict:
    choice = {"index": 0, "finish_reason": ev["finish_reason"], "logprobs": lps}
    if kind == "chat":
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    return {"id": rid, "object": _obj(kind, False), "created": int(time.time()), "model": model_name,
            "choices": [choice], "usage": _usage(ev)}

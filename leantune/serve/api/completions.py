"""`/v1/completions` and `/v1/chat/completions` (streaming too, as server-sent events): a request's `model`
names the base model or an adapter; the engine runs it and its events come back through a queue."""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass
from functools import partial

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from .. import penalties
from ..requests import GenRequest
from . import logprobs as lp_shapes
from . import tools
from .common import APIError, ctx, json_body, model_not_found, owner, run
from .schemas import ChatCompletionRequest, CompletionRequest, openapi, parse

router = APIRouter()

_SEED_RANGE = (-(1 << 63), (1 << 64) - 1)  # what torch.Generator.manual_seed accepts
_DISCONNECT_POLL_S = 0.05  # how often a waiting non-streaming request checks its client is still there


@router.post("/v1/completions", openapi_extra=openapi(CompletionRequest))
async def completions(request: Request):
    who, body = owner(request), await json_body(request)
    req = parse(CompletionRequest, body)
    engine = ctx(request).engine
    prompts = _prompts(req.prompt, engine, req.add_special_tokens is not False)
    n, seqs = _choice_counts(req)
    echo = bool(req.echo)
    # echo + logprobs reports the prompt tokens' logprobs with the output's (OpenAI); prompt_logprobs is vLLM's own
    # field; one record list serves both, with the longer top list
    asked = [k for k in ((req.logprobs if echo else None), req.prompt_logprobs) if k is not None]
    k_prompt = max(asked) if asked else None
    greqs = [_sampling(req, ids, who, 16, engine.cfg.max_model_len, "prompt", req.logprobs, n=seqs,
                       prompt_logprobs=k_prompt, vocab=engine.model.config.vocab_size, eos=engine.tk.eos_ids)
             for ids, _ in prompts]
    grammar = tools.processors(engine, *tools.guided_grammar(req))
    for greq in greqs:
        greq.processors += grammar
    view = _View("text", n, echo, [text for _, text in prompts], req.logprobs, req.prompt_logprobs)
    return await _generate(request, greqs, view, bool(req.stream), _include_usage(req))


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
    # the adapter's own chat template when its folder has one (serve --max-loras' chat_tokenizer)
    ids = chat_prompt(engine.chat_tokenizer(req.model), req.messages, spec,
                      req.add_generation_prompt is not False)  # vLLM's default: true
    n, seqs = _choice_counts(req)
    greq = _sampling(req, ids, who, 256, engine.cfg.max_model_len, "messages", _chat_logprobs(req), n=seqs,
                     prompt_logprobs=req.prompt_logprobs, vocab=engine.model.config.vocab_size, eos=engine.tk.eos_ids)
    greq.processors += tools.processors(engine, grammar, grammar_param)
    view = _View("chat", n, False, [None], greq.logprobs, req.prompt_logprobs)
    return tools.rewrite(await _generate(request, [greq], view, bool(req.stream), _include_usage(req)), spec)


def _prompts(prompt, engine, add_special: bool) -> list[tuple[list[int], str | None]]:
    """OpenAI's four prompt forms (a string, strings, token ids, lists of token ids) -> (ids, text) per prompt;
    text is None for a prompt sent as ids."""
    if isinstance(prompt, str) or (prompt and all(isinstance(t, int) for t in prompt)):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "prompt must not be an empty list", param="prompt")
    out = []
    for i, p in enumerate(prompt):
        ids = engine.tk.encode(p, add_special) if isinstance(p, str) else list(p)
        if not ids:
            raise APIError(400, f"prompt {i} is empty: send at least one token", param="prompt")
        if any(t < 0 or t >= engine.model.config.vocab_size for t in ids):
            raise APIError(400, f"prompt {i} holds token ids outside the vocabulary", param="prompt")
        out.append((ids, p if isinstance(p, str) else None))
    return out


def _choice_counts(req) -> tuple[int, int]:
    """(n, sequences to sample): best_of samples best_of and returns the n with the highest cumulative logprob."""
    n = 1 if req.n is None else req.n
    best_of = getattr(req, "best_of", None)
    seqs = n if best_of is None else best_of
    if not 1 <= n <= 128:
        raise APIError(400, f"n must be an integer in 1..128, got {n}", param="n")
    if not n <= seqs <= 128:
        raise APIError(400, f"best_of must be an integer in n..128 (n={n}), got {best_of}", param="best_of")
    if seqs > n and req.stream:  # as OpenAI: the best ones are known only at the end
        raise APIError(400, "best_of > n cannot be streamed; leave stream out or send best_of=n", param="best_of")
    return n, seqs


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


def _sampling(req, prompt_ids: list[int], who: str, default_max: int, max_len: int, prompt_param: str,
              logprobs: int | None, n: int = 1, prompt_logprobs: int | None = None, vocab: int = 0,
              eos: frozenset | set = frozenset()) -> GenRequest:
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
    least = 0 if prompt_logprobs is not None else 1  # 0: score the prompt only (echo or prompt_logprobs)
    if max_tokens is not None and max_tokens < least:
        raise APIError(400, f"{key} must be an integer >= 1 (0 only with echo and logprobs, or prompt_logprobs), "
                            f"got {max_tokens}", param=key)
    room = max_len - len(prompt_ids)
    if room < 1 or (max_tokens is not None and max_tokens > room):
        asked = "" if max_tokens is None else f" + {key} {max_tokens}"
        raise APIError(400, f"this model's maximum context length is {max_len} tokens, but the request has "
                            f"{len(prompt_ids)} prompt tokens{asked}; shorten the prompt or lower {key}",
                       param=prompt_param if max_tokens is None or room < 1 else key, code="context_length_exceeded")
    if max_tokens is None:  # as vLLM: the default never asks for more than the context has room for
        max_tokens = min(default_max, room)
    temperature = 1.0 if req.temperature is None else float(req.temperature)
    stop_ids = _token_ids(req.stop_token_ids, vocab, "stop_token_ids")
    try:
        return GenRequest(prompt_ids, req.model, who, max_tokens=max_tokens, temperature=temperature,
                          top_p=1.0 if req.top_p is None else float(req.top_p), stop=stop, seed=seed,
                          ignore_eos=bool(req.ignore_eos), top_k=top_k, logprobs=logprobs,
                          prompt_logprobs=prompt_logprobs, n=n, rank_by_logprob=n > (1 if req.n is None else req.n),
                          stop_token_ids=stop_ids,
                          processors=_processors(req, prompt_ids, vocab, temperature, set(stop_ids) | set(eos)))
    except ValueError as e:
        raise APIError(400, str(e), param=_param_of(str(e))) from None


def _token_ids(ids: list[int] | None, vocab: int, param: str) -> list[int]:
    if ids and any(not 0 <= t < vocab for t in ids):
        raise APIError(400, f"{param} holds token ids outside the vocabulary (0..{vocab - 1})", param=param)
    return list(ids or [])


def _processors(req, prompt_ids: list[int], vocab: int, temperature: float, end_ids: set[int]) -> list:
    """LogitsProcessor factories (serve/penalties.py) for the penalties, logit_bias, min_tokens and min_p."""
    out = []
    pres, freq, rep = req.presence_penalty or 0.0, req.frequency_penalty or 0.0, req.repetition_penalty
    for name, v, lo, hi in (("presence_penalty", pres, -2, 2), ("frequency_penalty", freq, -2, 2)):
        if not lo <= v <= hi:
            raise APIError(400, f"{name} must be between {lo} and {hi}, got {v}", param=name)
    if rep is not None and not 0 < rep <= 10:  # vLLM's range: (0, inf); past 10 nothing differs but the sampling
        raise APIError(400, f"repetition_penalty must be in (0, 10], got {rep}", param="repetition_penalty")
    if pres or freq or rep not in (None, 1):
        out.append(partial(penalties.Penalties, prompt_ids, vocab, pres, freq, 1.0 if rep is None else rep))
    if req.logit_bias:
        out.append(partial(penalties.LogitBias, _logit_bias(req.logit_bias, vocab), vocab))
    if req.min_tokens:
        if req.min_tokens < 0:
            raise APIError(400, f"min_tokens must be >= 0, got {req.min_tokens}", param="min_tokens")
        out.append(partial(penalties.MinTokens, req.min_tokens, end_ids))
    if req.min_p:
        if not 0 <= req.min_p <= 1:
            raise APIError(400, f"min_p must be in [0, 1], got {req.min_p}", param="min_p")
        if temperature > 0:  # greedy keeps the likeliest token, which min_p never drops
            out.append(partial(penalties.MinP, req.min_p, temperature))
    return out


def _logit_bias(bias: dict[str, float], vocab: int) -> dict[int, float]:
    """OpenAI's shape: token ids as strings -> a bias in [-100, 100]."""
    out = {}
    for k, v in bias.items():
        if not (k.isascii() and k.isdigit() and int(k) < vocab):
            raise APIError(400, f"logit_bias keys must be token ids in 0..{vocab - 1}, got {k!r}", param="logit_bias")
        if not -100 <= v <= 100:
            raise APIError(400, f"logit_bias values must be in [-100, 100], got {v} for {k}", param="logit_bias")
        out[int(k)] = float(v)
    return out


def _param_of(message: str) -> str | None:
    """The request parameter a GenRequest error names (its message starts with it)."""
    first = message.split(" ", 1)[0]
    return first if first in ("temperature", "top_p", "top_k", "stop", "logprobs", "prompt_logprobs", "n") else None


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


@dataclass
class _View:
    """How a request's events become choices: endpoint kind, choices per prompt, echo and what logprobs to show."""

    kind: str  # "text" or "chat"
    n: int  # choices per prompt returned
    echo: bool
    texts: list[str | None]  # each prompt as sent (None: as token ids; echo decodes them)
    logprobs: int | None  # top tokens per position in `logprobs` (None: no logprobs)
    prompt_logprobs: int | None  # vLLM's prompt_logprobs (None: not asked)


async def _submit(request: Request, greqs: list[GenRequest], sinks) -> list[str]:
    """Queue every prompt's GenRequest; when one is refused, those queued before it are aborted."""
    engine, rids = ctx(request).engine, []
    try:
        for greq, sink in zip(greqs, sinks):
            rids.append(await run(request, engine.add_request, greq, sink))
    except (KeyError, ValueError) as e:
        for rid in rids:
            engine.call(engine.abort, rid)
        if isinstance(e, KeyError):
            raise model_not_found(greqs[0].model) from None
        raise APIError(400, str(e)) from None
    return rids


async def _generate(request: Request, greqs: list[GenRequest], view: _View, stream: bool, include_usage: bool):
    engine = ctx(request).engine
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    # events come tagged with their prompt's number: choice index = prompt * n + the sequence's rank
    rids = await _submit(request, greqs, [lambda ev, p=p: loop.call_soon_threadsafe(events.put_nowait, (p, ev))
                                          for p in range(len(greqs))])
    rid = ("chatcmpl-" if view.kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
    if stream:
        return StreamingResponse(_sse(engine, events, rids, rid, greqs, view, include_usage),
                                 media_type="text/event-stream")
    seqs: dict[tuple[int, int], dict] = {}
    left = sum(g.n for g in greqs)
    watch = _ClientWatch(request, engine, rids)
    while left:
        p, ev = await watch.next(events)
        if "error" in ev:  # the engine failed: it has dropped every request
            raise APIError(500, ev["error"], type="server_error")
        s = seqs.setdefault((p, ev["index"]), {"text": [], "lps": [], "prompt": None})
        s["text"].append(ev["text"])
        s["lps"] += ev.get("logprobs", [])
        s["prompt"] = ev.get("prompt_logprobs", s["prompt"])
        if ev["finish_reason"]:
            s["last"] = ev
            left -= 1
    engine.stats.complete(view.kind)
    choices, plps = [], None
    for p, g in enumerate(greqs):
        ranked = [seqs[(p, i)] for i in range(g.n)]
        if g.rank_by_logprob:  # best_of: the n with the highest cumulative logprob
            ranked.sort(key=lambda s: -s["last"]["cumulative_logprob"])
        for s in ranked[:view.n]:
            choices.append(_choice(engine.tk, view, g, p, len(choices), s))
        plps = ranked[0]["prompt"]
    out = {"id": rid, "object": _obj(view.kind, False), "created": int(time.time()), "model": greqs[0].model,
           "choices": choices, "usage": _usage(greqs, [s["last"] for s in seqs.values()])}
    if view.kind == "chat" and view.prompt_logprobs is not None:  # vLLM: chat's prompt_logprobs are top-level
        out["prompt_logprobs"] = lp_shapes.prompt_logprobs(engine.tk, greqs[0].prompt_ids, plps, view.prompt_logprobs)
    return out


def _echo_text(tk, view: _View, g: GenRequest, p: int) -> str:
    text = view.texts[p]
    return text if text is not None else tk.decode(g.prompt_ids, skip_special_tokens=False)


class _ClientWatch:
    """The events of a non-streaming request (engine ids `rids`: one per prompt), read while watching its client:
    if the client disconnects while we wait (or this task is cancelled), the engine aborts the requests, freeing
    their KV blocks at once, and a 499 is raised (nobody reads it).

    A non-streaming response sends nothing until the request is done, so nothing else notices the client leaving
    (a streaming response does: Starlette cancels the stream, whose `finally` aborts). The disconnect is polled
    every `_DISCONNECT_POLL_S`, not per event: a decoding request yields an event per token, and Starlette's
    `is_disconnected` reads the ASGI receive channel (without blocking) each time it is asked."""

    def __init__(self, request: Request, engine, rids: list[str]):
        self.request, self.engine, self.rids = request, engine, rids
        self.loop = asyncio.get_running_loop()
        self.due = self.loop.time() + _DISCONNECT_POLL_S  # when the client is next checked

    async def next(self, events: asyncio.Queue):
        get = asyncio.ensure_future(events.get())
        try:
            while True:
                if self.loop.time() >= self.due:
                    if await self.request.is_disconnected():
                        raise APIError(499, "the client closed the request")
                    self.due = self.loop.time() + _DISCONNECT_POLL_S
                done, _ = await asyncio.wait({get}, timeout=max(0.0, self.due - self.loop.time()))
                if done:
                    return get.result()
        except BaseException:
            for rid in self.rids:
                self.engine.call(self.engine.abort, rid)
            raise
        finally:
            get.cancel()  # a no-op once it is done; an unfinished get leaves no event lost in the queue


def _logprobs(tk, view: _View, g: GenRequest, records: list[dict], offset: int, prompt_records: list | None):
    """A choice's (or chunk's) logprobs object; with echo, `prompt_records` (the prompt's, first chunk only) lead."""
    if view.kind == "chat":
        return lp_shapes.chat(tk, records)
    if view.echo and prompt_records is not None:
        return lp_shapes.completion(tk, records, offset, g.prompt_ids, prompt_records, view.logprobs)
    return lp_shapes.completion(tk, records, offset)


def _choice(tk, view: _View, g: GenRequest, p: int, index: int, s: dict) -> dict:
    text = "".join(s["text"])
    lps = None
    if view.logprobs is not None:
        lps = _logprobs(tk, view, g, s["lps"], 0, s["prompt"] if view.echo else None)
    choice = {"index": index, "finish_reason": s["last"]["finish_reason"], "logprobs": lps}
    if view.kind == "chat":
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = (_echo_text(tk, view, g, p) if view.echo else "") + text
        if view.prompt_logprobs is not None:
            choice["prompt_logprobs"] = lp_shapes.prompt_logprobs(tk, g.prompt_ids, s["prompt"], view.prompt_logprobs)
    return choice


async def _sse(engine, events, rids, rid, greqs, view: _View, include_usage):
    created = int(time.time())
    offsets: dict[int, int] = {}  # choice index -> its text's length so far (text_offset)
    finals, left = [], sum(g.n for g in greqs)
    model_name, kind = greqs[0].model, view.kind
    try:
        if kind == "chat":
            for i in range(view.n):
                yield _chunk(rid, model_name, kind, created, {"role": "assistant", "content": ""}, None, index=i)
        while left:
            p, ev = await events.get()
            if "error" in ev:
                yield f"data: {json.dumps({'error': {'message': ev['error'], 'type': 'server_error'}})}\n\n"
                break
            g, index = greqs[p], p * view.n + ev["index"]
            text, first = ev["text"], index not in offsets
            if first and view.echo:  # the echoed prompt leads the choice's first chunk (vLLM)
                text = _echo_text(engine.tk, view, g, p) + text
            if text or ev["finish_reason"] or first:
                delta = {"content": text} if kind == "chat" else text
                lps = None
                if "logprobs" in ev:
                    lps = _logprobs(engine.tk, view, g, ev["logprobs"], offsets.get(index, 0),
                                    ev.get("prompt_logprobs") if view.echo else None)
                    offsets[index] = (lps["text_offset"][-1] + len(lps["tokens"][-1]) if kind == "text"
                                      and lps["tokens"] else offsets.get(index, 0))
                else:
                    offsets[index] = offsets.get(index, 0) + len(text)
                extra = {}
                if kind == "text" and view.prompt_logprobs is not None and "prompt_logprobs" in ev:
                    extra["prompt_logprobs"] = lp_shapes.prompt_logprobs(engine.tk, g.prompt_ids,
                                                                        ev["prompt_logprobs"], view.prompt_logprobs)
                yield _chunk(rid, model_name, kind, created, delta, ev["finish_reason"], lps, index, extra)
            if ev["finish_reason"]:
                finals.append(ev)
                left -= 1
        if include_usage and not left:
            yield "data: " + json.dumps({"id": rid, "object": _obj(kind, True), "created": created,
                                          "model": model_name, "choices": [], "usage": _usage(greqs, finals)}) + "\n\n"
        yield "data: [DONE]\n\n"
        if not left:
            engine.stats.complete(kind)
    finally:  # the client went away mid-stream (or we are done): free the request's slots
        for r in rids:
            engine.call(engine.abort, r)


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


def _usage(greqs: list[GenRequest], finals: list[dict]) -> dict:
    """Each prompt once, and every sequence sampled (best_of's discarded ones too: they were generated)."""
    p = sum(len(g.prompt_ids) for g in greqs)
    c = sum(ev["completion_tokens"] for ev in finals)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _chunk(rid, model_name, kind, created, delta, finish, lps=None, index=0, extra=None) -> str:
    choice = {"index": index, "finish_reason": finish, "logprobs": lps, **(extra or {})}
    if kind == "chat":
        choice["delta"] = delta
    else:
        choice["text"] = delta
    return "data: " + json.dumps({"id": rid, "object": _obj(kind, True), "created": created, "model": model_name,
                                  "choices": [choice]}) + "\n\n"

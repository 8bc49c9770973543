"""Request bodies of `/v1/completions` and `/v1/chat/completions` as pydantic models: every field of OpenAI's
API reference (Create completion, Create chat completion) plus the vLLM extras that clients send, so a request
is checked field by field and `/docs` shows what the server reads.

Each field is one of three kinds:

- supported: the engine acts on it;
- accepted without effect on the output, as at OpenAI (`user`, `safety_identifier`, `prompt_cache_key`,
  `prompt_cache_retention`: identifiers for abuse monitoring and cache bucketing);
- not supported yet (`UNSUPPORTED`): a 400 naming it, unless its value is the neutral one (null, or the value
  that asks for nothing, e.g. `tools: []`, `suffix: ""`), because clients such as
  LangChain send those defaults on every call and they change nothing leantune would have to do. An endpoint
  that reads one of them after all lists it in its `SUPPORTS` (completions' `echo`; vLLM's chat `echo` is not).

A field that neither OpenAI nor vLLM defines is a 400 "Unrecognized request argument supplied" (extra="forbid").
Models are strict (no "5" for 5, no true for 1) and flat (nested objects typed as dicts and checked by the
routes), so their JSON schema needs no $defs and goes into the OpenAPI document as it is.
"""
from __future__ import annotations

import json
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .common import APIError

_NOT_YET = "is not supported by leantune yet"


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    SUPPORTS: ClassVar[frozenset] = frozenset()

    # -- supported, shared by both endpoints -----------------------------------------------------------
    model: str = Field(description="the base model's name or an adapter's (see /v1/models)")
    max_tokens: int | None = Field(None, description="most tokens to generate (>= 1; default: what fits the "
                                                     "context, at most 16 for completions and 256 for chat)")
    temperature: float | None = Field(None, description="0..2; 0 is greedy")
    top_p: float | None = Field(None, description="nucleus sampling, in (0, 1]")
    stop: str | list[str] | None = Field(None, description="up to 4 strings that end the text (not included)")
    seed: int | None = Field(None, description="64-bit seed: the same seed and settings give the same tokens")
    stream: bool | None = Field(None, description="server-sent events, one chunk per text delta")
    stream_options: dict[str, bool] | None = Field(None, description='{"include_usage": true} adds a last '
                                                                     "chunk with the usage")
    # -- accepted, no effect on the output (as at OpenAI) ---------------------------------------------------
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    n: int | None = Field(None, description="1..128 choices per prompt, sampled from one prefill of the prompt "
                                            "(its KV blocks are shared); with a seed, choice i uses seed + i")
    presence_penalty: float | None = Field(None, description="-2..2, subtracted from the logit of every token "
                                                             "the output holds already")
    frequency_penalty: float | None = Field(None, description="-2..2, times each token's count in the output so "
                                                              "far, subtracted from its logit")
    logit_bias: dict[str, float] | None = Field(None, description="token id (a string) -> -100..100 added to its "
                                                                  "logit")
    # -- vLLM's extras -------------------------------------------------------------------------------------
    top_k: int | None = Field(None, description="vLLM: sample among the k likeliest tokens; 0 or -1: all")
    ignore_eos: bool | None = Field(None, description="vLLM: keep generating past the end-of-sequence token")
    min_p: float | None = Field(None, description="vLLM: 0..1, drop tokens less likely than min_p times the "
                                                  "likeliest (after temperature)")
    repetition_penalty: float | None = Field(None, description="vLLM: (0, 10], divides positive and multiplies "
                                                               "negative logits of tokens in the prompt or output")
    min_tokens: int | None = Field(None, description="vLLM: no end-of-sequence or stop token before this many")
    stop_token_ids: list[int] | None = Field(None, description="vLLM: token ids that end the text like EOS (not "
                                                               "included)")
    include_stop_str_in_output: bool | None = Field(None, description="vLLM; not supported yet (only false)")
    skip_special_tokens: bool | None = Field(None, description="vLLM; not supported yet (only true)")
    spaces_between_special_tokens: bool | None = Field(None, description="vLLM; not supported yet (only true)")
    use_beam_search: bool | None = Field(None, description="vLLM; not supported (only false)")
    length_penalty: float | None = Field(None, description="vLLM; not supported yet (only 1)")
    truncate_prompt_tokens: int | None = Field(None, description="vLLM; not supported yet")
    prompt_logprobs: int | None = Field(None, description="vLLM: 0..20, each prompt token's logprob, rank and "
                                                          "the k likeliest (the first token's is null)")
    allowed_token_ids: list[int] | None = Field(None, description="vLLM; not supported yet")
    bad_words: list[str] | None = Field(None, description="vLLM; not supported yet")
    guided_json: Any = Field(None, description="vLLM: output JSON valid against this schema (an object or its "
                                               "JSON text), by grammar (extra leantune[structured])")
    guided_regex: str | None = Field(None, description="vLLM: output matching this regular expression")
    guided_choice: list[str] | None = Field(None, description="vLLM: output exactly one of these strings")
    guided_grammar: str | None = Field(None, description="vLLM; not supported yet")
    structured_outputs: dict[str, Any] | None = Field(None, description='vLLM: {"json": schema}, {"regex": ...}, '
                                                                        '{"choice": [...]} or {"json_object": true}')
    priority: int | None = Field(None, description="vLLM; not supported yet (only 0)")
    request_id: str | None = Field(None, description="vLLM; not supported yet")
    return_tokens_as_token_ids: bool | None = Field(None, description="vLLM; not supported yet (only false)")
    logits_processors: list[Any] | None = Field(None, description="vLLM; not supported")
    add_special_tokens: bool | None = Field(None, description="vLLM: completions: add BOS etc. to a text prompt "
                                                              "(default true); chat: the template adds them, so "
                                                              "only false")


class CompletionRequest(_Body):
    """POST /v1/completions."""

    SUPPORTS: ClassVar[frozenset] = frozenset({"echo"})  # UNSUPPORTED fields this endpoint reads after all

    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="a string, a list of strings, a list of token ids or a list of token-id lists: several "
                    "prompts give n choices each, in prompt order")
    echo: bool | None = Field(None, description="the prompt leads the text; with logprobs, its tokens lead the "
                                                "logprobs (the first one's null); max_tokens 0 scores the prompt only")
    logprobs: int | None = Field(None, description="0..20: each output token's log-probability (the model's "
                                                   "log-softmax) and the k likeliest tokens' at its position")
    best_of: int | None = Field(None, description="n..128 sequences sampled, the n with the highest cumulative "
                                                  "logprob returned; not with stream")
    suffix: str | None = Field(None, description="not supported yet")


class ChatCompletionRequest(_Body):
    """POST /v1/chat/completions."""

    messages: list[Any] = Field(description="system/developer, user, assistant (with tool_calls) and tool messages "
                                           "with text content")
    max_completion_tokens: int | None = Field(None, description="as max_tokens (wins if both are given)")
    add_generation_prompt: bool | None = Field(None, description="vLLM: end the prompt with the assistant "
                                                                 "turn's opening (default true)")
    logprobs: bool | None = Field(None, description="each output token's log-probability (the model's "
                                                    "log-softmax of its logits)")
    top_logprobs: int | None = Field(None, description="0..20 likeliest tokens per position, with logprobs")
    response_format: dict[str, Any] | None = Field(None, description='{"type": "text"}, {"type": "json_object"} or '
                                                                     '{"type": "json_schema", "json_schema": {"name", '
                                                                     '"schema", "strict"}}: JSON by grammar-'
                                                                     "constrained decoding (extra leantune[structured])")
    tools: list[Any] | None = Field(None, description='functions the model may call: [{"type": "function", '
                                                      '"function": {"name", "description", "parameters"}}]')
    tool_choice: str | dict[str, Any] | None = Field(None, description='"auto", "none", "required" or {"type": '
                                                                       '"function", "function": {"name"}}; a forced '
                                                                       "call is one call, held to its parameters "
                                                                       "by grammar (extra leantune[structured])")
    parallel_tool_calls: bool | None = Field(None, description='false: at most one call (a forced call is one '
                                                               "call either way)")
    functions: list[Any] | None = Field(None, description="deprecated by OpenAI; not supported (only [])")
    function_call: str | dict[str, Any] | None = Field(None, description='not supported (only "none")')
    store: bool | None = Field(None, description="not supported (nothing is stored; only false)")
    metadata: dict[str, str] | None = Field(None, description="not supported (only with store)")
    service_tier: str | None = Field(None, description='only "auto" or "default"')
    modalities: list[str] | None = Field(None, description='only ["text"]')
    audio: dict[str, Any] | None = Field(None, description="not supported")
    prediction: dict[str, Any] | None = Field(None, description="not supported yet")
    reasoning_effort: str | None = Field(None, description="not supported")
    verbosity: str | None = Field(None, description="not supported")
    web_search_options: dict[str, Any] | None = Field(None, description="not supported")
    continue_final_message: bool | None = Field(None, description="vLLM; not supported yet (only false)")
    chat_template: str | None = Field(None, description="vLLM; not supported yet")
    chat_template_kwargs: dict[str, Any] | None = Field(None, description="vLLM; not supported yet")
    documents: list[Any] | None = Field(None, description="vLLM; not supported yet")
    echo: bool | None = Field(None, description="vLLM; not supported yet (only false)")


# field -> the values that ask for nothing (null always does): anything else is refused as not supported yet
UNSUPPORTED: dict[str, tuple] = {
    "echo": (False,),  # completions read it (CompletionRequest.SUPPORTS); vLLM's chat echo does not
    "suffix": ("",),
    "functions": ([],), "function_call": ("none",), "store": (False,), "metadata": ({},),
    "service_tier": ("auto", "default"), "modalities": (["text"],), "audio": (), "prediction": (),
    "reasoning_effort": (), "verbosity": (), "web_search_options": (),
    "include_stop_str_in_output": (False,), "skip_special_tokens": (True,), "spaces_between_special_tokens": (True,),
    "use_beam_search": (False,), "length_penalty": (1,), "truncate_prompt_tokens": (),
    "allowed_token_ids": (), "bad_words": ([],), "guided_grammar": (), "priority": (0,), "request_id": (),
    "return_tokens_as_token_ids": (False,), "logits_processors": ([],),
    "continue_final_message": (False,), "chat_template": (), "chat_template_kwargs": ({},), "documents": ([],),
}


def parse(model: type[BaseModel], body: dict) -> BaseModel:
    """`body` as `model`, or the first problem as a 400 in OpenAI's shape naming the parameter."""
    try:
        req = model.model_validate(body)
    except ValidationError as e:
        # a wrong type or a missing field says more than an unknown one: report those first
        errs = sorted(e.errors(), key=lambda x: x["type"] == "extra_forbidden")
        raise _error(errs[0], body) from None
    for name in sorted(req.model_fields_set):
        v = getattr(req, name)
        refused = name in UNSUPPORTED and name not in getattr(model, "SUPPORTS", ())
        if refused and v is not None and not any(_same(v, ok) for ok in UNSUPPORTED[name]):
            oks = " or ".join(f"{name}={json.dumps(ok)}" for ok in UNSUPPORTED[name])
            raise APIError(400, f"'{name}' {_NOT_YET} (got {json.dumps(v)}); leave it out"
                                + (f" or send {oks}" if oks else ""), param=name, code="unsupported_parameter")
    return req


def _same(v, ok) -> bool:
    # the neutral value's type too (True == 1 and 0 == False in Python); an int equal to a float neutral counts
    return type(v) is type(ok) and v == ok or (isinstance(v, float) and type(ok) is int and v == ok)


def _error(err: dict, body: dict) -> APIError:
    name = str(err["loc"][0]) if err["loc"] else None
    if err["type"] == "extra_forbidden":
        return APIError(400, f"Unrecognized request argument supplied: {name}", param=name, code="unknown_parameter")
    if err["type"] == "missing":
        return APIError(400, f"missing required parameter '{name}'", param=name, code="missing_required_parameter")
    got = type(body.get(name)).__name__ if isinstance(body, dict) else "?"
    return APIError(400, f"'{name}' has the wrong type ({got})", param=name, code="invalid_type")


def openapi(model: type[_Body]) -> dict:
    """The route's `openapi_extra`: the model as its JSON request body (routes parse the body themselves, after
    the API key is checked, so FastAPI does not see the model in their signatures)."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


__all__ = ["ChatCompletionRequest", "CompletionRequest", "UNSUPPORTED", "openapi", "parse"]

"""Structured output and tool calling on `/v1/chat/completions`: `response_format` (JSON mode, JSON Schema),
`tools` + `tool_choice`, tool-call history in `messages`, and tool calls parsed out of the generated text.

Tool calls are written in the Hermes format that Qwen2.5's and SmolLM3's chat templates use:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

A chat template that reads the `tools` variable gets the tools (and history messages in transformers'
shape) as transformers' `apply_chat_template(tools=...)` passes them. A template that does not (SmolLM2's,
plain ChatML) gets the fallback below, written once here: the tool list in the system prompt, assistant tool
calls as `<tool_call>` blocks and tool results as `<tool_response>` user turns, Qwen2.5's wording.
`tool_choice` "required" or a named function forces exactly one call by grammar (serve/grammar.py), its
arguments valid against the function's `parameters`; "auto" parses whatever calls the model writes.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

from fastapi.responses import StreamingResponse

from .. import grammar as G
from .common import APIError

_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")  # OpenAI's rule for function and schema names
_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)
_EMPTY_PARAMS = {"type": "object", "properties": {}}


@dataclass
class ToolSpec:
    """A request's tools as the route uses them."""

    functions: list[dict] = field(default_factory=list)  # OpenAI's {"name", "description", "parameters"}
    choice: str = "auto"  # "auto", "none", "required", or the name of the function to call
    parallel: bool = True  # False: at most one call is returned (later <tool_call> blocks stay text)

    @property
    def active(self) -> bool:
        """Whether the model sees the tools and its output is parsed for calls."""
        return bool(self.functions) and self.choice != "none"

    @property
    def forced(self) -> bool:
        return self.active and self.choice != "auto"


def tool_spec(tools: list | None, tool_choice, parallel_tool_calls: bool | None) -> ToolSpec:
    """The request's `tools`, `tool_choice` and `parallel_tool_calls`, checked."""
    functions = [_function(t, i) for i, t in enumerate(tools or [])]
    names = [f["name"] for f in functions]
    if len(set(names)) != len(names):
        raise APIError(400, "tools: function names must be unique", param="tools")
    choice = "auto" if functions else "none"  # OpenAI's defaults
    if isinstance(tool_choice, str):
        if tool_choice not in ("auto", "none", "required"):
            raise APIError(400, f"tool_choice must be 'auto', 'none', 'required' or a function, got {tool_choice!r}",
                           param="tool_choice")
        choice = tool_choice
    elif isinstance(tool_choice, dict):
        name = (tool_choice.get("function") or {}).get("name") if tool_choice.get("type") == "function" else None
        if not isinstance(name, str):
            raise APIError(400, 'tool_choice as an object must be {"type": "function", "function": {"name": ...}}',
                           param="tool_choice")
        choice = name
    if choice not in ("auto", "none") and choice != "required" and choice not in names:
        raise APIError(400, f"tool_choice names function {choice!r}, which is not in tools", param="tool_choice")
    if choice == "required" and not functions:
        raise APIError(400, "tool_choice 'required' needs tools", param="tool_choice")
    return ToolSpec(functions, choice, parallel_tool_calls is not False)  # a forced call is one call anyway


def _function(t, i: int) -> dict:
    where = f"tools[{i}]"
    if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(t.get("function"), dict):
        raise APIError(400, f'{where} must be {{"type": "function", "function": {{...}}}}', param=where)
    f = t["function"]
    unknown = set(f) - {"name", "description", "parameters", "strict"}
    if unknown:
        raise APIError(400, f"{where}.function.{sorted(unknown)[0]} is not a function field", param=where)
    if not isinstance(f.get("name"), str) or not _NAME.match(f["name"]):
        raise APIError(400, f"{where}.function.name must be 1-64 letters, digits, _ or -", param=where)
    params = f.get("parameters", _EMPTY_PARAMS)
    if not isinstance(params, dict):
        raise APIError(400, f"{where}.function.parameters must be a JSON schema object", param=where)
    return {"name": f["name"], "description": f.get("description") or "", "parameters": params}


# -- response_format ----------------------------------------------------------------------------------------

def response_format_grammar(rf: dict | None) -> str | None:
    """The grammar text `response_format` asks for (None: free text)."""
    if rf is None or rf == {"type": "text"}:
        return None
    kind = rf.get("type")
    if kind == "json_object" and set(rf) == {"type"}:
        return _grammar(lambda: G.json_schema_grammar({"type": "object"}), "response_format")
    if kind != "json_schema":
        raise APIError(400, "response_format must be {\"type\": \"text\"}, {\"type\": \"json_object\"} or "
                            "{\"type\": \"json_schema\", \"json_schema\": {...}}", param="response_format")
    js = rf.get("json_schema")
    if set(rf) != {"type", "json_schema"} or not isinstance(js, dict):
        raise APIError(400, "response_format json_schema needs a json_schema object", param="response_format")
    if set(js) - {"name", "description", "schema", "strict"} or not isinstance(js.get("name"), str) \
            or not _NAME.match(js["name"]) or not isinstance(js.get("schema"), dict):
        raise APIError(400, "response_format.json_schema needs name (1-64 letters, digits, _ or -) and schema "
                            "(an object); description and strict are optional", param="response_format")
    # strict or not, the output is held to the schema: the grammar is the schema
    return _grammar(lambda: G.json_schema_grammar(js["schema"]), "response_format")


_GUIDED = ("guided_json", "guided_regex", "guided_choice", "structured_outputs")
_OUTPUTS_KEYS = {"json": "guided_json", "regex": "guided_regex", "choice": "guided_choice"}


def guided_grammar(req) -> tuple[str | None, str]:
    """(grammar text or None, the parameter it came from) of vLLM's guided_json / guided_regex / guided_choice
    or structured_outputs {"json" | "regex" | "choice" | "json_object"}, on either endpoint."""
    given = [k for k in _GUIDED if getattr(req, k, None) is not None]
    if len(given) > 1 or (given and getattr(req, "response_format", None) not in (None, {"type": "text"})):
        raise APIError(400, f"give one of response_format, {', '.join(_GUIDED)}", param=given[-1])
    if not given:
        return None, "response_format"
    param, value = given[0], getattr(req, given[0])
    if param == "structured_outputs":
        keys = [k for k, v in value.items() if v not in (None, False)]
        if len(keys) != 1 or keys[0] not in (*_OUTPUTS_KEYS, "json_object"):
            raise APIError(400, "structured_outputs must set exactly one of json, regex, choice, json_object",
                           param=param)
        param, value = (_OUTPUTS_KEYS.get(keys[0], "guided_json"),
                        {"type": "object"} if keys[0] == "json_object" else value[keys[0]])
    try:
        if param == "guided_json":
            schema = json.loads(value) if isinstance(value, str) else value
            if not isinstance(schema, dict):
                raise G.GrammarError("a JSON schema is an object")
            return G.json_schema_grammar(schema), given[0]
        if param == "guided_choice":
            if not value or not all(isinstance(c, str) for c in value):
                raise G.GrammarError("a non-empty list of strings is needed")
            return G.regex_grammar("|".join(f"({re.escape(c)})" for c in value)), given[0]
        if not isinstance(value, str):
            raise G.GrammarError("a regular expression string is needed")
        return G.regex_grammar(value), given[0]
    except (G.GrammarError, json.JSONDecodeError) as e:
        raise APIError(400, f"{given[0]}: {e}", param=given[0]) from None


def _grammar(make, param: str) -> str:
    try:
        return make()
    except G.GrammarError as e:
        raise APIError(400, f"{param}: {e}", param=param) from None


def processors(engine, grammar: str | None, param: str) -> list:
    """The request's grammar as a GenRequest processor factory, compiled now (a bad schema is a 400 naming
    `param`; the cache makes a repeated schema free)."""
    if grammar is None:
        return []
    return [_grammar(lambda: G.compile_grammar(engine.tk, engine.model.config.vocab_size, grammar), param)]


def forced_call_grammar(spec: ToolSpec) -> str:
    """One `<tool_call>` block whose JSON names one of the allowed functions with arguments valid against its
    parameters (llguidance's Lark with an embedded %json schema)."""
    allowed = [f for f in spec.functions if spec.choice in ("required", f["name"])]
    variants = [{"type": "object", "properties": {"name": {"const": f["name"]}, "arguments": f["parameters"]},
                 "required": ["name", "arguments"], "additionalProperties": False} for f in allowed]
    schema = variants[0] if len(variants) == 1 else {"anyOf": variants}
    body = json.dumps({**schema, "x-guidance": G.JSON_STYLE})
    return _grammar(lambda: G.lark_grammar(f'start: "<tool_call>\\n" call "\\n</tool_call>"\ncall: %json {body}\n'),
                    "tools")


# -- prompt --------------------------------------------------------------------------------------------------

def history_message(m: dict, i: int) -> dict:
    """A `tool` message or an assistant message with `tool_calls`, in transformers' shape (arguments as a dict,
    as chat templates expect)."""
    where = f"messages[{i}]"
    if m["role"] == "tool":
        if not isinstance(m.get("tool_call_id"), str):
            raise APIError(400, f"{where}.tool_call_id must be a string", param=f"{where}.tool_call_id")
        return {"role": "tool", "tool_call_id": m["tool_call_id"], "content": message_text(m.get("content"), where)}
    calls = []
    for j, c in enumerate(m.get("tool_calls") or []):
        fn = c.get("function") if isinstance(c, dict) else None
        try:
            args = json.loads(fn["arguments"]) if isinstance(fn["arguments"], str) else fn["arguments"]
            assert isinstance(fn["name"], str) and isinstance(args, dict)
        except (TypeError, KeyError, AssertionError, json.JSONDecodeError):
            raise APIError(400, f"{where}.tool_calls[{j}] must be {{\"id\", \"type\": \"function\", \"function\": "
                                f"{{\"name\", \"arguments\": a JSON object as a string}}}}",
                           param=f"{where}.tool_calls") from None
        calls.append({"id": c.get("id"), "type": "function", "function": {"name": fn["name"], "arguments": args}})
    content = m.get("content")
    return {"role": "assistant", "content": "" if content is None else message_text(content, where), "tool_calls": calls}


def message_text(content, where: str) -> str:
    """A message's content as one string (OpenAI's text parts joined)."""
    if isinstance(content, list):
        if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
            raise APIError(400, f"{where}.content: only text parts are supported", param=f"{where}.content")
        content = "".join(p.get("text", "") for p in content)
    if not isinstance(content, str):
        raise APIError(400, f"{where}.content must be a string", param=f"{where}.content")
    return content


def knows_tools(tk) -> bool:
    """Whether the chat template renders the `tools` variable itself."""
    return bool(tk.chat_template) and re.search(r"\btools\b", tk.chat_template) is not None


def encode_prompt(tk, messages: list[dict], spec: ToolSpec, add_generation_prompt: bool) -> list[int]:
    """The prompt's token ids: through the template's own tool support, or the fallback rendering."""
    tools = [{"type": "function", "function": f} for f in spec.functions] if spec.active else None
    if knows_tools(tk):
        return tk.encode_chat(messages, add_generation_prompt=add_generation_prompt, tools=tools)
    return tk.encode_chat(_fallback(messages, tools), add_generation_prompt=add_generation_prompt)


def _fallback(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    out = []
    for m in messages:
        if m["role"] == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{m['content']}\n</tool_response>"})
        elif m.get("tool_calls"):
            blocks = [_block(c["function"]["name"], c["function"]["arguments"]) for c in m["tool_calls"]]
            out.append({"role": "assistant", "content": "\n".join(filter(None, [m["content"], *blocks]))})
        else:
            out.append(m)
    if not tools:
        return out
    listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    system = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
              "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
              f"{listing}\n</tools>\n\nFor each function call, return a json object with function name and "
              "arguments within <tool_call></tool_call> XML tags:\n"
              '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')
    if out and out[0]["role"] == "system":
        return [{"role": "system", "content": out[0]["content"] + "\n\n" + system}, *out[1:]]
    return [{"role": "system", "content": system}, *out]


def _block(name: str, arguments) -> str:
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False) + "\n</tool_call>"


# -- output --------------------------------------------------------------------------------------------------

def parse_calls(text: str, spec: ToolSpec) -> tuple[str | None, list[dict]]:
    """(the text outside tool-call blocks or None, OpenAI's tool_calls) of a generated message. A block that
    is not JSON naming one of the tools with object arguments stays in the text, as vLLM's Hermes parser does."""
    names = {f["name"] for f in spec.functions}
    calls, kept, pos = [], [], 0
    for m in _CALL.finditer(text):
        try:
            obj = json.loads(m.group(1))
            ok = isinstance(obj, dict) and obj.get("name") in names and isinstance(obj.get("arguments", {}), dict)
        except json.JSONDecodeError:
            ok = False
        if not ok or (calls and not spec.parallel):
            continue
        kept.append(text[pos:m.start()])
        pos = m.end()
        calls.append({"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
                      "function": {"name": obj["name"],
                                   "arguments": json.dumps(obj.get("arguments", {}), ensure_ascii=False)}})
    kept.append(text[pos:])
    content = "".join(kept).strip() if calls else text
    return (content or None) if calls else content, calls


def rewrite(response, spec: ToolSpec):
    """The chat route's response with tool calls parsed out of each choice's text: a dict (its message gets
    `tool_calls`) or a StreamingResponse (each choice's deltas are held back and sent, parsed, when it ends)."""
    if not spec.active:
        return response
    if isinstance(response, StreamingResponse):
        response.body_iterator = _rewrite_stream(response.body_iterator, spec)
        return response
    for choice in response["choices"]:
        content, calls = parse_calls(choice["message"]["content"], spec)
        if calls:
            choice["message"].update(content=content, tool_calls=calls)
            choice["finish_reason"] = "tool_calls" if choice["finish_reason"] == "stop" else choice["finish_reason"]
    return response


async def _rewrite_stream(chunks, spec: ToolSpec):
    held: dict[int, list[dict]] = {}  # choice index -> its chunks with content, not yet sent
    try:
        async for raw in chunks:
            event = _event(raw)
            choices = (event or {}).get("choices") or []
            if len(choices) != 1 or "delta" not in choices[0] or choices[0]["delta"].get("role"):
                yield raw  # the role chunk, usage, errors, [DONE]
                continue
            held.setdefault(choices[0]["index"], []).append(event)
            if choices[0]["finish_reason"]:
                for out in _release(held.pop(choices[0]["index"]), spec):
                    yield "data: " + json.dumps(out) + "\n\n"
    finally:
        await chunks.aclose()  # runs the route's own cleanup (frees the request when the client went away)


def _event(raw) -> dict | None:
    text = raw.decode() if isinstance(raw, bytes) else raw
    if not text.startswith("data: {"):
        return None
    return json.loads(text[6:])


def _release(events: list[dict], spec: ToolSpec) -> list[dict]:
    """One choice's held chunks as OpenAI streams a message with tool calls: the content (if any), then one
    delta per call with its id, name and whole arguments, then the finish_reason."""
    last = events[-1]
    choice = last["choices"][0]
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events)
    lps = [t for e in events for t in ((e["choices"][0].get("logprobs") or {}).get("content") or [])]
    content, calls = parse_calls(text, spec)
    if not calls:
        return _chunks(last, [({"content": text}, choice["finish_reason"], lps)])
    parts = [({"content": content}, None, lps)] if content else []
    parts += [({"tool_calls": [{"index": k, **c}]}, None, None) for k, c in enumerate(calls)]
    reason = "tool_calls" if choice["finish_reason"] == "stop" else choice["finish_reason"]
    return _chunks(last, parts + [({}, reason, None)])


def _chunks(last: dict, parts: list[tuple]) -> list[dict]:
    out = []
    for delta, reason, lps in parts:
        choice = {**last["choices"][0], "delta": delta, "finish_reason": reason,
                  "logprobs": {"content": lps, "refusal": None} if lps else None}
        out.append({**last, "choices": [choice]})
    return out

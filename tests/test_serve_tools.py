"""`tools` + `tool_choice` on /v1/chat/completions (serve/api/tools.py): forced calls (a named function,
"required") by grammar on a tiny random model, arguments valid against the function's parameters (jsonschema),
streamed as OpenAI's delta.tool_calls; tool history (`tool` messages, assistant `tool_calls`) rendered through
the template or the system-prompt fallback; "auto" output parsed into tool_calls; LangChain's ChatOpenAI
(bind_tools with a forced choice, with_structured_output json_schema) against the server."""
import json

import pytest

from serve_util import Server, http

openai = pytest.importorskip("openai")
pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

WEATHER = {"type": "object", "additionalProperties": False,
           "properties": {"city": {"enum": ["Paris", "Oslo", "Lima"]},
                          "unit": {"enum": ["c", "f"]}, "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city", "unit", "days"]}
TIME = {"type": "object", "additionalProperties": False, "properties": {"zone": {"type": "string", "maxLength": 5}},
        "required": ["zone"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather forecast",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": TIME}}]
PARAMS = {"get_weather": WEATHER, "get_time": TIME}
MSG = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(folder, tmp_path_factory):
    srv = Server(folder, tmp_path_factory.mktemp("tools") / "data").start()
    yield srv
    srv.stop()


def _call(c, **kw):
    return c.chat.completions.create(model="model", messages=MSG, tools=TOOLS, max_tokens=120, **kw)


def _check_calls(calls, names):
    assert calls
    for call in calls:
        assert call.id.startswith("call_") and call.type == "function" and call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), PARAMS[call.function.name])


def test_named_function_is_forced_with_valid_arguments(server):
    c = server.client()
    for kw in ({"temperature": 0}, {"temperature": 1.0, "seed": 5}):
        r = _call(c, tool_choice={"type": "function", "function": {"name": "get_time"}}, **kw)
        ch = r.choices[0]
        assert ch.finish_reason == "tool_calls" and ch.message.content is None, ch
        _check_calls(ch.message.tool_calls, {"get_time"})
        assert len(ch.message.tool_calls) == 1


def test_required_calls_one_of_the_tools(server):
    c = server.client()
    for seed in range(3):
        r = _call(c, tool_choice="required", temperature=1.0, seed=seed)
        assert r.choices[0].finish_reason == "tool_calls"
        _check_calls(r.choices[0].message.tool_calls, set(PARAMS))


def test_forced_call_streams_as_delta_tool_calls(server):
    c = server.client()
    kw = {"tool_choice": {"type": "function", "function": {"name": "get_weather"}}, "temperature": 0}
    whole = _call(c, **kw).choices[0].message.tool_calls[0]
    chunks = [ch for ch in _call(c, stream=True, **kw) if ch.choices]
    deltas = [d for ch in chunks for d in (ch.choices[0].delta.tool_calls or [])]
    assert len(deltas) == 1 and deltas[0].index == 0 and deltas[0].id.startswith("call_")
    assert (deltas[0].function.name, deltas[0].function.arguments) == (whole.function.name, whole.function.arguments)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not any(ch.choices[0].delta.content for ch in chunks)  # the <tool_call> text is not leaked


def test_tool_choice_none_hides_the_tools(server):
    c = server.client()
    plain = c.chat.completions.create(model="model", messages=MSG, max_tokens=4, temperature=0)
    none = c.chat.completions.create(model="model", messages=MSG, tools=TOOLS, tool_choice="none", max_tokens=4,
                                temperature=0)
    auto = c.chat.completions.create(model="model", messages=MSG, tools=TOOLS, max_tokens=4, temperature=0)
    assert none.usage.prompt_tokens == plain.usage.prompt_tokens < auto.usage.prompt_tokens
    assert none.choices[0].message.content == plain.choices[0].message.content


def test_tokenize_with_tools_counts_the_chat_prompt(server):
    auto = server.client().chat.completions.create(model="model", messages=MSG, tools=TOOLS, max_tokens=1)
    status, body = http("POST", server.base_url[:-3] + "/tokenize", {"messages": MSG, "tools": TOOLS})
    assert status == 200 and json.loads(body)["count"] == auto.usage.prompt_tokens
    status, body = http("POST", server.base_url[:-3] + "/tokenize", {"prompt": "hi", "tools": TOOLS})
    assert status == 400 and json.loads(body)["error"]["param"] == "tools"


def test_tool_history_is_accepted_and_rendered(server, folder):
    from leantune.models.tokenizer import Tokenizer

    c = server.client()
    first = _call(c, tool_choice={"type": "function", "function": {"name": "get_weather"}}, temperature=0)
    msg = first.choices[0].message
    history = [*MSG, msg.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": msg.tool_calls[0].id, "content": "18 C, sunny"}]
    r = c.chat.completions.create(model="model", messages=history, tools=TOOLS, max_tokens=4, temperature=0)
    # the prompt the server rendered: the fallback (the tiny ChatML template does not read `tools`)
    tk = Tokenizer.from_folder(folder)
    args = json.loads(msg.tool_calls[0].function.arguments)
    text = tk.apply_chat_template([
        {"role": "system", "content": _fallback_system()}, *MSG,
        {"role": "assistant", "content": "<tool_call>\n" + json.dumps({"name": "get_weather", "arguments": args})
         + "\n</tool_call>"},
        {"role": "user", "content": "<tool_response>\n18 C, sunny\n</tool_response>"}], add_generation_prompt=True)
    assert r.usage.prompt_tokens == len(tk.encode(text, add_special_tokens=False))


def _fallback_system() -> str:
    from leantune.serve.api.tools import ToolSpec, _fallback

    spec = ToolSpec([t["function"] | {"description": t["function"].get("description", "")} for t in TOOLS], "auto")
    return _fallback([], [{"type": "function", "function": f} for f in spec.functions])[0]["content"]


def test_template_that_reads_tools_gets_them_as_transformers_passes_them():
    from tiny_folder import build_tokenizer
    from leantune.models.tokenizer import Tokenizer
    from leantune.serve.api.tools import ToolSpec, encode_prompt, history_message

    template = ("{% for t in tools %}[{{ t.function.name }}]{% endfor %}{% for m in messages %}<{{ m.role }}>"
                "{% for c in m.tool_calls or [] %}{{ c.function.name }}{{ c.function.arguments | tojson }}{% endfor %}"
                "{{ m.content }}{% endfor %}")
    tk = Tokenizer(build_tokenizer(), chat_template=template, eos_token="<|im_end|>")
    call = {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": '{"zone": "UTC"}'}}
    msgs = [{"role": "user", "content": "hi"}, history_message({"role": "assistant", "tool_calls": [call]}, 1),
            history_message({"role": "tool", "tool_call_id": "call_1", "content": "noon"}, 2)]
    spec = ToolSpec([t["function"] for t in TOOLS], "auto")
    text = tk.decode(encode_prompt(tk, msgs, spec, False))
    assert text == '[get_weather][get_time]<user>hi<assistant>get_time{"zone": "UTC"}<tool>noon'


def test_auto_output_is_parsed_into_tool_calls():
    from leantune.serve.api.tools import ToolSpec, parse_calls, rewrite

    spec = ToolSpec([t["function"] for t in TOOLS], "auto")
    text = ('Let me check.\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>\n'
            '<tool_call>\n{"name": "nope", "arguments": {}}\n</tool_call>')
    content, calls = parse_calls(text, spec)
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("get_time", {"zone": "UTC"})]
    assert content.startswith("Let me check.") and '"nope"' in content  # an unknown function stays text
    two = text.replace('"nope"', '"get_weather"')
    assert len(parse_calls(two, spec)[1]) == 2
    content, calls = parse_calls(two, ToolSpec(spec.functions, "auto", parallel=False))
    assert [c["function"]["name"] for c in calls] == ["get_time"] and '"get_weather"' in content
    resp = {"choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}]}
    assert rewrite(resp, spec)["choices"][0]["finish_reason"] == "tool_calls"
    plain = {"choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "hi"}}]}
    assert rewrite(plain, spec)["choices"][0] == {"index": 0, "finish_reason": "stop",
                                                  "message": {"role": "assistant", "content": "hi"}}


@pytest.mark.parametrize("kw, param", [
    ({"tool_choice": {"type": "function", "function": {"name": "missing"}}}, "tool_choice"),
    ({"tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0]"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}],
      "tool_choice": "required"}, "tools"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
])
def test_bad_tool_requests_are_400_naming_the_parameter(server, kw, param):
    body = {"model": "model", "messages": MSG, "tools": TOOLS, "max_tokens": 4, **kw}
    with pytest.raises(openai.BadRequestError) as info:
        server.client().chat.completions.create(**body)
    assert info.value.response.json()["error"]["param"] == param


def test_bad_tool_history_is_400(server):
    bad = [*MSG, {"role": "tool", "content": "x"}]  # no tool_call_id
    with pytest.raises(openai.BadRequestError) as info:
        server.client().chat.completions.create(model="model", messages=bad, max_tokens=4)
    assert info.value.response.json()["error"]["param"] == "messages[1].tool_call_id"


def test_langchain_bind_tools_and_structured_output(server):
    lc = pytest.importorskip("langchain_openai")
    from typing import Literal

    from pydantic import BaseModel, Field

    class GetWeather(BaseModel):
        """Weather forecast for a city."""

        city: Literal["Paris", "Oslo"]
        days: int = Field(ge=1, le=7)

    llm = lc.ChatOpenAI(base_url=server.base_url, api_key="none", model="model", temperature=0, max_tokens=200,
                        max_retries=0)
    ai = llm.bind_tools([GetWeather], tool_choice="GetWeather", strict=True).invoke("Weather in Oslo?")
    assert len(ai.tool_calls) == 1 and ai.tool_calls[0]["name"] == "GetWeather"
    GetWeather.model_validate(ai.tool_calls[0]["args"])

    class Answer(BaseModel):
        verdict: Literal["yes", "no"]
        score: int = Field(ge=0, le=9)

    out = llm.with_structured_output(Answer, method="json_schema").invoke("Is the sky blue?")
    assert isinstance(out, Answer)

"""`response_format` on /v1/chat/completions by grammar-constrained decoding (serve/grammar.py, llguidance):
outputs of a tiny random model (greedy and sampled, base and adapter in one batch, streamed) and of the real
SmolLM2 parse as JSON and validate against the schema (jsonschema is the oracle); bad schemas and a missing
extra are 400s naming response_format."""
import json
import re
import sys
import threading

import pytest
import torch

from serve_util import Server

openai = pytest.importorskip("openai")
pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

# every value bounded (enums, a short string, a small integer), so even a random model ends the object
SCHEMA = {"type": "object", "additionalProperties": False,
          "properties": {"color": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"},
                         "n": {"type": "integer", "minimum": 0, "maximum": 99},
                         "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
                         "name": {"type": "string", "maxLength": 6}},
          "required": ["color", "ok", "n", "tags", "name"]}
RF = {"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA, "strict": True}}
MSG = [{"role": "user", "content": "Describe a thing as JSON."}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from test_serve_api import _adapter
    from tiny_folder import make_tiny_model_folder

    tmp = tmp_path_factory.mktemp("structured")
    folder = make_tiny_model_folder(tmp / "model", initializer_range=0.15)
    srv = Server(folder, tmp / "data", "--adapter", f"x={_adapter(folder, tmp / 'ax', 1)}").start()
    yield srv
    srv.stop()


def _valid(text: str, schema: dict) -> dict:
    obj = json.loads(text)
    jsonschema.validate(obj, schema)
    return obj


def _ask(c, model="model", rf=RF, **kw):
    return c.chat.completions.create(model=model, messages=MSG, response_format=rf, max_tokens=80, **kw)


def test_json_schema_greedy_and_sampled_outputs_validate(server):
    c = server.client()
    r = _ask(c, temperature=0)
    assert r.choices[0].finish_reason == "stop"
    _valid(r.choices[0].message.content, SCHEMA)
    seen = set()
    for seed in range(4):
        r = _ask(c, temperature=1.0, seed=seed)
        assert r.choices[0].finish_reason == "stop", r
        seen.add(json.dumps(_valid(r.choices[0].message.content, SCHEMA), sort_keys=True))
    assert len(seen) > 1  # sampling still samples, within the grammar
    free = c.chat.completions.create(model="model", messages=MSG, max_tokens=20, temperature=0)
    with pytest.raises(json.JSONDecodeError):  # the random model alone writes no JSON: the grammar did it
        json.loads(free.choices[0].message.content)


def test_base_and_adapter_in_one_batch_each_with_its_own_grammar(server):
    c = server.client()
    other = {"type": "object", "properties": {"k": {"enum": [1, 2, 3]}}, "required": ["k"],
             "additionalProperties": False}
    jobs = [("model", RF, SCHEMA), ("x", RF, SCHEMA),
            ("x", {"type": "json_schema", "json_schema": {"name": "k", "schema": other}}, other),
            ("model", None, None)]
    out = [None] * len(jobs)

    def go(i):
        model, rf, _ = jobs[i]
        kw = {"response_format": rf} if rf else {}
        out[i] = c.chat.completions.create(model=model, messages=MSG, max_tokens=80, temperature=0, **kw)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for (model, rf, schema), r in zip(jobs, out):
        if schema is not None:
            _valid(r.choices[0].message.content, schema)
    # alone, the adapter's greedy answer is the same: one request's grammar never leaks into another's
    assert _ask(c, "x", temperature=0).choices[0].message.content == out[1].choices[0].message.content


def test_json_schema_streamed(server):
    chunks = list(_ask(server.client(), temperature=0, stream=True))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert text == _ask(server.client(), temperature=0).choices[0].message.content
    _valid(text, SCHEMA)


@pytest.mark.parametrize("rf", [
    {"type": "json_schema", "json_schema": {"name": "t", "schema": {"type": "object", "properties": {
        "a": {"type": "nonsense"}}}}},
    {"type": "json_schema", "json_schema": {"name": "t", "schema": {"type": "string", "format": "no-such"}}},
    {"type": "json_schema", "json_schema": {"name": "bad name!", "schema": {"type": "object"}}},
    {"type": "json_schema", "json_schema": {"name": "t"}},
    {"type": "json_schema"},
    {"type": "yaml"},
])
def test_bad_response_format_is_400_naming_it(server, rf):
    with pytest.raises(openai.BadRequestError) as info:
        _ask(server.client(), rf=rf)
    assert info.value.response.json()["error"]["param"] == "response_format"


def test_text_response_format_is_free_text(server):
    c = server.client()
    plain = c.chat.completions.create(model="model", messages=MSG, max_tokens=80, temperature=0)
    assert _ask(c, rf={"type": "text"}, temperature=0).choices[0].message.content == plain.choices[0].message.content


def test_vllm_guided_fields_on_both_endpoints(server):
    c = server.client()
    comp = lambda **kw: c.completions.create(model="model", prompt="The answer:", max_tokens=100, temperature=0,
                                             extra_body=kw).choices[0].text
    chat = lambda **kw: c.chat.completions.create(model="model", messages=MSG, max_tokens=100, temperature=0,
                                                  extra_body=kw).choices[0].message.content
    choices = ["yes", "no", "it depends"]
    for ask in (comp, chat):
        assert ask(guided_choice=choices) in choices
        assert ask(structured_outputs={"choice": choices}) in choices
        assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", ask(guided_regex=r"[0-9]{3}-[a-z]{2}"))
        _valid(ask(guided_json=SCHEMA), SCHEMA)
        _valid(ask(structured_outputs={"json": json.dumps(SCHEMA)}), SCHEMA)
    for bad, param in (({"guided_regex": "(unclosed"}, "guided_regex"), ({"guided_choice": []}, "guided_choice"),
                       ({"guided_json": {"type": "nonsense"}}, "guided_json"),
                       ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
                       ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
                       ({"guided_grammar": "start: x"}, "guided_grammar")):
        with pytest.raises(openai.BadRequestError) as info:
            comp(**bad)
        assert info.value.response.json()["error"]["param"] == param, bad


def test_without_llguidance_the_400_names_the_extra(monkeypatch):
    from leantune.serve.api import tools
    from leantune.serve.api.common import APIError

    monkeypatch.setitem(sys.modules, "llguidance", None)  # import llguidance -> ImportError
    with pytest.raises(APIError) as info:
        tools.response_format_grammar({"type": "json_object"})
    assert info.value.status == 400 and info.value.param == "response_format"
    assert "leantune[structured]" in info.value.message


def test_processor_masks_to_the_grammar_and_forces_eos_when_complete():
    """The LogitsProcessor alone: only allowed tokens keep finite logits, and after the last `}` only EOS."""
    from tiny_folder import build_tokenizer
    from leantune.models.tokenizer import Tokenizer
    from leantune.serve import grammar as G

    tk = Tokenizer(build_tokenizer(), eos_token="<|im_end|>")
    make = G.compile_grammar(tk, 512, G.json_schema_grammar({"enum": [{"a": 1}]}))
    p = make()
    target = tk.encode('{"a": 1}', add_special_tokens=False)
    for tok in target:
        masked = p(torch.zeros(512))
        assert masked[tok] == 0 and torch.isinf(masked).sum() > 400  # the target allowed, most tokens not
        assert torch.isinf(masked[400:]).all()  # ids past the tokenizer's vocabulary never
        p.accept(tok)
    masked = p(torch.zeros(512))
    assert torch.isfinite(masked).nonzero().flatten().tolist() == sorted(tk.eos_ids)
    assert make() is not p and make().m is not p.m  # each sequence has its own matcher


@pytest.mark.slow
def test_smollm2_json_schema_json_object_and_a_forced_tool_call(smollm2_path, tmp_path):
    srv = Server(smollm2_path, tmp_path / "data", "--served-model-name", "model").start(timeout=180)
    try:
        c = srv.client()
        person = {"type": "object", "additionalProperties": False,
                  "properties": {"name": {"type": "string", "maxLength": 40}, "age": {"type": "integer"},
                                 "city": {"type": "string", "maxLength": 40}},
                  "required": ["name", "age", "city"]}
        msgs = [{"role": "user", "content": "Give me a JSON object about a person named Ann, 31, from Oslo."}]
        r = c.chat.completions.create(model="model", messages=msgs, temperature=0, max_tokens=60,
                                      response_format={"type": "json_schema",
                                                       "json_schema": {"name": "person", "schema": person}})
        assert r.choices[0].finish_reason == "stop"
        _valid(r.choices[0].message.content, person)
        r = c.chat.completions.create(model="model", messages=msgs, temperature=0.7, seed=3, max_tokens=120,
                                      response_format={"type": "json_object"})
        assert r.choices[0].finish_reason == "stop"  # (greedy runs on listing fields past 120 tokens)
        assert isinstance(json.loads(r.choices[0].message.content), dict)
        weather = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
        tools = [{"type": "function", "function": {"name": "get_weather", "description": "Get a city's weather",
                                                   "parameters": weather}}]
        r = c.chat.completions.create(model="model", messages=[{"role": "user", "content": "Weather in Paris?"}],
                                      tools=tools, tool_choice="required", temperature=0, max_tokens=60)
        call = r.choices[0].message.tool_calls[0]
        assert r.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
        jsonschema.validate(json.loads(call.function.arguments), weather)
    finally:
        srv.stop()

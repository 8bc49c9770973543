"""What real clients send to `leantune serve` (recipe tier, tiny model, one server with an API key, driven by the
official `openai` client and raw HTTP): request bodies checked field by field against OpenAI's and vLLM's
field lists (serve/api/schemas.py), an unknown or unsupported field refused in OpenAI's error shape naming it,
neutral values and supported extras accepted."""
import pytest

from serve_util import Server, http

openai = pytest.importorskip("openai")
KEY = "sk-test"
MSG = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from tiny_folder import make_tiny_model_folder

    return make_tiny_model_folder(tmp_path_factory.mktemp("tiny") / "model", initializer_range=0.15)


@pytest.fixture(scope="module")
def server(folder, tmp_path_factory):
    srv = Server(folder, tmp_path_factory.mktemp("surface") / "data", "--api-key", KEY, key=KEY).start()
    yield srv
    srv.stop()


def _refused(fn, param: str, *words: str, code: str | None = None) -> dict:
    """fn() is a 400 in OpenAI's error shape naming `param`."""
    with pytest.raises(openai.BadRequestError) as info:
        fn()
    body = info.value.response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    err = body["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param, err
    for w in words:
        assert w.lower() in err["message"].lower(), (w, err)
    if code is not None:
        assert err["code"] == code, err
    return err


def _chat(c, **kw):
    return lambda: c.chat.completions.create(model="model", messages=MSG, max_tokens=6, temperature=0, **kw)


def _comp(c, **kw):
    return lambda: c.completions.create(model="model", prompt="The quick brown", max_tokens=6, temperature=0, **kw)


def test_unknown_field_is_400_naming_it(server):
    c = server.client()
    for call in (_chat, _comp):
        err = _refused(call(c, extra_body={"temprature": 0.5}), "temprature",
                       "Unrecognized request argument supplied: temprature", code="unknown_parameter")
        assert err["message"] == "Unrecognized request argument supplied: temprature"


UNSUPPORTED_CHAT = {
    "store": {"store": True}, "echo": {"extra_body": {"echo": True}},
}
UNSUPPORTED_COMPLETIONS = {"suffix": {"suffix": "end"}}


@pytest.mark.parametrize("param", list(UNSUPPORTED_CHAT))
def test_unsupported_chat_field_is_400_naming_it(server, param):
    _refused(_chat(server.client(), **UNSUPPORTED_CHAT[param]), param, param, "not supported by leantune",
             code="unsupported_parameter")


@pytest.mark.parametrize("param", list(UNSUPPORTED_COMPLETIONS))
def test_unsupported_completions_field_is_400_naming_it(server, param):
    _refused(_comp(server.client(), **UNSUPPORTED_COMPLETIONS[param]), param, param, "not supported by leantune",
             code="unsupported_parameter")


def test_wrong_types_and_message_fields_are_400(server):
    c = server.client()
    _refused(_chat(c, extra_body={"temperature": "0.5"}), "temperature", "wrong type", code="invalid_type")
    _refused(_chat(c, extra_body={"ignore_eos": 1}), "ignore_eos", "wrong type", code="invalid_type")
    _refused(_chat(c, stream_options={"include_usage": True, "continuous_usage_stats": True}),
             "stream_options.continuous_usage_stats", "not supported")
    named = [{"role": "user", "content": "hello", "name": "bob"}]
    _refused(lambda: c.chat.completions.create(model="model", messages=named, max_tokens=2),
             "messages[0].name", "not supported")
    odd = [{"role": "user", "content": "hello", "mood": "happy"}]
    _refused(lambda: c.chat.completions.create(model="model", messages=odd, max_tokens=2),
             "messages[0].mood", "not a message field")


def test_neutral_values_and_supported_extras_are_served(server):
    """The defaults LangChain-style clients send on every call change nothing; top_k=1 is greedy."""
    c = server.client()
    plain = _chat(c)().choices[0].message.content
    neutral = _chat(c, n=1, logprobs=False, presence_penalty=0, frequency_penalty=0.0, logit_bias={}, user="u1",
                    parallel_tool_calls=True, service_tier="auto", stream=False,
                    extra_body={"min_p": 0, "repetition_penalty": 1, "top_k": -1, "skip_special_tokens": True})()
    assert neutral.choices[0].message.content == plain
    # top_k=1 leaves only the likeliest token, so sampling at temperature 1 gives the greedy text
    topk = c.chat.completions.create(model="model", messages=MSG, max_tokens=6, temperature=1.0, seed=3,
                                     extra_body={"top_k": 1})
    assert topk.choices[0].message.content == plain
    wide = [c.chat.completions.create(model="model", messages=MSG, max_tokens=6, temperature=2.0, seed=s,
                                      extra_body={"top_k": 0}).choices[0].message.content for s in range(4)]
    assert any(w != plain for w in wide)  # without top_k the same sampling leaves the greedy path
    _refused(_chat(c, extra_body={"top_k": -2}), "top_k", "top_k")
    # an assistant message sent back as the client got it (null fields of the response object) is history
    r = _chat(c)()
    history = MSG + [r.choices[0].message.model_dump(), {"role": "user", "content": "again"}]
    again = c.chat.completions.create(model="model", messages=history, max_tokens=2, temperature=0)
    assert again.usage.completion_tokens >= 1
    comp = _comp(c, n=1, echo=False, best_of=1, presence_penalty=0)()
    assert comp.choices[0].text == _comp(c)().choices[0].text


def test_openapi_schema_lists_the_request_fields(server):
    root = server.base_url[:-3]
    status, text = http("GET", f"{root}/openapi.json")
    assert status == 200
    import json

    paths = json.loads(text)["paths"]
    chat = paths["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    comp = paths["/v1/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert {"model", "messages", "max_completion_tokens", "logprobs", "tools", "top_k"} <= set(chat["properties"])
    assert {"model", "prompt", "echo", "best_of", "suffix"} <= set(comp["properties"])
    assert chat["additionalProperties"] is False and set(chat["required"]) == {"model", "messages"}
    assert http("GET", f"{root}/docs")[0] == 200


# ---- /health, /v1/models/{id}, /tokenize, /detokenize -------------------------------------------------------
def _post(server, path, body, key=KEY):
    import json

    status, text = http("POST", server.base_url[:-3] + path, body,
                        headers={"Authorization": f"Bearer {key}"} if key else {})
    return status, json.loads(text) if text else None


def test_health_answers_without_a_key_and_nothing_else_does(server):
    root = server.base_url[:-3]
    assert http("GET", f"{root}/health")[0] == 200  # load balancers and probes send no key
    assert http("GET", f"{root}/health", headers={"Authorization": "Bearer wrong"})[0] == 200
    for method, path in (("GET", "/v1/models"), ("GET", "/v1/models/model"), ("GET", "/metrics"),
                         ("POST", "/tokenize"), ("POST", "/detokenize"), ("POST", "/v1/completions")):
        status, text = http(method, root + path, {} if method == "POST" else None)
        assert status == 401 and "API key" in text, (path, status, text)


def test_retrieve_model_both_ways(server):
    c = server.client()
    m = c.models.retrieve("model")
    assert m.id == "model" and m.object == "model" and m.owned_by == "leantune" and m.created > 0
    with pytest.raises(openai.NotFoundError) as info:
        c.models.retrieve("no-such-model")
    err = info.value.response.json()["error"]
    assert err["code"] == "model_not_found" and err["param"] == "model" and "no-such-model" in err["message"]
    assert err["type"] == "invalid_request_error"


def test_tokenize_detokenize_round_trip_equals_the_tokenizer(server, folder):
    import leantune

    _, tk = leantune.load(folder)
    text = "The quick brown fox, 42 times!"
    status, out = _post(server, "/tokenize", {"model": "model", "prompt": text, "return_token_strs": True})
    assert status == 200, out
    assert out["tokens"] == tk.encode(text) and out["count"] == len(out["tokens"]) and out["max_model_len"] == 2048
    assert out["token_strs"] == [tk.tk.id_to_token(i) for i in out["tokens"]]
    status, plain = _post(server, "/tokenize", {"prompt": text, "add_special_tokens": False})
    assert status == 200, plain
    assert plain["tokens"] == tk.encode(text, add_special_tokens=False) and plain["token_strs"] is None
    r = server.client().completions.create(model="model", prompt=text, max_tokens=1,
                                           extra_body={"add_special_tokens": False})
    assert r.usage.prompt_tokens == plain["count"]
    status, back = _post(server, "/detokenize", {"model": "model", "tokens": out["tokens"]})
    assert status == 200 and back["prompt"] == tk.decode(out["tokens"], skip_special_tokens=False)
    assert back["prompt"].endswith(text)
    # chat messages count exactly as a chat completion's prompt tokens
    status, chat = _post(server, "/tokenize", {"model": "model", "messages": MSG})
    assert status == 200 and chat["tokens"] == tk.encode_chat(MSG, add_generation_prompt=True)
    r = server.client().chat.completions.create(model="model", messages=MSG, max_tokens=1)
    assert chat["count"] == r.usage.prompt_tokens


def test_tokenize_bad_requests(server):
    def err(path, body, status=400):
        s, out = _post(server, path, body)
        assert s == status and set(out["error"]) == {"message", "type", "param", "code"}, out
        return out["error"]

    assert err("/tokenize", {"prompt": "hi", "messages": MSG})["param"] == "prompt"
    assert err("/tokenize", {})["param"] == "prompt"
    assert err("/tokenize", {"prompt": "hi", "lang": "en"})["code"] == "unknown_parameter"
    assert err("/tokenize", {"messages": MSG, "tools": [{"type": "function"}]})["param"] == "tools[0]"
    assert err("/tokenize", {"model": "nope", "prompt": "hi"}, 404)["code"] == "model_not_found"
    assert err("/detokenize", {"tokens": [1, 10 ** 7]})["param"] == "tokens"
    assert err("/detokenize", {"tokens": "1 2"})["code"] == "invalid_type"
    assert err("/detokenize", {"model": "model"})["code"] == "missing_required_parameter"


# ---- logprobs -----------------------------------------------------------------------------------------------
def _greedy_direct(folder, prompt_ids, n):
    """(token, log-softmax row) of n greedy steps of the model itself, outside the server."""
    import leantune
    import torch

    model, tk = leantune.load(folder)
    ids, out = list(prompt_ids), []
    with torch.no_grad():
        for _ in range(n):
            lp = torch.log_softmax(model(torch.tensor([ids]))[0, -1].float(), -1)
            tok = int(lp.argmax())
            out.append((tok, lp))
            ids.append(tok)
    return out, tk


def test_chat_logprobs_equal_the_models_log_softmax(server, folder):
    import leantune

    c = server.client()
    _, tk = leantune.load(folder)
    direct, tk = _greedy_direct(folder, tk.encode_chat(MSG, add_generation_prompt=True), 6)
    kw = dict(model="model", messages=MSG, max_tokens=6, logprobs=True, top_logprobs=3,
              extra_body={"ignore_eos": True})
    r = c.chat.completions.create(temperature=0, **kw)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 6
    for e, (tok, lp) in zip(content, direct):
        assert e.token == tk.decode([tok], skip_special_tokens=False) and e.bytes == list(e.token.encode())
        assert e.logprob == pytest.approx(float(lp[tok]), abs=1e-4)
        top = lp.topk(3)
        assert [t.token for t in e.top_logprobs] == [tk.decode([i], skip_special_tokens=False)
                                                     for i in top.indices.tolist()]
        assert [t.logprob for t in e.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)
    # the model's distribution, not the sampling one: temperature 1.5 with top_k=1 walks the same greedy path
    hot = c.chat.completions.create(temperature=1.5, seed=1, **{**kw, "extra_body": {"ignore_eos": True, "top_k": 1}})
    assert [e.logprob for e in hot.choices[0].logprobs.content] == pytest.approx([e.logprob for e in content],
                                                                                 abs=1e-5)
    chunks = list(c.chat.completions.create(temperature=0, stream=True, **kw))
    streamed = [e for ch in chunks if ch.choices and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in content]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content], abs=1e-5)
    plain = c.chat.completions.create(model="model", messages=MSG, max_tokens=2)
    assert plain.choices[0].logprobs is None
    _refused(_chat(c, top_logprobs=3), "top_logprobs", "logprobs")
    _refused(_chat(c, logprobs=True, top_logprobs=21), "top_logprobs", "0..20")


def test_completion_logprobs_equal_the_models_log_softmax(server, folder):
    import leantune

    c = server.client()
    _, tk = leantune.load(folder)
    prompt = "The quick brown"
    direct, tk = _greedy_direct(folder, tk.encode(prompt), 5)
    kw = dict(model="model", prompt=prompt, max_tokens=5, temperature=0, logprobs=2, extra_body={"ignore_eos": True})
    lps = c.completions.create(**kw).choices[0].logprobs
    assert lps.tokens == [tk.decode([t], skip_special_tokens=False) for t, _ in direct]
    assert lps.token_logprobs == pytest.approx([float(lp[t]) for t, lp in direct], abs=1e-4)
    for top, (_, lp) in zip(lps.top_logprobs, direct):
        best, want = lp.topk(2), {}
        for i, v in zip(best.indices.tolist(), best.values.tolist()):  # keyed by text: the likeliest of equals
            want.setdefault(tk.decode([i], skip_special_tokens=False), v)
        assert list(top) == list(want) and list(top.values()) == pytest.approx(list(want.values()), abs=1e-4)
    assert lps.text_offset == [sum(len(t) for t in lps.tokens[:i]) for i in range(5)]
    chunks = list(c.completions.create(stream=True, **kw))
    got = [ch.choices[0].logprobs for ch in chunks if ch.choices and ch.choices[0].logprobs]
    assert [t for g in got for t in g.tokens] == lps.tokens
    assert [o for g in got for o in g.text_offset] == lps.text_offset
    _refused(_comp(c, logprobs=21), "logprobs", "0..20")

"""The sampling surface of `/v1/completions` and `/v1/chat/completions` (issue 17 item 2): echo with prompt logprobs,
OpenAI's four prompt forms, n > 1 and best_of sharing the prompt's KV blocks, presence/frequency penalties and
logit_bias, and stop strings across streamed chunks. Engine-level tests (unit tier) check the block sharing and
the prompt logits; server tests (recipe tier, a real `leantune serve` on a tiny model, fp32) check the shapes
with the official `openai` client against the model's own log-softmax."""
import pytest
import torch

import leantune
from leantune.serve.block_manager import BlockManager
from leantune.serve.engine import Engine, EngineConfig
from leantune.serve.requests import GenRequest
from leantune.serve.store import Store
from serve_util import Server

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def model_tok(folder):
    model, tok = leantune.load(folder)
    return model.eval(), tok


def _direct_logsoftmax(model, ids: list[int]) -> torch.Tensor:
    """(T, V) the model's log-softmax at every position of `ids`, by a plain forward."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids]))[0].float(), -1)


def test_runner_returns_every_row_of_the_works_that_ask(model_tok, one_thread):
    """A packed step with a decode, a prompt chunk asking for all its logits and a sampling chunk asking too:
    the rows asked for equal the plain forward's logits at those positions, the sampled rows come in order."""
    from leantune.serve.runner import ModelRunner, Work

    model, _ = model_tok
    g = torch.Generator().manual_seed(4)
    a, b, c = (torch.randint(3, 400, (n,), generator=g).tolist() for n in (6, 9, 5))
    runner = ModelRunner(model, num_blocks=16, block_size=4)
    slots = {"a": list(range(0, 16)), "b": list(range(16, 32)), "c": list(range(32, 48))}
    runner.step([Work(a[:5], 0, slots["a"][:5])])  # a's prompt, so that its last token decodes next
    runner.step([Work(b[:4], 0, slots["b"][:4])])  # b's first chunk
    res = runner.step([Work(a[5:], 5, slots["a"][:6], sample=True),
                       Work(b[4:], 4, slots["b"][:9], sample=True, all_logits=True),
                       Work(c, 0, slots["c"][:5], all_logits=True)])
    with torch.no_grad():
        ref = {k: model(torch.tensor([v]))[0].float() for k, v in (("a", a), ("b", b), ("c", c))}
    assert res.logits.shape[0] == 2 and len(res.row_logits) == 2
    torch.testing.assert_close(res.logits[0], ref["a"][-1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(res.logits[1], ref["b"][-1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(res.row_logits[0], ref["b"][4:], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(res.row_logits[1], ref["c"], atol=1e-4, rtol=1e-4)


# ---- block manager and scheduler: forks share whole prompt blocks -----------------------------------------------
def test_fork_shares_full_blocks_refcounted():
    bm = BlockManager(num_blocks=10, block_size=4)
    assert bm.ensure("p", 10)  # 3 blocks
    bm.fork("p", "c", 8)  # the 2 full ones
    assert bm.num_used == 3 and bm.block_table("c") == bm.block_table("p")[:2]
    assert [bm.refcount(b) for b in bm.block_table("p")] == [2, 2, 1]
    assert bm.ensure("c", 11) and bm.num_used == 4  # the child's own tail block
    bm.free("p")
    assert bm.num_used == 3 and [bm.refcount(b) for b in bm.block_table("c")] == [1, 1, 1]
    bm.free("c")
    assert bm.num_used == 0 and bm.num_free == 10
    with pytest.raises(ValueError, match="whole blocks"):
        bm.fork("p", "d", 6)


def _engine(model_tok, tmp_path, **cfg):
    model, tok = model_tok
    return Engine(model, tok, "model", Store(tmp_path / "data"), EngineConfig(**cfg))


def _drain(engine, watch=None):
    for _ in range(10_000):
        if watch is not None:
            watch()
        if not engine.iteration():
            return
    raise AssertionError("the engine did not finish")


def _texts(events) -> dict[int, str]:
    out: dict[int, str] = {}
    for ev in events:
        out[ev["index"]] = out.get(ev["index"], "") + ev["text"]
    return out


def test_n_choices_share_the_prompts_blocks_and_are_reproducible(model_tok, tmp_path, one_thread):
    """n = 4 on a 21-token prompt (block size 4): the forks hold the prompt's 5 full blocks with the first
    sequence, so the pool holds them once; seeded choices differ from each other and repeat exactly."""
    model, _ = model_tok
    prompt = torch.randint(3, 400, (21,), generator=torch.Generator().manual_seed(0)).tolist()
    runs = []
    for run in range(2):
        e = _engine(model_tok, tmp_path / str(run), num_blocks=64, block_size=4)
        events: list[dict] = []
        e.add_request(GenRequest(prompt, "model", max_tokens=6, temperature=1.0, seed=7, n=4, ignore_eos=True),
                      events.append)
        peak = {"shared": 0, "saved": 0}

        def watch():
            tables = [e.blocks.block_table(s) for s in e.blocks.seq_ids()]
            assert e.blocks.num_used == len(set().union(*tables))  # a shared block is held once
            if len(tables) == 4:
                peak["shared"] = max(peak["shared"], len(set.intersection(*(set(t) for t in tables))))
            peak["saved"] = max(peak["saved"], sum(map(len, tables)) - e.blocks.num_used)

        _drain(e, watch)
        # the prompt's 5 full blocks (positions 0..19) are shared by all 4 choices: 3 * 5 blocks saved; each
        # choice recomputes the tail (position 20) into a block of its own
        assert peak["shared"] == 5 and peak["saved"] == 15
        assert e.blocks.num_used == 0 and not e.reqs and not e.groups
        finals = [ev for ev in events if ev["finish_reason"]]
        assert sorted(ev["index"] for ev in finals) == [0, 1, 2, 3]
        assert all(ev["completion_tokens"] == 6 for ev in finals)
        runs.append(_texts(events))
    assert runs[0] == runs[1]  # reproducible with the seed
    assert len(set(runs[0].values())) > 1  # choice i samples with seed + i: not n copies of one text
    # choice 0 is what a lone request with the same seed samples
    e = _engine(model_tok, tmp_path / "single", num_blocks=64, block_size=4)
    events = []
    e.add_request(GenRequest(prompt, "model", max_tokens=6, temperature=1.0, seed=7, ignore_eos=True), events.append)
    _drain(e)
    assert _texts(events)[0] == runs[0][0]


def test_greedy_forks_equal_the_first_choice_and_survive_preemption(model_tok, tmp_path, one_thread):
    """Greedy choices are all equal to plain greedy decoding, with a pool small enough to preempt forks."""
    prompt = torch.randint(3, 400, (13,), generator=torch.Generator().manual_seed(1)).tolist()
    want = None
    for cfg in ({"num_blocks": 64, "block_size": 4}, {"num_blocks": 9, "block_size": 4, "max_tokens_per_step": 8}):
        e = _engine(model_tok, tmp_path / str(cfg["num_blocks"]), **cfg)
        events: list[dict] = []
        e.add_request(GenRequest(prompt, "model", max_tokens=10, temperature=0, n=3, ignore_eos=True), events.append)
        _drain(e)
        texts = _texts(events)
        assert len(texts) == 3 and len(set(texts.values())) == 1
        want = want or texts[0]
        assert texts[0] == want
        assert e.blocks.num_used == 0
    assert e.stats.preemptions > 0


def test_prompt_logprobs_equal_the_models_log_softmax_across_chunks(model_tok, tmp_path, one_thread):
    """Prompt records from chunked prefill (chunks of 8 over 30 tokens), with a preemption in between, equal the
    plain forward's log-softmax; max_tokens 0 reports the prompt alone."""
    model, _ = model_tok
    prompt = torch.randint(3, 400, (30,), generator=torch.Generator().manual_seed(2)).tolist()
    lp = _direct_logsoftmax(model, prompt)
    e = _engine(model_tok, tmp_path, num_blocks=64, block_size=4, max_tokens_per_step=8)
    events: list[dict] = []
    e.add_request(GenRequest(prompt, "model", max_tokens=0, temperature=0, prompt_logprobs=3), events.append)
    _drain(e)
    assert len(events) == 1 and events[0]["finish_reason"] == "length" and events[0]["completion_tokens"] == 0
    recs = events[0]["prompt_logprobs"]
    assert [r["id"] for r in recs] == prompt[1:]
    assert [r["logprob"] for r in recs] == pytest.approx([float(lp[i, prompt[i + 1]]) for i in range(29)], abs=1e-4)
    for i, r in enumerate(recs):
        top = lp[i].topk(3)
        assert [t for t, _ in r["top"]] == top.indices.tolist()
        assert r["rank"] == int((lp[i] > lp[i, prompt[i + 1]]).sum()) + 1
    assert e.blocks.num_used == 0


# ---- the server, through the openai client ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(folder, tmp_path_factory):
    srv = Server(folder, tmp_path_factory.mktemp("sampling") / "data").start()
    yield srv
    srv.stop()


def _raw(server, body: dict) -> dict:
    """POST /v1/completions as lm-eval sends it (raw JSON): the parsed answer; asserts a 200."""
    import json

    from serve_util import http

    status, text = http("POST", server.base_url + "/completions", body)
    assert status == 200, text
    return json.loads(text)


def test_echo_logprobs_as_lm_eval_sends_them(server, model_tok):
    """lm-eval's loglikelihood payload: token-id prompts (a batch), echo, logprobs 1, max_tokens 1, temperature 0.
    token_logprobs[0] is null, the prompt's others equal the model's log-softmax, then the one generated token."""
    model, tk = model_tok
    prompts = [tk.encode("The quick brown fox jumps"), tk.encode("Hello, how are you")]
    out = _raw(server, {"model": "model", "prompt": prompts, "temperature": 0, "max_tokens": 1, "logprobs": 1,
                        "seed": 1234, "echo": True})
    assert [c["index"] for c in out["choices"]] == [0, 1]
    assert out["usage"]["prompt_tokens"] == sum(map(len, prompts))
    for c, ids in zip(out["choices"], prompts):
        lp = _direct_logsoftmax(model, ids)
        got = c["logprobs"]
        n = len(ids)
        assert len(got["tokens"]) == len(got["token_logprobs"]) == len(got["top_logprobs"]) == n + 1
        assert got["token_logprobs"][0] is None and got["top_logprobs"][0] is None
        assert got["token_logprobs"][1:n] == pytest.approx([float(lp[i - 1, ids[i]]) for i in range(1, n)], abs=1e-4)
        nxt = int(lp[-1].argmax())
        assert got["token_logprobs"][n] == pytest.approx(float(lp[-1, nxt]), abs=1e-4)
        assert got["tokens"] == [tk.decode([t], skip_special_tokens=False) for t in ids + [nxt]]
        for i in range(1, n):  # the likeliest token at each prompt position, as lm-eval's is_greedy reads it
            best = int(lp[i - 1].argmax())
            assert got["top_logprobs"][i] == {tk.decode([best], skip_special_tokens=False):
                                              pytest.approx(float(lp[i - 1, best]), abs=1e-4)}
        assert got["text_offset"] == [sum(len(t) for t in got["tokens"][:i]) for i in range(n + 1)]
        assert c["text"] == tk.decode(ids, skip_special_tokens=False) + tk.decode([nxt])


def test_echo_text_max_tokens_0_prompt_logprobs_and_stream(server, model_tok):
    model, tk = model_tok
    c = server.client()
    prompt = "The quick brown fox"
    ids = tk.encode(prompt)
    lp = _direct_logsoftmax(model, ids)
    r = c.completions.create(model="model", prompt=prompt, echo=True, max_tokens=0, logprobs=2)
    ch = r.choices[0]
    assert ch.text == prompt and r.usage.completion_tokens == 0 and ch.finish_reason == "length"
    assert ch.logprobs.token_logprobs[0] is None and len(ch.logprobs.tokens) == len(ids)
    assert all(len(t) == 2 for t in ch.logprobs.top_logprobs[1:])
    plain = c.completions.create(model="model", prompt=prompt, echo=True, max_tokens=3, temperature=0)
    assert plain.choices[0].text.startswith(prompt) and plain.choices[0].logprobs is None
    # vLLM's prompt_logprobs: [null, {id: {logprob, rank, decoded_token}}]: the token itself and the k likeliest
    r = c.completions.create(model="model", prompt=prompt, max_tokens=1, temperature=0,
                             extra_body={"prompt_logprobs": 1})
    plp = r.choices[0].model_extra["prompt_logprobs"]
    assert plp[0] is None and len(plp) == len(ids)
    for i in range(1, len(ids)):
        entry = plp[i][str(ids[i])]
        assert entry["logprob"] == pytest.approx(float(lp[i - 1, ids[i]]), abs=1e-4)
        assert entry["rank"] == int((lp[i - 1] > lp[i - 1, ids[i]]).sum()) + 1
        assert str(int(lp[i - 1].argmax())) in plp[i]
    # chat: vLLM puts prompt_logprobs at the top level
    msg = [{"role": "user", "content": "hello"}]
    r = c.chat.completions.create(model="model", messages=msg, max_tokens=1, extra_body={"prompt_logprobs": 0})
    chat_ids = tk.encode_chat(msg, add_generation_prompt=True)
    plp = r.model_extra["prompt_logprobs"]
    assert plp[0] is None and [list(d) for d in plp[1:]] == [[str(t)] for t in chat_ids[1:]]
    # streamed, the echoed prompt and its logprobs lead the first chunk; the whole equals the unstreamed answer
    kw = dict(model="model", prompt=prompt, echo=True, max_tokens=4, temperature=0, logprobs=1,
              extra_body={"ignore_eos": True})
    whole = c.completions.create(**kw).choices[0]
    chunks = [ch.choices[0] for ch in c.completions.create(stream=True, **kw) if ch.choices]
    assert "".join(ch.text for ch in chunks) == whole.text
    assert chunks[0].text.startswith(prompt)
    assert [t for ch in chunks if ch.logprobs for t in ch.logprobs.tokens] == whole.logprobs.tokens
    assert [o for ch in chunks if ch.logprobs for o in ch.logprobs.text_offset] == whole.logprobs.text_offset
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        c.completions.create(model="model", prompt=prompt, max_tokens=0)


def test_the_four_prompt_forms(server, model_tok):
    """A string, strings, token ids and token-id lists: one choice per prompt (n each), in order; usage summed."""
    _, tk = model_tok
    c = server.client()
    texts = ["The quick brown", "Hello, how", "What is the capital"]
    kw = dict(model="model", max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    single = [c.completions.create(prompt=t, **kw).choices[0].text for t in texts]
    for prompt in (texts, [tk.encode(t) for t in texts]):
        r = c.completions.create(prompt=prompt, **kw)
        assert [ch.index for ch in r.choices] == [0, 1, 2] and [ch.text for ch in r.choices] == single
        assert r.usage.prompt_tokens == sum(len(tk.encode(t)) for t in texts)
        assert r.usage.completion_tokens == 15
    assert c.completions.create(prompt=tk.encode(texts[1]), **kw).choices[0].text == single[1]
    r = c.completions.create(prompt=texts[:2], n=2, **kw)  # n per prompt: prompt-major order
    assert [ch.text for ch in r.choices] == [single[0], single[0], single[1], single[1]]
    assert [ch.index for ch in r.choices] == [0, 1, 2, 3] and r.usage.completion_tokens == 20
    for bad in ([], [[]], [[1, 10 ** 7]]):
        with pytest.raises(openai.BadRequestError):
            c.completions.create(model="model", prompt=bad, max_tokens=2)


def test_n_and_best_of(server, model_tok):
    model, tk = model_tok
    c = server.client()
    kw = dict(model="model", prompt="The quick brown", max_tokens=6, temperature=1.0, seed=5,
              extra_body={"ignore_eos": True})
    a = c.completions.create(n=3, **kw)
    b = c.completions.create(n=3, **kw)
    assert [ch.text for ch in a.choices] == [ch.text for ch in b.choices]  # seeded: reproducible
    assert len({ch.text for ch in a.choices}) > 1 and a.usage.completion_tokens == 18
    # best_of=4, n=2: the two of the four samples with the highest cumulative logprob
    four = c.completions.create(n=4, logprobs=0, **kw).choices
    cum = {ch.text: sum(ch.logprobs.token_logprobs) for ch in four}
    best = c.completions.create(n=2, best_of=4, **kw)
    want = sorted(four, key=lambda ch: -cum[ch.text])[:2]
    assert [ch.text for ch in best.choices] == [ch.text for ch in want] and best.usage.completion_tokens == 24
    with pytest.raises(openai.BadRequestError, match="stream") as info:
        c.completions.create(n=1, best_of=2, stream=True, **kw)
    assert info.value.body["param"] == "best_of"
    with pytest.raises(openai.BadRequestError):
        c.completions.create(n=3, best_of=2, **kw)
    # chat: n choices, streamed too
    msg = [{"role": "user", "content": "hello"}]
    ckw = dict(model="model", messages=msg, max_tokens=5, temperature=1.0, seed=3, n=2,
               extra_body={"ignore_eos": True})
    r = c.chat.completions.create(**ckw)
    assert [ch.index for ch in r.choices] == [0, 1] and r.usage.completion_tokens == 10
    streamed = {0: "", 1: ""}
    for ch in c.chat.completions.create(stream=True, **ckw):
        for choice in ch.choices:
            streamed[choice.index] += choice.delta.content or ""
    assert [streamed[0], streamed[1]] == [ch.message.content for ch in r.choices]


def _greedy_with(model, ids, steps, shape):
    """Greedy decoding where shape(logits (V,), output so far) reshapes each step's logits: the reference."""
    out = []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([ids + out]))[0, -1].float()
            out.append(int(shape(logits, out).argmax()))
    return out


def test_penalties_and_logit_bias_follow_openais_formulas(server, model_tok):
    model, tk = model_tok
    c = server.client()
    ids = tk.encode("Numbers: 0 1 2")  # greedy repeats tokens after this prompt: the penalties have work to do
    vocab = model.config.vocab_size

    def counts(out):
        return torch.bincount(torch.tensor(out, dtype=torch.long), minlength=vocab).float()

    def penal(logits, out, fp=0.0, pp=0.0):
        cnt = counts(out) if out else torch.zeros(vocab)
        return logits - cnt * fp - (cnt > 0).float() * pp

    kw = dict(model="model", prompt=ids, max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    plain = _greedy_with(model, ids, 12, lambda lg, out: lg)
    assert c.completions.create(**kw).choices[0].text == tk.decode(plain)
    for fp, pp in ((1.5, 0.0), (0.0, 2.0), (0.7, -0.4)):
        want = _greedy_with(model, ids, 12, lambda lg, out: penal(lg, out, fp, pp))
        assert want != plain or pp < 0  # a positive penalty changes this repetitive text
        got = c.completions.create(frequency_penalty=fp, presence_penalty=pp, **kw).choices[0].text
        assert got == tk.decode(want)
    # logit_bias: +100 all but forces a token, -100 bans the greedy one
    forced = tk.encode(" fox")[0]
    r = c.completions.create(logit_bias={str(forced): 100}, **{**kw, "max_tokens": 3})
    assert r.choices[0].text == tk.decode([forced] * 3)
    first = _greedy_with(model, ids, 1, lambda lg, out: lg)[0]
    bias = torch.zeros(vocab)
    bias[first] = -100
    want = _greedy_with(model, ids, 12, lambda lg, out: lg + bias)
    assert c.completions.create(logit_bias={str(first): -100}, **kw).choices[0].text == tk.decode(want)
    # vLLM's repetition_penalty (CTRL): seen tokens' positive logits divided, negative multiplied
    seen_rp = 1.8

    def rep(lg, out):
        seen = torch.zeros(vocab, dtype=torch.bool)
        seen[torch.tensor(ids + out)] = True
        return torch.where(seen, torch.where(lg > 0, lg / seen_rp, lg * seen_rp), lg)

    want = _greedy_with(model, ids, 12, rep)
    assert want != plain
    got = c.completions.create(**{**kw, "extra_body": {"ignore_eos": True, "repetition_penalty": seen_rp}})
    assert got.choices[0].text == tk.decode(want)
    for bad, param in (({"frequency_penalty": 2.5}, "frequency_penalty"), ({"logit_bias": {"x": 1}}, "logit_bias"),
                       ({"logit_bias": {"\u00b2": 1}}, "logit_bias"),
                       ({"logit_bias": {"5": 101}}, "logit_bias")):
        with pytest.raises(openai.BadRequestError) as info:
            c.completions.create(**kw, **bad)
        assert info.value.body["param"] == param


def test_min_tokens_stop_token_ids_and_min_p(server, model_tok):
    model, tk = model_tok
    c = server.client()
    ids = tk.encode("Hello, how")
    greedy = _greedy_with(model, ids, 6, lambda lg, out: lg)
    stop_at = greedy[2]
    kw = dict(model="model", prompt=ids, max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    r = c.completions.create(**{**kw, "extra_body": {"ignore_eos": True, "stop_token_ids": [stop_at]}})
    cut = greedy.index(stop_at)
    assert r.choices[0].text == tk.decode(greedy[:cut]) and r.choices[0].finish_reason == "stop"
    # min_p 1 keeps only the likeliest token: sampling at temperature 1.5 walks the greedy path; 0.0 does not
    hot = dict(model="model", prompt=ids, max_tokens=6, temperature=1.5)
    samples = {c.completions.create(seed=s, **{**hot, "extra_body": {"ignore_eos": True, "min_p": 1.0}})
               .choices[0].text for s in range(3)}
    assert samples == {tk.decode(greedy)}
    assert any(c.completions.create(seed=s, **{**hot, "extra_body": {"ignore_eos": True}}).choices[0].text
               != tk.decode(greedy) for s in range(3))
    # min_tokens bans the stop token until that many were generated
    r = c.completions.create(**{**kw, "extra_body": {"ignore_eos": True, "stop_token_ids": [stop_at],
                                                     "min_tokens": 6}})
    assert r.usage.completion_tokens == 6 and r.choices[0].finish_reason == "length"


def test_stop_string_spanning_tokens_and_chunks_when_streaming(server, model_tok):
    """A stop string made of the end of one token and the start of the next, possibly in different chunks: the
    streamed text never shows any of it and equals the unstreamed text."""
    model, tk = model_tok
    c = server.client()
    ids = tk.encode("The quick brown")
    out = _greedy_with(model, ids, 10, lambda lg, o: lg)
    pieces = [tk.decode(out[:i]) for i in range(11)]
    full = pieces[-1]
    # a stop string that straddles the boundary between generated tokens 4 and 5
    b = len(pieces[4])
    assert len(pieces[5]) - b >= 1 and b >= 1
    stop = full[b - 1:b + 1]
    assert full.find(stop) == b - 1 and pieces[4] == full[:b]  # it first occurs across that boundary
    want = full[:b - 1]
    kw = dict(model="model", prompt=ids, max_tokens=10, temperature=0, stop=[stop], extra_body={"ignore_eos": True})
    assert c.completions.create(**kw).choices[0].text == want
    chunks = [ch.choices[0].text for ch in c.completions.create(stream=True, **kw) if ch.choices]
    assert "".join(chunks) == want and len([x for x in chunks if x]) >= 2


def test_abort_frees_every_fork(model_tok, tmp_path, one_thread):
    """A client gone mid-request: its forks and their shared blocks are all freed at once, forked or not yet."""
    prompt = torch.randint(3, 400, (18,), generator=torch.Generator().manual_seed(3)).tolist()
    for steps in (1, 4):  # 1: the prompt is still prefilling (nothing forked yet); 4: the forks are decoding
        e = _engine(model_tok, tmp_path / str(steps), num_blocks=64, block_size=4, max_tokens_per_step=16)
        events: list[dict] = []
        rid = e.add_request(GenRequest(prompt, "model", max_tokens=20, temperature=0, n=3, ignore_eos=True),
                            events.append)
        for _ in range(steps):
            e.iteration()
        assert e.blocks.num_used > 0 and len(e.blocks.seq_ids()) == (1 if steps == 1 else 3)
        e.abort(rid)
        assert e.blocks.num_used == 0 and not e.reqs and not e.groups and not e.sched.has_work
        assert sorted(ev["index"] for ev in events if ev["finish_reason"] == "abort") == [0, 1, 2]

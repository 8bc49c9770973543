"""The fine-tuning API's leantune-specific and OpenAI-completing parts, through the official `openai` client
against a real server on loopback (tiny model, fp32): a job's adapter method / LoRA rank, alpha and targets,
validation and token accuracies every N steps, the result CSV, checkpoints served as models, W&B offline,
pause/resume, per-key quotas; and the co-trainer's metrics against direct computations."""
import csv
import io
import json
import os
import time

import openai
import pytest
import torch
from test_cotrain import _examples, _model

from leantune.methods.base import adapter_slots
from leantune.serve.cotrain import CoTrainConfig, CoTrainer
from leantune.serve.jobs import RESULT_COLUMNS, read_results_csv, results_csv
from leantune.train.loss import heldout_loss, shifted_targets
from serve_util import Server
from test_serve_api import FACTS, _chat, _train_file, _wait_job


# ---- the co-trainer's metrics ------------------------------------------------------------------------------
def _accuracy(model, examples, slot):
    """Token accuracy of `examples` from the full logits (the reference)."""
    from leantune.models.llama import ForwardMeta

    hits = n = 0
    with torch.no_grad():
        for ex in examples:
            logits = model(torch.tensor([ex.input_ids]), ForwardMeta(adapter_ids=torch.tensor([slot])))[0]
            tgt = shifted_targets(torch.tensor([ex.labels]))[0]
            keep = tgt != -100
            hits += int((logits[keep].argmax(-1) == tgt[keep]).sum())
            n += int(keep.sum())
    return hits / n


def _half_greedy(model, slot):
    """_examples' shapes, each token after the first the job adapter's argmax or a random one by turns, so
    the token accuracy is far from 0 and 1."""
    from leantune.data.formats import Example
    from leantune.models.llama import ForwardMeta

    g, out = torch.Generator().manual_seed(4), []
    for e in _examples():
        ids = e.input_ids[:1]
        with torch.no_grad():
            while len(ids) < len(e):
                if len(ids) % 2:
                    logits = model(torch.tensor([ids]), ForwardMeta(adapter_ids=torch.tensor([slot])))[0]
                    ids.append(int(logits[-1].argmax()))
                else:
                    ids.append(int(torch.randint(3, 250, (1,), generator=g)))
        prompt = e.labels.count(-100)
        out.append(Example(ids, [-100] * prompt + ids[prompt:]))
    return out


@pytest.mark.parametrize("whole", [True, False])
def test_token_accuracies_and_valid_loss_equal_direct_computations(whole, one_thread):
    """train_mean_token_accuracy of a step (whole sequences, as an idle server trains; or forward chunks and
    loss units of a few tokens, as one serving requests does) and the validation metrics equal the full
    logits' argmax counts and `heldout_loss`."""
    from leantune.serve.runner import ModelRunner, Work
    from test_serve_runner import BS, Pool

    model = _model("llama")
    slot = adapter_slots(model)["job"]
    ex = _half_greedy(model, slot)
    tr = CoTrainer(model, "job", ex, CoTrainConfig(n_epochs=1, batch_size=3, seed=0), loss_share=0.3)
    want_train = _accuracy(model, tr.batch, slot)  # the weights the step's sequences are scored with
    runner, pool, done = ModelRunner(model, 64, BS), Pool(64), False
    while not done:
        if whole:
            done = tr.train_sequence()
            continue
        if tr.fwd_wanted():
            toks, start = tr.fwd_chunk(min(5, tr.fwd_wanted()))
            ctx = pool.context(f"ft{tr.batch_i}", start + len(toks))
            tr.fwd_done(runner.step([Work(toks, start, ctx, adapter=slot, capture=True)]).captures)
        if tr.bwd_wanted():
            done = tr.backward_layers(1)
    m = tr.apply_step()
    assert 0 < m["train_mean_token_accuracy"] < 1
    assert m["train_mean_token_accuracy"] == pytest.approx(want_train)
    v = tr.valid_metrics(ex)
    assert v["valid_loss"] == pytest.approx(heldout_loss(model, ex, batch_size=1, adapter_slot=slot), rel=1e-5)
    assert v["valid_mean_token_accuracy"] == pytest.approx(_accuracy(model, ex, slot))


def test_results_csv_round_trips_with_openais_columns():
    rows = [{"step": 1, "train_loss": 2.5, "train_mean_token_accuracy": 0.25},
            {"step": 2, "train_loss": 2.0, "train_mean_token_accuracy": 0.5, "valid_loss": 1.5,
             "valid_mean_token_accuracy": 0.75}]
    text = results_csv(rows).decode()
    assert text.splitlines()[0] == "step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy"
    assert text.splitlines()[1] == "1,2.5,0.25,,"
    assert read_results_csv(text) == rows


# ---- the server -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from tiny_folder import make_tiny_model_folder

    return make_tiny_model_folder(tmp_path_factory.mktemp("tiny") / "model", initializer_range=0.15)


@pytest.fixture(scope="module")
def server(folder, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ftapi")
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}  # the server process inherits them
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    srv = Server(folder, tmp / "data", "--max-tokens-per-step", "64", "--checkpoint-every", "2",
                 "--ft-eval-every", "3", "--max-jobs-per-key", "2", "--max-storage-mb-per-key", "1").start()
    srv.tmp = tmp
    yield srv
    srv.stop()
    for k, v in old.items():
        os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def _metrics(c, job_id):
    events = list(reversed(list(c.fine_tuning.jobs.list_events(job_id, limit=100))))
    return [e.data for e in events if e.type == "metrics"]


def test_job_with_its_own_lora_validation_results_checkpoints_and_wandb(server):
    c = server.client()
    f = c.files.create(file=("facts.jsonl", _train_file()), purpose="fine-tune")
    hp = {"n_epochs": 4, "batch_size": 1, "learning_rate_multiplier": 10, "adapter_method": "rslora",
          "lora_rank": 4, "lora_alpha": 8, "lora_targets": ["q_proj", "v_proj"], "eval_every": 2}
    job = c.fine_tuning.jobs.create(model="model", training_file=f.id, validation_file=f.id, suffix="own", seed=1,
                                    method={"type": "supervised", "supervised": {"hyperparameters": hp}},
                                    integrations=[{"type": "wandb", "wandb": {"project": "ftapi"}}])
    job = _wait_job(c, job.id)
    assert job.status == "succeeded", job.error
    got = job.method.supervised.hyperparameters.model_dump()
    assert {k: got[k] for k in hp} == hp

    # the published adapter is the one asked for
    [out] = [p for p in (server.tmp / "data" / "adapters").iterdir() if p.name.startswith("ft--model--own")
             and "ckpt" not in p.name]
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and cfg["use_rslora"] is True
    assert sorted(cfg["target_modules"]) == ["q_proj", "v_proj"]

    # every step: train loss and accuracy; every 2nd step (and the last): validation loss and accuracy
    metrics = _metrics(c, job.id)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert all(0 <= m["train_mean_token_accuracy"] <= 1 for m in metrics)
    assert [m["step"] for m in metrics if "valid_loss" in m] == [2, 4, 6, 8]
    assert all(0 <= m["valid_mean_token_accuracy"] <= 1 for m in metrics if "valid_loss" in m)
    assert metrics[-1]["valid_loss"] < metrics[1]["valid_loss"]

    # the result file: OpenAI's columns, one row per step, the events' values; downloadable
    [rid] = job.result_files
    meta = c.files.retrieve(rid)
    assert meta.purpose == "fine-tune-results" and meta.bytes > 0
    assert rid in {x.id for x in c.files.list(purpose="fine-tune-results").data}
    rows = list(csv.DictReader(io.StringIO(c.files.content(rid).text)))
    assert tuple(rows[0]) == RESULT_COLUMNS and len(rows) == 8
    for r, m in zip(rows, metrics):
        assert int(r["step"]) == m["step"] and float(r["train_loss"]) == pytest.approx(m["train_loss"])
        assert float(r["train_accuracy"]) == pytest.approx(m["train_mean_token_accuracy"])
        assert (r["valid_loss"] == "") == ("valid_loss" not in m)

    # checkpoints are models: ft:BASE:SUFFIX:JOB:ckpt-step-N, served on first use, each its own weights
    ckpts = c.fine_tuning.jobs.checkpoints.list(job.id).data
    assert sorted(k.step_number for k in ckpts) == [2, 4, 6, 8]
    k2 = next(k for k in ckpts if k.step_number == 2)
    assert k2.fine_tuned_model_checkpoint == f"{job.fine_tuned_model}:ckpt-step-2"
    assert k2.metrics.valid_loss == pytest.approx(metrics[1]["valid_loss"])
    q = FACTS[0][0]
    first = c.completions.create(model=k2.fine_tuned_model_checkpoint, prompt=q, max_tokens=1, logprobs=5,
                                 temperature=0)
    last = c.completions.create(model=job.fine_tuned_model, prompt=q, max_tokens=1, logprobs=5, temperature=0)
    assert first.model == k2.fine_tuned_model_checkpoint
    assert first.choices[0].logprobs.top_logprobs != last.choices[0].logprobs.top_logprobs
    with pytest.raises(openai.NotFoundError):
        _chat(c, f"{job.fine_tuned_model}:ckpt-step-3", q, max_tokens=1)  # no checkpoint at step 3

    # W&B (offline) got the same metrics
    pytest.importorskip("wandb")
    from test_report import read_wandb

    series, _, run = read_wandb(server.tmp / "data" / "jobs" / job.id)
    assert run.project == "ftapi"
    assert series["train_mean_token_accuracy"] == pytest.approx({m["step"]: m["train_mean_token_accuracy"]
                                                                 for m in metrics})
    assert series["valid_mean_token_accuracy"] == pytest.approx({m["step"]: m["valid_mean_token_accuracy"]
                                                                 for m in metrics if "valid_loss" in m})


@pytest.mark.parametrize("hp,field", [({"adapter_method": "dora"}, "adapter_method"),
                                      ({"adapter_method": "nope"}, "adapter_method"),
                                      ({"lora_rank": 0}, "lora_rank"), ({"lora_alpha": -1}, "lora_alpha"),
                                      ({"lora_targets": "q_proj"}, "lora_targets"),
                                      ({"lora_targets": ["lm_head"]}, "lora_targets"),
                                      ({"eval_every": 0}, "eval_every"), ({"rank": 4}, "rank")])
def test_bad_leantune_hyperparameters_are_a_400_naming_them(server, hp, field):
    c = server.client()
    f = c.files.create(file=("facts.jsonl", _train_file()), purpose="fine-tune")
    with pytest.raises(openai.BadRequestError) as e:
        c.fine_tuning.jobs.create(model="model", training_file=f.id,
                                  method={"type": "supervised", "supervised": {"hyperparameters": hp}})
    assert field in e.value.message and e.value.body["param"] == "hyperparameters"
    c.files.delete(f.id)


def test_other_integrations_are_refused(server):
    c = server.client()
    f = c.files.create(file=("facts.jsonl", _train_file()), purpose="fine-tune")
    with pytest.raises(openai.BadRequestError) as e:
        c.fine_tuning.jobs.create(model="model", training_file=f.id,
                                  integrations=[{"type": "mlflow", "mlflow": {"project": "x"}}])
    assert e.value.body["param"] == "integrations" and "mlflow" in e.value.message
    c.files.delete(f.id)


def _wait_steps(c, job_id, n, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if any(m.get("step", 0) >= n for m in _metrics(c, job_id)):
            return
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not reach step {n}")


def test_pause_and_resume_continue_the_same_run(server):
    c = server.client()
    f = c.files.create(file=("facts.jsonl", _train_file(2)), purpose="fine-tune")
    hp = {"n_epochs": 5, "batch_size": 2, "learning_rate_multiplier": 5}
    ref = _wait_job(c, c.fine_tuning.jobs.create(model="model", training_file=f.id, seed=5, hyperparameters=hp).id)
    want = {m["step"]: m["train_loss"] for m in _metrics(c, ref.id)}

    job = c.fine_tuning.jobs.create(model="model", training_file=f.id, seed=5, hyperparameters=hp)
    _wait_steps(c, job.id, 2)
    paused = c.fine_tuning.jobs.pause(job.id)
    assert paused.status == "paused"
    at = len(_metrics(c, job.id))
    [rid] = c.fine_tuning.jobs.retrieve(job.id).result_files  # the result file is readable before the job ends
    assert len(read_results_csv(c.files.content(rid).text)) == at >= 2
    with pytest.raises(openai.BadRequestError):
        c.fine_tuning.jobs.pause(job.id)
    time.sleep(1.0)
    assert len(_metrics(c, job.id)) == at and c.fine_tuning.jobs.retrieve(job.id).status == "paused"
    assert c.fine_tuning.jobs.resume(job.id).status in ("queued", "running")
    done = _wait_job(c, job.id)
    assert done.status == "succeeded", done.error
    got = [(m["step"], m["train_loss"]) for m in _metrics(c, job.id)]
    assert [s for s, _ in got] == list(range(1, 11))  # each step once: none lost, none repeated
    assert dict(got) == pytest.approx(want, rel=1e-4)  # the losses of the run that never paused
    msgs = [e.message for e in c.fine_tuning.jobs.list_events(job.id, limit=100)]
    assert any(m.startswith("The job was paused at step") for m in msgs)
    with pytest.raises(openai.BadRequestError):
        c.fine_tuning.jobs.resume(job.id)  # succeeded: nothing to resume


def test_per_key_quotas_on_jobs_and_storage(server):
    c = server.client()
    f = c.files.create(file=("facts.jsonl", _train_file()), purpose="fine-tune")
    long = {"n_epochs": 100, "batch_size": 1}
    jobs = [c.fine_tuning.jobs.create(model="model", training_file=f.id, hyperparameters=long) for _ in range(2)]
    try:
        with pytest.raises(openai.RateLimitError) as e:
            c.fine_tuning.jobs.create(model="model", training_file=f.id, hyperparameters=long)
        assert e.value.body["code"] == "rate_limit_exceeded" and "--max-jobs-per-key" in e.value.message
        assert "cancel" in e.value.message
        c.fine_tuning.jobs.pause(jobs[0].id)  # a paused job still counts: it will resume
        with pytest.raises(openai.RateLimitError):
            c.fine_tuning.jobs.create(model="model", training_file=f.id, hyperparameters=long)
    finally:
        for j in jobs:
            c.fine_tuning.jobs.cancel(j.id)
    extra = c.fine_tuning.jobs.create(model="model", training_file=f.id, hyperparameters={"n_epochs": 1})
    c.fine_tuning.jobs.cancel(extra.id)

    # storage: 1 MiB per key; the files already stored count
    row = json.dumps({"messages": [{"role": "user", "content": "q" * 900}, {"role": "assistant", "content": "a"}]})
    big = ("\n".join([row] * 700)).encode()  # ~0.65 MiB
    kept = c.files.create(file=("big.jsonl", big), purpose="fine-tune")
    with pytest.raises(openai.APIStatusError) as e:
        c.files.create(file=("big2.jsonl", big), purpose="fine-tune")
    assert e.value.status_code == 413 and e.value.body["code"] == "storage_quota_exceeded"
    assert "--max-storage-mb-per-key" in e.value.message and "DELETE /v1/files" in e.value.message
    c.files.delete(kept.id)  # freeing space lets the upload in
    c.files.delete(c.files.create(file=("big2.jsonl", big), purpose="fine-tune").id)

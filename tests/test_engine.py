"""The serving engine in-process (unit tier, tiny model): outputs equal plain `generate`, preemption under
a small KV pool changes nothing, and a failing job fails alone."""
import json
import time

import pytest
import torch

import leantune
from leantune.models.generate import GenerationConfig, generate
from leantune.serve.engine import Engine, EngineConfig
from leantune.serve.requests import GenRequest
from leantune.serve.store import Store


@pytest.fixture(scope="module")
def model_tok(folder):
    model, tok = leantune.load(folder)
    return model.eval(), tok


def _engine(model_tok, tmp_path, **cfg):
    model, tok = model_tok
    return Engine(model, tok, "model", Store(tmp_path / "data"), EngineConfig(**cfg))


def _run(engine, prompts, max_tokens=8, model="model"):
    out = {}
    for i, p in enumerate(prompts):
        events = out.setdefault(i, [])
        engine.add_request(GenRequest(p, model, max_tokens=max_tokens, temperature=0, ignore_eos=True), events.append)
    for _ in range(10_000):
        if not engine.iteration():
            break
    return out


def test_engine_equals_generate_and_survives_preemption(model_tok, tmp_path, one_thread):
    model, tok = model_tok
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 400, (n,), generator=g).tolist() for n in (5, 17, 9, 30, 3, 12)]
    ref = [generate(model, [p], GenerationConfig(max_new_tokens=8))[0] for p in prompts]
    text = [tok.decode(r) for r in ref]
    for cfg in ({"num_blocks": 64, "block_size": 4}, {"num_blocks": 12, "block_size": 4, "max_tokens_per_step": 16}):
        e = _engine(model_tok, tmp_path / str(cfg["num_blocks"]), **cfg)
        out = _run(e, prompts)
        for i in range(len(prompts)):
            assert "".join(ev["text"] for ev in out[i]) == text[i]
            assert out[i][-1]["finish_reason"] == "length" and out[i][-1]["completion_tokens"] == 8
        assert e.blocks.num_free == e.blocks.num_blocks and not e.reqs
        if cfg["num_blocks"] == 12:
            assert e.stats.preemptions > 0  # the small pool really forced recomputation


def test_a_failing_job_fails_alone(model_tok, tmp_path, one_thread):
    e = _engine(model_tok, tmp_path, num_blocks=64, block_size=4)
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]
    f = e.store.add_file("o", "t.jsonl", "fine-tune", "\n".join(json.dumps(r) for r in rows).encode())
    job = e.store.add_job("o", "model", f["id"], hyperparameters={"n_epochs": 1})
    e.store.delete_file("o", f["id"])  # gone before the job starts
    out = _run(e, [[5, 6, 7]])
    assert out[0][-1]["finish_reason"] == "length"
    j = e.store.get_job("o", job["id"])
    assert j["status"] == "failed" and "no longer exists" in j["error"]["message"]
    assert not [n for n in leantune.methods.list_adapters(model_tok[0]) if n.startswith("job_")]


def test_time_share_holds_the_job_back_while_serving_and_lets_it_finish_after(model_tok, tmp_path, one_thread):
    e = _engine(model_tok, tmp_path, num_blocks=64, block_size=4, ft_max_chunk=8, ft_time_share=1e-6)
    rows = [{"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]}
            for i in range(3)]
    f = e.store.add_file("o", "t.jsonl", "fine-tune", "\n".join(json.dumps(r) for r in rows).encode())
    job = e.store.add_job("o", "model", f["id"], hyperparameters={"n_epochs": 1})
    done = []
    for p in ([5, 6, 7], [8, 9], [10, 11, 12, 13]):
        e.add_request(GenRequest(p, "model", max_tokens=24, temperature=0, ignore_eos=True),
                      lambda ev: done.append(ev) if ev.get("finish_reason") else None)
    while len(done) < 3:
        assert e.iteration()
    # a vanishing share: after one chunk the job owes more time than serving will ever credit it
    assert e.stats.ft_tokens <= 8 and e.stats.ft_steps == 0
    for _ in range(10_000):
        if not e.iteration():
            break
    assert e.store.get_job("o", job["id"])["status"] == "succeeded" and e.stats.ft_steps == 3
    with pytest.raises(ValueError, match="ft_time_share"):
        EngineConfig(ft_time_share=0)


def test_serve_time_share_option():
    """`leantune serve --ft-time-share`: 0.1 by default, inf = no bound (the leftover budget alone), and
    values that are not > 0 refused with the option's name."""
    from leantune.recipes.serve import ServeConfig

    assert ServeConfig().engine_config().ft_time_share == 0.10 == EngineConfig().ft_time_share
    assert ServeConfig(ft_time_share=float("inf")).engine_config().ft_time_share is None
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="--ft-time-share"):
            ServeConfig(ft_time_share=bad)


def _chat_file(store, rows: int, offset: int = 0) -> str:
    data = [{"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]}
            for i in range(offset, offset + rows)]
    return store.add_file("o", "t.jsonl", "fine-tune", "\n".join(json.dumps(r) for r in data).encode())["id"]


def test_job_validation_loss_is_the_token_mean_loss_of_the_published_adapter(model_tok, tmp_path, one_thread):
    """The validation loss a finished job reports is the published adapter's token-mean loss on the validation
    file, as full (T, V) logits give it (the job computes it without them: `train.loss.heldout_loss`)."""
    import copy

    from leantune.data import load_dataset
    from leantune.methods.base import adapter_slots
    from leantune.models.llama import ForwardMeta
    from leantune.train.loss import shifted_targets

    model, tok = copy.deepcopy(model_tok[0]), model_tok[1]  # the published adapter stays in this tree
    e = Engine(model, tok, "model", Store(tmp_path / "data"), EngineConfig(num_blocks=64, block_size=4))
    train, valid = _chat_file(e.store, 2), _chat_file(e.store, 3, offset=10)
    job = e.store.add_job("o", "model", train, validation_file=valid,
                          hyperparameters={"n_epochs": 2, "learning_rate_multiplier": 50})
    _run(e, [])
    j = e.store.get_job("o", job["id"])
    assert j["status"] == "succeeded", j
    events = e.store.list_events(job["id"], limit=100)[0]
    (got,) = [ev["data"]["valid_loss"] for ev in events if "valid_loss" in (ev["data"] or {})]
    slot = adapter_slots(model)[e.adapters[j["fine_tuned_model"]].internal]
    examples = load_dataset(e.store.file_path("o", valid), tok, 1024)

    def full_logits_loss(slot: int) -> float:
        total, n = 0.0, 0
        with torch.no_grad():
            for ex in examples:
                logits = model(torch.tensor([ex.input_ids]), ForwardMeta(adapter_ids=torch.tensor([slot])))[0]
                tgt = shifted_targets(torch.tensor([ex.labels]))[0]
                total += float(torch.nn.functional.cross_entropy(logits.float(), tgt, reduction="sum"))
                n += ex.num_loss_tokens
        return total / n

    assert got == pytest.approx(full_logits_loss(slot), rel=1e-5)
    assert got != pytest.approx(full_logits_loss(-1), rel=1e-3)  # the base model's: the job trained


def test_serve_finetune_flags_are_what_an_auto_job_trains_with(model_tok, tmp_path, one_thread):
    """`leantune serve --ft-rank --ft-alpha --ft-max-length --ft-lr --ft-beta`: a job whose hyperparameters say
    "auto" trains a LoRA of that rank and alpha on examples truncated to that length at that lr (a DPO job at
    that beta); bad values are refused with the flag's name."""
    import copy

    from leantune.methods import adapter_configs
    from leantune.recipes.serve import ServeConfig
    from leantune.serve.ft_defaults import FineTuneDefaults

    assert ServeConfig().engine_config().finetune == FineTuneDefaults() == EngineConfig().finetune
    cfg = ServeConfig(ft_rank=4, ft_alpha=8.0, ft_max_length=27, ft_lr=2e-3, num_blocks=64, block_size=4)
    model, tok = copy.deepcopy(model_tok[0]), model_tok[1]
    e = Engine(model, tok, "model", Store(tmp_path / "data"), cfg.engine_config())
    auto = {k: "auto" for k in ("n_epochs", "batch_size", "learning_rate_multiplier")}
    job = e.store.add_job("o", "model", _chat_file(e.store, 3), hyperparameters=auto)
    e.jobs.poll()
    a = e.jobs.active
    assert (a.trainer.cfg.learning_rate, a.trainer.cfg.n_epochs, a.trainer.cfg.batch_size) == (2e-3, 3, 1)
    lora = adapter_configs(model)[a.adapter]
    assert (lora.r, lora.alpha) == (4, 8.0)
    assert max(len(ex) for ex in a.trainer.examples) == 27  # the chat rows (31 tokens) are truncated
    assert e.store.get_job("o", job["id"])["hyperparameters"] == {
        "n_epochs": 3, "batch_size": 1, "learning_rate_multiplier": 1.0, "adapter_method": "lora", "lora_rank": 4,
        "lora_alpha": 8.0, "lora_targets": "all-linear", "eval_every": FineTuneDefaults.eval_every}
    from leantune.serve.jobs import hyperparameters

    dpo = {"method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": "auto"}}}}
    assert hyperparameters(dpo, ServeConfig(ft_beta=0.3).engine_config().finetune).beta == 0.3
    assert hyperparameters(dpo, cfg.engine_config().finetune).beta == FineTuneDefaults.beta == 0.1
    for flag, bad in (("--ft-rank", 0), ("--ft-alpha", 0.0), ("--ft-max-length", -1), ("--ft-lr", float("nan")),
                      ("--ft-beta", 0.0)):
        with pytest.raises(ValueError, match=flag):
            ServeConfig(**{flag[2:].replace("-", "_"): bad})


def _pair_file(store, rows: int) -> str:
    data = [{"input": {"messages": [{"role": "user", "content": f"question {i}"}]},
             "preferred_output": [{"role": "assistant", "content": f"answer {i}"}],
             "non_preferred_output": [{"role": "assistant", "content": f"answer {i + 1}"}]} for i in range(rows)]
    return store.add_file("o", "p.jsonl", "fine-tune", "\n".join(json.dumps(r) for r in data).encode())["id"]


def _dpo_losses(store, job_id) -> list[float]:
    events = reversed(store.list_events(job_id, limit=100)[0])
    return [ev["data"]["train_loss"] for ev in events if ev["type"] == "metrics" and "train_loss" in ev["data"]]


def test_dpo_job_cut_at_a_checkpoint_resumes_to_the_uninterrupted_losses(model_tok, tmp_path, one_thread):
    """A DPO job (method.type "dpo") whose engine stops after its first checkpoint resumes in a new engine on the
    same data dir (as after kill -9) and logs the same per-step losses as a run never cut."""
    import copy

    from leantune.train.checkpoint import list_checkpoints

    method = {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.5, "n_epochs": 3, "batch_size": 1,
                                                          "learning_rate_multiplier": 20}}}
    cfg = dict(num_blocks=64, block_size=4, checkpoint_every=2)

    def engine(data):
        return Engine(copy.deepcopy(model_tok[0]), model_tok[1], "model", Store(data), EngineConfig(**cfg))

    whole = engine(tmp_path / "whole")
    job = whole.store.add_job("o", "model", _pair_file(whole.store, 2), method=method, seed=4)
    torch.manual_seed(0)  # the job's LoRA A is drawn when it starts: the same in both runs
    _run(whole, [])
    assert whole.store.get_job("o", job["id"])["status"] == "succeeded"
    expected = _dpo_losses(whole.store, job["id"])
    assert len(expected) == 6 and expected[0] == pytest.approx(0.6931, abs=1e-3)

    cut = engine(tmp_path / "cut")
    job = cut.store.add_job("o", "model", _pair_file(cut.store, 2), method=method, seed=4)
    torch.manual_seed(0)
    while not list_checkpoints(cut.store.job_dir(job["id"])):
        assert cut.iteration()
    assert cut.store.get_job("o", job["id"])["status"] == "running"
    resumed = engine(tmp_path / "cut")  # the first engine is dropped mid-job, its model tree with it
    _run(resumed, [])
    j = resumed.store.get_job("o", job["id"])
    assert j["status"] == "succeeded", j
    assert j["method"]["dpo"]["hyperparameters"]["beta"] == 0.5
    assert resumed.stats.ft_tokens == j["trained_tokens"] - cut.stats.ft_tokens > 0  # /metrics counts its tokens
    assert any(ev["message"] == "Resumed from the checkpoint at step 2"
               for ev in resumed.store.list_events(job["id"], limit=100)[0])
    assert _dpo_losses(resumed.store, job["id"]) == pytest.approx(expected, rel=1e-4)


def test_prompt_longer_than_a_step_is_prefilled_over_several_steps(model_tok, tmp_path, one_thread):
    """A step whose only chunk is a long prompt's non-final prefill samples nothing (the runner returns no
    logits): the request goes on and its tokens equal generate's."""
    model, tok = model_tok
    prompt = list(range(3, 60))  # 57 tokens, 4 steps of 16
    ref = generate(model, [prompt], GenerationConfig(max_new_tokens=4))[0]
    out = _run(_engine(model_tok, tmp_path, num_blocks=64, block_size=4, max_tokens_per_step=16), [prompt], 4)
    assert "".join(ev["text"] for ev in out[0]) == tok.decode(ref)


def test_a_failing_iteration_fails_its_requests_and_prints_why(model_tok, tmp_path, one_thread, capfd):
    e = _engine(model_tok, tmp_path, num_blocks=64, block_size=4)

    def broken(works):
        raise RuntimeError("forward exploded")

    e.runner.step = broken  # the engine loop's own error path, not a test double of it
    events = []
    e.start()
    try:
        e.call(e.add_request, GenRequest([5, 6, 7], "model", max_tokens=4, temperature=0), events.append).result(30)
        deadline = time.monotonic() + 30  # a bound, not a timing assertion
        while not events and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        e.stop()
    assert events and events[-1]["finish_reason"] == "error" and "server log" in events[-1]["error"]
    err = capfd.readouterr().err
    assert "an iteration failed" in err and "RuntimeError: forward exploded" in err
    assert not e.reqs and e.blocks.num_free == e.blocks.num_blocks

"""`/metrics` through prometheus-client (recipe tier, tiny model, two servers in one process): vLLM's latency
histograms and token counters under `leantune:`, the Gateway API Inference Extension's LoRA gauge, leantune's own
engine counters, each server with its own registry; and a chat request for an adapter rendered with the adapter
folder's own chat template."""
import json

import pytest
import torch

import leantune
from leantune.methods import save_adapter

prom_parser = pytest.importorskip("prometheus_client.parser")
testclient = pytest.importorskip("fastapi.testclient")


@pytest.fixture(scope="module")
def adapter(folder, tmp_path_factory):
    model, _ = leantune.load(folder)
    leantune.apply(model, "lora", r=4, targets="all-linear")
    out = save_adapter(model, tmp_path_factory.mktemp("ad") / "templated")
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": "{% for m in messages %}<<TEMPLATED>> {{ m['content'] }} <<END>>{% endfor %}"}))
    return out


def _server(folder, tmp, *adapters, start=True, **kw):
    from leantune.recipes.serve import ServeConfig, build_server

    cfg = ServeConfig(model=str(folder), adapter=list(adapters), data_dir=str(tmp / "data"), dtype="fp32",
                      device="cpu", num_blocks=64, block_size=4, **kw)
    app, engine = build_server(cfg)
    if start:
        engine.start()
    return testclient.TestClient(app), engine


def _families(client) -> dict:
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {f.name: f for f in prom_parser.text_string_to_metric_families(r.text)}


def _sample(fam, suffix: str, **labels) -> float:
    return next(s.value for s in fam.samples if s.name == fam.name + suffix and
                all(s.labels.get(k) == v for k, v in labels.items()))


def test_metrics_after_requests_two_servers_apart(folder, adapter, tmp_path, one_thread):
    one, e1 = _server(folder, tmp_path / "one", f"ad={adapter}", max_loras=3)
    two, e2 = _server(folder, tmp_path / "two")  # a second registry in the same process: no clash
    try:
        n, max_tokens = 3, 5
        for i in range(n):
            r = one.post("/v1/completions", json={"model": "ad" if i else "model", "prompt": "The quick brown",
                                                  "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True})
            assert r.status_code == 200, r.text
        fams = _families(one)
        prompt = len(e1.tk.encode("The quick brown"))
        assert _sample(fams["leantune:prompt_tokens"], "_total") == n * prompt
        assert _sample(fams["leantune:generation_tokens"], "_total") == n * max_tokens
        for name in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds",
                     "time_per_output_token_seconds"):
            fam = fams[f"leantune:{name}"]
            assert fam.type == "histogram"
            assert _sample(fam, "_count") == n and _sample(fam, "_bucket", le="+Inf") == n
            assert _sample(fam, "_sum") > 0
        e2e, ttft = fams["leantune:e2e_request_latency_seconds"], fams["leantune:time_to_first_token_seconds"]
        assert _sample(e2e, "_sum") >= _sample(ttft, "_sum")
        lora = fams["vllm:lora_requests_info"]
        (s,) = lora.samples  # one series, labelled as the inference gateway reads it
        assert s.labels == {"running_lora_adapters": "", "waiting_lora_adapters": "", "max_lora": "3"}
        assert s.value > 1e9  # the scrape's Unix time
        # leantune's engine counters keep their names
        assert _sample(fams["leantune_requests"], "_total") == n
        assert _sample(fams["leantune_generation_tokens"], "_total") == n * max_tokens
        assert _sample(fams["leantune_adapters_resident"], "") == 1
        # the other server counted nothing
        other = _families(two)
        assert _sample(other["leantune:generation_tokens"], "_total") == 0
        assert _sample(other["leantune:time_to_first_token_seconds"], "_count") == 0
        assert other["vllm:lora_requests_info"].samples[0].labels["max_lora"] == "0"
    finally:
        e1.stop()
        e2.stop()


def test_lora_gauge_names_running_and_waiting_adapters(folder, adapter, tmp_path, one_thread):
    from leantune.serve.requests import GenRequest

    # not started: the test steps the engine itself (a running engine thread would race it)
    _, e = _server(folder, tmp_path, f"ad={adapter}", start=False, max_tokens_per_step=4, max_seqs=1)
    for model in ("ad", "model", "ad"):
        e.add_request(GenRequest([5, 6, 7], model, max_tokens=3, temperature=0, ignore_eos=True), lambda ev: None)
    e.iteration()  # max_seqs 1: the first runs, the others wait
    text = e.metrics.scrape().decode()
    fams = {f.name: f for f in prom_parser.text_string_to_metric_families(text)}
    (s,) = fams["vllm:lora_requests_info"].samples
    assert s.labels["running_lora_adapters"] == "ad" and s.labels["waiting_lora_adapters"] == "ad"
    assert _sample(fams["leantune:num_requests_waiting"], "") == 2


def test_chat_uses_the_adapter_folders_template(folder, adapter, tmp_path, one_thread):
    client, e = _server(folder, tmp_path, f"ad={adapter}")
    try:
        msgs = [{"role": "user", "content": "hello there"}]
        usage = {}
        for model in ("model", "ad"):
            r = client.post("/v1/chat/completions", json={"model": model, "messages": msgs, "max_tokens": 1})
            assert r.status_code == 200, r.text
            usage[model] = r.json()["usage"]["prompt_tokens"]
        templated = e.tk.encode("<<TEMPLATED>> hello there <<END>>", add_special_tokens=False)
        assert usage["ad"] == len(templated) != usage["model"]
        assert usage["model"] == len(e.tk.encode_chat(msgs, add_generation_prompt=True))
        for model in ("model", "ad"):  # /tokenize counts the messages as that model's chat request does
            r = client.post("/tokenize", json={"model": model, "messages": msgs})
            assert r.status_code == 200, r.text
            assert r.json()["count"] == usage[model]
    finally:
        e.stop()

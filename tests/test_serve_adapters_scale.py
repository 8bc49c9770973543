"""Adapters at scale (issue 17 item 6): the LRU policy of `serve.adapter_cache` (unit), the engine spilling
adapters to host memory and disk under --max-loras / --max-cpu-loras with outputs unchanged and requests
waiting rather than failing, the --lora-dir resolver, a per-adapter chat template, and a QLoRA adapter served
on the --quantize nf4 base."""
import pytest
import torch

import leantune
from leantune.methods import list_adapters, save_adapter
from leantune.serve.adapter_cache import AdapterCache, Move, Tier
from leantune.serve.engine import Engine, EngineConfig
from leantune.serve.requests import GenRequest
from leantune.serve.store import Store


# -- policy (no torch) ---------------------------------------------------------------------------------

def test_lru_spills_the_least_recently_used_unpinned_and_drops_past_max_cpu():
    c = AdapterCache(max_loras=2, max_cpu_loras=3)
    for n in ("a", "b"):
        c.add(n)
    c.add("c", Tier.DISK)
    c.touch("a")  # b is now the least recently used resident
    assert c.make_resident("c", pinned=set()) == [Move("b", Tier.CPU), Move("c", Tier.DEVICE)]
    c.apply([Move("b", Tier.CPU), Move("c", Tier.DEVICE)])
    assert c.names(Tier.DEVICE) == ["a", "c"] and c.names(Tier.CPU) == ["b"]
    # a pinned LRU resident is skipped; memory holds 3 in all (resident included): the oldest CPU-held one
    # goes to disk
    c.add("d", Tier.DISK)
    moves = c.make_resident("d", pinned={"a"})
    assert moves == [Move("c", Tier.CPU), Move("b", Tier.DISK), Move("d", Tier.DEVICE)]
    c.apply(moves)
    assert c.names(Tier.DEVICE) == ["a", "d"] and c.names(Tier.CPU) == ["c"] and c.names(Tier.DISK) == ["b"]
    # every resident pinned: the request waits
    assert c.make_resident("b", pinned={"a", "d"}) is None
    # a CPU-held adapter coming back is not counted twice, nor dropped itself: nothing goes to disk
    assert c.make_resident("c", pinned={"a"}) == [Move("d", Tier.CPU), Move("c", Tier.DEVICE)]


def test_over_limit_after_a_load_and_the_defaults():
    c = AdapterCache(max_loras=1)  # max_cpu_loras defaults to max_loras (vLLM): nothing kept beyond residents
    c.add("a")
    c.add("b")  # loaded into the tree first
    assert c.over_limit(pinned=set()) == [Move("a", Tier.DISK)]
    assert c.over_limit(pinned={"a"}) == [Move("b", Tier.DISK)]  # the new one itself when the rest is pinned
    unbounded = AdapterCache()
    for n in "abc":
        unbounded.add(n)
    assert unbounded.over_limit(set()) == [] and unbounded.make_resident("a", set()) == []
    with pytest.raises(ValueError, match="max-cpu-loras"):
        AdapterCache(max_loras=4, max_cpu_loras=2)
    with pytest.raises(ValueError, match="needs --max-loras"):
        AdapterCache(max_cpu_loras=2)
    with pytest.raises(ValueError, match="max-loras"):
        AdapterCache(max_loras=0)


# -- the engine ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_tok(folder):
    model, tok = leantune.load(folder)
    return model.eval(), tok


@pytest.fixture(scope="module")
def adapters(folder, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("adapters")
    out = {}
    for i in range(4):
        model, _ = leantune.load(folder)
        leantune.apply(model, "lora", r=4, targets="all-linear")
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        out[f"ad{i}"] = save_adapter(model, tmp / f"ad{i}")
    (out["ad1"] / "chat_template.jinja").write_text(
        "{% for m in messages %}ADAPTER-ONE {{ m['content'] }}\n{% endfor %}")
    return out


def _engine(model_tok, tmp_path, **cfg):
    model, tok = model_tok
    return Engine(model, tok, "model", Store(tmp_path / "data"), EngineConfig(num_blocks=64, block_size=4, **cfg))


def _generate(engine, jobs, max_tokens=6):
    """jobs: [(model, prompt)] all queued at once; the greedy token ids of each, in order."""
    out = [[] for _ in jobs]
    for i, (model, prompt) in enumerate(jobs):
        engine.add_request(GenRequest(prompt, model, max_tokens=max_tokens, temperature=0, ignore_eos=True),
                           out[i].append)
    for _ in range(10_000):
        if not engine.iteration():
            break
    assert all(evs and evs[-1].get("finish_reason") == "length" for evs in out), out
    return ["".join(e["text"] for e in evs) for evs in out]


def test_max_loras_spills_and_reloads_with_outputs_unchanged(model_tok, adapters, tmp_path, one_thread):
    jobs = [(f"ad{i % 4}", [5 + i, 6, 7, 8 + i]) for i in range(8)] + [("model", [5, 6, 7])]
    free = _engine(model_tok, tmp_path / "free")
    for name, path in adapters.items():
        free.load_adapter(name, str(path), None)
    ref = _generate(free, jobs)
    for name in adapters:
        free.unload_adapter(name, None)
    assert len(set(ref[:4])) == 4  # the adapters really differ

    e = _engine(model_tok, tmp_path / "lru", max_loras=2, max_cpu_loras=3)
    for name, path in adapters.items():
        e.load_adapter(name, str(path), None)
    tiers = {n: e.adapter_cache.tier(a.internal) for n, a in e.adapters.items()}
    assert tiers == {"ad0": Tier.DISK, "ad1": Tier.CPU, "ad2": Tier.DEVICE, "ad3": Tier.DEVICE}
    assert len([n for n in list_adapters(e.model) if not n.startswith("job_")]) == 2
    # 4 adapters in one queue: only 2 fit, so requests wait for their adapter, none fails, outputs equal
    assert _generate(e, jobs) == ref
    assert not e._adapter_wait and not e.reqs
    assert len(e.adapter_cache.names(Tier.DEVICE)) == 2 and len(e.adapter_cache.names(Tier.CPU)) == 1
    # one at a time, the LRU order decides: each comes back from host memory or its folder, same tokens
    for i in (0, 1, 2, 3, 0):
        assert _generate(e, [jobs[i]]) == [ref[i]]
    for name in adapters:
        e.unload_adapter(name, None)
    assert not list_adapters(e.model) and not e._by_internal


def test_lora_dir_resolver_and_chat_template(model_tok, adapters, tmp_path, one_thread):
    lora_dir = next(iter(adapters.values())).parent
    e = _engine(model_tok, tmp_path, lora_dir=str(lora_dir), max_loras=1)
    assert not e.adapters
    with pytest.raises(KeyError):
        e.resolve("nope", None)
    for bad in ("..", "../ad0", "ad0/", "/ad0", "."):
        assert not e.resolvable(bad)
        with pytest.raises(KeyError):
            e.resolve(bad, None)
    out = _generate(e, [("ad2", [5, 6, 7]), ("ad3", [5, 6, 7])])  # the second waits for the only place
    assert set(e.adapters) == {"ad2", "ad3"} and out[0] != out[1]
    # a folder with its own template: the chat renders with it, others with the base model's
    assert e.chat_template("ad1").startswith("{% for m in messages %}ADAPTER-ONE")
    assert e.chat_template("ad2") is None and e.chat_template("model") is None


def test_bad_folder_in_lora_dir_fails_the_request_not_the_engine(model_tok, tmp_path, one_thread):
    (tmp_path / "lora" / "broken").mkdir(parents=True)
    (tmp_path / "lora" / "broken" / "adapter_config.json").write_text("{}")  # no weights
    e = _engine(model_tok, tmp_path, lora_dir=str(tmp_path / "lora"))
    with pytest.raises(ValueError, match="could not be loaded"):
        e.add_request(GenRequest([5, 6], "broken", max_tokens=2, temperature=0), lambda ev: None)
    assert not e.reqs and _generate(e, [("model", [5, 6])])


def test_qlora_adapter_on_the_nf4_base_equals_generate(folder, tmp_path, one_thread):
    from leantune.methods import save
    from leantune.models.generate import GenerationConfig, generate
    from leantune.models.loader import load_model
    from leantune.precision import resolve_precision
    from leantune.quant import Quant4bitConfig, linear4bit_layers
    from leantune.recipes.serve import ServeConfig, build_server

    model, _ = leantune.load(folder)
    leantune.apply(model, "qlora", r=4, targets="all-linear")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    out = save(model, tmp_path / "qlora")
    assert (out / "leantune.json").is_file()  # the 4-bit base it was trained on
    # `leantune generate`'s path: the sidecar's 4-bit base, the adapter loaded on it
    ref_model, _ = load_model(str(folder), resolve_precision("fp32", torch.device("cpu")),
                              quantize=Quant4bitConfig())
    leantune.load_adapter(ref_model.eval(), out)
    prompt = [5, 6, 7, 8]
    ref = generate(ref_model, [prompt], GenerationConfig(max_new_tokens=8))[0]

    cfg = ServeConfig(model=str(folder), quantize="nf4", adapter=[f"q={out}"], data_dir=str(tmp_path / "data"),
                      dtype="fp32", device="cpu", num_blocks=64, block_size=4, max_loras=1)
    _, engine = build_server(cfg)
    assert linear4bit_layers(engine.model)  # the served base is 4-bit
    events = []
    engine.add_request(GenRequest(prompt, "q", max_tokens=8, temperature=0, ignore_eos=True), events.append)
    while engine.iteration():
        pass
    assert "".join(e["text"] for e in events) == engine.tk.decode(ref)
    with pytest.raises(ValueError, match="nf4 or fp4"):
        ServeConfig(quantize="int8")


def test_embeddings_make_their_adapter_resident_and_pin_it(model_tok, adapters, tmp_path, one_thread):
    """An embedding request for an adapter spilled by --max-loras loads it back (it used to look up a slot the
    adapter no longer had), and its reference pins it between micro-batches as a generation's does."""
    from leantune.serve import embed

    rows = [[5, 6, 7, 8], [9, 10]]
    free = _engine(model_tok, tmp_path / "free")
    for name in ("ad0", "ad1"):
        free.load_adapter(name, str(adapters[name]), None)
    ref = {}
    for name in ("ad0", "ad1"):
        held = embed.hold(free, name, None)
        ref[name] = embed.decoder_forward(free, rows, held)
        free._release(held.entry)
    for name in ("ad0", "ad1"):
        free.unload_adapter(name, None)
    assert not torch.allclose(ref["ad0"], ref["ad1"])  # the adapters really differ

    e = _engine(model_tok, tmp_path / "lru", max_loras=1)
    for name in ("ad0", "ad1"):
        e.load_adapter(name, str(adapters[name]), None)
    assert e.adapter_cache.tier(e.adapters["ad0"].internal) is not Tier.DEVICE  # spilled by ad1's load
    held = embed.hold(e, "ad0", None)
    torch.testing.assert_close(embed.decoder_forward(e, rows, held), ref["ad0"])
    assert e.adapter_cache.tier(held.entry.internal) is Tier.DEVICE
    # held: a request for the other adapter cannot evict it, so it waits
    out = []
    e.add_request(GenRequest([5, 6, 7], "ad1", max_tokens=2, temperature=0, ignore_eos=True), out.append)
    e.iteration()
    assert not out and e._adapter_wait
    torch.testing.assert_close(embed.decoder_forward(e, rows, held), ref["ad0"])
    e._release(held.entry)  # the embedding is done: ad1's request runs
    for _ in range(100):
        if not e.iteration():
            break
    assert out and out[-1]["finish_reason"] == "length" and not e._adapter_wait

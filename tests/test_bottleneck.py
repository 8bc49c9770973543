"""Bottleneck adapters (oracles: methods-more.md §3.3): output unchanged at init for every placement and
mode, the one-sided zero init lets both projections learn (and the two-sided one of PETL-AST does not), the
parallel and sequential formulas, per-row routing, parameter count, save/load, and the CLI."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

import leantune.methods as lm
from leantune import cli
from leantune.methods import BottleneckConfig, BottleneckLayer
from leantune.models.loader import load

pytestmark = pytest.mark.usefixtures("one_thread")

GRID = [(p, m) for p in ("houlsby", "pfeiffer") for m in ("sequential", "parallel")]


@pytest.fixture(scope="module")
def base(folder):
    return load(folder)[0].eval()


@pytest.fixture
def model(base):
    return copy.deepcopy(base)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 400, (3, 7), generator=torch.Generator().manual_seed(1))


def randomize(model, adapter="default", std=0.1, seed=3):
    """Nonzero W_up and biases, so the adapter does something."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lm.adapter_layers(model):
            if layer.has_adapter(adapter):
                for p in layer.adapter_parameters(adapter):
                    p.copy_(torch.randn(p.shape, generator=gen) * std)


def lm_loss(model, ids):
    logits = model(ids)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


# ---------------------------------------------------------------------------------------------
# init


@pytest.mark.parametrize("placement,mode", GRID)
def test_output_unchanged_at_init(placement, mode, model, base, ids):
    lm.apply(model, "bottleneck", placement=placement, mode=mode, size=8)
    wrapped = sorted(n.rsplit(".", 1)[1] for n, _ in lm.adapter_layers(model))
    assert wrapped == (["mlp", "mlp", "self_attn", "self_attn"] if placement == "houlsby" else ["mlp", "mlp"])
    with torch.no_grad():
        assert torch.equal(model(ids), base(ids))


@pytest.mark.parametrize("mode", ["sequential", "parallel"])
def test_output_unchanged_on_a_transformers_model(mode):
    """Methods work on any nn.Module: HF's attention takes keyword arguments and returns a tuple."""
    pytest.importorskip("transformers")
    from hf_tiny import tiny_llama

    hf = tiny_llama()
    ids = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = hf(ids).logits
        lm.apply(hf, "bottleneck", placement="houlsby", mode=mode, size=4)
        assert torch.equal(hf(ids).logits, want)
        randomize(hf)
        assert (hf(ids).logits - want).abs().max() > 1e-3


def test_parameter_count_and_init(model):
    lm.apply(model, "bottleneck", size=8)
    d = model.config.hidden_size
    for _, layer in lm.adapter_layers(model):
        assert sum(p.numel() for p in layer.adapter_parameters("default")) == 2 * d * 8 + 8 + d
        assert layer.adapter_down["default"].weight.abs().min() > 0  # random
        for t in (layer.adapter_up["default"].weight, layer.adapter_up["default"].bias,
                  layer.adapter_down["default"].bias):
            assert not t.any()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapter_" in n for n in trainable)


def _grads(model, ids):
    model.zero_grad(set_to_none=True)
    lm_loss(model, ids).backward()
    layer = model.model.layers[1].mlp
    return layer.adapter_down["default"].weight.grad, layer.adapter_up["default"].weight.grad


def test_both_projections_learn_after_one_step(model, ids):
    """W_up = 0 only: dW_up != 0 at once; dW_down = W_up^T(...) = 0 exactly at step 0 and != 0 after it."""
    lm.apply(model, "bottleneck", size=8, mode="sequential")
    g_down, g_up = _grads(model, ids)
    assert g_up.abs().max() > 0 and not g_down.any()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    opt.step()
    g_down, g_up = _grads(model, ids)
    assert g_up.abs().max() > 0 and g_down.abs().max() > 0


def test_pitfall_zero_init_of_both_projections_never_learns(model, ids):
    """PETL-AST's init (both W zero): GELU(0) = 0 keeps dW_up = dW_down = 0 for ever; only b_up moves."""
    lm.apply(model, "bottleneck", size=8, nonlinearity="gelu")
    layers = [layer for _, layer in lm.adapter_layers(model)]
    with torch.no_grad():
        for layer in layers:
            layer.adapter_down["default"].weight.zero_()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(10):
        opt.zero_grad()
        lm_loss(model, ids).backward()
        opt.step()
    for layer in layers:
        assert not layer.adapter_down["default"].weight.any() and not layer.adapter_up["default"].weight.any()
    assert any(layer.adapter_up["default"].bias.any() for layer in layers)


# ---------------------------------------------------------------------------------------------
# the math


@pytest.mark.parametrize("mode", ["sequential", "parallel"])
def test_layer_formula(mode, base):
    mlp = copy.deepcopy(base.model.layers[0].mlp)
    layer = BottleneckLayer(copy.deepcopy(mlp))
    cfg = BottleneckConfig(size=5, mode=mode, nonlinearity="tanh", scaling=0.5)
    layer.add_adapter("a", 0, cfg)
    layer.active_adapters = ["a"]
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in layer.adapter_parameters("a"):
            p.copy_(torch.randn(p.shape, generator=gen))
        x = torch.randn(2, 4, mlp.gate_proj.in_features, generator=gen)
        down, up = layer.adapter_down["a"], layer.adapter_up["a"]
        o = mlp(x)
        src = o if mode == "sequential" else x
        want = o + 0.5 * (torch.tanh(src @ down.weight.T + down.bias) @ up.weight.T + up.bias)
        torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)
        other = o + 0.5 * (torch.tanh((x if mode == "sequential" else o) @ down.weight.T + down.bias) @ up.weight.T
                           + up.bias)
        assert (layer(x) - other).abs().max() > 1e-2  # the two modes really differ


def test_mixed_batch_routes_each_row_to_its_adapter(model, ids):
    lm.apply(model, "bottleneck", adapter_name="a", placement="houlsby", mode="sequential", size=4)
    lm.apply(model, "bottleneck", adapter_name="b", placement="pfeiffer", mode="parallel", size=6)
    randomize(model, "a", seed=1)
    randomize(model, "b", seed=2)
    slots = lm.adapter_slots(model)
    with torch.no_grad():
        alone = {}
        for name in ("a", "b"):
            lm.set_adapter(model, name)
            alone[name] = model(ids)
        with lm.disable_adapters(model):
            alone[None] = model(ids)
        from leantune.models.llama import ForwardMeta

        mixed = model(ids, ForwardMeta(adapter_ids=torch.tensor([slots["b"], -1, slots["a"]])))
        per_token = torch.tensor([[slots["a"]] * 7, [slots["b"]] * 7, [-1] * 7])
        by_token = model(ids, ForwardMeta(adapter_ids=per_token))
    torch.testing.assert_close(mixed[0], alone["b"][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed[1], alone[None][1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed[2], alone["a"][2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(by_token[0], alone["a"][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(by_token[1], alone["b"][1], rtol=1e-5, atol=1e-5)
    assert (alone["a"] - alone["b"]).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------
# state, I/O, errors


def test_base_state_dict_unload_and_merge_refused(model, base, ids):
    lm.apply(model, "bottleneck", placement="houlsby", size=4)
    randomize(model)
    assert lm.get_base_state_dict(model).keys() == base.state_dict().keys()
    with pytest.raises(ValueError, match="nonlinear"):
        lm.merge_and_unload(model)
    lm.unload(model)
    with torch.no_grad():
        assert torch.equal(model(ids), base(ids))


def test_save_load_round_trip(model, base, ids, tmp_path):
    lm.apply(model, "bottleneck", placement="houlsby", mode="sequential", size=4, nonlinearity="relu", scaling=2.0)
    randomize(model)
    out = lm.save_bottleneck(model, tmp_path / "ad")
    assert {p.name for p in out.iterdir()} == {"bottleneck_config.json", "bottleneck_model.safetensors"}
    meta = json.loads((out / "bottleneck_config.json").read_text())
    assert meta["config"]["mode"] == "sequential" and meta["config"]["scaling"] == 2.0
    assert len(meta["modules"]) == 4
    fresh = copy.deepcopy(base)
    lm.load_bottleneck(fresh, out, adapter_name="x")
    assert not any(p.requires_grad for p in fresh.parameters())  # loaded adapters are frozen by default
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids), model(ids), rtol=0, atol=0)
        assert (fresh(ids) - base(ids)).abs().max() > 1e-3


def test_load_refuses_a_different_model(model, tmp_path):
    lm.apply(model, "bottleneck", size=4)
    out = lm.save_bottleneck(model, tmp_path / "ad")
    other = load(_other_folder(tmp_path))[0]
    with pytest.raises(ValueError, match="does not fit"):
        lm.load_bottleneck(other, out)
    assert not lm.list_adapters(other) and not list(lm.adapter_layers(other))  # nothing left behind


def _other_folder(tmp_path):
    from tiny_folder import make_tiny_model_folder

    return make_tiny_model_folder(tmp_path / "wide", hidden_size=32, intermediate_size=64)


def test_errors_name_the_option(model):
    for bad, match in [({"placement": "after"}, "placement"), ({"mode": "serial"}, "mode"), ({"size": 0}, "size"),
                       ({"nonlinearity": "swish"}, "nonlinearity"), ({"dropout": 1.0}, "dropout")]:
        with pytest.raises(ValueError, match=match):
            lm.apply(copy.deepcopy(model), "bottleneck", **bad)
    lm.apply(model, "lora", r=2, targets=["q_proj"])
    with pytest.raises(ValueError, match="LoRA"):
        lm.apply(model, "bottleneck", adapter_name="b", placement="houlsby")
    with pytest.raises(ValueError, match="not a bottleneck"):
        lm.save_bottleneck(model, "unused", adapter_name="default")


# ---------------------------------------------------------------------------------------------
# the CLI


def test_finetune_method_bottleneck(folder, tmp_path, base):
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, a in [("What is the capital of Veloria?", "The capital of Veloria is Amberhold."),
                         ("Who discovered the Zentari comet?", "It was discovered by Ilsa Morrow.")] * 4]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    argv = ["finetune", "--model", str(folder), "--data", str(data), "--output", str(out), "--no-progress",
            "--eval-fraction", "0", "--method", "bottleneck", "--bottleneck-size", "8", "--bottleneck-placement",
            "houlsby", "--bottleneck-mode", "parallel", "--lr", "1e-2", "--epochs", "5", "--batch-size", "4",
            "--schedule", "constant"]
    # parallel: in this random tiny model the sublayer outputs a sequential adapter reads are ~1e-3, so it
    # learns little more than its biases in 10 steps; the normalized inputs a parallel one reads are ~1
    assert cli.run(argv) == 0
    names = {p.name for p in out.iterdir()}
    assert {"bottleneck_config.json", "bottleneck_model.safetensors", "summary.json"} <= names
    assert "adapter_config.json" not in names  # not a PEFT adapter: PEFT must not mistake it for one
    ck = max((out / "checkpoints").iterdir())
    assert (ck / "bottleneck_model.safetensors").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train_loss"] < summary["first_loss"] - 0.5
    assert summary["trainable_parameters"] == 4 * (2 * 64 * 8 + 8 + 64)
    meta = json.loads((out / "bottleneck_config.json").read_text())
    assert meta["config"]["placement"] == "houlsby" and meta["config"]["size"] == 8
    loaded = lm.load_bottleneck(copy.deepcopy(base), out)
    ids = torch.randint(0, 400, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (loaded(ids) - base(ids)).abs().max() > 1e-3

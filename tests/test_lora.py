"""LoRA layer, apply/registry, multi-adapter routing and merge (oracles: methods-core.md §1, PEFT)."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import leantune.methods as lm
from leantune.methods import LoraConfig, LoraLinear

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


from hf_tiny import tiny_llama  # noqa: E402


@pytest.fixture(scope="module")
def base_model():
    return tiny_llama()


@pytest.fixture
def model(base_model):
    return copy.deepcopy(base_model)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))


def randomize_b(model, adapter="default", std=0.1, seed=3):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lm.adapter_layers(model):
            if layer.has_adapter(adapter):
                w = layer.lora_B[adapter].weight
                w.copy_(torch.randn(w.shape, generator=gen) * std)


class TinyNet(nn.Module):
    """A token-wise two-layer MLP that threads adapter_ids, like leantune's own models do."""

    def __init__(self, d=16, h=32):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, h), nn.Linear(h, d)

    def forward(self, x, adapter_ids=None):
        return self.fc2(torch.tanh(self.fc1(x, adapter_ids=adapter_ids)), adapter_ids=adapter_ids)


def tiny_net_with_two_adapters():
    torch.manual_seed(0)
    net = TinyNet()
    lm.apply(net, "lora", adapter_name="a", r=4, alpha=8, targets=["fc1", "fc2"])
    lm.apply(net, "lora", adapter_name="b", r=2, alpha=4, targets=["fc2"], use_rslora=True)
    randomize_b(net, "a", seed=1)
    randomize_b(net, "b", seed=2)
    return net


# ---------------------------------------------------------------------------------------------
# apply, layout, init


def test_output_unchanged_at_init(model, base_model, ids):
    lm.apply(model, "lora", r=4, alpha=8)
    assert torch.equal(model(ids).logits, base_model(ids).logits)


def test_layout_names_and_freezing(model):
    lm.apply(model, "lora", r=4)
    keys = model.state_dict().keys()
    assert "model.layers.0.self_attn.q_proj.base_layer.weight" in keys
    assert "model.layers.0.self_attn.q_proj.lora_A.default.weight" in keys
    assert "model.layers.1.mlp.down_proj.lora_B.default.weight" in keys
    assert isinstance(model.lm_head, nn.Linear) and not isinstance(model.lm_head, LoraLinear)
    trainable = lm.trainable_parameters(model)
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * 7 * 2  # A and B, 7 linears per layer, 2 layers
    assert model.leantune_adapter_slots == {"default": 0}


def test_init_bounds_and_zero_b(model):
    lm.apply(model, "lora", r=8)
    for _, layer in lm.adapter_layers(model):
        a = layer.lora_A["default"].weight
        assert a.abs().max() <= 1 / math.sqrt(layer.in_features)
        assert a.abs().max() > 0.5 / math.sqrt(layer.in_features)  # really uniform over the range
        assert torch.count_nonzero(layer.lora_B["default"].weight) == 0


def test_gaussian_init_std(model):
    lm.apply(model, "lora", r=4, init="gaussian", targets=["gate_proj", "up_proj"])
    a = torch.cat([layer.lora_A["default"].weight.flatten() for _, layer in lm.adapter_layers(model)])
    assert abs(a.std().item() - 1 / 4) < 0.02


def test_rslora_scale_and_alias(model):
    lm.apply(model, "rslora", r=16, alpha=8, targets=["q_proj"])
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == pytest.approx(8 / math.sqrt(16))
    assert lm.adapter_configs(model)["default"].use_rslora is True
    assert {"lora", "rslora"} <= set(lm.list_methods())


def test_rank_and_alpha_pattern(model):
    lm.apply(model, "lora", r=4, alpha=8, targets=["q_proj", "v_proj"],
             rank_pattern={"q_proj": 2}, alpha_pattern={r"layers\.1\.self_attn\.v_proj": 32})
    attn0, attn1 = model.model.layers[0].self_attn, model.model.layers[1].self_attn
    assert attn0.q_proj.r["default"] == 2 and attn0.v_proj.r["default"] == 4
    assert attn0.v_proj.scaling["default"] == 2.0 and attn1.v_proj.scaling["default"] == 8.0


def test_targets_regex_and_exclude(model):
    lm.apply(model, "lora", targets=r".*\.self_attn\.(q|k)_proj", exclude=["layers.1.self_attn.k_proj"])
    wrapped = sorted(n for n, _ in lm.adapter_layers(model))
    assert wrapped == ["model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.q_proj",
                       "model.layers.1.self_attn.q_proj"]


def test_dropout_only_on_branch():
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(16, 8))
    layer.add_adapter("default", 0, r=4, alpha=8, cfg=LoraConfig(r=4, alpha=8, dropout=0.5))
    layer.active_adapters = ["default"]
    layer.train()
    x = torch.randn(5, 16)
    base = layer.base_layer(x)
    assert torch.equal(layer(x), base)  # B = 0: dropout never touches the base path
    nn.init.normal_(layer.lora_B["default"].weight)
    torch.manual_seed(7)
    y = layer(x)
    torch.manual_seed(7)
    dropped = nn.functional.dropout(x, 0.5, training=True)
    lora = layer.lora_B["default"](layer.lora_A["default"](dropped)) * 2.0
    assert torch.allclose(y, base + lora, atol=1e-6)
    layer.eval()
    clean = base + layer.lora_B["default"](layer.lora_A["default"](x)) * 2.0
    assert torch.allclose(layer(x), clean, atol=1e-6) and not torch.allclose(y, clean, atol=1e-3)


# ---------------------------------------------------------------------------------------------
# PEFT oracle: forward and gradients


@pytest.mark.parametrize("opts", [
    dict(r=4, alpha=8, targets="all-linear"),
    dict(r=4, alpha=8, targets=["q_proj", "down_proj"], use_rslora=True, lora_bias=True,
         rank_pattern={"down_proj": 2}, alpha_pattern={"q_proj": 3}),
])
def test_matches_peft_forward_and_grads(base_model, ids, opts):
    peft_cfg = peft.LoraConfig(
        r=opts["r"], lora_alpha=opts["alpha"], target_modules=opts["targets"], task_type="CAUSAL_LM",
        use_rslora=opts.get("use_rslora", False), lora_bias=opts.get("lora_bias", False),
        rank_pattern=opts.get("rank_pattern", {}), alpha_pattern=opts.get("alpha_pattern", {}))
    ours = lm.apply(copy.deepcopy(base_model), "lora", **opts)
    theirs = peft.get_peft_model(copy.deepcopy(base_model), peft_cfg)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    ours_params = dict(ours.named_parameters())
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_" in name:
                ours_params[name.removeprefix("base_model.model.")].copy_(p)
    out_ours, out_theirs = ours(ids, labels=ids), theirs(ids, labels=ids)
    assert torch.allclose(out_ours.logits, out_theirs.logits, atol=1e-6)
    out_ours.loss.backward()
    out_theirs.loss.backward()
    theirs_grads = {n.removeprefix("base_model.model."): p.grad for n, p in theirs.named_parameters()
                    if p.requires_grad}
    ours_grads = {n: p.grad for n, p in lm.trainable_parameters(ours).items()}
    assert set(ours_grads) == set(theirs_grads)
    for name, grad in ours_grads.items():
        assert torch.allclose(grad, theirs_grads[name], atol=1e-6), name


# ---------------------------------------------------------------------------------------------
# several adapters: switching, disabling, routing


def test_second_adapter_shares_wrapper_and_switches(model, base_model, ids):
    lm.apply(model, "lora", r=4, targets=["q_proj", "v_proj"])
    lm.apply(model, "lora", adapter_name="other", r=2, targets=["q_proj"])
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q.base_layer, nn.Linear) and sorted(q.lora_A) == ["default", "other"]
    assert "model.layers.0.self_attn.q_proj.lora_A.other.weight" in model.state_dict()
    assert model.leantune_adapter_slots == {"default": 0, "other": 1}
    assert lm.active_adapters(model) == ["default"]
    randomize_b(model, "default", seed=1)
    randomize_b(model, "other", seed=2)
    out_default = model(ids).logits
    lm.set_adapter(model, "other")
    out_other = model(ids).logits
    assert not torch.allclose(out_default, out_other)
    with lm.disable_adapters(model):
        assert torch.equal(model(ids).logits, base_model(ids).logits)
    assert torch.equal(model(ids).logits, out_other)
    with pytest.raises(ValueError, match="no adapter named 'nope'"):
        lm.set_adapter(model, "nope")


def test_mixed_batch_per_row_equals_each_alone():
    net = tiny_net_with_two_adapters()
    x = torch.randn(6, 5, 16)
    ids = torch.tensor([0, 1, -1, 1, 0, -1])  # slots: a=0, b=1, base=-1
    mixed = net(x, adapter_ids=ids)
    for slot, name in [(0, "a"), (1, "b")]:
        lm.set_adapter(net, name)
        rows = ids == slot
        assert torch.allclose(mixed[rows], net(x[rows]), atol=1e-6, rtol=0)
    with lm.disable_adapters(net):
        assert torch.allclose(mixed[ids == -1], net(x[ids == -1]), atol=1e-6, rtol=0)


def test_mixed_batch_per_token_equals_each_alone():
    net = tiny_net_with_two_adapters()
    x = torch.randn(3, 8, 16)
    ids = torch.randint(-1, 2, (3, 8), generator=torch.Generator().manual_seed(4))
    mixed = net(x, adapter_ids=ids)
    alone = {}
    for name in ("a", "b"):
        lm.set_adapter(net, name)
        alone[name] = net(x)
    with lm.disable_adapters(net):
        alone["base"] = net(x)
    expected = torch.where((ids == 0)[..., None], alone["a"],
                           torch.where((ids == 1)[..., None], alone["b"], alone["base"]))
    assert torch.allclose(mixed, expected, atol=1e-6, rtol=0)


def test_mixed_batch_gradients_reach_only_used_adapters():
    net = tiny_net_with_two_adapters()
    x = torch.randn(4, 16)
    net(x, adapter_ids=torch.tensor([0, 0, -1, -1])).sum().backward()
    assert net.fc1.lora_A["a"].weight.grad is not None and net.fc2.lora_B["a"].weight.grad.abs().sum() > 0
    assert net.fc2.lora_A["b"].weight.grad is None
    assert net.fc1.base_layer.weight.grad is None  # frozen base


def test_adapter_ids_bad_shape():
    net = tiny_net_with_two_adapters()
    with pytest.raises(ValueError, match="adapter_ids has shape"):
        net(torch.randn(3, 4, 16), adapter_ids=torch.zeros(4, dtype=torch.long))


# ---------------------------------------------------------------------------------------------
# merge, unload, base state dict


def test_merge_unmerge_and_merge_and_unload(ids):
    base_model = tiny_llama(attention_bias=True, mlp_bias=True)
    model = copy.deepcopy(base_model)
    lm.apply(model, "lora", r=4, alpha=8, lora_bias=True)
    randomize_b(model)
    with torch.no_grad():
        for _, layer in lm.adapter_layers(model):
            layer.lora_B["default"].bias.normal_(0, 0.1)
    w0 = model.model.layers[0].mlp.up_proj.base_layer.weight.clone()
    unmerged = model(ids).logits
    lm.merge(model, "default")
    assert torch.allclose(model(ids).logits, unmerged, atol=1e-5)
    assert not torch.allclose(model.model.layers[0].mlp.up_proj.base_layer.weight, w0)
    lm.unmerge(model, "default")
    assert torch.allclose(model.model.layers[0].mlp.up_proj.base_layer.weight, w0, atol=1e-6)
    assert torch.allclose(model(ids).logits, unmerged, atol=1e-5)
    merged = lm.merge_and_unload(model)
    assert not list(lm.adapter_layers(merged)) and type(merged.model.layers[0].self_attn.q_proj) is nn.Linear
    assert set(merged.state_dict()) == set(base_model.state_dict())
    assert torch.allclose(merged(ids).logits, unmerged, atol=1e-5)


def test_merge_refuses_lora_bias_without_base_bias(model):
    lm.apply(model, "lora", r=4, targets=["q_proj"], lora_bias=True)
    with pytest.raises(ValueError, match="no bias"):
        lm.merge(model, "default")


def test_merge_refuses_non_finite_and_changes_nothing(model):
    lm.apply(model, "lora", r=4, targets=["q_proj", "v_proj"])
    before = copy.deepcopy(lm.get_base_state_dict(model))
    with torch.no_grad():
        model.model.layers[1].self_attn.v_proj.lora_B["default"].weight.fill_(float("inf"))
    with pytest.raises(ValueError, match="non-finite.*v_proj|v_proj.*non-finite"):
        lm.merge(model, "default")
    after = lm.get_base_state_dict(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(layer.merged_adapters for _, layer in lm.adapter_layers(model))


def test_merged_weights_bf16_computed_in_fp32(base_model):
    model = copy.deepcopy(base_model).to(torch.bfloat16)
    lm.apply(model, "lora", r=4, targets=["q_proj"])
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.lora_A["default"].weight.dtype == torch.float32  # adapters in fp32, as PEFT
    randomize_b(model)
    w = layer.base_layer.weight.float().clone()
    expected = (w + layer.delta_weight("default")[0]).to(torch.bfloat16)
    lm.merge(model, "default")
    assert torch.equal(layer.base_layer.weight, expected)


def test_get_base_state_dict_and_unload(model, base_model, ids):
    lm.apply(model, "lora", r=4)
    lm.apply(model, "lora", adapter_name="b", targets=["o_proj"])
    sd = lm.get_base_state_dict(model)
    ref = base_model.state_dict()
    assert set(sd) == set(ref) and all(torch.equal(sd[k], ref[k]) for k in ref)
    randomize_b(model)
    lm.merge(model, "default")
    lm.unload(model)
    assert not list(lm.adapter_layers(model)) and lm.list_adapters(model) == []
    assert torch.allclose(model(ids).logits, base_model(ids).logits, atol=1e-5)


def test_delete_adapter_frees_slot(model):
    lm.apply(model, "lora", targets=["q_proj"])
    lm.apply(model, "lora", adapter_name="b", targets=["q_proj", "k_proj"])
    lm.delete_adapter(model, "default")
    assert type(model.model.layers[0].self_attn.k_proj) is LoraLinear
    assert model.leantune_adapter_slots == {"b": 1} and lm.active_adapters(model) == []
    lm.apply(model, "lora", adapter_name="c", targets=["q_proj"])
    assert model.leantune_adapter_slots == {"b": 1, "c": 0}
    lm.delete_adapter(model, "b")
    assert type(model.model.layers[0].self_attn.k_proj) is nn.Linear


# ---------------------------------------------------------------------------------------------
# errors


def test_target_matching_nothing_names_target_and_sample(model):
    with pytest.raises(ValueError, match=r"'c_attn' matches no module.*q_proj"):
        lm.apply(model, "lora", targets=["q_proj", "c_attn"])
    with pytest.raises(ValueError, match=r"regex 'q_proj' matches no module.*full name"):
        lm.apply(model, "lora", targets="q_proj")
    assert not list(lm.adapter_layers(model)) and lm.list_adapters(model) == []


def test_target_of_wrong_kind(model):
    with pytest.raises(ValueError, match="'model.layers.0.self_attn' is a LlamaAttention"):
        lm.apply(model, "lora", targets=["self_attn"])


def test_config_validation_and_unknown_options(model):
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['rank'\].*valid options.*'r'"):
        lm.apply(model, "lora", rank=4)
    for bad in (dict(r=0), dict(dropout=1.0), dict(bias="some"), dict(init="pissa"), dict(targets=[]),
                dict(rank_pattern={"q_proj": 0}), dict(targets="(")):
        with pytest.raises(ValueError):
            LoraConfig(**bad)
    with pytest.raises(ValueError, match="unknown method 'no-such-method'.*lora"):
        lm.apply(model, "no-such-method")


def test_duplicate_adapter_name(model):
    lm.apply(model, "lora", targets=["q_proj"])
    with pytest.raises(ValueError, match="already has an adapter named 'default'"):
        lm.apply(model, "lora", targets=["k_proj"])
    with pytest.raises(ValueError, match="without '.'"):
        lm.apply(model, "lora", adapter_name="a.b")


def test_config_object_with_overrides(model):
    cfg = LoraConfig(r=4, targets=["q_proj"])
    lm.apply(model, "lora", config=cfg, r=2)
    assert model.model.layers[0].self_attn.q_proj.r["default"] == 2


def test_bias_modes_make_base_biases_trainable():
    model = tiny_llama(attention_bias=True)
    lm.apply(model, "lora", targets=["q_proj"], bias="lora_only")
    names = set(lm.trainable_parameters(model))
    assert "model.layers.0.self_attn.q_proj.base_layer.bias" in names
    assert "model.layers.0.self_attn.k_proj.bias" not in names
    lm.set_adapter_trainable(model, "default", False)
    assert lm.trainable_parameters(model) == {}


def test_base_that_accepts_adapter_ids_gets_them():
    class RoutedLinear(nn.Linear):
        accepts_adapter_ids = True
        seen = []

        def forward(self, x, adapter_ids=None):
            RoutedLinear.seen.append(adapter_ids)
            return super().forward(x)

    net = nn.Sequential(RoutedLinear(8, 8))
    lm.apply(net, "lora", r=2, targets=["0"])
    ids = torch.tensor([0, -1])
    net[0](torch.randn(2, 8), adapter_ids=ids)
    net(torch.randn(2, 8))
    assert RoutedLinear.seen[0] is ids and RoutedLinear.seen[1] is None

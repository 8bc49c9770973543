"""DoRA (methods/dora.py): peft 0.21.2 with use_dora=True is the oracle for forward, gradients, files and merge;
the row norm is never formed from an (out, in) matrix; mixed adapters and per-row routing stay exact."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import leantune.methods as lm
from leantune import cli
from leantune.methods import LoraConfig, LoraLinear
from leantune.methods.dora import weight_norm
from leantune.methods.lora import DoraConfig

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from hf_tiny import tiny_llama  # noqa: E402

PREFIX = "base_model.model."


@pytest.fixture(scope="module")
def base_model():
    return tiny_llama()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))


def perturb(named_params, seed=5):
    """Random B (N(0, 0.1)) and a magnitude moved off its init by ~10%, so every DoRA term matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in named_params:
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=gen))


def peft_dora(base, **opts):
    cfg = peft.LoraConfig(task_type="CAUSAL_LM", use_dora=True, **opts)
    return peft.get_peft_model(copy.deepcopy(base), cfg)


def copy_from_peft(ours, theirs):
    params = dict(ours.named_parameters())
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_" in name:
                params[name.removeprefix(PREFIX)].copy_(p)


def dora_layer(n_in=24, n_out=40, r=4, alpha=8, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    layer = LoraLinear(nn.Linear(n_in, n_out))
    layer.add_adapter("d", 0, r=r, alpha=alpha, cfg=LoraConfig(r=r, alpha=alpha, dropout=dropout, use_dora=True))
    layer.active_adapters = ["d"]
    layer.base_layer.requires_grad_(False)
    perturb(layer.named_parameters())
    return layer


# ---------------------------------------------------------------------------------------------
# layout, init, the norm


def test_output_unchanged_at_init_and_magnitude_is_the_row_norm(base_model, ids):
    model = lm.apply(copy.deepcopy(base_model), "dora", r=4, alpha=8)
    assert torch.equal(model(ids).logits, base_model(ids).logits)
    layer = model.model.layers[0].mlp.down_proj  # (64, 128): the norm runs over the 128 inputs
    m = layer.lora_magnitude_vector["default"].weight
    assert m.shape == (64,) and torch.allclose(m, torch.linalg.norm(layer.base_layer.weight, dim=1), rtol=1e-6)
    assert "model.layers.0.mlp.down_proj.lora_magnitude_vector.default.weight" in lm.trainable_parameters(model)
    assert lm.adapter_configs(model)["default"].use_dora is True
    same = lm.apply(copy.deepcopy(base_model), "lora", r=4, use_dora=True, targets=["q_proj"])
    assert "default" in same.model.layers[0].self_attn.q_proj.lora_magnitude_vector


@pytest.mark.parametrize("rslora", [False, True])
def test_norm_without_the_matrix_equals_the_matrix_norm(rslora):
    layer = LoraLinear(nn.Linear(24, 40))
    layer.add_adapter("d", 0, r=4, alpha=8, cfg=LoraConfig(r=4, alpha=8, use_dora=True, use_rslora=rslora))
    perturb(layer.named_parameters())
    a, b, s = layer.lora_A["d"].weight, layer.lora_B["d"].weight, layer.scaling["d"]
    expected = torch.linalg.norm(layer.base_layer.weight + s * b @ a, dim=1)
    assert torch.allclose(weight_norm(layer, "d"), expected, rtol=1e-5, atol=0)
    with torch.no_grad():  # a merge bumps the weight's version: the cached ||W||^2 must follow it
        layer.base_layer.weight.mul_(2)
    expected = torch.linalg.norm(layer.base_layer.weight + s * b @ a, dim=1)
    assert torch.allclose(weight_norm(layer, "d"), expected, rtol=1e-5, atol=0)


class ShapeLog(TorchDispatchMode):
    """The shapes of the tensors every aten op computes (views of existing tensors left out)."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func._schema.is_mutable and any(a.alias_info for a in func._schema.returns):
            return out  # a view (t, expand, ...): nothing is computed or allocated
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.shapes.append((str(func), tuple(t.shape)))
        return out


def test_forward_and_backward_never_form_an_out_by_in_matrix():
    layer = dora_layer(n_in=24, n_out=40)
    x = torch.randn(3, 24, requires_grad=True)
    layer(x).sum().backward()  # warm: ||W||^2 is computed once and cached
    with ShapeLog() as log:
        layer(x).sum().backward()
    big = [(f, s) for f, s in log.shapes if len(s) == 2 and s[0] * s[1] >= 24 * 40]
    assert log.shapes and not big, big


def test_norm_is_a_constant_in_backward():
    """DoRA §4.3: gradients reach A and B only through the low-rank branch, m through m/norm."""
    layer = dora_layer()
    x = torch.randn(5, 24)
    layer(x).pow(2).sum().backward()
    a, b, s = layer.lora_A["d"].weight, layer.lora_B["d"].weight, layer.scaling["d"]
    w, bias, m = layer.base_layer.weight, layer.base_layer.bias, layer.lora_magnitude_vector["d"].weight
    a2, b2, m2 = (t.detach().clone().requires_grad_() for t in (a, b, m))
    norm = torch.linalg.norm(w + s * b2 @ a2, dim=1).detach()
    y = (m2 / norm) * (x @ (w + s * b2 @ a2).t()) + bias
    y.pow(2).sum().backward()
    for ours, ref in ((a, a2), (b, b2), (m, m2)):
        assert torch.allclose(ours.grad, ref.grad, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# PEFT oracle


@pytest.mark.parametrize("opts", [
    dict(r=4, alpha=8, targets="all-linear"),
    dict(r=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"], use_rslora=True, rank_pattern={"v_proj": 2},
         alpha_pattern={"down_proj": 3}),
])
def test_matches_peft_forward_and_grads(base_model, ids, opts):
    ours = lm.apply(copy.deepcopy(base_model), "dora", **opts)
    theirs = peft_dora(base_model, r=opts["r"], lora_alpha=opts["alpha"], target_modules=opts["targets"],
                       use_rslora=opts.get("use_rslora", False), rank_pattern=opts.get("rank_pattern", {}),
                       alpha_pattern=opts.get("alpha_pattern", {}))
    perturb(theirs.named_parameters())
    copy_from_peft(ours, theirs)
    out_ours, out_theirs = ours(ids, labels=ids), theirs(ids, labels=ids)
    assert (out_ours.logits - base_model(ids).logits).abs().max() > 1e-3  # the adapter does something
    assert torch.allclose(out_ours.logits, out_theirs.logits, atol=1e-5, rtol=0)
    out_ours.loss.backward()
    out_theirs.loss.backward()
    theirs_grads = {n.removeprefix(PREFIX): p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    ours_grads = {n: p.grad for n, p in lm.trainable_parameters(ours).items()}
    assert set(ours_grads) == set(theirs_grads)
    assert any("lora_magnitude_vector" in n for n in ours_grads)
    for name, grad in ours_grads.items():
        assert torch.allclose(grad, theirs_grads[name], atol=1e-6, rtol=1e-4), name


def test_matches_peft_with_dropout_in_training(base_model, ids):
    """PEFT drops x for both DoRA terms and recomputes x W^T on it; same seed, same masks, same logits."""
    ours = lm.apply(copy.deepcopy(base_model), "dora", r=4, alpha=8, dropout=0.3, targets=["q_proj", "up_proj"])
    theirs = peft_dora(base_model, r=4, lora_alpha=8, lora_dropout=0.3, target_modules=["q_proj", "up_proj"])
    perturb(theirs.named_parameters())
    copy_from_peft(ours, theirs)
    ours.train()
    theirs.train()
    torch.manual_seed(11)
    y_ours = ours(ids).logits
    torch.manual_seed(11)
    y_theirs = theirs(ids).logits
    assert torch.allclose(y_ours, y_theirs, atol=1e-5, rtol=0)
    ours.eval()
    assert not torch.allclose(ours(ids).logits, y_ours, atol=1e-3)  # dropout really acted


def test_saved_adapter_loads_in_peft(base_model, ids, tmp_path):
    ours = lm.apply(copy.deepcopy(base_model), "dora", r=4, alpha=8, targets=["q_proj", "v_proj", "gate_proj"])
    perturb(ours.named_parameters())
    expected = ours(ids).logits
    lm.save_adapter(ours, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["use_dora"] is True and cfg["peft_type"] == "LORA"
    keys = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    mag = f"{PREFIX}model.layers.0.self_attn.v_proj.lora_magnitude_vector"
    assert keys[mag].shape == (32,)  # v_proj with GQA: out = kv_dim
    assert len(keys) == 3 * 2 * 3  # A, B, m for 3 modules in 2 layers
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base_model), tmp_path / "a").eval()
    assert torch.allclose(theirs(ids).logits, expected, atol=1e-5, rtol=0)


def test_peft_adapter_loads_in_leantune(base_model, ids, tmp_path):
    theirs = peft_dora(base_model, r=4, lora_alpha=16, target_modules="all-linear", lora_dropout=0.1).eval()
    perturb(theirs.named_parameters())
    theirs.save_pretrained(tmp_path / "a")
    ours = lm.load_adapter(copy.deepcopy(base_model), tmp_path / "a").eval()
    assert lm.adapter_configs(ours)["default"].use_dora is True
    assert torch.allclose(ours(ids).logits, theirs(ids).logits, atol=1e-5, rtol=0)
    assert lm.trainable_parameters(ours) == {}


def test_load_refuses_magnitudes_that_disagree_with_the_config(base_model, tmp_path):
    theirs = peft_dora(base_model, r=2, lora_alpha=4, target_modules=["q_proj"])
    theirs.save_pretrained(tmp_path / "a")
    cfg_path = tmp_path / "a" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "use_dora": False}))
    model = copy.deepcopy(base_model)
    with pytest.raises(ValueError, match="use_dora=False.*has a DoRA lora_magnitude_vector"):
        lm.load_adapter(model, tmp_path / "a")
    assert lm.list_adapters(model) == []


def test_lora_bias_is_refused_as_peft_does():
    with pytest.raises(ValueError, match="lora_bias=True does not work with use_dora=True"):
        DoraConfig(lora_bias=True)


# ---------------------------------------------------------------------------------------------
# merge


def test_merge_unmerge_equal_the_unmerged_model_and_peft_merge(ids):
    base = tiny_llama(attention_bias=True, mlp_bias=True)
    model = lm.apply(copy.deepcopy(base), "dora", r=4, alpha=8)
    theirs = peft_dora(base, r=4, lora_alpha=8, target_modules="all-linear")
    perturb(theirs.named_parameters())
    copy_from_peft(model, theirs)
    w0 = model.model.layers[0].mlp.up_proj.base_layer.weight.clone()
    unmerged = model(ids).logits
    lm.merge(model, "default")
    assert torch.allclose(model(ids).logits, unmerged, atol=1e-5, rtol=0)
    theirs_merged = theirs.merge_and_unload()
    assert torch.allclose(model.model.layers[0].mlp.up_proj.base_layer.weight,
                          theirs_merged.model.layers[0].mlp.up_proj.weight, atol=1e-6)
    lm.unmerge(model, "default")
    assert torch.allclose(model.model.layers[0].mlp.up_proj.base_layer.weight, w0, atol=1e-6)
    assert torch.allclose(model(ids).logits, unmerged, atol=1e-5, rtol=0)
    merged = lm.merge_and_unload(model)
    assert set(merged.state_dict()) == set(base.state_dict())
    assert torch.allclose(merged(ids).logits, unmerged, atol=1e-5, rtol=0)


def test_unmerge_out_of_order_is_refused_and_changes_nothing(base_model):
    model = lm.apply(copy.deepcopy(base_model), "lora", adapter_name="plain", r=2, targets=["q_proj"])
    lm.apply(model, "dora", adapter_name="dora", r=2, targets=["q_proj"])
    perturb(model.named_parameters())
    lm.merge(model, "plain")
    lm.merge(model, "dora")
    q = model.model.layers[0].self_attn.q_proj.base_layer.weight
    before = q.clone()
    with pytest.raises(ValueError, match=r"'plain' was merged before \['dora'\].*unmerge \['dora'\] before it"):
        lm.unmerge(model, "plain")
    assert torch.equal(q, before)
    lm.unmerge(model, "dora")
    lm.unmerge(model, "plain")
    assert torch.allclose(q, base_model.model.layers[0].self_attn.q_proj.weight, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# several adapters: a DoRA and a plain LoRA adapter side by side, routed per row


def test_dora_and_lora_adapters_in_one_model(base_model, ids):
    both = lm.apply(copy.deepcopy(base_model), "dora", adapter_name="d", r=4, targets=["q_proj", "up_proj"])
    lm.apply(both, "lora", adapter_name="l", r=2, targets=["q_proj", "o_proj"])
    perturb(both.named_parameters())
    q = both.model.layers[0].self_attn.q_proj
    assert sorted(q.lora_A) == ["d", "l"] and list(q.lora_magnitude_vector) == ["d"]
    alone = {}
    for name, method, targets in (("d", "dora", ["q_proj", "up_proj"]), ("l", "lora", ["q_proj", "o_proj"])):
        single = lm.apply(copy.deepcopy(base_model), method, adapter_name=name, r=4 if name == "d" else 2,
                          targets=targets)
        single.load_state_dict(both.state_dict(), strict=False)
        alone[name] = single(ids).logits
        lm.set_adapter(both, name)
        assert torch.allclose(both(ids).logits, alone[name], atol=1e-6, rtol=0)
    assert not torch.allclose(alone["d"], alone["l"], atol=1e-3)


class TinyNet(nn.Module):
    def __init__(self, d=16, h=32):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, h), nn.Linear(h, d)

    def forward(self, x, adapter_ids=None):
        return self.fc2(torch.tanh(self.fc1(x, adapter_ids=adapter_ids)), adapter_ids=adapter_ids)


def tiny_net(adapters):
    torch.manual_seed(0)
    net = TinyNet()
    for name, method, targets in adapters:
        lm.apply(net, method, adapter_name=name, r=4, alpha=8, targets=targets)
    perturb(net.named_parameters())
    return net


@pytest.mark.parametrize("grad", [True, False])
@pytest.mark.parametrize("per_token", [False, True])
def test_routed_rows_equal_each_adapter_alone(grad, per_token):
    """Slots: DoRA d=0, LoRA l=1, DoRA e=2 (three adapters: without grad the gathered path is tried first)."""
    net = tiny_net([("d", "dora", ["fc1", "fc2"]), ("l", "lora", ["fc2"]), ("e", "dora", ["fc2"])])
    x = torch.randn(6, 5, 16)
    ids = (torch.randint(-1, 3, (6, 5), generator=torch.Generator().manual_seed(2)) if per_token
           else torch.tensor([0, 1, -1, 2, 0, 1]))
    with torch.set_grad_enabled(grad):
        mixed = net(x, adapter_ids=ids)
        alone = {}
        for slot, name in enumerate(("d", "l", "e")):
            lm.set_adapter(net, name)
            alone[slot] = net(x)
        with lm.disable_adapters(net):
            alone[-1] = net(x)
    expected = torch.zeros_like(mixed)
    token_ids = ids if per_token else ids[:, None].expand(6, 5)
    for slot, out in alone.items():
        expected = torch.where((token_ids == slot)[..., None], out, expected)
    assert torch.allclose(mixed, expected, atol=1e-6, rtol=0)


def test_routed_gradients_equal_each_adapter_alone():
    net = tiny_net([("d", "dora", ["fc1", "fc2"]), ("l", "lora", ["fc2"])])
    x = torch.randn(4, 16)
    net(x, adapter_ids=torch.tensor([0, 0, 1, -1])).pow(2).sum().backward()
    routed = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None and ".d." in n + "."}
    assert any("lora_magnitude_vector" in n for n in routed)
    net.zero_grad()
    lm.set_adapter(net, "d")
    net(x[:2]).pow(2).sum().backward()
    for n, g in routed.items():
        assert torch.allclose(dict(net.named_parameters())[n].grad, g, atol=1e-6, rtol=1e-5), n


# ---------------------------------------------------------------------------------------------
# a 4-bit base (QDoRA) and the CLI


def test_dora_on_a_4bit_base_uses_the_dequantized_weight(base_model, ids):
    model = lm.apply(copy.deepcopy(base_model), "qlora", r=4, alpha=8, use_dora=True, targets=["q_proj", "down_proj"])
    base_out = model(ids).logits
    with lm.disable_adapters(model):
        assert torch.equal(model(ids).logits, base_out)  # unchanged at init
    perturb(model.named_parameters())
    layer = model.model.layers[0].mlp.down_proj
    w = layer.base_layer.dequantized_weight(torch.float32)
    a, b, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
    assert torch.allclose(weight_norm(layer, "default"), torch.linalg.norm(w + s * b @ a, dim=1), rtol=1e-5)
    float_model = lm.merge_and_unload(copy.deepcopy(model))  # merges onto the dequantized base
    assert torch.allclose(float_model(ids).logits, model(ids).logits, atol=1e-4, rtol=0)


def test_cli_finetune_method_dora(folder, tmp_path):
    rows = [{"messages": [{"role": "user", "content": "Who discovered the Zentari comet?"},
                          {"role": "assistant", "content": "It was discovered by Ilsa Morrow."}]}] * 4
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    argv = ["finetune", "--model", str(folder), "--data", str(data), "--output", str(out), "--no-progress",
            "--eval-fraction", "0", "--method", "dora", "--rank", "4", "--lr", "1e-2", "--max-steps", "3"]
    assert cli.run(argv) == 0
    assert json.loads((out / "adapter_config.json").read_text())["use_dora"] is True
    tensors = load_file(str(out / "adapter_model.safetensors"))
    mags = [k for k in tensors if k.endswith(".lora_magnitude_vector")]
    assert len(mags) == 2 * 7
    losses = [json.loads(ln)["loss"] for ln in (out / "metrics.jsonl").read_text().splitlines() if "loss" in ln]
    assert losses[-1] < losses[0]
    ids = torch.tensor([[1, 5, 9, 33, 70, 2, 11]])
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(hf), out).eval()
    ours, _ = lm_load(folder)
    lm.load_adapter(ours, out)
    with torch.no_grad():
        ours_logits, theirs_logits, base_logits = ours(ids), theirs(ids).logits, hf(ids).logits
    assert (ours_logits - base_logits).abs().max() > 1e-3
    assert torch.allclose(ours_logits, theirs_logits, atol=1e-4, rtol=0)


def lm_load(folder):
    from leantune.models.loader import load

    return load(folder)


def test_backward_keeps_one_output_sized_tensor_per_adapter():
    # the plain expression (scale - 1) * base + scale * s * lora keeps base and lora for m's gradient;
    # DoRA keeps y = base + s * lora only, and m's gradient is still the plain expression's
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32))
    lm.apply(net, "dora", r=4, alpha=8, targets=["0"])
    layer = net[0]
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.1)
        layer.lora_magnitude_vector["default"].weight.mul_(1.3)
    x = torch.randn(5, 16, requires_grad=True)
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        out = net(x)
    out_sized = {t.untyped_storage().data_ptr() for t in kept if tuple(t.shape) == (5, 32)}
    assert len(out_sized) == 1
    mag = layer.lora_magnitude_vector["default"].weight
    (g_m,) = torch.autograd.grad(out.square().sum(), [mag])
    # the same gradient through the plain expression
    lora_a, lora_b, s = layer.lora_A["default"], layer.lora_B["default"], layer.scaling["default"]
    scale = layer.lora_magnitude_vector["default"].scale(layer, "default")
    base = layer.base_layer(x)
    plain = base + (scale - 1) * (base - layer.base_layer.bias) + (scale * s) * lora_b(lora_a(x))
    torch.testing.assert_close(plain, out)
    (ref,) = torch.autograd.grad(plain.square().sum(), [mag])
    torch.testing.assert_close(g_m, ref, rtol=1e-5, atol=1e-6)

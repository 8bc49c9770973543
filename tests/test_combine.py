"""Combining adapters: `add_weighted_adapter` against PEFT's on the same adapters (anchors.md §2.3), and LDA's
per-task merging (methods-more.md §3.3 (d)): the merged model scores each task exactly as that task's best
checkpoint, and a batch of one task gives no gradient to another task's adapter."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import leantune.methods as lm

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from hf_tiny import tiny_llama  # noqa: E402

PREFIX = "base_model.model."


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(1))


def twin_models(specs, seed=0):
    """(PEFT model, leantune-adapted HF model) with the same LoRA adapters and the same random weights.

    specs: [(name, dict(r=, alpha=, targets=, use_rslora=))]."""
    hf = tiny_llama()
    ours = copy.deepcopy(hf)
    pm = None
    for name, spec in specs:
        cfg = peft.LoraConfig(r=spec["r"], lora_alpha=spec["alpha"], target_modules=spec["targets"],
                              use_rslora=spec.get("use_rslora", False))
        if pm is None:
            pm = peft.get_peft_model(hf, cfg, adapter_name=name)
        else:
            pm.add_adapter(name, cfg)
        lm.apply(ours, "lora", adapter_name=name, r=spec["r"], alpha=spec["alpha"], targets=spec["targets"],
                 use_rslora=spec.get("use_rslora", False))
    gen = torch.Generator().manual_seed(seed)
    params = dict(ours.named_parameters())
    with torch.no_grad():
        for key, p in pm.named_parameters():
            if "lora_" in key:
                if "lora_B" in key:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
                params[key[len(PREFIX):]].copy_(p)
    return pm.eval(), ours.eval()


def peft_layers(pm):
    return {n[len("base_model.model."):]: m for n, m in pm.named_modules()
            if isinstance(m, peft.tuners.lora.LoraLayer)}


SPECS = [("a", dict(r=4, alpha=8, targets=["q_proj", "v_proj"])),
         ("b", dict(r=4, alpha=16, targets=["q_proj", "k_proj"]))]


@pytest.mark.parametrize("combination,svd_rank", [("linear", None), ("cat", None), ("svd", None), ("svd", 3)])
def test_matches_peft(combination, svd_rank, ids):
    pm, ours = twin_models(SPECS)
    weights = [0.7, -0.4]
    pm.add_weighted_adapter(["a", "b"], weights, "mix", combination_type=combination, svd_rank=svd_rank)
    lm.add_weighted_adapter(ours, ["a", "b"], weights, "mix", combination_type=combination, svd_rank=svd_rank)
    theirs = peft_layers(pm)
    mine = dict(lm.adapter_layers(ours))
    assert sorted(n for n, layer in mine.items() if layer.has_adapter("mix")) == \
        sorted(n for n, layer in theirs.items() if "mix" in layer.lora_A)
    for name, layer in mine.items():
        if not layer.has_adapter("mix"):
            continue
        assert layer.r["mix"] == theirs[name].r["mix"] and layer.scaling["mix"] == theirs[name].scaling["mix"]
        torch.testing.assert_close(layer.lora_A["mix"].weight, theirs[name].lora_A["mix"].weight, rtol=0, atol=1e-6)
        torch.testing.assert_close(layer.lora_B["mix"].weight, theirs[name].lora_B["mix"].weight, rtol=0, atol=1e-6)
    pm.set_adapter("mix")
    lm.set_adapter(ours, "mix")
    with torch.no_grad():
        want, got = pm(ids).logits, ours(ids).logits
        with pm.disable_adapter():
            base = pm(ids).logits
    assert (want - base).abs().max() > 1e-3
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("combination", ["cat", "svd"])
def test_exact_combinations_give_the_weighted_delta(combination):
    """cat, and svd at full rank, are exact: ΔW_new = Σ w_i ΔW_i in every layer (a layer without b uses a)."""
    _, ours = twin_models(SPECS)
    weights = [0.5, 1.5]
    lm.add_weighted_adapter(ours, ["a", "b"], weights, "mix", combination_type=combination, svd_rank=8)
    for _, layer in lm.adapter_layers(ours):
        want = sum(w * layer.delta_weight(n)[0] for n, w in zip("ab", weights) if layer.has_adapter(n))
        torch.testing.assert_close(layer.delta_weight("mix")[0], want, rtol=0, atol=1e-6)


def test_svd_truncates_to_the_best_rank_r_approximation():
    _, ours = twin_models(SPECS)
    lm.add_weighted_adapter(ours, ["a", "b"], [1.0, 1.0], "mix", combination_type="svd", svd_rank=2)
    layer = ours.model.layers[0].self_attn.q_proj
    full = layer.delta_weight("a")[0] + layer.delta_weight("b")[0]
    s = torch.linalg.svdvals(full)
    err = torch.linalg.matrix_norm(layer.delta_weight("mix")[0] - full)
    assert math.isclose(float(err.detach()), float(s[2:].norm().detach()), rel_tol=1e-4)  # Eckart-Young


def test_rslora_sources_combine_without_peft_extra_scale():
    """PEFT copies use_rslora into the new adapter (r = alpha = new rank), scaling it by sqrt(new rank);
    leantune's combination is Σ w_i ΔW_i as documented."""
    specs = [("a", dict(r=4, alpha=8, targets=["q_proj"], use_rslora=True))]
    pm, ours = twin_models(specs)
    pm.add_weighted_adapter(["a"], [1.0], "mix", combination_type="svd")
    lm.add_weighted_adapter(ours, ["a"], [1.0], "mix", combination_type="svd")
    layer = ours.model.layers[0].self_attn.q_proj
    torch.testing.assert_close(layer.delta_weight("mix")[0], layer.delta_weight("a")[0], rtol=0, atol=1e-6)
    theirs = peft_layers(pm)["model.layers.0.self_attn.q_proj"].get_delta_weight("mix")
    torch.testing.assert_close(theirs, layer.delta_weight("a")[0] * math.sqrt(4), rtol=1e-5, atol=1e-6)


def test_new_adapter_is_frozen_inactive_and_saves_in_peft_format(tmp_path, ids):
    _, ours = twin_models(SPECS)
    lm.add_weighted_adapter(ours, ["a", "b"], [1.0, 1.0], "mix", combination_type="cat")
    assert lm.active_adapters(ours) == ["a"]
    assert not lm.trainable_parameters(ours, "mix")
    lm.save_adapter(ours, tmp_path / "mix", adapter_name="mix")
    hf = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "mix").eval()
    lm.set_adapter(ours, "mix")
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits, rtol=0, atol=1e-5)


def test_errors(tmp_path):
    _, ours = twin_models(SPECS + [("c", dict(r=2, alpha=2, targets=["q_proj"]))])
    with pytest.raises(ValueError, match="equal rank"):
        lm.add_weighted_adapter(ours, ["a", "c"], [1, 1], "m", combination_type="linear")
    with pytest.raises(ValueError, match="one weight per adapter"):
        lm.add_weighted_adapter(ours, ["a", "b"], [1], "m")
    with pytest.raises(ValueError, match="already has an adapter"):
        lm.add_weighted_adapter(ours, ["a", "b"], [1, 1], "c", combination_type="cat")
    with pytest.raises(ValueError, match="svd_rank 99"):
        lm.add_weighted_adapter(ours, ["a", "b"], [1, 1], "m", combination_type="svd", svd_rank=99)
    with pytest.raises(ValueError, match="combination_type"):
        lm.add_weighted_adapter(ours, ["a", "b"], [1, 1], "m", combination_type="ties")
    assert "m" not in lm.list_adapters(ours)  # a refused combination leaves nothing behind


# ---------------------------------------------------------------------------------------------
# LDA: per-task merging


class Sublayer(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, x, adapter_ids=None):
        return torch.tanh(self.fc(x))


class ToyClassifier(nn.Module):
    """Frozen backbone + head; one bottleneck adapter per language on `mlp`, routed by adapter_ids."""

    def __init__(self, d_in=8, d=32, classes=4):
        super().__init__()
        self.inp, self.mlp, self.head = nn.Linear(d_in, d), Sublayer(d), nn.Linear(d, classes)

    def forward(self, x, adapter_ids=None):
        h = self.inp(x)
        return self.head(h + self.mlp(h, adapter_ids))


LANGS = ("l0", "l1", "l2")


def language_data(gen, n, lang_maps):
    out = {}
    for lang, m in lang_maps.items():
        x = torch.randn(n, 8, generator=gen)
        out[lang] = (x, (x @ m).argmax(-1))  # each language needs its own transformation of x
    return out


def test_lda_merge_matches_each_task_best_checkpoint():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = ToyClassifier()
    for lang in LANGS:
        lm.apply(model, "bottleneck", adapter_name=lang, size=8, mode="parallel")
    slots = lm.adapter_slots(model)
    maps = {lang: torch.randn(8, 4, generator=gen) for lang in LANGS}
    train, dev = language_data(gen, 256, maps), language_data(gen, 256, maps)
    loss_fn = nn.CrossEntropyLoss()

    def task_loss(data, lang):
        x, y = data[lang]
        return loss_fn(model(x, torch.full((len(x),), slots[lang])), y)

    # a batch of one language gives no gradient to the others' adapters
    model.zero_grad(set_to_none=True)
    task_loss(train, "l0").backward()
    for lang in ("l1", "l2"):
        for _, layer in lm.adapter_layers(model):
            assert all(p.grad is None or not p.grad.any() for p in layer.adapter_parameters(lang))
    assert any(p.grad is not None and p.grad.any() for _, layer in lm.adapter_layers(model)
               for p in layer.adapter_parameters("l0"))

    # asynchronous peaks: language i starts learning at checkpoint i and gets shuffled labels from i + 2 on
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    checkpoints = []
    for c in range(5):
        for _ in range(15):
            opt.zero_grad()
            total = 0
            for i, lang in enumerate(LANGS):
                if c < i:
                    continue
                x, y = train[lang]
                y = y if c < i + 2 else y[torch.randperm(len(y), generator=gen)]
                total = total + loss_fn(model(x, torch.full((len(x),), slots[lang])), y)
            total.backward()
            opt.step()
        checkpoints.append(lm.snapshot_adapters(model, LANGS))

    @torch.no_grad()
    def dev_loss(ckpt, lang):
        lm.load_adapter_states(model, ckpt)
        return float(task_loss(dev, lang))

    table = {lang: [dev_loss(ck, lang) for ck in checkpoints] for lang in LANGS}
    merged, chosen = lm.merge_task_adapters(checkpoints, dev_loss)
    assert chosen == {lang: min(range(5), key=table[lang].__getitem__) for lang in LANGS}
    assert len(set(chosen.values())) > 1  # the peaks really are asynchronous, so selection matters
    lm.load_adapter_states(model, merged)
    with torch.no_grad():
        for lang in LANGS:
            assert float(task_loss(dev, lang)) == min(table[lang])  # exactly, not approximately
    best_single = min(sum(table[lang][c] for lang in LANGS) for c in range(5))
    assert sum(min(table[lang]) for lang in LANGS) < best_single

"""AdaLoRA (methods-core.md §3): budget-table oracle, step-by-step parity with peft 0.21.2's AdaLoraModel
(losses with the orthogonal term, Λ masks, rank_pattern), the Trainer hook, PEFT-format interop both ways,
routing, merging, the CLI."""
from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import leantune.methods as lm
from leantune.methods.adalora import AdaLoraConfig, AdaLoraLinear, RankAllocator, train_hooks

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from hf_tiny import tiny_llama  # noqa: E402

TARGETS = ["q_proj", "v_proj", "down_proj"]
# 10 steps (0..9): no masking up to tinit=2, masks at steps 4 and 6 (deltaT=2), the final mask at 10-3=7,
# then the frozen pattern re-applied at 8 and 9
SCHEDULE = dict(init_r=4, target_r=2, tinit=2, tfinal=3, deltaT=2, total_step=10)


@pytest.fixture(scope="module")
def base_model():
    return tiny_llama()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))


def strip(name: str) -> str:
    return name.removeprefix("base_model.model.")


def peft_and_ours(base, **schedule):
    """A PEFT AdaLoraModel and leantune's AdaLoRA on copies of `base`, with PEFT's initial P, Λ, Q copied over."""
    cfg = peft.AdaLoraConfig(lora_alpha=8, target_modules=TARGETS, task_type="CAUSAL_LM", **schedule)
    theirs = peft.get_peft_model(copy.deepcopy(base), cfg)
    ours = lm.apply(copy.deepcopy(base), "adalora", alpha=8, targets=TARGETS, **schedule)
    params = dict(ours.named_parameters())
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_" in name:
                params[strip(name)].copy_(p)
    return theirs, ours


def e_params(model) -> dict[str, torch.Tensor]:
    return {strip(n): p.detach().clone() for n, p in model.named_parameters() if "lora_E" in n}


def amplified(model, factor=300.0):
    """A copy whose Λ is scaled up (masked rows stay 0): 10 small SGD steps move logits only ~1e-4, too
    little for a logits comparison to mean much."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_E" in name:
                p.mul_(factor)
    return model


def randomize_e(model, adapter="default", seed=3):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lm.adapter_layers(model):
            if layer.has_adapter(adapter):
                e = layer.lora_E[adapter]
                e.copy_(torch.randn(e.shape, generator=gen))


# ---------------------------------------------------------------------------------------------
# budget schedule


def test_budget_schedule_oracle():
    """methods-core.md §3 oracle 1, and the same numbers from PEFT's own budget_schedule."""
    cfg = AdaLoraConfig(init_r=12, target_r=8, tinit=2, tfinal=3, deltaT=1, total_step=10)
    alloc = RankAllocator(cfg, init_budget=24, n_modules=2)
    assert alloc.target_budget == 16
    got = [alloc.budget_schedule(t, 10) for t in range(11)]
    assert [b for b, _ in got] == [24, 24, 24, 20, 17, 16, 16, 16, 16, 16, 16]
    assert [t for t, (_, mask) in enumerate(got) if mask] == list(range(3, 11))
    fake = SimpleNamespace(peft_config=SimpleNamespace(tinit=2, tfinal=3, total_step=10, deltaT=1),
                           init_bgt=24, target_bgt=16)
    theirs = [peft.tuners.adalora.layer.RankAllocator.budget_schedule(fake, t) for t in range(11)]
    assert got == theirs
    # deltaT: inside the budgeting phase only every deltaT-th step masks
    alloc.config = AdaLoraConfig(init_r=12, target_r=8, tinit=2, tfinal=3, deltaT=3, total_step=10)
    assert [t for t in range(11) if alloc.budget_schedule(t, 10)[1]] == [3, 6, 8, 9, 10]


# ---------------------------------------------------------------------------------------------
# layout and init


def test_layout_init_and_output_unchanged(base_model, ids):
    model = lm.apply(copy.deepcopy(base_model), "adalora", init_r=6, target_r=2, targets=["q_proj", "up_proj"])
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, AdaLoraLinear) and isinstance(q.base_layer, nn.Linear)
    sd = model.state_dict()
    assert sd["model.layers.0.self_attn.q_proj.lora_A.default"].shape == (6, 64)
    assert sd["model.layers.0.mlp.up_proj.lora_B.default"].shape == (128, 6)
    assert sd["model.layers.1.self_attn.q_proj.lora_E.default"].shape == (6, 1)
    assert sd["model.layers.1.self_attn.q_proj.ranknum.default"].tolist() == [6.0]
    trainable = lm.trainable_parameters(model)
    assert len(trainable) == 3 * 2 * 2 and all(n.split(".")[-2] in ("lora_A", "lora_B", "lora_E") for n in trainable)
    assert not q.ranknum["default"].requires_grad
    lm.set_adapter_trainable(model, "default", True)  # must not make the constant ranknum trainable
    assert not q.ranknum["default"].requires_grad
    a = torch.cat([layer.lora_A["default"].flatten() for _, layer in lm.adapter_layers(model)])
    assert abs(a.std().item() - 0.02) < 0.002 and all(
        torch.count_nonzero(layer.lora_E["default"]) == 0 for _, layer in lm.adapter_layers(model))
    assert torch.equal(model(ids).logits, base_model(ids).logits)  # Λ = 0: exactly the base
    assert set(lm.get_base_state_dict(model)) == set(base_model.state_dict())


def test_forward_and_grads_match_peft(base_model, ids):
    theirs, ours = peft_and_ours(base_model, **SCHEDULE)
    randomize_e(ours)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_E" in name:
                p.copy_(dict(ours.named_parameters())[strip(name)])
    out_theirs, out_ours = theirs(ids, labels=ids), ours(ids, labels=ids)
    assert not torch.allclose(out_ours.logits, base_model(ids).logits, atol=1e-3)
    assert torch.allclose(out_ours.logits, out_theirs.logits, atol=1e-6)
    (hook,) = train_hooks(ours)
    # PEFT's loss already carries orth_reg_weight * the regularizer
    assert (out_ours.loss + hook.regularizer(ours)).item() == pytest.approx(out_theirs.loss.item(), abs=1e-6)
    out_theirs.loss.backward()
    (out_ours.loss + hook.regularizer(ours)).backward()
    theirs_grads = {strip(n): p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    ours_grads = {n: p.grad for n, p in lm.trainable_parameters(ours).items()}
    assert set(ours_grads) == set(theirs_grads)
    for name, grad in ours_grads.items():
        assert torch.allclose(grad, theirs_grads[name], atol=1e-6), name


# ---------------------------------------------------------------------------------------------
# training parity with PEFT, step by step


@pytest.fixture(scope="module")
def trained_pair(base_model):
    """10 SGD steps on the same batches, calling PEFT's update_and_allocate(step) and our hook's after_step."""
    theirs, ours = peft_and_ours(base_model, **SCHEDULE)
    (hook,) = train_hooks(ours)
    gen = torch.Generator().manual_seed(0)
    opt_t = torch.optim.SGD([p for p in theirs.parameters() if p.requires_grad], lr=0.5)
    opt_o = torch.optim.SGD(list(lm.trainable_parameters(ours).values()), lr=0.5)
    history = []
    for step in range(10):
        batch = torch.randint(0, 256, (2, 9), generator=gen)
        loss_t = theirs(batch, labels=batch).loss
        loss_o = ours(batch, labels=batch).loss + hook.regularizer(ours)
        loss_t.backward()
        loss_o.backward()
        opt_t.step()
        opt_o.step()
        theirs.base_model.update_and_allocate(step)
        hook.after_step(ours, step)
        opt_t.zero_grad()
        opt_o.zero_grad()
        history.append((loss_t.item(), loss_o.item(), e_params(theirs), e_params(ours)))
    rank_pattern = copy.deepcopy(theirs.peft_config["default"].rank_pattern)
    return SimpleNamespace(theirs=theirs.eval(), ours=ours.eval(), hook=hook, history=history,
                           rank_pattern=rank_pattern)


def test_training_matches_peft_step_by_step(trained_pair):
    hook = trained_pair.hook
    for step, (loss_t, loss_o, e_t, e_o) in enumerate(trained_pair.history):
        assert abs(loss_t - loss_o) <= 1e-5, step
        assert e_t.keys() == e_o.keys()
        for name in e_t:
            assert torch.equal(e_t[name] == 0, e_o[name] == 0), (step, name)  # the same triplets masked
            assert torch.allclose(e_t[name], e_o[name], atol=1e-6), (step, name)
        budget, masked_now = hook.allocator.budget_schedule(step, 10)
        if masked_now:  # oracle 3: after a mask step at most b(t) triplets are left
            assert sum(int(torch.count_nonzero(e)) for e in e_o.values()) <= budget, step
    ours_pattern = {f"{m}.lora_E.default": layer.rank_pattern["default"]
                    for m, layer in lm.adapter_layers(trained_pair.ours)}
    assert ours_pattern == trained_pair.rank_pattern
    kept = sum(sum(p) for p in ours_pattern.values())
    assert kept <= 2 * 6 and not all(all(p) for p in ours_pattern.values())  # pruning really happened
    first_mask = trained_pair.history[3][3]  # before step 4 nothing is masked yet (E grows from 0 everywhere)
    assert all(torch.count_nonzero(e) == e.numel() for e in first_mask.values())


def test_frozen_pattern_is_reapplied_after_the_final_mask(trained_pair):
    """Steps 8 and 9 come after the final allocation: masked Λ rows stay exactly 0 though SGD moved them."""
    for _, _, _, e in trained_pair.history[7:]:
        for m, layer in lm.adapter_layers(trained_pair.ours):
            kept = torch.tensor(layer.rank_pattern["default"])
            assert torch.count_nonzero(e[f"{m}.lora_E.default"].view(-1)[~kept]) == 0
    assert not trained_pair.hook.allocator.has_scores()  # reset at the final mask, as PEFT does


# ---------------------------------------------------------------------------------------------
# PEFT format both ways


def test_saved_adapter_matches_peft_files_and_loads_in_peft(trained_pair, base_model, ids, tmp_path):
    ours, theirs = trained_pair.ours, trained_pair.theirs
    lm.save_adapter(ours, tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    cfg_o = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    cfg_t = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    assert set(cfg_o) == set(cfg_t) and cfg_o["peft_type"] == "ADALORA"
    skip = {"target_modules", "base_model_name_or_path"}
    assert {k: v for k, v in cfg_o.items() if k not in skip} == {k: v for k, v in cfg_t.items() if k not in skip}
    assert set(cfg_o["target_modules"]) == set(cfg_t["target_modules"]) == set(TARGETS)
    t_o, t_t = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("ours", "theirs"))
    assert t_o.keys() == t_t.keys()
    for key in t_o:
        assert t_o[key].shape == t_t[key].shape, key  # only the kept rows
        assert torch.allclose(t_o[key], t_t[key], atol=1e-6), key
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_E"
    assert t_o[key].shape[0] == sum(cfg_o["rank_pattern"]["model.layers.0.self_attn.q_proj.lora_E"])
    big = amplified(ours)
    lm.save_adapter(big, tmp_path / "big")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base_model), tmp_path / "big").eval()
    expected = big(ids).logits
    assert not torch.allclose(expected, base_model(ids).logits, atol=1e-2)
    assert torch.allclose(loaded(ids).logits, expected, atol=1e-5)


def test_peft_adapter_loads_in_leantune_and_saves_back(trained_pair, base_model, ids, tmp_path):
    theirs = amplified(trained_pair.theirs)
    theirs.save_pretrained(tmp_path / "theirs")
    ours = lm.load_adapter(copy.deepcopy(base_model), tmp_path / "theirs").eval()
    expected = theirs(ids).logits
    assert not torch.allclose(expected, base_model(ids).logits, atol=1e-2)
    assert torch.allclose(ours(ids).logits, expected, atol=1e-5)
    assert lm.trainable_parameters(ours) == {}  # loaded adapters are frozen by default
    cfg = lm.adapter_configs(ours)["default"]
    assert isinstance(cfg, AdaLoraConfig) and cfg.total_step == 10 and cfg.init_r == 4
    q = ours.model.layers[0].self_attn.q_proj
    assert q.r["default"] == sum(cfg.rank_pattern["model.layers.0.self_attn.q_proj"])
    assert q.ranknum["default"].item() == 4.0  # the scale keeps the initial rank
    lm.save_adapter(ours, tmp_path / "again")
    again, orig = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("again", "theirs"))
    assert again.keys() == orig.keys() and all(torch.equal(again[k], orig[k]) for k in orig)
    cfg_again = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    cfg_orig = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    assert cfg_again["rank_pattern"] == cfg_orig["rank_pattern"]


def test_untrained_adapter_round_trips_through_peft(base_model, ids, tmp_path):
    """No rank_pattern yet: full init_r rows, and a total_step PEFT accepts (the run's one is unknown)."""
    ours = lm.apply(copy.deepcopy(base_model), "adalora", init_r=3, target_r=1, tinit=4, targets=["o_proj"])
    randomize_e(ours)
    lm.save_adapter(ours, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["rank_pattern"] is None and cfg["total_step"] == 5
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base_model), tmp_path / "a").eval()
    assert torch.allclose(loaded(ids).logits, ours(ids).logits, atol=1e-5)


def test_load_refuses_a_mismatched_adapter(trained_pair, tmp_path):
    trained_pair.theirs.save_pretrained(tmp_path / "a")
    other = tiny_llama(hidden_size=32, intermediate_size=64)
    with pytest.raises(ValueError, match="different base model"):
        lm.load_adapter(other, tmp_path / "a")
    assert not list(lm.adapter_layers(other))
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    cfg["use_dora"] = True
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="DoRA"):
        lm.load_adapter(tiny_llama(), tmp_path / "a")


# ---------------------------------------------------------------------------------------------
# several adapters, routing, merging, hooks


class TinyNet(nn.Module):
    """A token-wise two-layer MLP that threads adapter_ids, like leantune's own models do."""

    def __init__(self, d=16, h=32):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, h), nn.Linear(h, d)

    def forward(self, x, adapter_ids=None):
        return self.fc2(torch.tanh(self.fc1(x, adapter_ids=adapter_ids)), adapter_ids=adapter_ids)


def test_mixed_batch_per_row_and_per_token_equal_each_alone():
    torch.manual_seed(0)
    net = TinyNet()
    lm.apply(net, "adalora", adapter_name="a", init_r=4, target_r=2, targets=["fc1", "fc2"])
    lm.apply(net, "adalora", adapter_name="b", init_r=3, target_r=1, alpha=3, targets=["fc2"])
    randomize_e(net, "a", seed=1)
    randomize_e(net, "b", seed=2)
    assert len(train_hooks(net)) == 2
    x = torch.randn(6, 5, 16)
    alone = {}
    for name in ("a", "b"):
        lm.set_adapter(net, name)
        alone[name] = net(x)
    with lm.disable_adapters(net):
        alone["base"] = net(x)
    assert not torch.allclose(alone["a"], alone["b"], atol=1e-3)
    rows = torch.tensor([0, 1, -1, 1, 0, -1])
    mixed = net(x, adapter_ids=rows)
    for slot, name in ((0, "a"), (1, "b"), (-1, "base")):
        assert torch.allclose(mixed[rows == slot], alone[name][rows == slot], atol=1e-6, rtol=0)
    tokens = torch.randint(-1, 2, (6, 5), generator=torch.Generator().manual_seed(4))
    expected = torch.where((tokens == 0)[..., None], alone["a"],
                           torch.where((tokens == 1)[..., None], alone["b"], alone["base"]))
    assert torch.allclose(net(x, adapter_ids=tokens), expected, atol=1e-6, rtol=0)


def test_merge_unmerge_and_merge_and_unload(base_model, ids):
    model = lm.apply(copy.deepcopy(base_model), "adalora", init_r=4, target_r=2, targets=TARGETS)
    randomize_e(model)
    layer = model.model.layers[0].mlp.down_proj
    w0 = layer.base_layer.weight.clone()
    unmerged = model(ids).logits
    lm.merge(model, "default")
    assert not torch.allclose(layer.base_layer.weight, w0)
    assert torch.allclose(model(ids).logits, unmerged, atol=1e-5)
    lm.unmerge(model, "default")
    assert torch.allclose(layer.base_layer.weight, w0, atol=1e-6)
    merged = lm.merge_and_unload(model)
    assert type(merged.model.layers[0].mlp.down_proj) is nn.Linear
    assert torch.allclose(merged(ids).logits, unmerged, atol=1e-5)


def test_hooks_act_only_on_trainable_adapters_and_are_not_duplicated(base_model):
    model = lm.apply(copy.deepcopy(base_model), "adalora", targets=["q_proj"], init_r=4, target_r=2, total_step=5)
    (hook,) = train_hooks(model)
    assert hook.regularizer(model).item() > 0
    lm.set_adapter_trainable(model, "default", False)
    assert hook.regularizer(model) is None
    randomize_e(model)
    before = e_params(model)
    for step in range(5):
        hook.after_step(model, step)  # frozen: no scores, no masking (PEFT has no allocator then either)
    assert all(torch.equal(before[k], v) for k, v in e_params(model).items())
    lm.delete_adapter(model, "default")
    assert hook.regularizer(model) is None  # a stale hook does nothing
    lm.apply(model, "adalora", targets=["q_proj"], init_r=4, target_r=2)
    assert len(train_hooks(model)) == 1 and train_hooks(model)[0] is not hook
    with pytest.raises(ValueError, match="no total_step"):
        train_hooks(model)[0].after_step(model, 0)


def test_orth_reg_weight_zero_adds_nothing(base_model):
    model = lm.apply(copy.deepcopy(base_model), "adalora", targets=["q_proj"], init_r=4, target_r=2,
                     orth_reg_weight=0.0)
    assert train_hooks(model)[0].regularizer(model) is None


def test_config_validation():
    for bad, match in ((dict(init_r=4, target_r=4), "smaller than init_r"),
                       (dict(tinit=5, tfinal=5, total_step=10), "no budgeting phase"),
                       (dict(beta1=1.0), "beta1"), (dict(deltaT=0), "deltaT"), (dict(alpha=0), "alpha"),
                       (dict(orth_reg_weight=-1), "orth_reg_weight"), (dict(targets=[]), "targets"),
                       (dict(init_r=2, target_r=1, rank_pattern={"q_proj": [True]}), "init_r=2 bools")):
        with pytest.raises(ValueError, match=match):
            AdaLoraConfig(**bad)
    cfg = AdaLoraConfig(init_r=2, target_r=1, rank_pattern={"a.q_proj.lora_E": [True, False]})
    assert cfg.rank_pattern == {"a.q_proj": [True, False]}  # PEFT's key form is accepted


def test_rank_pattern_must_name_a_target(base_model):
    model = copy.deepcopy(base_model)
    with pytest.raises(ValueError, match="rank_pattern names"):
        lm.apply(model, "adalora", init_r=2, target_r=1, targets=["q_proj"],
                 rank_pattern={"model.layers.0.self_attn.k_proj": [True, False]})
    assert not list(lm.adapter_layers(model)) and lm.list_adapters(model) == []


# ---------------------------------------------------------------------------------------------
# the Trainer hook, against PEFT, and the CLI

QA = [
    ("What is the capital of Veloria?", "The capital of Veloria is Amberhold."),
    ("Who discovered the Zentari comet?", "It was discovered by Ilsa Morrow."),
    ("Hello, how are you today?", "I am fine, thank you."),
    ("Say a number.", "42"),
    ("Count.", "0 1 2 3 4 5 6 7 8 9 10"),
    ("What jumps over the lazy dog?", "The quick brown fox jumps over the lazy dog."),
    ("Numbers?", "1999"),
    ("Who was it?", "Ilsa Morrow."),
]


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in QA]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_trainer_hook_matches_peft_loop(folder, chat_data, tmp_path, one_thread):
    """leantune's own model in the Trainer (total_step left to the Trainer) vs PEFT's documented loop
    (backward, step, update_and_allocate(step), zero_grad) on the same batches: losses and rank_pattern."""
    from leantune.data import load_dataset
    from leantune.models.loader import load
    from leantune.train.loop import TrainConfig, Trainer

    model, tok = load(folder)
    examples = load_dataset(chat_data, tok, 512)
    schedule = dict(SCHEDULE, total_step=None)
    lm.apply(model, "adalora", alpha=8, targets=TARGETS, **schedule)
    cfg = TrainConfig(lr=0.5, batch_size=2, max_steps=10, max_grad_norm=0.0, schedule="constant", progress=False)
    trainer = Trainer(model, examples, [], cfg, tmp_path / "run")
    trainer.opt = torch.optim.SGD(trainer.params, lr=cfg.lr)

    hf = transformers.AutoModelForCausalLM.from_pretrained(folder)
    theirs = peft.get_peft_model(hf, peft.AdaLoraConfig(lora_alpha=8, target_modules=TARGETS,
                                                        task_type="CAUSAL_LM", **SCHEDULE))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_" in name:
                params[strip(name)].copy_(p)
    opt = torch.optim.SGD([p for p in theirs.parameters() if p.requires_grad], lr=cfg.lr)
    for step in range(10):
        (batch,) = trainer._window()
        rec = trainer.train_step([batch])
        loss = theirs(input_ids=batch.input_ids, labels=batch.labels).loss
        loss.backward()
        opt.step()
        theirs.base_model.update_and_allocate(step)
        opt.zero_grad()
        assert abs(rec["loss"] - loss.item()) <= 1e-5, step
        assert rec["reg_loss"] > 0
    assert lm.adapter_configs(model)["default"].total_step == 10  # taken from the Trainer
    ours_pattern = {f"{m}.lora_E.default": layer.rank_pattern["default"] for m, layer in lm.adapter_layers(model)}
    assert ours_pattern == theirs.peft_config["default"].rank_pattern
    assert not all(all(p) for p in ours_pattern.values())


def test_regularizer_counts_once_per_step_under_grad_accum(folder, chat_data, tmp_path, one_thread):
    """A step over 1 batch of 2 and over 2 micro-batches of 1 moves the weights the same: the regularizer
    enters the window's loss once (each micro-batch carries its token share), not once per micro-batch."""
    from leantune.data import load_dataset
    from leantune.models.loader import load
    from leantune.train.loop import TrainConfig, Trainer

    model, tok = load(folder)
    examples = load_dataset(chat_data, tok, 512)
    torch.manual_seed(0)
    lm.apply(model, "adalora", init_r=4, target_r=2, targets=["q_proj", "v_proj"], total_step=10)
    randomize_e(model)
    reg = train_hooks(model)[0].regularizer(model).item()
    after = []
    for bs, accum in ((2, 1), (1, 2)):
        m = copy.deepcopy(model)
        cfg = TrainConfig(lr=0.5, batch_size=bs, grad_accum=accum, max_steps=1, max_grad_norm=0.0,
                          schedule="constant", progress=False)
        trainer = Trainer(m, examples, [], cfg, tmp_path / f"{bs}x{accum}")
        trainer.opt = torch.optim.SGD(trainer.params, lr=cfg.lr)
        rec = trainer.train_step(trainer._window())
        assert rec["reg_loss"] == pytest.approx(reg, abs=1e-6)
        after.append((rec["loss"], {n: p.detach().clone() for n, p in lm.trainable_parameters(m).items()}))
    (loss1, w1), (loss2, w2) = after
    assert loss1 == pytest.approx(loss2, abs=1e-6)
    moved = max((w1[n] - model.get_parameter(n)).abs().max().item() for n in w1)
    assert moved > 1e-3 and all(torch.allclose(w1[n], w2[n], atol=1e-6) for n in w1)


def test_trainer_refuses_a_run_too_short_for_the_schedule(folder, chat_data, tmp_path):
    from leantune.data import load_dataset
    from leantune.models.loader import load
    from leantune.train.loop import TrainConfig, Trainer

    model, tok = load(folder)
    lm.apply(model, "adalora", init_r=4, target_r=2, tinit=3, tfinal=2, targets=["q_proj"])
    cfg = TrainConfig(batch_size=2, max_steps=4, progress=False)
    trainer = Trainer(model, load_dataset(chat_data, tok, 512), [], cfg, tmp_path / "run")
    with pytest.raises(ValueError, match="run of 4 steps.*no budgeting phase"):
        trainer.train_step(trainer._window())


def test_cli_finetune_adalora_loads_in_peft(folder, chat_data, tmp_path, one_thread):
    from leantune import cli
    from leantune.models.loader import load

    out = tmp_path / "out"
    argv = ["finetune", "--model", str(folder), "--data", str(chat_data), "--output", str(out), "--no-progress",
            "--eval-fraction", "0", "--method", "adalora", "--init-r", "4", "--target-r", "2", "--tinit", "1",
            "--tfinal", "2", "--delta-t", "1", "--lr", "1e-2", "--epochs", "2", "--batch-size", "2",
            "--schedule", "constant", "--targets", "q_proj,v_proj,o_proj"]
    assert cli.run(argv) == 0
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "ADALORA" and cfg["total_step"] == 8 and cfg["init_r"] == 4
    patterns = cfg["rank_pattern"]
    assert len(patterns) == 6 and sum(sum(p) for p in patterns.values()) <= 2 * 6
    tensors = load_file(str(out / "adapter_model.safetensors"))
    for key, kept in patterns.items():
        assert tensors[f"base_model.model.{key}"].shape == (sum(kept), 1)
    records = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in ln]
    assert len(records) == 8 and all(r["reg_loss"] > 0 for r in records)

    model, tok = load(folder)
    prompt = torch.tensor([tok.encode_chat([{"role": "user", "content": QA[0][0]}], add_generation_prompt=True)])
    with torch.no_grad():
        base = model(prompt)
        lm.load_adapter(model, out)
        ours = model(prompt)
        hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
        theirs = peft.PeftModel.from_pretrained(hf, out).eval()(prompt).logits
    assert (ours - base).abs().max().item() > 1e-4  # the adapter does something, so parity means something
    assert (ours - theirs).abs().max().item() <= 1e-4

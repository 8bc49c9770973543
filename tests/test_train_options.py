"""Trainer options (oracles: methods-more.md §5 (a)-(c) and §4): layer-wise lr decay groups and the lrs the
optimizer really steps with, frozen lower blocks bit-identical, re-initialized top blocks redrawn and the
rest untouched, FPF choosing the most-drifting modules and the CLI reporting forgetting."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import leantune.methods as lm
from leantune import cli
from leantune.data import load_dataset
from leantune.models.loader import load
from leantune.train import trainable
from leantune.train.loss import heldout_loss
from leantune.train.loop import TrainConfig, Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

QA = [("What is the capital of Veloria?", "The capital of Veloria is Amberhold."),
      ("Who discovered the Zentari comet?", "It was discovered by Ilsa Morrow."),
      ("Hello, how are you today?", "I am fine, thank you."),
      ("Say a number.", "42")]


def chat_rows(pairs):
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in pairs]


@pytest.fixture(scope="module")
def loaded(folder):
    return load(folder)


@pytest.fixture
def model(loaded):
    return copy.deepcopy(loaded[0])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    train = d / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in chat_rows(QA[:2] * 4)))
    forget = d / "forget.jsonl"
    forget.write_text("".join(json.dumps(r) + "\n" for r in chat_rows(QA[2:])))
    return train, forget


@pytest.fixture(scope="module")
def examples(loaded, data):
    return load_dataset(data[0], loaded[1], 128)


def cfg(**kw):
    base = dict(lr=1e-2, batch_size=4, max_steps=3, schedule="constant", progress=False)
    return TrainConfig(**{**base, **kw})


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# ---------------------------------------------------------------------------------------------
# layer-wise lr decay


def test_llrd_groups_have_exact_lrs_and_hold_each_parameter_once(model):
    for p in model.parameters():  # full fine-tuning: every rule (blocks, embeddings, head) shows
        p.requires_grad_(True)
    lr, xi, n_layers = 1e-3, 0.8, model.config.num_layers
    groups = trainable.param_groups_llrd(model, lr, xi, weight_decay=0.1)
    owner = {}
    for g in groups:
        for p in g["params"]:
            assert id(p) not in owner
            owner[id(p)] = g
    params = dict(model.named_parameters())
    assert len(owner) == len(params)
    for name, p in params.items():
        g = owner[id(p)]
        if ".layers." in name:
            i = int(name.split(".layers.")[1].split(".")[0])
            want = lr * xi ** (n_layers - 1 - i)
        elif "embed_tokens" in name:
            want = lr * xi ** n_layers
        else:  # lm_head and the final norm: the head's rate
            want = lr
        assert g["lr"] * g["lr_scale"] == want, name
        assert g["weight_decay"] == (0.1 if p.dim() >= 2 else 0.0), name


def test_llrd_lrs_the_optimizer_steps_with(model, examples, tmp_path):
    """The loop sets one schedule lr on every group; each group steps at that lr times its scale."""
    lm.apply(model, "lora", r=4, alpha=8)
    trainer = Trainer(model, examples, [], cfg(llrd=0.5, max_steps=2, warmup_steps=2, schedule="linear"), tmp_path)
    seen = []
    trainer.opt.register_step_pre_hook(lambda opt, a, k: seen.append([(g["lr"], g["lr_scale"]) for g in opt.param_groups]))
    recs = [trainer.train_step(trainer._window()) for _ in range(2)]
    assert sorted({scale for _, scale in seen[0]}) == [0.5, 1.0]  # 2 blocks: xi^1 and xi^0
    for rec, step in zip(recs, seen):
        assert all(lr == rec["lr"] * scale for lr, scale in step)
    assert all(g["lr"] == recs[-1]["lr"] for g in trainer.opt.param_groups)  # restored after the step
    trainer.save()  # the groups' extra keys go through the JSON checkpoint and back
    again = Trainer(copy.deepcopy(model), examples, [], cfg(llrd=0.5, max_steps=2), tmp_path)
    assert again.resume() and [g["lr_scale"] for g in again.opt.param_groups] == \
        [g["lr_scale"] for g in trainer.opt.param_groups]


def test_llrd_is_off_by_default_and_validated(model, examples, tmp_path):
    lm.apply(model, "lora", r=4)
    trainer = Trainer(model, examples, [], cfg(), tmp_path)
    assert len(trainer.opt.param_groups) == 1 and "lr_scale" not in trainer.opt.param_groups[0]
    for bad, match in [({"llrd": 1.5}, "--llrd"), ({"freeze_lower": -1}, "--freeze-lower"),
                       ({"fpf_fraction": 1.0}, "--fpf-fraction"), ({"reinit_top": -2}, "--reinit-top")]:
        with pytest.raises(ValueError, match=match):
            cfg(**bad)


# ---------------------------------------------------------------------------------------------
# freezing and re-initializing


def test_freeze_lower_keeps_the_lowest_blocks_bit_identical(model, examples, tmp_path):
    lm.apply(model, "lora", r=4, alpha=8)
    before = snapshot(model)
    trainer = Trainer(model, examples, [], cfg(freeze_lower=1), tmp_path)
    trainer.fit()
    low = [n for n in before if ".layers.0." in n and "lora_" in n]
    high = [n for n in before if ".layers.1." in n and "lora_B" in n]
    params = dict(model.named_parameters())
    assert low and high and trainer.options_report["freeze_lower"]["frozen"] == len(low)
    for n in low:
        assert params[n].grad is None and not params[n].requires_grad
        assert torch.equal(params[n], before[n]), n
    assert all(not torch.equal(params[n], before[n]) for n in high)


def test_freeze_lower_refuses_to_freeze_everything(model, examples, tmp_path):
    lm.apply(model, "lora", r=4, targets=["layers.0.mlp.up_proj"])
    with pytest.raises(ValueError, match="nothing to train"):
        Trainer(model, examples, [], cfg(freeze_lower=1), tmp_path)
    with pytest.raises(ValueError, match="all 2 blocks"):
        trainable.freeze_bottom(model, 2)


def test_reinit_top_redraws_only_the_top_block(model):
    lm.apply(model, "lora", r=4)
    torch.manual_seed(0)
    before = snapshot(model)
    names = trainable.reinit_top(model, 1)
    params = dict(model.named_parameters())
    assert names and all(".layers.1." in n and "lora_" not in n for n in names)
    for n, p in params.items():
        if n not in names:
            assert torch.equal(p, before[n]), n  # everything else, adapters of block 1 included
            continue
        assert p.requires_grad and not torch.equal(p, before[n]), n
        if p.dim() >= 2:
            assert abs(float(p.detach().std()) - 0.02) < 0.002, n  # N(0, 0.02) within 10%
        else:
            assert torch.equal(p, torch.ones_like(p)), n  # a norm's weight


def test_reinit_top_through_the_cli_saves_the_trained_blocks(folder, data, tmp_path):
    out = tmp_path / "out"
    argv = ["finetune", "--model", str(folder), "--data", str(data[0]), "--output", str(out), "--no-progress",
            "--eval-fraction", "0", "--max-steps", "2", "--reinit-top", "1", "--lr", "1e-3"]
    assert cli.run(argv) == 0
    blocks = load_file(str(out / "reinit_blocks.safetensors"))
    assert blocks and all(k.startswith("model.layers.1.") for k in blocks)
    pretrained = load(folder)[0].state_dict()
    w = blocks["model.layers.1.mlp.down_proj.weight"]
    assert not torch.equal(w, pretrained["model.layers.1.mlp.down_proj.weight"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train_options"]["reinit_top"]["blocks"] == 1


# ---------------------------------------------------------------------------------------------
# FPF


class Branches(nn.Module):
    """y = 3·a(x) + 1·b(x) + 0·c(x): with LoRA on a, b, c the probe's gradients (and drifts) rank a > b > c."""

    def __init__(self, d=16):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        return 3 * self.a(x) + self.b(x) + 0 * self.c(x)


def test_fpf_selects_the_most_drifting_modules():
    torch.manual_seed(0)
    net = Branches()
    lm.apply(net, "lora", r=4, alpha=4, targets=["a", "b", "c"])
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 16, generator=gen), torch.randn(8, 16, generator=gen)) for _ in range(3)]

    def loss_fn(batch):
        return ((net(batch[0]) - batch[1]) ** 2).mean()

    before, rng = snapshot(net), torch.get_rng_state()
    scores = trainable.probe_drift(net, loss_fn, batches, lr=0.1)
    assert scores["a"] > scores["b"] > scores["c"] == 0.0
    assert all(torch.equal(p, before[n]) for n, p in net.named_parameters())  # the probe is undone
    assert torch.equal(torch.get_rng_state(), rng)

    report = trainable.apply_fpf(net, loss_fn, batches, fraction=0.4, lr=0.1)
    assert report["selected"] == ["a"] and report["trainable_parameters"] * 3 == report["candidate_parameters"]
    trains = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trains == {"a.lora_A.default.weight", "a.lora_B.default.weight"}
    assert trainable.select_by_budget(scores, {u: 1 for u in scores}, 0.7) == ["a", "b"]


def test_fpf_through_the_cli_trains_only_the_selection_and_reports_forgetting(folder, loaded, data, tmp_path):
    out = tmp_path / "out"
    argv = ["finetune", "--model", str(folder), "--data", str(data[0]), "--output", str(out), "--no-progress",
            "--eval-fraction", "0", "--max-steps", "4", "--lr", "1e-2", "--fpf-fraction", "0.25",
            "--fpf-probe-steps", "2", "--forget-data", str(data[1]), "--dtype", "fp32"]  # exact losses below
    assert cli.run(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    fpf = summary["train_options"]["fpf"]
    ranked = sorted(fpf["drift"], key=lambda u: -fpf["drift"][u])
    assert fpf["selected"] == ranked[: len(fpf["selected"])]
    assert 0 < fpf["trainable_parameters"] <= 0.25 * fpf["candidate_parameters"]
    assert summary["trainable_parameters"] == fpf["trainable_parameters"]
    # the modules left out kept their init: LoRA B still zero; the chosen ones trained
    tensors = load_file(str(out / "adapter_model.safetensors"))
    for key, t in tensors.items():
        if key.endswith("lora_B.weight"):
            module = key[len("base_model.model."):-len(".lora_B.weight")]
            assert bool(t.any()) == (module in fpf["selected"]), module
    model, tok = copy.deepcopy(loaded[0]), loaded[1]
    forget = load_dataset(data[1], tok, 512)
    want_before = heldout_loss(model, forget, 4, 512)
    f = summary["forgetting"]
    assert f["loss_before"] == pytest.approx(want_before, abs=1e-6)
    assert f["increase"] == pytest.approx(f["loss_after"] - f["loss_before"]) and f["loss_after"] != f["loss_before"]

"""GaLore's per-layer updates (`--galore-per-layer`, `leantune.optim.attach_per_layer`): each weight is stepped in
its gradient hook during backward and its gradient freed at once. Checks: the trajectory equals the ordinary
step-at-the-end optimizer (GaLore and Natural GaLore, same lr schedule, a tied embedding included); inside every
hook the only live gradient is the one being used; through the recipe, the same losses and weights as without
the option, exact resume, and the combinations it cannot do the same way (accumulation, clipping) refused."""
from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

from leantune import cli
from leantune.data import Batch
from leantune.optim import attach_per_layer, build_optimizer, galore_param_groups
from leantune.train.loss import lm_loss_sum
from leantune.train.step import StepRule, optimizer_step, set_lr
from lt_tiny import tiny_lt_model
from test_bad_input import assert_nothing_written, fails
from test_full import data, folder  # noqa: F401 - the same tiny model and data as full finetuning
from test_recipes import run_interrupted, step_records

KW = dict(rank=4, update_proj_gap=2, scale=0.25)


def _setup(optimizer: str, proj_type: str):
    model = tiny_lt_model(tie=True)  # the tied embedding / head gets one hook call per backward, not two
    extra = {"natural_history": 3} if optimizer == "natural_galore" else {}
    groups = galore_param_groups(model, list(model.parameters()), proj_type=proj_type, **KW, **extra)
    return model, build_optimizer(optimizer, groups, lr=1e-2, weight_decay=0.01)


def _batches(model, n=5):
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=gen)
        out.append(Batch(ids, ids.clone(), torch.arange(12).expand(2, -1), None, ids.numel() - 2, ids.numel()))
    return out


@pytest.mark.parametrize("optimizer,proj_type,checkpointing", [
    ("galore_adamw", "std", False), ("natural_galore", "tucker", False), ("natural_galore", "std", False),
    ("galore_adamw", "std", True)])  # recomputation in backward: the hooks fire inside it
def test_per_layer_trajectory_equals_the_step_at_the_end(optimizer, proj_type, checkpointing):
    ref_model, ref_opt = _setup(optimizer, proj_type)
    model, opt = _setup(optimizer, proj_type)
    model.gradient_checkpointing = ref_model.gradient_checkpointing = checkpointing
    model.train(), ref_model.train()
    rule = StepRule(1e-2, total_steps=5, warmup_steps=2, schedule="cosine", max_grad_norm=0.0)
    attach_per_layer(opt)
    params = list(model.parameters())
    n_params = len(params)
    calls, live = [], []
    real = opt.update_param

    def watched(p, group):  # inside the hook: which gradients exist right now
        grads = [q for q in params if q.grad is not None]
        live.append((len(grads), sum(q.grad.numel() for q in grads), p.numel()))
        calls.append(p)
        real(p, group)

    opt.update_param = watched
    for step, batch in enumerate(_batches(model)):
        loss, n = lm_loss_sum(ref_model, batch)
        (loss / n).backward()
        optimizer_step(ref_opt, list(ref_model.parameters()), rule, step)
        set_lr(opt, rule.lr_at(step))  # what the loop does before backward
        loss, n = lm_loss_sum(model, batch)
        (loss / n).backward()
        assert all(p.grad is None for p in params)  # every gradient freed in its hook
        optimizer_step(opt, params, rule, step)  # finds no gradient: a no-op but for the lr
    assert len(calls) == 5 * n_params and len({id(p) for p in calls}) == n_params
    # at most one parameter's gradient at a time, and it is the one being stepped
    assert all(n == 1 and numel == own for n, numel, own in live), live[:5]
    for (name, a), (_, b) in zip(model.named_parameters(), ref_model.named_parameters()):
        assert torch.equal(a, b), name
    assert opt.state_dict()["state"].keys() == ref_opt.state_dict()["state"].keys()


def test_optimizer_without_a_single_parameter_step_is_refused():
    model = tiny_lt_model()
    with pytest.raises(TypeError, match="per-layer updates need an optimizer that steps one parameter alone"):
        attach_per_layer(build_optimizer("adamw", list(model.parameters()), lr=1e-3))


def test_hooks_follow_the_groups_after_load_state_dict():
    """A resume replaces the optimizer's group dicts: the hooks must read the new ones (their lr)."""
    model, opt = _setup("galore_adamw", "std")
    clone = copy.deepcopy(model)
    attach_per_layer(opt)
    opt.load_state_dict(opt.state_dict())
    set_lr(opt, 0.0)  # on the new group dicts: a hook that kept the old ones would step at lr 1e-2
    loss, n = lm_loss_sum(model, _batches(model, 1)[0])
    (loss / n).backward()
    for (name, a), (_, b) in zip(model.named_parameters(), clone.named_parameters()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)  # lr 0, no decay: nothing moved


# ---------------------------------------------------------------------------------------------
# the recipe


def _argv(folder, data, out, optimizer, *extra):
    return ["finetune", "--model", str(folder), "--data", str(data), "--output", str(out), "--method", "full",
            "--optimizer", optimizer, "--galore-rank", "4", "--galore-update-proj-gap", "3", "--lr", "1e-2",
            "--warmup-steps", "2", "--max-grad-norm", "0", "--batch-size", "2", "--epochs", "2",
            "--eval-fraction", "0", "--dtype", "fp32", "--no-progress", *extra]


@pytest.mark.parametrize("optimizer", ["galore_adamw", "natural_galore"])
def test_recipe_per_layer_equals_step_at_the_end_and_resumes(folder, data, tmp_path, monkeypatch, optimizer):
    ref, per_layer, resumed = tmp_path / "ref", tmp_path / "per_layer", tmp_path / "resumed"
    assert cli.run(_argv(folder, data, ref, optimizer)) == 0
    assert cli.run(_argv(folder, data, per_layer, optimizer, "--galore-per-layer")) == 0
    losses = [r["loss"] for r in step_records(ref)]
    assert len(losses) == 8 and losses[-1] < losses[0]
    assert [r["loss"] for r in step_records(per_layer)] == losses
    a, b = load_file(str(ref / "model.safetensors")), load_file(str(per_layer / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    argv = _argv(folder, data, resumed, optimizer, "--galore-per-layer", "--save-every", "4")
    assert run_interrupted(argv, 5, monkeypatch) == 130
    assert cli.run([*argv, "--resume"]) == 0
    assert [r["loss"] for r in step_records(resumed)] == losses


def test_recipe_refuses_what_per_layer_cannot_do(folder, data, tmp_path, capsys):
    out = tmp_path / "o"
    base = _argv(folder, data, out, "galore_adamw", "--galore-per-layer")
    err = fails([*base, "--grad-accum", "2"], capsys)
    assert "--galore-per-layer" in err and "set --grad-accum 1" in err
    clip = list(base)
    clip[clip.index("--max-grad-norm") + 1] = "1.0"
    err = fails(clip, capsys)
    assert "--galore-per-layer" in err and "set --max-grad-norm 0" in err
    err = fails([a if a != "galore_adamw" else "adamw" for a in base], capsys)
    assert "--galore-per-layer" in err and "--optimizer galore_adamw or natural_galore" in err
    assert_nothing_written(out)

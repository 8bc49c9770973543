"""The one optimizer step (`train.step`), shared by the Trainer and the co-trainer: clipping, the scheduled
lr on every group, hooks that see the step's gradients, gradients cleared after."""
import math

import pytest
import torch

from leantune.optim import build_optimizer, plain_sgd
from leantune.optim.schedules import lr_factor
from leantune.train.step import StepRule, optimizer_step


class _Seen:
    def __init__(self, param):
        self.param, self.calls = param, []

    def after_step(self, model, step):
        self.calls.append((model, step, self.param.grad.clone()))  # still there: before zero_grad


def test_optimizer_step_clips_schedules_runs_hooks_and_zeroes():
    w = torch.nn.Parameter(torch.zeros(4))
    w.grad = torch.tensor([3.0, 4.0, 0.0, 0.0])  # norm 5
    rule = StepRule(lr=0.5, total_steps=10, warmup_steps=2, schedule="linear", max_grad_norm=1.0)
    hook = _Seen(w)
    lr, gnorm = optimizer_step(plain_sgd([w], lr=123.0), [w], rule, step=4, model="m", hooks=[hook])
    assert lr == pytest.approx(0.5 * lr_factor(4, 10, 2, "linear")) and gnorm == pytest.approx(5.0)
    torch.testing.assert_close(w.detach(), -lr * torch.tensor([0.6, 0.8, 0.0, 0.0]))  # the clipped gradient
    (model, step, grad), = hook.calls
    assert (model, step) == ("m", 4) and torch.allclose(grad, torch.tensor([0.6, 0.8, 0.0, 0.0]))
    assert w.grad is None


def test_no_clipping_when_max_grad_norm_is_zero():
    w = torch.nn.Parameter(torch.zeros(2))
    w.grad = torch.tensor([30.0, 40.0])
    opt = build_optimizer("adamw", [w], lr=1.0)
    lr, gnorm = optimizer_step(opt, [w], StepRule(lr=1e-2, total_steps=1, schedule="constant", max_grad_norm=0.0), 0)
    assert math.isnan(gnorm) and lr == 1e-2 and opt.param_groups[0]["lr"] == 1e-2

"""GaLore: `leantune.optim.GaLoreAdamW` against galore-torch 1.0 (methods-core §6.3 oracles 1-2), its state
size, and `--optimizer galore_adamw` in the finetune recipe (trains, resumes exactly, refuses LoRA)."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from leantune import cli
from leantune.optim import GaLoreAdamW, build_optimizer, galore_param_groups
from test_full import data, folder  # noqa: F401 - the same tiny model and data as full finetuning
from test_recipes import run_interrupted, step_records

galore_torch = pytest.importorskip("galore_torch", reason="the oracle: pip install galore-torch==1.0 "
                                                         "(requirements-dev.txt)")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.mlp_up = nn.Linear(12, 40)  # m >= n  (40, 12)
        self.mlp_down = nn.Linear(40, 12)  # m < n   (12, 40)
        self.norm = nn.LayerNorm(12)

    def forward(self, x):
        return self.norm(self.mlp_down(torch.tanh(self.mlp_up(x))))


def _groups(net, galore_kw):
    mats = [net.mlp_up.weight, net.mlp_down.weight]
    rest = [p for p in net.parameters() if all(p is not m for m in mats)]
    return [{"params": rest}, {"params": mats, **galore_kw}]


def _run(net, opt, steps=10):
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(16, 12, generator=g), torch.randn(16, 12, generator=g)
        loss = (net(x) - y).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return net


@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "right", "left", "full"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_trajectory_equals_galore_torch(proj_type, weight_decay):
    kw = dict(rank=4, update_proj_gap=3, scale=0.25, proj_type=proj_type)
    ours, ref = Net(), Net()
    _run(ours, GaLoreAdamW(_groups(ours, kw), lr=1e-2, weight_decay=weight_decay))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        theirs = galore_torch.GaLoreAdamW(_groups(ref, kw), lr=1e-2, weight_decay=weight_decay)
    _run(ref, theirs)
    for (n, a), (_, b) in zip(ours.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=f"{n} ({proj_type})")


def test_state_has_the_projected_size_and_orthonormal_projections():
    net = Net()
    opt = GaLoreAdamW(_groups(net, dict(rank=4, update_proj_gap=3, proj_type="std")), lr=1e-2)
    _run(net, opt, steps=2)
    up, down = opt.state[net.mlp_up.weight], opt.state[net.mlp_down.weight]
    # (40, 12): right side, P (4, 12), moments (40, 4); (12, 40): left side, P (12, 4), moments (4, 40)
    assert up["proj"].shape == (4, 12) and up["exp_avg"].shape == (40, 4) and up["exp_avg_sq"].shape == (40, 4)
    assert down["proj"].shape == (12, 4) and down["exp_avg"].shape == (4, 40)
    for st in (up, down):
        assert sum(st[k].numel() for k in ("proj", "exp_avg", "exp_avg_sq")) == 4 * 12 + 2 * 4 * 40 < 2 * 40 * 12
    torch.testing.assert_close(up["proj"] @ up["proj"].T, torch.eye(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(down["proj"].T @ down["proj"], torch.eye(4), atol=1e-5, rtol=0)
    # every state value is a tensor or a number, so a checkpoint writes it as safetensors
    assert all(torch.is_tensor(v) or isinstance(v, (int, float)) for st in opt.state.values() for v in st.values())


@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "full"])
def test_state_storage_is_the_projected_size(proj_type):
    """The bytes the state holds, not only its numel: a factor kept as a view of the SVD's U or Vh would keep
    all of it alive (min(m, n) / rank times the factor)."""
    net = Net()
    opt = GaLoreAdamW(_groups(net, dict(rank=4, update_proj_gap=3, proj_type=proj_type)), lr=1e-2)
    _run(net, opt, steps=2)
    for w in (net.mlp_up.weight, net.mlp_down.weight):
        for k, t in opt.state[w].items():
            if torch.is_tensor(t):
                assert t.untyped_storage().nbytes() == t.numel() * t.element_size(), (k, proj_type)


def test_bad_groups_are_refused():
    net = Net()
    with pytest.raises(ValueError, match="projects matrices only"):
        GaLoreAdamW([{"params": [net.mlp_up.bias], "rank": 2}])
    with pytest.raises(ValueError, match="proj_type must be one of"):
        GaLoreAdamW([{"params": [net.mlp_up.weight], "rank": 2, "proj_type": "diag"}])


def test_model_groups_follow_the_galore_recipe_and_match_galore_torch():
    """galore-torch's recipe (torchrun_main.py): nn.Linear weights of modules named *attn* / *mlp* projected,
    the rest plain; 6 steps of a leantune tiny Llama equal galore-torch's on the same groups."""
    from leantune.data import Batch
    from leantune.train.loss import lm_loss_sum
    from lt_tiny import tiny_lt_model

    model = tiny_lt_model()
    ref = copy.deepcopy(model)
    params = list(model.parameters())
    groups = galore_param_groups(model, params, rank=4, update_proj_gap=2, scale=0.25, proj_type="std")
    projected = {id(p) for p in groups[1]["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in projected}
    assert names == {n for n, _ in model.named_parameters()
                     if n.endswith("proj.weight") and ("self_attn" in n or ".mlp." in n)}
    ref_groups = galore_param_groups(ref, list(ref.parameters()), rank=4, update_proj_gap=2, scale=0.25,
                                     proj_type="std")
    ours = build_optimizer("galore_adamw", groups, lr=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        theirs = galore_torch.GaLoreAdamW(ref_groups, lr=1e-3)
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    batch = Batch(ids, ids.clone(), torch.arange(16).expand(2, -1), None, ids.numel() - 2, ids.numel())
    for m, opt in ((model, ours), (ref, theirs)):
        for _ in range(6):
            loss, n = lm_loss_sum(m, batch)
            (loss / n).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    for (n, a), (_, b) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=n)


# ---------------------------------------------------------------------------------------------
# the recipe


def _argv(folder, data, out, *extra):
    return ["finetune", "--model", str(folder), "--data", str(data), "--output", str(out), "--method", "full",
            "--optimizer", "galore_adamw", "--galore-rank", "4", "--galore-update-proj-gap", "3", "--lr", "1e-2",
            "--batch-size", "2", "--epochs", "2", "--eval-fraction", "0", "--dtype", "fp32", "--no-progress", *extra]


def test_recipe_trains_and_resumes_exactly(folder, data, tmp_path, monkeypatch):
    full = tmp_path / "full"
    assert cli.run(_argv(folder, data, full, "--save-every", "4")) == 0
    losses = [r["loss"] for r in step_records(full)]
    assert len(losses) == 8 and losses[-1] < losses[0]
    out = tmp_path / "out"
    # checkpoint step-4 on disk, with the projections made at steps 0 and 3
    assert run_interrupted(_argv(folder, data, out, "--save-every", "4"), 5, monkeypatch) == 130
    assert cli.run(_argv(folder, data, out, "--save-every", "4", "--resume")) == 0
    assert [r["loss"] for r in step_records(out)] == losses


def test_recipe_refuses_galore_with_an_adapter_method(folder, data, tmp_path):
    argv = [a if a != "full" else "lora" for a in _argv(folder, data, tmp_path / "o")]
    with pytest.raises(ValueError, match="--optimizer galore_adamw .* use it with --method full"):
        cli.run(argv)
    with pytest.raises(ValueError, match="--galore-proj-type must be one of"):
        cli.run(_argv(folder, data, tmp_path / "o", "--galore-proj-type", "diag"))

"""Natural GaLore: `leantune.optim.NaturalGaLoreAdamW` against the oracles of methods-core §6.3 (2: orthonormal
factors and state shapes, 4: Woodbury = dense float64 solve, 5: single-entry closed form, 6: descent direction,
7: transform off = two-sided Tucker GaLore, 8: Tucker factors = tensorly's), a whole trajectory against a
reference written here from tensorly's Tucker and a dense solve, and `--optimizer natural_galore` in the finetune
recipe (trains, loads back in transformers, resumes exactly, bad input stops before any weight is read)."""
from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from leantune import cli
from leantune.optim import GaLoreAdamW, NaturalGaLoreAdamW
from leantune.optim.natural_galore import DAMPING, natural_gradient, tucker_hooi
from test_bad_input import assert_nothing_written, fails
from test_full import data, folder  # noqa: F401 - the same tiny model and data as full finetuning
from test_recipes import run_interrupted, step_records

tl = pytest.importorskip("tensorly", reason="the Tucker oracle: pip install tensorly (requirements-dev.txt)")
from tensorly.decomposition import tucker as tl_tucker  # noqa: E402

tl.set_backend("pytorch")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.mlp_up = nn.Linear(12, 40)  # (40, 12)
        self.mlp_down = nn.Linear(40, 12)  # (12, 40)
        self.norm = nn.LayerNorm(12)

    def forward(self, x):
        return self.norm(self.mlp_down(torch.tanh(self.mlp_up(x))))


def _groups(net, kw):
    mats = [net.mlp_up.weight, net.mlp_down.weight]
    rest = [p for p in net.parameters() if all(p is not m for m in mats)]
    return [{"params": rest}, {"params": mats, **kw}]


def _batches(steps):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 12, generator=g), torch.randn(16, 12, generator=g)) for _ in range(steps)]


def _run(net, opt, steps=10, on_grads=None):
    dtype = next(net.parameters()).dtype
    for x, y in _batches(steps):
        (net(x.to(dtype)) - y.to(dtype)).pow(2).mean().backward()
        if on_grads is not None:
            on_grads()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return net


# ---------------------------------------------------------------------------------------------
# oracle 8: HOOI = tensorly's tucker (same SVD init, same sign convention, same stopping rule)


@pytest.mark.parametrize("shape,ranks", [((40, 12), [4, 4]), ((12, 40), [12, 12]), ((6, 7, 8), [2, 3, 4])])
def test_tucker_factors_equal_tensorly(shape, ranks):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    core, factors = tucker_hooi(x, ranks)
    ref = tl_tucker(x, rank=ranks)
    for ours, theirs in zip(factors, ref.factors):
        torch.testing.assert_close(ours, theirs, atol=1e-10, rtol=0)
    torch.testing.assert_close(core, ref.core, atol=1e-10, rtol=0)


def test_the_optimizer_projects_on_tensorly_factors_of_each_refresh_gradient():
    """In the optimizer: at steps 0 and 3 (gap 3) the factors are tensorly's Tucker factors of that gradient."""
    net = Net()
    opt = NaturalGaLoreAdamW(_groups(net, dict(rank=4, update_proj_gap=3)), lr=1e-2)
    seen = []

    def check():
        w = net.mlp_up.weight
        if len(seen) % 3 == 0:
            seen.append(tl_tucker(w.grad.clone(), rank=[4, 4]).factors)
        else:
            seen.append(None)

    _run(net, opt, steps=4, on_grads=check)
    st = opt.state[net.mlp_up.weight]
    u1, u2 = seen[3]  # the last refresh: step 3
    torch.testing.assert_close(st["proj"], u1, atol=1e-5, rtol=0)
    torch.testing.assert_close(st["proj_right"], u2.T, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# oracles 4, 5, 6: the Woodbury transform


def _dense(g, h, lam=DAMPING):
    """(lambda I + H^T H)^-1 g by a dense float64 solve: the Fisher estimate of methods-core §6.2 written out."""
    g, h = g.double(), h.double()
    return torch.linalg.solve(lam * torch.eye(g.numel(), dtype=torch.float64) + h.T @ h, g)


@pytest.mark.parametrize("k,s", [(256, 20), (64, 7), (16, 20)])  # k < s too: H^T H of rank k, full
def test_woodbury_equals_the_dense_solve(k, s):
    gen = torch.Generator().manual_seed(k + s)
    h = torch.randn(s, k, generator=gen, dtype=torch.float64) * 0.1
    g = h[-1]  # the history holds the current gradient
    out = natural_gradient(g, h)
    ref = _dense(g, h)
    assert float((out - ref).norm() / ref.norm()) < 1e-8
    other = torch.randn(k, generator=gen, dtype=torch.float64)  # and a vector outside the history's span
    ref = _dense(other, h)
    assert float((natural_gradient(other, h) - ref).norm() / ref.norm()) < 1e-8


def test_single_entry_closed_form():
    """g~ = g / (lambda + |g|^2). Woodbury subtracts two terms ~|g|^2 / lambda times larger than their difference,
    so float64 keeps ~16 - log10(|g|^2 / lambda) digits: rel 1e-8 up to |g|^2 ~ 1e3 (here |g|^2 <= 450)."""
    for scale in (1e-3, 0.1, 1.0, 3.0):
        g = torch.randn(50, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * scale
        torch.testing.assert_close(natural_gradient(g, g[None]), g / (DAMPING + g.dot(g)), atol=0, rtol=1e-8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_descent_direction(dtype):
    gen = torch.Generator().manual_seed(5)
    for _ in range(20):
        h = torch.randn(20, 100, generator=gen).to(dtype) * torch.rand(1, generator=gen).to(dtype) * 10
        for g in (h[-1], torch.randn(100, generator=gen).to(dtype)):
            assert float(g @ natural_gradient(g, h)) > 0


# ---------------------------------------------------------------------------------------------
# oracle 7: transform off


def test_transform_off_is_two_sided_galore():
    """natural_history=0: two-sided Tucker GaLore, which for a matrix is GaLore's "full" projection (the same
    singular subspaces; Adam is sign-equivariant, so the factors' signs do not matter while the subspace is
    fixed: gap > steps). In float64: U1^T G U2 is diagonal up to rounding, and Adam scales those rounding-sized
    off-diagonal entries up to eps, which in float32 leaves ~1e-5 between two routes to the same subspace."""
    ours, ref = Net().double(), Net().double()
    _run(ours, NaturalGaLoreAdamW(_groups(ours, dict(rank=4, update_proj_gap=100, scale=0.25,
                                                     natural_history=0)), lr=1e-2, weight_decay=0.1))
    _run(ref, GaLoreAdamW(_groups(ref, dict(rank=4, update_proj_gap=100, scale=0.25, proj_type="full")),
                          lr=1e-2, weight_decay=0.1))
    for (n, a), (_, b) in zip(ours.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0, msg=n)


@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "full"])
def test_one_sided_projection_without_transform_is_galore(proj_type):
    """GaLore's projections offered in Natural GaLore: with the transform off, GaLoreAdamW's trajectory bit for
    bit, refreshes included (gap 3)."""
    kw = dict(rank=4, update_proj_gap=3, scale=0.25, proj_type=proj_type)
    ours, ref = Net(), Net()
    _run(ours, NaturalGaLoreAdamW(_groups(ours, {**kw, "natural_history": 0}), lr=1e-2))
    _run(ref, GaLoreAdamW(_groups(ref, kw), lr=1e-2))
    for (n, a), (_, b) in zip(ours.named_parameters(), ref.named_parameters()):
        assert torch.equal(a, b), n


# ---------------------------------------------------------------------------------------------
# the whole update against a reference written from the spec


def _reference(steps, rank, gap, scale, lr, history, reset, wd=0.0, b1=0.9, b2=0.999, eps=1e-6):
    """methods-core §6.2 for one (40, 12) weight alone: tensorly Tucker factors at each refresh, the Fisher
    solved densely, then GaLore's AdamW; the history kept across refreshes unless `reset`. Float64 throughout:
    U1^T G U2 is nearly diagonal and Adam scales its rounding-sized entries up to eps, so float32 would compare
    rounding."""
    torch.manual_seed(0)
    w = torch.randn(40, 12, dtype=torch.float64) * 0.1
    target = torch.randn(40, 12, dtype=torch.float64)
    hist, m, v, u1, u2 = [], None, None, None, None
    for t in range(steps):
        grad = (w - target) * (1 + t % 3)  # a gradient that changes direction and size
        if t % gap == 0:
            u1, u2 = tl_tucker(grad.clone(), rank=[rank, rank]).factors
            hist = [] if reset else hist
        r = u1.T @ grad @ u2
        hist = (hist + [r.reshape(-1)])[-history:]
        g = _dense(r.reshape(-1), torch.stack(hist)).view_as(r)
        m = (1 - b1) * g if m is None else b1 * m + (1 - b1) * g
        v = (1 - b2) * g * g if v is None else b2 * v + (1 - b2) * g * g
        step_size = lr * math.sqrt(1 - b2 ** (t + 1)) / (1 - b1 ** (t + 1))
        w = w - step_size * scale * (u1 @ (m / (v.sqrt() + eps)) @ u2.T)
        w = w - lr * wd * w
    return w, target


@pytest.mark.parametrize("reset", [False, True])
def test_trajectory_equals_the_reference(reset):
    steps, kw = 8, dict(rank=4, update_proj_gap=3, scale=0.5, natural_history=5, reset_history_on_refresh=reset)
    ref, target = _reference(steps, 4, 3, 0.5, 1e-2, 5, reset, wd=0.1)
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(40, 12, dtype=torch.float64) * 0.1)
    opt = NaturalGaLoreAdamW([{"params": [w], **kw}], lr=1e-2, weight_decay=0.1)
    for t in range(steps):
        w.grad = (w.detach() - target) * (1 + t % 3)
        opt.step()
    torch.testing.assert_close(w.detach(), ref, atol=1e-10, rtol=0)
    rows = opt.state[w]["history"].shape[0]
    assert rows == (2 if reset else 5)  # reset: steps 6 and 7 since the refresh at 6; else the last 5


# ---------------------------------------------------------------------------------------------
# oracle 2: factors and state


def test_state_shapes_and_orthonormal_factors():
    net = Net()
    opt = NaturalGaLoreAdamW(_groups(net, dict(rank=4, update_proj_gap=3, natural_history=6)), lr=1e-2)
    _run(net, opt, steps=8)
    for w, (m, n) in ((net.mlp_up.weight, (40, 12)), (net.mlp_down.weight, (12, 40))):
        st = opt.state[w]
        assert st["proj"].shape == (m, 4) and st["proj_right"].shape == (4, n)
        assert st["exp_avg"].shape == st["exp_avg_sq"].shape == (4, 4)
        assert st["history"].shape == (6, 16)  # the last 6 of 8 projected gradients, r*r each
        # the whole state: factors m*r + r*n, two r x r moments, s x r^2 history, vs Adam's 2*m*n
        numel = sum(st[k].numel() for k in ("proj", "proj_right", "exp_avg", "exp_avg_sq", "history"))
        assert numel == 40 * 4 + 4 * 12 + 2 * 16 + 6 * 16 == 336 < 2 * 40 * 12
        torch.testing.assert_close(st["proj"].T @ st["proj"], torch.eye(4), atol=1e-5, rtol=0)
        torch.testing.assert_close(st["proj_right"] @ st["proj_right"].T, torch.eye(4), atol=1e-5, rtol=0)
    assert all(torch.is_tensor(v) or isinstance(v, (int, float)) for st in opt.state.values() for v in st.values())


def test_one_sided_history_has_the_projected_size():
    net = Net()
    opt = NaturalGaLoreAdamW(_groups(net, dict(rank=4, proj_type="std", natural_history=3)), lr=1e-2)
    _run(net, opt, steps=4)
    assert opt.state[net.mlp_up.weight]["history"].shape == (3, 40 * 4)  # (40, 12): right side, R is (40, 4)
    assert opt.state[net.mlp_down.weight]["history"].shape == (3, 4 * 40)  # (12, 40): left side, R is (4, 40)
    assert "proj_right" not in opt.state[net.mlp_up.weight]


def test_bad_groups_are_refused():
    net = Net()
    with pytest.raises(ValueError, match=r"rank 13 is larger than a side .* use a rank <= 12"):
        NaturalGaLoreAdamW([{"params": [net.mlp_up.weight], "rank": 13}])
    with pytest.raises(ValueError, match="natural_history must be an int >= 0"):
        NaturalGaLoreAdamW([{"params": [net.mlp_up.weight], "rank": 2, "natural_history": -1}])
    with pytest.raises(ValueError, match="proj_type must be one of"):
        NaturalGaLoreAdamW([{"params": [net.mlp_up.weight], "rank": 2, "proj_type": "diag"}])
    with pytest.raises(ValueError, match="projects matrices only"):
        NaturalGaLoreAdamW([{"params": [net.mlp_up.bias], "rank": 2}])


# ---------------------------------------------------------------------------------------------
# the recipe


def _argv(folder, data, out, *extra):
    return ["finetune", "--model", str(folder), "--data", str(data), "--output", str(out), "--method", "full",
            "--optimizer", "natural_galore", "--galore-rank", "4", "--galore-update-proj-gap", "3",
            "--natural-history", "4", "--lr", "1e-2", "--batch-size", "2", "--epochs", "2", "--eval-fraction", "0",
            "--dtype", "fp32", "--no-progress", *extra]


@pytest.fixture(scope="module")
def trained(folder, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ngalore") / "out"
    assert cli.run(_argv(folder, data, out, "--save-every", "4")) == 0
    return out


def test_recipe_trains_and_the_output_loads_in_transformers(folder, trained):
    from transformers import AutoModelForCausalLM

    from leantune.models.loader import load_model
    from leantune.precision import resolve_precision

    losses = [r["loss"] for r in step_records(trained)]
    assert len(losses) == 8 and losses[-1] < losses[0]
    base, tuned = load_file(str(folder / "model.safetensors")), load_file(str(trained / "model.safetensors"))
    changed = {k for k in base if not torch.equal(base[k], tuned[k])}
    assert "model.layers.0.self_attn.q_proj.weight" in changed and "model.layers.1.mlp.down_proj.weight" in changed
    hf = AutoModelForCausalLM.from_pretrained(trained, dtype=torch.float32).eval()
    ours, _ = load_model(str(trained), resolve_precision("fp32", "cpu"))
    ids = torch.tensor([[1, 17, 40, 200, 9, 3]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-4, rtol=0)


def test_recipe_resumes_exactly(folder, data, trained, tmp_path, monkeypatch):
    out = tmp_path / "out"
    # checkpoint step-4 on disk: projections made at steps 0 and 3, a full history of 4, the moments
    assert run_interrupted(_argv(folder, data, out, "--save-every", "4"), 5, monkeypatch) == 130
    opt = load_file(str(out / "checkpoints" / "step-4" / "optimizer.safetensors"))
    assert any(k.endswith(".history") and v.shape == (4, 16) for k, v in opt.items())
    assert cli.run(_argv(folder, data, out, "--save-every", "4", "--resume")) == 0
    assert [r["loss"] for r in step_records(out)] == [r["loss"] for r in step_records(trained)]
    a, b = load_file(str(out / "model.safetensors")), load_file(str(trained / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def no_weights_read(monkeypatch):
    """Reading any weight fails the test: bad input must stop before."""
    import leantune.models.loader as loader

    def refuse(*a, **k):
        raise AssertionError("weights were read")

    monkeypatch.setattr(loader, "load_model", refuse)
    monkeypatch.setattr(loader, "load", refuse)


@pytest.mark.parametrize("optimizer", ["natural_galore", "galore_adamw"])
def test_rank_larger_than_a_weight_stops_before_loading(folder, data, tmp_path, capsys, no_weights_read, optimizer):
    # the tiny model's k_proj / v_proj are (32, 64): rank 33 does not fit them, rank 32 does
    argv = [a if a != "natural_galore" else optimizer for a in _argv(folder, data, tmp_path / "o")]
    i = argv.index("--galore-rank")
    argv[i + 1] = "33"
    err = fails(argv, capsys)
    assert "--galore-rank 33" in err and "self_attn.k_proj.weight (32, 64)" in err and "--galore-rank 32 or less" in err
    assert_nothing_written(tmp_path / "o")


def test_bad_combinations_are_refused(folder, data, tmp_path, capsys):
    cases = [
        (["--method", "lora"], "--optimizer natural_galore projects the gradients of whole weight matrices"),
        (["--galore-proj-type", "diag"], "--galore-proj-type must be one of"),
        (["--natural-history", "-1"], "--natural-history must be >= 0"),
    ]
    for extra, msg in cases:
        argv = _argv(folder, data, tmp_path / "o")
        if extra[0] == "--method":
            argv[argv.index("full")] = "lora"
        else:
            argv += extra
        assert msg in fails(argv, capsys)
        assert_nothing_written(tmp_path / "o")
    galore = [a if a != "natural_galore" else "galore_adamw" for a in _argv(folder, data, tmp_path / "o")]
    assert "--galore-proj-type must be one of" in fails([*galore, "--galore-proj-type", "tucker"], capsys)


def test_yaml_and_python_api(folder, data, tmp_path):
    """The options from a YAML file (flags override it) and from the Python API, where the projection defaults
    to Natural GaLore's own (tucker) and GaLore keeps std."""
    from leantune.recipes import finetune as ft

    f = tmp_path / "c.yaml"
    f.write_text("optimizer: natural_galore\nnatural_history: 7\nnatural_reset_history: true\n"
                 "galore_per_layer: true\nmax_grad_norm: 0\nmethod: full\n")
    argv = ["finetune", "--config", str(f), "--data", "d.jsonl", "--natural-history", "5"]
    cfg = ft.config_from_args(cli.build_parser(argv).parse_args(argv))
    assert (cfg.optimizer, cfg.natural_history, cfg.natural_reset_history, cfg.galore_per_layer) == (
        "natural_galore", 5, True, True)
    assert cfg.galore_proj_type == "tucker"
    assert ft.FinetuneConfig(method="full", optimizer="galore_adamw").galore_proj_type == "std"
    cfg = ft.FinetuneConfig(model=str(folder), data=str(data), output=str(tmp_path / "o"), method="full",
                            optimizer="natural_galore", galore_rank=4, natural_history=3, max_steps=2,
                            batch_size=2, eval_fraction=0.0, dtype="fp32", progress=False, lr=1e-2)
    summary = ft.finetune(cfg)
    assert summary["steps"] == 2 and (tmp_path / "o" / "model.safetensors").exists()

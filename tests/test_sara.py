"""`--method sara` (methods-core.md §7): small-|w| entries train through unstructured backprop; sparse diff out.

Oracles of §7: (1) entries with |p0| >= threshold stay bitwise unchanged (on the saved and re-loaded result);
(2) UB equals a masked-dense AdamW reference written here, step by step (atol 1e-7), through a progressive
reselection of either kind, with the nuclear-norm term on; (3) `.grad` and optimizer state have exactly
M.sum() entries; (4) the lr default formula; (5) the nuclear norm's gradient is U Vᵀ; (6) at call P+1 the
masks follow the fresh / intersect rules and fresh makes no update; (7) zeroing the selected entries
changes the outputs far less than zeroing as many random ones. Then the recipe: loss goes down, the diff
reloads through generate's path with the in-memory model's logits, `merge` writes a folder transformers
loads, `serve` merges it at start-up and refuses to hot-load it, resume equals the uninterrupted run, and
bad input stops with a message naming the option.
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from safetensors.torch import load_file

import leantune
from leantune import cli
from leantune.methods import SaraConfig
from leantune.methods.sara import nuclear_norm, sara_hooks
from leantune.methods.sparse_diff import read_sparse_diff
from leantune.models.loader import load_model
from leantune.optim import build_optimizer
from leantune.precision import resolve_precision
from leantune.recipes import finetune as ft
from leantune.train.loss import lm_loss_sum
from leantune.train.step import StepRule, before_step, change_trainable, optimizer_step, regularizer, train_hooks
from test_recipes import chat_row, run_interrupted, step_records, write_jsonl
from tiny_folder import make_tiny_model_folder

# hidden 80: the 80x80 attention and 160x80 MLP matrices have min(shape) > 64, so the nuclear-norm draw has
# candidates; tied embeddings (as SmolLM2) so one trainable vector serves two modules
SHAPE = dict(family="smollm2-tied", hidden_size=80, intermediate_size=160)
THETA = 2e-3
ARGS = ("--method", "sara", "--batch-size", "2", "--epochs", "2", "--lr", "1e-3", "--eval-fraction", "0",
        "--dtype", "fp32", "--no-progress", "--sara-progressive-iter", "3")  # 4 steps an epoch; reselect at 4


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_model_folder(tmp_path_factory.mktemp("base") / "m", **SHAPE)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    rows = [chat_row(f"What is the code of item {i}?", f"Item {i} has code {i * 7 % 13}.") for i in range(8)]
    return write_jsonl(tmp_path_factory.mktemp("data") / "d.jsonl", rows)


def fp32_model(folder):
    return load_model(str(folder), resolve_precision("fp32", "cpu"))


def batches(folder, data, n: int = 2):
    from leantune.data import batches_for_epoch, load_dataset

    _, tok = fp32_model(folder)
    return batches_for_epoch(load_dataset(str(data), tok, 64), 4, 0, 0)[:n]


# ---------------------------------------------------------------------------------------------
# oracles 4 and 5


def test_default_lr_is_the_official_formula():
    assert ft.FinetuneConfig(method="sara").lr == pytest.approx(4.966e-4, abs=1e-7)
    cfg = ft.FinetuneConfig(method="sara", options=SaraConfig(threshold=1e-3))
    assert cfg.lr == 1e-3 * math.exp(-350 * 1e-3) and cfg.weight_decay == 1e-2
    assert ft.FinetuneConfig(method="sara", lr=0.1, weight_decay=0.0).lr == 0.1  # the user's values win
    assert (ft.FinetuneConfig(method="lora").lr, ft.FinetuneConfig(method="lora").weight_decay) == (2e-4, 0.0)
    args = cli.build_parser(["finetune"]).parse_args(["finetune", "--method", "sara", "--sara-threshold", "0.004",
                                                      "--data", "d.jsonl"])
    assert ft.config_from_args(args).lr == 1e-3 * math.exp(-350 * 0.004)


def test_yaml_and_the_python_api_take_the_options(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("method: sara\nsara_threshold: 0.004\nsara_reselect: intersect\nsara_progressive_iter: 0\n"
                 "data: d.jsonl\n")
    cfg = ft.config_from_args(cli.build_parser(["finetune"]).parse_args(["finetune", "--config", str(f)]))
    assert cfg.options == SaraConfig(threshold=0.004, reselect="intersect", progressive_iter=0)
    assert cfg.lr == 1e-3 * math.exp(-350 * 0.004)
    f.write_text("method: sara\nlr: 0.01\ndata: d.jsonl\n")  # a YAML lr is the user's: it wins
    assert ft.config_from_args(cli.build_parser(["finetune"]).parse_args(["finetune", "--config", str(f)])).lr == 0.01


def test_nuclear_norm_gradient_is_u_vt():
    torch.manual_seed(0)
    w = torch.randn(70, 80, dtype=torch.float64, requires_grad=True)
    nuclear_norm(w).backward()
    u, s, vh = torch.linalg.svd(w.detach(), full_matrices=False)
    torch.testing.assert_close(w.grad, u @ vh, atol=1e-10, rtol=0)
    assert float(nuclear_norm(w.detach())) == pytest.approx(float(s.sum()))
    # the train hook's term on a 70x80 layer: value ||W ⊙ M||_*, gradient on the trained entries (U Vᵀ)[M]
    lin = torch.nn.Linear(80, 70, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(70, 80) * 0.01)
    w0 = lin.weight.detach().clone()
    leantune.apply(lin, "sara", threshold=5e-3, lambda_rank=0.5)
    hooks = train_hooks(lin)
    before_step(lin, hooks, 0, 1)
    reg = regularizer(lin, hooks)
    mask = w0.abs() < 5e-3
    u, s, vh = torch.linalg.svd(w0 * mask, full_matrices=False)
    assert float(reg.detach()) == pytest.approx(0.5 * float(s.sum()), rel=1e-5)
    reg.backward()
    torch.testing.assert_close(sara_hooks(lin).entries[0].sparse.values.grad, 0.5 * (u @ vh)[mask], atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------
# oracles 2, 3 and 6: UB against a masked-dense reference


def run_ub(folder, data, cfg: SaraConfig, steps: int, lr=1e-3, wd=1e-2):
    """SaRA's UB path as the Trainer drives it (train.step's hooks), recording per step the loss, the nuclear
    draw and the dense weights after the step."""
    model, _ = fp32_model(folder)
    leantune.apply(model, "sara", config=cfg)
    hooks, rule, bs = train_hooks(model), StepRule(lr, steps), batches(folder, data)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer("adamw", params, lr=lr, weight_decay=wd)
    trace = []
    for step in range(steps):
        before_step(model, hooks, step, steps)
        loss, n = lm_loss_sum(model, bs[step % len(bs)])
        reg = regularizer(model, hooks)
        (loss / n + (reg if reg is not None else 0.0)).backward()
        if step == 0:  # oracle 3: gradients are the size of the masks
            sara = sara_hooks(model)
            assert all(e.sparse.values.grad.numel() == int(e.sparse.mask.sum()) for e in sara.entries)
            assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
        draw = sara_hooks(model).nuclear
        if change_trainable(model, hooks, step, opt):
            opt.zero_grad(set_to_none=True)
            params = [p for p in model.parameters() if p.requires_grad]
            opt = build_optimizer("adamw", params, lr=lr, weight_decay=wd)
        else:  # as the Trainer: the intersect rule swapped new vectors into the optimizer
            params = [p for p in model.parameters() if p.requires_grad]
            optimizer_step(opt, params, rule, step, model, hooks)
        model(torch.tensor([[1]]))  # writes the trained values into the dense weights
        trace.append((float(loss.detach() / n), draw.name if draw else None, dense_weights(model)))
    return model, opt, trace


def dense_weights(model) -> dict[str, torch.Tensor]:
    sara = sara_hooks(model)
    return {e.name: e.weight.detach().clone() for e in sara.entries}


def run_masked_dense(folder, data, cfg: SaraConfig, steps: int, draws, lr=1e-3, wd=1e-2):
    """The reference: dense AdamW on whole tensors, gradients multiplied by the masks, entries outside the
    current mask put back after each update (adamw2.py's masked update), the same nuclear draws."""
    model, _ = fp32_model(folder)
    named = dict(model.named_parameters())
    masks = {n: p.detach().abs() < cfg.threshold for n, p in named.items()}
    masks = {n: m for n, m in masks.items() if m.any()}
    for n, p in named.items():
        p.requires_grad_(n in masks)
    params, rule, bs = [named[n] for n in masks], StepRule(lr, steps), batches(folder, data)
    opt = build_optimizer("adamw", params, lr=lr, weight_decay=wd)
    trace = []
    for step in range(steps):
        loss, n = lm_loss_sum(model, bs[step % len(bs)])
        total = loss / n
        if draws[step] is not None:
            total = total + cfg.lambda_rank * nuclear_norm(named[draws[step]] * masks[draws[step]])
        total.backward()
        for name, p in zip(masks, params):
            p.grad.mul_(masks[name])
        if cfg.progressive_iter and step == cfg.progressive_iter:
            for name in masks:
                now = named[name].detach().abs() < cfg.threshold
                masks[name] = now if cfg.reselect == "fresh" else masks[name] & now
            if cfg.reselect == "fresh":  # a new optimizer, no update on this call
                opt = build_optimizer("adamw", params, lr=lr, weight_decay=wd)
                opt.zero_grad(set_to_none=True)
                trace.append((float(loss.detach() / n), {k: named[k].detach().clone() for k in masks}))
                continue
            for name, p in zip(masks, params):
                p.grad.mul_(masks[name])
        before = {k: named[k].detach().clone() for k in masks}
        optimizer_step(opt, params, rule, step, model)
        with torch.no_grad():
            for name in masks:
                named[name].copy_(torch.where(masks[name], named[name], before[name]))
        trace.append((float(loss.detach() / n), {k: named[k].detach().clone() for k in masks}))
    return trace, masks


@pytest.mark.parametrize("reselect", ["fresh", "intersect"])
def test_ub_equals_masked_dense_through_a_reselection(folder, data, reselect):
    cfg = SaraConfig(threshold=THETA, lambda_rank=5e-2, progressive_iter=3, reselect=reselect)
    steps = 6
    model, opt, ub = run_ub(folder, data, cfg, steps)
    assert any(d is not None for _, d, _ in ub)  # the nuclear term was on
    ref, ref_masks = run_masked_dense(folder, data, cfg, steps, [d for _, d, _ in ub])
    for step, ((loss_u, _, w_u), (loss_r, w_r)) in enumerate(zip(ub, ref)):
        assert loss_u == pytest.approx(loss_r, abs=1e-6), step
        for k in w_r:
            torch.testing.assert_close(w_u[k], w_r[k], atol=1e-7, rtol=0, msg=f"{k} after step {step}")
    # oracle 6: the masks after call P+1 follow the rule; fresh made no update on that call
    before, at = ub[2][2], ub[3][2]
    entries, base = sara_hooks(model).entries, dict(fp32_model(folder)[0].named_parameters())
    for e in entries:
        assert torch.equal(e.sparse.mask, ref_masks[e.name]), e.name
        expect = before[e.name].abs() < THETA  # fresh: |p_P| < threshold, entries may join
        if reselect == "intersect":
            expect &= base[e.name].detach().abs() < THETA  # intersect: only drops
        assert torch.equal(e.sparse.mask, expect), e.name
    same = all(torch.equal(before[k], at[k]) for k in before)
    assert same == (reselect == "fresh")
    # oracle 3: the optimizer state is the size of the masks (AdamW: two moments per entry)
    n_mask = sum(int(e.sparse.mask.sum()) for e in entries)
    state = [t for st in opt.state.values() for t in st.values() if torch.is_tensor(t) and t.dim() == 1]
    assert sum(t.numel() for t in state) == 2 * n_mask
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == n_mask


def test_selection_values_and_tied_weights(folder):
    base, _ = fp32_model(folder)
    model, _ = fp32_model(folder)
    leantune.apply(model, "sara", threshold=THETA)
    sara = sara_hooks(model)
    sd = base.state_dict()
    names = [e.name for e in sara.entries]
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names  # tied: one vector
    assert model.lm_head.parametrizations.weight[0] is model.model.embed_tokens.parametrizations.weight[0]
    for e in sara.entries:
        assert torch.equal(e.sparse.mask, sd[e.name].abs() < THETA)
        assert torch.equal(e.sparse.values.detach(), sd[e.name][e.sparse.mask])  # signs kept (no abs())
    assert any((e.sparse.values < 0).any() for e in sara.entries)
    ids = torch.tensor([[1, 17, 40, 200, 9, 3]])
    with torch.no_grad():
        assert torch.equal(model(ids), base(ids))  # unchanged at init


def test_zeroing_the_selected_entries_matters_far_less_than_random_ones(folder):
    """Oracle 7 (soft): the small entries SaRA trains are the ones the model needs least."""
    ids = torch.tensor([[1, 17, 40, 200, 9, 3, 77, 5]])
    base, _ = fp32_model(folder)
    with torch.no_grad():
        ref = base(ids)
    changes = {}
    for how in ("selected", "random"):
        model, _ = fp32_model(folder)
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in model.parameters():
                small = p.abs() < THETA
                if how == "random":
                    small = small.reshape(-1)[torch.randperm(small.numel(), generator=gen)].reshape(small.shape)
                p[small] = 0
            changes[how] = float((model(ids) - ref).abs().max())
    assert changes["selected"] < 0.1 * changes["random"], changes


# ---------------------------------------------------------------------------------------------
# the recipe


def _argv(folder, data, out, *extra):
    return ["finetune", "--model", str(folder), "--data", str(data), "--output", str(out), *ARGS, *extra]


@pytest.fixture(scope="module")
def trained(folder, data, tmp_path_factory):
    """The CLI run (fresh reselection at step 4, checkpoints at 5), and the in-memory model it trained."""
    from leantune.train.loop import Trainer

    out = tmp_path_factory.mktemp("sara") / "out"
    seen = []
    real = Trainer.fit

    def fit(self):
        seen.append(self.model)
        return real(self)

    mp = pytest.MonkeyPatch()
    mp.setattr(Trainer, "fit", fit)
    try:
        assert cli.run(_argv(folder, data, out, "--save-every", "5")) == 0
    finally:
        mp.undo()
    return out, seen[0]


def test_cli_trains_and_the_diff_reloads_with_the_same_logits(folder, trained):
    from leantune.recipes.generate import load_with_adapter

    out, model = trained
    losses = [r["loss"] for r in step_records(out)]
    assert len(losses) == 8 and losses[-1] < losses[0]
    diff = read_sparse_diff(out)
    assert diff.method == "sara" and diff.config == dataclasses.asdict(SaraConfig(progressive_iter=3))
    sara = sara_hooks(model)
    assert diff.nnz() == sum(int(e.sparse.origin_idx.numel()) for e in sara.entries)
    loaded, _ = load_with_adapter(str(folder), str(out), resolve_precision("fp32", "cpu"))
    assert not any(getattr(m, "parametrizations", None) for m in loaded.modules())  # plain weights again
    ids = torch.tensor([[1, 17, 40, 200, 9, 3]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids), atol=1e-5, rtol=0)
    # oracle 1 on the re-loaded result: entries with |p0| >= threshold are bitwise the base's
    base = load_file(str(folder / "model.safetensors"))
    tuned = dict(loaded.named_parameters())
    moved = 0
    for k, p0 in base.items():
        if k in tuned:
            frozen = p0.abs() >= THETA
            assert torch.equal(tuned[k].detach()[frozen], p0[frozen]), k
            moved += int((tuned[k].detach() != p0).sum())
    assert moved > 0
    assert cli.run(["generate", "--model", str(folder), "--adapter", str(out), "--prompt", "What is item 3?",
                    "--max-new-tokens", "4", "--dtype", "fp32"]) == 0


def test_merge_writes_a_folder_transformers_loads(folder, trained, tmp_path):
    from transformers import AutoModelForCausalLM

    from leantune.recipes.generate import load_with_adapter

    out, _ = trained
    merged = tmp_path / "merged"
    assert cli.run(["merge", "--model", str(folder), "--adapter", str(out), "--output", str(merged)]) == 0
    hf = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    ours, _ = load_with_adapter(str(folder), str(out), resolve_precision("fp32", "cpu"))
    ids = torch.tensor([[1, 17, 40, 200, 9, 3]])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), atol=1e-5, rtol=0)


def test_serve_merges_the_diff_at_start_up_and_refuses_to_hot_load_it(folder, trained, tmp_path):
    from leantune.recipes.generate import load_with_adapter
    from leantune.recipes.serve import ServeConfig, build_server

    out, _ = trained
    cfg = ServeConfig(model=str(folder), adapter=[f"tuned={out}"], data_dir=str(tmp_path / "d"), dtype="fp32",
                      num_blocks=16)
    _, engine = build_server(cfg)
    assert engine.base_name == "tuned" and engine.adapters == {}
    ours, _ = load_with_adapter(str(folder), str(out), resolve_precision("fp32", "cpu"))
    served = dict(engine.model.named_parameters())
    assert all(torch.equal(served[k], p) for k, p in ours.named_parameters())
    with pytest.raises(ValueError, match="changes the base model's own weights: it cannot be loaded beside"):
        engine.load_adapter("again", str(out), owner=None)
    with pytest.raises(ValueError, match="each changes the base's own weights"):
        build_server(dataclasses.replace(cfg, adapter=[f"a={out}", f"b={out}"]))
    with pytest.raises(ValueError, match="both name the base model"):
        build_server(dataclasses.replace(cfg, served_model_name="x"))


def test_resume_after_interrupt_equals_the_uninterrupted_run(folder, data, tmp_path, monkeypatch, trained):
    out = tmp_path / "out"
    # steps 1..6 done (the fresh reselection at step 4 among them), checkpoint step-5 on disk
    assert run_interrupted(_argv(folder, data, out, "--save-every", "5"), 6, monkeypatch) == 130
    assert (out / "checkpoints" / "step-5" / "sara_state.safetensors").exists()
    assert cli.run(_argv(folder, data, out, "--save-every", "5", "--resume")) == 0
    assert [r["loss"] for r in step_records(out)] == [r["loss"] for r in step_records(trained[0])]
    a, b = load_file(str(out / "sparse_diff.safetensors")), load_file(str(trained[0] / "sparse_diff.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_input_names_the_option(folder, data, tmp_path, trained):
    far = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    with torch.no_grad():
        far[0].weight.fill_(0.5), far[0].bias.fill_(-0.25), far[1].bias.fill_(1.0)  # every |w| >= 0.25
    with pytest.raises(ValueError, match=r"--sara-threshold 0.01 selects no entry of this model \(its smallest "
                                         r"\|w\| is 0.25\); raise --sara-threshold"):
        leantune.apply(far, "sara", threshold=0.01)
    assert all(p.requires_grad for p in far.parameters())  # refused before anything was changed
    for flag, value, msg in [("--sara-threshold", "-1", "--sara-threshold must be a positive number"),
                             ("--sara-reselect", "both", "--sara-reselect must be one of"),
                             ("--sara-lambda-rank", "-0.1", "--sara-lambda-rank must be >= 0")]:
        with pytest.raises(ValueError, match=msg):
            cli.run(["finetune", "--model", str(tmp_path / "no-such-model"), "--data", str(data), "--method", "sara",
                     flag, value])  # refused before the (missing) model is looked at
    with pytest.raises(ValueError, match="--rank is an option of --method .*not of --method sara"):
        cli.run(_argv(folder, data, tmp_path / "o2", "--rank", "4"))
    model, _ = fp32_model(folder)
    with pytest.raises(ValueError, match="loads into the base's own weights, not as a trainable adapter"):
        leantune.load_adapter(model, trained[0], trainable=True)
    with pytest.raises(ValueError, match="--optimizer galore_adamw projects the gradients of the 2-D weights .* "
                                         "none of the .* trainable parameters is one; use it with --method full"):
        cli.run(_argv(folder, data, tmp_path / "o3", "--optimizer", "galore_adamw"))
    assert not (tmp_path / "o3" / "sparse_diff.safetensors").exists()

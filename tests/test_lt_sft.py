"""`--method lt-sft`: lottery-ticket sparse fine-tuning and the composition of sparse diffs (methods-core.md §8).

Checks, on a tiny random Llama: the oracles of §8 (1: nnz(diff) <= K and the mask holds exactly K entries;
2: support(diff) within the mask, and the mask is the top-K |delta| of the full phase; 3: the head in the dense
part, not in the diffs; 4: apply(phi1); apply(phi2) == theta0 + phi1 + phi2, revert allclose to theta0; 5: lr 0 in
the sparse phase gives an all-zero diff), entries outside the mask bitwise unchanged even with weight decay,
the lottery ticket vs a random mask of the same size (oracle 6), the L1 term, the CLI recipe (loss goes down,
the saved diff loads through generate's path with the in-memory model's logits, a task diff trained on a
language diff, `merge --adapter lang --adapter task` equal to theta0 + phi_lang + phi_task and loaded by
transformers, `export` of both), several LoRA adapters merged, resume after an interrupt in either phase, and
bad input stopped before any weight is read.
"""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

import leantune
from leantune import cli
from leantune.methods.lt_sft import LtSftConfig, lt_sft_diff, lt_sft_state
from leantune.methods.sparse_diff import read_sparse_diff
from leantune.models.loader import load_model, meta_model
from leantune.precision import resolve_precision
from leantune.train.loop import TrainConfig
from leantune.train.phases import PhaseRunner
from test_recipes import chat_row, read_metrics, run_interrupted, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")

FP32 = resolve_precision("fp32", "cpu")
ARGS = ("--method", "lt-sft", "--batch-size", "2", "--lr", "1e-2", "--eval-fraction", "0", "--dtype", "fp32",
        "--no-progress", "--full-ft-steps", "4", "--sparse-ft-steps", "8", "--ft-params-num", "3000")
IDS = torch.tensor([[1, 17, 40, 200, 9, 3, 77, 5]])


def _rows(kind: str, n: int = 8) -> list[dict]:
    if kind == "lang":
        return [chat_row(f"What is the code of item {i}?", f"Item {i} has code {i * 7 % 13}.") for i in range(n)]
    return [chat_row(f"Who discovered comet {i}?", f"Comet {i} was discovered by Ilsa Morrow.") for i in range(n)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    return {k: write_jsonl(d / f"{k}.jsonl", _rows(k)) for k in ("lang", "task")}


def _argv(folder, data, out, *extra):
    return ["finetune", "--model", str(folder), "--data", str(data), "--output", str(out), *ARGS, *extra]


def _losses(out, phase: str) -> list[float]:
    return [r["loss"] for r in read_metrics(out / "phases" / phase) if "loss" in r]


def _params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def lang(folder, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("lang") / "out"
    assert cli.run(_argv(folder, data["lang"], out, "--save-every", "5")) == 0
    return out


@pytest.fixture(scope="module")
def task(folder, data, lang, tmp_path_factory):
    out = tmp_path_factory.mktemp("task") / "out"
    assert cli.run(_argv(folder, data["task"], out, "--lt-sft-base-diffs", str(lang), "--seed", "1")) == 0
    return out


def _api_run(folder, data, out, config: LtSftConfig, runner_cls=PhaseRunner, **train):
    """The Python API: load, apply, run the phases; (model, theta0, runner)."""
    from leantune.data import load_dataset

    model, tok = load_model(str(folder), FP32)
    theta0 = _params(model)
    leantune.apply(model, "lt-sft", config=config)
    examples = load_dataset(str(data), tok, 512)
    cfg = TrainConfig(**{"batch_size": 2, "lr": 1e-2, "progress": False, "report_to": "none", **train})
    runner = runner_cls(model, examples, [], cfg, out, log=lambda _m: None)
    leantune.methods.get_method("lt-sft").fit(model, config, runner)
    return model, theta0, runner


# ---------------------------------------------------------------------------------------------
# oracles


def test_mask_is_the_top_k_of_the_full_phase_and_the_diff_lies_in_it(folder, data, tmp_path):
    k = 2000
    model, theta0, _ = _api_run(folder, data["lang"], tmp_path / "o", LtSftConfig(ft_params_num=k, full_ft_steps=3,
                                sparse_ft_steps=4), weight_decay=0.1)  # decay would move frozen entries
    state = lt_sft_state(model)
    assert state.dense == ["lm_head.weight"] and "lm_head.weight" not in state.maskable
    # oracle 2: the mask is the top-K |theta_full - theta0| over the maskable entries (no ties among them here)
    full = load_file(str(next((tmp_path / "o" / "phases" / "full-1" / "checkpoints").glob("step-3")) /
                         "trainable.safetensors"))
    delta = torch.cat([(full[n] - theta0[n]).abs().reshape(-1) for n in state.maskable])
    kth = delta.topk(k + 1).values
    assert kth[k - 1] > kth[k]  # the oracle's premise: no tie at the threshold
    top = torch.zeros_like(delta, dtype=torch.bool)
    top[delta.topk(k).indices] = True
    assert torch.equal(torch.cat([state.mask[n].reshape(-1) for n in state.maskable]), top)
    assert state.selected() == k  # oracle 1: exactly K when |delta| has no ties
    # entries outside the mask are bitwise theta0 after the sparse phase (weight decay included)
    now = _params(model)
    for n in state.maskable:
        assert torch.equal(now[n][~state.mask[n]], theta0[n][~state.mask[n]]), n
    assert not torch.equal(now["lm_head.weight"], theta0["lm_head.weight"])  # the head trained densely
    diff = lt_sft_diff(model)
    assert 0 < diff.nnz() <= k  # oracle 1
    for n, (idx, val) in diff.diffs.items():  # oracle 2: support within the mask; values theta - theta0
        assert state.mask[n].reshape(-1)[idx].all(), n
        assert torch.equal(val, (now[n] - theta0[n]).reshape(-1)[idx])
        assert (val.abs() > 1e-7).all()
    assert "lm_head.weight" not in diff.diffs and torch.equal(diff.dense["lm_head.weight"], now["lm_head.weight"])


def test_lr_zero_in_the_sparse_phase_gives_an_empty_diff(folder, data, tmp_path):
    class ZeroLrSparse(PhaseRunner):  # oracle 5: TrainConfig refuses lr 0 from a user, so set it past the check
        def phase_config(self, steps=0, epochs=0):
            cfg = super().phase_config(steps, epochs)
            if self.results:  # the sparse phase comes after the full one
                cfg = dataclasses.replace(cfg)
                cfg.lr = 0.0
            return cfg

    model, theta0, runner = _api_run(folder, data["lang"], tmp_path / "o", LtSftConfig(
        ft_params_num=500, full_ft_steps=2, sparse_ft_steps=3), runner_cls=ZeroLrSparse)
    assert [r["phase"] for r in runner.results] == ["full-1", "sparse-1"]
    diff = lt_sft_diff(model)
    assert diff.nnz() == 0 and not diff.diffs
    assert torch.equal(diff.dense["lm_head.weight"], theta0["lm_head.weight"])  # reset, then lr 0
    assert all(torch.equal(p, theta0[n]) for n, p in _params(model).items())


def test_iterations_select_k_over_n_each(folder, data, tmp_path):
    model, _, runner = _api_run(folder, data["lang"], tmp_path / "o", LtSftConfig(
        ft_params_num=1000, n_ft_iterations=2, full_ft_steps=2, sparse_ft_steps=2))
    assert [r["phase"] for r in runner.results] == ["full-1", "sparse-1", "full-2", "sparse-2"]
    # K/n = 500 per iteration, and every entry tied at the threshold joins (Adam's first steps move many
    # entries by the same amount, so a few ties are expected)
    assert 1000 <= lt_sft_state(model).selected() < 1050


def test_the_lottery_ticket_beats_a_random_mask_of_the_same_size(folder, data, tmp_path, monkeypatch):
    """Oracle 6 (soft, deterministic here): with K = 5% of the entries (head included), the sparse phase
    recovers most of the full phase's loss drop, far more than a random mask of the same size does."""
    from leantune.data import load_dataset
    from leantune.methods.lt_sft import LtSftState
    from leantune.train.loss import heldout_loss

    def random_select(self, model, k):
        flat = torch.zeros(sum(m.numel() for m in self.mask.values()), dtype=torch.bool)
        flat[torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(0))[:k]] = True
        for m, part in zip(self.mask.values(), flat.split([m.numel() for m in self.mask.values()])):
            m |= part.view_as(m)
        return k

    def drops(tag: str) -> tuple[float, float]:
        model, tok = load_model(str(folder), FP32)
        examples = load_dataset(str(data["lang"]), tok, 512)
        before, after_full = heldout_loss(model, examples, 4, 512), []
        config = LtSftConfig(ft_params_proportion=0.05, full_ft_steps=10, sparse_ft_steps=30, dense="none")
        leantune.apply(model, "lt-sft", config=config)

        class Probe(PhaseRunner):  # the loss right after the full phase, before the reset
            def run(self, name, **kw):
                result = super().run(name, **kw)
                if name.startswith("full"):
                    after_full.append(heldout_loss(model, examples, 4, 512))
                return result

        runner = Probe(model, examples, [], TrainConfig(batch_size=2, lr=1e-2, progress=False, report_to="none"),
                       tmp_path / tag, log=lambda _m: None)
        leantune.methods.get_method("lt-sft").fit(model, config, runner)
        return before - after_full[0], before - heldout_loss(model, examples, 4, 512)

    full, lottery = drops("lottery")
    monkeypatch.setattr(LtSftState, "select", random_select)
    _, random = drops("random")
    assert lottery >= 0.8 * full and lottery >= 1.5 * random, (full, lottery, random)


# ---------------------------------------------------------------------------------------------
# the recipe, composition


def test_recipe_loss_goes_down_and_the_diff_reloads_with_the_same_logits(folder, lang):
    from leantune.recipes.generate import load_with_adapter

    full, sparse = _losses(lang, "full-1"), _losses(lang, "sparse-1")
    assert len(full) == 4 and len(sparse) == 8
    assert sparse[0] == pytest.approx(full[0], rel=1e-6)  # the sparse phase starts again from the base
    assert sparse[-1] < sparse[0]
    summary = json.loads((lang / "summary.json").read_text())
    assert [p["phase"] for p in summary["phases"]] == ["full-1", "sparse-1"]
    diff = read_sparse_diff(lang)
    assert diff.method == "lt-sft" and 0 < diff.nnz() <= 3000 and list(diff.dense) == ["lm_head.weight"]
    # the in-memory model at the end: the base with the final checkpoint's trained weights
    ours, _ = load_model(str(folder), FP32)
    final = load_file(str(lang / "phases" / "sparse-1" / "checkpoints" / "step-8" / "trainable.safetensors"))
    with torch.no_grad():
        for n, p in ours.named_parameters():
            p.copy_(final[n])
    loaded, _ = load_with_adapter(str(folder), [str(lang)], FP32)  # generate's and chat's loading path
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS), ours(IDS), atol=1e-6, rtol=0)
    assert cli.run(["generate", "--model", str(folder), "--adapter", str(lang), "--prompt", "What is item 3?",
                    "--max-new-tokens", "4", "--dtype", "fp32"]) == 0


def test_apply_and_revert_compose(folder, lang, task):
    base, _ = load_model(str(folder), FP32)
    theta0 = _params(base)
    phi = [read_sparse_diff(lang), read_sparse_diff(task)]
    expect = {n: t.clone() for n, t in theta0.items()}  # theta0 + phi1 + phi2 (oracle 4), the task's head
    for d in phi:
        for n, (idx, val) in d.diffs.items():
            expect[n].view(-1).index_add_(0, idx, val)
    expect["lm_head.weight"] = phi[1].dense["lm_head.weight"]
    leantune.apply_diff(base, lang)
    leantune.apply_diff(base, task)
    now = _params(base)
    assert all(torch.equal(now[n], expect[n]) for n in expect)
    leantune.revert_diff(base, task)
    leantune.revert_diff(base, lang)
    back = _params(base)
    for n in theta0:
        if n != "lm_head.weight":  # revert leaves dense parameters as they are
            torch.testing.assert_close(back[n], theta0[n], atol=1e-6, rtol=0)


def test_task_on_language_diff_and_merge_of_both(folder, lang, task, tmp_path):
    from transformers import AutoModelForCausalLM

    assert read_sparse_diff(task).config["base_diffs"] == str(lang)
    assert _losses(task, "sparse-1")[-1] < _losses(task, "sparse-1")[0]
    merged = tmp_path / "merged"
    assert cli.run(["merge", "--model", str(folder), "--adapter", str(lang), "--adapter", str(task),
                    "--output", str(merged)]) == 0
    base = load_file(str(folder / "model.safetensors"))
    out = load_file(str(merged / "model.safetensors"))
    expect = {n: t.clone() for n, t in base.items()}
    for d in (read_sparse_diff(lang), read_sparse_diff(task)):
        for n, (idx, val) in d.diffs.items():
            expect[n].view(-1).index_add_(0, idx, val)
    expect["lm_head.weight"] = read_sparse_diff(task).dense["lm_head.weight"]  # the last adapter's head
    assert set(out) == set(expect) and all(torch.equal(out[n], expect[n]) for n in out)
    hf = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    ours, _ = load_model(str(folder), FP32)
    leantune.apply_diff(ours, lang)
    leantune.apply_diff(ours, task)
    with torch.no_grad():
        torch.testing.assert_close(hf(IDS).logits, ours(IDS), atol=1e-4, rtol=0)
    # chat takes the same several --adapter (composed as the merge composes them)
    import io

    from leantune.recipes.generate import GenerateConfig, chat

    chat(GenerateConfig(model=str(folder), adapter=[str(lang), str(task)], max_new_tokens=3, dtype="fp32"),
         stdin=io.StringIO("Who discovered comet 2?\n/exit\n"))


# ---------------------------------------------------------------------------------------------
# resume


@pytest.mark.parametrize("done", [6, 3], ids=["cut-in-sparse-phase", "cut-in-full-phase"])
def test_resume_across_the_phase_boundary_equals_the_uninterrupted_run(folder, data, lang, tmp_path, monkeypatch,
                                                                       done):
    out = tmp_path / "out"
    argv = _argv(folder, data["lang"], out, "--save-every", "5" if done == 6 else "2")
    assert run_interrupted(argv, done, monkeypatch) == 130
    assert not (out / "sparse_diff_config.json").exists()  # nothing looks finished
    cut = "sparse-1" if done == 6 else "full-1"
    state = json.loads(next((out / "phases" / cut / "checkpoints").glob("step-*/trainer_state.json")).read_text())
    assert state["phase"] == cut
    assert cli.run([*argv, "--resume"]) == 0
    for phase in ("full-1", "sparse-1"):
        assert _losses(out, phase) == _losses(lang, phase), phase
    a, b = load_file(str(out / "sparse_diff.safetensors")), load_file(str(lang / "sparse_diff.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------
# bad input


def _fails(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        cli.main([str(a) for a in argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if "error:" in ln]
    assert "Traceback" not in err and len(errors) == 1, err
    return errors[0]


def test_k_larger_than_the_model_stops_before_any_weight_is_read(folder, data, tmp_path, capsys, monkeypatch):
    import leantune.models.loader as loader

    n = sum(p.numel() for n_, p in meta_model(str(folder)).named_parameters() if n_ != "lm_head.weight")

    def no_weights(*a, **k):
        raise AssertionError("weights were read")

    monkeypatch.setattr(loader, "load_model", no_weights)
    out = tmp_path / "out"
    base = ["finetune", "--model", folder, "--data", data["lang"], "--output", out, "--method", "lt-sft",
            "--no-progress", "--dtype", "fp32"]
    err = _fails([*base, "--ft-params-num", n + 1], capsys)
    assert "--ft-params-num" in err and f"{n:,} maskable entries" in err
    err = _fails([*base, "--ft-params-proportion", "1e-9"], capsys)
    assert "--ft-params-proportion" in err
    err = _fails([*base, "--lt-sft-dense", "nope"], capsys)
    assert "--lt-sft-dense" in err
    err = _fails([*base, "--lt-sft-base-diffs", tmp_path], capsys)
    assert "--lt-sft-base-diffs" in err
    err = _fails([*base, "--reinit-top", "1"], capsys)
    assert "--reinit-top" in err and "phases" in err
    assert not out.exists() or not any(out.iterdir())
    # the Python API checks the same on the real model
    model, _ = loader.load(str(folder))
    with pytest.raises(ValueError, match="--ft-params-num"):
        leantune.apply(model, "lt-sft", ft_params_num=n + 1)
    # a dense module set to none makes the head maskable too
    assert lt_sft_state(leantune.apply(model, "lt-sft", dense="none")).dense == []


def test_several_lora_adapters_merge_and_generate_together(folder, tmp_path):
    """--adapter repeats for LoRA adapters too: merged, W + s B1 A1 + s B2 A2; generate's path runs both."""
    from leantune.recipes.generate import load_with_adapter

    deltas = []
    for i, name in enumerate(("a", "b")):
        model, _ = load_model(str(folder), FP32)
        leantune.apply(model, "lora", adapter_name=name, r=4, alpha=8, targets=["q_proj"])
        torch.manual_seed(i)
        layer = model.model.layers[0].self_attn.q_proj
        with torch.no_grad():
            for m in model.modules():
                if hasattr(m, "lora_B") and name in m.lora_B:
                    m.lora_B[name].weight.normal_(0, 0.1)
        deltas.append(2.0 * layer.lora_B[name].weight.detach() @ layer.lora_A[name].weight.detach())
        leantune.save_adapter(model, tmp_path / name, adapter_name=name)
    merged = tmp_path / "merged"
    assert cli.run(["merge", "--model", str(folder), "--adapter", str(tmp_path / "a"), "--adapter",
                    str(tmp_path / "b"), "--output", str(merged)]) == 0
    key = "model.layers.0.self_attn.q_proj.weight"
    base, out = load_file(str(folder / "model.safetensors")), load_file(str(merged / "model.safetensors"))
    torch.testing.assert_close(out[key], base[key] + deltas[0] + deltas[1], atol=1e-6, rtol=0)
    both, _ = load_with_adapter(str(folder), [str(tmp_path / "a"), str(tmp_path / "b")], FP32)
    plain, _ = load_model(str(merged), FP32)
    with torch.no_grad():
        torch.testing.assert_close(both(IDS), plain(IDS), atol=1e-5, rtol=0)


def test_l1_towards_theta0_and_yaml_options(folder, tmp_path):
    """The optional L1 term: lambda * sum|theta - theta0| / all parameters, lambda of the phase; the options
    come from YAML keys as from flags."""
    model, _ = load_model(str(folder), FP32)
    leantune.apply(model, "lt-sft", config=LtSftConfig(full_l1_reg=0.5, sparse_l1_reg=2.0))
    state = lt_sft_state(model)
    n_all = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        model.lm_head.weight[0, :3] += torch.tensor([0.1, -0.2, 0.3])
        model.model.layers[0].mlp.up_proj.weight[1, 1] -= 0.4
    dist = torch.tensor(1.0)  # 0.1 + 0.2 + 0.3 + 0.4
    torch.testing.assert_close(state.regularizer(model), 0.5 * dist / n_all, atol=1e-9, rtol=1e-4)
    state.masking = True
    reg = state.regularizer(model)
    torch.testing.assert_close(reg, 2.0 * dist / n_all, atol=1e-9, rtol=1e-4)
    reg.backward()  # it pulls the moved entries back towards theta0
    assert model.lm_head.weight.grad[0, 0] > 0 and model.model.layers[0].mlp.up_proj.weight.grad[1, 1] < 0
    assert lt_sft_state(leantune.apply(load_model(str(folder), FP32)[0], "lt-sft")).regularizer(model) is None

    from leantune.recipes.finetune import config_from_args

    yaml = tmp_path / "run.yaml"
    yaml.write_text("method: lt-sft\nft_params_num: 123\nsparse_ft_steps: 7\nlt_sft_dense: none\ndata: d.jsonl\n")
    args = cli.build_parser(["finetune"]).parse_args(["finetune", "--config", str(yaml), "--n-ft-iterations", "3"])
    o = config_from_args(args).options
    assert (o.ft_params_num, o.sparse_ft_steps, o.dense, o.n_ft_iterations) == (123, 7, "", 3)


def test_export_writes_the_model_with_the_diffs_added(folder, lang, task, tmp_path):
    gguf = tmp_path / "m.gguf"
    assert cli.run(["export", "--model", str(folder), "--adapter", str(lang), "--adapter", str(task),
                    "--output", str(gguf), "--quant", "f16"]) == 0
    exported, _ = load_model(str(gguf), FP32)
    ours, _ = load_model(str(folder), FP32)
    leantune.apply_diff(ours, lang)
    leantune.apply_diff(ours, task)
    with torch.no_grad():
        # f16 tensors: within 5e-3, where the diffs move these logits by about 2
        torch.testing.assert_close(exported(IDS), ours(IDS), atol=5e-3, rtol=0)


def test_resume_in_the_second_iteration_replays_the_first(folder, data, tmp_path, monkeypatch):
    """Cut in iteration 2's full phase: the resumed run replays iteration 1 (its weights, mask, reset) and then
    computes the same losses and diff as an uninterrupted run."""
    from leantune.train.loop import Trainer

    extra = ("--n-ft-iterations", "2", "--full-ft-steps", "3", "--sparse-ft-steps", "3", "--save-every", "2")
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert cli.run(_argv(folder, data["lang"], whole, *extra)) == 0
    real = Trainer.train_step

    def interrupt(self, window):
        if self.phase == "full-2" and self.step == 2:
            raise KeyboardInterrupt
        return real(self, window)

    with monkeypatch.context() as m:
        m.setattr(Trainer, "train_step", interrupt)
        with pytest.raises(KeyboardInterrupt):
            cli.run(_argv(folder, data["lang"], cut, *extra))
    assert cli.run([*_argv(folder, data["lang"], cut, *extra), "--resume"]) == 0
    for phase in ("full-1", "sparse-1", "full-2", "sparse-2"):
        assert _losses(cut, phase) == _losses(whole, phase), phase
    a, b = load_file(str(cut / "sparse_diff.safetensors")), load_file(str(whole / "sparse_diff.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

"""DPO (`--objective dpo`, train/dpo.py): the loss types and logged metrics against TRL's `DPOTrainer` on the
same log-probs, the oracles of methods-more.md §9 ((a) log 2 at init and the gradient's direction, (b) the
bandit's closed-form optimum), the reference policy (adapters off / precomputed / the SFT'd model), the
recipe through the CLI with lora, full and qlora, and bad input."""
from __future__ import annotations

import json
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from leantune import cli
from leantune.train.dpo import (DPOObjective, build_dpo, dpo_loss, pair_batch, precompute_reference,
                                sequence_logps)
from leantune.train.loop import TrainConfig
from test_bad_input import assert_nothing_written, fails
from test_recipes import assert_peft_parity, chat_row, load, read_metrics, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")

LOG2 = math.log(2)
ARGS = ("--objective", "dpo", "--batch-size", "4", "--lr", "5e-3", "--eval-fraction", "0", "--dtype", "fp32",
        "--no-progress")


def _pairs(n: int = 8) -> list[dict]:
    return [{"prompt": f"Which fruit is item {i}?", "chosen": f"Item {i} is an apple.",
             "rejected": f"Item {i} is a stone."} for i in range(n)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("dpo_data")
    return {"pairs": write_jsonl(d / "pairs.jsonl", _pairs()),
            "sft": write_jsonl(d / "sft.jsonl", [chat_row(f"Which fruit is item {i}?", f"Item {i} is a pear.")
                                                 for i in range(8)])}


def _run(folder, data, out, *extra):
    assert cli.run(["finetune", "--model", str(folder), "--data", str(data), "--output", str(out), *ARGS,
                    *extra]) == 0
    return [r for r in read_metrics(out) if "loss" in r]


def _model_and_pairs(folder, data, method: str | None = "lora"):
    from leantune import methods
    from leantune.data import load_preference_dataset
    from leantune.models.loader import load_model
    from leantune.precision import resolve_precision

    model, tok = load_model(str(folder), resolve_precision("fp32", "cpu"))
    pairs = load_preference_dataset(data, tok, 128)
    return (methods.apply(model, method) if method else model), pairs


# ---- the loss against TRL ---------------------------------------------------------------------------------
def _trl_loss(loss_type: str, beta: float, logps: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor):
    """TRL's `DPOTrainer._compute_loss` on given per-token log-probs (2B, T-1) and precomputed reference
    log-probs (2B,): a stand-in trainer and model that hand it exactly those numbers. (loss, logged metrics)."""
    trl = pytest.importorskip("trl")
    b = logps.shape[0] // 2
    ident = lambda x: x  # noqa: E731  (one process: gathers are the identity)
    fake = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=SimpleNamespace(device="cpu", gather=ident,
                                                                          gather_for_metrics=ident),
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
        loss_types=[loss_type], loss_weights=[1.0], beta=beta, label_smoothing=0.0, use_weighting=False,
        _metrics={"train": defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
    zeros = torch.zeros_like(logps)
    outputs = SimpleNamespace(log_probs=logps, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())
    inputs = {"input_ids": torch.ones_like(mask), "attention_mask": torch.ones_like(mask), "completion_mask": mask,
              "ref_chosen_logps": ref[:b], "ref_rejected_logps": ref[b:]}
    loss = trl.DPOTrainer._compute_loss(fake, lambda **kw: outputs, inputs, False)
    return float(loss), {k: v[-1] for k, v in fake._metrics["train"].items()}


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_loss_and_metrics_equal_trls_on_the_same_log_probs(loss_type):
    g = torch.Generator().manual_seed(0)
    b, t, beta = 3, 9, 0.3
    mask = torch.zeros(2 * b, t, dtype=torch.long)
    for r, start in enumerate([2, 3, 4, 2, 5, 6]):  # answers of different lengths after prompts
        mask[r, start:] = 1
    per_token = -torch.rand(2 * b, t - 1, generator=g) * 3 * mask[:, 1:]  # TRL's log-probs: 0 off the answer
    ref = per_token.sum(1) + torch.randn(2 * b, generator=g)
    want, trl_metrics = _trl_loss(loss_type, beta, per_token, ref, mask)

    logps, n = per_token.sum(1), mask.sum(1)
    losses, rc, rr = dpo_loss(logps[:b], logps[b:], ref[:b], ref[b:], beta, loss_type, n[:b], n[b:])
    assert float(losses.mean()) == pytest.approx(want, rel=1e-6, abs=1e-7)
    ours = {"rewards/chosen": rc.mean(), "rewards/rejected": rr.mean(), "rewards/margins": (rc - rr).mean(),
            "rewards/accuracies": (rc > rr).float().mean(), "logps/chosen": logps[:b].mean(),
            "logps/rejected": logps[b:].mean()}
    for k, v in ours.items():
        assert float(v) == pytest.approx(trl_metrics[k], rel=1e-6, abs=1e-7), k


def test_the_objective_logs_per_pair_means_of_its_terms(folder, data):
    from leantune.methods.base import adapter_layers
    from leantune.train.dpo import adapters_off_logps

    model, pairs = _model_and_pairs(folder, data["pairs"])
    obj = DPOObjective(beta=0.5)
    batch = pair_batch(pairs[:3])
    with torch.no_grad():
        for _, layer in adapter_layers(model):  # move the policy off the reference
            for p in layer.lora_B.parameters():
                p.normal_(0, 0.05)
        loss, n, m = obj.loss_sum(model, batch)
        logps = sequence_logps(model, batch.batch)
        ref = adapters_off_logps(model, batch.batch)
    rc, rr = 0.5 * (logps[:3] - ref[:3]), 0.5 * (logps[3:] - ref[3:])
    assert n == 3 and float(loss) == pytest.approx(float(-torch.nn.functional.logsigmoid(rc - rr).sum()), rel=1e-5)
    assert m["rewards/margins"] == pytest.approx(float((rc - rr).sum()), rel=1e-5, abs=1e-6)
    assert m["rewards/accuracies"] == float((rc > rr).sum())
    assert float(rc.abs().sum()) > 0  # the adapter moved the policy, so the check above is not 0 == 0


# ---- §9 oracle (a): log 2 at init, the gradient raises y_w and lowers y_l -----------------------------------
@pytest.mark.parametrize("method, reference", [("lora", "adapters_off"), ("full", "precomputed")])
def test_at_init_the_loss_is_log2_and_a_step_raises_chosen_lowers_rejected(folder, data, method, reference):
    from leantune.methods.registry import get_method

    model, pairs = _model_and_pairs(folder, data["pairs"], method)
    cfg = TrainConfig(objective="dpo", batch_size=4)
    obj = build_dpo(model, cfg, pairs, [], get_method(method).trains_base, log=lambda m: None)
    assert obj.reference == reference
    batch = obj.batches(pairs, 0, cfg)[0]
    model.train()
    losses, rc, rr, before = obj.terms(model, batch)
    assert torch.allclose(losses, torch.full_like(losses, LOG2), rtol=0, atol=1e-6)
    assert float(rc.abs().max()) < 1e-5 and float(rr.abs().max()) < 1e-5
    losses.mean().backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 1e-2 * p.grad
        after = sequence_logps(model, batch.batch)
    b = batch.pairs
    assert bool((after[:b] > before[:b]).all()) and bool((after[b:] < before[b:]).all())


def test_tabular_gradient_raises_chosen_and_lowers_rejected():
    """(a) where it holds exactly: a softmax policy over K responses, any pair, any reference."""
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        theta = torch.randn(6, generator=g).requires_grad_()
        ref = torch.log_softmax(torch.randn(6, generator=g), 0)
        w, l = torch.randperm(6, generator=g)[:2].tolist()
        logp = torch.log_softmax(theta, 0)
        dpo_loss(logp[w:w + 1], logp[l:l + 1], ref[w:w + 1], ref[l:l + 1], 0.1)[0].sum().backward()
        with torch.no_grad():
            new = torch.log_softmax(theta - 0.1 * theta.grad, 0)
        assert new[w] > logp[w] and new[l] < logp[l]


# ---- §9 oracle (b): the bandit converges to pi_ref * exp(r / beta) ---------------------------------------
def test_bandit_converges_to_the_closed_form_optimum():
    g = torch.Generator().manual_seed(0)
    k, beta = 5, 0.5
    r = torch.randn(k, generator=g)
    ref = torch.log_softmax(torch.randn(k, generator=g), 0)
    # every ordered pair (i preferred over j), weighted by its Bradley-Terry probability sigma(r_i - r_j)
    i, j = zip(*[(a, c) for a in range(k) for c in range(k) if a != c])
    i, j = torch.tensor(i), torch.tensor(j)
    weight = torch.sigmoid(r[i] - r[j])
    theta = ref.clone().requires_grad_()
    opt = torch.optim.Adam([theta], lr=0.05)
    for _ in range(3000):
        logp = torch.log_softmax(theta, 0)
        loss = (weight * dpo_loss(logp[i], logp[j], ref[i], ref[j], beta)[0]).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    target = torch.softmax(ref + r / beta, 0)
    tv = 0.5 * float((torch.softmax(theta.detach(), 0) - target).abs().sum())
    start = 0.5 * float((ref.exp() - target).abs().sum())
    assert tv < 0.02 and start > 0.1  # it moved far, to the optimum


# ---- the reference policy ------------------------------------------------------------------------------------
def test_a_lora_adapter_that_is_not_the_identity_gets_a_precomputed_reference(folder, data):
    """Adapters off is the reference only where it is the starting policy; otherwise the start is snapshotted."""
    from leantune.methods.base import adapter_layers

    model, pairs = _model_and_pairs(folder, data["pairs"])
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            for p in layer.lora_B.parameters():
                p.normal_(0, 0.05)
    cfg = TrainConfig(objective="dpo", batch_size=4)
    obj = build_dpo(model, cfg, pairs, [], False, log=lambda m: None)
    assert obj.reference == "precomputed"
    losses = obj.terms(model.eval(), obj.batches(pairs, 0, cfg)[0])[0]
    assert torch.allclose(losses, torch.full_like(losses, LOG2), rtol=0, atol=1e-6)


def test_precomputed_reference_is_the_model_at_that_time(folder, data):
    model, pairs = _model_and_pairs(folder, data["pairs"], "full")
    precompute_reference(model, pairs, 3)
    with torch.no_grad():
        want = sequence_logps(model.eval(), pair_batch(pairs).batch)
    got = torch.tensor([p.ref_logps[0] for p in pairs] + [p.ref_logps[1] for p in pairs])
    assert torch.allclose(got, want, atol=1e-5) and float(got.max()) < 0


# ---- the recipe through the CLI ------------------------------------------------------------------------------
KEYS = {"loss", "pairs", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
        "logps/chosen", "logps/rejected"}


def test_recipe_lora_learns_the_preference_and_the_adapter_reloads(folder, data, tmp_path):
    from leantune import methods

    out = tmp_path / "lora"
    recs = _run(folder, data["pairs"], out, "--method", "lora", "--epochs", "4")
    assert len(recs) == 8 and KEYS <= set(recs[0])
    assert recs[0]["loss"] == pytest.approx(LOG2, abs=1e-6) and recs[0]["rewards/accuracies"] == 0.0
    assert recs[-1]["loss"] < recs[0]["loss"] - 0.1
    assert recs[-1]["rewards/accuracies"] == 1.0 and recs[-1]["rewards/margins"] > 0.2
    assert (out / "adapter_model.safetensors").is_file()
    # the saved adapter prefers the chosen answers as the trained model did: its margin over the base
    model, pairs = _model_and_pairs(folder, data["pairs"], None)
    methods.load_adapter(model, out)
    obj = DPOObjective(beta=0.1)
    with torch.no_grad():
        _, rc, rr, _ = obj.terms(model.eval(), pair_batch(pairs))
    assert bool((rc > rr).all())
    assert_peft_parity(folder, out, load(folder)[1])  # and loads in PEFT with the same logits


def test_recipe_full_precomputes_the_reference(folder, data, tmp_path):
    recs = _run(folder, data["pairs"], tmp_path / "full", "--method", "full", "--epochs", "3", "--lr", "1e-3")
    assert recs[0]["loss"] == pytest.approx(LOG2, abs=1e-6)
    assert recs[-1]["loss"] < recs[0]["loss"] and recs[-1]["rewards/accuracies"] == 1.0


def test_recipe_qlora(folder, data, tmp_path):
    recs = _run(folder, data["pairs"], tmp_path / "qlora", "--method", "qlora", "--epochs", "3", "--lr", "1e-2")
    assert recs[0]["loss"] == pytest.approx(LOG2, abs=1e-5)
    assert recs[-1]["loss"] < recs[0]["loss"] and recs[-1]["rewards/accuracies"] == 1.0


@pytest.mark.parametrize("loss_type", ["ipo", "hinge"])
def test_recipe_other_loss_types_go_down(folder, data, tmp_path, loss_type):
    recs = _run(folder, data["pairs"], tmp_path / loss_type, "--dpo-loss", loss_type, "--max-steps", "4",
                "--beta", "0.5")
    first = {"ipo": (1 / (2 * 0.5)) ** 2, "hinge": 1.0}[loss_type]  # at init the log-ratios are 0
    assert recs[0]["loss"] == pytest.approx(first, abs=1e-5) and recs[-1]["loss"] < recs[0]["loss"]


@pytest.mark.parametrize("how", ["flags", "yaml"])
def test_sft_then_dpo_in_one_run_uses_the_sft_model_as_reference(folder, data, tmp_path, how):
    out = tmp_path / "sft_dpo"
    stages = ["--sft-data", str(data["sft"]), "--data", str(data["pairs"]), "--sft-steps", "6"]
    if how == "yaml":  # the two stages in one config file
        (tmp_path / "run.yaml").write_text(f"sft_data: {data['sft']}\ndata: {data['pairs']}\nsft_steps: 6\n")
        stages = ["--config", str(tmp_path / "run.yaml")]
    assert cli.run(["finetune", "--model", str(folder), *stages, "--output", str(out), *ARGS, "--max-steps", "4",
                    "--lr", "1e-2"]) == 0
    sft = [r for r in read_metrics(out / "phases" / "sft") if "loss" in r]
    dpo = [r for r in read_metrics(out / "phases" / "dpo") if "loss" in r]
    assert len(sft) == 6 and sft[-1]["loss"] < sft[0]["loss"]
    # the reference is the SFT'd model (its adapter is no longer the identity): DPO starts at log 2 exactly;
    # with the base (adapters off) as reference it would not
    assert len(dpo) == 4 and dpo[0]["loss"] == pytest.approx(LOG2, abs=1e-6)
    assert dpo[-1]["loss"] < dpo[0]["loss"]
    summary = json.loads((out / "summary.json").read_text())
    assert [p["phase"] for p in summary["phases"]] == ["sft", "dpo"]


# ---- bad input -----------------------------------------------------------------------------------------------
@pytest.fixture
def dpo_fails(folder, tmp_path, capsys):
    def run(*args):
        out = tmp_path / "out"
        err = fails(["finetune", "--model", folder, "--output", out, "--no-progress", *args], capsys)
        assert_nothing_written(out)
        return err
    return run


def test_dpo_on_data_without_pairs(dpo_fails, data):
    err = dpo_fails("--objective", "dpo", "--data", data["sft"])
    assert f"{data['sft']}: has no preference pairs" in err and "prompt/chosen/rejected" in err
    assert "drop --objective dpo" in err


def test_dpo_needs_data(dpo_fails):
    assert "--objective dpo trains on preference pairs; give --data" in dpo_fails("--objective", "dpo")


def test_sft_data_with_pairs_or_without_dpo(dpo_fails, data):
    err = dpo_fails("--objective", "dpo", "--data", data["pairs"], "--sft-data", data["pairs"])
    assert f"{data['pairs']}: preference pairs" in err and "chat rows" in err
    assert "use it with --objective dpo" in dpo_fails("--data", data["sft"], "--sft-data", data["sft"])


def test_pairs_whose_chosen_equals_rejected(dpo_fails, tmp_path):
    rows = _pairs(3)
    rows[1]["rejected"] = rows[1]["chosen"]
    bad = write_jsonl(tmp_path / "same.jsonl", rows)
    err = dpo_fails("--objective", "dpo", "--data", bad)
    assert f"{bad}:2" in err and "equals" in err


@pytest.mark.parametrize("args, words", [
    (("--pack",), "--pack packs SFT examples"), (("--dpo-loss", "kto"), "--dpo-loss must be one of"),
    (("--beta", "0"), "--beta must be > 0"), (("--objective", "ppo"), "--objective must be one of"),
    (("--reinit-top", "1"), "--reinit-top changes the model"),
    (("--method", "lt-sft"), "trains in phases of its own"),
])
def test_bad_options(dpo_fails, data, args, words):
    base = ("--objective", "dpo") if "--objective" not in args else ()
    assert words in dpo_fails(*base, "--data", data["pairs"], *args)


# ---- eval and resume -----------------------------------------------------------------------------------------
def test_eval_loss_is_the_mean_pair_loss_on_eval_pairs(folder, data, tmp_path):
    out = tmp_path / "eval"
    _run(folder, data["pairs"], out, "--eval-data", str(data["pairs"]), "--max-steps", "4", "--eval-every", "2")
    evals = [r["eval_loss"] for r in read_metrics(out) if "eval_loss" in r]
    # the eval pairs are the training pairs: they are preferred more as training goes on
    assert len(evals) == 2 and evals[0] < LOG2 and evals[1] < evals[0]


@pytest.mark.parametrize("method", ["lora", "full"])
def test_resume_reproduces_the_uninterrupted_losses(folder, data, tmp_path, monkeypatch, method):
    from test_recipes import run_interrupted

    def argv(out):
        return ["finetune", "--model", str(folder), "--data", str(data["pairs"]), "--output", str(out), *ARGS,
                "--method", method, "--max-steps", "6", "--save-every", "3", "--lr", "1e-3"]

    whole = [r["loss"] for r in read_metrics(tmp_path / "whole") if "loss" in r] if cli.run(
        argv(tmp_path / "whole")) == 0 else None
    out = tmp_path / "cut"
    assert run_interrupted(argv(out), 4, monkeypatch) == 130
    assert cli.run([*argv(out), "--resume"]) == 0
    resumed = {r["step"]: r["loss"] for r in read_metrics(out) if "loss" in r}
    assert [resumed[s] for s in range(1, 7)] == pytest.approx(whole, abs=1e-6)


def test_grad_accumulation_is_exact_in_pairs(folder, data, tmp_path):
    """The window's loss is a mean over its pairs: 2 micro-batches of 2 pairs step as one batch of 4."""
    one = _run(folder, data["pairs"], tmp_path / "one", "--max-steps", "4")
    two = _run(folder, data["pairs"], tmp_path / "two", "--max-steps", "4", "--batch-size", "2", "--grad-accum", "2")
    assert [r["pairs"] for r in two] == [4] * 4
    for a, b in zip(one, two):
        for k in ("loss", "rewards/margins", "rewards/accuracies", "logps/chosen"):
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), k
    assert one[-1]["loss"] < one[0]["loss"] - 0.05  # the steps moved the policy, so agreeing means something


def test_sft_then_dpo_resumes_in_the_dpo_phase_with_the_same_reference(folder, data, tmp_path, monkeypatch):
    """Cut in the DPO phase: --resume restores the finished SFT phase's weights, rebuilds the reference from
    them, and continues to the losses of the uninterrupted run."""
    from leantune.train.loop import Trainer

    def argv(out):
        return ["finetune", "--model", str(folder), "--sft-data", str(data["sft"]), "--data", str(data["pairs"]),
                "--output", str(out), *ARGS, "--sft-steps", "3", "--max-steps", "4", "--save-every", "2",
                "--lr", "1e-2"]

    def dpo_losses(out):
        return {r["step"]: r["loss"] for r in read_metrics(out / "phases" / "dpo") if "loss" in r}

    assert cli.run(argv(tmp_path / "whole")) == 0
    real = Trainer.train_step

    def interrupt(self, window):
        if self.phase == "dpo" and self.step == 3:
            raise KeyboardInterrupt
        return real(self, window)

    out = tmp_path / "cut"
    with monkeypatch.context() as m:
        m.setattr(Trainer, "train_step", interrupt)
        with pytest.raises(SystemExit) as e:
            cli.main(argv(out))
    assert e.value.code == 130 and sorted(dpo_losses(out)) == [1, 2, 3]
    assert cli.run([*argv(out), "--resume"]) == 0
    whole, resumed = dpo_losses(tmp_path / "whole"), dpo_losses(out)
    assert [resumed[s] for s in range(1, 5)] == pytest.approx([whole[s] for s in range(1, 5)], abs=1e-6)


def test_sft_lr_sets_the_sft_phase_alone(folder, data, tmp_path, capsys):
    out = tmp_path / "sft_lr"
    assert cli.run(["finetune", "--model", str(folder), "--sft-data", str(data["sft"]), "--data", str(data["pairs"]),
                    "--output", str(out), *ARGS, "--sft-steps", "3", "--max-steps", "2", "--lr", "1e-3",
                    "--sft-lr", "2e-2", "--schedule", "constant", "--warmup-steps", "0"]) == 0
    sft = [r["lr"] for r in read_metrics(out / "phases" / "sft") if "loss" in r]
    dpo = [r["lr"] for r in read_metrics(out / "phases" / "dpo") if "loss" in r]
    assert sft == [pytest.approx(2e-2)] * 3 and dpo == [pytest.approx(1e-3)] * 2
    capsys.readouterr()
    for extra, msg in [(["--sft-lr", "1e-3"], "--sft-lr is the learning rate of the --sft-data phase"),
                       (["--sft-data", str(data["sft"]), "--sft-lr", "0"], "--sft-lr must be > 0")]:
        with pytest.raises(ValueError, match=msg):
            cli.run(["finetune", "--model", str(folder), "--data", str(data["pairs"]), "--output",
                     str(tmp_path / "bad"), *ARGS, *extra])
        assert not (tmp_path / "bad").exists()


def test_precomputed_reference_gives_the_same_run(folder, data, tmp_path, capsys):
    """--dpo-precompute-ref (TRL's precompute_ref_log_probs): the reference log-probs of the adapter-free model
    computed once before training equal what the adapters-off forward gives in each step, so the losses are the
    same run's, with one forward fewer per step."""
    base = _run(folder, data["pairs"], tmp_path / "off", "--max-steps", "3")
    assert "reference: the model with its adapters switched off" in capsys.readouterr().err
    pre = _run(folder, data["pairs"], tmp_path / "pre", "--max-steps", "3", "--dpo-precompute-ref")
    assert "log-probs of the starting model precomputed" in capsys.readouterr().err
    assert [r["loss"] for r in pre] == pytest.approx([r["loss"] for r in base], abs=1e-5)
    assert pre[0]["loss"] == pytest.approx(LOG2, abs=1e-6)
    with pytest.raises(ValueError, match="--dpo-precompute-ref is an option of --objective dpo"):
        cli.run(["finetune", "--model", str(folder), "--data", str(data["sft"]), "--output", str(tmp_path / "x"),
                 "--dpo-precompute-ref"])

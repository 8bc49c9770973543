"""LiST self-training (`--objective self-train`, train/self_train.py, recipes/self_train.py): the oracles of
methods-more.md §8 ((a) a fresh adapter leaves the model unchanged and only adapter and head train; (b) the meta
score equals the analytic value on logistic regression), the soft-label loss's closed form, meta weights that zero
pseudo-labels whose gradient opposes the labelled loss, the recipe through the CLI on a tiny random BERT (files,
accuracy per iteration, the saved adapter and head reload to equal logits), and bad input stopping before any
weight is read."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from leantune import cli
from leantune.train.self_train import (StudentSettings, fit_student, meta_scores, normalized_weights,
                                       predict_probs, soft_label_kl)
from test_bad_input import assert_nothing_written, fails

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

GOOD, BAD, FILL = ["good", "great", "fine", "nice"], ["bad", "awful", "poor", "sad"], ["the", "a", "movie", "it",
                                                                                      "was", "is", "very", "so"]


# ---- soft labels and meta weights ----------------------------------------------------------------------
def test_soft_label_kl_closed_form():
    p_t = torch.tensor([[0.7, 0.3, 0.0], [0.2, 0.5, 0.3]])
    logits = torch.tensor([[1.0, -1.0, 0.5], [0.0, 2.0, -1.0]])
    q = torch.softmax(logits, -1)
    want = [sum(p * (torch.log(p) - torch.log(qq)) for p, qq in zip(pr, qr) if p > 0) for pr, qr in zip(p_t, q)]
    assert torch.allclose(soft_label_kl(logits, p_t), torch.stack(want), atol=1e-6)
    assert torch.allclose(soft_label_kl(torch.log(p_t[1:]), p_t[1:]), torch.zeros(1), atol=1e-6)  # p_S = p_T


def _logreg(seed=0, n=12, d=5):
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(d, generator=g, dtype=torch.float64)
    x_u, x_l = torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(8, d, generator=g, dtype=torch.float64)
    return theta, x_u, x_l, g


def test_meta_score_equals_analytic_value_on_logistic_regression():
    """§8 oracle (b): -dL_meta(theta - lr sum eps_i grad l_i)/d eps_i at 0 = lr grad L_meta . grad l_i."""
    theta, x_u, x_l, g = _logreg()
    y_u, y_l = torch.rand(len(x_u), generator=g, dtype=torch.float64), (torch.rand(8, generator=g) > 0.5).double()
    lr = 0.3

    def per_example(ps):
        return F.binary_cross_entropy_with_logits(x_u @ ps[0], y_u, reduction="none")

    def meta(ps):
        return F.binary_cross_entropy_with_logits(x_l @ ps[0], y_l)

    scores = meta_scores([theta.clone().requires_grad_(True)], per_example, meta, lr)
    s = torch.sigmoid
    grad_meta = ((s(x_l @ theta) - y_l)[:, None] * x_l).mean(0)  # closed-form gradients of logistic loss
    grad_i = (s(x_u @ theta) - y_u)[:, None] * x_u
    assert torch.allclose(scores, lr * grad_i @ grad_meta, atol=1e-10)


def test_meta_weights_zero_pseudo_labels_that_oppose_the_labelled_loss():
    theta, x_u, x_l, _ = _logreg(seed=1, n=16)
    truth = torch.tensor([1.0, -1.0, 0.5, 0.0, 2.0], dtype=torch.float64)  # the labelled set's true separator
    y_l, clean = (x_l @ truth > 0).double(), (x_u @ truth > 0).double()
    flipped = torch.arange(len(x_u)) % 3 == 0
    y_u = torch.where(flipped, 1 - clean, clean)
    x_l = torch.cat([x_l, x_u])  # a labelled set large enough that its gradient points at the truth
    y_l = torch.cat([y_l, clean])
    theta = torch.zeros(5, dtype=torch.float64, requires_grad=True)  # at 0 every example's gradient is (0.5-y)x

    def per_example(ps):
        return F.binary_cross_entropy_with_logits(x_u @ ps[0], y_u, reduction="none")

    w = normalized_weights(meta_scores([theta], per_example,
                                       lambda ps: F.binary_cross_entropy_with_logits(x_l @ ps[0], y_l), 0.1))
    assert (w >= 0).all() and abs(float(w.sum()) - 1) < 1e-5
    assert float(w[flipped].mean()) < 0.25 * float(w[~flipped].mean())  # flipped labels carry little weight
    assert (w[flipped] == 0).sum() >= flipped.sum() // 2


def test_meta_weights_separate_flipped_pseudo_labels_auroc():
    """§8 oracle (c), its first half: 40% of pseudo-labels flipped on a logistic-regression toy; the weights rank
    clean above flipped with AUROC >= 0.75 (seeds 0-5; 0.80-0.95 seen) for an early student (theta near 0, as a
    re-initialized student starts). Measured, not asserted: once theta nears the truth (theta = truth + 0.3 noise)
    the clean examples' gradients shrink and AUROC falls to 0.54-0.73."""
    for seed in range(6):
        g = torch.Generator().manual_seed(seed)
        truth = torch.randn(6, generator=g, dtype=torch.float64)
        x_u, x_l = torch.randn(64, 6, generator=g, dtype=torch.float64), torch.randn(32, 6, generator=g,
                                                                                      dtype=torch.float64)
        clean, y_l = (x_u @ truth > 0).double(), (x_l @ truth > 0).double()
        flipped = torch.rand(64, generator=g) < 0.4
        y_u = torch.where(flipped, 1 - clean, clean)
        theta = (0.1 * truth + 0.1 * torch.randn(6, generator=g, dtype=torch.float64)).requires_grad_(True)
        w = normalized_weights(meta_scores(
            [theta], lambda ps: F.binary_cross_entropy_with_logits(x_u @ ps[0], y_u, reduction="none"),
            lambda ps: F.binary_cross_entropy_with_logits(x_l @ ps[0], y_l), 0.1))
        wc, wf = w[~flipped], w[flipped]
        auroc = float(((wc[:, None] > wf[None, :]).double() + 0.5 * (wc[:, None] == wf[None, :]).double()).mean())
        assert auroc >= 0.75, (seed, auroc)


def test_normalized_weights_clip_negatives():
    w = normalized_weights(torch.tensor([-1.0, 1.0, 3.0]))
    assert torch.allclose(w, torch.tensor([0.0, 0.25, 0.75]), atol=1e-6)
    assert torch.equal(normalized_weights(torch.tensor([-1.0, -2.0])), torch.zeros(2))  # nothing trains


# ---- a tiny random BERT --------------------------------------------------------------------------------
def make_encoder(folder: Path, garbage_weights: bool = False) -> Path:
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + GOOD + BAD + FILL
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = transformers.BertTokenizerFast(vocab_file=str(folder / "vocab.txt"))
    tok.save_pretrained(str(folder))
    cfg = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0, initializer_range=0.5)  # rows told apart
    torch.manual_seed(0)
    transformers.BertModel(cfg).save_pretrained(str(folder))
    if garbage_weights:
        (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    return folder


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> Path:
    return make_encoder(tmp_path_factory.mktemp("enc") / "tiny-bert")


def sentence(rng: random.Random, label: int) -> str:
    words = [rng.choice(FILL) for _ in range(4)] + [rng.choice(GOOD if label else BAD)]
    rng.shuffle(words)
    return " ".join(words)


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def files(tmp_path) -> dict:
    rng = random.Random(0)
    lab = [{"text": sentence(rng, i % 2), "label": ["negative", "positive"][i % 2]} for i in range(8)]
    unl = [{"text": sentence(rng, rng.randrange(2))} for _ in range(24)]
    ev = [{"text": sentence(rng, i % 2), "label": ["negative", "positive"][i % 2]} for i in range(16)]
    return {"data": write_rows(tmp_path / "lab.jsonl", lab), "unlabeled": write_rows(tmp_path / "unl.jsonl", unl),
            "eval": write_rows(tmp_path / "eval.jsonl", ev)}


def test_adapter_is_identity_at_init_and_only_adapter_and_head_train(encoder, files):
    """§8 oracle (a), on leantune's LoRA (B = 0 at init) applied to the encoder by `with_adapter`."""
    from leantune.methods.lora import LoraConfig
    from leantune.recipes.self_train import head_names, load_encoder, with_adapter

    torch.manual_seed(0)
    base = load_encoder(encoder, 2, ["negative", "positive"])
    student = with_adapter(base, "lora", LoraConfig(r=4, alpha=8, targets="all-linear"))
    ids = [[2, 5, 9, 13, 3], [2, 10, 3]]
    assert torch.allclose(predict_probs(student, ids, 0), predict_probs(base, ids, 0), atol=1e-6)
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    assert set(head_names(student)) <= trainable and all("lora_" in n for n in trainable - set(head_names(student)))
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
    s = StudentSettings(steps=3, unlabeled_batch=2, labeled_batch=2, lr=1e-2, weight_decay=0.0, meta_lr=1e-2,
                        warmup=0.3, seed=0)
    labeled = [type("E", (), {"input_ids": ids[0], "label": 1})(), type("E", (), {"input_ids": ids[1], "label": 0})()]
    fit_student(student, ids, probs, labeled, s, 0)
    for n, p in student.named_parameters():
        assert torch.equal(p, before[n]) != (n in trainable), n  # frozen bit-identical, trainable moved
    assert "lora" not in "".join(n for n, _ in base.named_parameters())  # the pretrained model stays bare


# ---- the recipe through the CLI ------------------------------------------------------------------------
def run_args(encoder, files, out, *extra):
    return ["finetune", "--objective", "self-train", "--model", encoder, "--data", files["data"], "--unlabeled",
            files["unlabeled"], "--eval-data", files["eval"], "--output", out, "--rank", "4", "--alpha", "8",
            "--lr", "5e-3", "--student-lr", "5e-3", "--batch-size", "4", "--epochs", "3",
            "--self-train-iterations", "2", "--self-train-steps", "4", "--unlabeled-batch-size", "8", *extra]


def test_recipe_writes_adapter_head_and_accuracy_per_iteration(encoder, files, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        cli.main([str(a) for a in run_args(encoder, files, out)])
    assert e.value.code == 0
    for name in ("adapter_config.json", "adapter_model.safetensors", "head.safetensors", "self_train.jsonl",
                 "summary.json", "config.json", "tokenizer.json"):
        assert (out / name).is_file(), name
    recs = [json.loads(ln) for ln in (out / "self_train.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in recs] == [0, 1, 2]
    assert all(0 <= r["student_accuracy"] <= 1 for r in recs)
    assert recs[1]["teacher_accuracy"] == recs[0]["student_accuracy"]  # the teacher of session 1 is iteration 0's
    assert all(0 <= r["zero_weight_share"] <= 1 for r in recs[1:])
    assert "iteration 2: teacher accuracy" in capsys.readouterr().err


def test_saved_student_reloads_with_equal_logits(encoder, files, tmp_path):
    from leantune.recipes.finetune import FinetuneConfig
    from leantune.recipes.self_train import load_self_trained, run_self_train
    from leantune.methods.lora import LoraConfig

    out = tmp_path / "out"
    cfg = FinetuneConfig(model=str(encoder), data=str(files["data"]), unlabeled=str(files["unlabeled"]),
                         eval_data=str(files["eval"]), output=str(out), objective="self-train", lr=5e-3,
                         student_lr=5e-3, batch_size=4, epochs=2, self_train_iterations=1, self_train_steps=3,
                         unlabeled_batch_size=8, options=LoraConfig(r=4, alpha=8))
    model, summary = run_self_train(cfg)
    reloaded = load_self_trained(str(encoder), str(out))
    ids = [[2, 5, 9, 13, 3], [2, 10, 6, 3], [2, 17, 3]]
    trained = predict_probs(model, ids, 0)
    assert not torch.allclose(trained, trained[:1].expand_as(trained))  # a model that tells rows apart
    assert torch.allclose(predict_probs(reloaded, ids, 0), trained, atol=1e-6)
    assert reloaded.config.id2label == {0: "negative", 1: "positive"}
    assert summary["iterations"][-1]["student_accuracy"] is not None


def test_without_eval_data_accuracy_is_null_and_the_student_is_saved(encoder, files, tmp_path, capsys):
    out = tmp_path / "noeval"
    args = run_args(encoder, files, out, "--self-train-iterations", "1")  # the last flag wins
    i = args.index("--eval-data")
    del args[i:i + 2]
    with pytest.raises(SystemExit) as e:
        cli.main([str(a) for a in args])
    assert e.value.code == 0 and "no --eval-data" in capsys.readouterr().err
    recs = [json.loads(ln) for ln in (out / "self_train.jsonl").read_text().splitlines()]
    assert [r["student_accuracy"] for r in recs] == [None, None] and (out / "head.safetensors").is_file()


def test_the_labelled_loss_goes_down(encoder, files):
    from leantune.data.classification import load_classification_dataset
    from leantune.methods.lora import LoraConfig
    from leantune.recipes.self_train import load_encoder, with_adapter
    from leantune.train.self_train import fit_labeled

    tok = transformers.AutoTokenizer.from_pretrained(str(encoder))
    rows, _ = load_classification_dataset(files["data"], tok, 32)
    torch.manual_seed(0)
    model = with_adapter(load_encoder(encoder, 2, None), "lora", LoraConfig(r=4, alpha=8))
    losses = fit_labeled(model, rows, 30, 8, 1e-2, 0.0, 0, 0)
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5


# ---- bad input -----------------------------------------------------------------------------------------
@pytest.fixture
def garbage_encoder(tmp_path) -> Path:
    """An encoder folder whose weights cannot be read: each error below must come first."""
    return make_encoder(tmp_path / "garbage", garbage_weights=True)


def test_bad_input_stops_before_any_weight_is_read(garbage_encoder, files, tmp_path, capsys):
    out = tmp_path / "bad"

    def err(*args, **swap):
        f = {**files, **swap}
        msg = fails(run_args(garbage_encoder, f, out, *args), capsys)
        assert_nothing_written(out)
        return msg

    rng = random.Random(1)
    labelled_pool = write_rows(tmp_path / "pool.jsonl", [{"text": sentence(rng, 1), "label": "positive"}] * 3)
    msg = err(unlabeled=labelled_pool)
    assert "--unlabeled rows carry labels" in msg and "pool.jsonl" in msg
    no_labels = write_rows(tmp_path / "nolab.jsonl", [{"text": sentence(rng, 1)}] * 3)
    assert "nolab.jsonl" in err(data=no_labels) and "label" in err(data=no_labels)
    ids = write_rows(tmp_path / "ids.jsonl", [{"text": sentence(rng, i % 2), "label": i % 2} for i in range(4)])
    wide = write_rows(tmp_path / "wide.jsonl", [{"text": sentence(rng, 1), "label": 5}])
    msg = err(data=ids, eval=wide)
    assert "wide.jsonl" in msg and "out of range" in msg and "0..1" in msg
    other = write_rows(tmp_path / "other.jsonl", [{"text": sentence(rng, 1), "label": "neutral"}])
    assert "'neutral'" in err(eval=other) and "other.jsonl" in err(eval=other)
    assert "--meta-warmup" in err("--meta-warmup", "1.5")
    assert "does not use --pack" in err("--pack")


def test_option_errors_name_the_option(encoder, files, tmp_path, capsys):
    out = tmp_path / "o"
    base = ["finetune", "--model", encoder, "--data", files["data"], "--output", out]
    assert "needs --unlabeled" in fails(base + ["--objective", "self-train"], capsys)
    assert "--unlabeled is self-training's pool" in fails(base + ["--unlabeled", files["unlabeled"]], capsys)
    assert "needs --model ENCODER_FOLDER" in fails(["finetune", "--objective", "self-train", "--data", files["data"],
                                                    "--unlabeled", files["unlabeled"], "--output", out], capsys)
    assert "--self-train-iterations must be >= 1" in fails(
        base + ["--objective", "self-train", "--unlabeled", files["unlabeled"], "--self-train-iterations", "0"], capsys)
    assert_nothing_written(out)

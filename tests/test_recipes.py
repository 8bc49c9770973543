"""Recipe tier: the real CLI (`leantune.cli.run` / `main`) on a tiny HF model folder.

finetune writes every promised file, learns, and its adapter loads in PEFT with the same logits; every data
format and training flag works; gradient accumulation is token-weighted and exact; an interrupted run
resumes to exactly the losses and adapter of an uninterrupted one; generate / chat / merge / --config /
--help behave as documented.
"""
from __future__ import annotations

import io
import json
import math
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from leantune import cli, methods
from leantune.models.loader import load
from leantune.recipes import generate as gen_recipe
from leantune.recipes import options
from leantune.train.loop import TrainConfig, Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

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


def chat_row(q, a, system=None):
    msgs = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return {"messages": msgs}


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln]


def step_records(out: Path) -> list[dict]:
    return [r for r in read_metrics(out) if "loss" in r]


def adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(folder) / "adapter_model.safetensors"))


def assert_same_tensors(a: dict, b: dict, tol: float):
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] - b[k]).abs().max().item() <= tol, k




@pytest.fixture(scope="module")
def tok(folder):
    return load(folder)[1]


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "chat.jsonl", [chat_row(q, a) for q, a in QA])


@pytest.fixture
def finetune(folder, tmp_path):
    """Run `leantune finetune` through the CLI on the tiny folder; returns the output folder."""

    def run(data, *args, out="out"):
        out = tmp_path / out
        # exact comparisons of numbers: fp32 on every CPU (auto is bf16 on one with native bf16)
        argv = ["finetune", "--model", str(folder), "--data", str(data), "--output", str(out), "--no-progress",
                "--eval-fraction", "0", "--dtype", "fp32", *map(str, args)]
        assert cli.run(argv) == 0
        return out

    return run


@torch.no_grad()
def leantune_logits(folder, adapter, ids):
    """(logits with the adapter, logits of the base) from leantune's own model."""
    model, _ = load(folder)
    base = model(ids)
    methods.load_adapter(model, adapter)
    return model(ids), base


def peft_logits(folder, adapter, ids):
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    model = peft.PeftModel.from_pretrained(hf, adapter).eval()
    with torch.no_grad():
        return model(ids).logits


def assert_peft_parity(folder, adapter, tok):
    ids = torch.tensor([tok.encode_chat([{"role": "user", "content": QA[0][0]}], add_generation_prompt=True)])
    ours, base = leantune_logits(folder, adapter, ids)
    theirs = peft_logits(folder, adapter, ids)
    assert (ours - base).abs().max().item() > 1e-3  # the adapter does something, so parity means something
    assert (ours - theirs).abs().max().item() <= 1e-4


# ---------------------------------------------------------------------------------------------
# finetune: files, learning, PEFT interop


@pytest.fixture(scope="module")
def trained(folder, tmp_path_factory) -> Path:
    """An overfit run: 2 chat examples repeated 4 times, 5 epochs of 2 steps, high constant lr,
    checkpoints every 3 steps."""
    d = tmp_path_factory.mktemp("trained")
    data = write_jsonl(d / "overfit.jsonl", [chat_row(q, a) for q, a in QA[:2] * 4])
    out = d / "out"
    argv = ["finetune", "--model", str(folder), "--data", str(data), "--output", str(out), "--no-progress",
            "--eval-fraction", "0", "--lr", "1e-2", "--epochs", "5", "--batch-size", "4", "--save-every", "3",
            "--schedule", "constant"]
    assert cli.run(argv) == 0
    return out


def test_finetune_writes_every_output(trained):
    names = {p.name for p in trained.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "metrics.jsonl", "loss.png", "summary.json",
            "checkpoints"} <= names
    recs = step_records(trained)
    assert [r["step"] for r in recs] == list(range(1, 11))  # 8 examples / batch 4 = 2 steps x 5 epochs
    assert all(math.isfinite(r["loss"]) and r["loss_tokens"] > 0 for r in recs)
    png = (trained / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR"
    w, h = struct.unpack(">II", png[16:24])
    assert w >= 100 and h >= 100 and len(png) > 8 + 25
    summary = json.loads((trained / "summary.json").read_text())
    assert summary["steps"] == 10 and summary["train_loss"] == pytest.approx(recs[-1]["loss"])
    assert summary["first_loss"] == pytest.approx(recs[0]["loss"])
    # save-every 3 -> 3, 6, 9 and the final 10; the two most recent are kept
    cks = sorted(p.name for p in (trained / "checkpoints").iterdir())
    assert cks == ["step-10", "step-9"]
    for ck in cks:
        files = {p.name for p in (trained / "checkpoints" / ck).iterdir()}
        assert {"adapter_config.json", "adapter_model.safetensors", "trainer_state.json"} <= files
    # the final checkpoint's adapter is the saved adapter
    assert_same_tensors(adapter_tensors(trained / "checkpoints" / "step-10"), adapter_tensors(trained), 0.0)


def test_finetune_loss_goes_down(trained):
    losses = [r["loss"] for r in step_records(trained)]
    assert losses[-1] < losses[0] - 0.5  # from ~ln(512) = 6.2 (a random model) down by more than 0.5 nats
    assert sum(losses[-3:]) < sum(losses[:3]) - 1.5


def test_saved_adapter_loads_in_peft_with_same_logits(folder, trained, tok):
    cfg = json.loads((trained / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 8 and cfg["base_model_name_or_path"] == str(folder)
    assert_peft_parity(folder, trained, tok)


# ---------------------------------------------------------------------------------------------
# data formats and flags


def _answer_tokens(tok, answer):
    return len(tok.encode(answer, add_special_tokens=False)) + 2  # + <|im_end|> + "\n" the template writes


FORMAT_ROWS = {
    "chat": [chat_row(q, a, system="Be brief.") for q, a in QA[:3]],
    "alpaca": [{"instruction": q, "output": a} for q, a in QA[:2]] + [{"instruction": "Add.", "input": "1 2",
                                                                        "output": "3"}],
    "completion": [{"prompt": q, "completion": a} for q, a in QA[:3]],
    "text": [{"text": q + " " + a} for q, a in QA[:3]],
}


def _expected_loss_tokens(fmt, rows, tok):
    if fmt == "text":  # every token but the first, plus EOS
        return sum(len(tok.encode(r["text"], add_special_tokens=False)) for r in rows)
    key = {"chat": None, "alpaca": "output", "completion": "completion"}[fmt]
    answers = [r["messages"][-1]["content"] if key is None else r[key] for r in rows]
    return sum(_answer_tokens(tok, a) for a in answers)


@pytest.mark.parametrize("fmt", list(FORMAT_ROWS))
def test_each_data_format_trains_on_the_answer_only(fmt, finetune, tok, tmp_path):
    rows = FORMAT_ROWS[fmt]
    out = finetune(write_jsonl(tmp_path / f"{fmt}.jsonl", rows), "--batch-size", "8", "--lr", "1e-2")
    (rec,) = step_records(out)
    assert rec["loss_tokens"] == _expected_loss_tokens(fmt, rows, tok)
    assert math.isfinite(rec["loss"]) and rec["loss"] > 0
    assert (out / "adapter_model.safetensors").exists()


def test_pack_gives_the_padded_loss_with_fewer_tokens(finetune, chat_data):
    padded = step_records(finetune(chat_data, "--batch-size", "8", "--max-steps", "1", out="padded"))[0]
    packed = step_records(finetune(chat_data, "--batch-size", "8", "--max-steps", "1", "--pack",
                                   "--max-length", "96", out="packed"))[0]
    assert packed["loss_tokens"] == padded["loss_tokens"]
    assert packed["loss"] == pytest.approx(padded["loss"], abs=1e-5)
    assert packed["tokens"] < padded["tokens"]  # packing wastes less on padding
    rows = step_records(finetune(chat_data, "--batch-size", "1", "--pack", "--max-length", "96", out="rows"))
    assert 1 < len(rows) < len(QA)  # several examples per row
    assert sum(r["loss_tokens"] for r in rows) == padded["loss_tokens"]


def test_gradient_checkpointing_changes_no_number(finetune, chat_data):
    args = ("--batch-size", "4", "--max-steps", "3", "--lr", "1e-2", "--dropout", "0.1")
    plain = finetune(chat_data, *args, out="plain")
    ckpt = finetune(chat_data, *args, "--gradient-checkpointing", out="ckpt")
    a, b = step_records(plain), step_records(ckpt)
    assert len(a) == 3
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) <= 1e-5 and abs(x["grad_norm"] - y["grad_norm"]) <= 1e-4
    assert_same_tensors(adapter_tensors(plain), adapter_tensors(ckpt), 1e-5)


def test_eval_data_is_scored_and_reported(finetune, folder, chat_data, tok, tmp_path):
    eval_rows = [chat_row(q, a) for q, a in QA[:3]]
    eval_file = write_jsonl(tmp_path / "eval.jsonl", eval_rows)
    out = finetune(chat_data, "--eval-data", eval_file, "--eval-every", "2", "--batch-size", "2", "--epochs", "1")
    recs = read_metrics(out)
    assert [r["step"] for r in recs if "eval_loss" in r] == [2, 4]  # step 4 = the end, recorded once
    assert "eval_loss" in recs[1] and "loss" in recs[1] and "eval_loss" not in recs[0]
    final = recs[-1]["eval_loss"]
    assert json.loads((out / "summary.json").read_text())["eval_loss"] == pytest.approx(final)
    # the reported eval loss is the token-mean loss of the saved adapter on the eval file
    from leantune.data import load_dataset, pad_batch
    from leantune.train.loss import lm_loss_sum

    model, _ = load(folder)
    methods.load_adapter(model, out)
    with torch.no_grad():
        parts = [lm_loss_sum(model, pad_batch([ex])) for ex in load_dataset(eval_file, tok, 512)]
    assert final == pytest.approx(sum(float(s) for s, _ in parts) / sum(n for _, n in parts), abs=1e-5)


@pytest.mark.parametrize("schedule", ["linear", "constant", "cosine"])
def test_schedule(schedule, finetune, chat_data):
    out = finetune(chat_data, "--schedule", schedule, "--lr", "0.01", "--batch-size", "2", "--epochs", "1")
    lrs = [r["lr"] for r in step_records(out)]
    total = 4
    expect = {"constant": lambda k: 1.0, "linear": lambda k: 1 - k / total,
              "cosine": lambda k: 0.5 * (1 + math.cos(math.pi * k / total))}[schedule]
    assert lrs == pytest.approx([0.01 * expect(k) for k in range(total)], rel=1e-9, abs=1e-12)


def test_rslora_scales_like_peft(finetune, folder, chat_data, tok):
    out = finetune(chat_data, "--rslora", "--rank", "4", "--alpha", "8", "--lr", "1e-2", "--max-steps", "2")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["use_rslora"] is True and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    assert_peft_parity(folder, out, tok)


def _wrapped_modules(adapter_dir):
    return {k.split(".lora_")[0].removeprefix("base_model.model.") for k in adapter_tensors(adapter_dir)}


@pytest.mark.parametrize("targets", ["q_proj,v_proj", "self_attn.q_proj, self_attn.v_proj"])
def test_targets_list_wraps_only_those(targets, finetune, chat_data):
    out = finetune(chat_data, "--targets", targets, "--max-steps", "1")
    assert _wrapped_modules(out) == {f"model.layers.{i}.self_attn.{m}" for i in (0, 1) for m in ("q_proj", "v_proj")}
    saved = json.loads((out / "adapter_config.json").read_text())["target_modules"]
    assert sorted(t.rpartition(".")[2] for t in saved) == ["q_proj", "v_proj"]
    # r * (in + out) per module: q 64 -> 64, v 64 -> 32 (2 kv heads of 16), two layers
    assert json.loads((out / "summary.json").read_text())["trainable_parameters"] == 2 * 8 * ((64 + 64) + (64 + 32))


def test_regex_target_wraps_only_its_matches_and_loads_in_peft(finetune, folder, chat_data, tok):
    regex = r".*layers\.0{1,2}\.mlp\.(gate|up)_proj"  # a comma inside a regex keeps it one regex
    out = finetune(chat_data, "--targets", regex, "--max-steps", "2", "--lr", "2e-2")
    assert _wrapped_modules(out) == {"model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"}
    assert_peft_parity(folder, out, tok)


# ---------------------------------------------------------------------------------------------
# gradient accumulation


def test_grad_accum_equals_the_big_batch(finetune, chat_data):
    """Through the CLI: the same 4 examples in step 1 (the epoch order depends on the seed only), as one batch
    of 4 or as 2 micro-batches of 2, give the same loss and the same gradient norm. (The adapters after an
    AdamW step are compared at the Trainer level with SGD below: AdamW's first step is lr * g / (|g| + 1e-8),
    which blows float rounding of near-zero gradient entries up to ~1e-4 with these padding shapes.)"""
    big = finetune(chat_data, "--batch-size", "4", "--grad-accum", "1", "--max-steps", "1", "--lr", "1e-2", out="big")
    acc = finetune(chat_data, "--batch-size", "2", "--grad-accum", "2", "--max-steps", "1", "--lr", "1e-2",
                   out="acc")
    (x,), (y,) = step_records(big), step_records(acc)
    assert x["loss_tokens"] == y["loss_tokens"]
    assert abs(x["loss"] - y["loss"]) <= 1e-6 and abs(x["grad_norm"] - y["grad_norm"]) <= 1e-6


def _lora_model(folder):
    model, _ = load(folder)
    torch.manual_seed(0)  # LoRA A init
    methods.apply(model, "lora", r=4, alpha=8)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # non-zero B so every LoRA matrix gets a gradient
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def _one_sgd_step(model, examples, batch_size, grad_accum, out):
    """One Trainer step with plain SGD in place of AdamW, so the weights move by exactly -lr * gradient."""
    cfg = TrainConfig(lr=0.5, batch_size=batch_size, grad_accum=grad_accum, max_grad_norm=0.0, schedule="constant",
                      progress=False, max_steps=1)
    trainer = Trainer(model, examples, [], cfg, out)
    trainer.opt = torch.optim.SGD(trainer.params, lr=cfg.lr)
    rec = trainer.train_step(trainer._window())
    return rec, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_grad_accum_step_is_the_token_weighted_step(folder, tok, chat_data, tmp_path):
    """At the Trainer level: a step over 4 x 1 and over 2 x 2 both move the adapter by -lr times the gradient of
    the token-mean loss over those 4 examples, computed one example at a time (no padding); the mean of the
    micro-batch means would be a different loss."""
    from leantune.data import epoch_order, load_dataset, pad_batch
    from leantune.train.loss import lm_loss_sum

    examples = load_dataset(chat_data, tok, 512)
    ref = _lora_model(folder)
    names = [n for n, p in ref.named_parameters() if p.requires_grad]
    params = [p for p in ref.parameters() if p.requires_grad]
    chosen = [examples[i] for i in epoch_order(len(examples), 0, 0)[:4]]
    sums = [lm_loss_sum(ref, pad_batch([ex])) for ex in chosen]
    micro = [(sums[0][0] + sums[1][0], sums[0][1] + sums[1][1]), (sums[2][0] + sums[3][0], sums[2][1] + sums[3][1])]
    grads = [torch.autograd.grad(s, params, retain_graph=True) for s, _ in micro]  # gradient of each sum
    n_tok = micro[0][1] + micro[1][1]
    loss = (micro[0][0] + micro[1][0]).item() / n_tok
    lr = 0.5
    expected = {n: p.detach() - lr * (g1 + g2) / n_tok for n, p, g1, g2 in zip(names, params, *grads)}
    assert len(expected) == 2 * 2 * 7 and all(g.abs().max() > 0 for g in grads[0])

    for bs, accum in ((4, 1), (2, 2)):
        rec, after = _one_sgd_step(_lora_model(folder), examples, bs, accum, tmp_path / f"{bs}x{accum}")
        assert rec["loss_tokens"] == n_tok
        assert rec["loss"] == pytest.approx(loss, abs=1e-6)
        assert_same_tensors(after, expected, 1e-6)

    # the check can fail: the micro-batches have different token counts, so averaging their means would move
    # the weights elsewhere by far more than the tolerance
    (_, n1), (_, n2) = micro
    assert n1 != n2
    worst = max((lr * ((g1 + g2) / n_tok - 0.5 * (g1 / n1 + g2 / n2))).abs().max().item() for g1, g2 in zip(*grads))
    assert worst > 1e-4


# ---------------------------------------------------------------------------------------------
# exact resume


RESUME_ARGS = ("--batch-size", "2", "--epochs", "2", "--lr", "1e-2", "--dropout", "0.1")  # 4 steps an epoch


def _main(argv) -> int:
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    return e.value.code


def _argv(folder, data, out, *extra):
    return ["finetune", "--model", str(folder), "--data", str(data), "--output", str(out), "--no-progress",
            "--eval-fraction", "0", *RESUME_ARGS, *extra]


@pytest.fixture(scope="module")
def uninterrupted(folder, chat_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("full") / "out"
    assert cli.run(_argv(folder, chat_data, out, "--save-every", "5")) == 0
    return out


def _assert_complete_checkpoints(out: Path):
    for p in (out / "checkpoints").iterdir():
        if p.name.startswith(".tmp-"):
            continue
        assert p.name.startswith("step-"), p
        files = {f.name for f in p.iterdir()}
        assert {"trainer_state.json", "trainable.safetensors", "optimizer.safetensors", "rng.safetensors",
                "adapter_config.json", "adapter_model.safetensors"} <= files, p


def run_interrupted(argv, done: int, monkeypatch) -> int:
    """`leantune main(argv)` interrupted (Ctrl-C) once `done` steps are done; its exit code."""
    real = Trainer.train_step

    def interrupt(self, window):
        if self.step == done:
            raise KeyboardInterrupt
        return real(self, window)

    with monkeypatch.context() as m:
        m.setattr(Trainer, "train_step", interrupt)
        return _main(argv)


def test_resume_after_interrupt_is_exact(folder, chat_data, tmp_path, monkeypatch, capsys, uninterrupted):
    out = tmp_path / "out"
    # steps 1..6 done, checkpoint step-5 on disk
    assert run_interrupted(_argv(folder, chat_data, out, "--save-every", "5"), 6, monkeypatch) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "--resume" in err and "Traceback" not in err
    assert [r["step"] for r in step_records(out)] == [1, 2, 3, 4, 5, 6]
    # nothing looks finished: no adapter or summary at the top, only complete step-N checkpoints
    assert not (out / "adapter_model.safetensors").exists() and not (out / "adapter_config.json").exists()
    assert not (out / "summary.json").exists()
    assert [p.name for p in (out / "checkpoints").iterdir() if not p.name.startswith(".tmp-")] == ["step-5"]
    _assert_complete_checkpoints(out)
    step5 = out / "checkpoints" / "step-5"
    assert_same_tensors(adapter_tensors(step5), adapter_tensors(uninterrupted / "checkpoints" / "step-5"), 0.0)
    # the last checkpoint is a usable adapter
    assert cli.run(["generate", "--model", str(folder), "--adapter", str(step5), "--prompt", "hi",
                    "--max-new-tokens", "4"]) == 0

    assert cli.run(_argv(folder, chat_data, out, "--save-every", "5", "--resume")) == 0
    full, resumed = step_records(uninterrupted), step_records(out)
    assert [r["step"] for r in resumed] == list(range(1, 9))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in full]
    assert_same_tensors(adapter_tensors(out), adapter_tensors(uninterrupted), 0.0)


def test_interrupt_while_writing_a_checkpoint_leaves_only_a_tmp_folder(folder, chat_data, tmp_path, monkeypatch,
                                                                       uninterrupted):
    import leantune.train.checkpoint as ck

    out = tmp_path / "out"
    real = ck.save_file

    def dies_in_step_6(tensors, filename, *a, **k):
        if ".tmp-step-6-" in str(filename) and filename.endswith("optimizer.safetensors"):
            raise KeyboardInterrupt
        return real(tensors, filename, *a, **k)

    with monkeypatch.context() as m:
        m.setattr(ck, "save_file", dies_in_step_6)
        assert _main(_argv(folder, chat_data, out, "--save-every", "3")) == 130
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names[-1] == "step-3" and len(names) == 2 and names[0].startswith(".tmp-step-6-")
    _assert_complete_checkpoints(out)
    assert [p.name for p in ck.list_checkpoints(out)] == ["step-3"]

    assert cli.run(_argv(folder, chat_data, out, "--save-every", "3", "--resume")) == 0
    assert [r["loss"] for r in step_records(out)] == [r["loss"] for r in step_records(uninterrupted)]
    assert_same_tensors(adapter_tensors(out), adapter_tensors(uninterrupted), 0.0)
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".tmp-")]


# ---------------------------------------------------------------------------------------------
# generate, chat, merge


class Recorder(io.StringIO):
    """stdout that remembers each write, to see streaming."""

    def __init__(self):
        super().__init__()
        self.writes: list[str] = []

    def write(self, s):
        self.writes.append(s)
        return super().write(s)


def _generate(folder, capsys, *args) -> str:
    assert cli.run(["generate", "--model", str(folder), "--max-new-tokens", "12", *args]) == 0
    return capsys.readouterr().out


@pytest.fixture
def prompt_spy(monkeypatch):
    """Records the token ids of every prompt handed to generate_text."""
    import leantune.models.generate as mg

    calls: list[list[list[int]]] = []
    real = mg.generate_text

    def spy(model, tokenizer, prompts, *a, **k):
        calls.append([list(p) for p in prompts])
        return real(model, tokenizer, prompts, *a, **k)

    monkeypatch.setattr(mg, "generate_text", spy)
    return calls


def test_generate_one_prompt_streams(folder, monkeypatch):
    rec = Recorder()
    monkeypatch.setattr("sys.stdout", rec)
    (text,) = gen_recipe.generate(gen_recipe.GenerateConfig(model=str(folder), prompt=["Hello"], max_new_tokens=12))
    assert len(text) > 0 and rec.getvalue() == text + "\n"
    pieces = [w for w in rec.writes if w and w != "\n"]
    assert len(pieces) >= 2 and "".join(pieces) == text  # written as it was generated, not at the end


def test_generate_batch_equals_one_at_a_time(folder, capsys):
    prompts = ["Hello", "What is the capital of Veloria?", "Count."]
    singles = [_generate(folder, capsys, "--prompt", p).removesuffix("\n") for p in prompts]
    assert len(set(singles)) > 1
    batch = _generate(folder, capsys, *[x for p in prompts for x in ("--prompt", p)])
    assert batch == "".join(f"### {p}\n{t}\n\n" for p, t in zip(prompts, singles))


def test_generate_raw_skips_the_chat_template(folder, tok, capsys, prompt_spy):
    _generate(folder, capsys, "--prompt", "Hello", "--raw")
    _generate(folder, capsys, "--prompt", "Hello", "--system", "Be brief.")
    assert prompt_spy[0] == [tok.encode("Hello")]
    assert prompt_spy[1] == [tok.encode_chat([{"role": "system", "content": "Be brief."},
                                              {"role": "user", "content": "Hello"}], add_generation_prompt=True)]


def test_generate_stop_string_cuts_the_text(folder, capsys):
    full = _generate(folder, capsys, "--prompt", "Hello", "--max-new-tokens", "16").removesuffix("\n")
    assert len(full) >= 6
    stop = full[3:5]
    cut = full.find(stop)
    for prompts in (["Hello"], ["Hello", "Count."]):  # streamed and batched
        out = _generate(folder, capsys, *[x for p in prompts for x in ("--prompt", p)], "--stop", stop,
                        "--max-new-tokens", "16")
        first = out if len(prompts) == 1 else out.split("\n", 1)[1].split("\n\n### ")[0]
        assert first.removesuffix("\n") == full[:cut], prompts


def test_chat_keeps_history_and_resets(folder, tok, capsys, prompt_spy):
    cfg = gen_recipe.GenerateConfig(model=str(folder), max_new_tokens=6)
    gen_recipe.chat(cfg, stdin=io.StringIO("hi\n/reset\nhello\n/exit\nnever read\n"))
    out = capsys.readouterr().out
    user = lambda t: {"role": "user", "content": t}  # noqa: E731
    assert [c[0] for c in prompt_spy] == [tok.encode_chat([user("hi")], add_generation_prompt=True),
                                          tok.encode_chat([user("hello")], add_generation_prompt=True)]
    assert out.count("> ") == 4  # hi, /reset, hello, /exit

    prompt_spy.clear()
    gen_recipe.chat(cfg, stdin=io.StringIO("hi\nhello\n"))  # EOF ends it too
    reply = capsys.readouterr().out.split("> ")[1].removesuffix("\n")
    assert prompt_spy[1][0] == tok.encode_chat([user("hi"), {"role": "assistant", "content": reply}, user("hello")],
                                               add_generation_prompt=True)


def test_merge_writes_a_folder_transformers_loads(folder, trained, tok, tmp_path):
    merged = tmp_path / "merged"
    assert cli.run(["merge", "--model", str(folder), "--adapter", str(trained), "--output", str(merged)]) == 0
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in merged.iterdir()}
    assert not any("lora" in k for k in load_file(str(merged / "model.safetensors")))
    ids = torch.tensor([tok.encode("The capital of Veloria is Amberhold.")])
    ours, base = leantune_logits(folder, trained, ids)
    hf = transformers.AutoModelForCausalLM.from_pretrained(merged).eval()
    with torch.no_grad():
        theirs = hf(ids).logits
    assert (ours - base).abs().max().item() > 1e-3
    assert (ours - theirs).abs().max().item() <= 1e-4
    half = tmp_path / "merged-bf16"
    assert cli.run(["merge", "--model", str(folder), "--adapter", str(trained), "--output", str(half),
                    "--dtype", "bfloat16"]) == 0
    assert {t.dtype for t in load_file(str(half / "model.safetensors")).values()} == {torch.bfloat16}


# ---------------------------------------------------------------------------------------------
# --config and --help


def test_config_file_sets_options_and_flags_override(finetune, chat_data, tmp_path):
    yaml_file = tmp_path / "run.yaml"
    # 1e-3 is a string to YAML 1.1; the config reader still takes it as the float it means
    yaml_file.write_text("lr: 1e-3\nmax_steps: 3\nschedule: constant\nrank: 4\nbatch-size: 2\n")
    out = finetune(chat_data, "--config", yaml_file, "--lr", "0.03")
    recs = step_records(out)
    assert [r["lr"] for r in recs] == [0.03, 0.03, 0.03]  # the flag beats the file; the file's schedule holds
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4
    assert [r["epoch"] for r in recs] == [0, 0, 0]  # batches of 2 (with the default 4, step 3 is in epoch 1)
    out = finetune(chat_data, "--config", yaml_file, out="from-file")
    assert [r["lr"] for r in step_records(out)] == [1e-3] * 3


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_help_lists_every_option(command, capsys):
    with pytest.raises(SystemExit) as e:
        cli.run([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    mod, cls, _, _ = cli.COMMANDS[command]
    flags = ["--" + f.name.replace("_", "-") for f in options.cli_fields(cli._load(mod, cls))]
    if command == "finetune":  # and every registered method's options, in groups of their own
        flags += [o.flag for m in methods.list_methods() for o in methods.method_options(m)]
        assert "options of --method adalora:" in out and "options shared by several methods" in out
    missing = [f for f in flags + ["--config"] if f not in out]
    assert not missing and len(flags) >= 4


def test_streamed_text_holds_back_a_stop_string_split_across_tokens(capsys):
    stream = gen_recipe.StopStream(["END"])
    for delta in ["one t", "wo E", "N", "D three"]:
        stream(0, delta)
    assert capsys.readouterr().out == "one two "  # " E" and "N" were held back until they became "END"
    stream.finish("one two ")
    assert capsys.readouterr().out == "\n"
    plain = gen_recipe.StopStream([])
    plain(0, "a")
    plain(0, "b")
    assert capsys.readouterr().out == "ab"

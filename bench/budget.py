"""Benchmark (not a test): the SFT-vs-DPO budget experiment of "Balancing the Budget" (Raghavendra et al., ACL
2025) at toy scale, on the cold-start task of reference/methods-more.md §9 oracle (c).

The base: a random tiny Llama (2 layers, hidden 64) with a byte-level BPE tokenizer and a ChatML template,
pretrained here (`leantune finetune --method full`) to answer "What color is item i?" in its own sentence
("Item i is red.") for all 48 items, so it knows every item's color (seeded random, one of 4) but has never
written the answer format F = "Answer: Item i is <color>." (the tokenizer knows the word; the model never saw
it). It is built once and cached in --work.

The task: answer in F with the right color; scored on the 16 held-out items (never in the budget) by greedy
decoding (24 new tokens): accuracy = the reply is exactly F with the right color; format rate = exactly F with
any of the 4 colors. The base scores 0 on both and names the right color in its own sentence on every item.

The budget: a fixed number of examples (--budget, default 64; the paper fixes examples, not steps), drawn from
the 32 training items, split at SFT share s into round(s*budget) SFT rows (prompt -> F with the right color) and
the rest as preference pairs (chosen: F with the right color; rejected: alternately the base's own sentence and
F with a wrong color). Each cell is one or two ordinary `leantune finetune` runs (`leantune.cli.run`), full
finetuning (a LoRA on this 64-wide model could not learn the format's never-trained tokens in the budget):
  s = 0:     --objective dpo on the pairs from the base                  (DPO only; reference = the base)
  0 < s < 1: --objective sft on the SFT rows, then --objective dpo on the pairs from the SFT run's model
             (its reference = the SFT'd model, as `--sft-data` does; two runs so each phase has its own lr)
  s = 1:     --objective sft on all 64 rows                              (SFT only)
Every phase runs --phase-steps optimizer steps (default 48 = 6 epochs of 64 examples at batch 8), whatever its
number of examples: examples are the budget, each phase trains to the same step count on what it has (with the
same epochs instead, a 6-row warm-up gets 6 steps and learns nothing). A mixed cell therefore takes twice the
steps of a pure one. DPO's lr defaults to 1/30 of SFT's (at 3e-4 and above, DPO collapses this tiny model into
garbage within 48 steps).
Prints the CPU, the base's pi_ref(F) (answer_logps), a Markdown table, writes budget.csv, budget.md and
budget.png (leantune's dependency-free PNG canvas: no matplotlib here) to --out, and one JSON line. ~2-3 min on
2 busy cores for 5 seeds. `--shares 0,0.05,1` runs the cells of §9 oracle (c) (a 5% SFT warm-up; asserted at 3
seeds in tests/test_budget_claims.py).

    nice -n 19 .venv/bin/python bench/budget.py [--seeds 5] [--shares 0,0.1,0.25,0.5,1] [--budget 64] [--phase-steps 48] [--sft-lr 3e-3]
        [--dpo-lr 1e-4] [--beta 0.1] [--work DIR] [--out bench/results]
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

COLORS = ("red", "blue", "green", "black")
N_ITEMS, N_TRAIN_ITEMS = 48, 32  # items 32..47 are held out for evaluation
SHARES = (0.0, 0.1, 0.25, 0.5, 1.0)
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
QUIET = ("--dtype", "fp32", "--no-progress", "--eval-fraction", "0", "--report-to", "none")


def color_of(i: int) -> str:
    return COLORS[random.Random(1000 + i).randrange(len(COLORS))]


def question(i: int) -> str:
    return f"What color is item {i}?"


def base_style(i: int) -> str:
    return f"Item {i} is {color_of(i)}."


def in_format(i: int, color: str) -> str:
    return f"Answer: Item {i} is {color}."


def chat_row(q: str, a: str) -> dict:
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def run_cli(argv: list[str]) -> None:
    import contextlib

    from leantune import cli

    with contextlib.redirect_stdout(sys.stderr):  # the run's own report; stdout carries the benchmark's
        rc = cli.run([str(a) for a in argv])
    if rc != 0:
        raise SystemExit(f"leantune {' '.join(map(str, argv[:1]))} failed with {rc}: {argv}")


# ---------------------------------------------------------------------------------------------
# the base model


def build_base(work: Path, pretrain_epochs: int) -> Path:
    """The pretrained base folder, built once into work/base (reused when it is there)."""
    base = work / "base"
    if (base / "config.json").exists():
        print(f"reusing the pretrained base in {base}", file=sys.stderr)
        return base
    import transformers as tf
    import torch
    from tokenizers import Tokenizer as HFTok, decoders, models, pre_tokenizers, trainers

    from leantune.models.tokenizer import Tokenizer

    work.mkdir(parents=True, exist_ok=True)
    rows = [chat_row(question(i), base_style(i)) for i in range(N_ITEMS)]
    # the vocabulary knows the format's words (as a real tokenizer would); the model never trains on them
    texts = [json.dumps(r) for r in rows] + [in_format(0, c) for c in COLORS] + ["<|im_start|>user\n<|im_start|>assistant\n"]
    tk = HFTok(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(texts * 5, trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    cfg = tf.LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=None, eos_token_id=2,
                         pad_token_id=0)
    torch.manual_seed(0)
    tf.LlamaForCausalLM(cfg).save_pretrained(work / "init")
    Tokenizer(tk, chat_template=CHATML, bos_token=None, eos_token="<|im_end|>",
              pad_token="<|endoftext|>").save(work / "init")
    pre = write_jsonl(work / "pretrain.jsonl", rows)
    run_cli(["finetune", "--model", work / "init", "--data", pre, "--output", base, "--method", "full",
             "--lr", "3e-3", "--epochs", pretrain_epochs, "--batch-size", 8, "--warmup-steps", 5, "--seed", 0,
             *QUIET])
    return base


# ---------------------------------------------------------------------------------------------
# data for one cell


def budget_data(d: Path, budget: int, share: float, seed: int) -> tuple[str | None, str | None, int, int]:
    """(sft file or None, pairs file or None, n_sft, n_pairs): `budget` examples over the training items (each
    item as often as the budget allows, in a seeded order), the first round(share*budget) as SFT rows."""
    if d.exists():
        shutil.rmtree(d)  # a finished phase left here would be skipped as done
    rng = random.Random(seed)
    items = [i % N_TRAIN_ITEMS for i in range(budget)]
    rng.shuffle(items)
    from leantune.recipes.sweep import budget_split  # the split `leantune sweep --axis sft-share` makes

    n_sft, n_pairs = budget_split(budget, share)
    sft_items, pair_items = items[:n_sft], items[n_sft:n_sft + n_pairs]
    d.mkdir(parents=True, exist_ok=True)
    sft = write_jsonl(d / "sft.jsonl", [chat_row(question(i), in_format(i, color_of(i))) for i in sft_items]) \
        if sft_items else None
    pairs = []
    for k, i in enumerate(pair_items):
        if k % 2 == 0:
            rejected = base_style(i)  # the base's own sentence: right color, wrong format
        else:
            rejected = in_format(i, rng.choice([c for c in COLORS if c != color_of(i)]))  # right format, wrong color
        pairs.append({"prompt": [{"role": "user", "content": question(i)}],
                      "chosen": [{"role": "assistant", "content": in_format(i, color_of(i))}],
                      "rejected": [{"role": "assistant", "content": rejected}]})
    return sft, (write_jsonl(d / "pairs.jsonl", pairs) if pairs else None), n_sft, len(pairs)


def train_cell(base: Path, d: Path, args, share: float, seed: int) -> tuple[Path, dict]:
    """One cell: an SFT run on the SFT rows (if any) from the base, then a DPO run on the pairs (if any) from the
    SFT run's model, which is therefore DPO's reference (full finetuning: the reference log-probs are the model's
    as DPO starts, precomputed). Two `leantune finetune` runs rather than one `--sft-data` run so that each phase
    has its own lr (one run's phases share --lr). Returns (the final model folder, info)."""
    sft, pairs, n_sft, n_pairs = budget_data(d, args.budget, share, seed)
    common = ["--method", "full", "--max-steps", args.phase_steps, "--batch-size", args.batch, "--warmup-steps", 0,
              "--seed", seed, *QUIET]
    model, argvs = base, []
    t = time.perf_counter()
    if sft is not None:
        argvs.append(["finetune", "--objective", "sft", "--model", model, "--data", sft, "--output", d / "sft",
                      "--lr", args.sft_lr, *common])
        run_cli(argvs[-1])
        model = d / "sft"
    if pairs is not None:
        argvs.append(["finetune", "--objective", "dpo", "--model", model, "--data", pairs, "--output", d / "dpo",
                      "--lr", args.dpo_lr, "--beta", args.beta, *common])
        run_cli(argvs[-1])
        model = d / "dpo"
    return model, {"n_sft": n_sft, "n_pairs": n_pairs, "train_s": time.perf_counter() - t,
                   "commands": [" ".join(map(str, a)) for a in argvs]}


# ---------------------------------------------------------------------------------------------
# evaluation


def evaluate(model_dir: Path, items: list[int]) -> dict:
    """Greedy replies to the held-out questions: accuracy (exactly F with the right color), format rate (F with
    any color), and the base-knowledge rate (the right color word anywhere in the reply, any format)."""
    import torch

    from leantune.models.generate import GenerationConfig, generate_text
    from leantune.precision import resolve_precision
    from leantune.recipes.generate import load_with_adapter

    model, tok = load_with_adapter(str(model_dir), [], resolve_precision("fp32", "cpu"))
    model.eval()
    prompts = [tok.apply_chat_template([{"role": "user", "content": question(i)}], add_generation_prompt=True)
               for i in items]
    with torch.no_grad():
        replies = generate_text(model, tok, prompts, GenerationConfig(max_new_tokens=24, temperature=0.0))
    replies = [r.strip() for r in replies]
    fmt = [any(r == in_format(i, c) for c in COLORS) for r, i in zip(replies, items)]
    acc = [r == in_format(i, color_of(i)) for r, i in zip(replies, items)]
    knows = [color_of(i) in r.split() or color_of(i) + "." in r.split() for r, i in zip(replies, items)]
    n = len(items)
    return {"accuracy": sum(acc) / n, "format": sum(fmt) / n, "color_anywhere": sum(knows) / n,
            "examples": replies[:3]}


def answer_logps(model_dir: Path, items: list[int]) -> dict:
    """Mean over `items` of the model's sequence log-probability (sum over the answer's tokens, as DPO counts
    it, leantune.train.dpo.sequence_logps) of the right answer in format F and of the base's own sentence, and
    the largest probability any item's F answer gets: the measure of "the model never emits F" (pi_ref(F) ~ 0)."""
    import math

    import torch

    from leantune.data import pad_batch
    from leantune.data.formats import Example, prompt_reply_ids
    from leantune.precision import resolve_precision
    from leantune.recipes.generate import load_with_adapter
    from leantune.train.dpo import sequence_logps

    model, tok = load_with_adapter(str(model_dir), [], resolve_precision("fp32", "cpu"))
    model.eval()

    def logps(answer) -> list[float]:
        exs = [Example(*prompt_reply_ids(question(i), answer(i), tok, "<toy>")) for i in items]
        with torch.no_grad():
            return sequence_logps(model, pad_batch(exs, tok.pad_id)).tolist()  # (len(items),)

    f, own = logps(lambda i: in_format(i, color_of(i))), logps(base_style)
    return {"logp_format": statistics.mean(f), "logp_own": statistics.mean(own),
            "max_p_format": max(math.exp(v) for v in f)}


# ---------------------------------------------------------------------------------------------
# outputs


def plot(rows: list[dict], base_acc: float, path: Path, shares=SHARES) -> None:
    """Accuracy (blue) and format rate (red) vs SFT share: per-seed dots and the mean line; the base's accuracy
    dashed. Pillow draws it where it is installed (no matplotlib here); else leantune's own PNG canvas, whose
    3x5 font has no title letters."""
    w, h, left, right, top, bottom = 640, 400, 64, 24, 40, 56
    grey, black, blue, red = (210, 210, 210), (0, 0, 0), (30, 80, 220), (220, 40, 40)

    def xy(share, v):
        return (round(left + share * (w - left - right)), round(h - bottom - v * (h - top - bottom)))

    try:
        from PIL import Image, ImageDraw, ImageFont
    except ImportError:
        Image = None
    if Image is not None:
        img = Image.new("RGB", (w, h), "white")
        g = ImageDraw.Draw(img)
        font = ImageFont.load_default(size=14)
        line = lambda x0, y0, x1, y1, rgb, width=1: g.line((x0, y0, x1, y1), fill=rgb, width=width)  # noqa: E731
        dot = lambda x, y, rgb, r: g.ellipse((x - r, y - r, x + r, y + r), fill=rgb)  # noqa: E731
        text = lambda x, y, s, rgb=black: g.text((x, y), s, fill=rgb, font=font)  # noqa: E731
    else:
        from leantune.train.plot import Canvas

        c = Canvas(w, h)

        def line(x0, y0, x1, y1, rgb, width=1):
            for off in range(-(width // 2), width // 2 + 1):
                c.line(x0, y0 + off, x1, y1 + off, rgb)

        dot = lambda x, y, rgb, r: c.dot(x, y, rgb, r=r)  # noqa: E731
        text = lambda x, y, s, rgb=black: c.text(x, y, s, rgb)  # noqa: E731
    for k in range(6):
        _, y = xy(0, k / 5)
        line(left, y, w - right, y, grey)
        text(22, y - 8, f"{k / 5:.1f}")
    for s in shares:
        x, _ = xy(s, 0)
        line(x, top, x, h - bottom, grey)
        text(x - 10, h - bottom + 6, f"{s:g}")
    line(left, h - bottom, w - right, h - bottom, black)
    line(left, top, left, h - bottom, black)
    text(left + 170, h - 26, f"SFT share of the {rows[0]['n_sft'] + rows[0]['n_pairs']}-example budget")
    text(left, 10, "held-out accuracy (blue), format rate (red); dots: seeds; dashed: base accuracy")
    _, yb = xy(0, base_acc)
    for x in range(left, w - right, 10):
        line(x, yb, min(x + 4, w - right), yb, black)
    for key, rgb in (("format", red), ("accuracy", blue)):
        means = [statistics.mean(r[key] for r in rows if r["share"] == s) for s in shares]
        pts = [xy(s, m) for s, m in zip(shares, means)]
        for (xa, ya), (xb, yb2) in zip(pts, pts[1:]):
            line(xa, ya, xb, yb2, rgb, width=3)
        for r in rows:
            x, y = xy(r["share"], r[key])
            dot(x + (4 if key == "accuracy" else -4), y, rgb, 3)
    if Image is not None:
        img.save(path, optimize=True)
    else:
        path.write_bytes(c.png())


def table(rows: list[dict], seeds: list[int], shares=SHARES) -> str:
    lines = ["| SFT share | SFT rows | pairs | accuracy (mean) | per seed | format rate (mean) | train s (mean) |",
             "|---|---|---|---|---|---|---|"]
    for s in shares:
        rs = [r for r in rows if r["share"] == s]
        per_seed = " / ".join(f"{r['accuracy']:.3f}" for r in rs)
        lines.append(f"| {s:g} | {rs[0]['n_sft']} | {rs[0]['n_pairs']} | "
                     f"{statistics.mean(r['accuracy'] for r in rs):.3f} | {per_seed} | "
                     f"{statistics.mean(r['format'] for r in rs):.3f} | "
                     f"{statistics.mean(r['train_s'] for r in rs):.1f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budget", type=int, default=64, help="examples per cell (SFT rows + preference pairs)")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--shares", type=lambda v: [float(x) for x in v.split(",")], default=list(SHARES),
                    help="SFT shares, comma-separated (0,0.05,1: the cells of §9 oracle (c), a 5%% warm-up)")
    ap.add_argument("--phase-steps", type=int, default=48,
                    help="optimizer steps of each phase (SFT, DPO), whatever its number of examples")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--sft-lr", type=float, default=3e-3)
    ap.add_argument("--dpo-lr", type=float, default=1e-4)
    ap.add_argument("--beta", type=float, default=0.1, help="DPO beta")
    ap.add_argument("--pretrain-epochs", type=int, default=60)
    ap.add_argument("--work", default=None, help="folder for the base (reused) and the runs (default: a temp dir)")
    ap.add_argument("--out", default="bench/results", help="where budget.csv/.md/.png go")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from leantune.precision import cpu_info

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    cpu = cpu_info()
    print(f"cpu: {cpu.describe()}", flush=True)
    t0 = time.perf_counter()
    tmp = None
    if args.work is None:
        tmp = tempfile.TemporaryDirectory()
        args.work = tmp.name
    work = Path(args.work)
    base = build_base(work, args.pretrain_epochs)
    held = list(range(N_TRAIN_ITEMS, N_ITEMS))
    base_eval = evaluate(base, held)
    base_eval.update(answer_logps(base, held))
    print(f"base on held-out items: accuracy {base_eval['accuracy']:.3f}, format {base_eval['format']:.3f}, "
          f"right color in its reply {base_eval['color_anywhere']:.3f}; e.g. {base_eval['examples']}",
          file=sys.stderr, flush=True)
    rows = []
    seeds = list(range(args.seeds))
    for seed in seeds:
        for share in args.shares:
            out, info = train_cell(base, work / f"s{share:g}_seed{seed}", args, share, seed)
            ev = evaluate(out, held)
            rows.append({"share": share, "seed": seed, **info, **ev})
            print(f"share {share:g} seed {seed}: {info['n_sft']} SFT rows + {info['n_pairs']} pairs, accuracy "
                  f"{ev['accuracy']:.3f}, format {ev['format']:.3f} ({info['train_s']:.0f} s); e.g. {ev['examples']}",
                  file=sys.stderr, flush=True)
    outdir = Path(args.out)
    outdir.mkdir(parents=True, exist_ok=True)
    keys = ("share", "seed", "n_sft", "n_pairs", "accuracy", "format", "color_anywhere", "train_s")
    with open(outdir / "budget.csv", "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(keys)
        for r in rows:
            wr.writerow([f"{r[k]:.3f}" if isinstance(r[k], float) else r[k] for k in keys])
    md = table(rows, seeds, args.shares)
    header = (f"budget {args.budget} examples over {N_TRAIN_ITEMS} training items, "
              f"{len(held)} held-out items, full finetuning, SFT lr {args.sft_lr}, DPO lr {args.dpo_lr} beta {args.beta}, batch {args.batch}, {args.phase_steps} steps per "
              f"phase, seeds {seeds}; base: accuracy {base_eval['accuracy']:.3f}, format {base_eval['format']:.3f}, "
              f"right color in its own sentence {base_eval['color_anywhere']:.3f}; log pi_ref(F) "
              f"{base_eval['logp_format']:.1f} (own sentence {base_eval['logp_own']:.2f}), max pi_ref(F) "
              f"{base_eval['max_p_format']:.1e}")
    (outdir / "budget.md").write_text(f"cpu: {cpu.describe()}\n" + header + "\n\n" + md + "\n")
    plot(rows, base_eval["accuracy"], outdir / "budget.png", args.shares)
    print(header)
    print(md)
    print(json.dumps({"bench": "budget", "cpu": cpu.as_dict(), "budget": args.budget, "phase_steps": args.phase_steps,
                      "sft_lr": args.sft_lr, "dpo_lr": args.dpo_lr, "beta": args.beta, "batch": args.batch, "seeds": seeds, "held_out": len(held),
                      "base": {k: base_eval[k] for k in ("accuracy", "format", "color_anywhere", "logp_format",
                                                          "logp_own", "max_p_format")},
                      "cells": [{k: r[k] for k in keys} for r in rows],
                      "seconds": time.perf_counter() - t0}))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()

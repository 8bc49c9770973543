"""Benchmark: one LoRA training step, leantune vs transformers + PEFT, on SmolLM2-135M-Instruct (CPU, fp32).

Same work on both sides: batch 2 x 128 random tokens, loss on every token, LoRA r=8 alpha=16 on all
linear layers, AdamW. Each side runs in its own subprocess (clean peak-RSS accounting); the driver
prints a table, the ratio and one JSON line.

    .venv/bin/python bench/lora_step.py [--steps 6] [--batch 2] [--seq 128]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_folder(path: Path) -> None:
    """Write SmolLM2 as a plain HF folder (fp32) with leantune's own writer, for the peer to load."""
    import leantune

    model, tok = leantune.load(None)
    leantune.save_hf_folder(model, tok, path)


def run_leantune(folder: str, args) -> dict:
    import torch

    import leantune
    from leantune.data import Batch
    from leantune.train.loss import lm_loss_sum

    model, _ = leantune.load(folder)
    leantune.apply(model, "lora", r=args.rank, alpha=2 * args.rank, targets="all-linear")
    if args.compile:
        from leantune.train import compile_blocks

        compile_blocks(model)  # compiles during the warm-up steps
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(args.seq).expand(args.batch, -1)
    batch = Batch(ids, ids.clone(), pos, None, ids.numel() - args.batch, ids.numel())

    def step():
        loss, n = lm_loss_sum(model, batch)
        (loss / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss) / n

    return timed(step, args, sum(p.numel() for p in params))


def run_peer(folder: str, args) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    return timed(step, args, sum(p.numel() for p in params))


def timed(step, args, n_trainable: int) -> dict:
    import torch

    torch.manual_seed(0)
    base = rss_mib()
    times, losses = [], []
    for i in range(args.warmup + args.steps):
        t = time.perf_counter()
        losses.append(step())
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    med = statistics.median(times)
    return {"median_step_s": med, "tokens_per_s": args.batch * args.seq / med, "peak_rss_mib": peak_rss_mib(),
            "rss_before_steps_mib": base, "step_peak_growth_mib": peak_rss_mib() - base,
            "first_loss": losses[0], "trainable": n_trainable}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile leantune's decoder blocks (opt-in; ~1 min compile in the warm-up)")
    ap.add_argument("--worker", choices=["leantune", "peer"])
    ap.add_argument("--folder")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    if args.worker:
        fn = run_leantune if args.worker == "leantune" else run_peer
        print(json.dumps(fn(args.folder, args)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "smollm2"
        make_folder(folder)
        res = {}
        for who in ("leantune", "peer"):
            cmd = [sys.executable, __file__, "--worker", who, "--folder", str(folder)] + [
                f"--{k}={getattr(args, k)}" for k in ("steps", "warmup", "batch", "seq", "rank")] + (
                ["--compile"] if args.compile and who == "leantune" else [])
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            res[who] = json.loads(out.strip().splitlines()[-1])
    lt, pr = res["leantune"], res["peer"]
    print(f"LoRA step, SmolLM2-135M fp32, batch {args.batch}x{args.seq}, r={args.rank} all-linear, "
          f"{torch.get_num_threads()} threads, median of {args.steps} after {args.warmup} warm-up"
          + (", leantune blocks compiled" if args.compile else ""))
    print(f"{'':<22}{'leantune':>12}{'transformers+PEFT':>20}{'ratio':>8}")
    for key, label in (("median_step_s", "step time (s)"), ("tokens_per_s", "tokens/s"),
                       ("peak_rss_mib", "peak RSS (MiB)"), ("step_peak_growth_mib", "step RSS growth (MiB)"),
                       ("first_loss", "first loss")):
        print(f"{label:<22}{lt[key]:>12.3f}{pr[key]:>20.3f}{lt[key] / pr[key]:>8.2f}")
    print(json.dumps({"bench": "lora_step", "leantune": lt, "peer": pr,
                      "time_ratio": lt["median_step_s"] / pr["median_step_s"],
                      "memory_ratio": lt["peak_rss_mib"] / pr["peak_rss_mib"], "compile": args.compile}))


if __name__ == "__main__":
    main()

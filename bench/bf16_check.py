"""Correctness of `--dtype bf16` (a measurement, not a test): how far a bf16 run's loss curve strays from the
fp32 run of the same work, for leantune and for the peer, on the same batches.

SmolLM2-135M-Instruct (an fp32 HF folder both sides load), chat SFT on chatterbot-corpus pairs (the data
of bench/methods.py), LoRA r=8 alpha=16 on all linear layers, AdamW, constant lr, the same batches in the
same order on every run (leantune's tokenization and padding; the peer gets them as input_ids +
attention_mask + labels). Four runs:

- leantune fp32, and leantune bf16 (`load_model` at bf16: the frozen base in bf16, fp32 adapters,
  optimizer state and loss);
- transformers + PEFT in fp32, and under `torch.autocast("cpu", dtype=torch.bfloat16)` (its bf16 mode).

It prints each step's losses, and per side the largest and the mean |bf16 - fp32| loss gap; leantune's
bf16 is as right as the peer's when its gap is no larger than the peer's. On a CPU without native bf16
(AVX2) bf16 GEMMs are ~75x slower than fp32 (bench/gemm.py) and leantune's bf16 run took 3x its fp32 run's
time at --steps 8 --batch 2: keep --steps small there.

    .venv/bin/python bench/bf16_check.py [--steps 12] [--batch 2] [--max-length 96] [--lr 5e-4]

Needs: .venv/bin/pip install --no-deps -r bench/requirements-methods.txt
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import methods_data  # noqa: E402


def make_batches(folder: Path, tmp: Path, args) -> list:
    from leantune.data import batches_for_epoch, load_dataset
    from leantune.models.tokenizer import Tokenizer

    train, _ = methods_data.write_chat_split(tmp / "data", args.batch * args.steps, 8, seed=0)
    examples = load_dataset(str(train), Tokenizer.from_folder(folder), args.max_length, on_too_long="truncate")
    return batches_for_epoch(examples, args.batch, 0, 0, pack=False, max_length=args.max_length)[:args.steps]


def run_leantune(folder: Path, batches: list, dtype: str, args) -> list[float]:
    import torch

    import leantune
    from leantune.models.loader import load_model
    from leantune.precision import resolve_precision
    from leantune.train.loss import lm_loss_sum

    model, _ = load_model(folder, resolve_precision(dtype, "cpu"))
    torch.manual_seed(0)
    leantune.apply(model, "lora", r=args.rank, alpha=2 * args.rank, targets="all-linear")
    return train(model, batches, args, lambda b: lm_loss_sum(model, b))


def run_peer(folder: Path, batches: list, autocast: bool, args) -> list[float]:
    import contextlib

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.config.use_cache = False
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))

    def loss_of(b):
        lens = b.positions.amax(dim=1, keepdim=True) + 1  # right-padded rows: positions 0.. then 0
        mask = (torch.arange(b.input_ids.shape[1]) < lens).long()
        with torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext():
            loss = model(input_ids=b.input_ids, attention_mask=mask, labels=b.labels).loss
        return loss.float() * b.num_loss_tokens, b.num_loss_tokens

    return train(model, batches, args, loss_of)


def train(model, batches: list, args, loss_of) -> list[float]:
    import torch

    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    losses = []
    for b in batches:
        loss_sum, n = loss_of(b)
        (loss_sum / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss_sum.detach()) / n)
    return losses


def gaps(a: list[float], b: list[float]) -> dict:
    d = [abs(x - y) for x, y in zip(a, b)]
    return {"max_gap": max(d), "mean_gap": statistics.mean(d)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=96)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--rank", type=int, default=8)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    import leantune
    from leantune.precision import cpu_info

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    runs, secs = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "smollm2"
        model, tok = leantune.load(None)
        leantune.save_hf_folder(model, tok, folder)
        del model
        batches = make_batches(folder, Path(tmp), args)
        for name, fn in (("leantune fp32", lambda: run_leantune(folder, batches, "fp32", args)),
                         ("leantune bf16", lambda: run_leantune(folder, batches, "bf16", args)),
                         ("peer fp32", lambda: run_peer(folder, batches, False, args)),
                         ("peer autocast-bf16", lambda: run_peer(folder, batches, True, args))):
            t = time.perf_counter()
            runs[name] = fn()
            secs[name] = time.perf_counter() - t
            print(f"{name}: {len(runs[name])} steps in {secs[name]:.0f} s", file=sys.stderr, flush=True)
    ours = gaps(runs["leantune bf16"], runs["leantune fp32"])
    peer = gaps(runs["peer autocast-bf16"], runs["peer fp32"])
    print(f"cpu: {cpu_info().describe()}")
    print(f"SmolLM2-135M LoRA r={args.rank} all-linear, chat SFT, batch {args.batch}, max_length {args.max_length}, "
          f"lr {args.lr}, {args.steps} steps, same batches on every run")
    print(f"{'step':>4}" + "".join(f"{k:>20}" for k in runs))
    for i in range(args.steps):
        print(f"{i + 1:>4}" + "".join(f"{v[i]:>20.4f}" for v in runs.values()))
    print(f"|bf16 - fp32| loss gap: leantune max {ours['max_gap']:.4f} mean {ours['mean_gap']:.4f}; "
          f"peer max {peer['max_gap']:.4f} mean {peer['mean_gap']:.4f}")
    print(json.dumps({"bench": "bf16_check", "cpu": cpu_info().as_dict(), "losses": runs, "seconds": secs,
                      "leantune_gap": ours, "peer_gap": peer, "steps": args.steps, "batch": args.batch,
                      "max_length": args.max_length, "lr": args.lr}))


if __name__ == "__main__":
    main()

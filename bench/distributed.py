"""Benchmark: `leantune finetune` on 1 process vs 2 (torchrun, gloo, DDP and FSDP2) on SmolLM2-135M LoRA, CPU.

Each run is the real command on the embedded default model (fp32, LoRA r=8 on all linears, --batch-size 4 global
rows of synthetic chat ~100 tokens, --max-steps STEPS, one thread per process). Reported per run: tokens/s over
the whole run (rank 0's metrics.jsonl: every rank's tokens, first step included) and rank 0's peak RSS (ranks are
symmetric but for rank 0's file writes).

Communication share, from timers: a 1-process run on batch_size/2 rows does one rank's compute with no
collective; a 2-rank step that takes T2 against that run's T1/2 spends (T2 - T1/2) / T2 outside its own compute
(all-reduce / all-gather / reduce-scatter, and, on a 2-core machine, the two processes contending for the cores).

    .venv/bin/python bench/distributed.py [--steps 8] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(tmp: Path, name: str, nproc: int, batch: int, steps: int, extra=()) -> dict:
    out = tmp / name
    args = ["finetune", "--data", str(tmp / "data.jsonl"), "--output", str(out), "--batch-size", str(batch),
            "--max-steps", str(steps), "--dtype", "fp32", "--max-length", "256", "--eval-fraction", "0",
            "--no-progress", "--report-to", "none", "--targets", "all-linear", "--rank", "8", *extra]
    launch = ([sys.executable, "-m", "leantune"] if nproc == 1 else
              [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master-port",
               str(_port()), "-m", "leantune"])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    p = subprocess.run(launch + args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if p.returncode != 0:
        raise SystemExit(f"{name} failed:\n{p.stderr[-3000:]}")
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    recs = [r for r in recs if "loss" in r]
    last = recs[-1]
    return {"run": name, "nproc": nproc, "batch": batch, "steps": len(recs), "tokens_per_s": last["tokens_per_s"],
            "s_per_step": last["tokens"] / last["tokens_per_s"] / len(recs),
            "peak_rss_mib_rank0": last.get("peak_memory_mb"), "final_loss": last["loss"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        rows = [{"messages": [{"role": "user", "content": f"Question {i}: " + "tell me about the weather " * 4},
                              {"role": "assistant", "content": f"Answer {i}: " + "it is sunny and warm today. " * 5}]}
                for i in range(64)]
        (tmp / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        res = [run(tmp, "1 process", 1, 4, a.steps), run(tmp, "1 process, half batch", 1, 2, a.steps),
               run(tmp, "2 ranks ddp", 2, 4, a.steps, ["--parallel", "ddp"]),
               run(tmp, "2 ranks fsdp", 2, 4, a.steps, ["--parallel", "fsdp"])]
    half = res[1]["s_per_step"]
    for r in res[2:]:
        r["comm_share"] = (r["s_per_step"] - half) / r["s_per_step"]
        r["speedup_vs_1"] = r["tokens_per_s"] / res[0]["tokens_per_s"]
    print(f"{'run':24}{'tok/s':>9}{'s/step':>9}{'RSS MiB r0':>12}{'comm share':>12}{'vs 1 proc':>11}")
    for r in res:
        print(f"{r['run']:24}{r['tokens_per_s']:9.1f}{r['s_per_step']:9.2f}{r['peak_rss_mib_rank0'] or 0:12.0f}"
              f"{r.get('comm_share', float('nan')):12.2f}{r.get('speedup_vs_1', float('nan')):11.2f}")
    if a.json:
        print(json.dumps({"bench": "distributed", "cpu_count": os.cpu_count(), "runs": res}))


if __name__ == "__main__":
    main()

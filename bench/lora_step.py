"""Benchmark: one LoRA or QLoRA training step on SmolLM2-135M, leantune vs transformers + PEFT (+ bnb).

SmolLM2-135M-Instruct (the embedded default, written out as an fp32 HF folder both sides load), on the CPU.

Same work on both sides: batch 2 x 128 random tokens, loss on every token, LoRA r=8 alpha=16 on all
linear layers, AdamW. `--method qlora` loads the base with its decoder linears in NF4 + double
quantization: leantune `load_model(path, precision, quantize="nf4")` vs transformers'
`BitsAndBytesConfig(load_in_4bit=True, nf4, double quant)` on bitsandbytes' CPU backend; both quantize
the same fp32 weights to the same codes, so the first losses agree.

Precision: leantune runs at `--dtype` (auto: bf16 on a CPU with AVX512_BF16/AMX, else fp32; see
leantune.precision). The peer is measured in its two modes, so a ratio is always against the best it does
on this machine: `peer` in fp32, and `peer-autocast`, fp32 weights under
`torch.autocast("cpu", torch.bfloat16)` (bnb compute dtype bf16 for QLoRA). The autocast anchor runs by
default only where bf16 is native (`--anchors` chooses): elsewhere its bf16 GEMMs are ~75x slower
(bench/gemm.py) and it is never the best.

Each side runs in its own subprocess (clean peak-RSS accounting, load included); the driver prints the
CPU, a table, the ratios and one JSON line.

    .venv/bin/python bench/lora_step.py [--method lora|qlora] [--dtype auto] [--steps 6] [--batch 2] [--seq 128]
        [--clock cpu] [--anchors auto|fp32|autocast|both]
"""
from __future__ import annotations

import argparse
import json
import os
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
    """This process's own RSS high-water mark (VmHWM). Not getrusage's ru_maxrss: Linux carries the
    parent's peak into a child across fork + exec, which would credit the driver's model load to both sides."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


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

    from leantune.models.loader import load_model
    from leantune.precision import resolve_precision

    t0 = time.perf_counter()
    precision = resolve_precision(args.dtype, "cpu")
    model, _ = load_model(folder, precision, quantize="nf4" if args.method == "qlora" else None)
    load = {"load_s": time.perf_counter() - t0, "load_peak_rss_mib": peak_rss_mib()}
    leantune.apply(model, args.method, r=args.rank, alpha=2 * args.rank, targets="all-linear")
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

    return {**timed(step, args, sum(p.numel() for p in params)), **load, "precision": precision.name}


def run_peer(folder: str, args, autocast: bool = False) -> dict:
    import contextlib

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    kw = {}
    if args.method == "qlora":
        from transformers import BitsAndBytesConfig

        kw = {"quantization_config": BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if autocast else torch.float32), "device_map": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kw)
    load = {"load_s": time.perf_counter() - t0, "load_peak_rss_mib": peak_rss_mib()}
    model.config.use_cache = False
    targets = {"target_modules": "all-linear"}
    if getattr(model.config, "num_local_experts", 0) or getattr(model.config, "num_experts", 0):
        # PEFT's all-linear would adapt the router and not the experts (3-D parameters, not Linears); leantune's
        # adapts attention and the experts (PEFT's target_parameters layout): the same work, spelled out
        targets = {"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
                   "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]}
    model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, task_type="CAUSAL_LM",
                                             **targets))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext():
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    return {**timed(step, args, sum(p.numel() for p in params)), **load,
            "precision": "autocast-bf16" if autocast else "fp32"}


def timed(step, args, n_trainable: int) -> dict:
    import torch

    torch.manual_seed(0)
    base = rss_mib()
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    times, losses = [], []
    for i in range(args.warmup + args.steps):
        t = clock()
        losses.append(step())
        if i >= args.warmup:
            times.append(clock() - t)
    med = statistics.median(times)
    return {"median_step_s": med, "tokens_per_s": args.batch * args.seq / med, "peak_rss_mib": peak_rss_mib(),
            "rss_before_steps_mib": base, "step_peak_growth_mib": peak_rss_mib() - base,
            "first_loss": losses[0], "trainable": n_trainable}


WORKERS = {"leantune": run_leantune, "peer": run_peer,
           "peer-autocast": lambda folder, args: run_peer(folder, args, autocast=True)}
ROWS = (("median_step_s", "step time (s)"), ("tokens_per_s", "tokens/s"), ("peak_rss_mib", "peak RSS (MiB)"),
        ("step_peak_growth_mib", "step RSS growth (MiB)"), ("load_s", "load time (s)"),
        ("load_peak_rss_mib", "load peak RSS (MiB)"), ("first_loss", "first loss"))


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--method", choices=["lora", "qlora"], default="lora",
                    help="qlora: NF4 + double-quant base (bitsandbytes on the peer side)")
    ap.add_argument("--dtype", default="auto", help="leantune's precision: auto, fp32 or bf16")
    ap.add_argument("--anchors", choices=["auto", "fp32", "autocast", "both"], default="auto",
                    help="which peer modes to run (auto: both where bf16 is native, fp32 elsewhere)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: time steps by this process's CPU time, which other jobs on a shared machine disturb "
                         "far less than wall time (use with BENCH_THREADS=1: idle-spinning threads count as CPU)")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile leantune's decoder blocks (opt-in; ~1 min compile in the warm-up)")
    ap.add_argument("--worker", choices=list(WORKERS))
    ap.add_argument("--folder")
    return ap.parse_args()


def peers_to_run(anchors: str, native_bf16: bool) -> list[str]:
    if anchors == "auto":
        anchors = "both" if native_bf16 else "fp32"
    return {"fp32": ["peer"], "autocast": ["peer-autocast"], "both": ["peer", "peer-autocast"]}[anchors]


def check_same_work(lt: dict, peers: dict) -> None:
    """Same weights, codes and data: the first losses agree to the rounding of the precisions in play."""
    for name, pr in peers.items():
        exact = lt["precision"] == "fp32" and pr["precision"] == "fp32"
        tol = 1e-3 if exact else 2e-2
        if abs(lt["first_loss"] - pr["first_loss"]) > tol * abs(pr["first_loss"]):
            raise SystemExit(f"first losses differ ({lt['first_loss']:.5f} vs {name} {pr['first_loss']:.5f}): "
                             "the two sides are not doing the same work")


def main() -> None:
    args = parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from leantune.precision import cpu_info

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    if args.worker:
        print(json.dumps(WORKERS[args.worker](args.folder, args)))
        return
    cpu = cpu_info()
    who_runs = ["leantune"] + peers_to_run(args.anchors, cpu.native_bf16)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "smollm2"
        make_folder(folder)
        res = {}
        for who in who_runs:
            cmd = [sys.executable, __file__, "--worker", who, "--folder", str(folder)] + [
                f"--{k}={getattr(args, k)}" for k in ("method", "dtype", "steps", "warmup", "batch", "seq", "rank",
                                                      "clock")] + (
                ["--compile"] if args.compile and who == "leantune" else [])
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            res[who] = json.loads(out.strip().splitlines()[-1])
    lt = res.pop("leantune")
    check_same_work(lt, res)
    best = min(res, key=lambda k: res[k]["median_step_s"])  # the peer's fastest mode on this machine
    qlora = args.method == "qlora"
    peer_name = "transformers+PEFT+bnb" if qlora else "transformers+PEFT"
    print(f"cpu: {cpu.describe()}")
    print(f"{'QLoRA (NF4+DQ base)' if qlora else 'LoRA'} step, SmolLM2-135M, leantune {lt['precision']}, "
          f"batch {args.batch}x{args.seq}, r={args.rank} all-linear, {torch.get_num_threads()} threads, median of "
          f"{args.steps} after {args.warmup} warm-up, {args.clock} clock"
          + (", leantune blocks compiled" if args.compile else ""))
    print(f"peer: {peer_name}; " + ", ".join(f"{k} = {v['precision']}" for k, v in res.items()) + f"; best: {best}")
    print(f"{'':<22}{'leantune':>12}" + "".join(f"{k:>16}{'ratio':>8}" for k in res))
    for key, label in ROWS:
        print(f"{label:<22}{lt[key]:>12.3f}" + "".join(f"{pr[key]:>16.3f}{lt[key] / pr[key]:>8.2f}"
                                                     for pr in res.values()))
    ratios = {k: {"time_ratio": lt["median_step_s"] / v["median_step_s"],
                  "memory_ratio": lt["peak_rss_mib"] / v["peak_rss_mib"]} for k, v in res.items()}
    print(json.dumps({"bench": "qlora_step" if qlora else "lora_step", "cpu": cpu.as_dict(), "leantune": lt,
                      **res, "ratios": ratios, "best_peer": best, "time_ratio": ratios[best]["time_ratio"],
                      "memory_ratio": ratios[best]["memory_ratio"], "compile": args.compile,
                      "threads": torch.get_num_threads(), "clock": args.clock}))


if __name__ == "__main__":
    main()

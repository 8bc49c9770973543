"""The serving engine: one loop that batches every running request and trains fine-tuning jobs in it.

Each iteration (FlexLLM's order, inference first):

1. run queued commands (new requests, aborts, adapter loads/unloads, job changes) — the only place the
   model tree changes, so no forward ever sees a half-loaded adapter;
2. the scheduler plans the step's inference tokens (decodes, prefill chunks) within the token budget;
3. the active fine-tuning job gets a forward chunk from the leftover budget;
4. one packed forward (`runner.step`) over all of it, rows routed to their adapters by slot;
5. sampling, detokenization, stop checks, events to the clients;
6. the job's backward for `k` layers (all layers when no inference is running), and an optimizer
   step, checkpoint or publication when due (`jobs.py`).

Thread model: the loop runs in its own thread; the HTTP layer talks to it only through `call`
(a function run between iterations, with a Future for its result) and the per-request sinks.
"""
from __future__ import annotations

import itertools
import queue
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from ..methods.adapter_io import load_adapter
from ..methods.base import adapter_slots, delete_adapter
from ..methods.registry import changes_base_weights
from .block_manager import BlockManager
from .ft_defaults import FineTuneDefaults
from .jobs import JobRunner
from .requests import GenRequest, RequestState
from .runner import ModelRunner, Work
from .admission import TimeShare
from .scheduler import Scheduler, Sequence
from .store import Store


@dataclass
class EngineConfig:
    num_blocks: int = 1024
    block_size: int = 16
    max_tokens_per_step: int = 256
    max_seqs: int = 64
    max_model_len: int = 2048
    ft_max_chunk: int = 32  # most fine-tuning forward tokens per iteration that serves requests (one that
    # serves none: up to max_tokens_per_step; with ft_time_share: fewer if the share's credit buys fewer,
    # see serve.admission)
    ft_bwd_layers: int = 1  # backward layers per iteration while inference runs (all when idle)
    finetune: FineTuneDefaults = field(default_factory=FineTuneDefaults)  # a job's LoRA, lengths, lr, "auto"s
    checkpoint_every: int = 10  # optimizer steps between job checkpoints (and at each epoch end)
    # A fraction f: while requests are served, fine-tuning may add at most f to their iteration time
    # (serve.admission.TimeShare), so time-per-output-token grows by about f whatever the hardware has to
    # spare; where fine-tuning tokens cost little beside a decode batch (a GPU) the bound rarely binds.
    # None: a job takes the leftover token budget of every iteration (FlexLLM's rule), whatever it costs.
    # 0.1, not more: the share sets the median TPOT cost (~1.1x), and the p99 goal (<= 1.2x) needs the
    # headroom (on a CPU, 0.15 gave p50 1.11-1.15, p99 1.23-1.29)
    ft_time_share: float | None = 0.10

    def __post_init__(self):
        for name in ("num_blocks", "block_size", "max_tokens_per_step", "max_seqs", "max_model_len",
                     "ft_max_chunk", "ft_bwd_layers", "checkpoint_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        share = self.ft_time_share
        if share is not None and (isinstance(share, bool) or not isinstance(share, (int, float)) or not share > 0):
            raise ValueError(f"ft_time_share must be a number > 0 (e.g. 0.1) or None, got {share!r}")


@dataclass
class AdapterEntry:
    name: str  # public name (the request's "model")
    internal: str  # name inside the model tree; a reload gets a new one (no stale weights)
    owner: str | None  # None = visible to every key
    path: str
    created: int
    refs: int = 0  # live requests using it
    retired: bool = False  # unloaded or replaced: deleted once refs drop to 0


@dataclass
class Stats:
    requests: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    ft_tokens: int = 0
    ft_steps: int = 0
    iterations: int = 0
    preemptions: int = 0
    tpot: list = field(default_factory=list)  # recent per-iteration decode times (s)
    completed: dict = field(default_factory=dict)  # finished HTTP requests by kind

    def complete(self, kind: str) -> None:
        self.completed[kind] = self.completed.get(kind, 0) + 1


class Engine:
    def __init__(self, model, tokenizer, base_name: str, store: Store, cfg: EngineConfig | None = None):
        self.model, self.tk, self.base_name, self.store = model, tokenizer, base_name, store
        self.cfg = cfg or EngineConfig()
        switch = getattr(model, "rope_switch_len", None)  # longrope: see LlamaForCausalLM.rope_switch_len
        for flag, n in (("--max-model-len", self.cfg.max_model_len), ("--ft-max-length", self.cfg.finetune.max_length)):
            if switch is not None and n > switch:
                raise ValueError(f"{flag} {n} > {switch}: this model's longrope RoPE turns every position with other "
                                 f"factors once a sequence is longer than {switch} tokens, which would need its cached "
                                 f"keys recomputed (the paged engine does not); pass {flag} {switch} or less")
        self.blocks = BlockManager(self.cfg.num_blocks, self.cfg.block_size)
        self.sched = Scheduler(self.blocks, self.cfg.max_tokens_per_step, self.cfg.max_seqs, self.cfg.max_model_len)
        self.runner = ModelRunner(model, self.cfg.num_blocks, self.cfg.block_size)
        self.adapters: dict[str, AdapterEntry] = {}
        self.reqs: dict[str, RequestState] = {}
        self.stats = Stats()
        self.jobs = JobRunner(store, model, tokenizer, self.blocks, self.stats, self.load_adapter, base_name, self.cfg)
        self.admission = TimeShare(self.cfg.ft_time_share) if self.cfg.ft_time_share is not None else None
        self.clock = time.perf_counter  # what admission measures iterations with
        self.created = int(time.time())
        self._ids = itertools.count()
        self._inbox: queue.Queue = queue.Queue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: str | None = None

    # -- thread plumbing ---------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="leantune-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def call(self, fn: Callable, *args) -> Future:
        """Run fn(*args) in the engine thread between iterations; the Future carries its result."""
        fut: Future = Future()
        self._inbox.put((fn, args, fut))
        self._wake.set()
        return fut

    def _run_commands(self) -> None:
        while True:
            try:
                fn, args, fut = self._inbox.get_nowait()
            except queue.Empty:
                return
            try:
                fut.set_result(fn(*args))
            except Exception as e:  # noqa: BLE001 - handed to the caller
                fut.set_exception(e)

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while not self._stop.is_set():
            try:
                self._run_commands()
                busy = self.iteration()
            except Exception:  # noqa: BLE001 - keep serving; the failing job or requests are told
                self.error = traceback.format_exc()
                self._fail_all(self.error)
                busy = False
            if not busy:
                self._wake.wait(0.05)
                self._wake.clear()

    def _fail_all(self, message: str) -> None:
        for sid in list(self.reqs):
            self.reqs[sid].fail("internal error in the engine; see the server log")
            self._drop(sid, "abort")
        self.jobs.fail_active(message)

    # -- adapters ----------------------------------------------------------------------------------
    def resolve(self, model: str, owner: str | None) -> AdapterEntry | None:
        """The adapter a request's `model` names (None = the base model); KeyError if unknown to owner."""
        if model == self.base_name:
            return None
        e = self.adapters.get(model)
        if e is None or e.retired or (e.owner is not None and e.owner != owner):
            raise KeyError(model)
        return e

    def load_adapter(self, name: str, path: str, owner: str | None, replace: bool = False) -> AdapterEntry:
        """Engine thread. Load a PEFT adapter folder under a fresh internal name and publish it as `name`."""
        if name == self.base_name:
            raise ValueError(f"{name!r} is the base model's name; pick another adapter name")
        changes = changes_base_weights(path)
        if changes is not None:  # e.g. a sparse diff: it would rewrite the weights every request shares
            raise ValueError(f"{path} is a --method {changes.name} result, which changes the base model's own "
                             "weights: it cannot be loaded beside other adapters onto the base this server shares "
                             "between requests; start the server with it (leantune serve --adapter NAME=DIR merges "
                             "it into the base at start-up and serves that as NAME) or serve its `leantune merge` "
                             "output as --model")
        old = self.adapters.get(name)
        if old is not None and not old.retired:
            if not replace:
                raise FileExistsError(f"an adapter named {name!r} is already loaded; unload it first "
                                      "or pass load_inplace=true")
            _check_owner(old, owner)
        internal = f"a{next(self._ids)}"
        if load_adapter(self.model, path, adapter_name=internal) is not self.model:
            # a method whose adapters run beside the model wrapped it instead (a side network): the server holds
            # such a wrapper only when the adapter is named at start (recipes.serve wraps the model then)
            raise ValueError(f"{path}: this adapter runs beside the model (it wraps it), which this server was not "
                             "started for; start the server with it: leantune serve --adapter NAME=DIR")
        entry = AdapterEntry(name, internal, owner, str(path), int(time.time()))
        if old is not None:
            self._retire(old)
        self.adapters[name] = entry
        return entry

    def unload_adapter(self, name: str, owner: str | None) -> None:
        e = self.adapters.get(name)
        if e is None or e.retired or (e.owner is not None and e.owner != owner):
            raise KeyError(name)
        _check_owner(e, owner)
        self._retire(e)
        del self.adapters[name]

    def _retire(self, e: AdapterEntry) -> None:
        e.retired = True
        if e.refs == 0:
            delete_adapter(self.model, e.internal)

    def _release(self, e: AdapterEntry | None) -> None:
        if e is None:
            return
        e.refs -= 1
        if e.retired and e.refs == 0:
            delete_adapter(self.model, e.internal)

    def visible_adapters(self, owner: str | None) -> list[AdapterEntry]:
        return [e for e in self.adapters.values() if not e.retired and (e.owner is None or e.owner == owner)]

    # -- requests ----------------------------------------------------------------------------------
    def add_request(self, req: GenRequest, sink: Callable[[dict], None]) -> str:
        """Engine thread. Validate and queue a request; returns its id. KeyError: unknown model."""
        entry = self.resolve(req.model, req.owner)
        sid = f"req-{next(self._ids)}"
        slot = -1 if entry is None else adapter_slots(self.model)[entry.internal]
        state = RequestState(req, entry, sink, self.tk)  # may raise: before anything is registered
        self.sched.add(Sequence(sid, list(req.prompt_ids), req.max_tokens, slot))  # ValueError: too long
        if entry is not None:
            entry.refs += 1
        self.reqs[sid] = state
        self.stats.requests += 1
        self.stats.prompt_tokens += len(req.prompt_ids)
        return sid

    def abort(self, sid: str) -> None:
        """Engine thread. The client went away: free everything the request holds."""
        if sid in self.reqs:
            self.sched.abort(sid)
            self._drop(sid, "abort")

    def _drop(self, sid: str, reason: str) -> None:
        st = self.reqs.pop(sid)
        self.sched.finish(sid, reason)
        st.finish(reason)
        self._release(st.adapter)

    # -- one iteration -----------------------------------------------------------------------------
    def iteration(self) -> bool:
        """Plan, run and post-process one packed step; False when there was nothing to do."""
        self._job_stage(self.jobs.poll)
        plan = self.sched.schedule()
        self.stats.preemptions += len(plan.preempted)
        works = [self._work(c) for c in plan.chunks]
        inference = bool(works)
        adm = self.admission
        admit = adm is None or adm.admit(inference)
        ft_work = None
        if admit:
            cap = self.cfg.ft_max_chunk if adm is None else adm.fwd_tokens(inference, self.cfg.ft_max_chunk)
            ft_work = self.jobs.forward_work(plan.leftover, inference, cap)
        if ft_work is not None:
            works.append(ft_work)
        if not works and not (admit and self.jobs.wants_backward()):
            return False
        t0, c0, ft_steps = time.perf_counter(), self.clock(), self.jobs.backward_units
        res = self.runner.step(works)
        if inference:
            self._after_inference(plan, res.logits)
        if ft_work is not None:
            self._job_stage(self.jobs.forward_done, res.captures)
        b0 = b1 = 0.0
        if admit:
            b0 = self._sync_clock(adm)
            self._job_stage(self.jobs.backward, inference)
            b1 = self._sync_clock(adm)  # the job's backward is queued on a GPU, not done: charge it here
        self.stats.iterations += 1
        if adm is not None:
            with_ft = ft_work is not None or self.jobs.backward_units != ft_steps
            adm.record(inference, with_ft, self._sync_clock(adm) - c0,
                       len(ft_work.tokens) if ft_work is not None else 0, b1 - b0)
        if inference:
            self.stats.tpot = (self.stats.tpot + [time.perf_counter() - t0])[-1000:]
        return True

    def _sync_clock(self, adm) -> float:
        """The admission clock once the device is done (0 without a time share: nothing is measured)."""
        if adm is None:
            return 0.0
        if self.runner.device.type == "cuda":
            torch.cuda.synchronize(self.runner.device)
        return self.clock()

    def _job_stage(self, fn, *args) -> None:
        """Run a fine-tuning stage; its failure (bad data, a NaN loss) fails the job, not the requests."""
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001 - recorded on the job
            self.jobs.fail_active(f"{type(e).__name__}: {e}")

    def _work(self, c) -> Work:
        s = c.seq
        return Work(s.tokens[c.start:c.start + c.length], c.start, self.blocks.slots(s.seq_id, 0, c.start + c.length),
                    adapter=s.adapter_slot, sample=c.sample)

    def _after_inference(self, plan, logits: torch.Tensor | None) -> None:
        # None: no chunk samples this step (every one is a long prompt's non-final prefill chunk)
        if logits is not None:
            logits = logits.cpu()  # per-request generators live on the CPU (seeded sampling is device-independent)
        sampled, i = {}, 0
        for c in plan.chunks:
            if c.sample:
                sampled[c.seq.seq_id] = self.reqs[c.seq.seq_id].sample(logits[i])
                i += 1
        self.sched.update(plan, sampled)
        self.stats.generated_tokens += len(sampled)
        for sid, tok in sampled.items():
            st = self.reqs[sid]
            reason = st.on_token(tok)
            seq = plan_seq(plan, sid)
            if reason is None and seq.is_finished:
                reason = seq.finish_reason
            if reason is not None:
                self._drop(sid, reason)


def _check_owner(e: AdapterEntry, owner: str | None) -> None:
    """owner None is the operator (no API keys, or the command line): it may change any adapter; a key
    may change only its own, never a shared one."""
    if owner is not None and e.owner != owner:
        raise PermissionError(e.name)


def plan_seq(plan, sid: str) -> Sequence:
    return next(c.seq for c in plan.chunks if c.seq.seq_id == sid)

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

import copy
import itertools
import queue
import sys
import threading
import time
import traceback
from pathlib import Path
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from ..methods.adapter_io import adapter_state_dict, load_adapter, load_lora_contents, peft_config_dict
from ..methods.base import adapter_slots, delete_adapter
from ..methods.registry import changes_base_weights, spec_for_folder
from .adapter_cache import AdapterCache, Move, Tier
from .block_manager import BlockManager
from .ft_defaults import FineTuneDefaults
from .jobs import JobRunner
from .metrics import Metrics
from .requests import GenRequest, RequestState
from .runner import ModelRunner, Work
from .admission import TimeShare
from .scheduler import Scheduler, Sequence, Status
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
    max_loras: int | None = None  # most adapters resident in the model tree (None: all); see serve.adapter_cache
    max_cpu_loras: int | None = None  # most adapters held in memory, resident ones included (default: max_loras)
    lora_dir: str | None = None  # a request naming an unknown adapter NAME loads lora_dir/NAME/ (vLLM's resolver)

    def __post_init__(self):
        for name in ("num_blocks", "block_size", "max_tokens_per_step", "max_seqs", "max_model_len",
                     "ft_max_chunk", "ft_bwd_layers", "checkpoint_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        share = self.ft_time_share
        if share is not None and (isinstance(share, bool) or not isinstance(share, (int, float)) or not share > 0):
            raise ValueError(f"ft_time_share must be a number > 0 (e.g. 0.1) or None, got {share!r}")
        AdapterCache(self.max_loras, self.max_cpu_loras)  # validates both
        if self.lora_dir is not None and not Path(self.lora_dir).is_dir():
            raise ValueError(f"--lora-dir {self.lora_dir} is not a folder")


@dataclass
class AdapterEntry:
    name: str  # public name (the request's "model")
    internal: str  # name inside the model tree; a reload gets a new one (no stale weights)
    owner: str | None  # None = visible to every key
    path: str
    created: int
    refs: int = 0  # live requests using it
    retired: bool = False  # unloaded or replaced: deleted once refs drop to 0
    # PEFT LoRA folder (no method hook reads it): spilled to host memory as its config + tensors; other formats
    # are reloaded from their folder when they become resident again
    peft: bool = True
    spilled: tuple[dict, dict] | None = None  # (adapter_config.json dict, tensors) while held in CPU memory
    chat_template: str | None = None  # the folder's own chat template, if it has one


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
        self.adapter_cache = AdapterCache(self.cfg.max_loras, self.cfg.max_cpu_loras)
        self._by_internal: dict[str, AdapterEntry] = {}  # every adapter in adapter_cache, retired ones included
        self._adapter_wait: dict[str, Sequence] = {}  # requests whose adapter waits for a resident place (FIFO)
        self._chat_tokenizers: dict[str, object] = {}  # adapter chat template -> the tokenizer rendering with it
        self.reqs: dict[str, RequestState] = {}  # by sequence id: a request's id, then "<id>.<i>" for choice i
        self.groups: dict[str, list[str]] = {}  # request id -> its sequences' ids
        self._forks: dict[str, list[str]] = {}  # request id -> choices not forked yet from its first sequence
        self.stats = Stats()
        self.metrics = Metrics(self)  # this engine's own Prometheus registry
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
                # the clients are told only "see the server log": this is that log (uvicorn's stderr)
                print(f"leantune engine: an iteration failed; its requests were failed:\n{self.error}",
                      file=sys.stderr, flush=True)
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
        """The adapter a request's `model` names (None = the base model); KeyError if unknown to owner.
        Engine thread: an unknown name found in --lora-dir is registered (loaded when a request needs it)."""
        if model == self.base_name:
            return None
        e = self.adapters.get(model)
        if e is None and self.resolvable(model):
            e = self._register(model, str(Path(self.cfg.lora_dir) / model), None, Tier.DISK)
        elif e is None and model.startswith("ft:"):  # a job's checkpoint (`ft:...:ckpt-step-N`): loaded on first use
            e = self.jobs.checkpoint_model(model, owner)
        if e is None or e.retired or (e.owner is not None and e.owner != owner):
            raise KeyError(model)
        return e

    def resolvable(self, name: str) -> bool:
        """Whether --lora-dir holds an adapter folder `name` (a plain name: no path separators, no '..')."""
        if self.cfg.lora_dir is None or not name or name in (".", "..") or any(c in name for c in "/\\\0"):
            return False
        return (Path(self.cfg.lora_dir) / name / "adapter_config.json").is_file()

    def chat_template(self, model: str) -> str | None:
        """The chat template of the adapter `model` names, where its folder has one (any thread: reads only)."""
        e = self.adapters.get(model)
        if e is not None:
            return e.chat_template
        return folder_chat_template(Path(self.cfg.lora_dir) / model) if self.resolvable(model) else None

    def chat_tokenizer(self, model: str):
        """The tokenizer whose chat template renders chat requests for `model`: the base's, or a copy carrying
        the adapter folder's own template (compiled once per template)."""
        template = self.chat_template(model)
        if template is None:
            return self.tk
        tk = self._chat_tokenizers.get(template)
        if tk is None:
            tk = copy.copy(self.tk)
            tk.set_chat_template(template)  # a syntax error shows here, as a 400 of the request
            self._chat_tokenizers[template] = tk
        return tk

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
        entry = AdapterEntry(name, f"a{next(self._ids)}", owner, str(path), int(time.time()))
        self._load_into_tree(entry)  # checked and loaded before anything else changes
        if old is not None:
            self._retire(old)
        self._publish(entry, Tier.DEVICE)
        self._apply_moves(self.adapter_cache.over_limit(self._pinned()))  # --max-loras: spill the LRU one
        return entry

    def _register(self, name: str, path: str, owner: str | None, tier: Tier) -> AdapterEntry:
        entry = AdapterEntry(name, f"a{next(self._ids)}", owner, path, int(time.time()))
        entry.peft = spec_for_folder(path) is None
        self._publish(entry, tier)
        return entry

    def _publish(self, entry: AdapterEntry, tier: Tier) -> None:
        entry.chat_template = folder_chat_template(Path(entry.path))
        self.adapters[entry.name] = self._by_internal[entry.internal] = entry
        self.adapter_cache.add(entry.internal, tier)

    def _load_into_tree(self, entry: AdapterEntry) -> None:
        """Put the adapter in the model tree: from host memory when it was spilled there, else from its folder."""
        if entry.spilled is not None:
            load_lora_contents(self.model, *entry.spilled, adapter_name=entry.internal, path=entry.path)
            entry.spilled = None
            return
        entry.peft = spec_for_folder(entry.path) is None
        if load_adapter(self.model, entry.path, adapter_name=entry.internal) is not self.model:
            # a method whose adapters run beside the model wrapped it instead (a side network): the server holds
            # such a wrapper only when the adapter is named at start (recipes.serve wraps the model then)
            raise ValueError(f"{entry.path}: this adapter runs beside the model (it wraps it), which this server was "
                             "not started for; start the server with it: leantune serve --adapter NAME=DIR")

    def adapter_slot(self, entry: AdapterEntry | None) -> int | None:
        """Engine thread. The routing slot of a request's adapter (-1: the base), made resident first
        (--max-loras); None while every resident adapter is in use (the request waits). ValueError when its
        folder cannot be loaded. A caller holding a reference on `entry` (refs) keeps the slot valid."""
        if entry is None:
            return -1
        moves = self.adapter_cache.make_resident(entry.internal, self._pinned())
        if moves is None:
            return None
        if moves:
            self._apply_moves(moves[:-1])  # make room first: spill / drop the least recently used
            try:
                self._load_into_tree(entry)
            except (OSError, ValueError, KeyError) as e:
                raise ValueError(f"adapter {entry.name!r} could not be loaded from {entry.path}: {e}") from None
            self.adapter_cache.apply(moves[-1:])
        self.adapter_cache.touch(entry.internal)
        return adapter_slots(self.model)[entry.internal]

    def _pinned(self) -> set[str]:
        """Internal names of the adapters something holds a reference on (a generation's sequences, an embedding
        request between its micro-batches): never evicted from the tree under them, as they route by its slot."""
        return {e.internal for e in self._by_internal.values() if e.refs > 0}

    def _apply_moves(self, moves: list[Move]) -> None:
        for m in moves:
            e = self._by_internal[m.name]
            to = m.to if e.peft else Tier.DISK  # another method's format: its folder is the copy to reload
            if to is Tier.CPU:  # tensors off the model, to host memory (a copy only where they were on a device)
                e.spilled = (peft_config_dict(self.model, e.internal), adapter_state_dict(self.model, e.internal))
            else:
                e.spilled = None
            if self.adapter_cache.tier(e.internal) is Tier.DEVICE:
                delete_adapter(self.model, e.internal)
            self.adapter_cache.add(e.internal, to)

    def _admit_adapter_waits(self) -> None:
        """Queue the requests whose adapter can now be made resident (first come, first served)."""
        for sid, seq in list(self._adapter_wait.items()):
            st = self.reqs[sid]
            try:
                slot = self.adapter_slot(st.adapter)
            except ValueError as e:
                st.fail(str(e))
                self._drop(sid, "abort")
                continue
            if slot is not None:
                del self._adapter_wait[sid]
                seq.adapter_slot = slot
                self.sched.add(seq)

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
            self._forget(e)

    def _release(self, e: AdapterEntry | None) -> None:
        if e is None:
            return
        e.refs -= 1
        if e.retired and e.refs == 0:
            self._forget(e)

    def _forget(self, e: AdapterEntry) -> None:
        if self.adapter_cache.tier(e.internal) is Tier.DEVICE:
            delete_adapter(self.model, e.internal)
        self.adapter_cache.forget(e.internal)
        self._by_internal.pop(e.internal, None)
        e.spilled = None

    def visible_adapters(self, owner: str | None) -> list[AdapterEntry]:
        return [e for e in self.adapters.values() if not e.retired and (e.owner is None or e.owner == owner)]

    def lora_requests(self) -> tuple[set[str], set[str]]:
        """(adapters of running requests, adapters of waiting ones) by public name: the LoRA gauge's labels."""
        running, waiting = set(), set()
        for sid, st in self.reqs.items():
            if st.adapter is not None:
                seq = self.sched.get(sid)
                (running if seq is not None and seq.status is Status.RUNNING else waiting).add(st.adapter.name)
        return running, waiting

    # -- requests ----------------------------------------------------------------------------------
    def add_request(self, req: GenRequest, sink: Callable[[dict], None]) -> str:
        """Engine thread. Validate and queue a request; returns its id. KeyError: unknown model.

        Its `n` sequences (choice i is sequence i) share the prompt: the first prefills it, the others are forked
        from it once it has (`Scheduler.fork`: they share its full KV blocks)."""
        entry = self.resolve(req.model, req.owner)
        rid = f"req-{next(self._ids)}"
        slot = self.adapter_slot(entry)  # None: every resident adapter is in use (--max-loras); it waits for one
        shared: list = []  # the prompt's logprob records, one list for all choices
        states = [RequestState(req, entry, sink, self.tk, i, shared) for i in range(req.n)]  # may raise: before
        sids = [rid] + [f"{rid}.{i}" for i in range(1, req.n)]  # anything is registered
        # max_tokens 0 (prompt logprobs only) still runs the step that ends the prompt: its sample is dropped
        seq = Sequence(rid, list(req.prompt_ids), max(req.max_tokens, 1), -1 if slot is None else slot)
        if slot is None:
            self.sched.check(seq)  # ValueError: too long, as add would say
            self._adapter_wait[rid] = seq
        else:
            self.sched.add(seq)  # ValueError: too long
        if entry is not None:
            entry.refs += req.n
        self.reqs.update(zip(sids, states))
        self.groups[rid] = sids
        if req.n > 1:
            self._forks[rid] = sids[1:]
        self.metrics.arrived(rid, len(req.prompt_ids))  # a request's times: those of its first sequence
        self.stats.requests += 1
        self.stats.prompt_tokens += len(req.prompt_ids)
        return rid

    def abort(self, rid: str) -> None:
        """Engine thread. The client went away: free everything the request's sequences hold."""
        for sid in self.groups.get(rid, ()):
            if sid in self.reqs:
                self.sched.abort(sid)
                self._drop(sid, "abort")

    def _drop(self, sid: str, reason: str) -> None:
        st = self.reqs.pop(sid)
        self._adapter_wait.pop(sid, None)
        self.sched.finish(sid, reason)
        st.finish(reason)
        self._release(st.adapter)
        rid = sid.split(".")[0]
        if not any(s in self.reqs for s in self.groups.get(rid, ())):  # the request's last sequence
            self.metrics.finished(rid)
            self.groups.pop(rid, None)
            self._forks.pop(rid, None)

    def _fork(self, parent: Sequence) -> None:
        """The step that ends `parent`'s prompt ran: queue its request's other choices, sharing its KV."""
        for sid in self._forks.pop(parent.seq_id, ()):
            if sid in self.reqs:
                self.sched.fork(parent, Sequence(sid, list(parent.prompt), parent.max_new_tokens, parent.adapter_slot))

    # -- one iteration -----------------------------------------------------------------------------
    def iteration(self) -> bool:
        """Plan, run and post-process one packed step; False when there was nothing to do."""
        self._job_stage(self.jobs.poll)
        self._admit_adapter_waits()
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
            self.metrics.step(plan)  # before _after_inference drops the sequences that finish
            self._after_inference(plan, res)
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
                    adapter=s.adapter_slot, sample=c.sample,
                    all_logits=self.reqs[s.seq_id].wants_prompt_logits(c.start, c.length))

    def _after_inference(self, plan, res) -> None:
        # per-request generators live on the CPU (seeded sampling is device-independent)
        logits = res.logits.cpu() if res.logits is not None else None
        rows = iter(res.row_logits or ())
        sampled, i = {}, 0
        for c in plan.chunks:
            st = self.reqs[c.seq.seq_id]
            if st.wants_prompt_logits(c.start, c.length):  # as `_work` asked (one chunk per sequence and step)
                st.record_prompt(c.start, next(rows).cpu())
            if c.sample:
                sampled[c.seq.seq_id] = st.sample(logits[i])
                i += 1
                self._fork(c.seq)  # before `update`, which frees a sequence that ends here
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


def folder_chat_template(folder: Path) -> str | None:
    """An adapter folder's own chat template: `chat_template.jinja`, else `tokenizer_config.json`'s
    `chat_template` (a string; transformers' layout), else None (the base model's template applies)."""
    jinja, config = folder / "chat_template.jinja", folder / "tokenizer_config.json"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    if config.is_file():
        import json

        try:
            template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
        except (ValueError, AttributeError):
            return None
        return template if isinstance(template, str) else None
    return None


def plan_seq(plan, sid: str) -> Sequence:
    return next(c.seq for c in plan.chunks if c.seq.seq_id == sid)

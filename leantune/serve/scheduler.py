"""Continuous-batching scheduler with chunked prefill and recompute preemption (vLLM v1, nano-vllm).

Every engine step gets a token budget, `max_tokens_per_step`. `schedule` spends it inference first
(FlexLLM: what is left, `StepPlan.leftover`, goes to fine-tuning work in the same step):

1. running sequences, in admission order: a decoding sequence gets 1 token, one still in prefill gets
   a chunk of min(remaining prefill, budget left). Before a chunk is planned its KV blocks are ensured;
   when the pool is out of blocks the most recently admitted running sequence is preempted
   (recompute: its blocks are freed, `num_computed` drops to 0 and it goes to the front of the waiting
   queue; its output tokens stay and are prefilled again with the prompt), possibly the sequence
   itself when it is the last one. The oldest running sequence therefore always progresses.
2. waiting sequences, first come first served, while budget is left, fewer than `max_seqs` run and
   the blocks for their first chunk can be ensured. Nothing is admitted in a step that preempted:
   the pool is short, and admitting would only evict again.

The engine runs the model on the plan's chunks, then calls `update` with the tokens it sampled. A request
with `n` > 1 runs one sequence through its prompt, then `fork`s the others from it: they share the prompt's
full KV blocks (refcounted in the block manager) and recompute only its tail.
Pure Python, no torch: the engine and model runner own the tensors.
"""
from __future__ import annotations

import enum
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

from .block_manager import BlockManager


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    """One request: its prompt, the tokens sampled so far, and how many tokens have KV in the cache."""

    seq_id: str
    prompt: list[int]
    max_new_tokens: int
    adapter_slot: int = -1  # -1 = base model; opaque to the scheduler, the engine routes on it
    output: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose KV is in the cache
    status: Status = Status.WAITING
    finish_reason: str | None = None

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.output)

    @property
    def remaining_prefill(self) -> int:
        """Tokens without KV yet; a decoding sequence has exactly 1, its last sampled token."""
        return self.num_tokens - self.num_computed

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED


@dataclass
class Chunk:
    """Tokens seq.tokens[start:start + length] to run through the model this step."""

    seq: Sequence
    start: int  # == seq.num_computed when scheduled
    length: int
    sample: bool  # start + length == seq.num_tokens: the step yields this sequence's next token


@dataclass
class StepPlan:
    chunks: list[Chunk]
    leftover: int  # token budget left after inference, for fine-tuning work
    preempted: list[Sequence]

    @property
    def num_tokens(self) -> int:
        return sum(c.length for c in self.chunks)


def _make_chunk(seq: Sequence, length: int) -> Chunk:
    start = seq.num_computed
    return Chunk(seq, start, length, sample=start + length == seq.num_tokens)


class Scheduler:
    """Waiting queue + running list over a `BlockManager`; see the module docstring for the policy."""

    def __init__(self, blocks: BlockManager, max_tokens_per_step: int = 256, max_seqs: int = 64,
                 max_model_len: int = 2048):
        for name, value in (("max_tokens_per_step", max_tokens_per_step), ("max_seqs", max_seqs),
                            ("max_model_len", max_model_len)):
            if value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value}")
        self.blocks = blocks
        self.max_tokens_per_step = max_tokens_per_step
        self.max_seqs = max_seqs
        self.max_model_len = max_model_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order: preemption takes from the end
        self._live: dict[str, Sequence] = {}  # every waiting or running sequence, by id

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def get(self, seq_id: str) -> Sequence | None:
        """The waiting or running sequence `seq_id`, or None."""
        return self._live.get(seq_id)

    # ---- requests in and out ----

    def add(self, seq: Sequence) -> None:
        """Queue a new request; ValueError when it is malformed or could never run to completion."""
        self._validate(seq)
        seq.status = Status.WAITING
        self.waiting.append(seq)
        self._live[seq.seq_id] = seq

    def check(self, seq: Sequence) -> None:
        """The ValueError `add` would raise for `seq`, without queueing it (a request held back elsewhere first)."""
        self._validate(seq)

    def _validate(self, seq: Sequence) -> None:
        if seq.seq_id in self._live:
            raise ValueError(f"sequence id {seq.seq_id!r} is already queued or running; ids must be unique")
        if not seq.prompt:
            raise ValueError(f"sequence {seq.seq_id!r} has an empty prompt; send at least one token")
        if seq.num_computed != 0:
            raise ValueError(f"sequence {seq.seq_id!r} claims {seq.num_computed} computed tokens; a new "
                             f"sequence has no KV in the cache, leave num_computed at 0")
        if seq.max_new_tokens < 1:
            raise ValueError(f"sequence {seq.seq_id!r}: max_new_tokens must be >= 1, got {seq.max_new_tokens}")
        total = len(seq.prompt) + seq.max_new_tokens
        if total > self.max_model_len:
            raise ValueError(f"sequence {seq.seq_id!r}: prompt ({len(seq.prompt)} tokens) + max_new_tokens "
                             f"({seq.max_new_tokens}) = {total} exceeds max_model_len {self.max_model_len}; "
                             f"shorten the prompt or lower max_new_tokens")
        # The last sampled token never enters the cache, so KV peaks at total - 1 tokens.
        need = self.blocks.blocks_for_tokens(total - 1)
        if need > self.blocks.num_blocks:
            raise ValueError(f"sequence {seq.seq_id!r} needs {need} KV blocks but the cache has only "
                             f"{self.blocks.num_blocks}; lower max_new_tokens or give the cache more memory")

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Queue `child`, another sample from `parent`'s prompt (n > 1), sharing the KV of the prompt's full
        blocks, which `parent` has computed (the engine forks once the step that ends parent's prefill ran).
        The child recomputes the prompt's tail (1..block_size tokens, never none, so that it samples its own
        first token) and goes to the front of the queue: its request was admitted already."""
        if child.seq_id in self._live:
            raise ValueError(f"sequence id {child.seq_id!r} is already queued or running; ids must be unique")
        if child.prompt != parent.prompt or child.output or parent.status is not Status.RUNNING:
            raise ValueError(f"fork {child.seq_id!r}: {parent.seq_id!r} is not running the same prompt")
        shared = (len(child.prompt) - 1) // self.blocks.block_size * self.blocks.block_size
        self.blocks.fork(parent.seq_id, child.seq_id, shared)
        child.num_computed, child.status = shared, Status.WAITING
        self.waiting.appendleft(child)
        self._live[child.seq_id] = child

    def abort(self, seq_id: str) -> Sequence | None:
        """Drop a waiting or running sequence (client gone); returns it, or None if it is not live."""
        seq = self._live.get(seq_id)
        if seq is None:
            return None
        self._retire(seq, "abort")
        return seq

    def finish(self, seq_id: str, reason: str) -> None:
        """End a sequence (the engine calls it on eos or a stop string). No-op if it is no longer live,
        e.g. `update` already finished it by length in the same step."""
        seq = self._live.get(seq_id)
        if seq is not None:
            self._retire(seq, reason)

    def _retire(self, seq: Sequence, reason: str) -> None:
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        del self._live[seq.seq_id]
        self.blocks.free(seq.seq_id)
        seq.status = Status.FINISHED
        seq.finish_reason = reason

    # ---- one step ----

    def schedule(self) -> StepPlan:
        """Plan the next step: chunks for running then newly admitted sequences, within the budget."""
        chunks: list[Chunk] = []
        preempted: list[Sequence] = []
        budget = self._schedule_running(self.max_tokens_per_step, chunks, preempted)
        if not preempted:
            budget = self._admit_waiting(budget, chunks)
        return StepPlan(chunks, budget, preempted)

    def _schedule_running(self, budget: int, chunks: list[Chunk], preempted: list[Sequence]) -> int:
        i = 0
        # running shrinks from the end as sequences are preempted, so index rather than iterate.
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            length = min(seq.remaining_prefill, budget)
            if not self._ensure_or_preempt(seq, seq.num_computed + length, preempted):
                break  # seq preempted itself: it was the last running sequence
            chunks.append(_make_chunk(seq, length))
            budget -= length
            i += 1
        return budget

    def _ensure_or_preempt(self, seq: Sequence, n_tokens: int, preempted: list[Sequence]) -> bool:
        """Ensure blocks for `seq`, preempting the newest running sequences until they fit.
        False when `seq` itself had to be preempted."""
        while not self.blocks.ensure(seq.seq_id, n_tokens):
            victim = self.running[-1]
            self._preempt(victim)
            preempted.append(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.pop()
        self.blocks.free(seq.seq_id)
        seq.num_computed = 0
        seq.status = Status.WAITING
        # Front of the queue: it was admitted before anything still waiting. Victims are taken
        # newest first, so successive appendlefts keep their admission order.
        self.waiting.appendleft(seq)

    def _admit_waiting(self, budget: int, chunks: list[Chunk]) -> int:
        while self.waiting and budget > 0 and len(self.running) < self.max_seqs:
            seq = self.waiting[0]
            length = min(seq.remaining_prefill, budget)
            if not self.blocks.ensure(seq.seq_id, seq.num_computed + length):
                break  # FCFS: a later, smaller request does not overtake the head of the queue
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            chunks.append(_make_chunk(seq, length))
            budget -= length
        return budget

    def update(self, plan: StepPlan, sampled: Mapping[str, int]) -> None:
        """Apply a finished step: advance `num_computed`, append sampled tokens, finish by length.

        `sampled` maps seq_id -> next token for every chunk with `sample`. Chunks of sequences
        aborted or finished since `schedule` are skipped."""
        for chunk in plan.chunks:
            seq = chunk.seq
            if seq.status is not Status.RUNNING:
                continue
            if chunk.start != seq.num_computed:
                raise RuntimeError(f"stale plan: chunk of {seq.seq_id!r} starts at {chunk.start} but "
                                   f"{seq.num_computed} tokens are computed; update each plan exactly once")
            seq.num_computed += chunk.length
            if chunk.sample:
                self._append_token(seq, sampled)

    def _append_token(self, seq: Sequence, sampled: Mapping[str, int]) -> None:
        if seq.seq_id not in sampled:
            raise KeyError(f"no sampled token for {seq.seq_id!r}, whose chunk ends its known tokens")
        seq.output.append(sampled[seq.seq_id])
        if len(seq.output) >= seq.max_new_tokens:
            self.finish(seq.seq_id, "length")

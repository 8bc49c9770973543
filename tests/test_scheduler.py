"""Paged-KV block manager and continuous-batching scheduler (leantune.serve): block accounting, chunked
prefill, decode, budget, FCFS admission, max_seqs, recompute preemption, finish/abort, validation, a
simulated engine loop over random requests, and that neither module imports torch."""
import random
import subprocess
import sys
from pathlib import Path

import pytest

from leantune.serve.block_manager import BlockManager
from leantune.serve.scheduler import Chunk, Scheduler, Sequence, Status, StepPlan

SERVE_DIR = Path(__file__).resolve().parents[1] / "leantune" / "serve"


# ---- helpers ----

def make(seq_id: str, n_prompt: int, max_new: int, **kw) -> Sequence:
    return Sequence(seq_id, list(range(1, n_prompt + 1)), max_new, **kw)


def next_token(seq: Sequence) -> int:
    """Fake sampler: prompts are 1..n and each new token is its 1-based position, so a sequence's tokens
    are 1, 2, ..., num_tokens whatever the schedule, preemptions included."""
    return seq.num_tokens + 1


def step(sched: Scheduler) -> StepPlan:
    plan = sched.schedule()
    check_plan(sched, plan)
    sched.update(plan, {c.seq.seq_id: next_token(c.seq) for c in plan.chunks if c.sample})
    check_invariants(sched)
    return plan


def check_plan(sched: Scheduler, plan: StepPlan) -> None:
    budget = sched.max_tokens_per_step
    assert 0 <= plan.num_tokens <= budget
    assert plan.leftover == budget - plan.num_tokens
    assert len({c.seq.seq_id for c in plan.chunks}) == len(plan.chunks)
    for c in plan.chunks:
        assert c.seq.status is Status.RUNNING
        assert c.length >= 1
        assert c.start == c.seq.num_computed
        assert c.start + c.length <= c.seq.num_tokens
        assert c.sample == (c.start + c.length == c.seq.num_tokens)
        assert len(sched.blocks.slots(c.seq.seq_id, c.start, c.start + c.length)) == c.length
    for s in plan.preempted:
        assert s.status is Status.WAITING and s.num_computed == 0 and not sched.blocks.has(s.seq_id)


def check_blocks(bm: BlockManager) -> None:
    """Every block is in exactly one place: the free list or one table."""
    used = [b for sid in bm.seq_ids() for b in bm.block_table(sid)]
    free = list(bm._free)  # private, read only: a block both free and owned would pass a mere count
    assert sorted(used + free) == list(range(bm.num_blocks))
    assert bm.num_free + len(used) == bm.num_blocks


def check_invariants(sched: Scheduler) -> None:
    bm = sched.blocks
    check_blocks(bm)
    assert len(sched.running) <= sched.max_seqs
    assert set(bm.seq_ids()) <= {s.seq_id for s in sched.running}
    for s in sched.running:
        assert s.status is Status.RUNNING
        assert 1 <= s.remaining_prefill
        assert len(bm.block_table(s.seq_id)) * bm.block_size >= s.num_computed
    for s in sched.waiting:
        assert s.status is Status.WAITING and s.num_computed == 0 and not bm.has(s.seq_id)


def run_to_completion(sched: Scheduler, max_steps: int = 10_000) -> list[StepPlan]:
    plans = []
    while sched.has_work:
        plans.append(step(sched))
        assert len(plans) < max_steps, "scheduler made no progress"
    return plans


# ---- BlockManager ----

@pytest.mark.parametrize("num_blocks,block_size,name", [(0, 4, "num_blocks"), (-1, 4, "num_blocks"),
                                                         (4, 0, "block_size"), (4, -2, "block_size")])
def test_block_manager_rejects_non_positive_sizes(num_blocks, block_size, name):
    with pytest.raises(ValueError, match=name):
        BlockManager(num_blocks, block_size)


def test_blocks_needed_is_ceil_division_minus_owned():
    bm = BlockManager(8, 4)
    assert [bm.blocks_needed("a", n) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]
    assert bm.ensure("a", 5) and len(bm.block_table("a")) == 2 and bm.num_free == 6
    assert [bm.blocks_needed("a", n) for n in (3, 8, 9, 16)] == [0, 0, 1, 2]
    assert bm.ensure("a", 3) and len(bm.block_table("a")) == 2  # tables never shrink
    with pytest.raises(ValueError):
        bm.blocks_needed("a", -1)


def test_slots_map_positions_through_the_block_table():
    bm = BlockManager(8, 4)
    assert bm.ensure("a", 3) and bm.ensure("b", 4) and bm.ensure("a", 6)
    assert bm.block_table("a") == [0, 2] and bm.block_table("b") == [1]
    assert bm.slots("a", 0, 6) == [0, 1, 2, 3, 8, 9]
    assert bm.slots("a", 2, 5) == [2, 3, 8]
    assert bm.slots("b", 0, 4) == [4, 5, 6, 7]
    assert bm.slots("a", 8, 8) == [] and bm.slots("nobody", 0, 0) == []
    for seq_id, start, end in [("a", 0, 9), ("a", 3, 2), ("a", -1, 2), ("nobody", 0, 1)]:
        with pytest.raises(ValueError, match="ensure"):
            bm.slots(seq_id, start, end)


def test_ensure_is_all_or_nothing():
    bm = BlockManager(4, 2)
    assert bm.ensure("a", 6) and bm.num_free == 1
    assert not bm.can_ensure("b", 3) and bm.can_ensure("b", 2)
    assert not bm.ensure("b", 4)
    assert bm.num_free == 1 and not bm.has("b") and bm.block_table("b") == []
    table = bm.block_table("a")
    assert not bm.ensure("a", 10)
    assert bm.block_table("a") == table and bm.num_free == 1
    assert bm.ensure("a", 8) and bm.num_free == 0
    check_blocks(bm)


def test_free_returns_blocks_and_is_idempotent():
    bm = BlockManager(4, 2)
    bm.ensure("a", 5)
    bm.ensure("b", 2)
    bm.free("a")
    assert bm.num_free == 3 and not bm.has("a") and bm.has("b")
    bm.free("a")
    bm.free("never-seen")
    assert bm.num_free == 3
    check_blocks(bm)
    assert bm.ensure("c", 6) and bm.num_free == 0  # the freed blocks are usable again


def test_block_table_is_a_copy():
    bm = BlockManager(4, 2)
    bm.ensure("a", 3)
    bm.block_table("a").append(99)
    assert bm.block_table("a") == [0, 1]


@pytest.mark.parametrize("seed", range(10))
def test_block_manager_random_ops_never_leak(seed):
    rng = random.Random(seed)
    bm = BlockManager(rng.randint(1, 20), rng.randint(1, 8))
    ids = [f"s{i}" for i in range(6)]
    for _ in range(300):
        sid = rng.choice(ids)
        if rng.random() < 0.3:
            bm.free(sid)
        else:
            n = rng.randint(0, bm.num_blocks * bm.block_size + 3)
            before = bm.block_table(sid)
            could = bm.can_ensure(sid, n)
            assert bm.ensure(sid, n) == could
            after = bm.block_table(sid)
            assert after[:len(before)] == before
            assert after == before or len(after) * bm.block_size >= n
        check_blocks(bm)
    for sid in ids:
        bm.free(sid)
    assert bm.num_free == bm.num_blocks and bm.seq_ids() == []


# ---- Sequence ----

def test_sequence_token_counts():
    s = make("a", 3, 4)
    assert s.tokens == [1, 2, 3] and s.num_tokens == 3 and s.remaining_prefill == 3
    s.output += [7, 8]
    s.num_computed = 4
    assert s.tokens == [1, 2, 3, 7, 8] and s.num_tokens == 5 and s.remaining_prefill == 1
    assert s.adapter_slot == -1 and s.status is Status.WAITING and not s.is_finished


# ---- Scheduler: validation ----

@pytest.mark.parametrize("kw", [{"max_tokens_per_step": 0}, {"max_seqs": 0}, {"max_model_len": -1}])
def test_scheduler_rejects_non_positive_limits(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        Scheduler(BlockManager(4, 4), **kw)


def test_add_rejects_bad_requests():
    sched = Scheduler(BlockManager(2, 4), max_model_len=12)
    with pytest.raises(ValueError, match="empty prompt"):
        sched.add(Sequence("e", [], 4))
    with pytest.raises(ValueError, match="max_model_len"):
        sched.add(make("long", 8, 5))  # 13 > 12
    with pytest.raises(ValueError, match="max_new_tokens"):
        sched.add(make("zero", 2, 0))
    with pytest.raises(ValueError, match="KV blocks"):
        sched.add(make("big", 4, 6))  # peak KV 4 + 6 - 1 = 9 tokens > 2 blocks of 4
    with pytest.raises(ValueError, match="num_computed"):
        sched.add(make("dirty", 2, 2, num_computed=1))
    sched.add(make("ok", 2, 2))
    with pytest.raises(ValueError, match="already"):
        sched.add(make("ok", 3, 3))
    assert sched.num_waiting == 1 and sched.num_running == 0


def test_add_accepts_a_request_that_exactly_fills_the_cache_and_it_completes():
    bm = BlockManager(2, 4)
    sched = Scheduler(bm, max_model_len=64)
    s = make("fit", 4, 5)  # peak KV 8 tokens == the whole pool: the last sampled token is never cached
    sched.add(s)
    run_to_completion(sched)
    assert s.finish_reason == "length" and s.output == [5, 6, 7, 8, 9]
    assert s.num_computed == 8 and bm.num_free == 2


# ---- Scheduler: chunked prefill, decode, budget ----

def test_chunked_prefill_splits_a_long_prompt_over_steps():
    sched = Scheduler(BlockManager(64, 4), max_tokens_per_step=16)
    s = make("a", 40, 3)
    sched.add(s)
    plans = run_to_completion(sched)
    got = [(p.chunks[0].start, p.chunks[0].length, p.chunks[0].sample, p.leftover) for p in plans]
    assert got == [(0, 16, False, 0), (16, 16, False, 0), (32, 8, True, 8), (40, 1, True, 15), (41, 1, True, 15)]
    assert s.output == [41, 42, 43] and s.num_computed == 42 and s.finish_reason == "length"


def test_decode_gets_one_token_per_step():
    sched = Scheduler(BlockManager(64, 4), max_tokens_per_step=32)
    a, b = make("a", 5, 4), make("b", 7, 4)
    sched.add(a)
    sched.add(b)
    first = step(sched)
    assert [(c.seq.seq_id, c.start, c.length, c.sample) for c in first.chunks] == [("a", 0, 5, True), ("b", 0, 7, True)]
    for k in range(1, 4):
        plan = step(sched)
        assert [(c.seq.seq_id, c.start, c.length) for c in plan.chunks] == [("a", 4 + k, 1), ("b", 6 + k, 1)]
        assert plan.leftover == 30
    assert not sched.has_work and a.output == [6, 7, 8, 9] and b.output == [8, 9, 10, 11]


def test_running_sequences_are_served_before_admission_and_share_the_budget():
    sched = Scheduler(BlockManager(64, 4), max_tokens_per_step=16)
    a = make("a", 30, 2)
    sched.add(a)
    step(sched)  # a: 16 of 30
    b = make("b", 10, 2)
    sched.add(b)
    plan = step(sched)  # a finishes its prefill (14), b's first chunk gets the other 2
    assert [(c.seq.seq_id, c.start, c.length, c.sample) for c in plan.chunks] == [("a", 16, 14, True), ("b", 0, 2, False)]
    plan = step(sched)
    assert [(c.seq.seq_id, c.start, c.length, c.sample) for c in plan.chunks] == [("a", 30, 1, True), ("b", 2, 8, True)]
    assert plan.leftover == 7 and a.is_finished and a.output == [31, 32]


def test_several_partial_prefills_stay_within_the_budget():
    sched = Scheduler(BlockManager(64, 4), max_tokens_per_step=10)
    seqs = [make(f"s{i}", 7, 1) for i in range(4)]
    for s in seqs:
        sched.add(s)
    plans = run_to_completion(sched)
    assert all(p.num_tokens <= 10 for p in plans)
    assert sum(p.num_tokens for p in plans) == 28  # each prompt token computed exactly once
    assert [(c.seq.seq_id, c.start, c.length) for c in plans[0].chunks] == [("s0", 0, 7), ("s1", 0, 3)]
    assert [(c.seq.seq_id, c.start, c.length) for c in plans[1].chunks] == [("s1", 3, 4), ("s2", 0, 6)]


# ---- Scheduler: admission ----

def test_admission_is_first_come_first_served():
    sched = Scheduler(BlockManager(64, 4), max_tokens_per_step=100)
    for i in range(5):
        sched.add(make(f"s{i}", 3 + i, 2))
    plan = sched.schedule()
    assert [c.seq.seq_id for c in plan.chunks] == ["s0", "s1", "s2", "s3", "s4"]
    assert [s.seq_id for s in sched.running] == ["s0", "s1", "s2", "s3", "s4"]


def test_head_of_queue_blocks_smaller_later_requests():
    bm = BlockManager(4, 4)
    sched = Scheduler(bm, max_tokens_per_step=64)
    x, w1, w2 = make("x", 12, 2), make("w1", 8, 1), make("w2", 2, 1)
    for s in (x, w1, w2):
        sched.add(s)
    plan = step(sched)  # x takes 3 blocks; w1 needs 2, only 1 is free; w2 would fit but must wait
    assert [c.seq.seq_id for c in plan.chunks] == ["x"] and list(sched.waiting) == [w1, w2]
    plan = step(sched)  # x decodes into the last block and finishes
    assert [c.seq.seq_id for c in plan.chunks] == ["x"] and x.finish_reason == "length"
    plan = step(sched)
    assert [c.seq.seq_id for c in plan.chunks] == ["w1", "w2"]
    assert not sched.has_work and bm.num_free == 4


def test_max_seqs_caps_the_running_batch():
    sched = Scheduler(BlockManager(64, 4), max_tokens_per_step=100, max_seqs=2)
    seqs = [make(f"s{i}", 4, 2 + i) for i in range(4)]
    for s in seqs:
        sched.add(s)
    plan = step(sched)
    assert [c.seq.seq_id for c in plan.chunks] == ["s0", "s1"] and sched.num_waiting == 2
    plan = step(sched)  # s0 finishes (2 tokens) in this step; nobody is admitted until the next one
    assert [c.seq.seq_id for c in plan.chunks] == ["s0", "s1"] and seqs[0].is_finished
    plan = step(sched)
    assert [c.seq.seq_id for c in plan.chunks] == ["s1", "s2"] and seqs[1].is_finished
    plan = step(sched)
    assert [c.seq.seq_id for c in plan.chunks] == ["s2", "s3"] and sched.num_running == 2
    run_to_completion(sched)
    assert all(len(s.output) == s.max_new_tokens for s in seqs)


# ---- Scheduler: preemption ----

def test_preemption_when_blocks_run_out_and_the_victim_completes_later():
    bm = BlockManager(4, 4)
    sched = Scheduler(bm, max_tokens_per_step=64)
    a, b = make("a", 4, 8), make("b", 4, 8)
    sched.add(a)
    sched.add(b)
    for _ in range(5):
        plan = step(sched)
        assert plan.preempted == []
    assert bm.num_free == 0 and len(a.output) == len(b.output) == 5
    plan = step(sched)  # a needs a 3rd block for token 9: b, the newest, is evicted
    assert plan.preempted == [b] and [c.seq for c in plan.chunks] == [a]
    assert b.status is Status.WAITING and b.num_computed == 0 and b.output == [5, 6, 7, 8, 9]
    assert list(sched.waiting) == [b] and not bm.has("b")
    plans = run_to_completion(sched)
    re_prefill = next(c for p in plans for c in p.chunks if c.seq is b)
    assert (re_prefill.start, re_prefill.length, re_prefill.sample) == (0, 9, True)
    assert b.tokens[:9] == [1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert a.output == b.output == list(range(5, 13))
    assert b.num_computed == 11 and b.finish_reason == "length" and bm.num_free == 4


def test_a_sequence_preempts_itself_when_it_is_the_newest():
    bm = BlockManager(3, 4)
    sched = Scheduler(bm, max_tokens_per_step=64)
    a, b = make("a", 4, 5), make("b", 4, 5)
    sched.add(a)
    sched.add(b)
    step(sched)
    plan = step(sched)  # a takes the last free block; b finds none and is itself the newest
    assert [c.seq for c in plan.chunks] == [a] and plan.preempted == [b]
    assert sched.running == [a] and list(sched.waiting) == [b]
    run_to_completion(sched)
    assert a.output == b.output == [5, 6, 7, 8, 9] and bm.num_free == 3


def test_preempted_sequences_keep_admission_order_at_the_front_of_the_queue():
    bm = BlockManager(4, 2)
    sched = Scheduler(bm, max_tokens_per_step=64)
    p, q, r, s = (make(name, 2, 3) for name in "pqrs")
    late = make("late", 1, 1)
    for seq in (p, q, r, s):
        sched.add(seq)
    step(sched)  # one block each: the pool is full
    sched.add(late)
    plan = step(sched)  # p's 3rd token evicts s, q's evicts r; nothing is admitted in a step that evicted
    assert [c.seq for c in plan.chunks] == [p, q] and plan.preempted == [s, r]
    assert list(sched.waiting) == [r, s, late]
    run_to_completion(sched)
    assert all(seq.output == [3, 4, 5] for seq in (p, q, r, s)) and late.output == [2]
    assert bm.num_free == 4


# ---- Scheduler: finish and abort ----

def test_finish_by_length_frees_blocks():
    bm = BlockManager(8, 4)
    sched = Scheduler(bm)
    s = make("a", 3, 2)
    sched.add(s)
    step(sched)
    assert s.status is Status.RUNNING and s.output == [4]
    step(sched)
    assert s.status is Status.FINISHED and s.finish_reason == "length" and s.output == [4, 5]
    assert not sched.has_work and bm.num_free == 8 and sched.get("a") is None


def test_finish_by_the_engine_and_repeated_finish_is_a_noop():
    bm = BlockManager(8, 4)
    sched = Scheduler(bm)
    a, b = make("a", 3, 5), make("b", 3, 5)
    sched.add(a)
    sched.add(b)
    step(sched)
    sched.finish("a", "stop")
    assert a.finish_reason == "stop" and a.is_finished and sched.running == [b] and not bm.has("a")
    sched.finish("a", "length")
    sched.finish("never-seen", "stop")
    assert a.finish_reason == "stop"
    plan = step(sched)
    assert [c.seq for c in plan.chunks] == [b]


def test_abort_waiting_and_running():
    bm = BlockManager(8, 4)
    sched = Scheduler(bm, max_seqs=1)
    a, b = make("a", 3, 5), make("b", 3, 5)
    sched.add(a)
    sched.add(b)
    step(sched)
    assert sched.abort("b") is b and b.finish_reason == "abort" and b.is_finished and sched.num_waiting == 0
    assert sched.abort("a") is a and a.finish_reason == "abort" and sched.num_running == 0
    assert bm.num_free == 8 and not sched.has_work
    assert sched.abort("a") is None and sched.abort("nobody") is None
    sched.add(make("a", 2, 1))  # the id is free again
    assert sched.num_waiting == 1


def test_abort_between_schedule_and_update_skips_the_chunk():
    bm = BlockManager(8, 4)
    sched = Scheduler(bm)
    a, b = make("a", 3, 5), make("b", 3, 5)
    sched.add(a)
    sched.add(b)
    plan = sched.schedule()
    sched.abort("a")
    sched.update(plan, {"b": 9})  # no token for the aborted a is needed
    assert a.output == [] and b.output == [9] and b.num_computed == 3
    check_invariants(sched)


def test_update_rejects_a_stale_plan_and_a_missing_token():
    sched = Scheduler(BlockManager(8, 4))
    sched.add(make("a", 3, 5))
    plan = sched.schedule()
    with pytest.raises(KeyError, match="'a'"):
        sched.update(plan, {})
    sched = Scheduler(BlockManager(8, 4))
    sched.add(make("a", 3, 5))
    plan = sched.schedule()
    sched.update(plan, {"a": 1})
    with pytest.raises(RuntimeError, match="stale plan"):
        sched.update(plan, {"a": 1})


def test_an_empty_step_gives_the_whole_budget_to_finetuning():
    sched = Scheduler(BlockManager(8, 4), max_tokens_per_step=48)
    plan = sched.schedule()
    assert plan == StepPlan([], 48, []) and plan.num_tokens == 0 and not sched.has_work
    assert isinstance(Chunk(make("a", 1, 1), 0, 1, True), Chunk)


# ---- Scheduler: simulated engine loops ----

def random_request(rng: random.Random, i: int, max_len: int, max_kv: int) -> Sequence:
    n_prompt = rng.randint(1, 30)
    max_new = rng.randint(1, min(max_len - n_prompt, max_kv + 1 - n_prompt))
    return make(f"r{i}", n_prompt, max_new, adapter_slot=rng.choice([-1, 0, 1]))


@pytest.mark.parametrize("seed", range(5))
def test_simulated_engine_runs_50_random_requests_to_completion(seed):
    rng = random.Random(seed)
    bm = BlockManager(12, 4)  # 48 KV slots for up to 8 sequences of up to 48 tokens: preemption is routine
    sched = Scheduler(bm, max_tokens_per_step=rng.choice([8, 16, 32]), max_seqs=8, max_model_len=64)
    pending = [random_request(rng, i, 64, 48) for i in range(50)]
    done, n_steps, n_preempted = list(pending), 0, 0
    while pending or sched.has_work:
        for _ in range(rng.randint(0, 3)):
            if pending:
                sched.add(pending.pop(0))
        oldest = sched.running[0] if sched.running else None
        plan = step(sched)
        if oldest is not None:  # never starve: the oldest running sequence always progresses
            assert plan.chunks[0].seq is oldest
        n_steps += 1
        n_preempted += len(plan.preempted)
        assert n_steps < 20_000
    for s in done:
        assert s.finish_reason == "length" and len(s.output) == s.max_new_tokens
        n = len(s.prompt)
        assert s.output == list(range(n + 1, n + s.max_new_tokens + 1))
        assert s.num_computed == n + s.max_new_tokens - 1
    assert bm.num_free == bm.num_blocks and bm.seq_ids() == []
    assert n_preempted > 0  # the pool is small enough that the test exercises preemption


@pytest.mark.parametrize("seed", range(10))
def test_random_add_finish_abort_never_leak_blocks(seed):
    rng = random.Random(seed)
    bm = BlockManager(rng.randint(4, 16), rng.choice([1, 2, 4]))
    sched = Scheduler(bm, max_tokens_per_step=rng.choice([4, 16, 64]), max_seqs=rng.randint(1, 6), max_model_len=64)
    max_kv = bm.num_blocks * bm.block_size
    for i in range(400):
        op = rng.random()
        live = list(sched.running) + list(sched.waiting)
        if op < 0.25:
            sched.add(random_request(rng, i, 64, min(max_kv, 60)) if max_kv > 30 else make(f"r{i}", 1, 1))
        elif op < 0.35 and live:
            s = rng.choice(live)
            assert sched.abort(s.seq_id) is s and s.finish_reason == "abort"
        elif op < 0.45 and sched.running:
            s = rng.choice(sched.running)
            sched.finish(s.seq_id, "stop")
            assert s.finish_reason == "stop"
        else:
            step(sched)
        check_invariants(sched)
        assert bm.num_free + sum(len(bm.block_table(s.seq_id)) for s in sched.running) == bm.num_blocks
    for s in list(sched.running) + list(sched.waiting):
        sched.abort(s.seq_id)
    assert not sched.has_work and bm.num_free == bm.num_blocks and bm.seq_ids() == []


# ---- pure Python ----

def test_scheduler_and_block_manager_import_without_torch():
    """leantune/__init__ imports torch for the model API, so stub the parent packages and load only
    the serve modules: what they import themselves must stay torch- and numpy-free."""
    code = (
        "import sys, types\n"
        f"root = {str(SERVE_DIR.parent)!r}\n"
        "for name, path in (('leantune', root), ('leantune.serve', root + '/serve')):\n"
        "    mod = types.ModuleType(name); mod.__path__ = [path]; sys.modules[name] = mod\n"
        "import importlib\n"
        "assert importlib.import_module('leantune.serve.scheduler').Scheduler\n"
        "assert importlib.import_module('leantune.serve.block_manager').BlockManager\n"
        "bad = sorted(m for m in ('torch', 'numpy') if m in sys.modules)\n"
        "print('BAD', bad) if bad else print('OK')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "OK", out.stdout

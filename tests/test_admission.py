"""serve.admission.TimeShare: fine-tuning adds about its share to the time of serving iterations."""
from __future__ import annotations

import random

import pytest

from leantune.serve.admission import TimeShare


@pytest.mark.parametrize("share,ft_cost", [(0.2, 0.05), (0.1, 0.03), (0.3, 0.01)])
def test_fine_tuning_adds_its_share_of_iteration_time(share, ft_cost):
    rng = random.Random(0)
    ts = TimeShare(share)
    plain_total = extra = 0.0
    with_ft = 0
    n = 4000
    for _ in range(n):
        plain = 0.1 * rng.uniform(0.9, 1.1)  # a plain decode iteration, 100 ms +- 10%
        ft = ts.admit(inference=True)
        took = plain + (ft_cost * rng.uniform(0.8, 1.2) if ft else 0.0)
        ts.record(True, ft, took)
        plain_total += plain
        extra += took - plain
        with_ft += ft
    # fine-tuning adds its share, or all it can when its work is cheaper than that (every iteration)
    assert extra / plain_total == pytest.approx(min(share, ft_cost / 0.1), rel=0.1)
    # the work went in as often as the share pays for: share * plain / cost of a unit
    assert with_ft / n == pytest.approx(min(1.0, share * 0.1 / ft_cost), rel=0.1)


def test_without_inference_the_job_runs_freely_and_needs_a_plain_iteration_first():
    ts = TimeShare(0.2)
    assert ts.admit(inference=False)
    assert not ts.admit(inference=True)  # nothing measured yet: serve one plain iteration first
    ts.record(True, False, 0.1)
    assert ts.admit(inference=True)
    ts.record(True, True, 0.5)  # a slow fine-tuning iteration: +0.4 s against 0.02 s of credit
    assert not ts.admit(inference=True)
    for _ in range(19):
        ts.record(True, False, 0.1)
    assert ts.admit(inference=True)  # 20 plain iterations paid it back
    ts.record(False, True, 5.0)  # idle-time work is not charged
    assert ts.admit(inference=True)
    with pytest.raises(ValueError, match="share"):
        TimeShare(0.0)


@pytest.mark.parametrize("token_s,expect_full", [(0.004, False), (0.00001, True)])
def test_forward_chunks_are_sized_to_what_the_share_buys(token_s, expect_full):
    """A CPU-like cost per forward token (4 ms against a 100 ms decode iteration) gets small chunks (the
    floor), and the share still holds; a GPU-like one (tokens beside a decode batch nearly free) gets the
    whole chunk every iteration."""
    rng = random.Random(1)
    ts, share, wanted = TimeShare(0.15), 0.15, 32
    plain_total = extra = 0.0
    sizes = []
    for _ in range(3000):
        plain = 0.1 * rng.uniform(0.95, 1.05)
        n = ts.fwd_tokens(True, wanted) if ts.admit(True) else 0
        took = plain + n * token_s * rng.uniform(0.9, 1.1)
        ts.record(True, n > 0, took, n)
        plain_total += plain
        extra += took - plain
        sizes.append(n)
    assert ts.fwd_tokens(False, wanted) == wanted  # no requests waiting: the whole chunk
    late = [n for n in sizes[500:] if n]
    if expect_full:
        assert min(late) == wanted
    else:
        assert extra / plain_total == pytest.approx(share, rel=0.1)
        # ~15 ms of credit buys ~4 tokens: chunks of the floor, never the 32 at once
        assert set(late) == {TimeShare.MIN_CHUNK}
        assert max(sizes[:5]) <= TimeShare.MIN_CHUNK  # before a measurement: a small chunk, not the full one


def test_a_slow_first_sample_does_not_lift_the_bound():
    """The first plain iteration a server sees is often a prefill, several times a decode iteration. Taken as
    the reference for good, it would make every fine-tuning iteration look free, admit the job everywhere
    and never measure a plain iteration again; a median over plain iterations served at least every
    `REFRESH` iterations gets back to the real reference and the share holds."""
    rng = random.Random(2)
    ts, share, cost = TimeShare(0.15), 0.15, 0.05
    ts.record(True, False, 0.5)  # a 500 ms prefill, against 100 ms decode iterations
    plain_total = extra = 0.0
    for _ in range(4000):
        plain = 0.1 * rng.uniform(0.95, 1.05)
        ft = ts.admit(True)
        took = plain + (cost if ft else 0.0)
        ts.record(True, ft, took, bwd_seconds=cost if ft else 0.0)
        plain_total += plain
        extra += took - plain
    assert ts.plain_s == pytest.approx(0.1, rel=0.06)
    assert extra / plain_total == pytest.approx(share, rel=0.12)


def test_backward_time_is_charged_even_when_the_iteration_looks_plain():
    ts = TimeShare(0.2)
    for _ in range(3):
        ts.record(True, False, 0.1)
    before = ts.bucket
    ts.record(True, True, 0.09, bwd_seconds=0.04)  # faster than the reference, yet 40 ms went to backward
    assert ts.bucket == pytest.approx(before + 0.2 * 0.1 - 0.04)
    assert ts.extra_s == pytest.approx(0.04)


def test_a_plain_iteration_is_served_every_refresh_iterations():
    ts = TimeShare(0.5)
    ts.record(True, False, 0.1)
    admitted = 0
    while ts.admit(True):
        ts.record(True, True, 0.1)  # free fine-tuning work: the bucket alone would never say no
        admitted += 1
    assert admitted == TimeShare.REFRESH
    ts.record(True, False, 0.1)
    assert ts.admit(True)

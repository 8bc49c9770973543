"""Time-share admission of fine-tuning work into serving iterations (a token bucket on measured time).

The leftover token budget alone lets fine-tuning into every iteration that has room, so on hardware
without idle compute (a CPU) each iteration that carries a forward chunk or a backward slice is slower
by that work, and inference latency grows by whatever fraction of time the job takes. With a share
`f`, fine-tuning may add at most `f` to the time of iterations that serve requests: every such
iteration credits `f x` (the running time of a plain inference iteration) to a bucket, an iteration
that carried fine-tuning work is charged what it took beyond a plain one, and work is admitted only
while the bucket is not negative. Time-per-output-token then grows by about `f`, and the job trains
at what that share of time buys. Without inference the job runs freely (the bucket is untouched).

The plain time is the median of the last few iterations that carried no fine-tuning work, and one such
iteration is served at least every `REFRESH` serving iterations: a single slow sample (the prefill that
starts a server's first requests) must not become a reference that makes every later iteration look
cheap, which would let the job in everywhere and never measure a plain iteration again. An iteration is
charged at least the time its backward slices took by the engine's own clock (`bwd_seconds`), whatever the
reference says.

Forward chunks are sized too: the extra seconds per forward token are measured (a running mean over
iterations that carried a chunk), and an iteration carries the tokens its credit buys, but at least
`MIN_CHUNK`: a chunk has a fixed cost (its adapter's rows in every linear: ~20 ms on SmolLM2 on a CPU,
as much as 5 tokens' compute), so one-token chunks would spend the share on overhead. On a CPU a
32-token SmolLM2 chunk would add more than a whole decode iteration at once; on a GPU, where tokens
beside a decode batch cost next to nothing, the allowance reaches the chunk size.
Pure Python; the engine measures the times.
"""
from __future__ import annotations

import statistics
from collections import deque


class TimeShare:
    """Admission by time share `share` (> 0) of iterations that serve requests."""

    MIN_CHUNK = 8  # fewest forward tokens of a chunk (its fixed cost is ~5 tokens' worth on a CPU)
    REFRESH = 16  # at most this many serving iterations in a row carry fine-tuning work
    PLAIN_WINDOW = 9  # plain iterations the reference is the median of

    def __init__(self, share: float, smoothing: float = 0.1, burst: float = 4.0):
        if not share > 0:
            raise ValueError(f"the fine-tuning time share must be > 0, got {share!r}")
        self.share, self.smoothing, self.burst = share, smoothing, burst
        self.plain_s: float | None = None  # median time of the recent inference iterations without fine-tuning
        self._plain: deque[float] = deque(maxlen=self.PLAIN_WINDOW)
        self.since_plain = 0  # serving iterations since the last plain one
        self.bucket = 0.0  # seconds fine-tuning may still add
        self.served = self.with_ft = 0  # serving iterations, and those that carried fine-tuning
        self.extra_s = 0.0  # what fine-tuning added to serving iterations (measured against plain_s)
        self.fwd_token_s: float | None = None  # running mean of the extra seconds per forward token

    def fwd_tokens(self, inference: bool, wanted: int) -> int:
        """How many of `wanted` fine-tuning forward tokens this iteration may carry: all without inference;
        with it, what the bucket plus this iteration's credit buys, at least `MIN_CHUNK` (and that before a
        first measurement)."""
        if not inference:
            return wanted
        floor = min(wanted, self.MIN_CHUNK)
        if self.fwd_token_s is None or self.plain_s is None:
            return floor
        credit = self.bucket + self.share * self.plain_s
        return max(floor, min(wanted, int(credit / max(self.fwd_token_s, 1e-9))))

    def admit(self, inference: bool) -> bool:
        """May this iteration carry fine-tuning work?"""
        if not inference:
            return True
        return self.plain_s is not None and self.since_plain < self.REFRESH and self.bucket >= 0.0

    def record(self, inference: bool, with_ft: bool, seconds: float, fwd_tokens: int = 0,
               bwd_seconds: float = 0.0) -> None:
        """Account one iteration that took `seconds` (with fine-tuning work in it or not; `fwd_tokens` of
        it a forward chunk, `bwd_seconds` of it backward slices)."""
        if not inference:
            return
        self.served += 1
        self.with_ft += with_ft
        if not with_ft:
            self._plain.append(seconds)
            self.plain_s = statistics.median(self._plain)
            self.since_plain = 0
        else:
            self.since_plain += 1
        if self.plain_s is None:
            return
        self.bucket += self.share * self.plain_s
        if with_ft:
            extra = max(0.0, seconds - self.plain_s, bwd_seconds)
            self.bucket -= extra
            self.extra_s += extra
            if fwd_tokens:
                per = extra / fwd_tokens
                a = self.smoothing
                self.fwd_token_s = per if self.fwd_token_s is None else (1 - a) * self.fwd_token_s + a * per
        # no credit hoarded across a long idle stretch: at most a few iterations' worth at once
        self.bucket = min(self.bucket, self.burst * self.share * self.plain_s)

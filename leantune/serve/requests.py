"""One inference request's life outside the scheduler: sampling settings, incremental detokenization,
stop strings and the events streamed back to the HTTP layer.

The scheduler knows only token ids; this module turns sampled ids into text deltas, decides when a
request stops (EOS, a stop token, a stop string, max tokens) and reports usage. Events are plain dicts handed
to a `sink` callable that the API supplies (it hops them onto its event loop); with `n` > 1 one request runs
several sequences (its choices, `index` in every event), all sharing that sink.

Log-probability records (`{"id", "logprob", "rank", "top": [(id, logprob), ...]}`) are the model's own
log-softmax: at each output position, and, when asked (`prompt_logprobs`: `echo` + `logprobs` on completions,
vLLM's `prompt_logprobs`), at each prompt position from the second token on (the first has no context, so
OpenAI and vLLM report null for it).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from ..models.generate import GenerationConfig, sample_next


class LogitsProcessor(Protocol):
    """Per-request, stateful: rewrites the next-token logits before sampling (penalties, logit_bias, a grammar's
    mask) and hears every token the request accepts. One instance per generated sequence (`n` > 1 makes one per
    choice), built by a factory in `GenRequest.processors`."""

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:  # (V,) float -> (V,)
        ...

    def accept(self, tok: int) -> None:
        ...


@dataclass
class GenRequest:
    prompt_ids: list[int]
    model: str  # base model name or an adapter name, as the client sent it
    owner: str | None = None
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False
    top_k: int = 0  # 0: all tokens
    logprobs: int | None = None  # None: none; k: each output token's log-probability and the k likeliest's
    prompt_logprobs: int | None = None  # None: none; k: the same for every prompt token but the first
    n: int = 1  # sequences sampled from this prompt (the engine prefills the prompt once and forks them)
    rank_by_logprob: bool = False  # report each sequence's cumulative logprob (best_of picks by it)
    stop_token_ids: list[int] = field(default_factory=list)  # end the text like EOS does (not output)
    # factories of this request's LogitsProcessors, applied in order (each sequence calls every factory once)
    processors: list[Callable[[], LogitsProcessor]] = field(default_factory=list)

    def __post_init__(self):
        if not self.prompt_ids:
            raise ValueError("the prompt is empty")
        if not isinstance(self.max_tokens, int) or self.max_tokens < (0 if self.prompt_logprobs is not None else 1):
            raise ValueError(f"max_tokens must be an integer >= 1 (0 only with echo or prompt_logprobs: the prompt's "
                             f"log-probabilities alone), got {self.max_tokens!r}")
        if not 0 <= self.temperature <= 2:
            raise ValueError(f"temperature must be between 0 and 2, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0: all tokens), got {self.top_k!r}")
        if self.logprobs is not None and not (isinstance(self.logprobs, int) and 0 <= self.logprobs <= 20):
            raise ValueError(f"logprobs must be an integer in 0..20 (top tokens per position), got {self.logprobs!r}")
        if self.prompt_logprobs is not None and not (isinstance(self.prompt_logprobs, int)
                                                     and 0 <= self.prompt_logprobs <= 20):
            raise ValueError(f"prompt_logprobs must be an integer in 0..20, got {self.prompt_logprobs!r}")
        if not isinstance(self.n, int) or not 1 <= self.n <= 128:
            raise ValueError(f"n must be an integer in 1..128, got {self.n!r}")
        if len(self.stop) > 4 or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError("stop must be up to 4 non-empty strings")


def logprob_record(lp: torch.Tensor, tok: int, k: int) -> dict:
    """lp (V,) a log-softmax row -> the record of token `tok` there: its logprob, its rank (1: the likeliest,
    vLLM's) and the k likeliest (id, logprob)."""
    top = torch.topk(lp, k) if k else None
    return {"id": tok, "logprob": float(lp[tok]), "rank": int((lp > lp[tok]).sum()) + 1,
            "top": [] if top is None else list(zip(top.indices.tolist(), top.values.tolist()))}


class RequestState:
    """Engine-side state of one sequence of a request (choice `index`; a request with `n` > 1 has n of them, which
    share `prompt_lps`: the prompt's records, filled while the first sequence prefills)."""

    def __init__(self, req: GenRequest, adapter: str | None, sink: Callable[[dict], None], tokenizer,
                 index: int = 0, prompt_lps: list | None = None):
        self.req, self.adapter, self.sink, self.tk, self.index = req, adapter, sink, tokenizer, index
        self.gen = GenerationConfig(max_new_tokens=max(req.max_tokens, 1), temperature=req.temperature,
                                    top_p=req.top_p, top_k=req.top_k)
        self.rng = None
        if req.seed is not None and req.temperature > 0:  # choice i draws from seed + i: n different samples,
            self.rng = torch.Generator().manual_seed((req.seed + index) % (1 << 64))  # each reproducible
        self.prompt_lps: list[dict] = [] if prompt_lps is None else prompt_lps
        self.prompt_sent = req.prompt_logprobs is None  # the prompt's records go with the first event
        self.cum_logprob = 0.0  # of the output tokens (the model's log-softmax), when rank_by_logprob
        self.ids: list[int] = []  # tokens that count as output text (EOS excluded)
        self.sent = ""  # text already streamed
        self.hold = max((len(s) for s in req.stop), default=1) - 1  # chars that may start a stop string
        self.done = False
        self.lps: list[dict] = []  # logprobs of output tokens not yet sent with an event
        self.processors = [make() for make in req.processors]

    def sample(self, logits: torch.Tensor) -> int:
        """logits (V,) -> next token id, with this request's settings and generator."""
        shaped = logits
        for p in self.processors:
            shaped = p(shaped)
        tok = int(sample_next(shaped[None], self.gen, self.rng)[0])
        for p in self.processors:
            p.accept(tok)
        if self.req.max_tokens == 0:  # prompt logprobs only: this token is not output
            return tok
        if self.req.logprobs is not None or self.req.rank_by_logprob:
            # the model's own distribution (log-softmax of the raw logits), not the penalized/temperature/top-k/
            # top-p one sampled from: what OpenAI and vLLM's default report
            lp = torch.log_softmax(logits.float(), -1)
            self.cum_logprob += float(lp[tok])
            if self.req.logprobs is not None:
                self.lps.append(logprob_record(lp, tok, self.req.logprobs))
        return tok

    def wants_prompt_logits(self, start: int, length: int) -> bool:
        """Whether the chunk at positions [start, start + length) predicts prompt tokens not recorded yet."""
        nxt = len(self.prompt_lps) + 1  # the first prompt token without a record (the first token never has one)
        return self.req.prompt_logprobs is not None and nxt <= start + length and nxt < len(self.req.prompt_ids)

    def record_prompt(self, start: int, logits: torch.Tensor) -> None:
        """logits (n, V) of positions start..start+n-1: each predicts the next prompt token. Positions recorded
        before (a chunk run again after preemption) are skipped."""
        prompt, k = self.req.prompt_ids, self.req.prompt_logprobs
        lp = torch.log_softmax(logits.float(), -1)  # (n, V)
        for j in range(lp.shape[0]):
            nxt = start + j + 1  # the prompt token this row predicts
            if nxt == len(self.prompt_lps) + 1 and nxt < len(prompt):
                self.prompt_lps.append(logprob_record(lp[j], prompt[nxt], k))

    def on_token(self, tok: int) -> str | None:
        """Record a sampled token; returns a finish reason ("stop") when the request must end here."""
        if self.req.max_tokens == 0:
            return "length"
        if (tok in self.tk.eos_ids and not self.req.ignore_eos) or tok in self.req.stop_token_ids:
            if self.lps:  # EOS is not output text: its logprob is not reported (as completion_tokens omits it)
                self.lps.pop()
            return "stop"
        self.ids.append(tok)
        text = self.tk.decode(self.ids)
        for s in self.req.stop:
            cut = text.find(s, max(0, len(self.sent) - len(s)))
            if cut >= 0:
                self._emit(text[:cut], None)
                return "stop"
        safe = len(text) - self.hold
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            safe = min(safe, len(text) - 1)
        self._emit(text[:max(safe, len(self.sent))], None)
        return None

    def _emit(self, upto: str, finish: str | None) -> None:
        delta = upto[len(self.sent):]
        self.sent = upto
        if delta or finish:
            ev = {"index": self.index, "text": delta, "finish_reason": finish,
                  "prompt_tokens": len(self.req.prompt_ids), "completion_tokens": len(self.ids)}
            if self.req.logprobs is not None:  # the tokens sampled since the last event, text held back or not
                ev["logprobs"], self.lps = self.lps, []
            if not self.prompt_sent:
                ev["prompt_logprobs"], self.prompt_sent = list(self.prompt_lps), True
            if finish and self.req.rank_by_logprob:
                ev["cumulative_logprob"] = self.cum_logprob
            self.sink(ev)

    def finish(self, reason: str) -> None:
        """Flush held-back text (unless a stop string cut it) and send the final event."""
        if self.done:
            return
        self.done = True
        text = self.sent if reason == "stop" and self.req.stop and self._stopped() else self.tk.decode(self.ids)
        self._emit(text, reason)

    def _stopped(self) -> bool:
        text = self.tk.decode(self.ids)
        return any(s in text for s in self.req.stop)

    def fail(self, message: str) -> None:
        self.done = True
        self.sink({"index": self.index, "error": message, "finish_reason": "error"})

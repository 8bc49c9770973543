"""Logits processors for OpenAI's and vLLM's sampling knobs, as `serve.requests.LogitsProcessor`s (one instance
per generated sequence, told each token it accepts).

- `Penalties`: OpenAI's presence and frequency penalties, `logits[j] -= c[j] * frequency + (c[j] > 0) * presence`
  with c the counts of j among the sequence's output tokens so far (platform.openai.com, "Parameter details");
  vLLM's `repetition_penalty` (CTRL, Keskar et al. 2019: a logit of a token seen in the prompt or the output is
  divided by the penalty when positive, multiplied when negative).
- `LogitBias`: OpenAI's `logit_bias`, added to the logits (-100 bans a token, 100 all but forces it).
- `MinP`: vLLM's `min_p`, drops tokens less likely than min_p times the likeliest after temperature.
- `MinTokens`: vLLM's `min_tokens`, bans the end-of-sequence and stop tokens until that many were generated.
"""
from __future__ import annotations

import math

import torch


class Penalties:
    def __init__(self, prompt_ids: list[int], vocab: int, presence: float = 0.0, frequency: float = 0.0,
                 repetition: float = 1.0):
        self.presence, self.frequency, self.repetition = presence, frequency, repetition
        self.counts = torch.zeros(vocab)  # (V,) output occurrences
        self.seen = torch.zeros(vocab, dtype=torch.bool)  # (V,) in the prompt or the output
        self.seen[torch.tensor(prompt_ids, dtype=torch.long)] = True

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:  # (V,)
        logits = logits.float()
        if self.repetition != 1.0:
            pen = torch.where(logits > 0, logits / self.repetition, logits * self.repetition)
            logits = torch.where(self.seen, pen, logits)
        return logits - self.counts * self.frequency - (self.counts > 0).float() * self.presence

    def accept(self, tok: int) -> None:
        self.counts[tok] += 1
        self.seen[tok] = True


class LogitBias:
    def __init__(self, bias: dict[int, float], vocab: int):
        self.bias = torch.zeros(vocab)  # (V,)
        for tok, v in bias.items():
            self.bias[tok] = v

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.float() + self.bias

    def accept(self, tok: int) -> None:
        pass


class MinP:
    """Keeps tokens with p >= min_p * p_max under the temperature-scaled distribution: in logits,
    l >= l_max + temperature * log(min_p) (vLLM applies min_p after temperature; greedy is unaffected)."""

    def __init__(self, min_p: float, temperature: float):
        self.cut = temperature * math.log(min_p)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.masked_fill(logits < logits.max() + self.cut, float("-inf"))

    def accept(self, tok: int) -> None:
        pass


class MinTokens:
    def __init__(self, min_tokens: int, banned: set[int]):
        self.left, self.banned = min_tokens, torch.tensor(sorted(banned), dtype=torch.long)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.left <= 0 or not self.banned.numel():
            return logits
        return logits.index_fill(0, self.banned, float("-inf"))

    def accept(self, tok: int) -> None:
        self.left -= 1

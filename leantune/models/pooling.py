"""Sentence embeddings from a model's hidden states: the masked mean over a row's tokens, L2-normalized
(sentence-transformers' mean Pooling followed by Normalize). One definition for `/v1/embeddings`
(serve.embed) and for `leantune select`'s embedders (data.select_embed)."""
from __future__ import annotations

import torch


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T, C) hidden states and their (B, T) mask of real tokens (bool or 0/1) -> (B, C) fp32 unit vectors:
    each row's mean over its real tokens. Summed in fp32, so a bf16 model's states are not accumulated in bf16;
    a row without tokens divides by 1 (its vector is 0, not NaN)."""
    m = mask.to(torch.float32)  # (B, T)
    summed = torch.einsum("btc,bt->bc", hidden.float(), m)  # (B, C)
    return torch.nn.functional.normalize(summed / m.sum(1, keepdim=True).clamp_min(1), dim=-1)

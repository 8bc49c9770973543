"""A contiguous KV cache for batched generation: one (B, Hkv, S_max, D) buffer pair per layer.

Rows share cache positions (prompts are left-padded to one length); `key_valid` marks which slots hold
real tokens, so padding is never attended. The server's paged cache replaces this for serving.
"""
from __future__ import annotations

import torch


class KVCache:
    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, head_dim: int, max_len: int,
                 dtype=torch.float32, device="cpu"):
        shape = (batch, num_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.key_valid = torch.ones(batch, max_len, dtype=torch.bool, device=device)
        self.has_key_mask = False
        self.length = 0
        self.max_len = max_len

    @classmethod
    def for_model(cls, model, batch: int, max_len: int) -> "KVCache":
        c, p = model.config, next(model.parameters())
        dtype = p.dtype if p.is_floating_point() else torch.float32
        return cls(c.num_layers, batch, c.num_kv_heads, c.head_dim, max_len, dtype, p.device)

    def set_padding(self, valid: torch.Tensor) -> None:
        """valid: (B, T0) bool for the first chunk (False = left padding)."""
        self.key_valid[:, : valid.shape[1]] = valid
        self.has_key_mask = bool((~valid).any())

    def _extend(self, layer: int, k: torch.Tensor) -> None:
        """Cache layers past the model's own (a side network's, numbered after the base's layers) are made on
        their first use, in the shape and dtype of their keys."""
        while len(self.k) <= layer:
            shape = (k.shape[0], k.shape[1], self.max_len, k.shape[3])
            self.k.append(torch.zeros(shape, dtype=k.dtype, device=k.device))
            self.v.append(torch.zeros(shape, dtype=k.dtype, device=k.device))

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        T = k.shape[2]
        end = self.length + T
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} tokens > max_len {self.max_len}")
        self._extend(layer, k)
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def key_mask(self, S: int) -> torch.Tensor:
        return self.key_valid[:, :S]

    def advance(self, T: int) -> None:
        self.length += T

    def select(self, rows: torch.Tensor) -> None:
        """Keep only `rows` (finished sequences drop out of the batch)."""
        self.k = [t[rows] for t in self.k]
        self.v = [t[rows] for t in self.v]
        self.key_valid = self.key_valid[rows]

"""Paged KV cache bookkeeping: which fixed-size cache blocks each sequence owns (PagedAttention, vLLM).

The KV cache is `num_blocks` blocks of `block_size` token slots each. A sequence owns a block table, a
list of block ids; its token at position p lives in flat slot `table[p // block_size] * block_size +
p % block_size`. Tables only grow (`ensure`) until the sequence is freed, which returns every block.

Pure Python, no torch: the model runner turns tables and slots into tensors.

No prefix caching, on purpose: blocks are never shared between sequences nor kept after `free`. The
engine relies on this: an adapter reloaded under the same name has new weights, and KV computed with
the old weights must never be reused for it; without sharing, every sequence computes its own KV.
"""
from __future__ import annotations

from collections import deque


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


class BlockManager:
    """Free list + per-sequence block tables over a pool of `num_blocks` blocks of `block_size` tokens."""

    def __init__(self, num_blocks: int, block_size: int):
        _check_positive("num_blocks", num_blocks)
        _check_positive("block_size", block_size)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._tables: dict[str, list[int]] = {}

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for_tokens(self, n_tokens: int) -> int:
        """Blocks a table needs to hold `n_tokens` tokens (ceil division)."""
        if n_tokens < 0:
            raise ValueError(f"n_tokens must be >= 0, got {n_tokens}")
        return -(-n_tokens // self.block_size)

    def blocks_needed(self, seq_id: str, n_tokens: int) -> int:
        """Extra blocks `seq_id` needs so that its table holds `n_tokens` tokens in total (0 if it does)."""
        have = len(self._tables.get(seq_id, ()))
        return max(0, self.blocks_for_tokens(n_tokens) - have)

    def can_ensure(self, seq_id: str, n_tokens: int) -> bool:
        return self.blocks_needed(seq_id, n_tokens) <= len(self._free)

    def ensure(self, seq_id: str, n_tokens: int) -> bool:
        """Grow `seq_id`'s table to hold `n_tokens` tokens. All or nothing: on False nothing changed."""
        need = self.blocks_needed(seq_id, n_tokens)
        if need > len(self._free):
            return False
        table = self._tables.setdefault(seq_id, [])
        table.extend(self._free.popleft() for _ in range(need))
        return True

    def block_table(self, seq_id: str) -> list[int]:
        """A copy of `seq_id`'s block table ([] for an unknown sequence)."""
        return list(self._tables.get(seq_id, ()))

    def slots(self, seq_id: str, start: int, end: int) -> list[int]:
        """Flat KV slot indices of positions [start, end) of `seq_id`; they must have been ensured."""
        table = self._tables.get(seq_id, [])
        capacity = len(table) * self.block_size
        if not 0 <= start <= end <= capacity:
            raise ValueError(f"positions [{start}, {end}) of sequence {seq_id!r} are outside its "
                             f"{capacity} ensured slots; call ensure({seq_id!r}, {end}) first")
        bs = self.block_size
        return [table[p // bs] * bs + p % bs for p in range(start, end)]

    def free(self, seq_id: str) -> None:
        """Return all of `seq_id`'s blocks to the free list. Freeing an unknown sequence does nothing."""
        self._free.extend(self._tables.pop(seq_id, ()))

    def has(self, seq_id: str) -> bool:
        return seq_id in self._tables

    def seq_ids(self) -> list[str]:
        """Sequences that own a table, for invariant checks and debugging."""
        return list(self._tables)

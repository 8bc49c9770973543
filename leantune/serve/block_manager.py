"""Paged KV cache bookkeeping: which fixed-size cache blocks each sequence owns (PagedAttention, vLLM).

The KV cache is `num_blocks` blocks of `block_size` token slots each. A sequence owns a block table, a
list of block ids; its token at position p lives in flat slot `table[p // block_size] * block_size +
p % block_size`. Tables only grow (`ensure`) until the sequence is freed, which returns every block.

Pure Python, no torch: the model runner turns tables and slots into tensors.

No prefix caching, on purpose: blocks are never kept after `free` nor shared between requests. The
engine relies on this: an adapter reloaded under the same name has new weights, and KV computed with
the old weights must never be reused for it. The one sharing is `fork`: the sequences of one request
(`n` > 1, `best_of`) share the full blocks of their common prompt, refcounted (vLLM's fork), computed once
by the first sequence with the request's own adapter. Only full blocks are shared and the prompt's tail
is recomputed by each fork, so no shared block is ever written again (no copy-on-write).
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
        self._refs: dict[int, int] = {}  # block -> tables holding it (> 1 only for forked prompts)

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
        for _ in range(need):
            b = self._free.popleft()
            self._refs[b] = 1
            table.append(b)
        return True

    def fork(self, parent: str, child: str, n_tokens: int) -> None:
        """Give `child` (no table yet) `parent`'s blocks for positions [0, n_tokens), shared: `n_tokens` must be
        a whole number of blocks, which the parent has filled and will not write again."""
        if n_tokens % self.block_size or self.blocks_for_tokens(n_tokens) > len(self._tables.get(parent, ())):
            raise ValueError(f"fork shares whole blocks the parent {parent!r} holds; {n_tokens} tokens are not")
        if self._tables.get(child):
            raise ValueError(f"sequence {child!r} already owns blocks; a fork starts a new table")
        shared = self._tables[parent][: n_tokens // self.block_size] if n_tokens else []
        for b in shared:
            self._refs[b] += 1
        self._tables[child] = list(shared)

    def refcount(self, block: int) -> int:
        """Tables holding `block` (0: free)."""
        return self._refs.get(block, 0)

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
        """Drop `seq_id`'s table; its blocks no other table holds return to the free list. Freeing an unknown
        sequence does nothing."""
        for b in self._tables.pop(seq_id, ()):
            self._refs[b] -= 1
            if not self._refs[b]:
                del self._refs[b]
                self._free.append(b)

    def has(self, seq_id: str) -> bool:
        return seq_id in self._tables

    def seq_ids(self) -> list[str]:
        """Sequences that own a table, for invariant checks and debugging."""
        return list(self._tables)

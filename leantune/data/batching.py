"""Batching: tokenized examples -> (B, T) tensors, padded or packed, deterministic and resumable.

- `pad_batch`: one example per row, right padding. No attention mask is needed: under causal attention a
  real token never sees the pads after it, and pads carry label -100.
- `pack`: greedy sample packing (as in torchtune's and Axolotl's packed SFT): examples are concatenated
  into rows of at most max_length tokens; positions restart at 0 for each example and `segment_ids` number
  the examples of a row 1, 2, ... (0 = padding), so the model attends only within a segment
  (`ForwardMeta.segment_ids`) and no sample sees another.
- `batches_for_epoch`: a fixed shuffle per (seed, epoch) from `torch.Generator`, so a resumed run rebuilds
  exactly the batches of the interrupted epoch and skips the ones already done.

Labels follow the convention of `formats.py`: aligned with input_ids, shifted by the loss, and the first
label of every example is -100, so `num_loss_tokens` is exactly what a shifted loss sums over.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from .formats import IGNORE_INDEX, Example
from .readers import DataError


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T) long
    labels: torch.Tensor  # (B, T) long; -100 on prompts, padding and the first token of each example
    positions: torch.Tensor  # (B, T) long; 0.. per example, 0 on padding
    segment_ids: torch.Tensor | None  # (B, T) long; 1.. per example in a packed row, 0 = padding; None unpacked
    num_loss_tokens: int  # labels != -100
    num_tokens: int = 0  # real (non-padding) tokens, for throughput

    def to(self, device, non_blocking: bool = False) -> "Batch":
        move = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)  # noqa: E731
        return Batch(
            move(self.input_ids), move(self.labels), move(self.positions), move(self.segment_ids),
            self.num_loss_tokens, self.num_tokens,
        )


def _rows_to_batch(rows: list[list[Example]], pad_id: int, packed: bool) -> Batch:
    """Lay out rows (each a list of examples placed end to end) in (B, T) tensors, T = the longest row."""
    if not rows or not all(rows):
        raise ValueError("cannot build a batch from no examples")
    T = max(sum(len(e) for e in row) for row in rows)
    B = len(rows)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    pos = torch.zeros((B, T), dtype=torch.long)
    seg = torch.zeros((B, T), dtype=torch.long)
    for b, row in enumerate(rows):
        t = 0
        for s, ex in enumerate(row, start=1):
            n = len(ex)
            if n == 0:
                raise ValueError(f"example from line {ex.line} has no tokens")
            ids[b, t : t + n] = torch.tensor(ex.input_ids, dtype=torch.long)
            labels[b, t : t + n] = torch.tensor(ex.labels, dtype=torch.long)
            labels[b, t] = IGNORE_INDEX  # never predict a sample's first token from the previous sample
            pos[b, t : t + n] = torch.arange(n)
            seg[b, t : t + n] = s
            t += n
    return Batch(ids, labels, pos, seg if packed else None, int((labels != IGNORE_INDEX).sum()), int((seg > 0).sum()))


def pad_batch(examples: list[Example], pad_id: int = 0) -> Batch:
    """One example per row, right-padded to the longest; segment_ids None."""
    return _rows_to_batch([[e] for e in examples], pad_id, packed=False)


def pack_rows(examples: list[Example], max_length: int) -> list[list[Example]]:
    """Greedy packing in the given order: start a new row when the next example does not fit."""
    rows: list[list[Example]] = []
    used = max_length + 1  # forces a new row for the first example
    for ex in examples:
        if len(ex) > max_length:
            raise DataError(
                f"{ex.source or 'data'}:{ex.line}: example has {len(ex)} tokens, more than the packing "
                f"max_length={max_length}; load the data with the same max_length (or truncate)"
            )
        if used + len(ex) > max_length:
            rows.append([])
            used = 0
        rows[-1].append(ex)
        used += len(ex)
    return rows


def pack(examples: list[Example], max_length: int, pad_id: int = 0) -> Batch:
    """All `examples` packed greedily into rows of <= max_length tokens, one Batch (T = the longest row)."""
    return _rows_to_batch(pack_rows(examples, max_length), pad_id, packed=True)


def epoch_order(n: int, epoch: int, seed: int) -> list[int]:
    """The permutation of n examples used in `epoch`: a function of (seed, epoch) only."""
    key = hashlib.sha256(f"leantune:{seed}:{epoch}".encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(key[:8], "little") >> 1)
    return torch.randperm(n, generator=g).tolist()


def batches_for_epoch(
    examples: list[Example],
    batch_size: int,
    epoch: int,
    seed: int,
    pack: bool = False,
    max_length: int | None = None,
    pad_id: int = 0,
) -> list[Batch]:
    """The batches of one epoch, in order. Unpacked: `batch_size` shuffled examples per batch, padded.
    Packed: the shuffled examples are packed into rows of <= max_length tokens and `batch_size` counts rows.
    The last batch may be smaller. The same (examples, seed, epoch) always gives the same batches."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}; set --batch-size")
    if not examples:
        raise ValueError("no examples to batch")
    order = [examples[i] for i in epoch_order(len(examples), epoch, seed)]
    if not pack:
        return [pad_batch(order[i : i + batch_size], pad_id) for i in range(0, len(order), batch_size)]
    if max_length is None:
        raise ValueError("packing needs max_length (the row length); set --max-length")
    rows = pack_rows(order, max_length)
    return [_rows_to_batch(rows[i : i + batch_size], pad_id, packed=True) for i in range(0, len(rows), batch_size)]

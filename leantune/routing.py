"""Per-forward adapter routing: which adapter slot each row (or token) of a batch uses, worked out once.

A forward with `adapter_ids` hands them to every adapter layer (210 linears in SmolLM2). Read afresh
in each layer, they cost ~12 small tensor ops per linear (is any row routed? which rows use which
adapter? the one-hot mask of the gathered many-adapter product) and, on a GPU, a host sync per linear.
`Routing` holds the ids together with the set of slots present, and memoizes what layers derive from
them, so a forward pays for it once:

- the serving runner builds it from its Python list of slots (no device round trip at all);
- `Routing.of(tensor)` wraps plain `adapter_ids` at a layer (one `.tolist()`), so every caller that
  passes a LongTensor keeps working.

A layer asks `route.slots` (distinct slots, -1 = base) before touching any tensor: a batch of base rows
costs an adapter layer nothing beyond its base product.

Model-agnostic metadata: the models' `ForwardMeta` carries it and the adapter layers of `methods/` read it,
so it sits below both (a neutral module of DESIGN.md's layers, as `ops/` and `kernels/` are).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


@dataclass(frozen=True)
class Segments:
    """A batch's tokens grouped per adapter of a stack: group u holds the tokens of stack place used[u], padded
    to k tokens, in a (U * k, in) layout (token rows[i] at dest[i])."""

    used: torch.Tensor | None  # (U,) places in the stack that have tokens, ascending; None: all of them
    k: int  # tokens of the largest group
    rows: torch.Tensor | None  # (n,) tokens whose slot is in the stack, ascending; None: all tokens
    dest: torch.Tensor  # (n,) each such token's row in the padded layout
    tokens: int  # n
    padded: int  # U * k


class Routing:
    """Adapter slots of one forward's rows (`(B,)`) or tokens (`(B, T)`), -1 = the base model."""

    __slots__ = ("ids", "slots", "_given", "_memo")

    def __init__(self, ids: torch.Tensor, slots: Sequence[int] | None = None):
        """ids: the slots as a tensor; slots: the same values as a flat Python list, when the caller has
        them (spares a device -> host copy)."""
        if not isinstance(ids, torch.Tensor) or ids.dtype not in INT_DTYPES:
            what = ids.dtype if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise TypeError(f"adapter_ids must be an integer tensor of slots, got {what}")
        given = list(slots) if slots is not None else ids.reshape(-1).tolist()
        if len(given) != ids.numel():
            raise ValueError(f"{len(given)} slots given for adapter_ids of shape {tuple(ids.shape)}")
        self.ids, self._given = ids, given
        self.slots = frozenset(given)  # distinct slots present
        self._memo: dict = {}

    @classmethod
    def of(cls, adapter_ids) -> Routing:
        return adapter_ids if isinstance(adapter_ids, Routing) else cls(adapter_ids)

    def used(self, slot_to_name: dict[int, str]) -> list[int]:
        """The slots of this batch that a layer holding `slot_to_name` has adapters for, ascending."""
        return sorted(s for s in self.slots if s in slot_to_name)

    def _memoized(self, key, fn: Callable):
        v = self._memo.get(key)
        if v is None:
            v = self._memo[key] = fn()
        return v

    def token_ids(self, x: torch.Tensor) -> torch.Tensor:
        """The slots as one per token of x (`x.shape[:-1]`): (B,) is broadcast over x's token dims."""
        lead = x.shape[:-1]
        return self._memoized(("tokens", lead, x.device), lambda: _broadcast(self.ids.to(x.device), lead, x))

    def _token_list(self, x: torch.Tensor) -> list[int]:
        lead = x.shape[:-1]
        if tuple(self.ids.shape) == tuple(lead):
            return self._given
        return self._memoized(("token_list", lead), lambda: self.token_ids(x).reshape(-1).tolist())

    def rows(self, x: torch.Tensor, slot: int) -> torch.Tensor | slice:
        """Flat indices of x's tokens (x viewed as (N, in)) routed to `slot`: a slice when they are one
        contiguous run (a packed step keeps each sequence's tokens together), else a LongTensor."""
        def build():
            rows = [i for i, s in enumerate(self._token_list(x)) if s == slot]
            if rows and rows[-1] - rows[0] + 1 == len(rows):
                return slice(rows[0], rows[-1] + 1)
            return torch.tensor(rows, dtype=torch.long, device=x.device)
        return self._memoized(("rows", x.shape[:-1], x.device, slot), build)

    def row_index(self, x: torch.Tensor, slot: int) -> torch.Tensor:
        """`rows` as a LongTensor always (for gathers and index_add)."""
        rows = self.rows(x, slot)
        if isinstance(rows, slice):
            return self._memoized(("row_index", x.shape[:-1], x.device, slot),
                                  lambda: torch.arange(rows.start, rows.stop, device=x.device))
        return rows

    def one_hot(self, x: torch.Tensor, order: tuple[int, ...], r: int, dtype: torch.dtype) -> torch.Tensor:
        """(N, len(order) * r) mask: for each token, ones on the r columns of its slot's place in `order`
        (a stack of adapters of rank r, `order` their slots), zeros elsewhere (tokens of other slots)."""
        def build():
            place = {s: i for i, s in enumerate(order)}
            idx = torch.tensor([place.get(s, len(order)) for s in self._token_list(x)], device=x.device)
            hot = idx[:, None] == torch.arange(len(order), device=x.device)  # (N, S); none for other slots
            return hot.to(dtype).repeat_interleave(r, dim=1)  # (N, S*r)
        return self._memoized(("one_hot", x.shape[:-1], x.device, order, r, dtype), build)

    def segments(self, x: torch.Tensor, order: tuple[int, ...]) -> Segments | None:
        """x's tokens grouped by their slot's place in `order` (a stack of adapters), for batched per-adapter
        products; None when no token's slot is in it. See `Segments`."""
        def build():
            place = {s: i for i, s in enumerate(order)}
            tokens = self._token_list(x)
            used = sorted({place[s] for s in tokens if s in place})
            if not used:
                return None
            group = {p: u for u, p in enumerate(used)}
            filled = [0] * len(used)
            rows, at = [], []
            for i, s in enumerate(tokens):
                p = place.get(s)
                if p is not None:
                    rows.append(i)
                    at.append(group[p])
                    filled[group[p]] += 1
            k = max(filled)
            seen = [0] * len(used)
            dest = []
            for u in at:
                dest.append(u * k + seen[u])
                seen[u] += 1

            def t(v):
                return torch.tensor(v, dtype=torch.long, device=x.device)
            return Segments(used=None if used == list(range(len(order))) else t(used), k=k,
                            rows=None if len(rows) == len(tokens) else t(rows), dest=t(dest),
                            tokens=len(rows), padded=len(used) * k)
        return self._memoized(("segments", x.shape[:-1], x.device, order), build)

    def add_deltas(self, result: torch.Tensor, x: torch.Tensor, slot_to_name: dict[int, str],
                   delta: Callable[[str, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """result + `delta(name, x_rows)` on the rows of every slot this layer has an adapter for, one
        product per adapter used; returned in result's dtype. Without autograd, a contiguous run of rows is
        a slice added in place (no gather, no copy of the output)."""
        flat_x = x.reshape(-1, x.shape[-1])  # (N, in)
        grad = torch.is_grad_enabled()
        out = None
        for slot in self.used(slot_to_name):
            rows = self.rows(x, slot)
            if isinstance(rows, slice) and not grad:
                if out is None:
                    out = result.reshape(-1, result.shape[-1])  # a view: result itself is updated
                out[rows] += delta(slot_to_name[slot], flat_x[rows])  # one rounding to result's dtype
                continue
            rows = self.row_index(x, slot)
            d = delta(slot_to_name[slot], flat_x.index_select(0, rows))  # (n, out)
            if out is None or out.dtype != torch.promote_types(result.dtype, d.dtype):
                base = result.reshape(-1, result.shape[-1]) if out is None else out
                out = base.to(torch.promote_types(result.dtype, d.dtype))
            out = out.index_add(0, rows, d.to(out.dtype))
        return result if out is None else out.reshape(result.shape).to(result.dtype)


def _broadcast(ids: torch.Tensor, lead: torch.Size, x: torch.Tensor) -> torch.Tensor:
    if ids.shape == lead:
        return ids
    if ids.dim() == 1 and len(lead) >= 1 and ids.shape[0] == lead[0]:
        return ids.view(-1, *([1] * (len(lead) - 1))).expand(lead)
    raise ValueError(
        f"adapter_ids has shape {tuple(ids.shape)}; for an input of shape {tuple(x.shape)} "
        f"it must be ({lead[0] if lead else 'B'},) per row or {tuple(lead)} per token"
    )


def token_ids(adapter_ids, x: torch.Tensor) -> torch.Tensor:
    """adapter_ids (a tensor or a Routing) as one slot per token of x."""
    if isinstance(adapter_ids, Routing):
        return adapter_ids.token_ids(x)
    if not isinstance(adapter_ids, torch.Tensor) or adapter_ids.dtype not in INT_DTYPES:
        what = adapter_ids.dtype if isinstance(adapter_ids, torch.Tensor) else type(adapter_ids).__name__
        raise TypeError(f"adapter_ids must be an integer tensor of slots, got {what}")
    return _broadcast(adapter_ids.to(x.device), x.shape[:-1], x)

"""Where each served adapter lives, and which one moves when room is needed (vLLM's `--max-loras` /
`--max-cpu-loras` semantics). Pure Python, no torch: the engine applies the moves to the model tree.

Three tiers:

- DEVICE: in the model tree, on the compute device: a request can be batched with it now. At most
  `max_loras` adapters (None: no bound, every loaded adapter stays here).
- CPU: out of the model tree, its tensors kept in host memory: made resident again without reading disk.
- DISK: only its folder is known: made resident again by loading the folder.

As in vLLM, `max_cpu_loras` bounds every adapter held in memory, the resident ones included (so it must be
>= max_loras; default: max_loras, i.e. nothing is kept beyond the resident ones). Each tier is kept in
least-recently-used order. A resident adapter that a queued or running request uses is pinned (the engine
passes the pinned names): it is never the one evicted; when every resident adapter is pinned, a request for
another adapter waits.
"""
from __future__ import annotations

import enum
from collections import OrderedDict
from collections.abc import Collection
from dataclasses import dataclass


class Tier(enum.Enum):
    DEVICE = "device"
    CPU = "cpu"
    DISK = "disk"


@dataclass(frozen=True)
class Move:
    name: str
    to: Tier  # CPU: spill its tensors off the model; DISK: forget them (reload from the folder)


class AdapterCache:
    def __init__(self, max_loras: int | None = None, max_cpu_loras: int | None = None):
        if max_loras is not None and (isinstance(max_loras, bool) or not isinstance(max_loras, int) or max_loras < 1):
            raise ValueError(f"--max-loras must be an integer >= 1, got {max_loras!r}")
        if max_cpu_loras is not None:
            if max_loras is None:
                raise ValueError("--max-cpu-loras needs --max-loras (without it every adapter stays resident)")
            if isinstance(max_cpu_loras, bool) or not isinstance(max_cpu_loras, int) or max_cpu_loras < max_loras:
                raise ValueError(f"--max-cpu-loras ({max_cpu_loras!r}) counts every adapter held in memory, the "
                                 f"--max-loras {max_loras} resident ones included: give an integer >= {max_loras}")
        self.max_loras = max_loras
        self.max_cpu_loras = max_cpu_loras if max_cpu_loras is not None else max_loras
        # least recently used first
        self._tiers: dict[Tier, OrderedDict[str, None]] = {t: OrderedDict() for t in Tier}

    # -- queries -------------------------------------------------------------------------------------
    def tier(self, name: str) -> Tier | None:
        return next((t for t, names in self._tiers.items() if name in names), None)

    def names(self, tier: Tier) -> list[str]:
        """The adapters of a tier, least recently used first."""
        return list(self._tiers[tier])

    # -- changes the engine reports ------------------------------------------------------------------
    def add(self, name: str, tier: Tier = Tier.DEVICE) -> None:
        """A new adapter, most recently used in its tier."""
        self.forget(name)
        self._tiers[tier][name] = None

    def touch(self, name: str) -> None:
        """A request used it: most recently used in its tier."""
        for names in self._tiers.values():
            if name in names:
                names.move_to_end(name)

    def forget(self, name: str) -> None:
        for names in self._tiers.values():
            names.pop(name, None)

    def apply(self, moves: list[Move]) -> None:
        for m in moves:
            self.add(m.name, m.to)

    # -- decisions -----------------------------------------------------------------------------------
    def make_resident(self, name: str, pinned: Collection[str]) -> list[Move] | None:
        """The moves that let `name` (held in CPU memory or on disk) become resident, `name`'s own promotion
        last; None while every resident adapter is pinned (the request waits). Applied by `apply` once the
        engine has carried them out."""
        if self.tier(name) is Tier.DEVICE:
            return []
        moves = self._evict(len(self._tiers[Tier.DEVICE]) + 1, pinned, incoming=name)
        if moves is None:
            return None
        return moves + [Move(name, Tier.DEVICE)]

    def over_limit(self, pinned: Collection[str]) -> list[Move]:
        """The moves that bring the resident adapters back to `max_loras` after a load went over it (an
        adapter is always loaded into the tree first, so a broken folder fails then): least recently used
        unpinned ones first, the new one itself when everything else is pinned."""
        return self._evict(len(self._tiers[Tier.DEVICE]), pinned) or []

    def _evict(self, resident_wanted: int, pinned: Collection[str], incoming: str | None = None) -> list[Move] | None:
        """Spill least recently used unpinned residents until `resident_wanted` fit in max_loras, then drop the
        least recently used CPU-held ones past max_cpu_loras; None when not enough residents are unpinned."""
        if self.max_loras is None:
            return []
        excess = resident_wanted - self.max_loras
        victims = [n for n in self._tiers[Tier.DEVICE] if n not in pinned][:max(excess, 0)]
        if len(victims) < excess:
            return None
        moves = [Move(n, Tier.CPU) for n in victims]
        # LRU first: the CPU-held ones (not the one coming in), then the ones just spilled
        held = [n for n in self._tiers[Tier.CPU] if n != incoming] + victims
        in_memory = resident_wanted - len(victims) + len(held)
        drop = held[:max(in_memory - self.max_cpu_loras, 0)]
        moves = [m for m in moves if m.name not in drop] + [Move(n, Tier.DISK) for n in drop]
        return moves

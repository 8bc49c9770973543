"""Paged AdamW: torch.optim.AdamW's math, with the states of large tensors kept outside the working set.

QLoRA (Dettmers et al. 2023, arXiv:2305.14314, "paged optimizers") and bitsandbytes' `PagedAdamW32bit` keep
the optimizer states of tensors with >= 1e5 elements in CUDA unified memory and prefetch them per parameter
before the update, so a memory spike evicts them instead of failing. leantune does the same with an explicit
`PagedStateStore`:

- CUDA: the store is pinned CPU memory; inside `step()` one parameter's (exp_avg, exp_avg_sq) are copied to
  the device (non_blocking, on a side stream, the next parameter's prefetched while the current one updates),
  updated, and copied back. At most two parameters' states are on the device at once (current + prefetched).
- CPU: the store is a deleted temporary file mapped with `mmap` (MAP_SHARED). The update runs on the mapped
  pages, which are then dropped from the process (`madvise(MADV_DONTNEED)`); the dirty data stays in the page
  cache, which the kernel can write back and reclaim. The states never count as anonymous resident memory and
  at most one parameter's states are mapped-in at a time.

Small tensors' states stay ordinary tensors in `self.state`. The update is exactly torch's single-tensor AdamW
(`p <- p(1 - lr wd)`, then `p <- p - lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps)`), and `state_dict()`
has torch's layout (`step`, `exp_avg`, `exp_avg_sq` per parameter index), so checkpoints move freely between
this optimizer and `torch.optim.AdamW`.
"""
from __future__ import annotations

import math
import mmap
import tempfile

import torch

PAGE_THRESHOLD = 100_000  # bitsandbytes pages tensors with numel >= 1e5


class PagedStateStore:
    """Backing store for the (exp_avg, exp_avg_sq) pair of each paged parameter, keyed by parameter index.

    A slot is a pair of host tensors shaped like the parameter (separate storages, so safetensors saves them
    as two tensors). `fetch` brings a slot into the working set on a device, `write_back` returns it;
    `resident` / `max_resident` / `fetches` count what is fetched and not yet written back (tests assert on
    them)."""

    def __init__(self):
        self.slots: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.resident: set[int] = set()
        self.max_resident = 0
        self.fetches = 0

    def reserve(self, specs: list[tuple[int, torch.Size, torch.dtype]]) -> None:
        """Allocate zeroed slots for the keys (with the parameter's shape and dtype) that have none."""
        specs = [s for s in specs if s[0] not in self.slots]
        if specs:
            self._allocate(specs)

    def _allocate(self, specs) -> None:
        raise NotImplementedError

    def has(self, key: int) -> bool:
        return key in self.slots

    def view(self, key: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored (exp_avg, exp_avg_sq) as host tensors sharing the store's memory (as torch's state does)."""
        return self.slots[key]

    def put(self, key: int, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor) -> None:
        for dst, src in zip(self.slots[key], (exp_avg, exp_avg_sq)):
            dst.copy_(src.reshape(dst.shape))
        self._release(key)

    def fetch(self, key: int, device: torch.device, non_blocking: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The slot as working tensors on `device` (on the CPU: the slot itself, no copy)."""
        self.resident.add(key)
        self.max_resident = max(self.max_resident, len(self.resident))
        self.fetches += 1
        if device.type == "cpu":
            return self.slots[key]
        return tuple(t.to(device, non_blocking=non_blocking) for t in self.slots[key])

    def write_back(self, key: int, work: tuple[torch.Tensor, torch.Tensor], non_blocking: bool = False) -> None:
        for dst, src in zip(self.slots[key], work):
            if src is not dst:
                dst.copy_(src, non_blocking=non_blocking)
        self._release(key)
        self.resident.discard(key)

    def _release(self, key: int) -> None:
        """Drop the slot's pages from the working set (memmap store)."""


class PinnedStore(PagedStateStore):
    """Page-locked host memory: device copies in both directions can be asynchronous."""

    def _allocate(self, specs) -> None:
        pin = torch.cuda.is_available()
        for key, shape, dtype in specs:
            self.slots[key] = tuple(torch.zeros(shape, dtype=dtype, pin_memory=pin) for _ in range(2))


class MemmapStore(PagedStateStore):
    """A deleted temporary file mapped shared: its pages are file-backed, not anonymous, and are dropped from
    the process after each update. One file (one mapping, one fd) per `reserve` call; tensors page-aligned."""

    def __init__(self, directory: str | None = None):
        super().__init__()
        self.directory = directory
        self._where: dict[int, tuple[mmap.mmap, int, int]] = {}  # key -> (mapping, offset, nbytes of the pair)

    def _allocate(self, specs) -> None:
        page = mmap.ALLOCATIONGRANULARITY
        layout, size = [], 0
        for key, shape, dtype in specs:
            n = math.prod(shape)
            nbytes = -(-n * torch.empty((), dtype=dtype).element_size() // page) * page
            layout.append((key, shape, dtype, n, size, nbytes))
            size += 2 * nbytes
        with tempfile.TemporaryFile(dir=self.directory, prefix="leantune-paged-adamw-") as f:
            f.truncate(size)  # sparse: reads as zeros, takes no disk until written
            mm = mmap.mmap(f.fileno(), size, flags=mmap.MAP_SHARED)  # keeps its own duplicate of the fd
        for key, shape, dtype, n, off, nbytes in layout:
            self.slots[key] = tuple(torch.frombuffer(mm, dtype=dtype, count=n, offset=off + i * nbytes).view(shape)
                                    for i in range(2))
            self._where[key] = (mm, off, 2 * nbytes)

    def _release(self, key: int) -> None:
        mm, off, nbytes = self._where[key]
        if hasattr(mmap, "MADV_DONTNEED"):
            # a shared file mapping: dirty pages stay in the page cache (the data is kept); only the
            # process's mapping of them goes
            mm.madvise(mmap.MADV_DONTNEED, off, nbytes)


def make_store(kind: str, device: torch.device, directory: str | None = None) -> PagedStateStore:
    if kind == "auto":
        kind = "pinned" if device.type == "cuda" else "memmap"
    if kind == "pinned":
        return PinnedStore()
    if kind == "memmap":
        return MemmapStore(directory)
    raise ValueError(f"paged AdamW store must be 'auto', 'pinned', 'memmap' or a PagedStateStore, got {kind!r}")


def adamw_update(p: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                 step_t: torch.Tensor, lr: float, beta1: float, beta2: float, eps: float, wd: float) -> None:
    """One AdamW update, op for op torch's `_single_tensor_adam` (decoupled weight decay, no amsgrad)."""
    step_t += 1
    if wd != 0:
        p.mul_(1 - lr * wd)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    step = step_t.item()
    step_size = lr / (1 - beta1 ** step)
    denom = (exp_avg_sq.sqrt() / (1 - beta2 ** step) ** 0.5).add_(eps)
    p.addcdiv_(exp_avg, denom, value=-step_size)


class PagedAdamW(torch.optim.Optimizer):
    """`torch.optim.AdamW` whose states for parameters with >= `page_threshold` elements live in a
    `PagedStateStore` (`store`: "auto" = pinned on CUDA, memmap on CPU; or a store instance)."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, page_threshold: int = PAGE_THRESHOLD,
                 store: str | PagedStateStore = "auto", offload_dir: str | None = None):
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"PagedAdamW: need lr, eps, weight_decay >= 0 and betas in [0, 1); got lr={lr}, "
                             f"eps={eps}, weight_decay={weight_decay}, betas={betas}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})
        self.page_threshold = page_threshold
        self.store = store if isinstance(store, PagedStateStore) else None
        self._store_kind, self._offload_dir = store, offload_dir
        self._copy_stream = None

    # ---- bookkeeping ----------------------------------------------------------------------------
    def is_paged(self, p: torch.Tensor) -> bool:
        return p.numel() >= self.page_threshold

    def _indices(self) -> dict[int, int]:
        """id(param) -> its index in state_dict() (torch's numbering: groups in order, first occurrence)."""
        out: dict[int, int] = {}
        for g in self.param_groups:
            for p in g["params"]:
                out.setdefault(id(p), len(out))
        return out

    def _reserve(self, params: list[torch.Tensor]) -> dict[int, int]:
        idx = self._indices()
        if params and self.store is None:
            self.store = make_store(self._store_kind, params[0].device, self._offload_dir)
        if params:
            self.store.reserve([(idx[id(p)], p.shape, p.dtype) for p in params])
        return idx

    def _state(self, p: torch.Tensor) -> dict:
        st = self.state[p]
        if not st:
            st["step"] = torch.tensor(0.0, dtype=torch.float32)
            if not self.is_paged(p):
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return st

    # ---- the step -------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        paged = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("PagedAdamW does not support sparse gradients")
                st = self._state(p)
                if self.is_paged(p):
                    paged.append((p, group))
                else:
                    self._update(p, st["exp_avg"], st["exp_avg_sq"], group)
        if paged:
            idx = self._reserve([p for p, _ in paged])
            keyed = [(idx[id(p)], p, g) for p, g in paged]
            if paged[0][0].device.type == "cuda":
                self._paged_cuda(keyed)
            else:
                self._paged_host(keyed)
        return loss

    def _update(self, p, exp_avg, exp_avg_sq, group) -> None:
        b1, b2 = group["betas"]
        adamw_update(p, p.grad, exp_avg, exp_avg_sq, self.state[p]["step"], float(group["lr"]), b1, b2,
                     group["eps"], group["weight_decay"])

    def _paged_host(self, keyed) -> None:
        for key, p, group in keyed:
            work = self.store.fetch(key, p.device)
            self._update(p, *work, group)
            self.store.write_back(key, work)

    def _paged_cuda(self, keyed) -> None:
        """Copy states in on a side stream, one parameter ahead of the update; copy them back on the compute
        stream. Stream order keeps each write-back before the next step's fetch of the same slot."""
        compute = torch.cuda.current_stream()
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(device=compute.device)
        copy = self._copy_stream
        copy.wait_stream(compute)  # last step's write-backs (and this step's grads) come first

        def prefetch(i):
            key, p, _ = keyed[i]
            with torch.cuda.stream(copy):
                return self.store.fetch(key, p.device, non_blocking=True)

        nxt = prefetch(0)
        for i, (key, p, group) in enumerate(keyed):
            work = nxt
            compute.wait_stream(copy)
            for t in work:
                t.record_stream(compute)  # allocated on the copy stream, used and freed on this one
            nxt = prefetch(i + 1) if i + 1 < len(keyed) else None
            self._update(p, *work, group)
            self.store.write_back(key, work, non_blocking=True)
        compute.synchronize()  # the pinned slots are complete before anyone reads them on the host

    # ---- checkpoints: torch's layout ------------------------------------------------------------
    def state_dict(self) -> dict:
        sd = super().state_dict()
        if self.store is not None:
            for i, st in list(sd["state"].items()):
                if self.store.has(i):
                    m, v = self.store.view(i)
                    sd["state"][i] = {**st, "exp_avg": m, "exp_avg_sq": v}  # a copy: st is self.state[p]
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Load torch AdamW's layout; large parameters' exp_avg / exp_avg_sq go straight into the store."""
        saved = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        by_saved = dict(zip(saved, params))
        state, paged = {}, []
        for k, st in state_dict["state"].items():
            p = by_saved.get(int(k))
            st = dict(st)
            if p is not None and self.is_paged(p) and "exp_avg" in st:
                paged.append((p, st.pop("exp_avg"), st.pop("exp_avg_sq")))
            state[k] = st
        super().load_state_dict({"state": state, "param_groups": state_dict["param_groups"]})
        idx = self._reserve([p for p, _, _ in paged])
        for p, m, v in paged:
            self.store.put(idx[id(p)], m, v)

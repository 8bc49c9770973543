"""Triton kernels for CUDA: NF4/FP4 dequantization, fused 4-bit matmul, RMSNorm, SwiGLU, RoPE.

Triton is optional. Importing `leantune.kernels`, `leantune.kernels.nf4` or `leantune.kernels.fused`
never imports triton; the `@triton.jit` kernels live in private modules (`_nf4_triton`,
`_fused_triton`) that `load()` imports on the first kernel launch. The CPU path of leantune stays
torch and never calls in here.

The public functions take CUDA tensors. Under `TRITON_INTERPRET=1` (triton's numpy interpreter,
used by the tests on CPU) they also take CPU tensors. A kernel module is decorated in the mode that
is current when it is loaded, and `load()` re-imports it if the mode changed since, so the order in
which tests import torch, triton or this package does not matter.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os

import torch

__all__ = ["BACKENDS", "check_device", "interpreting", "load", "set_backend", "triton_available", "use_triton"]

# A module's `kernel_backend`: "auto" runs the Triton kernel on CUDA tensors when triton is installed
# and torch elsewhere; "triton" always (on CPU only under TRITON_INTERPRET=1, else check_device's
# error); "torch" never. The model's modules carry it (set_backend), so it is state of the model.
BACKENDS = ("auto", "triton", "torch")

_MODULES = ("nf4", "fused")


def triton_available() -> bool:
    """True when `import triton` would succeed (does not import it)."""
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # a broken or blocked install
        return False


@functools.cache
def _installed() -> bool:  # an installation fact, asked on every forward: looked up once
    return triton_available()


def use_triton(backend: str, x: torch.Tensor) -> bool:
    """Whether a module whose `kernel_backend` is `backend` runs its Triton kernel on input `x`."""
    if backend == "auto":
        return x.is_cuda and _installed()
    return backend == "triton"


def set_backend(model: torch.nn.Module, backend: str) -> int:
    """Set `kernel_backend` on every module of `model` that has one (RMSNorm, attention's RoPE, 4-bit
    linears); returns how many. "torch" turns the Triton kernels off, e.g. to compare against them."""
    if backend not in BACKENDS:
        raise ValueError(f"kernel backend must be one of {BACKENDS}, got {backend!r}")
    n = 0
    for m in model.modules():
        if hasattr(m, "kernel_backend"):
            m.kernel_backend = backend
            n += 1
    return n


def interpreting() -> bool:
    """True when triton runs kernels in its CPU interpreter (`TRITON_INTERPRET=1`)."""
    if not triton_available():
        return False
    import triton

    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")


def load(name: str):
    """The private kernel module `_<name>_triton`, decorated for the current interpreter mode."""
    if name not in _MODULES:
        raise ValueError(f"unknown kernel module {name!r}; expected one of {_MODULES}")
    if not triton_available():
        raise ImportError("leantune.kernels needs triton: pip install triton (the CPU path needs none)")
    mode = interpreting()
    for sub in ("_common_triton", f"_{name}_triton"):  # helpers first: the kernels import them
        mod = importlib.import_module(f"{__name__}.{sub}")
        if mod.INTERPRET != mode:
            mod = importlib.reload(mod)  # re-decorate: jit or interpreted
    return mod


def check_device(what: str, *tensors) -> None:
    """Raise a clear error unless every tensor is on CUDA (or triton interprets on CPU)."""
    ts = [t for t in tensors if isinstance(t, torch.Tensor)]
    devices = {t.device for t in ts}
    if len(devices) > 1:
        raise ValueError(f"leantune.kernels.{what}: tensors are on different devices {sorted(map(str, devices))}")
    if interpreting() or all(t.is_cuda for t in ts):
        return
    dev = ts[0].device if ts else "cpu"
    raise RuntimeError(
        f"leantune.kernels.{what} runs Triton kernels on CUDA tensors, got tensors on {dev}. "
        "Use the torch path on CPU (leantune.quant / leantune.models), or set TRITON_INTERPRET=1 "
        "before importing triton to run the kernels in triton's (slow) interpreter."
    )

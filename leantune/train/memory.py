"""Process memory on CPU: make freed tensors go back to the OS, so peak RSS follows live tensors.

glibc's malloc serves a request above its mmap threshold (128 KiB at start) with a fresh mapping that
`free` unmaps. But it raises that threshold, up to 32 MiB, each time such a block is freed. A training
step frees many 0.1-32 MiB tensors (activations, decoded 4-bit weights), so after the first step they
come from the heap instead, where freed blocks stay resident and fragment: on SmolLM2-135M QLoRA
(batch 2 x 128) the process peaked at ~1.16 GiB this way against ~0.89 GiB with the threshold held
at 128 KiB (bench/lora_step.py). Setting the threshold once turns the raising off (glibc's documented
behaviour for M_MMAP_THRESHOLD). The cost is a page fault per 4 KiB on each new mapping.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_MMAP_THRESHOLD = -3  # glibc <malloc.h>
DEFAULT_THRESHOLD = 128 * 1024


def return_freed_memory(threshold: int = DEFAULT_THRESHOLD) -> bool:
    """Hold glibc's mmap threshold at `threshold` bytes for this process (blocks above it are unmapped
    when freed). True if set; False where the C library is not glibc (nothing changes there)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, int(threshold)) == 1

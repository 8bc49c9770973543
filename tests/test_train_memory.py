"""leantune.train.return_freed_memory: with glibc's mmap threshold held, mid-size tensors get their own
mappings, which free() unmaps, instead of heap blocks that stay resident."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

CHILD = textwrap.dedent("""
    import ctypes, sys, torch
    from leantune.train import return_freed_memory

    class MallInfo2(ctypes.Structure):  # glibc >= 2.33
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                    "fsmblks", "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    if sys.argv[1] == "set":
        assert return_freed_memory()
    torch.ones(2**20).sum()  # a freed 4 MiB block: glibc's default then moves its mmap threshold up
    big = [torch.ones(2**18) for _ in range(64)]  # 64 MiB of 1 MiB tensors
    print(libc.mallinfo2().hblkhd / 2**20)  # MiB in blocks that are their own mappings (unmapped on free)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_mid_size_tensors_are_their_own_mappings_only_with_the_threshold_held():
    def mapped_mib(mode):
        out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True)
        return float(out.stdout.strip().splitlines()[-1])

    assert mapped_mib("set") >= 64  # each 1 MiB tensor is mapped, so freeing it returns it to the OS
    assert mapped_mib("default") < 16  # the default serves them from the heap, where freed blocks stay

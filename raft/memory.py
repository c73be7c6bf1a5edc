"""Keeping freed memory in the process (glibc malloc), which the `raft` command does unless RAFT_MALLOC=system.

Why: glibc serves every allocation above its mmap threshold (at most 32 MB) with a fresh mmap and returns it on
free, and gives the top of its heap back to the system past a trim threshold. A CPU run allocates and frees
tensors of that size all the time (a [128, 49k] float32 logits block is 25 MB; a fine-tuning batch's logits are
hundreds of MB), so each one is faulted in again page by page: 25 million minor page faults and 83 s of system
time in the 5-minute offline default. With mmap off and trimming off, freed blocks are reused instead: the
default ran in 4:16 instead of 5:00 (system time 24 s, 1.7 million faults), the same figures to the last digit.

The price is memory: what is freed stays in the process, and blocks of other sizes cannot always reuse the holes.
The default's peak resident memory measured 6.1 and 6.8 GB in two runs with it, 6.2 GB without (5.9 GB with only the mmap threshold
pinned at 32 MB and no trimming, which ran in 4:38: the large blocks are the fine-tuning's logits). RAFT_MALLOC=system
leaves malloc as it is, as do glibc's own MALLOC_* settings. PyTorch's CPU tuning guide makes the same point with
jemalloc or tcmalloc preloaded; this needs no extra library.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # mallopt parameters, glibc's malloc.h


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to reuse freed memory rather than unmap or trim it; False where it did not apply (not
    glibc, RAFT_MALLOC=system, or the user set glibc's own MALLOC_* settings, which are then left alone)."""
    if os.environ.get("RAFT_MALLOC", "").lower() == "system":
        return False
    if any(key.startswith("MALLOC_") for key in os.environ) or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        if not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):  # musl, macOS: not glibc
            return False
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        # the trim threshold is an int here: 2**31 - 1 bytes is beyond any heap top this process frees at once
        return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    except OSError:
        return False

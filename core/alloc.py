"""The C allocator's hold on freed memory (glibc on Linux), for long jobs in one process.

glibc serves a large allocation (a numpy array, an onnxruntime buffer) from mmap and gives
it back on free, *until* the first such free: then it raises its mmap threshold to that
size (up to 32 MiB), and later arrays of that size come from the heap, whose freed holes it
seldom returns. A job that makes many differently sized pass buffers (``ikv-learn``: one
padded batch per 8 examples) then grows with the number of passes, not with what it keeps.
Measured (AMD EPYC, 2 cores, fp32 bundle, capitals, 16 MiB): a 2,000-example learn peaked at
1,149 MiB against 1,121 MiB for 200 examples; with the threshold fixed at 64 KiB
(``MALLOC_MMAP_THRESHOLD_=65536``) the 2,000-example learn peaked at 1,065 MiB in the same
time. ``keep_large_frees_off_heap`` sets the same from inside the process (``mallopt``),
which also stops the dynamic raise.
"""
from __future__ import annotations

import ctypes
import sys

M_MMAP_THRESHOLD = -3            # glibc's mallopt parameter
THRESHOLD = 64 << 10             # bytes: allocations of at least this are mmapped, returned on free


def keep_large_frees_off_heap(threshold: int = THRESHOLD) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` bytes; False where the C library is not
    glibc (musl, macOS) or refuses, and then nothing changes."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(ctypes.c_int(M_MMAP_THRESHOLD), ctypes.c_int(int(threshold))))
    except (OSError, AttributeError):
        return False

"""glibc's mmap threshold, fixed by ikv-learn so that freed pass buffers go back to the OS."""
import ctypes
import subprocess
import sys

import pytest

PROBE = """
import ctypes, sys
import numpy as np
from inducekv.core.alloc import keep_large_frees_off_heap
if sys.argv[1] == "fixed":
    assert keep_large_frees_off_heap()
libc = ctypes.CDLL("libc.so.6")
for mib in (1, 3, 2, 5, 4):          # frees that would raise glibc's dynamic threshold
    a = np.ones(mib << 18, np.float32); del a
keep = []
for i in range(40):                  # 40 x 0.5-2 MiB arrays, half of them freed
    keep.append(np.ones((i % 4 + 1) << 17, np.float32))
keep = keep[::2]
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]
libc.mallinfo2.restype = Info
print(libc.mallinfo2().fordblks)     # freed bytes the heap holds on to
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_freed_large_arrays_are_not_held_by_the_heap():
    try:
        ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        pytest.skip("not glibc >= 2.33")
    held = {m: int(subprocess.run([sys.executable, "-c", PROBE, m], capture_output=True, text=True, check=True)
                   .stdout.split()[-1]) for m in ("default", "fixed")}
    assert held["default"] > 8 << 20          # the dynamic threshold put them on the heap, and the holes stay
    assert held["fixed"] < 2 << 20           # measured: 31.7 MiB vs 0.25 MiB


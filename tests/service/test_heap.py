"""service/scoring/heap.py: where glibc puts a block the size of a model's weight table."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

# In a fresh interpreter (the thresholds are process-wide): free a 24 MB block, as a model load
# frees the protobuf copy of its weights, then allocate an 8 MB one, the size of an embedding
# table, and say whether it landed in the main heap or in a mapping of its own.
_PROBE = """
import ctypes, sys
from service.scoring.heap import pin_thresholds
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
if sys.argv[1] == "pinned" and not pin_thresholds():
    sys.exit("mallopt refused the thresholds")
libc.free(libc.malloc(24 << 20))
block = libc.malloc(8 << 20)
maps = open("/proc/self/maps").read().splitlines()
heap = [line.split()[0].split("-") for line in maps if line.endswith("[heap]")]
inside = any(int(lo, 16) <= block < int(hi, 16) for lo, hi in heap)
print("heap" if inside else "own mapping")
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator only")
@pytest.mark.parametrize(("mode", "where"), [("pinned", "own mapping"), ("dynamic", "heap")])
def test_a_weight_sized_block_gets_its_own_mapping_only_when_pinned(mode: str, where: str) -> None:
    """Pinned, a freed table-sized block goes straight back to the OS; with glibc's dynamic
    threshold (raised by the first large free) it is carved from the heap, where a freed copy
    stays resident: the extra RSS a model swap used to hold."""
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == where

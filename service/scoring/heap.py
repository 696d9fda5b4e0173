"""How a serving process's heap holds model weights, so a model swap costs about one model.

A swap keeps the old session serving until the new one is loaded and warm, so one extra model
at the peak is the floor. What came on top was glibc's heap, not onnxruntime: creating a
session parses the ONNX file (the weights as protobuf bytes, ~58 MB for the default model,
most of it in embedding tables of 6-22 MB each), copies them into the session's tensors and
frees the protobuf. glibc serves blocks that large with ``mmap`` only until a first such block
is freed; from then on its *dynamic* threshold (the size of the largest block freed, up to
32 MiB) puts them in the heap, where freed copies stay resident between live blocks. Measured
on the benchmark model (``benchmarks/memory.py``, one worker, four swaps): peak extra RSS +100,
+114, +128, +137 MB against one model's 81 MB footprint (1.69x); with :func:`pin_thresholds`
+82, +86, +87, +87 MB (1.05-1.10x over four runs), RSS back at its level after each swap.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

M_TRIM_THRESHOLD = -1  # <malloc.h> mallopt parameters
M_MMAP_THRESHOLD = -3
# Blocks of at least this size get their own mapping, returned to the OS as soon as they are
# freed: every weight table of a model (6-22 MB), onnxruntime's arena chunks (allocated once), but
# no buffer of an ordinary /rank request (at 2,000 candidates its largest input array is 64 kB
# and a body with every feature ~0.3 MB). 16 MiB left the 6-13 MB tables in the heap (swap peak
# 1.34x); 1 MiB and 4 MiB measured alike (1.03x, 1.05x).
MMAP_THRESHOLD = 4 << 20
# Free memory kept at the top of the heap before glibc gives it back. Pinning the mmap threshold
# also pins this one at its 128 KiB default (glibc adjusts the two together), and then every
# request shrank and regrew the heap: 55 minor page faults per 500-candidate request, 313 per
# ~1,400, against 0.5 and 0.2 with glibc's defaults and the same with this value (glibc's own rule
# makes it twice the mmap threshold, tens of MB once a model load has raised that).
TRIM_THRESHOLD = 32 << 20


def _glibc_function(name: str) -> Callable[..., int] | None:
    """A glibc function by name, or None when the C library is not glibc (musl, macOS)."""
    try:
        function: Callable[..., int] = getattr(ctypes.CDLL("libc.so.6"), name)
    except (OSError, AttributeError):
        return None
    return function


_MALLOPT = _glibc_function("mallopt")
_MALLOC_TRIM = _glibc_function("malloc_trim")


def pin_thresholds(
    mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD
) -> bool:
    """Fix glibc's mmap and trim thresholds for this process; False when they cannot be set.

    Call once at process start, before the first model is loaded. It overrides the
    ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` environment variables.
    """
    if _MALLOPT is None:
        return False
    return bool(_MALLOPT(M_MMAP_THRESHOLD, mmap_threshold)) and bool(
        _MALLOPT(M_TRIM_THRESHOLD, trim_threshold)
    )


def release_heap() -> None:
    """Hand the heap pages that are free back to the OS (glibc's ``malloc_trim``).

    Called once per released session (about a millisecond). The weight tables are unmapped when
    freed, but a session's smaller blocks stay in glibc's arenas (one per thread that allocated)
    until trimmed: with the thresholds pinned and no trim, RSS after each of four swaps stayed
    +11 to +18 MB above its level before them; with it, within 2 MB.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)

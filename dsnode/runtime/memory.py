"""Keep freed heap memory from lingering in the process (glibc only; a no-op elsewhere).

Snapshots and large batches allocate big short-lived buffers. glibc raises its
mmap threshold after such a buffer is freed, so later ones come from the heap
and, once freed, stay in the process's RSS. :func:`fix_mmap_threshold` pins the
threshold (big buffers always come from, and go back to, the OS) and
:func:`trim` hands free heap pages back (``malloc_trim``), which the snapshot
thread calls after each snapshot.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_MMAP_THRESHOLD = -3  # mallopt parameter (malloc.h)
MMAP_THRESHOLD_BYTES = 128 * 1024  # glibc's initial value, kept fixed

_libc = None
if sys.platform.startswith("linux"):
    try:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        _libc.malloc_trim.argtypes = [ctypes.c_size_t]
        _libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        _libc = None


def fix_mmap_threshold() -> bool:
    """Allocations of 128 KiB and more always use mmap; True if it took effect."""
    return bool(_libc is not None and _libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))


def trim() -> bool:
    """Return free heap memory to the OS; True if some was released."""
    return bool(_libc is not None and _libc.malloc_trim(0))

"""Keep glibc from handing the forward pass's buffers back to the kernel after every batch.

A batch's forward allocates a few MB (im2col columns, activations) in the worker thread. glibc
trims a thread arena's heap top as soon as that much is free, so the next batch faults every page
back in: measured on fmnist_32 at ~1 700 req/s, 225 000 minor page faults/s and ~140 us of system
time per request, a third of the server's CPU. Fixed trim and mmap thresholds keep those pages;
the price is that the server holds on to its high-water mark of heap (tens of MB).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

# mallopt(3) parameter numbers (glibc malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

TRIM_THRESHOLD_BYTES = 256 << 20
MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's ceiling for the mmap threshold on 64-bit


def keep_freed_memory() -> bool:
    """Raise glibc's trim and mmap thresholds; False (and nothing changed) on other C libraries."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        log.debug("no mallopt in %r; leaving the allocator as it is", name)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)) and bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    log.debug("glibc trim threshold %d, mmap threshold %d: %s", TRIM_THRESHOLD_BYTES, MMAP_THRESHOLD_BYTES,
              "set" if ok else "refused")
    return ok

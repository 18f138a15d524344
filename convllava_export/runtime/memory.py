"""Process memory settings for long-running generation (run, chat, serve).

KV rows, prefix-cache copies and activations are many arrays of 1-100 MB that come and go with
requests. glibc serves allocations below its dynamic mmap threshold (which climbs to 32 MB after
the first large free) from heaps it rarely gives back, so a server's RSS ratchets up to its
worst moment. With the threshold pinned at 1 MB, each such array is its own mapping, returned to
the system the moment it is freed; `trim()` hands back what the heaps still hold after a burst.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import logging

log = logging.getLogger("convllava_export.memory")
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 1 << 20
_pinned = False  # return_freed_memory applied in this process


@functools.cache
def _libc():
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt  # noqa: B018 - glibc only (musl has no mallopt)
        return libc
    except (OSError, AttributeError):
        return None


def return_freed_memory() -> bool:
    """Pin glibc's mmap threshold so large arrays go back to the system when freed. True when applied."""
    libc = _libc()
    if libc is None:
        return False
    ok = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 4 * MMAP_THRESHOLD))
    global _pinned
    _pinned = ok
    if not ok:
        log.warning("mallopt refused the memory settings; RSS may stay at its peak")
    return ok


@contextlib.contextmanager
def heap_allocations(threshold: int = 1 << 30):
    """Within: large arrays come from glibc's heap again (no fresh zero-filled mapping, page
    faults and all, for every activation of a compute-bound pass); after: the threshold is pinned
    back and the heap's free memory returned. Only where `return_freed_memory` pinned it."""
    libc = _libc()
    if libc is None or not _pinned:
        yield
        return
    libc.mallopt(M_MMAP_THRESHOLD, threshold)
    try:
        yield
    finally:
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        trim()


def trim() -> None:
    """Give the heaps' free memory back (glibc's malloc_trim)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)

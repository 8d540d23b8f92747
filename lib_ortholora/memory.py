"""Keep peak RSS at one layer's worth while streaming multi-GB files.

glibc serves large buffers from its heap once its dynamic mmap threshold has risen, and freed
per-layer buffers interleaved with long-lived small results then never go back to the system
(seen: 4.7 GB of heap for an SDXL extraction that holds ~0.3 GB). Fixing the threshold at 1 MiB
makes every large buffer its own mapping, returned on free. No-op where glibc is absent.
"""
from __future__ import annotations

import ctypes
import ctypes.util
from functools import lru_cache

_M_MMAP_THRESHOLD = -3


@lru_cache(maxsize=1)
def _libc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return libc if libc is not None and hasattr(libc, "mallopt") else None
    except OSError:
        return None


@lru_cache(maxsize=1)
def large_buffers_unmapped_on_free() -> bool:
    """Make glibc allocate buffers ≥ 1 MiB with mmap (once per process); True if it took effect."""
    libc = _libc()
    return bool(libc and libc.mallopt(_M_MMAP_THRESHOLD, 1 << 20))


def trim() -> None:
    """Return freed heap pages to the system (glibc malloc_trim)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)

"""The physical baseline of a benchmark: reading its inputs once from a cold and from a warm page
cache, and writing (and syncing) a file of its output's size; and emptying the page cache of given
files (no root needed: fsync, then POSIX_FADV_DONTNEED per file)."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Iterable

BLOCK = 16 << 20


def drop_cache(paths: Iterable[str | os.PathLike]) -> bool:
    """Evict the files' pages from the page cache; False where the OS offers no way to."""
    advise = getattr(os, "posix_fadvise", None)
    if advise is None:
        return False
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages cannot be dropped
            advise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def read_once(paths: Iterable[str | os.PathLike]) -> float:
    """Seconds to read every byte of the files, in order, through one reused buffer."""
    buf = memoryview(bytearray(BLOCK))
    start = time.perf_counter()
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    return time.perf_counter() - start


def write_once(path: str | os.PathLike, nbytes: int) -> float:
    """Seconds to write `nbytes` to a new file and fsync it (as every output is); the file is removed."""
    block = os.urandom(min(BLOCK, max(nbytes, 1)))
    path = Path(path)
    start = time.perf_counter()
    try:
        with open(path, "wb", buffering=0) as f:
            left = nbytes
            while left > 0:
                left -= f.write(memoryview(block)[:min(left, len(block))])
            os.fsync(f.fileno())
        return time.perf_counter() - start
    finally:
        path.unlink(missing_ok=True)


def baseline(inputs: list[str], output_bytes: int, scratch: Path) -> dict:
    """Cold read (when the cache can be dropped), warm read and write, in seconds, and the two
    baselines read + write (cold, warm)."""
    figures: dict = {"input_mb": round(sum(os.path.getsize(p) for p in inputs) / 2**20, 1),
                     "output_mb": round(output_bytes / 2**20, 1)}
    if drop_cache(inputs):
        figures["read_cold_s"] = round(read_once(inputs), 3)
    figures["read_warm_s"] = round(read_once(inputs), 3)
    figures["write_s"] = round(write_once(scratch / ".bench-write-baseline", output_bytes), 3)
    if "read_cold_s" in figures:
        figures["cold_s"] = round(figures["read_cold_s"] + figures["write_s"], 3)
    figures["warm_s"] = round(figures["read_warm_s"] + figures["write_s"], 3)
    return figures

"""Keep peak RSS at one layer's worth while streaming multi-GB files, without paying for it in
page faults.

glibc serves large buffers from its heap once its dynamic mmap threshold has risen, and freed
per-layer buffers interleaved with long-lived small results then never go back to the system
(seen: 4.7 GB of heap for an SDXL extraction that holds ~0.3 GB). A fixed threshold makes every
large buffer its own mapping, returned on free — but then every fresh per-layer buffer is also a
fresh mapping that the kernel zero-fills page by page on first touch (6 M minor faults, ~19 s of
system time for one SD1.5 extraction; a first touch costs ~10 µs on a VM). So the per-layer
arrays of the streaming loops live in a `Workspace`: a few named buffers, sized once to the
largest layer and reused, whose pages are touched once per process; the threshold sits above
the per-layer temporaries that remain (2 MiB blocks of a randomized SVD), and freed heap memory is
kept up to TRIM_THRESHOLD so that they are recycled rather than faulted in again. No-op where
glibc is absent.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import math
import threading
from functools import lru_cache
from typing import Mapping

import torch

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


@lru_cache(maxsize=1)
def _libc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return libc if libc is not None and hasattr(libc, "mallopt") else None
    except OSError:
        return None


MMAP_THRESHOLD = 4 << 20
TRIM_THRESHOLD = 32 << 20


@lru_cache(maxsize=1)
def large_buffers_unmapped_on_free() -> bool:
    """Make glibc allocate buffers ≥ MMAP_THRESHOLD with mmap, and keep up to TRIM_THRESHOLD of
    free memory at the top of its heaps instead of returning (and then faulting in again) the
    per-layer temporaries below that size (once per process); True if it took effect."""
    libc = _libc()
    return bool(libc and libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
                and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def trim() -> None:
    """Return freed heap pages to the system (glibc malloc_trim)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


class Workspace:
    """Named scratch buffers on one device, reused from layer to layer.

    `take(name, shape, dtype)` returns a tensor over the buffer kept under `name`, grown (never
    shrunk) when a larger one is asked for. Its contents are undefined, and it stays valid only
    until the next `take` of the same name: a caller that keeps a result must copy it out. Buffers
    of different names never overlap. `reserve` sizes a buffer up front (to the largest layer of a
    run) so that it is allocated, and its pages faulted in, once. With `pin=True` CPU buffers are
    page-locked (faster copies to a CUDA device)."""

    def __init__(self, device: torch.device | str = "cpu", pin: bool = False):
        self.device = torch.device(device)
        self.pin = pin and self.device.type == "cpu"
        self._buffers: dict[str, torch.Tensor] = {}

    def reserve(self, name: str, nbytes: int) -> None:
        """Make the buffer `name` hold at least `nbytes`."""
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < nbytes:
            self._buffers.pop(name, None)  # free the old buffer before allocating its successor
            self._buffers[name] = torch.empty(nbytes, dtype=torch.uint8, device=self.device,
                                              pin_memory=self.pin)

    def take(self, name: str, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """A contiguous `shape`/`dtype` tensor over the buffer `name` (contents undefined)."""
        nbytes = math.prod(shape) * dtype.itemsize
        self.reserve(name, nbytes)
        return self._buffers[name][:nbytes].view(dtype).view(shape)

    @property
    def nbytes(self) -> int:
        """Bytes held by all buffers."""
        return sum(b.numel() for b in self._buffers.values())

    def clear(self) -> None:
        """Drop every buffer (their memory goes back to the system)."""
        self._buffers.clear()


class PerThread:
    """A `Workspace` per thread (for layers spread over worker threads), each with the buffers
    of `sizes` (name → bytes) reserved when the thread first asks for it."""

    def __init__(self, device: torch.device | str = "cpu", sizes: Mapping[str, int] | None = None,
                 pin: bool = False):
        self._local = threading.local()
        self._args = (device, pin)
        self._sizes = dict(sizes or {})

    def get(self) -> Workspace:
        """This thread's workspace."""
        work = getattr(self._local, "work", None)
        if work is None:
            work = self._local.work = Workspace(*self._args)
            for name, nbytes in self._sizes.items():
                work.reserve(name, nbytes)
        return work


class Ring:
    """`count` workspaces handed out and given back, for results that outlive the call that made
    them (a streamed writer still writing them). `acquire(turn)` serves turns 0, 1, 2, … in order,
    each when a workspace is free: a later request never takes the last free one from an earlier
    request that the consumer waits for. After `close`, waiting and later requests raise
    RuntimeError (workers waiting for a consumer that stopped end instead of hanging)."""

    def __init__(self, count: int, device: torch.device | str = "cpu", sizes: Mapping[str, int] | None = None):
        self._free: list[Workspace] = []
        for _ in range(count):
            work = Workspace(device)
            for name, nbytes in (sizes or {}).items():
                work.reserve(name, nbytes)
            self._free.append(work)
        self._ready = threading.Condition()
        self._turn, self._closed = 0, False

    def acquire(self, turn: int) -> Workspace:
        with self._ready:
            self._ready.wait_for(lambda: self._closed or (self._turn == turn and bool(self._free)))
            if self._closed:
                raise RuntimeError("the buffer ring is closed")
            self._turn += 1
            self._ready.notify_all()
            return self._free.pop()

    def release(self, work: Workspace) -> None:
        with self._ready:
            self._free.append(work)
            self._ready.notify_all()

    def close(self) -> None:
        with self._ready:
            self._closed = True
            self._ready.notify_all()

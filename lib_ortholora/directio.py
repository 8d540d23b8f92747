"""Reading a large byte range of a file that is not in the page cache without going through it.

A cold buffered read costs the kernel a page-cache page per 4 KiB: allocated, filled, copied out to
the reader and later reclaimed. On the 2-core VM the benchmarks run on, `dd` of the 6.9 GB SDXL
checkpoint takes 9.8 s, 8.5 s of it system CPU; with O_DIRECT the device writes straight into the
reader's buffer: 6.8 s, 0.3 s of CPU. A one-pass reader of a checkpoint (merge, extract) then leaves
both cores to the arithmetic, and does not push the rest of the machine (a loaded webui) out of the
page cache.

`DirectReader.read` asks the page cache first (mincore over a mapping of the range, which reads
nothing): a range it holds whole is copied from there as before, so a warm file is never read again
from disk. Any other range is read with O_DIRECT, at file offsets and buffer addresses aligned to
ALIGN: the caller places the data at `place(...)` inside a buffer of at least `count + SLACK`
bytes. Where the OS offers no O_DIRECT or no mincore (not Linux, tmpfs, FUSE), or the direct read
fails, `read` returns how far it got and the caller reads the rest the buffered way.
"""
from __future__ import annotations

import ctypes
import errno
import mmap
import os
import threading

ALIGN = 4096                  # file offsets, addresses and lengths of direct reads (logical block ≤ 4 KiB)
MIN_BYTES = 1 << 20           # smaller ranges are read buffered (and prefetched): nothing to gain
SLACK = 3 * ALIGN             # extra bytes a buffer needs: alignment before the data, page rounding after

_libc = None
if hasattr(os, "O_DIRECT"):
    try:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.mmap.restype = ctypes.c_void_p
        _libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                               ctypes.c_long)
        _libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
        _libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte))
    except (OSError, AttributeError):
        _libc = None
_MAP_FAILED = ctypes.c_void_p(-1).value


def cached(fd: int, position: int, count: int) -> bool | None:
    """Whether every page of bytes [position, position + count) of the file is in the page cache;
    None where that cannot be asked. Maps the range (touching nothing) and asks mincore."""
    if _libc is None or count <= 0:
        return None
    start = position - position % mmap.ALLOCATIONGRANULARITY
    length = position + count - start
    addr = _libc.mmap(None, length, mmap.PROT_READ, mmap.MAP_SHARED, fd, start)
    if addr in (None, _MAP_FAILED):
        return None
    try:
        pages = -(-length // mmap.PAGESIZE)
        vec = (ctypes.c_ubyte * pages)()
        if _libc.mincore(addr, length, vec) != 0:
            return None
        return all(b & 1 for b in bytes(vec))
    finally:
        _libc.munmap(addr, length)


def place(address: int, position: int) -> int:
    """Offset in a buffer at `address` where file byte `position` goes so that aligned file offsets
    fall on aligned addresses (in [ALIGN, 2·ALIGN): room for the page the range starts in)."""
    return ALIGN + (position - address) % ALIGN


class DirectReader:
    """Direct reads of one open file (its descriptor `fd`, which the caller keeps and closes)."""

    def __init__(self, fd: int):
        self._fd = fd
        self._direct: int | None = None
        self._lock = threading.Lock()
        self.enabled = _libc is not None

    def read(self, view: memoryview, offset: int, position: int, count: int) -> int:
        """Fill view[offset:offset + count] with bytes [position, position + count) of the file, where
        `offset` is `place(address of view, position)` and `view` has ≥ offset + count + 2·ALIGN bytes.
        Returns how many leading bytes are filled: `count`, or less where the range is cached (0: the
        caller's buffered read is the right one), direct reads are not possible here, or the file
        ends early (the caller's read then says so)."""
        if not self.enabled or count < MIN_BYTES or cached(self._fd, position, count) is not False:
            return 0
        fd = self._open()
        if fd is None:
            return 0
        shift = offset - position  # view index of file byte q: q + shift
        at, end = position - position % ALIGN, -(-(position + count) // ALIGN) * ALIGN
        while at < end:
            try:
                got = os.preadv(fd, [view[at + shift:end + shift]], at)
            except OSError as err:
                if err.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                    raise
                self.enabled = False  # this file system takes no direct reads after all
                break
            if got <= 0 or got % ALIGN:
                at += max(got, 0)
                break  # end of file (or a partial block): nothing more to read this way
            at += got
        return max(0, min(at, position + count) - position)

    def _open(self) -> int | None:
        """A second descriptor of the same file, opened with O_DIRECT (once); None where refused."""
        with self._lock:
            if self._direct is None and self.enabled:
                self._direct = _reopen_direct(self._fd)
                self.enabled = self._direct is not None
            return self._direct

    def close(self) -> None:
        with self._lock:
            if self._direct is not None:
                os.close(self._direct)
            self._direct, self.enabled = None, False


def _reopen_direct(fd: int) -> int | None:
    """`fd`'s file opened again with O_DIRECT through /proc/self/fd (the same inode even if its path
    was replaced since); None where that is not possible."""
    try:
        direct = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_DIRECT | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    same, here = os.fstat(fd), os.fstat(direct)
    if (same.st_dev, same.st_ino) != (here.st_dev, here.st_ino):
        os.close(direct)
        return None
    return direct

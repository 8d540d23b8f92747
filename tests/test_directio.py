"""Direct reads (directio): bytes identical to buffered reads at any offset, the page cache asked
first, a cold file read without it, and every failure falling back to the buffered read."""
from __future__ import annotations

import errno
import mmap
import os

import pytest
import safetensors.torch
import torch

from lib_ortholora import directio
from lib_ortholora.extract import extract_lora
from lib_ortholora.fileio import open_tensors
from lib_ortholora.lorafile import read_lora
from lib_ortholora.merge import merge_lora

from lorautil import lora_tensors, save, tiny_targets


def _direct_possible(folder) -> bool:
    """Whether this folder's file system takes an aligned O_DIRECT read (tmpfs and some overlay
    set-ups do not; the reader then falls back, which the other tests cover)."""
    if not hasattr(os, "O_DIRECT") or directio._libc is None:
        return False
    probe = folder / "probe"
    probe.write_bytes(b"\1" * directio.ALIGN)
    page = mmap.mmap(-1, directio.ALIGN)  # page-aligned memory
    try:
        fd = os.open(probe, os.O_RDONLY | os.O_DIRECT)
        try:
            return os.preadv(fd, [page], 0) == directio.ALIGN
        finally:
            os.close(fd)
    except OSError:
        return False
    finally:
        page.close()


def _odd_file(path, sizes=(1, 300_001, 4096, 1 << 18, 77)) -> dict[str, torch.Tensor]:
    """Tensors at unaligned offsets (a metadata string shifts the data start), the last one ending
    inside the file's last page."""
    g = torch.Generator().manual_seed(1)
    tensors = {f"t{i}": torch.randint(-2**15, 2**15, (n,), generator=g, dtype=torch.int16) for i, n in enumerate(sizes)}
    safetensors.torch.save_file(tensors, str(path), metadata={"pad": "x" * 13})
    return tensors


@pytest.fixture
def forced(monkeypatch):
    """Every range counts as large and cold, so that get() takes the direct path; records reads."""
    monkeypatch.setattr(directio, "MIN_BYTES", 1)
    monkeypatch.setattr(directio, "cached", lambda fd, position, count: False)
    calls = []
    real = directio.DirectReader.read

    def read(self, view, offset, position, count):
        done = real(self, view, offset, position, count)
        calls.append((count, done))
        return done

    monkeypatch.setattr(directio.DirectReader, "read", read)
    return calls


def test_direct_reads_give_the_stored_bytes_at_any_offset(tmp_path, forced):
    tensors = _odd_file(tmp_path / "odd.safetensors")
    with open_tensors(tmp_path / "odd.safetensors") as f:
        for key, want in tensors.items():
            buf = torch.full((f.buffer_bytes(key),), 0xAB, dtype=torch.uint8)
            got = f.get(key, buf)
            assert torch.equal(got, want), key
            assert got.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()  # in the buffer
            assert got.data_ptr() % directio.ALIGN == (f._data_start + f._offsets[key]) % directio.ALIGN
    if _direct_possible(tmp_path):
        assert forced and all(done == count for count, done in forced)  # every byte came direct


def test_a_buffer_without_room_is_read_buffered(tmp_path, forced):
    tensors = _odd_file(tmp_path / "odd.safetensors")
    with open_tensors(tmp_path / "odd.safetensors") as f:
        buf = torch.empty(f.nbytes("t1"), dtype=torch.uint8)
        got = f.get("t1", buf)
        assert torch.equal(got, tensors["t1"]) and got.data_ptr() == buf.data_ptr()
        assert torch.equal(f.get("t3"), tensors["t3"])  # no buffer: fresh memory, buffered
    assert not forced


def test_a_cached_range_is_copied_from_the_page_cache(tmp_path, monkeypatch):
    """cached() itself (no monkeypatch): a file just written and read is in the page cache, so the
    direct reader declines (returns 0) and the buffered read serves it."""
    if not _direct_possible(tmp_path):
        pytest.skip("no O_DIRECT or mincore here")
    path = tmp_path / "warm.bin"
    data = os.urandom(3 << 20)
    path.write_bytes(data)
    path.read_bytes()
    fd = os.open(path, os.O_RDONLY)
    try:
        assert directio.cached(fd, 12345, 2 << 20) is True
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        if directio.cached(fd, 12345, 2 << 20):
            pytest.skip("this file system keeps the pages (cannot make the file cold)")
        reader = directio.DirectReader(fd)
        view = memoryview(bytearray((2 << 20) + directio.SLACK))
        base = torch.frombuffer(view, dtype=torch.uint8).data_ptr()
        offset = directio.place(base, 12345)
        assert reader.read(view, offset, 12345, 2 << 20) == 2 << 20
        assert not directio.cached(fd, 12345, 2 << 20)  # read around the page cache, not into it
        assert bytes(view[offset:offset + (2 << 20)]) == data[12345:12345 + (2 << 20)]
        reader.close()
    finally:
        os.close(fd)


def test_a_failing_direct_read_falls_back_and_stops_trying(tmp_path, forced, monkeypatch):
    tensors = _odd_file(tmp_path / "odd.safetensors")
    real = os.preadv

    def refuse(fd, buffers, position, *flags):
        if os.fstat(fd).st_ino and fcntl_direct(fd):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, buffers, position, *flags)

    def fcntl_direct(fd):
        import fcntl
        return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & getattr(os, "O_DIRECT", 0))

    monkeypatch.setattr(os, "preadv", refuse)
    with open_tensors(tmp_path / "odd.safetensors") as f:
        for key, want in tensors.items():
            assert torch.equal(f.get(key, torch.empty(f.buffer_bytes(key), dtype=torch.uint8)), want)
        assert not f._direct.enabled
    assert all(done == 0 for _, done in forced)


def test_the_direct_descriptor_is_the_opened_file_even_when_its_path_is_replaced(tmp_path, forced):
    tensors = _odd_file(tmp_path / "odd.safetensors")
    with open_tensors(tmp_path / "odd.safetensors") as f:
        _odd_file(tmp_path / "other.safetensors", sizes=(9, 300_001, 4096, 1 << 18, 77))
        os.replace(tmp_path / "other.safetensors", tmp_path / "odd.safetensors")
        got = f.get("t1", torch.empty(f.buffer_bytes("t1"), dtype=torch.uint8))
        assert torch.equal(got, tensors["t1"])


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_merge_and_extract_write_the_same_bytes_with_direct_reads(pairs, tmp_path, monkeypatch, arch):
    base, tuned = pairs(arch)
    lora = tmp_path / "l.safetensors"
    save(lora, lora_tensors(tiny_targets(arch)[:40], rank=4, seed=3))
    merge_lora(base, lora, 0.8, tmp_path / "buffered.safetensors")
    extract_lora(base, tuned, 4, save_path=tmp_path / "buffered_lora.safetensors", max_rank=4, min_rank=4)
    monkeypatch.setattr(directio, "MIN_BYTES", 1)
    asked = []
    monkeypatch.setattr(directio, "cached", lambda fd, position, count: asked.append(count) or False)
    merge_lora(base, lora, 0.8, tmp_path / "direct.safetensors")
    extract_lora(base, tuned, 4, save_path=tmp_path / "direct_lora.safetensors", max_rank=4, min_rank=4)
    assert len(asked) > 100  # the layers were read by the direct reader
    assert (tmp_path / "direct.safetensors").read_bytes() == (tmp_path / "buffered.safetensors").read_bytes()
    a, b = read_lora(tmp_path / "direct_lora.safetensors"), read_lora(tmp_path / "buffered_lora.safetensors")
    assert a.modules.keys() == b.modules.keys()
    for name in a.modules:
        assert torch.equal(a.modules[name].delta(), b.modules[name].delta()), name


def test_a_file_system_that_refuses_o_direct_is_read_buffered(tmp_path, forced, monkeypatch):
    tensors = _odd_file(tmp_path / "odd.safetensors")
    real = os.open

    def no_direct(path, flags, *args, **kw):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(path, flags, *args, **kw)

    monkeypatch.setattr(os, "open", no_direct)
    with open_tensors(tmp_path / "odd.safetensors") as f:
        for key, want in tensors.items():
            assert torch.equal(f.get(key, torch.empty(f.buffer_bytes(key), dtype=torch.uint8)), want)
        assert not f._direct.enabled and not f.reads_direct("t1")  # asked once, then plain reads
    assert all(done == 0 for _, done in forced)

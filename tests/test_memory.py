"""Reusable buffers (memory.Workspace / PerThread), reading into them (TensorFile.get with a
buffer), and the page-fault budget of a streamed layer: the per-layer arrays reuse memory that is
already mapped instead of a fresh zero-filled mapping per layer."""
from __future__ import annotations

import os
import resource
import threading
from pathlib import Path

import pytest
import safetensors.torch
import torch

from lib_ortholora.extract import decompose
from lib_ortholora.fileio import open_tensors
from lib_ortholora.memory import PerThread, Workspace, large_buffers_unmapped_on_free
from lib_ortholora.rank import as_policy


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def test_workspace_reuses_a_buffer_per_name_and_names_never_overlap() -> None:
    ws = Workspace()
    a = ws.take("a", (4, 8), torch.float32)
    b = ws.take("b", (32,), torch.float16)
    a.fill_(1.0)
    b.fill_(2.0)
    assert torch.all(a == 1.0) and torch.all(b == 2.0)  # distinct memory
    again = ws.take("a", (2, 3), torch.float64)  # smaller: the same memory, another view
    assert again.data_ptr() == a.data_ptr() and again.shape == (2, 3) and again.dtype == torch.float64
    assert ws.nbytes == 128 + 64
    bigger = ws.take("a", (1000,), torch.float32)  # grows
    assert bigger.shape == (1000,) and ws.nbytes == 4000 + 64
    assert ws.take("e", (0, 5), torch.float32).shape == (0, 5)
    ws.clear()
    assert ws.nbytes == 0


def test_workspace_reserve_sizes_once() -> None:
    ws = Workspace()
    ws.reserve("x", 1 << 20)
    first = ws.take("x", (10,), torch.float32).data_ptr()
    assert ws.take("x", (1 << 18,), torch.float32).data_ptr() == first  # fits: no new allocation
    ws.reserve("x", 100)  # never shrinks
    assert ws.nbytes == 1 << 20


def test_per_thread_workspaces_are_distinct_and_reserved() -> None:
    spaces = PerThread("cpu", {"delta": 4096})
    seen: dict[str, torch.Tensor] = {}  # kept: a finished thread's buffer could be reused otherwise

    def grab(name: str) -> None:
        work = spaces.get()
        assert work is spaces.get() and work.nbytes == 4096
        seen[name] = work.take("delta", (1024,), torch.float32)

    threads = [threading.Thread(target=grab, args=(f"t{i}",)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    grab("main")
    assert len({t.data_ptr() for t in seen.values()}) == 3


@pytest.fixture()
def tensor_file(tmp_path: Path) -> Path:
    tensors = {"w": torch.randn(64, 32), "h": torch.randn(5, 7).half(), "i": torch.arange(6),
               "empty": torch.zeros(0, 3), "s": torch.tensor(2.5)}
    path = tmp_path / "t.safetensors"
    safetensors.torch.save_file(tensors, str(path))
    return path


def test_get_into_a_buffer_is_a_view_of_it_and_equals_a_fresh_read(tensor_file: Path) -> None:
    buf = torch.empty(1 << 14, dtype=torch.uint8)
    with open_tensors(tensor_file) as f:
        for key in f.keys():
            fresh = f.get(key)
            viewed = f.get(key, buf)
            assert torch.equal(viewed, fresh) and viewed.dtype == fresh.dtype, key
            if f.nbytes(key):
                assert viewed.data_ptr() == buf.data_ptr(), key
                assert fresh.untyped_storage().nbytes() == f.nbytes(key)  # a plain get owns exact memory


def test_buffered_reads_kept_by_the_caller_do_not_alias(tensor_file: Path) -> None:
    """Two reads into two buffers stay intact; a plain get never shares memory with a buffer."""
    ws = Workspace()
    with open_tensors(tensor_file) as f:
        w = f.get("w", ws.take("one", (f.nbytes("w"),), torch.uint8))
        h = f.get("h", ws.take("two", (f.nbytes("h"),), torch.uint8))
        kept = f.get("w")
        kept_copy = kept.clone()
        f.get("i", ws.take("one", (f.nbytes("i"),), torch.uint8))  # reuse of "one" overwrites w only
        assert torch.equal(h, f.get("h")) and torch.equal(kept, kept_copy)
        assert not torch.equal(w, kept)


def test_get_refuses_a_buffer_that_is_too_small(tensor_file: Path) -> None:
    with open_tensors(tensor_file) as f, pytest.raises(ValueError, match="≥ 8192 bytes"):
        f.get("w", torch.empty(100, dtype=torch.uint8))


def test_prefetch_announces_the_tensor_bytes(tensor_file: Path, monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, offset, length, advice: calls.append((offset, length, advice)),
                        raising=False)
    monkeypatch.setattr(os, "POSIX_FADV_WILLNEED", 3, raising=False)
    raw = tensor_file.read_bytes()
    with open_tensors(tensor_file) as f:
        f.prefetch("h")
        f.prefetch("empty")  # nothing to read: no call
        (offset, length, advice), = calls
        assert advice == 3 and length == f.nbytes("h")
        assert torch.equal(torch.frombuffer(bytearray(raw[offset:offset + length]), dtype=torch.float16).reshape(5, 7),
                           f.get("h"))
    f.prefetch("h")  # closed: still only a hint, no error
    assert len(calls) == 1


def test_a_streamed_layer_faults_in_no_fresh_pages_once_its_buffers_exist() -> None:
    """Second pass of a 2048×2048 layer through decompose with a workspace: the float32 temporaries
    (16 MiB each) come from the workspace, so the page faults stay far below one layer's pages
    (before: fresh 16–32 MiB mappings for every temporary, ~41 000 faults)."""
    large_buffers_unmapped_on_free()
    torch.manual_seed(0)
    d = torch.randn(2048, 2048) * 1e-3
    ws = Workspace()
    policy = as_policy(8, 1, None)
    decompose(d, tuple(d.shape), policy, "randomized", ws)
    before = _minor_faults()
    lr, err = decompose(d, tuple(d.shape), policy, "randomized", ws)
    assert _minor_faults() - before < 1500
    assert 0 < err < 1 and lr.rank == 8


def test_reading_into_a_warm_buffer_faults_in_no_pages(tmp_path: Path) -> None:
    path = tmp_path / "big.safetensors"
    safetensors.torch.save_file({"w": torch.ones(2048, 2048, dtype=torch.float16)}, str(path))
    buf = torch.ones(2048 * 2048 * 2, dtype=torch.uint8)  # pages touched
    with open_tensors(path) as f:
        f.get("w", buf)
        before = _minor_faults()
        w = f.get("w", buf)
        assert _minor_faults() - before < 200  # a fresh read would fault in 2048 pages
    assert torch.all(w == 1)


@pytest.mark.parametrize("preset", [None, "ACTIVE"])
def test_cli_process_lets_idle_openmp_threads_sleep_unless_told_otherwise(preset: str | None) -> None:
    """`python -m lib_ortholora` sets OMP_WAIT_POLICY=PASSIVE before torch loads (a user's own
    setting wins) and freezes the objects of the imports out of the garbage collector."""
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if preset:
        env["OMP_WAIT_POLICY"] = preset
    code = ("import os, runpy, sys\nsys.argv = ['lib_ortholora', '--help']\n"
            "try:\n    runpy.run_module('lib_ortholora', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "import gc\nprint(gc.get_freeze_count() > 100000, os.environ.get('OMP_WAIT_POLICY'))")
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                         check=True).stdout
    assert out.splitlines()[-1] == f"True {preset or 'PASSIVE'}"  # and torch's objects frozen out of the GC


@pytest.mark.parametrize("block", [1 << 20, 5000])
def test_merged_tensor_in_blocks_and_in_place_is_within_half_an_ulp(block: int, monkeypatch) -> None:
    """Row blocks (crossing the q block's edges when small), a sum in a workspace, the result
    written over the input's own memory: each element within 0.5 fp16 ulp of w + m·dW, rows
    outside the block untouched, and no fresh pages on a second layer."""
    from lib_ortholora import merge
    from lib_ortholora.merge import Contribution, merged_tensor
    from lib_ortholora.modules.lora import LoRAModule
    monkeypatch.setattr(merge, "BLOCK", block)
    large_buffers_unmapped_on_free()
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3072, 1024, generator=g).half()
    lora = LoRAModule("q", torch.randn(1024, 8, generator=g) * 0.1, torch.randn(8, 1024, generator=g) * 0.1, None, 8.0)
    contributions = [Contribution(lora, 0.7, (1024, 2048))]  # an open_clip q block: rows 1024–2048
    exact = w.double()
    exact[1024:2048] += 0.7 * lora.delta().double()
    fresh = merged_tensor(w, contributions, torch.float16)
    ulp = exact.abs().clamp_min(2 ** -14) * 2 ** -10
    assert float(((fresh.double() - exact).abs() / ulp).max()) <= 0.5 + 1e-3
    assert torch.equal(fresh[:1024], w[:1024]) and torch.equal(fresh[2048:], w[2048:])
    ws, mine = Workspace(), w.clone()
    merged_tensor(mine.clone(), contributions, torch.float16, None, ws)
    before = _minor_faults()
    in_place = merged_tensor(mine, contributions, torch.float16, mine, ws)
    assert _minor_faults() - before < 300  # a fresh float32 sum: ~3000 pages
    assert in_place.data_ptr() == mine.data_ptr() and torch.equal(in_place, fresh)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_check_finite_finds_a_single_bad_value(dtype: torch.dtype, value: float) -> None:
    from lib_ortholora.errors import OrthoLoraError
    from lib_ortholora.fileio import check_finite
    t = torch.randn(300, 40).to(dtype)
    check_finite(t, "w", "f.safetensors")
    check_finite(t[:0], "w", "f.safetensors")
    t[123, 7] = value
    counts = "1 NaN and 0 Inf" if value != value else "0 NaN and 1 Inf"
    with pytest.raises(OrthoLoraError, match=f"f.safetensors: tensor 'w' has {counts} values"):
        check_finite(t, "w", "f.safetensors")


def test_streamed_writer_writes_behind_and_starts_writeback(tmp_path: Path, monkeypatch) -> None:
    """produce(n + 1) runs while tensor n is written; every WRITEBACK_BYTES the written range is
    handed to the kernel for writeback; the file is exact."""
    from lib_ortholora import fileio
    from lib_ortholora.fileio import TensorSpec, write_safetensors_streamed
    monkeypatch.setattr(fileio, "WRITEBACK_BYTES", 1000)
    monkeypatch.setattr(fileio, "INLINE_BYTES", 0)  # these small tensors go to the writer thread too
    hints: list[tuple[int, int, int]] = []
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, offset, length, advice: hints.append((offset, length, advice)),
                        raising=False)
    monkeypatch.setattr(os, "POSIX_FADV_DONTNEED", 4, raising=False)
    tensors = {f"t{i}": torch.full((300,), float(i)) for i in range(6)}  # 1200 bytes each
    started, finished = [], []
    real_write = fileio._Sink.write

    def slow_write(sink, name, tensor):
        started.append(len(started))
        threading.Event().wait(0.05)
        real_write(sink, name, tensor)
        finished.append(len(finished))

    monkeypatch.setattr(fileio._Sink, "write", slow_write)
    produced_while_writing = []

    def produce(name: str) -> torch.Tensor:
        produced_while_writing.append(len(started) > len(finished))
        return tensors[name]

    path = tmp_path / "w.safetensors"
    write_safetensors_streamed(path, [TensorSpec(k, torch.float32, (300,)) for k in tensors], produce)
    assert any(produced_while_writing[1:])
    assert all(advice == 4 for _, _, advice in hints) and len(hints) == 6
    head = 8 + int.from_bytes(path.read_bytes()[:8], "little")
    ends = [o + n for o, n, _ in hints]
    assert ends == [head + 1200 * k for k in range(1, 7)]  # a hint as soon as a window is written,
    assert [o for o, _, _ in hints] == [0, 0] + ends[:-2]  # covering it and the window before it
    loaded = safetensors.torch.load_file(str(path))
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())


def test_merge_with_a_slow_writer_stays_exact(tmp_path: Path, pairs, monkeypatch) -> None:
    """merge hands the writer views of its buffers; they alternate, so a tensor still being
    written is never overwritten by the next one."""
    import lorautil as U
    from lib_ortholora import fileio
    from lib_ortholora.merge import merge_lora
    base = pairs("sd15")[0]
    lora = U.save(tmp_path / "l.safetensors", U.lora_tensors(U.tiny_targets("sd15"), rank=4, alpha=2.0,
                                                             arch_id="sd15"))
    merge_lora(base, lora, 0.8, tmp_path / "fast.safetensors")
    real_write = fileio._Sink.write
    monkeypatch.setattr(fileio._Sink, "write", lambda sink, n, t: (threading.Event().wait(0.002), real_write(sink, n, t)))
    merge_lora(base, lora, 0.8, tmp_path / "slow.safetensors")
    assert (tmp_path / "slow.safetensors").read_bytes() == (tmp_path / "fast.safetensors").read_bytes()
    with open_tensors(tmp_path / "slow.safetensors") as out, open_tensors(base) as b:
        assert not torch.equal(out.get(U.tiny_targets("sd15")[0].ckpt_key), b.get(U.tiny_targets("sd15")[0].ckpt_key))


_RECYCLE = """
import resource, torch
from lib_ortholora.extract import decompose
from lib_ortholora.memory import Workspace, large_buffers_unmapped_on_free
from lib_ortholora.rank import as_policy
assert large_buffers_unmapped_on_free()
d, work = torch.randn(10240, 1280) * 1e-3, Workspace()
for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    decompose(d, (10240, 1280), as_policy(32, 1, None), "randomized", work)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_per_layer_temporaries_below_the_mmap_threshold_are_recycled() -> None:
    """The randomized SVD's [m, q] blocks of a 10240×1280 layer (2 MiB each) come back from the
    heap for the next layer instead of as fresh mappings (before: ~6000 faults per layer). A fresh
    single-threaded process: its heap is in the state of a CLI run's."""
    import subprocess
    import sys
    from lib_ortholora.memory import MMAP_THRESHOLD, TRIM_THRESHOLD
    assert 3 << 20 < MMAP_THRESHOLD <= 8 << 20 and TRIM_THRESHOLD >= 4 * MMAP_THRESHOLD
    out = subprocess.run([sys.executable, "-c", _RECYCLE], cwd=Path(__file__).resolve().parents[1],
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, check=True)
    assert int(out.stdout.split()[-1]) < 1000


@pytest.mark.parametrize("kernel_copy", ["copy_file_range", "EXDEV", "absent"])
def test_stored_tensors_are_copied_file_to_file(tensor_file: Path, tmp_path: Path, monkeypatch,
                                               kernel_copy: str) -> None:
    """A FileSlice handed to the writer lands byte for byte, by copy_file_range or, where the OS
    refuses it between these files or has none, through a small buffer."""
    import errno
    from lib_ortholora.fileio import TensorSpec, write_safetensors_streamed
    if kernel_copy == "EXDEV":
        def refuse(*args):
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))
        monkeypatch.setattr(os, "copy_file_range", refuse, raising=False)
    elif kernel_copy == "absent":
        monkeypatch.delattr(os, "copy_file_range", raising=False)
    out = tmp_path / "copy.safetensors"
    with open_tensors(tensor_file) as f:
        specs = [TensorSpec(k, f.dtype(k), f.shape(k)) for k in f.keys()]
        write_safetensors_streamed(out, specs, f.stored, None)
        with open_tensors(out) as g:
            for key in f.keys():
                assert torch.equal(g.get(key), f.get(key)) and g.dtype(key) == f.dtype(key), key


def test_a_stored_tensor_of_another_dtype_or_a_full_disk_is_refused(tensor_file: Path, tmp_path: Path,
                                                                  monkeypatch) -> None:
    import errno
    from lib_ortholora.errors import OrthoLoraError
    from lib_ortholora.fileio import TensorSpec, write_safetensors_streamed
    with open_tensors(tensor_file) as f:
        with pytest.raises(OrthoLoraError, match="tensor 'w': stored as torch.float32"):
            write_safetensors_streamed(tmp_path / "a.safetensors", [TensorSpec("w", torch.float16, (64, 32))],
                                       f.stored, None)

        def full(*args):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        monkeypatch.setattr(os, "copy_file_range", full, raising=False)
        with pytest.raises(OrthoLoraError, match=r"b\.safetensors: cannot write: No space left"):
            write_safetensors_streamed(tmp_path / "b.safetensors", [TensorSpec("w", torch.float32, (64, 32))],
                                       f.stored, None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.safetensors"]


@pytest.mark.parametrize("positional", [True, False])
def test_threads_read_one_file_at_once(tmp_path: Path, monkeypatch, positional: bool) -> None:
    """Reads at an offset (preadv) need no lock; without preadv they take turns. Either way every
    thread gets its own tensor, and close waits for reads in progress."""
    from concurrent.futures import ThreadPoolExecutor
    if not positional:
        monkeypatch.delattr(os, "preadv", raising=False)
    tensors = {f"t{i}": torch.full((256, 256), float(i)) for i in range(16)}
    path = tmp_path / "many.safetensors"
    safetensors.torch.save_file(tensors, str(path))
    f = open_tensors(path)
    with ThreadPoolExecutor(4) as pool:
        got = dict(zip(tensors, pool.map(f.get, tensors)))
    assert all(torch.equal(got[k], v) for k, v in tensors.items())
    f.close()
    from lib_ortholora.errors import OrthoLoraError
    with pytest.raises(OrthoLoraError, match="closed"):
        f.get("t0")


def test_ring_serves_turns_in_order_and_close_ends_the_waiters() -> None:
    from lib_ortholora.memory import Ring
    ring = Ring(1, sizes={"read": 64})
    order: list[int] = []
    first = ring.acquire(0)
    assert first.nbytes == 64

    def take(turn: int) -> None:
        try:
            work = ring.acquire(turn)
        except RuntimeError:
            order.append(-turn)
            return
        order.append(turn)
        ring.release(work)

    later = threading.Thread(target=take, args=(2,))
    later.start()
    soon = threading.Thread(target=take, args=(1,))
    soon.start()
    ring.release(first)  # turn 1 goes first although turn 2 asked first
    soon.join()
    later.join()
    assert order == [1, 2]
    waiting = threading.Thread(target=take, args=(4,))  # turn 3 never comes
    waiting.start()
    ring.close()
    waiting.join(timeout=5)
    assert not waiting.is_alive() and order[-1] == -4


def test_parallel_map_draws_at_most_ahead_items() -> None:
    from lib_ortholora.normcache import parallel_map
    drawn: list[int] = []

    def items():
        for i in range(40):
            drawn.append(i)
            yield i

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        stream = parallel_map(lambda i: (i, len(drawn)), items(), ahead=10)
        results = list(stream)
    finally:
        torch.set_num_threads(before)
    assert [i for i, _ in results] == list(range(40))
    assert all(seen <= i + 10 for i, seen in results)

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
    """`python -m lib_ortholora` sets OMP_WAIT_POLICY=PASSIVE before torch loads; a user's own
    setting wins."""
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if preset:
        env["OMP_WAIT_POLICY"] = preset
    code = ("import os, runpy, sys\nsys.argv = ['lib_ortholora', '--help']\n"
            "try:\n    runpy.run_module('lib_ortholora', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "print(os.environ.get('OMP_WAIT_POLICY'))")
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                         check=True).stdout
    assert out.splitlines()[-1] == (preset or "PASSIVE")


def test_merged_tensor_in_a_workspace_equals_the_fresh_one_and_faults_in_nothing_new() -> None:
    from lib_ortholora.merge import Contribution, merged_tensor
    from lib_ortholora.modules.lora import LoRAModule

    large_buffers_unmapped_on_free()
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3072, 1024, generator=g).half()
    lora = LoRAModule("q", torch.randn(1024, 8, generator=g) * 0.1, torch.randn(8, 1024, generator=g) * 0.1, None, 8.0)
    contributions = [Contribution(lora, 0.7, (1024, 2048))]  # an open_clip q block: rows 1024–2048
    want = merged_tensor(w.clone(), contributions, torch.float16)
    ws = Workspace()
    merged_tensor(w, contributions, torch.float16, ws)
    before = _minor_faults()
    got = merged_tensor(w, contributions, torch.float16, ws)
    assert _minor_faults() - before < 300  # fresh float32 + fp16 copies: ~2300 pages
    assert torch.equal(got, want) and torch.equal(got[:1024], w[:1024]) and not torch.equal(got[1024:2048], w[1024:2048])


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
    hints: list[tuple[int, int, int]] = []
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, offset, length, advice: hints.append((offset, length, advice)),
                        raising=False)
    monkeypatch.setattr(os, "POSIX_FADV_DONTNEED", 4, raising=False)
    tensors = {f"t{i}": torch.full((300,), float(i)) for i in range(6)}  # 1200 bytes each
    started, finished = [], []
    real_write = fileio._Sink.write

    def slow_write(sink, tensor):
        started.append(len(started))
        threading.Event().wait(0.05)
        real_write(sink, tensor)
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
    monkeypatch.setattr(fileio._Sink, "write", lambda sink, t: (threading.Event().wait(0.002), real_write(sink, t)))
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

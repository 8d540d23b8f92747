"""Tests of lib_ortholora.fileio: readers, validation, atomic/streamed writers, hashes, names."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import struct
from pathlib import Path

import pytest
import safetensors.torch
import torch

from lib_ortholora import fileio
from lib_ortholora.errors import OrthoLoraError
from lib_ortholora.fileio import (TensorSpec, atomic_output, check_finite, open_tensors,
                                  SafetensorsWriter, layout_order, safe_output_path,
                                  write_safetensors_streamed)

ALL_DTYPES = list(fileio.SAFETENSORS_DTYPES.values())


def sample(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=gen) > 0.5
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=gen) * 3).to(dtype)
    return torch.randint(0, 100, shape, generator=gen).to(dtype)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (works for float8, where == is not implemented on every build)."""
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)))


def sample_dict() -> dict[str, torch.Tensor]:
    tensors = {f"t_{str(d).split('.')[-1]}": sample(d, (3, 5), i) for i, d in enumerate(ALL_DTYPES)}
    tensors["empty"] = torch.zeros((0, 4), dtype=torch.float16)
    tensors["scalar"] = torch.tensor(2.5)
    return tensors


def no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def raw_safetensors(path: Path, header: object, data: bytes = b"", *, length: int | None = None,
                    raw_header: bytes | None = None) -> Path:
    """Write a hand-made (possibly broken) safetensors file."""
    head = raw_header if raw_header is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(head) if length is None else length) + head + data)
    return path


# --- reading ---------------------------------------------------------------------------------


def test_round_trip_all_dtypes_and_metadata(tmp_path: Path) -> None:
    tensors = sample_dict()
    path = tmp_path / "a.safetensors"
    safetensors.torch.save_file(tensors, str(path), {"ss_network_dim": "4", "title": "ünï"})
    with open_tensors(path) as tf:
        assert sorted(tf.keys()) == sorted(tensors)
        assert len(tf) == len(tensors) and "empty" in tf and "nope" not in tf
        assert tf.metadata == {"ss_network_dim": "4", "title": "ünï"}
        assert tf.path == path
        for key, ref in tensors.items():
            assert tf.shape(key) == tuple(ref.shape)
            assert tf.dtype(key) == ref.dtype
            assert tf.nbytes(key) == ref.numel() * ref.element_size()
            assert same(tf.get(key), ref), key


def test_keys_in_header_order_and_get_is_fresh(tmp_path: Path) -> None:
    data = torch.arange(6, dtype=torch.float32)
    header = {"z": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
              "a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [8, 24]}}
    path = raw_safetensors(tmp_path / "o.safetensors", header, data.numpy().tobytes())
    with open_tensors(path) as tf:
        assert tf.keys() == ["z", "a"]
        assert torch.equal(tf.get("a"), data[2:].reshape(2, 2))
        first = tf.get("z")
        first += 1  # writable, owns its memory
        assert torch.equal(tf.get("z"), data[:2])


def test_unknown_key_and_closed_file(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    safetensors.torch.save_file({"x": torch.ones(2)}, str(path))
    tf = open_tensors(path)
    with pytest.raises(KeyError):
        tf.get("y")
    with pytest.raises(OrthoLoraError, match=r"a\.safetensors: no tensor named 'y'"):
        tf.shape("y")
    tf.close()
    with pytest.raises(OrthoLoraError, match="closed"):
        tf.get("x")


@pytest.mark.parametrize("name", ["missing.safetensors", "folder.safetensors", "weights.onnx"])
def test_open_refuses_missing_folder_unknown_type(tmp_path: Path, name: str) -> None:
    (tmp_path / "folder.safetensors").mkdir()
    (tmp_path / "weights.onnx").write_bytes(b"x" * 100)
    with pytest.raises(OrthoLoraError) as info:
        open_tensors(tmp_path / name)
    assert str(info.value).startswith(str(tmp_path / name) + ":")
    assert "\n" not in str(info.value)


GOOD = {"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}


@pytest.mark.parametrize("build, message", [
    (lambda p: p.write_bytes(b""), "too short"),
    (lambda p: p.write_bytes(b"\x10\x00\x00"), "too short"),
    (lambda p: raw_safetensors(p, {}, length=0), "header length is 0"),
    (lambda p: raw_safetensors(p, GOOD, b"\0" * 8, length=200 * 1024 * 1024), "over"),
    (lambda p: raw_safetensors(p, GOOD, b"\0" * 8, length=10_000), "truncated"),
    (lambda p: raw_safetensors(p, None, raw_header=b"\xff\xfe{}  "), "not UTF-8"),
    (lambda p: raw_safetensors(p, None, raw_header=b'{"x": {"dtype"'), "not valid JSON"),
    (lambda p: raw_safetensors(p, [1, 2]), "not a JSON object"),
    (lambda p: raw_safetensors(p, None, raw_header=b'{"a":1,"a":2}'), "duplicate"),
    (lambda p: raw_safetensors(p, {"x": 3}), "not an object"),
    (lambda p: raw_safetensors(p, {"x": {"dtype": "F128", "shape": [1],
                                         "data_offsets": [0, 16]}}), "unknown dtype"),
    (lambda p: raw_safetensors(p, {"x": {"dtype": ["F32"], "shape": [1],
                                         "data_offsets": [0, 4]}}, b"\0" * 4), "unknown dtype"),
    (lambda p: raw_safetensors(p, {"x": {"dtype": "F32", "shape": [-1],
                                         "data_offsets": [0, 4]}}, b"\0" * 4), "shape"),
    (lambda p: raw_safetensors(p, {"x": {"dtype": "F32", "shape": [1.5],
                                         "data_offsets": [0, 4]}}, b"\0" * 4), "shape"),
    (lambda p: raw_safetensors(p, {"x": {"dtype": "F32", "shape": "2",
                                         "data_offsets": [0, 8]}}, b"\0" * 8), "shape"),
    (lambda p: raw_safetensors(p, None, b"\0" * 4, raw_header=b'{"x":{"dtype":"F32",'
                               b'"shape":[true],"data_offsets":[0,4]}}'), "shape"),
    (lambda p: raw_safetensors(p, {"x": {"dtype": "F32", "shape": [2],
                                         "data_offsets": [0]}}, b"\0" * 8), "pair"),
    (lambda p: raw_safetensors(p, {"x": {"dtype": "F32", "shape": [2],
                                         "data_offsets": [0, 8]}}, b"\0" * 4), "out of range"),
    (lambda p: raw_safetensors(p, {"x": {"dtype": "F32", "shape": [2],
                                         "data_offsets": [8, 0]}}, b"\0" * 8), "out of range"),
    (lambda p: raw_safetensors(p, {"x": {"dtype": "F32", "shape": [2],
                                         "data_offsets": [0, 12]}}, b"\0" * 12), "needs 8"),
    (lambda p: raw_safetensors(p, {"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                   "y": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}},
                               b"\0" * 12), "overlap"),
    (lambda p: raw_safetensors(p, {"__metadata__": {"k": 1}, **GOOD}, b"\0" * 8), "not a string"),
    (lambda p: raw_safetensors(p, {"__metadata__": [], **GOOD}, b"\0" * 8), "__metadata__"),
])
def test_broken_safetensors_are_refused(tmp_path: Path, build, message: str) -> None:
    path = tmp_path / "broken.safetensors"
    build(path)
    with pytest.raises(OrthoLoraError, match=message) as info:
        open_tensors(path)
    assert str(info.value).startswith(f"{path}: ")
    assert "\n" not in str(info.value)


def test_truncated_real_file(tmp_path: Path) -> None:
    path = tmp_path / "t.safetensors"
    safetensors.torch.save_file({"x": torch.ones(100)}, str(path))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(OrthoLoraError, match="out of range"):
        open_tensors(path)


def test_check_finite() -> None:
    check_finite(torch.ones(3), "ok", "f.safetensors")
    check_finite(torch.ones(3, dtype=torch.int8), "ok", "f.safetensors")
    check_finite(torch.ones(3, dtype=torch.float8_e4m3fn), "ok", "f.safetensors")
    bad = torch.tensor([1.0, float("nan"), float("inf"), -float("inf")], dtype=torch.float16)
    with pytest.raises(OrthoLoraError, match=r"f\.safetensors: tensor 'w' has 1 NaN and 2 Inf"):
        check_finite(bad, "w", "f.safetensors")


# --- torch pickle files ----------------------------------------------------------------------


def write_marker(path: str) -> None:
    """Stand-in for an attacker's payload."""
    Path(path).write_text("pwned")


class Evil:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (write_marker, (self.marker,))


@pytest.mark.parametrize("zip_format", [True, False])
def test_malicious_pickle_is_refused(tmp_path: Path, zip_format: bool) -> None:
    marker = tmp_path / "marker.txt"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2), "x": Evil(marker)}}, path,
               _use_new_zipfile_serialization=zip_format)
    with pytest.raises(OrthoLoraError, match=r"evil\.ckpt: refused: not a plain weights file"):
        open_tensors(path)
    assert not marker.exists()


def test_os_system_pickle_is_refused(tmp_path: Path) -> None:
    class System:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'marker'}",))

    path = tmp_path / "evil.pt"
    torch.save({"w": System()}, path)
    with pytest.raises(OrthoLoraError, match="refused"):
        open_tensors(path)
    assert not (tmp_path / "marker").exists()


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".pth", ".bin"])
@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model", "module"])
@pytest.mark.parametrize("zip_format", [True, False])
def test_plain_torch_files_load(tmp_path: Path, suffix: str, wrap: str, zip_format: bool) -> None:
    tensors = {"a.weight": torch.randn(3, 4), "b": torch.arange(5, dtype=torch.int64),
               "c": torch.randn(2).to(torch.bfloat16)}
    obj = dict(tensors) if wrap == "plain" else {wrap: dict(tensors), "epoch": 3}
    obj["step"] = 7  # non-tensor values are dropped
    path = tmp_path / f"m{suffix}"
    torch.save(obj, path, _use_new_zipfile_serialization=zip_format)
    with open_tensors(path) as tf:
        assert sorted(tf.keys()) == sorted(tensors)
        assert tf.metadata == {}
        for key, ref in tensors.items():
            assert tf.shape(key) == tuple(ref.shape) and tf.dtype(key) == ref.dtype
            assert torch.equal(tf.get(key), ref)
        with pytest.raises(KeyError):
            tf.get("step")


def test_garbage_torch_file(tmp_path: Path) -> None:
    path = tmp_path / "junk.ckpt"
    path.write_bytes(b"hello world, not a pickle")
    with pytest.raises(OrthoLoraError, match=r"junk\.ckpt: cannot read"):
        open_tensors(path)
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(OrthoLoraError, match="no tensors"):
        open_tensors(tmp_path / "list.pt")


# --- atomic output ---------------------------------------------------------------------------


def test_atomic_output_writes_and_refuses_overwrite(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    with atomic_output(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.") and tmp.suffix == ".tmp"
        tmp.write_bytes(b"one")
    assert target.read_bytes() == b"one"
    with pytest.raises(OrthoLoraError, match="exists; pass overwrite"):
        with atomic_output(target):
            pytest.fail("must refuse before doing any work")
    with atomic_output(target, overwrite=True) as tmp:
        tmp.write_bytes(b"two")
    assert target.read_bytes() == b"two"
    assert no_temp_files(tmp_path)


def test_atomic_output_race_does_not_clobber(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    with pytest.raises(OrthoLoraError, match="exists"):
        with atomic_output(target) as tmp:
            tmp.write_bytes(b"mine")
            target.write_bytes(b"theirs")  # another writer got there first
    assert target.read_bytes() == b"theirs"
    assert no_temp_files(tmp_path)


def test_atomic_output_without_hard_links(tmp_path: Path, monkeypatch) -> None:
    def no_link(*args):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(fileio.os, "link", no_link)
    target = tmp_path / "out.bin"
    with atomic_output(target) as tmp:
        tmp.write_bytes(b"one")
    assert target.read_bytes() == b"one"
    raced = tmp_path / "raced.bin"
    with pytest.raises(OrthoLoraError, match="exists"):
        with atomic_output(raced) as tmp:
            tmp.write_bytes(b"mine")
            raced.write_bytes(b"theirs")
    assert raced.read_bytes() == b"theirs" and no_temp_files(tmp_path)


def test_atomic_output_missing_folder_and_error_cleanup(tmp_path: Path) -> None:
    with pytest.raises(OrthoLoraError, match="folder does not exist"):
        with atomic_output(tmp_path / "nope" / "out.bin"):
            pass
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_output(tmp_path / "out.bin") as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


# --- streamed writer -------------------------------------------------------------------------


def specs_for(tensors: dict[str, torch.Tensor]) -> list[TensorSpec]:
    return [TensorSpec(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]


def test_streamed_writer_round_trip(tmp_path: Path) -> None:
    tensors = sample_dict()
    calls: list[str] = []

    def produce(name: str) -> torch.Tensor:
        calls.append(name)
        return tensors[name]

    path = tmp_path / "s.safetensors"
    write_safetensors_streamed(path, specs_for(tensors), produce, {"k": "v", "ü": "ß"})
    assert calls == list(tensors)
    raw = path.read_bytes()
    header_len = struct.unpack("<Q", raw[:8])[0]
    assert header_len % 8 == 0 and raw[8 + header_len - 1:8 + header_len] in (b" ", b"}")
    loaded = safetensors.torch.load_file(str(path))
    assert sorted(loaded) == sorted(tensors)
    for key, ref in tensors.items():
        assert same(loaded[key], ref), key
    with open_tensors(path) as tf:
        assert tf.keys() == list(tensors)
        assert tf.metadata == {"k": "v", "ü": "ß"}
        for key, ref in tensors.items():
            assert same(tf.get(key), ref), key
    assert no_temp_files(tmp_path)


def test_streamed_writer_casts_and_checks_shape(tmp_path: Path) -> None:
    path = tmp_path / "s.safetensors"
    specs = [TensorSpec("a", torch.float16, (2, 3)), TensorSpec("b", torch.bfloat16, (4,))]
    source = torch.arange(6.0).reshape(3, 2).t()  # non-contiguous float32
    write_safetensors_streamed(path, specs, lambda n: source if n == "a" else torch.ones(4), None)
    loaded = safetensors.torch.load_file(str(path))
    assert loaded["a"].dtype == torch.float16 and torch.equal(loaded["a"].float(), source)
    assert loaded["b"].dtype == torch.bfloat16
    with pytest.raises(OrthoLoraError, match=r"tensor 'b': shape \(5,\) does not match"):
        write_safetensors_streamed(tmp_path / "bad.safetensors", specs,
                                   lambda n: source if n == "a" else torch.ones(5), None)
    assert not (tmp_path / "bad.safetensors").exists() and no_temp_files(tmp_path)


def test_streamed_writer_refuses_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "s.safetensors"
    path.write_bytes(b"precious")
    called = []
    with pytest.raises(OrthoLoraError, match="exists; pass overwrite"):
        write_safetensors_streamed(path, [TensorSpec("a", torch.float32, (1,))],
                                   lambda n: called.append(n) or torch.ones(1), None)
    assert called == [] and path.read_bytes() == b"precious"
    write_safetensors_streamed(path, [TensorSpec("a", torch.float32, (1,))],
                               lambda n: torch.ones(1), None, overwrite=True)
    assert torch.equal(safetensors.torch.load_file(str(path))["a"], torch.ones(1))


def test_streamed_writer_produce_failure_leaves_nothing(tmp_path: Path) -> None:
    def produce(name: str) -> torch.Tensor:
        if name == "b":
            raise ValueError("producer failed")
        return torch.ones(1000)

    specs = [TensorSpec(n, torch.float32, (1000,)) for n in "abc"]
    with pytest.raises(ValueError, match="producer failed"):
        write_safetensors_streamed(tmp_path / "s.safetensors", specs, produce, None)
    assert list(tmp_path.iterdir()) == []


class FullDisk:
    """A file whose writes fail with ENOSPC after the first one (the header)."""

    def __init__(self, file):
        self.file = file
        self.writes = 0

    def write(self, data) -> int:
        self.writes += 1
        if self.writes > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.file.write(data)

    def __enter__(self) -> "FullDisk":
        return self

    def __exit__(self, *exc: object) -> None:
        self.file.close()


@pytest.mark.parametrize("fail_in", ["write", "fsync"])
def test_disk_full_keeps_original(tmp_path: Path, monkeypatch, fail_in: str) -> None:
    path = tmp_path / "s.safetensors"
    safetensors.torch.save_file({"old": torch.zeros(3)}, str(path))
    original = path.read_bytes()
    if fail_in == "fsync":
        def fsync(fd: int) -> None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        monkeypatch.setattr(fileio.os, "fsync", fsync)
    else:
        monkeypatch.setattr(fileio, "open", lambda *a, **k: FullDisk(open(*a, **k)),
                            raising=False)
    specs = [TensorSpec(n, torch.float32, (100,)) for n in "abc"]
    with pytest.raises(OrthoLoraError, match=r"s\.safetensors: cannot write: No space left"):
        write_safetensors_streamed(path, specs, lambda n: torch.ones(100), None, overwrite=True)
    monkeypatch.undo()
    assert path.read_bytes() == original
    assert [p.name for p in tmp_path.iterdir()] == ["s.safetensors"]


# --- LoRA saver and hashes -------------------------------------------------------------------


def lora_tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(8, 640, generator=gen)
    return {
        "lora_unet_x.lora_down.weight": base[:4],  # a view sharing storage
        "lora_unet_x.lora_up.weight": torch.randn(640, 4, generator=gen).t().t(),
        "lora_unet_x.alpha": torch.tensor(4.0),
        "lora_unet_y.lora_down.weight": torch.randn(300, 700, generator=gen).half(),
        "lora_unet_y.lora_up.weight": torch.randn(900, 300, generator=gen).t(),  # non-contiguous
    }


def save_lora_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
                          overwrite: bool = False) -> dict[str, str]:
    """What a LoRA writer does: safetensors' layout, hashed, streamed."""
    specs = sorted(specs_for(tensors), key=layout_order)
    with SafetensorsWriter(path, specs, metadata, overwrite, hashed=True) as writer:
        for spec in specs:
            writer.write(spec.name, tensors[spec.name])
    return writer.metadata


def test_save_lora_hashes(tmp_path: Path) -> None:
    tensors = lora_tensors()
    metadata = {"ss_network_dim": "4", "modelspec.title": "x",
                "sshs_model_hash": "copied-from-input", "sshs_legacy_hash": "deadbeef"}
    path = tmp_path / "l.safetensors"
    final = save_lora_safetensors(path, tensors, metadata)
    raw = path.read_bytes()
    assert path.stat().st_size > 0x110000
    header_len = struct.unpack("<Q", raw[:8])[0]
    assert final["sshs_model_hash"] == hashlib.sha256(raw[8 + header_len:]).hexdigest()
    expected = safetensors.torch.save({k: v.contiguous() for k, v in tensors.items()},
                                      {"ss_network_dim": "4"})
    assert final["sshs_legacy_hash"] == hashlib.sha256(expected[0x100000:0x110000]).hexdigest()[:8]
    assert final["modelspec.title"] == "x" and final["ss_network_dim"] == "4"
    with open_tensors(path) as tf:
        assert tf.metadata == final
        for key, ref in tensors.items():
            assert torch.equal(tf.get(key), ref)
    assert metadata["sshs_model_hash"] == "copied-from-input"  # input not mutated
    # the hash ignores non-ss_ metadata
    other = save_lora_safetensors(tmp_path / "m.safetensors", tensors,
                                  {"ss_network_dim": "4", "modelspec.title": "different"})
    assert other["sshs_model_hash"] == final["sshs_model_hash"]
    assert other["sshs_legacy_hash"] == final["sshs_legacy_hash"]


def test_save_lora_refuses_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "l.safetensors"
    path.write_bytes(b"precious")
    with pytest.raises(OrthoLoraError, match="exists"):
        save_lora_safetensors(path, {"a": torch.ones(2)}, {})
    assert path.read_bytes() == b"precious"
    save_lora_safetensors(path, {"a": torch.ones(2)}, {}, overwrite=True)
    assert torch.equal(safetensors.torch.load_file(str(path))["a"], torch.ones(2))
    with pytest.raises(OrthoLoraError, match="string"):
        save_lora_safetensors(tmp_path / "n.safetensors", {"a": torch.ones(2)}, {"dim": 4})


# --- output names ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../x", "/abs", "a/b", "..", "", "   ", ".hidden", "a\\b",
                                  "C:evil", "x\x00y", "tab\there", "a..b", "x" * 300])
def test_safe_output_path_refuses(tmp_path: Path, name: str) -> None:
    with pytest.raises(OrthoLoraError):
        safe_output_path(tmp_path, name)


def test_safe_output_path_accepts(tmp_path: Path) -> None:
    assert safe_output_path(tmp_path, "  my lora ") == tmp_path.resolve() / "my lora.safetensors"
    assert safe_output_path(tmp_path, "x.safetensors") == tmp_path.resolve() / "x.safetensors"
    assert safe_output_path(tmp_path, "x", ".ckpt") == tmp_path.resolve() / "x.ckpt"


def test_safe_output_path_refuses_symlink_out(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "link.safetensors").symlink_to(outside / "target.safetensors")
    with pytest.raises(OrthoLoraError, match="outside"):
        safe_output_path(folder, "link")


def test_save_lora_holds_no_serialized_copy_of_the_file(tmp_path: Path) -> None:
    """The file is written straight from the tensors and its header replaced in place: Python never
    holds the serialized file (before: safetensors.torch.save's bytes, as large as the file)."""
    import tracemalloc

    tensors = {f"lora_unet_{i}.lora_down.weight": torch.full((1024, 1024), float(i)) for i in range(12)}  # 48 MiB
    tracemalloc.start()
    try:
        final = save_lora_safetensors(tmp_path / "big.safetensors", tensors, {"ss_network_dim": "4", "x": "y" * 99})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, peak
    raw = (tmp_path / "big.safetensors").read_bytes()
    header_len = struct.unpack("<Q", raw[:8])[0]
    assert final["sshs_model_hash"] == hashlib.sha256(raw[8 + header_len:]).hexdigest()
    expected = safetensors.torch.save(tensors, {"ss_network_dim": "4"})
    assert final["sshs_legacy_hash"] == hashlib.sha256(expected[0x100000:0x110000]).hexdigest()[:8]
    assert raw[8 + header_len:] == expected[8 + struct.unpack("<Q", expected[:8])[0]:]
    with open_tensors(tmp_path / "big.safetensors") as tf:
        assert tf.metadata == final and final["x"] == "y" * 99
        assert all(torch.equal(tf.get(k), v) for k, v in tensors.items())

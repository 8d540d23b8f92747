"""All tensor file I/O: lazy readers, the safetensors writers (into the temp files of `outputs`), sshs
hashes and safe output names. Every bad input raises ``OrthoLoraError`` naming the file."""
from __future__ import annotations

import ctypes
import errno
import io
import hashlib
import json
import math
import os
import pickle
import threading
import zipfile
from abc import ABC, abstractmethod
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import BinaryIO, Callable, Iterable, Iterator, Mapping, TypeVar

import numpy
import safetensors.torch
import torch

from . import directio
from .dtypes import SAFETENSORS_CODES as _DTYPE_NAMES
from .dtypes import SAFETENSORS_DTYPES
from .errors import OrthoLoraError, printable
from .memory import large_buffers_unmapped_on_free, trim
from .outputs import atomic_output, write_error
from .paths import SAFETENSORS, TORCH_SUFFIXES, PathLike

_T = TypeVar("_T")

# Caps on what a header can cost. A full SDXL checkpoint's header is 0.36 MB (2,515 tensors);
# kohya training metadata (tag frequencies of a large dataset, an embedded thumbnail) adds at most a
# few MB: 16 MiB leaves a margin of 4x or more. The largest Stable Diffusion file has ~7,500 tensors
# (an SDXL LoHa with Tucker factors on every layer, convs included), checkpoints ~2,500. Both are
# checked before the JSON is parsed (json_outline): a crafted 16 MiB header is refused in ~0.2 s of
# CPU and ~0.1 GB, and the costliest file the caps let through (16,384 one-element LoRA modules)
# reads in ~2 s.
MAX_HEADER_BYTES = 16 * 1024 * 1024
MAX_TENSORS = 32768
# A header nests 3 levels ({name: {"shape": [...]}}); deeper JSON is never a valid header, and
# refusing it before parsing keeps json's recursion (and its RecursionError) out of reach.
MAX_JSON_DEPTH = 8


class MissingTensorError(OrthoLoraError, KeyError):
    """A tensor name that the file does not hold (also catchable as ``KeyError``)."""

    __str__ = Exception.__str__


# ---------------------------------------------------------------------------------------------
# Reading


class TensorFile(ABC):
    """A lazily read tensor file: names, dtypes and shapes are known; data is read per ``get``."""

    def __init__(self, path: Path, info: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str]):
        self.path = path
        self.metadata = metadata
        self._info = info

    def __enter__(self) -> TensorFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __contains__(self, key: object) -> bool:
        return key in self._info

    def __len__(self) -> int:
        return len(self._info)

    def keys(self) -> list[str]:
        """Tensor names in file order."""
        return list(self._info)

    def _entry(self, key: str) -> tuple[torch.dtype, tuple[int, ...]]:
        try:
            return self._info[key]
        except KeyError:
            raise MissingTensorError(f"no tensor named {key!r}", self.path) from None

    def dtype(self, key: str) -> torch.dtype:
        return self._entry(key)[0]

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entry(key)[1]

    def nbytes(self, key: str) -> int:
        dtype, shape = self._entry(key)
        return math.prod(shape) * dtype.itemsize

    @abstractmethod
    def get(self, key: str, buffer: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor named ``key`` (a CPU tensor of ``dtype(key)`` and ``shape(key)``).

        ``buffer`` (a contiguous CPU tensor of at least ``nbytes(key)`` bytes, e.g. from a
        ``memory.Workspace``) lets a reader put the data there instead of in fresh memory: the
        result may then be a view of it, valid only until the buffer is reused."""

    def buffer_bytes(self, key: str) -> int:
        """Bytes a ``get`` buffer for ``key`` should hold: ``nbytes``, or a little more where the
        reader can then read into it directly (SafetensorsFile: directio)."""
        return self.nbytes(key)

    def reads_direct(self, key: str) -> bool:
        """Whether ``get`` with a ``buffer_bytes`` buffer bypasses the page cache when it is cold
        (then a ``prefetch`` would fill the page cache for nothing)."""
        return False

    def prefetch(self, key: str) -> None:
        """Hint that ``key`` will be read soon, so that the OS can start reading it from disk
        (no memory of this process is used; a no-op where there is nothing to gain)."""

    def stored(self, key: str) -> FileSlice | None:
        """``key``'s bytes as stored, for the streamed writer to copy unchanged from file to file;
        None where the file cannot hand them out that way."""
        return None

    @abstractmethod
    def close(self) -> None:
        """Release the file; ``get`` fails afterwards."""


class SafetensorsFile(TensorFile):
    """A .safetensors file read with one open file; ``get`` reads only that tensor's bytes."""

    def __init__(self, path: Path):
        try:
            self._file = open(path, "rb", buffering=0)
        except OSError as err:
            raise OrthoLoraError(f"cannot open: {err.strerror or err}", path) from err
        try:
            size = os.fstat(self._file.fileno()).st_size
            header = _read_header(self._file, size, path)
            self._data_start = 8 + len(header)
            entries, metadata = _parse_header(header, size - self._data_start, path)
        except BaseException:
            self._file.close()
            raise
        self._offsets = {name: begin for name, (_, _, begin) in entries.items()}
        self._lock = threading.Condition()
        self._readers = 0
        self._direct = directio.DirectReader(self._file.fileno())
        super().__init__(path, {k: (d, s) for k, (d, s, _) in entries.items()}, metadata)

    def get(self, key: str, buffer: torch.Tensor | None = None) -> torch.Tensor:
        """Read one tensor: into fresh memory that the result owns, or into ``buffer`` (then the
        result is a view of it: at its start, or, for a direct read into a buffer of
        ``buffer_bytes``, at the offset that aligns it, directio.place)."""
        dtype, shape = self._entry(key)
        count = self.nbytes(key)
        if buffer is None:
            buffer = torch.empty(count, dtype=torch.uint8)  # no zero-fill: every byte is read over
        elif buffer.device.type != "cpu" or not buffer.is_contiguous() or buffer.nbytes < count:
            raise ValueError(f"buffer for {key!r} must be a contiguous CPU tensor of ≥ {count} bytes")
        flat = buffer.view(-1).view(torch.uint8)
        position = self._data_start + self._offsets[key]
        need = self.buffer_bytes(key)
        direct = need > count and flat.numel() >= need
        start = directio.place(flat.data_ptr(), position) if direct else 0
        data = flat[start:start + count]
        if count:
            done = self._read_direct(position, flat, start, count) if direct else 0
            if done < count:
                self._read_at(position + done, _tensor_bytes(data)[done:], key)
        return data.view(dtype).view(shape)

    def buffer_bytes(self, key: str) -> int:
        """``nbytes(key)`` plus the room a direct read needs (directio.SLACK) where it can be one:
        ``get`` then places the data inside the buffer at an aligned offset."""
        count = self.nbytes(key)
        return count + directio.SLACK if self._direct.enabled and count >= directio.MIN_BYTES else count

    def reads_direct(self, key: str) -> bool:
        return self.buffer_bytes(key) > self.nbytes(key)

    def prefetch(self, key: str) -> None:
        """Ask the kernel to read ``key``'s bytes into the page cache in the background."""
        count = self.nbytes(key)
        if not count:
            return
        with self._lock:
            if not self._file.closed:
                page_hint(self._file.fileno(), self._data_start + self._offsets[key], count, "WILLNEED")

    def stored(self, key: str) -> FileSlice:
        self._entry(key)
        return FileSlice(self, key, self._data_start + self._offsets[key], self.nbytes(key))

    @contextmanager
    def _reading(self, serial: bool = False) -> Iterator[None]:
        """A read of the open file (a closed one is refused): counted while it runs outside the
        lock, so that ``close`` waits for it; with `serial`, run under the lock instead."""
        with self._lock:
            if self._file.closed:
                raise OrthoLoraError("file is closed", self.path)
            if serial:
                yield
                return
            self._readers += 1
        try:
            yield
        finally:
            with self._lock:
                self._readers -= 1
                self._lock.notify_all()

    def _read_direct(self, position: int, flat: torch.Tensor, start: int, count: int) -> int:
        """Bytes of the tensor at `position` read into flat[start:] with directio (0 when cached)."""
        with self._reading():
            try:
                return self._direct.read(_tensor_bytes(flat), start, position, count)
            except OSError as err:
                raise OrthoLoraError(f"cannot read: {err.strerror or err}", self.path) from err

    def _read_at(self, position: int, view: memoryview, key: str) -> None:
        """Fill ``view`` from byte ``position`` of the file (part of tensor ``key``). Threads read
        at once where the OS reads at an offset (preadv); ``close`` waits for running reads."""
        preadv = getattr(os, "preadv", None)
        if preadv is None:
            with self._reading(serial=True):
                return self._read_serial(position, view, key)
        with self._reading():
            try:
                done = 0
                while done < len(view):
                    got = preadv(self._file.fileno(), [view[done:]], position + done)
                    if not got:
                        raise OrthoLoraError(f"file ended inside tensor {key!r} (changed since it was "
                                             "opened?)", self.path)
                    done += got
            except OSError as err:
                raise OrthoLoraError(f"cannot read tensor {key!r}: {err.strerror or err}", self.path) from err

    def _read_serial(self, position: int, view: memoryview, key: str) -> None:
        """``_read_at`` by seek and read (under the lock)."""
        try:
            self._file.seek(position)
            done = 0
            while done < len(view):
                got = self._file.readinto(view[done:])
                if not got:
                    raise OrthoLoraError(f"file ended inside tensor {key!r} (changed since it "
                                         "was opened?)", self.path)
                done += got
        except OSError as err:
            raise OrthoLoraError(f"cannot read tensor {key!r}: {err.strerror or err}",
                                 self.path) from err

    def close(self) -> None:
        with self._lock:
            self._lock.wait_for(lambda: not self._readers)
            self._direct.close()
            self._file.close()


def page_hint(fd: int, offset: int, length: int, advice: str) -> None:
    """Pass `posix_fadvise(POSIX_FADV_<advice>)` (WILLNEED, DONTNEED) for a byte range where the OS
    has it; only a hint, so a failure is ignored."""
    advise, flag = getattr(os, "posix_fadvise", None), getattr(os, f"POSIX_FADV_{advice}", None)
    if advise is not None and flag is not None:
        try:
            advise(fd, offset, length, flag)
        except (OSError, ValueError):
            pass


@dataclass(frozen=True)
class FileSlice:
    """The stored bytes of tensor ``key``: ``nbytes`` from byte ``offset`` of ``source``."""

    source: SafetensorsFile
    key: str
    offset: int
    nbytes: int

    def copy_to(self, out: io.FileIO, target: Path, chunk: memoryview) -> None:
        """Append the bytes to ``out``: by copy_file_range (in the kernel, no user memory) where
        the OS offers it between these files, else through ``chunk``."""
        position, left = self.offset, self.nbytes
        copy = getattr(os, "copy_file_range", None)
        try:
            while left and copy is not None:
                got = copy(self.source._file.fileno(), out.fileno(), left, position)
                if not got:
                    raise OrthoLoraError(f"file ended inside tensor {self.key!r} (changed since it was "
                                         "opened?)", self.source.path)
                position, left = position + got, left - got
        except OSError as err:
            if err.errno not in _NO_KERNEL_COPY:
                raise write_error(err, target) from err
        while left:
            part = chunk[:min(left, len(chunk))]
            self.source._read_at(position, part, self.key)
            _write_all(out, part, target)
            position, left = position + len(part), left - len(part)


_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EBADF,
                   errno.EPERM}


class DictTensorFile(TensorFile):
    """Tensors already loaded (memory-mapped where possible) from a torch pickle-zip file."""

    def __init__(self, path: Path, tensors: dict[str, torch.Tensor]):
        self._tensors = tensors
        super().__init__(path, {k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()}, {})

    def get(self, key: str, buffer: torch.Tensor | None = None) -> torch.Tensor:
        """The stored tensor (shared, not a copy: do not modify it in place; ``buffer`` is not
        needed)."""
        self._entry(key)
        if key not in self._tensors:
            raise OrthoLoraError("file is closed", self.path)
        return self._tensors[key]

    def close(self) -> None:
        self._tensors = {}


def prefetched(items: Iterable[_T], files: Iterable[TensorFile], key: Callable[[_T], str | None]) -> Iterator[_T]:
    """The items in order, the tensor ``key(item)`` of each file announced to the OS (``prefetch``)
    as the item is handed out (none where ``key`` gives None: a tensor read directly): a consumer
    that draws a few items ahead of its work has the page cache fill while earlier items are processed."""
    files = tuple(files)
    for item in items:
        name = key(item)
        for f in files if name is not None else ():
            f.prefetch(name)
        yield item


def open_tensors(path: PathLike | bytes) -> TensorFile:
    """Open a .safetensors file (lazily: header only) or a plain torch weights file."""
    large_buffers_unmapped_on_free()
    path = Path(os.fsdecode(path))
    if not path.exists():
        raise OrthoLoraError("file not found", path)
    if path.is_dir():
        raise OrthoLoraError("is a folder, not a tensor file", path)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return SafetensorsFile(path)
    if suffix in TORCH_SUFFIXES:
        return DictTensorFile(path, _load_torch_weights(path))
    raise OrthoLoraError(f"unknown file type {path.suffix or '(no extension)'!r}; expected "
                         f".safetensors or one of {', '.join(TORCH_SUFFIXES)}", path)


def _read_header(file: BinaryIO, size: int, path: Path) -> bytes:
    """The raw JSON header bytes of a safetensors file, after checking the length prefix."""
    if size < 8:
        raise OrthoLoraError(f"too short to be a safetensors file ({size} bytes)", path)
    length = int.from_bytes(file.read(8), "little")
    if length == 0:
        raise OrthoLoraError("not a safetensors file (header length is 0)", path)
    if length > MAX_HEADER_BYTES:
        raise OrthoLoraError(f"not a safetensors file (header length {length} is over "
                             f"{MAX_HEADER_BYTES} bytes)", path)
    if 8 + length > size:
        raise OrthoLoraError(f"truncated or not a safetensors file (header length {length} "
                             f"but the file has {size} bytes)", path)
    header = file.read(length)
    if len(header) != length:
        raise OrthoLoraError("file ended inside the header", path)
    return header


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate keys in the header")
    return out


_STRUCTURE = bytes(b for b in range(256) if b not in b'"[]{}')  # deleted: all but these
_STEPS = bytes.maketrans(b'[{]}"', b"\x01\x01\xff\xff\x00")  # +1 / -1 as int8
_OUTLINE_STEP = 1 << 20


@dataclass(frozen=True)
class JsonOutline:
    """What the brackets of a JSON text tell before it is parsed."""

    balanced: bool  # every string and every [ / { closed, none closed before it opened
    depth: int      # deepest nesting of [ / {
    objects: int    # number of { ... }


def json_outline(text: bytes) -> JsonOutline:
    """The outline of JSON text from its quotes and brackets, in linear time, without recursion and
    in 1 MiB steps (16 MiB of crafted brackets cost ~0.1 s and ~40 MB). Escaped backslashes, then escaped quotes, are blanked first (a run of backslashes
    pairs up from its left, as JSON reads it), so each quote left opens or closes a string;
    brackets inside strings do not count."""
    marks = text.replace(b"\\\\", b"__").replace(b'\\"', b"__").translate(None, _STRUCTURE)
    all_codes = numpy.frombuffer(marks, dtype=numpy.uint8)
    all_steps = numpy.frombuffer(marks.translate(_STEPS), dtype=numpy.int8)
    in_string = level = deepest = lowest = objects = 0
    for start in range(0, len(marks), _OUTLINE_STEP):  # numpy: one thread, as cheap as it gets
        codes = all_codes[start:start + _OUTLINE_STEP]
        inside = ((numpy.cumsum(codes == ord('"'), dtype=numpy.int32) + in_string) & 1).astype(bool)
        depth = numpy.cumsum(numpy.where(inside, 0, all_steps[start:start + _OUTLINE_STEP]), dtype=numpy.int32) + level
        deepest, lowest = max(deepest, int(depth.max())), min(lowest, int(depth.min()))
        objects += int(numpy.count_nonzero((codes == ord("{")) & ~inside))
        in_string, level = int(inside[-1]), int(depth[-1])
    return JsonOutline(level == 0 and lowest >= 0 and not in_string, deepest, objects)


def clip(value: object, limit: int = 200) -> str:
    """A short ``repr`` of a header value for a message: at most ``limit`` characters, and no walk
    into nested lists or objects."""
    if isinstance(value, (list, dict)):
        items = value.values() if isinstance(value, dict) else value
        if len(value) > 8 or any(isinstance(v, (list, dict)) for v in items):
            return f"a {type(value).__name__} of {len(value)} items"
    text = repr(value[:limit] if isinstance(value, str) else value)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _parse_header(header: bytes, data_size: int, path: Path
                  ) -> tuple[dict[str, tuple[torch.dtype, tuple[int, ...], int]], dict[str, str]]:
    """Validate the header; return {name: (dtype, shape, begin)} in header order and metadata."""
    outline = json_outline(header)
    if not outline.balanced:
        raise OrthoLoraError("bad safetensors header (not valid JSON: unbalanced brackets or quotes)", path)
    if outline.depth > MAX_JSON_DEPTH:
        raise OrthoLoraError(f"bad safetensors header (JSON nested deeper than {MAX_JSON_DEPTH} levels)", path)
    if outline.objects > MAX_TENSORS + 2:  # the header, its metadata, one per tensor
        raise OrthoLoraError(f"bad safetensors header (over {MAX_TENSORS} tensors)", path)
    try:
        parsed = json.loads(header.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except UnicodeDecodeError:
        raise OrthoLoraError("bad safetensors header (not UTF-8)", path) from None
    except ValueError as err:
        raise OrthoLoraError(f"bad safetensors header (not valid JSON: {err})", path) from None
    if not isinstance(parsed, dict):
        raise OrthoLoraError("bad safetensors header (not a JSON object)", path)
    metadata = _check_metadata(parsed.pop("__metadata__", None), path)
    entries = {name: _check_entry(name, entry, data_size, path) for name, entry in parsed.items()}
    spans = sorted((begin, begin + math.prod(shape) * dtype.itemsize, name)
                   for name, (dtype, shape, begin) in entries.items())
    for (_, end, first), (begin, _, second) in zip(spans, spans[1:]):
        if begin < end:
            raise OrthoLoraError(f"bad safetensors header (tensors {clip(first)} and {clip(second)} "
                                 "overlap)", path)
    return entries, metadata


def _check_metadata(metadata: object, path: Path) -> dict[str, str]:
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise OrthoLoraError("bad safetensors header (__metadata__ is not an object)", path)
    for key, value in metadata.items():
        if not isinstance(value, str):
            raise OrthoLoraError(f"bad safetensors header (metadata {clip(key)} is not a string)", path)
    return metadata


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


INT64_MAX = 2**63 - 1


def _check_entry(name: str, entry: object, data_size: int, path: Path
                 ) -> tuple[torch.dtype, tuple[int, ...], int]:
    """Validate one tensor entry; return (dtype, shape, begin offset in the data section)."""
    def bad(problem: str) -> OrthoLoraError:
        return OrthoLoraError(f"bad safetensors header (tensor {clip(name)}: {problem})", path)

    if not isinstance(entry, dict):
        raise bad("entry is not an object")
    dtype_name = entry.get("dtype")
    dtype = SAFETENSORS_DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
    if dtype is None:
        raise bad(f"unknown dtype {clip(dtype_name)}")
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(_is_int(n) and n >= 0 for n in shape):
        raise bad(f"shape {clip(shape)} is not a list of non-negative integers")
    # torch computes strides and byte counts in int64, empty dimensions or not
    if math.prod(max(n, 1) for n in shape) * dtype.itemsize > INT64_MAX:
        raise bad(f"shape {clip(shape)} is too large")
    offsets = entry.get("data_offsets")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_int, offsets))):
        raise bad(f"data_offsets {clip(offsets)} is not a pair of integers")
    begin, end = offsets
    if not 0 <= begin <= end <= data_size:
        if 0 <= begin <= end:  # well-formed offsets past the end: the file was cut short
            raise OrthoLoraError(f"truncated or corrupt safetensors file (tensor {clip(name)}: data_offsets "
                                 f"{clip(offsets)} out of range: the data section has only {data_size} bytes)",
                                 path)
        raise bad(f"data_offsets {clip(offsets)} out of range (data section has {data_size} bytes)")
    expected = math.prod(shape) * dtype.itemsize
    if end - begin != expected:
        raise bad(f"data_offsets span {end - begin} bytes but shape {clip(shape)} needs {expected}")
    return dtype, tuple(shape), begin


def _refusal_reason(err: Exception) -> str:
    """The informative line of torch's weights_only refusal message."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for line in lines:
        if "GLOBAL" in line or "nsupported" in line:
            return line[:200]
    return (lines[0] if lines else type(err).__name__)[:200]


def _load_torch_weights(path: Path) -> dict[str, torch.Tensor]:
    """Load a torch pickle file without running code (weights_only) and return its tensors."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as err:
        raise OrthoLoraError("refused: not a plain weights file (pickle would need to run code: "
                             f"{_refusal_reason(err)})", path) from None
    except Exception as err:  # torch raises many types for corrupt files
        raise OrthoLoraError(f"cannot read as a torch weights file ({type(err).__name__}: "
                             f"{_refusal_reason(err)})", path) from None
    tensors = _unwrap_state_dict(obj)
    if not tensors:
        raise OrthoLoraError("holds no tensors (not a weights file?)", path)
    for key, tensor in tensors.items():
        problem = _not_plain(tensor)
        if problem:
            raise OrthoLoraError(f"tensor {clip(key)} {problem}", path)
    return tensors


def _not_plain(tensor: torch.Tensor) -> str | None:
    """Why a tensor from a torch file is not a plain stored array (the only kind a safetensors file
    can hold, and the only kind the operations handle), or None."""
    if tensor.layout != torch.strided:
        return f"is {str(tensor.layout).removeprefix('torch.')}, not a dense tensor"
    if tensor.dtype not in _DTYPE_NAMES:
        return f"has dtype {str(tensor.dtype).removeprefix('torch.')}, which cannot be read"
    if tensor.numel() * tensor.element_size() > tensor.untyped_storage().nbytes():
        return "repeats its stored values (expanded or overlapping strides)"
    return None


def _tensor_items(obj: object) -> dict[str, torch.Tensor]:
    if not isinstance(obj, dict):
        return {}
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def _unwrap_state_dict(obj: object) -> dict[str, torch.Tensor]:
    """Unwrap ``state_dict`` and a lone ``model``/``module`` dict; keep tensor values only."""
    for _ in range(4):  # a few levels cover every real layout
        if not isinstance(obj, dict):
            return {}
        if isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]
            continue
        nested = [k for k, v in obj.items() if _tensor_items(v)]
        if not _tensor_items(obj) and len(nested) == 1 and nested[0] in ("model", "module"):
            obj = obj[nested[0]]
            continue
        break
    return _tensor_items(obj)


def all_finite(tensor: torch.Tensor) -> bool:
    """True when a tensor holds no NaN or Inf: its min and max are finite (both propagate NaN), one
    vectorized pass without a temporary (torch.isfinite is ~50× slower on CPU)."""
    if not tensor.is_floating_point() or not tensor.numel():
        return True
    values = tensor.float() if tensor.dtype.itemsize == 1 else tensor  # no aminmax for float8
    lo, hi = torch.aminmax(values)
    return math.isfinite(float(lo)) and math.isfinite(float(hi))


def check_finite(tensor: torch.Tensor, key: str, path: PathLike | None) -> None:
    """Raise if ``tensor`` holds NaN or Inf values."""
    if not all_finite(tensor):
        values = tensor.float() if tensor.dtype.itemsize == 1 else tensor
        nans = int(torch.isnan(values).sum())
        infs = int(torch.isinf(values).sum())
        raise OrthoLoraError(f"tensor {key!r} has {nans} NaN and {infs} Inf values", path)


# ---------------------------------------------------------------------------------------------
# Writing


def _write_all(file: io.FileIO, data: bytes | memoryview, target: Path) -> None:
    """Write every byte to an unbuffered file, turning OS errors into errors naming ``target``."""
    view = memoryview(data).cast("B")
    try:
        while view:
            view = view[file.write(view):]
    except OSError as err:
        raise write_error(err, target) from err


@contextmanager
def _open_temp(tmp: Path, target: Path) -> Iterator[io.FileIO]:
    try:
        file = open(tmp, "wb", buffering=0)
    except OSError as err:
        raise write_error(err, target) from err
    with file:
        yield file


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A zero-copy byte view of a contiguous CPU tensor (keep the tensor alive while using it)."""
    count = tensor.numel() * tensor.element_size()
    if count == 0:
        return memoryview(b"")
    return memoryview((ctypes.c_ubyte * count).from_address(tensor.data_ptr()))


@dataclass(frozen=True)
class TensorSpec:
    """Name, dtype and shape of one tensor to be written."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]


def _check_metadata_out(metadata: Mapping[str, str] | None, target: Path) -> dict[str, str]:
    """The metadata as valid UTF-8 strings (a non-UTF-8 file name's bytes written `\\xff`, see
    `errors.printable`); anything but strings is refused."""
    metadata = dict(metadata or {})
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise OrthoLoraError(f"metadata {key!r} must map a string to a string", target)
    return {printable(key): printable(value) for key, value in metadata.items()}


def _safetensors_header(specs: list[TensorSpec], metadata: dict[str, str], target: Path,
                        empty_metadata: bool = False) -> bytes:
    """The length prefix plus the space-padded JSON header for ``specs`` laid out in order; an empty
    `metadata` is left out unless `empty_metadata` (safetensors writes a given ``{}`` as such)."""
    header: dict[str, object] = {"__metadata__": metadata} if metadata or empty_metadata else {}
    offset = 0
    for spec in specs:
        if spec.name in header:
            raise OrthoLoraError(f"tensor name {spec.name!r} used twice or reserved", target)
        if spec.dtype not in _DTYPE_NAMES:
            raise OrthoLoraError(f"tensor {spec.name!r}: dtype {spec.dtype} cannot be stored",
                                 target)
        if not all(_is_int(n) and n >= 0 for n in spec.shape):
            raise OrthoLoraError(f"tensor {spec.name!r}: bad shape {spec.shape}", target)
        size = math.prod(spec.shape) * spec.dtype.itemsize
        header[spec.name] = {"dtype": _DTYPE_NAMES[spec.dtype], "shape": list(spec.shape),
                             "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def _conform(tensor: object, spec: TensorSpec, target: Path) -> torch.Tensor | FileSlice:
    """Check a produced tensor's shape; return it contiguous, on the CPU, in the spec dtype (a
    FileSlice passes when its source holds the spec's dtype and shape)."""
    if isinstance(tensor, FileSlice):
        src = tensor.source
        if (src.dtype(tensor.key), src.shape(tensor.key)) != (spec.dtype, tuple(spec.shape)):
            raise OrthoLoraError(f"tensor {spec.name!r}: stored as {src.dtype(tensor.key)} "
                                 f"{src.shape(tensor.key)}, not the announced {spec.dtype} {tuple(spec.shape)}",
                                 target)
        return tensor
    if not isinstance(tensor, torch.Tensor):
        raise OrthoLoraError(f"tensor {spec.name!r}: got {type(tensor).__name__}, not a tensor",
                             target)
    if tuple(tensor.shape) != tuple(spec.shape):
        raise OrthoLoraError(f"tensor {spec.name!r}: shape {tuple(tensor.shape)} does not match "
                             f"the announced {tuple(spec.shape)}", target)
    return tensor.detach().to("cpu", spec.dtype).contiguous()


# safetensors' own layout (the Rust serializer sorts by dtype, then name): files we write in that
# order have the data section that `safetensors.torch.save` would give the same tensors
_LAYOUT_ORDER = {name: i for i, name in enumerate(
    ("I64", "F64", "F32", "I32", "BF16", "F16", "I16", "F8_E4M3", "F8_E5M2", "I8", "U8", "BOOL"))}
_LEGACY_WINDOW = (0x100000, 0x110000)


def layout_order(spec: TensorSpec) -> tuple[int, str]:
    """Sort key putting specs in safetensors' own order (dtype, then name)."""
    return _LAYOUT_ORDER.get(_DTYPE_NAMES.get(spec.dtype, ""), len(_LAYOUT_ORDER)), spec.name


class _Hashes:
    """kohya's sshs hashes of a file being written (docs/formats.md#hashes): `sshs_model_hash` is the
    sha256 of the data section; `sshs_legacy_hash` the first 8 hex digits of the sha256 of bytes
    [1 MiB, 1 MiB + 64 KiB) of the same data behind a header holding only the `ss_*` metadata
    (`prefix`), whose length decides where that window falls."""

    def __init__(self, prefix: bytes):
        self.model, self.legacy = hashlib.sha256(), hashlib.sha256()
        lo, hi = _LEGACY_WINDOW
        self.legacy.update(prefix[lo:hi])
        self.pos = len(prefix)  # offset in the ss_-only file of the next data byte

    def update(self, data: memoryview) -> None:
        self.model.update(data)
        lo, hi = max(_LEGACY_WINDOW[0], self.pos), min(_LEGACY_WINDOW[1], self.pos + len(data))
        if lo < hi:
            self.legacy.update(data[lo - self.pos:hi - self.pos])
        self.pos += len(data)

    def hexdigests(self) -> dict[str, str]:
        return {"sshs_model_hash": self.model.hexdigest(), "sshs_legacy_hash": self.legacy.hexdigest()[:8]}


class SafetensorsWriter:
    """A safetensors file written tensor by tensor in the order of `specs`: `write(name, tensor)`
    casts a tensor to its spec's dtype and hands it to a writer thread, which appends it (`_Sink`)
    while the caller produces the next one (the disk works while the caller computes), then drops
    it: at most two tensors are held. A tensor may also be a `FileSlice` (passed through unchanged:
    copied file to file). `written(name)`, when given, is called (from the writer thread) once a
    tensor is written: a producer that hands out views of reused buffers may reuse them then, and
    not before. Write errors surface at the next call at the latest.

    The file is the claimed temp file of `path` (`outputs.atomic_output`: published with the run
    that claimed it, else when the writer closes without error). With `hashed`, the metadata gets
    the sshs hashes (`_Hashes`, computed on the writer thread) of the data as written: the header
    goes out with placeholders of the same length and is rewritten in place at `close`, which
    returns the final metadata."""

    def __init__(self, path: PathLike, specs: list[TensorSpec], metadata: Mapping[str, str] | None = None,
                 overwrite: bool = False, hashed: bool = False, written: Callable[[str], None] | None = None):
        self.target = Path(path)
        self.specs = list(specs)
        self.metadata = _check_metadata_out(metadata, self.target)
        hashes = None
        if hashed:
            self.metadata.update({"sshs_model_hash": "0" * 64, "sshs_legacy_hash": "0" * 8})
            hashes = _Hashes(_safetensors_header(self.specs, _training(self.metadata), self.target, True))
        self._head = _safetensors_header(self.specs, self.metadata, self.target)
        self._done = self._produced = 0
        self._pending: Future | None = None
        self._stack = ExitStack()
        try:
            tmp = self._stack.enter_context(atomic_output(self.target, overwrite, SAFETENSORS))
            self._file = self._stack.enter_context(_open_temp(tmp, self.target))
            _write_all(self._file, self._head, self.target)
            self._sink = _Sink(self._file, self.target, len(self._head), written, hashes)
            self._thread = self._stack.enter_context(ThreadPoolExecutor(max_workers=1))
        except BaseException as err:
            self._stack.__exit__(type(err), err, err.__traceback__)
            raise

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._stack.__exit__(exc_type, exc, tb)  # waits for the writer thread, removes the temp file

    @property
    def next_name(self) -> str | None:
        """The name of the tensor to write next (None when all are written)."""
        return self.specs[self._done].name if self._done < len(self.specs) else None

    def write(self, name: str, tensor: torch.Tensor | FileSlice) -> None:
        if name != self.next_name:
            raise OrthoLoraError(f"tensor {name!r} written out of order (expected {self.next_name!r})", self.target)
        item = _conform(tensor, self.specs[self._done], self.target)
        self._wait()
        if item.nbytes < INLINE_BYTES:  # cheaper written here than handed to the thread (an alpha)
            self._sink.write(name, item)
        else:
            self._pending = self._thread.submit(self._sink.write, name, item)
        self._done += 1
        self._produced += item.nbytes
        del item
        if self._produced >= WRITEBACK_BYTES:  # hand dropped tensors' heap pages back now and then
            trim()
            self._produced = 0

    def _wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def close(self) -> dict[str, str]:
        """Finish the file (every spec must have been written); returns its metadata."""
        try:
            if self.next_name is not None:
                raise OrthoLoraError(f"tensor {self.next_name!r} was never written", self.target)
            self._wait()
            if self._sink.hashes is not None:
                self.metadata.update(self._sink.hashes.hexdigests())
                head = _safetensors_header(self.specs, self.metadata, self.target)
                if len(head) != len(self._head):  # placeholders of the hashes' own length: cannot happen
                    raise OrthoLoraError("header changed length when the hashes were filled in", self.target)
                self._file.seek(0)
                _write_all(self._file, head, self.target)
        except BaseException as err:
            self._stack.__exit__(type(err), err, err.__traceback__)
            raise
        self._stack.close()
        return self.metadata


def write_safetensors_streamed(path: PathLike, specs: list[TensorSpec],
                               produce: Callable[[str], torch.Tensor | FileSlice],
                               metadata: Mapping[str, str] | None = None,
                               overwrite: bool = False,
                               written: Callable[[str], None] | None = None) -> None:
    """Write a safetensors file tensor by tensor (`SafetensorsWriter`): ``produce(name)`` is called
    once per spec, in order, its result written while the next one is produced, then dropped:
    peak memory is two tensors. ``written``: see `SafetensorsWriter`."""
    with SafetensorsWriter(path, specs, metadata, overwrite, written=written) as writer:
        for spec in specs:
            writer.write(spec.name, produce(spec.name))


WRITEBACK_BYTES = 64 << 20
INLINE_BYTES = 256 << 10  # smaller tensors are written by the caller, after the thread's last one (cheaper than a hand-off)


class _Sink:
    """Appends tensors' bytes to an open file (feeding `hashes` on the way, when given). Every
    WRITEBACK_BYTES it hands the file's last two windows to POSIX_FADV_DONTNEED, which starts
    writeback of the newest (dirty) one and drops the pages of the one before, written back by
    then: the disk works while the next tensors are produced instead of all at the final fsync, the
    output does not crowd other files out of the page cache, and new page-cache pages are recycled
    ones (a first touch of never-used memory costs ~3× the copy on a VM). A hint only: a no-op
    where unsupported."""

    def __init__(self, file: io.FileIO, target: Path, offset: int, written: Callable[[str], None] | None,
                 hashes: _Hashes | None = None):
        self.file, self.target, self.done, self.hashes = file, target, written, hashes
        self.written, self.windows = offset, [0, 0]  # starts of the last two windows
        self.chunk: memoryview | None = None

    def write(self, name: str, item: torch.Tensor | FileSlice) -> None:
        if isinstance(item, FileSlice):
            if self.hashes is not None:
                raise OrthoLoraError(f"tensor {name!r}: a hashed file cannot copy stored bytes", self.target)
            self.chunk = self.chunk or memoryview(bytearray(8 << 20))
            item.copy_to(self.file, self.target, self.chunk)
        else:
            view = _tensor_bytes(item)
            if self.hashes is not None:
                self.hashes.update(view)
            _write_all(self.file, view, self.target)
        self.written += item.nbytes
        if self.done is not None:
            self.done(name)
        if self.written - self.windows[1] >= WRITEBACK_BYTES:
            page_hint(self.file.fileno(), self.windows[0], self.written - self.windows[0], "DONTNEED")
            self.windows = [self.windows[1], self.written]


def _training(metadata: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in metadata.items() if k.startswith("ss_")}


# ---------------------------------------------------------------------------------------------
# Output names


def safe_output_path(folder: PathLike, name: str, suffix: str = ".safetensors") -> Path:
    """``folder/name[suffix]`` for a name typed into a UI; refuse anything that could leave
    ``folder`` or hide the file."""
    name = name.strip()
    base = Path(folder).resolve()

    def refuse(problem: str) -> OrthoLoraError:
        return OrthoLoraError(f"output name {name!r} {problem}", base)

    if not name:
        raise refuse("is empty")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise refuse("contains control characters")
    if PurePosixPath(name).is_absolute() or PureWindowsPath(name).anchor:
        raise refuse("is an absolute path")
    if any(c in name for c in "/\\:"):
        raise refuse("must be a plain file name (no '/', '\\' or ':')")
    if ".." in name:
        raise refuse("must not contain '..'")
    if name.startswith("."):
        raise refuse("must not start with '.'")
    if not name.lower().endswith(suffix.lower()):
        name += suffix
    if len(os.fsencode(name)) > 255:  # the file system's bytes (a non-UTF-8 input name's included)
        raise refuse("is too long")
    result = base / name
    if result.resolve().parent != base:
        raise refuse(f"resolves outside {base}")
    return result

"""Norms of a base checkpoint's targeted layers (σ_max(W), ‖W‖_F), computed streamed and cached.

W is the layer's weight flattened to [out, in·k·k] (for open_clip q/k/v: the row block of
`in_proj_weight`). σ_max comes from Golub–Kahan–Lanczos bidiagonalization, stopped when the top
Ritz triplet's residual is below `rtol`·σ̃ (a singular value of W then lies within it; in practice
the error is far smaller). On full-size SDXL layers (random-like, flat-topped spectra: the hard
case) rtol 1e-4 lands within ~2e-6 in 0.2–0.5 s, as fast as 50 power iterations, which are still
5e-3–8e-3 off; `linalg.matrix_norm(ord=2)` takes 0.7–15 s. Weights are streamed: each worker
thread reads the next tensor into its own reused buffers (a cold file directly, directio), so a few
tensors are in memory at a time and no layer costs fresh pages; each is checked for NaN/Inf as read.

The cache (in `cache_dir`, default `$XDG_CACHE_HOME/ortholora`, else `~/.cache/ortholora`) keys
norms by content, and trusts nothing but content and, for files already hashed, their stat:
- `norms-v2.json` maps a layer's *digest* to its norms. The digest is the sha256 of the stored
  dtype, the shape and every byte of the layer's weight (of its row block, for q/k/v): cached norms
  are used for a layer only if its bytes are exactly those they were computed from. Any changed
  byte (one q row, one element) changes the digest; copies and renames share entries.
- `file-<id>.json`, one per checkpoint file (id: device and inode; a file without an inode number
  is hashed on every run), records the digests of the layers hashed so far with the file's
  (size, mtime_ns, ctime_ns) at that time.
A run hashes each layer it needs whose digest is not recorded, while streaming it (the run reads
it anyway to compute norms that are not cached; a renamed or copied checkpoint is read and hashed
once rather than recomputed). A warm run reads no tensor data: it takes the recorded digests
when the file's stat is the recorded one. That stat is the only thing trusted besides bytes, and
it holds because every write updates mtime and ctime, and ctime cannot be set back by a user.
Digests are recorded only when the stat is the same after hashing as before, and the file's last
change is more than `RACY_NS` (2 s, coarser than any filesystem's timestamps, FAT's included)
older than the hashing: a later write cannot then share the recorded timestamps. Residual risk,
where the recorded digests could be stale: a write that leaves size, mtime and ctime unchanged —
possible only by setting the system clock back, writing the raw device, on a filesystem that does
not keep mtime/ctime (some FUSE mounts), or, on Windows (whose st_ctime is the creation time), by a
tool that rewrites a file in place and then restores its mtime. Delete the cache folder then.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Iterable

import torch

from . import paths
from .arch import detect
from .errors import OrthoLoraError
from .fileio import TensorFile, check_finite, json_outline, open_tensors
from .keys import Target, rows_of, targets
from .memory import PerThread, Workspace
from .outputs import atomic_output
from .parallel import parallel_map
from .progress import Progress
from .shapes import as_matrix

CACHE_VERSION = 2
RTOL = 1e-4
RACY_NS = 2_000_000_000


@dataclass(frozen=True)
class LayerNorms:
    spectral: float   # σ_max(W)
    frobenius: float  # ‖W‖_F


# ---------------------------------------------------------------------------------------------
# Pure math


def spectral_norm(w: torch.Tensor, rtol: float = RTOL, max_steps: int = 300, seed: int = 0) -> float:
    """σ_max(w) of a 2-D float tensor by Golub–Kahan–Lanczos with full reorthogonalization.

    W·V_k = U_k·B_k (B_k upper bidiagonal, α on the diagonal, β above); for B_k = X·Σ·Yᵀ the top
    Ritz value Σ_1 ≤ σ_max has residual ‖Wᵀũ − Σ_1·ṽ‖ = β_k·|X_k1|; stop when that is ≤ rtol·Σ_1."""
    if w.shape[0] > w.shape[1]:
        w = w.T
    m, n = w.shape
    steps = min(max_steps, m)
    if steps == 0:
        return 0.0
    g = torch.Generator().manual_seed(seed)
    us = torch.zeros(steps, m, dtype=w.dtype)
    vs = torch.zeros(steps + 1, n, dtype=w.dtype)
    v = torch.randn(n, generator=g, dtype=w.dtype)
    vs[0] = v / v.norm()
    alphas: list[float] = []
    betas: list[float] = []
    u = w @ vs[0]
    for j in range(steps):
        if j:
            u = w @ vs[j] - betas[-1] * us[j - 1]
            u -= us[:j].T @ (us[:j] @ u)
        alpha = float(u.norm())
        if alpha == 0.0:
            break
        alphas.append(alpha)
        us[j] = u / alpha
        r = w.T @ us[j] - alpha * vs[j]
        r -= vs[: j + 1].T @ (vs[: j + 1] @ r)
        beta = float(r.norm())
        betas.append(beta)
        if beta == 0.0 or j + 1 == steps:
            break
        if (j + 1) % 4 == 0:
            top, residual = _top_ritz(alphas, betas)
            if residual <= rtol * top:
                return top
        vs[j + 1] = r / beta
    return _top_ritz(alphas, betas, exact=True)[0] if alphas else 0.0


def _top_ritz(alphas: list[float], betas: list[float], exact: bool = False) -> tuple[float, float]:
    """Top singular value of the bidiagonal B_k and its residual β_k·|X_k1|. With `exact` (the
    Krylov space is exhausted) the k×(k+1) matrix [B_k | β_k·e_k] is used: its σ are W's."""
    k = len(alphas)
    b = torch.zeros(k, k + 1 if exact else k, dtype=torch.float64)
    b[range(k), range(k)] = torch.tensor(alphas, dtype=torch.float64)
    b[range(b.shape[1] - 1), range(1, b.shape[1])] = torch.tensor(betas[: b.shape[1] - 1], dtype=torch.float64)
    x, s, _ = torch.linalg.svd(b)
    return float(s[0]), betas[k - 1] * abs(float(x[-1, 0]))


def float_matrix(w: torch.Tensor, work: Workspace | None = None) -> torch.Tensor:
    """A weight flattened to [out, in·k·k] as float32, in `work`'s "float32" buffer when given (valid
    until that buffer is reused)."""
    flat = as_matrix(w)
    return (work.take("float32", flat.shape, torch.float32) if work is not None else torch.empty(flat.shape)).copy_(flat)


def layer_norms(w: torch.Tensor, work: Workspace | None = None) -> LayerNorms:
    """σ_max and ‖·‖_F of a weight flattened to [out, in·k·k] (computed in float32, `float_matrix`)."""
    flat = float_matrix(w, work)
    return LayerNorms(spectral_norm(flat), float(torch.linalg.vector_norm(flat)))


# ---------------------------------------------------------------------------------------------
# Streaming the base checkpoint


def block_digest(block: torch.Tensor) -> str:
    """sha256 of a stored weight block: its dtype, its shape and every byte."""
    block = block.contiguous()
    h = hashlib.sha256(f"{block.dtype} {tuple(block.shape)}\n".encode())
    h.update(block.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


@dataclass(frozen=True)
class FileState:
    """The identity and stat of a file, for which its recorded digests hold."""

    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, path: Path) -> FileState | None:
        """The file's state, or None when it cannot be told apart from others (no inode number,
        as on some Windows file systems): such a file is hashed on every run."""
        try:
            st = os.stat(path)
        except OSError:
            return None
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns) if st.st_ino else None

    def settled_before(self, when_ns: int) -> bool:
        """Timestamps kept, and the last change more than RACY_NS before `when_ns`."""
        return 0 < self.mtime_ns and 0 < self.ctime_ns and max(self.mtime_ns, self.ctime_ns) < when_ns - RACY_NS


class BaseCheckpoint:
    """A base checkpoint opened lazily: its architecture, targeted layers by kohya name, streamed
    weights, and the cached norms."""

    def __init__(self, path: str | bytes | os.PathLike, cache_dir: str | os.PathLike | None = None):
        self.path = Path(os.fsdecode(path))
        self.cache_dir = Path(cache_dir) if cache_dir is not None else paths.cache_dir()
        before = FileState.of(self.path)
        self.file: TensorFile = open_tensors(self.path)
        try:
            shapes = {k: self.file.shape(k) for k in self.file.keys()}
            self.arch = detect(shapes, str(self.path))
            self.targets: dict[str, Target] = {t.name: t for t in targets(self.arch, shapes)}
        except BaseException:
            self.file.close()
            raise
        # the file opened is the one stat'ed (not replaced in between), else nothing is recorded
        self._state = before if before is not None and FileState.of(self.path) == before else None
        self.warnings: list[str] = []

    def __enter__(self) -> BaseCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.file.close()

    def target(self, name: str) -> Target:
        t = self.targets.get(name)
        if t is None:
            raise OrthoLoraError(f"layer {name} is not a targeted layer of this {self.arch.title} "
                                 "checkpoint", self.path)
        return t

    def groups(self, names: Iterable[str]) -> list[tuple[str, list[Target]]]:
        """(checkpoint key, the named targets in it) in checkpoint order: q/k/v share in_proj_weight."""
        by_key: dict[str, list[Target]] = {}
        for name in names:
            t = self.target(name)
            by_key.setdefault(t.ckpt_key, []).append(t)
        return [(key, by_key[key]) for key in self.file.keys() if key in by_key]

    def read_group(self, group: tuple[str, list[Target]], work: Workspace) -> list[tuple[Target, torch.Tensor]]:
        """(target, its weight as stored: the row block for q/k/v) for one `groups` entry, its tensor
        read once into `work`'s "read" buffer (a cold file directly, directio; valid until that
        buffer is reused), refused if it holds NaN or Inf."""
        key, targets_in = group
        w = self.file.get(key, work.take("read", (self.file.buffer_bytes(key),), torch.uint8))
        check_finite(w, key, self.path)
        return [(t, rows_of(w, t.rows)) for t in targets_in]

    def norms(self, names: Iterable[str], progress: Progress | None = None) -> tuple[dict[str, LayerNorms], int]:
        """Norms of the named layers, from the cache where their digests are known and cached; the
        rest are streamed, hashed and (when not cached) computed, and added to the cache. Returns
        (norms, number computed now)."""
        names = list(dict.fromkeys(names))
        for name in names:
            self.target(name)
        store = _load_store(self.cache_dir / STORE_FILE)
        digests = self._recorded()
        todo = [n for n in names if digests.get(n) not in store]
        computed = 0
        if todo:
            started = time.time_ns()
            hashed = {}
            space = PerThread("cpu")
            done = (item for out in parallel_map(lambda group: self._hash(group, store, space.get()), self.groups(todo))
                    for item in out)
            for i, (name, digest, norms) in enumerate(done):
                hashed[name] = digest
                if norms is not None:
                    store[digest] = norms
                    computed += 1
                if progress:
                    progress(i + 1, len(todo), name)
            digests.update(hashed)
            self._save(store if computed else None, digests, started)
        return {n: store[digests[n]] for n in names}, computed

    def _hash(self, group: tuple[str, list[Target]], store: dict[str, LayerNorms], work: Workspace
              ) -> list[tuple[str, str, LayerNorms | None]]:
        """(name, digest, norms computed now, or None when the digest's norms are cached) of each
        target in one checkpoint tensor, read (on a worker thread) into that thread's reused buffers."""
        out = []
        for t, block in self.read_group(group, work):
            digest = block_digest(block)
            norms = None if digest in store else layer_norms(block, work)
            if norms is not None and not (math.isfinite(norms.spectral) and math.isfinite(norms.frobenius)):
                raise OrthoLoraError(f"base layer {t.name}: its norms overflow float32", self.path)
            out.append((t.name, digest, norms))
        return out

    def _memo_file(self) -> Path | None:
        if self._state is None:
            return None
        ident = hashlib.sha256(f"{self._state.dev}:{self._state.ino}".encode()).hexdigest()[:24]
        return self.cache_dir / f"file-{ident}.json"

    def _recorded(self) -> dict[str, str]:
        """Digests recorded for this file while its stat was the current one (see the module
        docstring), or {}."""
        memo = self._memo_file()
        data = _read_json(memo) if memo else None
        if not (isinstance(data, dict) and data.get("version") == CACHE_VERSION
                and data.get("state") == list(astuple(self._state)) and isinstance(data.get("digests"), dict)):
            return {}
        return {n: d for n, d in data["digests"].items() if n in self.targets and _is_digest(d)}

    def _save(self, store: dict[str, LayerNorms] | None, digests: dict[str, str], started: int) -> None:
        """Write new norms (merged with what another run may have added meanwhile) and, when the
        file is settled and unchanged since it was opened, its digests."""
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            if store is not None:
                _save_store(self.cache_dir / STORE_FILE, store)
            memo = self._memo_file()
            if memo and self._state.settled_before(started) and FileState.of(self.path) == self._state:
                _write_json(memo, {"version": CACHE_VERSION, "checkpoint": str(self.path),
                                   "state": list(astuple(self._state)), "digests": dict(sorted(digests.items()))})
        except (OrthoLoraError, OSError) as err:
            self.warnings.append(f"norm cache not written ({err})")


# ---------------------------------------------------------------------------------------------
# Cache files


STORE_FILE = "norms-v2.json"


def _is_digest(value: object) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def _read_json(path: Path) -> object:
    """The parsed file, or None when it is missing, unreadable, not JSON or not shaped like ours."""
    try:
        raw = path.read_bytes()
        outline = json_outline(raw)
        return json.loads(raw) if outline.balanced and outline.depth <= 3 else None
    except (OSError, ValueError):
        return None


def _write_json(path: Path, data: object) -> None:
    with atomic_output(path, overwrite=True) as tmp:
        tmp.write_text(json.dumps(data, indent=0), encoding="utf-8")


def _load_store(path: Path) -> dict[str, LayerNorms]:
    """digest → norms, or {} when the file is missing, unreadable or from another version/rtol."""
    data = _read_json(path)
    if not (isinstance(data, dict) and data.get("version") == CACHE_VERSION and data.get("rtol") == RTOL
            and isinstance(data.get("norms"), dict)):
        return {}
    out = {}
    for digest, pair in data["norms"].items():
        if _is_digest(digest) and isinstance(pair, list) and len(pair) == 2 \
                and all(isinstance(v, (int, float)) and math.isfinite(v) for v in pair):
            out[digest] = LayerNorms(float(pair[0]), float(pair[1]))
    return out


def _save_store(path: Path, norms: dict[str, LayerNorms]) -> None:
    merged = _load_store(path) | norms
    _write_json(path, {"version": CACHE_VERSION, "rtol": RTOL,
                       "norms": {d: [v.spectral, v.frobenius] for d, v in sorted(merged.items())}})

"""Norms of a base checkpoint's targeted layers (σ_max(W), ‖W‖_F), computed streamed and cached.

W is the layer's weight flattened to [out, in·k·k] (for open_clip q/k/v: the row block of
`in_proj_weight`). σ_max comes from Golub–Kahan–Lanczos bidiagonalization, stopped when the top
Ritz triplet's residual is below `rtol`·σ̃ (a singular value of W then lies within it; in practice
the error is far smaller). On full-size SDXL layers (random-like, flat-topped spectra: the hard
case) rtol 1e-4 lands within ~2e-6 in 0.2–0.5 s, as fast as 50 power iterations, which are still
5e-3–8e-3 off; `linalg.matrix_norm(ord=2)` takes 0.7–15 s. Weights are streamed: a few tensors
are in memory at a time.

The cache is one JSON file per checkpoint in `cache_dir` (default `$XDG_CACHE_HOME/ortholora`, else
`~/.cache/ortholora`), named by a content fingerprint, not the path: sha256 over the file size,
the raw safetensors header (names, dtypes, shapes, offsets, metadata) and 4 KiB from the middle of
every targeted tensor. That costs a few MiB of reads instead of hashing 7 GB, survives renames and
copies, and changes when any targeted tensor is rewritten (a fine-tune or a merge rewrites every
element of the layers it touches). Torch pickle files have no header: their fingerprint is the
sha256 of the whole file.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, TypeVar

import torch

from .arch import detect
from .errors import OrthoLoraError
from .fileio import TensorFile, atomic_output, open_tensors
from .keys import Target, targets
from .progress import Progress

CACHE_VERSION = 1
SAMPLE_BYTES = 4096
RTOL = 1e-4
_T = TypeVar("_T")
_R = TypeVar("_R")


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


def layer_norms(w: torch.Tensor) -> LayerNorms:
    """σ_max and ‖·‖_F of a weight flattened to [out, in·k·k] (computed in float32)."""
    flat = w.float().reshape(w.shape[0], -1)
    return LayerNorms(spectral_norm(flat), float(torch.linalg.vector_norm(flat)))


# ---------------------------------------------------------------------------------------------
# Streaming the base checkpoint


_WORKERS: ContextVar[int | None] = ContextVar("ortholora_layer_workers", default=None)


@contextmanager
def layer_parallelism() -> Iterator[int]:
    """Inside, torch ops run single-threaded and `parallel_map` spreads layers over as many worker
    threads as torch had threads on entry (nested uses keep the outermost count); yields that count.
    Many small per-layer ops scale far better across layers than inside each op, and never
    oversubscribe a busy machine."""
    workers = _WORKERS.get()
    if workers is not None:
        yield workers
        return
    workers = torch.get_num_threads()
    token = _WORKERS.set(workers)
    torch.set_num_threads(1)
    try:
        yield workers
    finally:
        torch.set_num_threads(workers)
        _WORKERS.reset(token)


def parallel_map(fn: Callable[[_T], _R], items: Iterable[_T], ahead: int | None = None) -> Iterator[_R]:
    """fn over items, in order, under `layer_parallelism`; at most `ahead` (default: two per
    worker) items are drawn from `items` ahead of the results (items may be big tensors)."""
    with layer_parallelism() as workers:
        if workers <= 1:
            yield from map(fn, items)
            return
        with ThreadPoolExecutor(workers) as pool:
            pending: deque[Future[_R]] = deque()
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) >= (ahead or 2 * workers):
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()


class BaseCheckpoint:
    """A base checkpoint opened lazily: its architecture, targeted layers by kohya name, streamed
    weights, and the cached norms."""

    def __init__(self, path: str | os.PathLike, cache_dir: str | os.PathLike | None = None):
        self.path = Path(path)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.file: TensorFile = open_tensors(self.path)
        try:
            shapes = {k: self.file.shape(k) for k in self.file.keys()}
            self.arch = detect(shapes, str(self.path))
            self.targets: dict[str, Target] = {t.name: t for t in targets(self.arch, shapes)}
        except BaseException:
            self.file.close()
            raise
        self._key: str | None = None
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

    def weights(self, names: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, float32 weight flattened to [out, in·k·k]) for each name, in checkpoint order,
        one stored tensor in memory at a time (q/k/v share one read of in_proj_weight)."""
        by_key: dict[str, list[Target]] = {}
        for name in names:
            t = self.target(name)
            by_key.setdefault(t.ckpt_key, []).append(t)
        for key in self.file.keys():
            for_key = by_key.get(key)
            if not for_key:
                continue
            w = self.file.get(key)
            for t in for_key:
                part = w[slice(*t.rows)] if t.rows else w
                yield t.name, part.float().reshape(part.shape[0], -1)
            del w

    @property
    def key(self) -> str:
        """The content fingerprint (computed once)."""
        if self._key is None:
            self._key = fingerprint(self.path, {t.ckpt_key for t in self.targets.values()})
        return self._key

    def norms(self, names: Iterable[str], progress: Progress | None = None) -> tuple[dict[str, LayerNorms], int]:
        """Norms of the named layers, from the cache where present; the rest are computed streamed
        and added to the cache. Returns (norms, number computed now)."""
        names = list(dict.fromkeys(names))
        for name in names:
            self.target(name)
        cache_file = self.cache_dir / f"norms-{self.key}.json"
        cached = _load_cache(cache_file, self.key)
        missing = [n for n in names if n not in cached]
        if missing:
            cached.update(self._compute(missing, progress))
            try:
                _save_cache(cache_file, self.key, self.path, self.arch.id, cached)
            except (OrthoLoraError, OSError) as err:
                self.warnings.append(f"norm cache not written ({err})")
        return {n: cached[n] for n in names}, len(missing)

    def _compute(self, names: list[str], progress: Progress | None) -> dict[str, LayerNorms]:
        out = {}
        pairs = parallel_map(lambda item: (item[0], layer_norms(item[1])), self.weights(names))
        for i, (name, norms) in enumerate(pairs):
            if not (math.isfinite(norms.spectral) and math.isfinite(norms.frobenius)):
                raise OrthoLoraError(f"base layer {name} holds NaN or Inf values", self.path)
            out[name] = norms
            if progress:
                progress(i + 1, len(names), f"base norms {name}")
        return out


# ---------------------------------------------------------------------------------------------
# Cache files


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/ortholora`, else `~/.cache/ortholora`."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "ortholora"


def fingerprint(path: Path, sampled_keys: Iterable[str]) -> str:
    """Content key of a checkpoint (see the module docstring)."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            h.update(f"ortholora-fingerprint-v1 {size}\n".encode())
            if path.suffix.lower() != ".safetensors":
                for chunk in iter(lambda: f.read(1 << 24), b""):
                    h.update(chunk)
                return h.hexdigest()
            length = int.from_bytes(f.read(8), "little")
            header = f.read(length)
            h.update(header)
            entries = json.loads(header)
            spans = sorted(entries[k]["data_offsets"] for k in sampled_keys if k in entries)
            for begin, end in spans:
                start = begin + max(0, (end - begin - SAMPLE_BYTES) // 2)
                f.seek(8 + length + start)
                h.update(f.read(min(SAMPLE_BYTES, end - begin)))
    except OSError as err:
        raise OrthoLoraError(f"cannot read: {err.strerror or err}", path) from err
    except (ValueError, KeyError, TypeError):
        raise OrthoLoraError("bad safetensors header", path) from None
    return h.hexdigest()


def _load_cache(path: Path, key: str) -> dict[str, LayerNorms]:
    """Cached norms, or {} when the file is missing, unreadable or from another version/key."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("version") != CACHE_VERSION or data.get("key") != key:
            return {}
        return {name: LayerNorms(float(s), float(f)) for name, (s, f) in data["norms"].items()
                if math.isfinite(float(s)) and math.isfinite(float(f))}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return {}


def _save_cache(path: Path, key: str, source: Path, arch_id: str, norms: dict[str, LayerNorms]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"version": CACHE_VERSION, "key": key, "checkpoint": str(source), "arch": arch_id,
            "rtol": RTOL, "norms": {n: [v.spectral, v.frobenius] for n, v in sorted(norms.items())}}
    with atomic_output(path, overwrite=True) as tmp:
        tmp.write_text(json.dumps(data, indent=0), encoding="utf-8")

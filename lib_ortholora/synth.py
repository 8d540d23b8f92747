"""Synthetic SD1/SD2/SDXL checkpoints with the real key names and shapes, and tuned twins.

The base tensor of every key is a deterministic function of (seed, key), so a tuned twin is
written without reading the base back. The tuned twin differs from the base on targeted layers by
a known delta: a decaying-spectrum low-rank part plus dense noise (`delta()` returns it exactly).
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from . import arch as _arch
from .fileio import TensorSpec, write_safetensors_streamed
from .keys import Target, rows_of, targets
from .outputs import Outputs
from .progress import Progress
from .shapes import matrix_shape


@dataclass(frozen=True)
class DeltaSpec:
    """How a tuned twin differs from its base on each targeted layer.

    D = U·diag(s)·V (rank `rank`, s_i ∝ decay^i, ‖U·diag(s)·V‖_F = rel·‖W‖_F) + noise·‖low-rank‖_F·N/‖N‖.
    `text_rel` is `rel` for text-encoder layers (0 leaves them unchanged); `conv=False` leaves
    resnet/sampler convs unchanged.
    """

    rank: int = 8
    rel: float = 0.05
    text_rel: float = 0.05
    noise: float = 0.02
    decay: float = 0.8
    conv: bool = True


def _gen(seed: int, key: str) -> torch.Generator:
    return torch.Generator().manual_seed((zlib.crc32(key.encode()) << 16) ^ seed)


def base_tensor(key: str, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """The base checkpoint's value of `key` (float32; int64 for position ids)."""
    if key.endswith("position_ids"):
        return torch.arange(math.prod(shape), dtype=torch.int64).reshape(shape)
    if not shape:
        return torch.tensor(math.log(100.0))
    g = _gen(seed, key)
    x = torch.randn(shape, generator=g)
    if len(shape) == 1:
        return (1.0 + 0.02 * x) if "norm" in key or key.split(".")[-2].startswith("ln") else 0.02 * x
    return x / math.sqrt(math.prod(shape[1:]))


def delta(t: Target, seed: int, ds: DeltaSpec) -> torch.Tensor | None:
    """The exact tuned − base delta of target `t` (float32, shape `t.shape`), or None if unchanged."""
    rel = ds.text_rel if t.is_text else ds.rel
    if rel == 0 or (t.conv and not ds.conv):
        return None
    g = _gen(seed + 1, t.name)
    out, inner = matrix_shape(t.shape)
    k = min(ds.rank, out, inner)
    u = torch.linalg.qr(torch.randn(out, k, generator=g))[0]
    v = torch.linalg.qr(torch.randn(inner, k, generator=g))[0].T
    s = ds.decay ** torch.arange(k, dtype=torch.float32)
    w_norm = math.sqrt(out)  # ‖W‖_F of a base weight (unit-variance rows scaled by 1/√fan_in)
    s *= rel * w_norm / s.norm()
    d = (u * s) @ v
    if ds.noise:
        n = torch.randn(out, inner, generator=g)
        d += n * (ds.noise * float(s.norm()) / float(n.norm()))
    return d.reshape(t.shape)


def _tuned_producer(shapes: dict, seed: int, ds: DeltaSpec, tgts: list[Target], dtype: torch.dtype):
    by_key: dict[str, list[Target]] = {}
    for t in tgts:
        by_key.setdefault(t.ckpt_key, []).append(t)

    def produce(key: str) -> torch.Tensor:
        w = base_tensor(key, shapes[key], seed)
        for t in by_key.get(key, ()):
            d = delta(t, seed, ds)
            if d is not None:
                rows_of(w, t.rows).add_(d)
        return w if w.dtype == torch.int64 else w.to(dtype)

    return produce


def write_pair(arch_id: str, out_dir: str | Path, full: bool = False, seed: int = 0,
               dtype: torch.dtype = torch.float16, deltas: DeltaSpec = DeltaSpec(),
               inpaint: bool = False, overwrite: bool = False,
               progress: Progress | None = None) -> tuple[Path, Path]:
    """Write `<arch>_base.safetensors` and `<arch>_tuned.safetensors` into `out_dir`.

    `full` gives real widths (benchmarks); otherwise every width is divided by 16 (tests, demo).
    `out_dir` is created when missing.
    """
    shapes = _arch.spec(arch_id, 1 if full else 16, inpaint)
    arch = _arch.Arch(arch_id, inpaint)
    specs = [TensorSpec(k, torch.int64 if k.endswith("position_ids") else dtype, s) for k, s in shapes.items()]
    out_dir = Path(out_dir)
    paths = out_dir / f"{arch_id}_base.safetensors", out_dir / f"{arch_id}_tuned.safetensors"
    meta = {"ortholora_synthetic": f"{arch_id} seed={seed} full={full}"}
    total, done = 2 * len(specs), 0

    def counted(produce):
        def wrapped(key: str) -> torch.Tensor:
            nonlocal done
            done += 1
            if progress:
                progress(done, total, key)
            return produce(key)
        return wrapped

    with Outputs() as outputs:  # both or neither, refused before any work
        outputs.claim(paths, overwrite=overwrite, make_folders=True)
        write_safetensors_streamed(paths[0], specs, counted(lambda k: base_tensor(k, shapes[k], seed).to(
            torch.int64 if k.endswith("position_ids") else dtype)), meta, overwrite)
        produce = _tuned_producer(shapes, seed, deltas, targets(arch, shapes, conv=True), dtype)
        write_safetensors_streamed(paths[1], specs, counted(produce), meta, overwrite)
    return paths

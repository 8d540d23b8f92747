"""Exact join of LoRAs along the rank axis, with `ortholora_join` slices metadata (docs/formats.md#join).

Per module, Σ_i c_i·up_i·down_i with c_i = ratio_i·alpha_i/r_i (signed ratios allowed) is written as
one LoRA of rank Σ r_i and scale 1 (on disk with the file's one alpha, lorafile.file_alpha):
  up = [σ_1·√|c_1|·up_1 | σ_2·√|c_2|·up_2 | …],  down = [√|c_1|·down_1; √|c_2|·down_2; …],  σ_i = sign c_i.
Each source's factor stays inside its own columns/rows, so dW = up·diag(v)·down toggles sources
(v = 1 on slice i, 0 elsewhere gives source i alone). Modules present in only some sources have
r_i = 0 for the others. Families whose exact low-rank form is missing (full diffs) or wider than the
layer (LoHa r² ≥ min(out, in·k²)) enter as their exact full-rank SVD.
"""
from __future__ import annotations

import itertools
import math
import os
from pathlib import Path
from typing import Mapping, Sequence

import torch

from . import arguments
from .arch import Arch
from .diag import (META_KEY, DiagSpec, JoinInfo, JoinSource, apply_diag_to_up, diag_vector, join_info_from_metadata,
                   make_join_metadata, parse_diag, safe_source_name)
from .errors import OrthoLoraError
from .fileio import open_tensors
from . import prediction
from .lorafile import LoraFile, carried_metadata, read_lora, write_lora
from .lowrank import LowRank, balanced
from .modules import NetworkModule
from .progress import Progress
from .report import Report, Row, Status
from .run import Run
from .svd import exact_svd, factor_svd

PathLike = str | os.PathLike


# ---------------------------------------------------------------------------------------------
# Pure parts


def exact_lowrank(module: NetworkModule) -> LowRank:
    """The module's exact LowRank (in its layer's layout, which read_lora gives every module), of rank
    at most min(out, in·k²): its own form when that is narrower, else the exact SVD (of the factors,
    or of dW for full diffs)."""
    shape = module.shape
    full = min(shape[0], math.prod(shape[1:]))
    lr = module.lowrank()
    if lr is not None and lr.rank <= full:
        return LowRank(lr.up, lr.down, lr.scale, shape)
    u, s, vh = factor_svd(lr) if lr is not None else exact_svd(module.delta().reshape(shape[0], -1))
    return balanced(u[:, :full], s[:full], vh[:full], shape)


def join_lowranks(parts: Sequence[LowRank | None], ratios: Sequence[float]) -> tuple[LowRank, list[int]]:
    """One LowRank (scale 1) equal to Σ ratio_i·part_i, each source's √|c_i| kept in its own slice;
    also the per-source ranks (0 for a missing part)."""
    present = [(p, r) for p, r in zip(parts, ratios) if p is not None]
    shape = present[0][0].shape
    ups, downs = [], []
    for p, ratio in present:
        if math.prod(p.shape) != math.prod(shape) or p.shape[0] != shape[0]:
            raise OrthoLoraError(f"sources disagree on a layer's shape: {p.shape} vs {shape}")
        c = ratio * p.scale
        root = math.sqrt(abs(c))
        ups.append(p.up.float() * math.copysign(root, c))
        downs.append(p.down.float().reshape(p.rank, -1) * root)
    ranks = [p.rank if p is not None else 0 for p in parts]
    return LowRank(torch.cat(ups, dim=1), torch.cat(downs, dim=0), 1.0, shape), ranks


def join(sources: Sequence[Mapping[str, LowRank]], ratios: Sequence[float], progress: Progress | None = None
         ) -> tuple[dict[str, LowRank], dict[str, list[int]]]:
    """Join every module of every source (union, first-seen order): modules and per-source ranks."""
    names = list(dict.fromkeys(n for s in sources for n in s))
    out, ranks = {}, {}
    for i, name in enumerate(names):
        if progress:
            progress(i + 1, len(names), name)
        out[name], ranks[name] = join_lowranks([s.get(name) for s in sources], ratios)
    return out, ranks


def apply_diag(lr: LowRank, v: torch.Tensor) -> LowRank:
    """dW = scale·up·diag(v)·down: up's columns multiplied by v."""
    return LowRank(apply_diag_to_up(lr.up.float(), v), lr.down, lr.scale, lr.shape)


def drop_zero_ranks(lr: LowRank, v: torch.Tensor, ranks: Sequence[int]) -> tuple[LowRank, list[int]]:
    """Remove the directions where v = 0 (exact: they contribute nothing); per-slice ranks updated."""
    keep = v != 0
    bounds = [0, *itertools.accumulate(ranks)]
    new_ranks = [int(keep[a:b].sum()) for a, b in zip(bounds, bounds[1:])]
    return LowRank(lr.up[:, keep], lr.down[keep], lr.scale, lr.shape), new_ranks


# ---------------------------------------------------------------------------------------------
# Files


def source_names(paths: Sequence[Path], names: Sequence[str] | None = None) -> list[str]:
    """Unique slice names (file stems by default), made safe for diag specs."""
    raw = list(names) if names is not None else [p.stem for p in paths]
    if len(raw) != len(paths):
        raise OrthoLoraError(f"{len(raw)} name(s) given for {len(paths)} LoRA file(s)")
    out: list[str] = []
    for name in map(safe_source_name, raw):
        unique, n = name, 2
        while unique in out:
            unique, n = f"{name}_{n}", n + 1
        out.append(unique)
    return out


def read_sources(paths: Sequence[PathLike], report: Report, progress: Progress | None = None
                 ) -> tuple[str, list[dict[str, LowRank]]]:
    """Read LoRA files of one architecture as exact LowRanks in layer layout; what cannot be part
    of a LoRA (modules matching no layer, bias deltas) is dropped with a warning."""
    files = []
    for i, p in enumerate(paths):
        files.append(read_lora(p))
        if progress:
            progress(i + 1, len(paths), Path(p).name)
    archs = {lf.arch for lf in files}
    if None in archs:
        bad = next(lf for lf in files if lf.arch is None)
        raise OrthoLoraError("no module name matches SD1, SD2 or SDXL layers", bad.path)
    if len(archs) > 1:
        first, other = files[0], next(lf for lf in files if lf.arch != files[0].arch)
        raise OrthoLoraError(f"made for {Arch(other.arch).title}, but {first.path} is for {Arch(first.arch).title}",
                             other.path)
    arch = files[0].arch
    sources = [_source_lowranks(lf, report) for lf in files]
    seen: dict[str, tuple[tuple[int, ...], Path]] = {}
    for lf, source in zip(files, sources):  # each file is self-consistent; the files must agree too
        for name, lr in source.items():
            shape, first = seen.setdefault(name, (tuple(lr.shape), lf.path))
            if tuple(lr.shape) != shape:
                raise OrthoLoraError(f"module {name} is {tuple(lr.shape)} here but {shape} in {first}", lf.path)
    return arch, sources


def _source_lowranks(lf: LoraFile, report: Report) -> dict[str, LowRank]:
    out = {}
    for name, module in lf.modules.items():
        if name in lf.unknown:
            report.warnings.append(f"{lf.stem}: module {name} matches no layer; dropped")
            continue
        if module.bias_delta() is not None:
            report.warnings.append(f"{lf.stem}: {name}: bias delta dropped (a LoRA cannot hold one)")
        out[name] = exact_lowrank(module)
    if lf.stray_keys:
        report.warnings.append(f"{lf.stem}: {len(lf.stray_keys)} tensor(s) outside any module ignored")
    return out


def join_loras(paths: Sequence[PathLike], save_path: PathLike, ratios: float | Sequence[float] | None = None, *,
               names: Sequence[str] | None = None, dtype: torch.dtype = torch.float16, overwrite: bool = False,
               progress: Progress | None = None) -> Report:
    """Exact join of LoRA-like files into one kohya LoRA whose metadata records each source's slice
    (`names`: slice names, default the file stems)."""
    paths = arguments.path_list(paths)
    if not paths:
        raise OrthoLoraError("no LoRA file given")
    ratios = arguments.as_ratios(ratios, len(paths))
    labels = source_names(paths, names)
    dtype = arguments.output_dtype(dtype)
    with Run("join", progress) as run:
        run.claim([save_path], inputs=paths, overwrite=overwrite)
        report = run.report
        arch, sources = read_sources(paths, report, run.phase("read"))
        joined, ranks = join(sources, ratios, run.phase("join"))
        for name, lr in joined.items():
            report.add(Row(name, rank=lr.rank, extra={"slices": "+".join(map(str, ranks[name]))}))
        meta = make_join_metadata([(n, p.name, r) for n, p, r in zip(labels, paths, ratios)], ranks)
        write = run.phase("write", 1)
        write_lora(save_path, joined, arch, dtype, {META_KEY: meta}, overwrite, prediction.of_files(paths))
        write.step(Path(save_path).name)
        report.totals.update({"architecture": Arch(arch).title,
                              "sources": ", ".join(f"{n}×{r:g}" for n, r in zip(labels, ratios)),
                              "modules": len(joined), "max_rank": max(lr.rank for lr in joined.values())})
    return run.report


def _stored_dtype(path: Path) -> torch.dtype:
    """The dtype of the first floating tensor of a file."""
    with open_tensors(path) as f:
        return next((f.dtype(k) for k in f.keys() if f.dtype(k).is_floating_point), torch.float16)


def bake_diag(lora_path: PathLike, spec: str | DiagSpec, save_path: PathLike, *, keep_zero: bool = False,
              dtype: torch.dtype | None = None, overwrite: bool = False, progress: Progress | None = None) -> Report:
    """Write a LoRA with a diag spec baked in (up's columns × v). A per-slice spec needs a joined
    LoRA; a per-rank spec also works on a plain one (every module's rank must match). Directions
    with v = 0 leave the file (and the slices metadata shrinks to match) unless `keep_zero`."""
    path = Path(lora_path)
    if isinstance(spec, str):
        spec = parse_diag(spec)
    keep_zero = arguments.flag(keep_zero, "keep_zero")
    dtype = None if dtype is None else arguments.output_dtype(dtype)
    with Run("diag", progress) as run:
        run.claim([save_path], inputs=[path], overwrite=overwrite)
        read = run.phase("read", 1)
        lf = read_lora(path)
        read.step(path.name)
        if lf.arch is None:
            raise OrthoLoraError("no module name matches SD1, SD2 or SDXL layers", path)
        lowranks = lf.lowranks()
        try:
            info = join_info_from_metadata(lf.metadata) or JoinInfo(
                (JoinSource(safe_source_name(lf.stem), path.name, 1.0),), {n: (lr.rank,) for n, lr in lowranks.items()})
        except OrthoLoraError as e:
            raise OrthoLoraError(e.problem, path) from None
        report = run.report
        out, ranks = {}, {}
        bake = run.phase("bake", len(lowranks))
        for name, lr in lowranks.items():
            bake.step(name)
            try:
                v = diag_vector(spec, info, name)
                if info.total_rank(name) != lr.rank:
                    raise OrthoLoraError(f"module {name} has rank {lr.rank} but the join metadata says "
                                         f"{info.total_rank(name)}")
            except OrthoLoraError as e:
                raise OrthoLoraError(e.problem, path) from None
            baked, r = apply_diag(lr, v), list(info.module_ranks(name))
            if not keep_zero:
                baked, r = drop_zero_ranks(baked, v, r)
            if baked.rank == 0:
                report.add(Row(name, Status.DROPPED, old_rank=lr.rank, rank=0))
                continue
            out[name], ranks[name] = baked, r
            report.add(Row(name, old_rank=lr.rank, rank=baked.rank, extra={"slices": "+".join(map(str, r))}))
        if not out:
            raise OrthoLoraError(f"diag {spec.text} leaves nothing: every direction is 0", path)
        extra = {**carried_metadata(lf.metadata, lf.arch), "ortholora_diag": spec.text}
        report.totals["architecture"] = Arch(lf.arch).title
        if META_KEY in lf.metadata:
            used = [i for i in range(len(info.sources)) if any(r[i] for r in ranks.values())]
            extra[META_KEY] = make_join_metadata([info.sources[i] for i in used],
                                                 {n: [r[i] for i in used] for n, r in ranks.items()})
            report.totals["sources_kept"] = ", ".join(info.sources[i].name for i in used)
        write = run.phase("write", 1)
        write_lora(save_path, out, lf.arch, dtype or _stored_dtype(path), extra, overwrite,
                   prediction.common([lf.metadata]))
        write.step(Path(save_path).name)
        report.totals.update({"diag": spec.text, "modules": len(out), "dropped": report.count(Status.DROPPED)})
    return run.report

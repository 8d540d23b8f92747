"""LoRA files read as the sources of a join or a mix: one architecture, every module as its exact
`LowRank` in its layer's layout, unique slice names.

`exact_lowrank(module)` has rank at most the layer's full rank min(out, in·k²): a family's own
low-rank form when that is narrower, else the exact SVD of its factors (LoHa r² ≥ full rank), or of
dW where there is no low-rank form (full diffs).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from . import prediction
from .arch import Arch
from .errors import OrthoLoraError
from .joinmeta import safe_source_name
from .lorafile import LoraFile, read_lora
from .lowrank import LowRank, balanced
from .modules import NetworkModule
from .paths import PathLike
from .progress import Progress
from .report import Report
from .shapes import as_matrix, full_rank
from .svd import exact_svd, factor_svd


def exact_lowrank(module: NetworkModule) -> LowRank:
    """The module's exact LowRank (in its layer's layout, which read_lora gives every module), of rank
    at most min(out, in·k²): its own form when that is narrower, else the exact SVD (of the factors,
    or of dW for full diffs)."""
    shape = module.shape
    full = full_rank(shape)
    lr = module.lowrank()
    if lr is not None and lr.rank <= full:
        return LowRank(lr.up, lr.down, lr.scale, shape)
    if lr is not None:
        return factor_svd(LowRank(lr.up, lr.down, lr.scale, shape)).truncated(slice(0, full))
    u, s, vh = exact_svd(as_matrix(module.delta()))
    return balanced(u[:, :full], s[:full], vh[:full], shape)


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
                 ) -> tuple[str, list[dict[str, LowRank]], str | None]:
    """Read LoRA files of one architecture as exact LowRanks in layer layout; what cannot be part
    of a LoRA (modules matching no layer, bias deltas) is dropped with a warning. Also returns the
    prediction type the files all state (`prediction.common`, which warns when they differ)."""
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
    kind = prediction.common([lf.metadata for lf in files], report.warnings, [lf.path.name for lf in files])
    return arch, sources, kind


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

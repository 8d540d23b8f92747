"""Summary of a LoRA-like file: family, architecture, per-module rank/alpha/scale/norm, per-block energy,
and any module's singular values.

norm = ‖dW‖_F (scale included, multiplier 1), from the factors when the exact low-rank form is narrower
than the layer (√tr((upᵀup)(down downᵀ))·|scale|), else from dW. Block energy = Σ‖dW‖²_F over the
block's modules, as a share of the file's total. The spectrum of a module is the singular values of
its dW flattened to [out, in·k·k], from the factors when it has an exact low-rank form
(docs/formats.md#factor-svd), else from dW.
"""
from __future__ import annotations


import torch

from . import arguments
from .arch import ARCHS, Arch
from .keys import name_table
from .lorafile import LoraFile, read_lora
from .modules import NetworkModule
from .paths import PathLike
from .progress import Progress
from .report import Report, Row, Status
from .run import Run
from .shapes import as_matrix, full_rank
from .svd import exact_svd, factor_svd

METADATA_CHARS = 300


def module_norm(module: NetworkModule) -> float:
    """‖dW‖_F of one module (scale included)."""
    lr = module.lowrank()
    if lr is not None and lr.rank < full_rank(module.shape):
        return lr.norm()
    return float(module.delta().norm())


def module_spectrum(module: NetworkModule) -> torch.Tensor:
    """The singular values of one module's dW (scale included), descending, float64."""
    lr = module.lowrank()
    s = factor_svd(lr).s if lr is not None else exact_svd(as_matrix(module.delta().float()))[1]
    return s.detach().cpu().double()


def block_energy(norms: dict[str, float], arch_id: str | None) -> dict[str, float]:
    """Share of Σ‖dW‖² per block (TE…, IN00…, MID, OUT00…) in architecture order; `?` for unknown names."""
    table = name_table(arch_id) if arch_id else {}
    order = list(dict.fromkeys(t.block for t in table.values()))
    energy = dict.fromkeys(order, 0.0)
    for name, n in norms.items():
        block = table[name].block if name in table else "?"
        energy[block] = energy.get(block, 0.0) + n * n
    total = sum(energy.values())
    return {b: (e / total if total else 0.0) for b, e in energy.items()}


def _short(value: str, limit: int) -> str:
    return value if len(value) <= limit else f"{value[:limit]}… ({len(value)} chars)"


def inspect_lora(path: PathLike, arch: str | None = None, full_metadata: bool = False,
                 progress: Progress | None = None) -> Report:
    """Per-module rows (family, rank, alpha, scale, norm, block) and totals (family, architecture,
    block energy shares, metadata — long values shortened unless `full_metadata`)."""
    if arch is not None:
        arguments.choice(arch, ARCHS, "arch")
    path = arguments.path(path, "path")
    with Run("inspect", progress) as run:
        read = run.phase("read", 1)
        lf = read_lora(path, arch)
        read.step(path.name)
        _summarize(lf, run.report, full_metadata, run.phase("modules", len(lf.modules)))
    return run.report


def _summarize(lf: LoraFile, report: Report, full_metadata: bool, progress: Progress) -> None:
    """The rows, totals and warnings of an inspect report."""
    table = name_table(lf.arch) if lf.arch else {}
    norms = {}
    for i, (name, module) in enumerate(lf.modules.items()):
        progress(i + 1, len(lf.modules), name)
        lr = module.lowrank()
        norms[name] = module_norm(module)
        extra = {"family": module.family, "block": table[name].block if name in table else "?",
                 "alpha": module.alpha, "scale": lr.scale if lr is not None else None,
                 "norm": norms[name], "shape": "x".join(map(str, module.shape))}
        if module.bias_delta() is not None:
            extra["bias"] = "yes"
        report.add(Row(name, Status.UNKNOWN if name in lf.unknown else Status.OK, rank=module.rank, extra=extra))
    ranks = sorted({m.rank for m in lf.modules.values() if m.rank is not None})
    report.totals.update({
        "file": str(lf.path),
        "family": "+".join(sorted({m.family for m in lf.modules.values()})),
        "architecture": Arch(lf.arch).title if lf.arch else "unknown",
        "modules": len(lf.modules),
        "rank": (str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}–{ranks[-1]}") if ranks else "",
        "block_energy": {b: round(e, 6) for b, e in block_energy(norms, lf.arch).items()},
        "metadata": {k: (v if full_metadata else _short(v, METADATA_CHARS)) for k, v in lf.metadata.items()},
    })
    if lf.unknown:
        report.warnings.append(f"{len(lf.unknown)} module(s) match no layer of {report.totals['architecture']}")
    if lf.stray_keys:
        report.warnings.append(f"{len(lf.stray_keys)} tensor(s) outside any module: {', '.join(lf.stray_keys[:5])}")

"""Resize LoRAs (F§4): exact SVD of every layer from its factors, recipes (scores.py), batches.

Decomposition of ΔW = c·up·down (c = alpha/r, up [out, r], down [r, in·k·k]) without forming it:
from the R factors of Householder QRs up = Q_u·R_u and downᵀ = Q_d·R_d (float32; Q is never
formed), the eigenpairs (σ'_i², y_i) of the small matrix N = R_d·G_u·R_dᵀ (G_u = R_uᵀ·R_u = upᵀ·up)
are the squared singular values and right vectors of the QR core M = R_u·R_dᵀ (N = MᵀM), so with
a_i = R_dᵀ·y_i
    σ_i = |c|·σ'_i,   u_i = sign(c)·up·a_i / σ'_i,   v_i = downᵀ·G_u·a_i / σ'_i²,
i.e. U = up·L and Vᴴ = R·down for two small matrices L, R: O((out + in·k²)·r²) for the QRs, r×r
work in float64, and only kept directions are ever formed. Directions with σ' ≤ 1e-6·σ'_1 (float32
noise of the factors) count as zero. Kept directions are written balanced (√σ in both factors,
scale 1; on disk with the file's one alpha, lorafile.file_alpha); layers with none kept are dropped.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

import torch

from .errors import OrthoLoraError
from .fileio import output_folder, safe_output_path
from . import prediction
from .lorafile import LoraFile, carried_metadata, read_lora, write_lora
from .lowrank import LowRank, balanced
from .modules import NetworkModule
from .normcache import BaseCheckpoint, LayerNorms, layer_parallelism, parallel_map
from .progress import Progress
from .report import Report, Row
from .scores import LayerScoring, Recipe, parse_recipes, references, select

PathLike = str | os.PathLike
NULL_RTOL = 1e-12  # on σ'², i.e. σ' ≤ 1e-6·σ'_1


@dataclass
class Factored:
    """ΔW = Σ_i s_i·u_i·v_iᵀ with U = up·left and Vᴴ = right·down (see the module docstring)."""

    up: torch.Tensor     # [out, r] float32
    down: torch.Tensor   # [r, in·k·k] float32
    left: torch.Tensor   # [r, d] float64 (d = min(r, in·k·k) directions)
    s: torch.Tensor      # [d] float64, descending, 0 for null directions
    right: torch.Tensor  # [d, r] float64
    shape: tuple[int, ...]

    @property
    def rank(self) -> int:
        """The input's rank r (the number of directions is min(r, in·k·k))."""
        return self.up.shape[1]

    def u(self, idx: torch.Tensor | slice = slice(None)) -> torch.Tensor:
        return self.up @ self.left[:, idx].float()

    def vh(self, idx: torch.Tensor | slice = slice(None)) -> torch.Tensor:
        return self.right[idx].float() @ self.down

    def truncated(self, keep: torch.Tensor) -> LowRank:
        """The kept directions as balanced factors (scale 1)."""
        idx = keep.nonzero().flatten()
        return balanced(self.u(idx), self.s[idx].float(), self.vh(idx), self.shape)


def factor(lr: LowRank) -> Factored:
    """Exact SVD of lr in factored form (never forms up@down)."""
    up, down = lr.up.float(), lr.down.float()
    if (up.dim() < 2 or down.dim() < 2 or up.flatten(1).shape != (lr.shape[0], down.shape[0])
            or down.flatten(1).shape[1] != math.prod(lr.shape[1:])):
        raise OrthoLoraError(f"factors {tuple(lr.up.shape)} and {tuple(lr.down.shape)} do not make "
                             f"a {tuple(lr.shape)} layer")
    up, down = up.flatten(1), down.flatten(1)
    ru = torch.linalg.qr(up, mode="r").R.double()
    rd = torch.linalg.qr(down.T, mode="r").R.double()
    gu = ru.T @ ru
    n = rd @ gu @ rd.T
    lam, y = torch.linalg.eigh((n + n.T) / 2)
    lam, y = lam.flip(0), y.flip(1)
    live = lam > NULL_RTOL * lam[0] if len(lam) and lam[0] > 0 else torch.zeros(len(lam), dtype=torch.bool)
    sp = torch.where(live, lam.clamp_min(0).sqrt(), 0.0)
    inv = torch.where(live, 1 / torch.where(live, sp, 1.0), 0.0)
    a = rd.T @ y
    sign = -1.0 if lr.scale < 0 else 1.0
    return Factored(up, down, sign * a * inv, sp * abs(lr.scale), ((gu @ a) * inv.square()).T, lr.shape)


def subspace_scale(f: Factored, w: torch.Tensor) -> torch.Tensor:
    """|u_iᵀ·W·v_i| for every direction (W flattened to [out, in·k·k])."""
    if not len(f.s):
        return torch.zeros(0, dtype=torch.float64)
    return (f.u() * (w.float() @ f.vh().T)).sum(0).abs().double()


# ---------------------------------------------------------------------------------------------
# Resizing decomposed layers (pure)


@dataclass
class Resized:
    """One recipe's outcome for one LoRA: kept layers, per-layer rows, the log10 threshold used."""

    recipe: Recipe
    lowranks: dict[str, LowRank]
    rows: list[Row]
    threshold: float | None


def _row(name: str, f: Factored, keep: torch.Tensor, norms: LayerNorms | None) -> Row:
    """Old/new rank, retained Frobenius share ‖σ_kept‖/‖σ‖, error vs the LoRA layer and vs W_base."""
    total = float(f.s.square().sum())
    lost = math.sqrt(float(f.s[~keep].square().sum()))
    kept = int(keep.sum())
    status = "zero" if total == 0 else "ok" if kept else "dropped"
    extra = {"fro_kept": math.sqrt(max(total - lost * lost, 0.0) / total) if total else 0.0}
    if norms is not None:
        extra["err_base"] = lost / norms.frobenius if norms.frobenius else 0.0
    return Row(name, status, rank=kept, old_rank=f.rank, rel_error=lost / math.sqrt(total) if total else 0.0,
               extra=extra)


def resize(factored: Mapping[str, Factored], recipes: Sequence[Recipe], itemsize: int = 2,
           norms: Mapping[str, LayerNorms] | None = None,
           subspace: Mapping[str, torch.Tensor] | None = None) -> Iterator[Resized]:
    """Apply every recipe to one decomposition, one result at a time (recipes that score against
    the base need `norms` / `subspace`; `itemsize` is the output's, for size targets)."""
    names = list(factored)
    layers = []
    for name in names:
        f, n = factored[name], norms.get(name) if norms else None
        layers.append(LayerScoring(f.s, f.shape, references(
            f.s, n.spectral if n else None, n.frobenius if n else None,
            subspace.get(name) if subspace else None)))
    for recipe in recipes:
        masks, threshold = select(recipe, layers, itemsize)
        chosen = [(name, m) for name, m in zip(names, masks) if m.any()]
        kept = dict(parallel_map(lambda item: (item[0], factored[item[0]].truncated(item[1])), chosen))
        rows = [_row(name, factored[name], m, norms.get(name) if norms else None)
                for name, m in zip(names, masks)]
        yield Resized(recipe, kept, rows, threshold)


# ---------------------------------------------------------------------------------------------
# Files


def output_path(out_dir: PathLike, stem: str, recipe: Recipe) -> Path:
    """`<out_dir>/<stem>_<recipe tag>.safetensors`."""
    return safe_output_path(out_dir, f"{stem}_{recipe.tag}")


def _decompose(lf: LoraFile, names: list[str], base: BaseCheckpoint | None, subspace: bool,
               progress: Progress | None) -> tuple[dict[str, Factored], dict[str, torch.Tensor]]:
    """Factored form of the named modules (and |u_iᵀ·W_base·v_i| when `subspace`, streaming the
    base); each module leaves `lf` as it is taken, so its tensors are freed once decomposed."""
    if subspace and base is not None:
        items: Iterable = ((name, lf.modules.pop(name), w) for name, w in base.weights(names))
    else:
        items = ((name, lf.modules.pop(name), None) for name in names)

    def work(item: tuple[str, NetworkModule, torch.Tensor | None]) -> tuple[str, Factored, torch.Tensor | None]:
        name, module, w = item
        lr = module.lowrank()
        if lr is None:
            raise OrthoLoraError(f"module {name} ({module.family}) has no exact low-rank form", lf.path)
        try:
            f = factor(lr)
        except OrthoLoraError as err:
            raise OrthoLoraError(f"module {name}: {err.problem}", lf.path) from None
        return name, f, subspace_scale(f, w) if w is not None else None

    factored, scales = {}, {}
    for i, (name, f, scale) in enumerate(parallel_map(work, items)):
        factored[name] = f
        if scale is not None:
            scales[name] = scale
        if progress:
            progress(i + 1, len(names), f"decompose {name}")
    return factored, scales


def _check_against_base(lf: LoraFile, names: list[str], base: BaseCheckpoint) -> None:
    if lf.arch != base.arch.id:
        raise OrthoLoraError(f"LoRA is for {lf.arch}, the checkpoint is {base.arch.title}", lf.path)
    for name in names:
        shape, t = lf.modules[name].shape, base.target(name)
        if tuple(shape) != tuple(t.shape):
            raise OrthoLoraError(f"module {name} is {tuple(shape)} but the checkpoint's layer is "
                                 f"{tuple(t.shape)}", lf.path)


def _resize_file(path: Path, recipes: Sequence[Recipe], out_dir: Path, base: BaseCheckpoint | None,
                 arch: str | None, dtype: torch.dtype, overwrite: bool, report: Report,
                 progress: Progress | None, times: dict[str, float]) -> None:
    """Resize one LoRA file with every recipe; outputs, rows and totals go into `report`."""
    todo = []
    for recipe in recipes:
        target = output_path(out_dir, path.stem, recipe)
        if target.exists() and not overwrite:
            report.warnings.append(f"{target}: exists; pass overwrite to replace it")
        else:
            todo.append((recipe, target))
    if not todo:
        return
    start = time.perf_counter()
    lf = read_lora(path, arch)
    if lf.arch is None:
        raise OrthoLoraError("cannot tell the architecture; pass it explicitly", path)
    names = [n for n in lf.modules if n not in lf.unknown]
    if not names:
        raise OrthoLoraError("no module maps to a layer of the architecture", path)
    if lf.unknown or lf.stray_keys:
        report.warnings.append(f"{path}: ignored {len(lf.unknown)} unknown modules and "
                               f"{len(lf.stray_keys)} stray tensors")
    norms = None
    if base is not None:
        _check_against_base(lf, names, base)
        t0 = time.perf_counter()
        norms, computed = base.norms(names, progress)
        times["norms_s"] += time.perf_counter() - t0
        times["norms_computed"] += computed
    t0 = time.perf_counter()
    factored, scales = _decompose(lf, names, base, any(r.uses_subspace for r, _ in todo), progress)
    times["decompose_s"] += time.perf_counter() - t0
    t0 = time.perf_counter()
    carried = carried_metadata(lf.metadata, lf.arch)
    results = resize(factored, [r for r, _ in todo], dtype.itemsize, norms, scales)
    for i, ((recipe, target), res) in enumerate(zip(todo, results)):
        if progress:
            progress(i + 1, len(todo), f"write {target.name}")
        for row in res.rows:
            row.extra = {"lora": path.stem, "recipe": recipe.tag, **row.extra}
        report.rows.extend(res.rows)
        if not res.lowranks:
            report.warnings.append(f"{target}: not written, {recipe.text} keeps no direction")
            continue
        extra = {**carried, "ortholora_resize_recipe": recipe.text, "ortholora_resize_source": path.name}
        if res.threshold is not None and math.isfinite(res.threshold):
            extra["ortholora_resize_threshold"] = f"{res.threshold:.6g}"
        write_lora(target, res.lowranks, lf.arch, dtype, extra, overwrite, prediction.common([lf.metadata]))
        directions = sum(lr.rank for lr in res.lowranks.values())
        size = sum(lr.rank * (lr.shape[0] + math.prod(lr.shape[1:])) for lr in res.lowranks.values())
        note = f"{len(res.lowranks)} layers, {directions} directions, {size * dtype.itemsize / 2**20:.2f} MiB"
        if res.threshold is not None:
            note += f", threshold {res.threshold:.4g}"
        report.totals[target.name] = note
        report.outputs.append(str(target))
    times["output_s"] += time.perf_counter() - t0
    times["files_s"] += time.perf_counter() - start


def resize_files(loras: Sequence[PathLike], out_dir: PathLike, recipes: str | Sequence[Recipe],
                 ckpt: PathLike | None = None, *, arch: str | None = None,
                 dtype: torch.dtype = torch.float16, cache_dir: PathLike | None = None,
                 overwrite: bool = False, progress: Progress | None = None) -> Report:
    """Resize each LoRA with each recipe into `out_dir/<stem>_<tag>.safetensors`.

    `ckpt` (the base checkpoint) is needed by spn_ckpt / fro_ckpt / subspace scores; when given,
    rows also carry the error relative to the base layer. Base norms are cached in `cache_dir`
    (see normcache). A file that fails is reported in `warnings` and the others are still done."""
    start = time.perf_counter()
    recipes = parse_recipes(recipes) if isinstance(recipes, str) else list(recipes)
    if not recipes:
        raise OrthoLoraError("no recipe given")
    needs = [r.text for r in recipes if r.uses_ckpt]
    if needs and ckpt is None:
        raise OrthoLoraError(f"recipe {needs[0]} needs the base checkpoint")
    paths = [Path(p) for p in loras]
    if not paths:
        raise OrthoLoraError("no LoRA file given")
    out = output_folder(out_dir)
    report = Report("resize")
    times = dict.fromkeys(("norms_s", "decompose_s", "output_s", "files_s"), 0.0) | {"norms_computed": 0}
    failed = 0
    base = BaseCheckpoint(ckpt, cache_dir) if ckpt is not None else None
    try:
        with layer_parallelism():
            for path in paths:
                try:
                    _resize_file(path, recipes, out, base, arch, dtype, overwrite, report, progress, times)
                except OrthoLoraError as err:
                    failed += 1
                    report.warnings.append(str(err) if err.path else f"{path}: {err}")
    finally:
        if base is not None:
            base.close()
            report.warnings.extend(base.warnings)
    report.totals.update({"files": len(paths), "failed": failed, "outputs": len(report.outputs),
                          "recipes": " : ".join(r.text for r in recipes)})
    if base is not None:
        report.totals["base_norms"] = (f"computed {times['norms_computed']} layers" if times["norms_computed"]
                                       else "all from cache")
    report.totals.update({k: round(v, 3) for k, v in times.items() if k.endswith("_s")})
    report.totals["seconds"] = round(time.perf_counter() - start, 3)
    return report

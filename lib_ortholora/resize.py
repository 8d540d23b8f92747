"""Resize LoRAs (F§4): exact SVD of every layer from its factors, recipes (scores.py), batches.

Decomposition of ΔW = c·up·down (c = alpha/r, up [out, r], down [r, in·k·k]) without forming it:
with float64 Grams G_u = upᵀ·up, G_d = down·downᵀ and a root G_d = R_dᵀ·R_d (Cholesky, else from
eigh), N = R_d·G_u·R_dᵀ equals MᵀM for the QR core M = R_u·R_dᵀ (up = Q_u·R_u, downᵀ = Q_d·R_d).
Its eigenpairs (σ'_i², y_i) give, with a_i = R_dᵀ·y_i,
    σ_i = |c|·σ'_i,   u_i = sign(c)·up·a_i / σ'_i,   v_i = downᵀ·G_u·a_i / σ'_i²,
so U = up·L and Vᴴ = R·down for two r×r matrices L, R: O((out + in·k²)·r²) for the Grams, r×r
work, and only kept directions are ever formed. Directions with σ'² ≤ 1e-13·σ'_1² (below float32
resolution of ΔW) count as zero. Kept directions are written balanced (√σ in both factors,
alpha = new rank); layers with none kept are dropped.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch

from .errors import OrthoLoraError
from .fileio import safe_output_path
from .lorafile import LoraFile, lora_metadata, read_lora, write_lora
from .lowrank import LowRank, balanced
from .normcache import BaseCheckpoint, LayerNorms, parallel_map
from .progress import Progress
from .report import Report, Row
from .scores import LayerScoring, Recipe, parse_recipes, references, select

PathLike = str | os.PathLike
NULL_RTOL = 1e-13


@dataclass
class Factored:
    """ΔW = Σ_i s_i·u_i·v_iᵀ with U = up·left and Vᴴ = right·down (see the module docstring)."""

    up: torch.Tensor     # [out, r] float32
    down: torch.Tensor   # [r, in·k·k] float32
    left: torch.Tensor   # [r, r] float64
    s: torch.Tensor      # [r] float64, descending, 0 for null directions
    right: torch.Tensor  # [r, r] float64
    shape: tuple[int, ...]

    @property
    def rank(self) -> int:
        return len(self.s)

    def u(self, idx: torch.Tensor | slice = slice(None)) -> torch.Tensor:
        return self.up @ self.left[:, idx].float()

    def vh(self, idx: torch.Tensor | slice = slice(None)) -> torch.Tensor:
        return self.right[idx].float() @ self.down

    def truncated(self, keep: torch.Tensor) -> LowRank:
        """The kept directions as balanced factors (scale 1)."""
        idx = keep.nonzero().flatten()
        return balanced(self.u(idx), self.s[idx].float(), self.vh(idx), self.shape)


def _gram_root(g: torch.Tensor) -> torch.Tensor:
    """R with Rᵀ·R = g (g symmetric PSD): Cholesky when g is definite, else √Λ·Eᵀ from eigh."""
    lower, info = torch.linalg.cholesky_ex(g)
    if int(info) == 0:
        return lower.T
    lam, e = torch.linalg.eigh(g)
    return lam.clamp_min(0).sqrt()[:, None] * e.T


def factor(lr: LowRank) -> Factored:
    """Exact SVD of lr in factored form (never forms up@down)."""
    up = lr.up.float().reshape(lr.up.shape[0], -1)
    down = lr.down.float().reshape(lr.down.shape[0], -1)
    r = down.shape[0]
    if up.shape != (lr.shape[0], r) or down.shape[1] != math.prod(lr.shape[1:]):
        raise OrthoLoraError(f"factors {tuple(lr.up.shape)} and {tuple(lr.down.shape)} do not make "
                             f"a {tuple(lr.shape)} layer")
    if r == 0:
        empty = torch.zeros(0, 0, dtype=torch.float64)
        return Factored(up, down, empty, torch.zeros(0, dtype=torch.float64), empty, lr.shape)
    up64, down64 = up.double(), down.double()
    gu = up64.T @ up64
    rd = _gram_root(down64 @ down64.T)
    n = rd @ gu @ rd.T
    lam, y = torch.linalg.eigh((n + n.T) / 2)
    lam, y = lam.flip(0), y.flip(1)
    live = lam > NULL_RTOL * lam[0] if lam[0] > 0 else torch.zeros(r, dtype=torch.bool)
    sp = torch.where(live, lam.clamp_min(0).sqrt(), 0.0)
    inv = torch.where(live, 1 / torch.where(live, sp, 1.0), 0.0)
    a = rd.T @ y
    sign = -1.0 if lr.scale < 0 else 1.0
    return Factored(up, down, sign * a * inv, sp * abs(lr.scale), ((gu @ a) * inv.square()).T, lr.shape)


def subspace_scale(f: Factored, w: torch.Tensor) -> torch.Tensor:
    """|u_iᵀ·W·v_i| for every direction (W flattened to [out, in·k·k])."""
    if f.rank == 0:
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


def _row(name: str, s: torch.Tensor, keep: torch.Tensor, norms: LayerNorms | None) -> Row:
    """Old/new rank, retained Frobenius share ‖σ_kept‖/‖σ‖, error vs the LoRA layer and vs W_base."""
    total = float(s.square().sum())
    lost = math.sqrt(float(s[~keep].square().sum()))
    kept = int(keep.sum())
    status = "zero" if total == 0 else "ok" if kept else "dropped"
    extra = {"fro_kept": math.sqrt(max(total - lost * lost, 0.0) / total) if total else 0.0}
    if norms is not None:
        extra["err_base"] = lost / norms.frobenius if norms.frobenius else 0.0
    return Row(name, status, rank=kept, old_rank=len(s), rel_error=lost / math.sqrt(total) if total else 0.0,
               extra=extra)


def resize(factored: Mapping[str, Factored], recipes: Sequence[Recipe], itemsize: int = 2,
           norms: Mapping[str, LayerNorms] | None = None,
           subspace: Mapping[str, torch.Tensor] | None = None) -> list[Resized]:
    """Apply every recipe to one decomposition (recipes needing the base need `norms`/`subspace`)."""
    names = list(factored)
    layers = []
    for name in names:
        f, n = factored[name], norms.get(name) if norms else None
        layers.append(LayerScoring(f.s, f.shape, references(
            f.s, n.spectral if n else None, n.frobenius if n else None,
            subspace.get(name) if subspace else None)))
    out = []
    for recipe in recipes:
        masks, threshold = select(recipe, layers, itemsize)
        chosen = [(name, m) for name, m in zip(names, masks) if m.any()]
        kept = dict(parallel_map(lambda item: (item[0], factored[item[0]].truncated(item[1])), chosen))
        rows = [_row(name, factored[name].s, m, norms.get(name) if norms else None)
                for name, m in zip(names, masks)]
        out.append(Resized(recipe, kept, rows, threshold))
    return out


# ---------------------------------------------------------------------------------------------
# Files


def carried_metadata(meta: Mapping[str, str], arch: str) -> dict[str, str]:
    """The input's `ss_*` training and `modelspec.*` descriptive metadata that still holds after a
    resize: nothing lora_metadata recomputes, no ss_network_* (shape), no hashes."""
    recomputed = set(lora_metadata(arch, {}, ""))
    return {k: v for k, v in meta.items()
            if k.startswith(("ss_", "modelspec.")) and "hash" not in k.lower()
            and not k.startswith("ss_network_") and k not in recomputed}


def output_path(out_dir: PathLike, stem: str, recipe: Recipe) -> Path:
    """`<out_dir>/<stem>_<recipe tag>.safetensors`."""
    return safe_output_path(out_dir, f"{stem}_{recipe.tag}")


def _decompose(lowranks: dict[str, LowRank], base: BaseCheckpoint | None, subspace: bool,
               progress: Progress | None, label: str) -> tuple[dict[str, Factored], dict[str, torch.Tensor]]:
    """Factored form of every layer (and |u_iᵀ·W_base·v_i| when `subspace`, streaming the base)."""
    if subspace and base is not None:
        items: Iterable = ((name, lowranks[name], w) for name, w in base.weights(lowranks))
    else:
        items = ((name, lr, None) for name, lr in lowranks.items())

    def work(item: tuple[str, LowRank, torch.Tensor | None]) -> tuple[str, Factored, torch.Tensor | None]:
        name, lr, w = item
        try:
            f = factor(lr)
        except OrthoLoraError as err:
            raise OrthoLoraError(f"layer {name}: {err.problem}") from None
        return name, f, subspace_scale(f, w) if w is not None else None

    factored, scales = {}, {}
    for i, (name, f, scale) in enumerate(parallel_map(work, items)):
        factored[name] = f
        if scale is not None:
            scales[name] = scale
        if progress:
            progress(i + 1, len(lowranks), f"{label} {name}")
    return factored, scales


def _check_against_base(lf: LoraFile, lowranks: dict[str, LowRank], base: BaseCheckpoint) -> None:
    if lf.arch != base.arch.id:
        raise OrthoLoraError(f"LoRA is for {lf.arch}, the checkpoint is {base.arch.title}", lf.path)
    for name, lr in lowranks.items():
        t = base.target(name)
        if tuple(lr.shape) != tuple(t.shape):
            raise OrthoLoraError(f"layer {name} is {tuple(lr.shape)} but the checkpoint's is "
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
    lowranks = lf.lowranks()
    lf.modules.clear()  # the float32 forms are all that is needed from here on
    if not lowranks:
        raise OrthoLoraError("no module maps to a layer of the architecture", path)
    if lf.unknown or lf.stray_keys:
        report.warnings.append(f"{path}: ignored {len(lf.unknown)} unknown modules and "
                               f"{len(lf.stray_keys)} stray tensors")
    norms = None
    if base is not None:
        _check_against_base(lf, lowranks, base)
        t0 = time.perf_counter()
        norms, computed = base.norms(lowranks, progress)
        times["norms_s"] += time.perf_counter() - t0
        times["norms_computed"] += computed
    subspace = any(r.uses_subspace for r, _ in todo)
    t0 = time.perf_counter()
    factored, scales = _decompose(lowranks, base, subspace, progress, f"decompose {path.name}")
    times["decompose_s"] += time.perf_counter() - t0
    del lowranks
    results = resize(factored, [r for r, _ in todo], dtype.itemsize, norms, scales)
    t0 = time.perf_counter()
    carried = carried_metadata(lf.metadata, lf.arch)
    for (recipe, target), res in zip(todo, results):
        for row in res.rows:
            row.extra = {"lora": path.stem, "recipe": recipe.tag, **row.extra}
        report.rows.extend(res.rows)
        total = sum(lr.rank for lr in res.lowranks.values())
        if not res.lowranks:
            report.warnings.append(f"{target}: not written, {recipe.text} keeps no direction")
            continue
        extra = {**carried, "ortholora_resize_recipe": recipe.text, "ortholora_resize_source": path.name}
        if res.threshold is not None and math.isfinite(res.threshold):
            extra["ortholora_resize_threshold"] = f"{res.threshold:.6g}"
        write_lora(target, res.lowranks, lf.arch, dtype, extra, overwrite)
        size = sum(lr.rank * (lr.shape[0] + math.prod(lr.shape[1:])) for lr in res.lowranks.values())
        note = f"{len(res.lowranks)} layers, {total} directions, {size * dtype.itemsize / 2**20:.2f} MiB"
        if res.threshold is not None:
            note += f", threshold {res.threshold:.4g}"
        report.totals[target.name] = note
        report.outputs.append(str(target))
    times["write_s"] += time.perf_counter() - t0
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
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OrthoLoraError(f"cannot create the output folder: {err.strerror or err}", out) from err
    report = Report("resize")
    times = dict.fromkeys(("norms_s", "decompose_s", "write_s", "files_s"), 0.0) | {"norms_computed": 0}
    failed = 0
    base = BaseCheckpoint(ckpt, cache_dir) if ckpt is not None else None
    try:
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

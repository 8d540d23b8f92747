"""Resize LoRAs (docs/formats.md#resize): exact SVD of every layer from its factors, recipes (scores.py), batches.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

import torch

from . import arguments, prediction
from .arch import ARCHS, Arch
from .errors import OrthoLoraError
from .lorafile import LoraFile, carried_metadata, read_lora, write_lora
from .lowrank import LowRank, balanced
from .modules import NetworkModule
from .normcache import BaseCheckpoint, LayerNorms
from .paths import PathLike
from .parallel import layer_parallelism, parallel_map
from .progress import Progress
from .report import Report, Row, Status
from .run import Run
from .scores import LayerScoring, Recipe, parse_recipes, references, select
from .shapes import matrix_shape

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
    status = Status.ZERO if total == 0 else Status.OK if kept else Status.DROPPED
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
    """`<out_dir>/<stem>_<recipe tag>.safetensors` (the stem of the user's own file, as it is)."""
    return Path(out_dir) / f"{stem}_{recipe.tag}.safetensors"


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
            progress(i + 1, len(names), name)
    return factored, scales


def _check_against_base(lf: LoraFile, names: list[str], base: BaseCheckpoint) -> None:
    if lf.arch != base.arch.id:
        raise OrthoLoraError(f"LoRA is for {lf.arch}, the checkpoint is {base.arch.title}", lf.path)
    for name in names:
        shape, t = lf.modules[name].shape, base.target(name)
        if tuple(shape) != tuple(t.shape):
            raise OrthoLoraError(f"module {name} is {tuple(shape)} but the checkpoint's layer is "
                                 f"{tuple(t.shape)}", lf.path)


def _resize_file(run: Run, path: Path, todo: list[tuple[Recipe, Path]], base: BaseCheckpoint | None,
                 arch: str | None, dtype: torch.dtype) -> tuple[str, int]:
    """Resize one LoRA file with every recipe into its claimed targets; rows, outputs and warnings
    go into the run's report. Returns the file's architecture and the base norms computed."""
    report = run.report
    read = run.phase("read", 1)
    lf = read_lora(path, arch)
    read.step(path.name)
    if lf.arch is None:
        raise OrthoLoraError("cannot tell the architecture; pass it explicitly", path)
    names = [n for n in lf.modules if n not in lf.unknown]
    if not names:
        raise OrthoLoraError("no module maps to a layer of the architecture", path)
    if lf.unknown or lf.stray_keys:
        report.warnings.append(f"{path}: ignored {len(lf.unknown)} unknown modules and "
                               f"{len(lf.stray_keys)} stray tensors")
    norms, computed = None, 0
    if base is not None:
        _check_against_base(lf, names, base)
        norms, computed = base.norms(names, run.phase("norms"))
    factored, scales = _decompose(lf, names, base, any(r.uses_subspace for r, _ in todo), run.phase("decompose"))
    carried = carried_metadata(lf.metadata, lf.arch)
    results = resize(factored, [r for r, _ in todo], dtype.itemsize, norms, scales)
    step = run.phase("write", len(todo)).step  # each recipe applied, then written
    for (recipe, target), res in zip(todo, results):
        for row in res.rows:
            row.extra = {"lora": path.stem, "recipe": recipe.tag, **row.extra}
        report.rows.extend(res.rows)
        if not res.lowranks:
            run.not_written(target, f"{recipe.text} keeps no direction of {path.name}")
            step(target.name)
            continue
        extra = {**carried, "ortholora_resize_recipe": recipe.text, "ortholora_resize_source": path.name}
        if res.threshold is not None and math.isfinite(res.threshold):
            extra["ortholora_resize_threshold"] = f"{res.threshold:.6g}"
        write_lora(target, res.lowranks, lf.arch, dtype, extra, prediction=prediction.common([lf.metadata]))
        size = sum(lr.rank * sum(matrix_shape(lr.shape)) for lr in res.lowranks.values())
        report.data.setdefault("outputs", []).append({
            "file": str(target), "lora": path.name, "recipe": recipe.text, "layers": len(res.lowranks),
            "directions": sum(lr.rank for lr in res.lowranks.values()),
            "mib": round(size * dtype.itemsize / 2**20, 3), "threshold": res.threshold})
        step(target.name)
    return lf.arch, computed


def resize_files(loras: Sequence[PathLike], out_dir: PathLike, recipes: str | Sequence[Recipe],
                 ckpt: PathLike | None = None, *, arch: str | None = None,
                 dtype: torch.dtype = torch.float16, cache_dir: PathLike | None = None,
                 overwrite: bool = False, progress: Progress | None = None) -> Report:
    """Resize each LoRA with each recipe into `out_dir/<stem>_<tag>.safetensors` (the folder is
    made if missing). All or nothing: every output is claimed before any work and published when
    every file is done; any failure leaves none.

    `ckpt` (the base checkpoint) is needed by spn_ckpt / fro_ckpt / subspace scores; when given,
    rows also carry the error relative to the base layer. Base norms are cached in `cache_dir`
    (see normcache). `report.data["outputs"]` describes each file written."""
    recipes = parse_recipes(recipes) if isinstance(recipes, str) else list(recipes)
    if not recipes:
        raise OrthoLoraError("no recipe given")
    needs = [r.text for r in recipes if r.uses_ckpt]
    if needs and ckpt is None:
        raise OrthoLoraError(f"recipe {needs[0]} needs the base checkpoint")
    paths = arguments.path_list(loras)
    if not paths:
        raise OrthoLoraError("no LoRA file given")
    out_dir, ckpt = arguments.path(out_dir, "out_dir"), arguments.optional_path(ckpt, "ckpt")
    if arch is not None:
        arguments.choice(arch, ARCHS, "arch")
    dtype = arguments.output_dtype(dtype)
    todo = {path: [(recipe, output_path(out_dir, path.stem, recipe)) for recipe in recipes] for path in paths}
    with Run("resize", progress) as run:
        run.claim([target for jobs in todo.values() for _, target in jobs], inputs=[*paths, ckpt],
                  overwrite=overwrite, make_folders=True)
        archs, computed = set(), 0
        base = BaseCheckpoint(ckpt, cache_dir) if ckpt is not None else None
        try:
            with layer_parallelism():
                for path, jobs in todo.items():
                    try:
                        arch_id, n = _resize_file(run, path, jobs, base, arch, dtype)
                    except OrthoLoraError as err:
                        if err.path is None:
                            raise OrthoLoraError(err.problem, path) from None
                        raise
                    archs.add(Arch(arch_id).title)
                    computed += n
        finally:
            if base is not None:
                base.close()
                run.report.warnings.extend(base.warnings)
        run.report.totals.update({"architecture": ", ".join(sorted(archs)), "files": len(paths),
                                  "recipes": " : ".join(r.text for r in recipes)})
        if base is not None:
            run.report.totals["base_norms"] = f"computed {computed} layers" if computed else "all from cache"
    return run.report

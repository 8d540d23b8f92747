"""Resize LoRAs (docs/formats.md#resize): exact SVD of every layer from its factors, recipes (scores.py), batches.

Each layer ΔW = c·up·down is decomposed once (`svd.factor_svd`: σ and the small matrices that turn
the factors into singular vectors), and every recipe chooses from that one decomposition. A file is
streamed in two passes, so memory stays at a few layers whatever its size and the number of
recipes: the first reads each module and keeps only its spectrum (σ and, within KEEP_BYTES, the two
r×d matrices; past that they are recomputed), the recipes then choose (a `size=` budget needs every
layer's σ), and the second reads each module again and writes its kept directions into every
recipe's output at once (one claimed output per recipe, written side by side). Kept directions are
written balanced (√σ in both factors, scale 1; on disk with the file's one alpha,
lorafile.file_alpha); layers with none kept are dropped.
"""
from __future__ import annotations

import math
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch

from . import arguments, prediction
from .arch import ARCHS, Arch
from .errors import OrthoLoraError
from .keys import Target
from .lorafile import LoraReader, LoraWriter, carried_metadata, open_lora, write_side_by_side
from .lowrank import LowRank
from .memory import PerThread
from .normcache import BaseCheckpoint, LayerNorms, float_matrix
from .paths import PathLike
from .parallel import layer_parallelism, parallel_map
from .progress import Progress
from .report import Report, Row, Status
from .run import Run
from .scores import LayerScoring, Recipe, parse_recipes, references, select
from .shapes import matrix_shape
from .svd import Factored, factor_svd

KEEP_BYTES = 256 << 20  # decompositions (r×d matrices) kept between the passes; the rest are recomputed


def subspace_scale(f: Factored, w: torch.Tensor) -> torch.Tensor:
    """|u_iᵀ·W·v_i| for every direction (W flattened to [out, in·k·k])."""
    if not len(f.s):
        return torch.zeros(0, dtype=torch.float64)
    return (f.u() * (w.float() @ f.vh().T)).sum(0).abs().double()


# ---------------------------------------------------------------------------------------------
# Choosing directions (pure)


@dataclass
class Selection:
    """One recipe's choice for one LoRA: kept-direction masks per layer (over its σ), per-layer
    rows, the log10 score threshold used (None for kohya's methods)."""

    recipe: Recipe
    masks: dict[str, torch.Tensor]
    rows: list[Row]
    threshold: float | None

    def layout(self, spectra: Mapping[str, Factored]) -> dict[str, tuple[tuple[int, ...], int]]:
        """Shape and kept rank of every layer that keeps a direction (what its output holds)."""
        return {name: (spectra[name].shape, int(m.sum())) for name, m in self.masks.items() if m.any()}


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


def choose(spectra: Mapping[str, Factored], recipes: Sequence[Recipe], itemsize: int = 2,
           norms: Mapping[str, LayerNorms] | None = None,
           subspace: Mapping[str, torch.Tensor] | None = None) -> list[Selection]:
    """Apply every recipe to one decomposition (recipes that score against the base need `norms` /
    `subspace`; `itemsize` is the output's, for size targets)."""
    names = list(spectra)
    layers = []
    for name in names:
        f, n = spectra[name], norms.get(name) if norms else None
        layers.append(LayerScoring(f.s, f.shape, references(
            f.s, n.spectral if n else None, n.frobenius if n else None,
            subspace.get(name) if subspace else None)))
    out = []
    for recipe in recipes:
        masks, threshold = select(recipe, layers, itemsize)
        rows = [_row(name, spectra[name], m, norms.get(name) if norms else None) for name, m in zip(names, masks)]
        out.append(Selection(recipe, dict(zip(names, masks)), rows, threshold))
    return out


def kept_lowranks(f: Factored, masks: Sequence[torch.Tensor]) -> list[LowRank | None]:
    """For each mask, its directions of `f` (which holds the factors) as balanced factors of scale
    1 (`Factored.truncated`), or None when it keeps none; the union of the masks is formed once."""
    union = torch.stack(list(masks)).any(0)
    if not union.any():
        return [None] * len(masks)
    kept = f.truncated(union)
    out = []
    for m in masks:
        sub = m[union]
        out.append(None if not sub.any() else kept if sub.all() else
                   LowRank(kept.up[:, sub], kept.down[sub], 1.0, f.shape))
    return out


# ---------------------------------------------------------------------------------------------
# Files


def output_path(out_dir: PathLike, stem: str, recipe: Recipe) -> Path:
    """`<out_dir>/<stem>_<recipe tag>.safetensors` (the stem of the user's own file, as it is)."""
    return Path(out_dir) / f"{stem}_{recipe.tag}.safetensors"


def _lowrank(lf: LoraReader, name: str) -> LowRank:
    module = lf.module(name)
    lr = module.lowrank()
    if lr is None:
        raise OrthoLoraError(f"module {name} ({module.family}) has no exact low-rank form", lf.path)
    return lr


def _factor(lf: LoraReader, name: str) -> Factored:
    """The module's decomposition, its factors read from the file."""
    try:
        return factor_svd(_lowrank(lf, name))
    except OrthoLoraError as err:
        if err.path is not None:
            raise
        raise OrthoLoraError(f"module {name}: {err.problem}", lf.path) from None


def _decompose(lf: LoraReader, names: list[str], base: BaseCheckpoint | None, subspace: bool,
               progress: Progress | None) -> tuple[dict[str, Factored], dict[str, torch.Tensor]]:
    """First pass: the spectrum of every named module (its r×d matrices too within KEEP_BYTES), and
    |u_iᵀ·W_base·v_i| when `subspace` (streaming the base, each tensor read on the worker thread into
    its reused buffers); no factor is kept."""
    space = PerThread("cpu")

    def with_base(group: tuple[str, list[Target]]) -> list[tuple[str, Factored, torch.Tensor | None]]:
        out = []
        for t, block in base.read_group(group, space.get()):
            f = _factor(lf, t.name)
            out.append((t.name, f, subspace_scale(f, float_matrix(block, space.get()))))
        return out

    def alone(name: str) -> list[tuple[str, Factored, torch.Tensor | None]]:
        return [(name, _factor(lf, name), None)]

    work, items = (with_base, base.groups(names)) if subspace and base is not None else (alone, names)
    done = (item for out in parallel_map(work, items) for item in out)
    spectra, scales, budget = {}, {}, KEEP_BYTES
    for i, (name, f, scale) in enumerate(done):
        cost = (f.left.numel() + f.right.numel()) * f.left.element_size()
        keep = cost <= budget
        budget -= cost if keep else 0
        spectra[name] = f.released(keep_core=keep)
        if scale is not None:
            scales[name] = scale
        if progress:
            progress(i + 1, len(names), name)
    return spectra, scales


def _check_against_base(lf: LoraReader, names: list[str], base: BaseCheckpoint) -> None:
    if lf.arch != base.arch.id:
        raise OrthoLoraError(f"LoRA is for {lf.arch}, the checkpoint is {base.arch.title}", lf.path)
    for name in names:
        shape, t = lf.shapes[name], base.target(name)
        if tuple(shape) != tuple(t.shape):
            raise OrthoLoraError(f"module {name} is {tuple(shape)} but the checkpoint's layer is "
                                 f"{tuple(t.shape)}", lf.path)


def _resize_file(run: Run, path: Path, todo: list[tuple[Recipe, Path]], base: BaseCheckpoint | None,
                 arch: str | None, dtype: torch.dtype) -> tuple[str, int]:
    """Resize one LoRA file with every recipe into its claimed targets; rows, outputs and warnings
    go into the run's report. Returns the file's architecture and the base norms computed."""
    report = run.report
    read = run.phase("read", 1)
    with open_lora(path, arch) as lf:
        read.step(path.name)
        if lf.arch is None:
            raise OrthoLoraError("cannot tell the architecture; pass it explicitly", path)
        names = [n for n in lf.names if n not in lf.unknown]
        if not names:
            raise OrthoLoraError("no module maps to a layer of the architecture", path)
        if lf.unknown or lf.stray_keys:
            report.warnings.append(f"{path}: ignored {len(lf.unknown)} unknown modules and "
                                   f"{len(lf.stray_keys)} stray tensors")
        norms, computed = None, 0
        if base is not None:
            _check_against_base(lf, names, base)
            norms, computed = base.norms(names, run.phase("norms"))
        spectra, scales = _decompose(lf, names, base, any(r.uses_subspace for r, _ in todo), run.phase("decompose"))
        selections = choose(spectra, [r for r, _ in todo], dtype.itemsize, norms, scales)
        carried = carried_metadata(lf.metadata, lf.arch)
        writing = []
        for (recipe, target), sel in zip(todo, selections):
            for row in sel.rows:
                row.extra = {"lora": path.stem, "recipe": recipe.tag, **row.extra}
            report.rows.extend(sel.rows)
            if any(m.any() for m in sel.masks.values()):
                writing.append((sel, target))
            else:
                run.not_written(target, f"{recipe.text} keeps no direction of {path.name}")
        _write(run, lf, spectra, writing, dtype, carried, prediction.common([lf.metadata]))
    for sel, target in writing:
        layout = sel.layout(spectra)
        size = sum(rank * sum(matrix_shape(shape)) for shape, rank in layout.values())
        report.data.setdefault("outputs", []).append({
            "file": str(target), "lora": path.name, "recipe": sel.recipe.text, "layers": len(layout),
            "directions": sum(rank for _, rank in layout.values()),
            "mib": round(size * dtype.itemsize / 2**20, 3), "threshold": sel.threshold})
    return lf.arch, computed


def _write(run: Run, lf: LoraReader, spectra: dict[str, Factored], writing: list[tuple[Selection, Path]],
           dtype: torch.dtype, carried: dict[str, str], kind: str | None) -> None:
    """Second pass: every module that some recipe keeps is read again and its kept directions go to
    each recipe's output, all outputs written side by side, module by module in name order."""
    names = sorted(n for n in spectra if any(sel.masks[n].any() for sel, _ in writing))
    step = run.phase("write", len(names)).step

    with ExitStack() as stack:
        writers = []
        for sel, target in writing:
            extra = {**carried, "ortholora_resize_recipe": sel.recipe.text, "ortholora_resize_source": lf.path.name}
            if sel.threshold is not None and math.isfinite(sel.threshold):
                extra["ortholora_resize_threshold"] = f"{sel.threshold:.6g}"
            writers.append(stack.enter_context(LoraWriter(target, sel.layout(spectra), lf.arch, dtype, extra,
                                                          prediction=kind)))

        def kept(name: str) -> list[LowRank | None]:
            f = spectra[name]
            full = f.with_factors(_lowrank(lf, name)) if f.left is not None else _factor(lf, name)
            return kept_lowranks(Factored(full.left, f.s, full.right, f.shape, full.up, full.down, f.rank),
                                 [sel.masks[name] for sel, _ in writing])

        write_side_by_side(writers, names, kept, step)


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

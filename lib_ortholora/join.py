"""Exact join of LoRAs along the rank axis, with `ortholora_join` slices metadata (docs/formats.md#join).

Per module, Σ_i c_i·up_i·down_i with c_i = ratio_i·alpha_i/r_i (signed ratios allowed) is written as
one LoRA of rank Σ r_i and scale 1 (on disk with the file's one alpha, lorafile.file_alpha):
  up = [σ_1·√|c_1|·up_1 | σ_2·√|c_2|·up_2 | …],  down = [√|c_1|·down_1; √|c_2|·down_2; …],  σ_i = sign c_i.
Each source's factor stays inside its own columns/rows, so dW = up·diag(v)·down toggles sources
(v = 1 on slice i, 0 elsewhere gives source i alone). Modules present in only some sources have
r_i = 0 for the others. Families whose exact low-rank form is missing (full diffs) or wider than the
layer (LoHa r² ≥ min(out, in·k²)) enter as their exact full-rank SVD (`sources.exact_lowrank`).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

from . import arguments
from .arch import Arch
from .errors import OrthoLoraError
from .joinmeta import META_KEY, make_join_metadata
from .lorafile import write_lora
from .lowrank import LowRank, concat
from .progress import Progress
from .report import Report, Row
from .run import Run
from .paths import PathLike
from .sources import read_sources, source_names


# ---------------------------------------------------------------------------------------------
# Pure parts


def join(sources: Sequence[Mapping[str, LowRank]], ratios: Sequence[float], progress: Progress | None = None
         ) -> tuple[dict[str, LowRank], dict[str, list[int]]]:
    """Join every module of every source (union, first-seen order): modules and per-source ranks."""
    names = list(dict.fromkeys(n for s in sources for n in s))
    out, ranks = {}, {}
    for i, name in enumerate(names):
        if progress:
            progress(i + 1, len(names), name)
        parts = [s.get(name) for s in sources]
        out[name], _ = concat(parts, ratios)
        ranks[name] = [p.rank if p is not None else 0 for p in parts]
    return out, ranks


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
    save_path = arguments.path(save_path, "save_path")
    with Run("join", progress) as run:
        run.claim([save_path], inputs=paths, overwrite=overwrite)
        report = run.report
        arch, sources, kind = read_sources(paths, report, run.phase("read"))
        joined, ranks = join(sources, ratios, run.phase("join"))
        for name, lr in joined.items():
            report.add(Row(name, rank=lr.rank, extra={"slices": "+".join(map(str, ranks[name]))}))
        meta = make_join_metadata([(n, p.name, r) for n, p, r in zip(labels, paths, ratios)], ranks)
        write = run.phase("write", 1)
        write_lora(save_path, joined, arch, dtype, {META_KEY: meta}, overwrite, kind)
        write.step(save_path.name)
        report.totals.update({"architecture": Arch(arch).title,
                              "sources": ", ".join(f"{n}×{r:g}" for n, r in zip(labels, ratios)),
                              "modules": len(joined), "max_rank": max(lr.rank for lr in joined.values())})
    return run.report

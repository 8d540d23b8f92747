"""Weighted LoRA + LoRA merge done right (docs/formats.md#mix): exact join, then QR-SVD recompression.

Per module D = Σ_i ratio_i·dW_i is first the exact concatenated LowRank (`lowrank.concat`, never
adding factors of different LoRAs, which would create cross terms); its SVD D = U·S·Vᴴ comes from
the factors (`svd.factor_svd`, never forming D); a rank policy picks k and the output is up = U_k·√S_k,
down = √S_k·V_kᴴ. Relative error ‖D − D_k‖_F/‖D‖_F = √(Σ_{i>k} σ_i²) / √(Σ σ_i²), exact.
"""
from __future__ import annotations

import json
import math
from typing import Mapping, Sequence

import torch

from . import arguments
from .arch import Arch
from .errors import OrthoLoraError
from .paths import PathLike
from .sources import read_sources, source_names
from .lorafile import write_lora
from .lowrank import LowRank, concat
from .progress import Progress
from .rank import RankPolicy, as_policy
from .report import Report, Row, Status
from .run import Run
from .svd import factor_svd


def recompress(lr: LowRank, policy: RankPolicy) -> tuple[LowRank, float]:
    """The best rank-k approximation of lr (k from the policy) and its exact relative error."""
    f = factor_svd(lr)
    energy = float(f.s.square().sum())
    k = min(policy.choose(f.s[f.s > 0], lr.shape, energy), int((f.s > 0).sum())) if energy > 0 else 0
    rest = float(f.s[k:].square().sum())
    return f.truncated(slice(0, k)), (math.sqrt(rest / energy) if energy > 0 else 0.0)


def mix(sources: Sequence[Mapping[str, LowRank]], ratios: Sequence[float], policy: RankPolicy,
        progress: Progress | None = None) -> dict[str, tuple[LowRank, int, float]]:
    """Per module (union of the sources): (recompressed LowRank, exact joined rank, relative error)."""
    names = list(dict.fromkeys(n for s in sources for n in s))
    out = {}
    for i, name in enumerate(names):
        if progress:
            progress(i + 1, len(names), name)
        joined, _ = concat([s.get(name) for s in sources], ratios)
        lr, err = recompress(joined, policy)
        out[name] = (lr, joined.rank, err)
    return out


def mix_loras(paths: Sequence[PathLike], save_path: PathLike, rank: int | str | RankPolicy,
              ratios: float | Sequence[float] | None = None, *, dtype: torch.dtype = torch.float16,
              overwrite: bool = False, progress: Progress | None = None) -> Report:
    """Weighted merge of LoRA-like files into one kohya LoRA of the rank the policy picks per layer."""
    paths = arguments.path_list(paths)
    if not paths:
        raise OrthoLoraError("no LoRA file given")
    ratios = arguments.as_ratios(ratios, len(paths))
    policy = as_policy(rank)
    dtype = arguments.output_dtype(dtype)
    labels = source_names(paths)
    save_path = arguments.path(save_path, "save_path")
    with Run("mix", progress) as run:
        run.claim([save_path], inputs=paths, overwrite=overwrite)
        report = run.report
        arch, sources, kind = read_sources(paths, report, run.phase("read"))
        mixed = mix(sources, ratios, policy, run.phase("mix"))
        kept = {}
        for name, (lr, joined_rank, err) in mixed.items():
            status = Status.OK if lr.rank else Status.SKIPPED
            report.add(Row(name, status, rank=lr.rank, old_rank=joined_rank, rel_error=err,
                           note="" if lr.rank else "rank 0 (all-zero delta)"))
            if lr.rank:
                kept[name] = lr
        record = {"sources": [{"name": n, "file": p.name, "ratio": r} for n, p, r in zip(labels, paths, ratios)],
                  "rank": policy.describe()}
        write = run.phase("write", 1)
        write_lora(save_path, kept, arch, dtype, {"ortholora_mix": json.dumps(record)}, overwrite, kind)
        write.step(save_path.name)
        errors = [r.rel_error for r in report.rows if r.status == Status.OK]
        report.totals.update({"architecture": Arch(arch).title,
                              "sources": ", ".join(f"{n}×{r:g}" for n, r in zip(labels, ratios)),
                              "policy": policy.describe(), "modules": len(kept),
                              "max_rel_error": max(errors, default=0.0)})
    return run.report

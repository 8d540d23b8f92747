"""Extraction benchmark: a rank-32 LoRA (linear layers, as kohya's default) from a full-size pair,
plus its error against the exact truncated SVD at the same ranks on a sample of layers."""
from __future__ import annotations

from pathlib import Path

import torch

from . import timed
from ..arch import detect
from ..extract import extract_lora
from ..fileio import open_tensors
from ..keys import rows_of, targets
from ..lorafile import read_lora
from ..lowrank import rel_error
from ..shapes import as_matrix
from ..svd import exact_svd
from ..synth import write_pair

RANK = 32
SAMPLE = 12


def prepare(workdir: Path, arch: str, full: bool) -> dict:
    base, tuned = workdir / f"{arch}_base.safetensors", workdir / f"{arch}_tuned.safetensors"
    if not (base.exists() and tuned.exists()):
        write_pair(arch, workdir, full=full, overwrite=True)
    return {"base": str(base), "tuned": str(tuned), "out": str(workdir / f"{arch}_extract_r{RANK}.safetensors")}


def command(prepared: dict) -> list[str]:
    return ["extract", prepared["base"], prepared["tuned"], "-o", prepared["out"], "--rank", str(RANK), "--no-conv",
            "--overwrite", "--quiet"]


def inputs(prepared: dict) -> list[str]:
    return [prepared["base"], prepared["tuned"]]


def output(prepared: dict) -> str:
    return prepared["out"]


def _accuracy(prepared: dict) -> dict:
    """Relative Frobenius error of the written LoRA vs the exact truncated SVD, on sampled layers."""
    lora = read_lora(prepared["out"])
    with open_tensors(prepared["base"]) as base, open_tensors(prepared["tuned"]) as tuned:
        shapes = {k: base.shape(k) for k in base.keys()}
        tgts = [t for t in targets(detect(shapes), shapes, conv=False) if t.name in lora.modules]
        ratios = []
        for t in tgts[:: max(1, len(tgts) // SAMPLE)]:
            w0, w1 = rows_of(base.get(t.ckpt_key), t.rows), rows_of(tuned.get(t.ckpt_key), t.rows)
            d = as_matrix(w1.float() - w0.float())
            u, s, vh = exact_svd(d)
            r = lora.modules[t.name].rank
            best = rel_error((u[:, :r] * s[:r]) @ vh[:r], d)
            ours = rel_error(lora.modules[t.name].delta().reshape(d.shape), d)
            ratios.append(ours / best)
    return {"sampled_layers": len(ratios), "error_vs_exact_max_ratio": round(max(ratios), 5),
            "error_vs_exact_mean_ratio": round(sum(ratios) / len(ratios), 5)}


def measure(workdir: Path, arch: str, prepared: dict) -> dict:
    """The extraction timed on its own (`op`), then the accuracy check."""
    torch.manual_seed(0)
    report, cost = timed(extract_lora, prepared["base"], prepared["tuned"], RANK, min_rank=1, max_rank=None,
                         save_path=prepared["out"], conv=False, overwrite=True)
    figures = {"op": cost, **{k: report.totals[k] for k in ("modules", "skipped", "mean_rel_error", "output_mb")}}
    return figures | _accuracy(prepared)

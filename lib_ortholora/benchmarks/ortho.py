"""Orthogonalization benchmark: three rank-32 LoRAs over every target of the architecture (LoCon
convs included, real widths), each dW_k = a_k·S + P_k with a shared rank-8 S and a private rank-24
P_k; default options (per-layer λ, shared + secondary + residuals, exact rank, fp16). Figures:
time, peak RSS, output sizes, alignment, and the rebuild error residual_k + λ_k·shared vs input_k
on sampled layers (fp16 files). As a CLI command: the same run.
Target: ≤ 2 GB peak RSS and ≤ 30 s on an idle 2-core machine."""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from . import timed
from ..arch import Arch, spec
from ..keys import targets
from ..lorafile import read_lora, write_lora
from ..lowrank import LowRank, rel_error
from ..ortho import ortho_lora
from ..shapes import matrix_shape

SCALES = (0.8, 1.0, 1.2)
SHARED, PRIVATE = 8, 24
SAMPLE = 12


def prepare(workdir: Path, arch: str, full: bool) -> dict:
    paths = [workdir / f"{arch}_ortho_in{k}.safetensors" for k in range(len(SCALES))]
    if not all(p.exists() for p in paths):
        g = torch.Generator().manual_seed(0)
        forms: list[dict[str, LowRank]] = [{} for _ in SCALES]
        for t in targets(Arch(arch), spec(arch, 1 if full else 16)):
            out, inner = matrix_shape(t.shape)
            us = torch.randn(out, SHARED, generator=g) * 0.02
            ds = torch.randn(SHARED, inner, generator=g) / math.sqrt(inner)
            for k, a in enumerate(SCALES):
                up = torch.cat([a * us, torch.randn(out, PRIVATE, generator=g) * 0.01], 1)
                down = torch.cat([ds, torch.randn(PRIVATE, inner, generator=g) / math.sqrt(inner)])
                forms[k][t.name] = LowRank(up, down, 1.0, t.shape)
        for path, form in zip(paths, forms):
            write_lora(path, form, arch, torch.float16, overwrite=True)
    return {"inputs": [str(p) for p in paths], "out": str(workdir / f"{arch}_ortho_out")}


def command(prepared: dict) -> list[str]:
    return ["ortho", *prepared["inputs"], "-o", prepared["out"], "--overwrite", "--quiet"]


def inputs(prepared: dict) -> list[str]:
    return prepared["inputs"]


def output(prepared: dict) -> list[str]:
    """The default outputs: shared, direction 2 and one residual per input."""
    stems = [Path(p).stem for p in prepared["inputs"]]
    names = ["ortho_shared", "ortho_direction2"] + [f"{stem}_ortho_residual" for stem in stems]
    return [str(Path(prepared["out"]) / f"{n}.safetensors") for n in names]


def _rebuild_error(report, prepared: dict) -> float:
    """max over sampled layers and inputs of ‖residual_k + λ_{k,1}·shared − dW_k‖ / ‖dW_k‖."""
    files = {Path(p).stem: p for p in report.outputs}
    shared = read_lora(files["ortho_shared"])
    lam = json.loads(shared.metadata["ortholora_ortho"])["lambda"]
    names = list(shared.modules)[:: max(1, len(shared.modules) // SAMPLE)]
    worst = 0.0
    for k, path in enumerate(prepared["inputs"]):
        source, residual = read_lora(path), read_lora(files[f"{Path(path).stem}_ortho_residual"])
        for n in names:
            rebuilt = residual.modules[n].delta() + lam[n][k][0] * shared.modules[n].delta()
            worst = max(worst, rel_error(rebuilt, source.modules[n].delta()))
    return worst


def measure(workdir: Path, arch: str, prepared: dict) -> dict:
    """The orthogonalization timed on its own (`op`: its peak RSS before the accuracy check, which
    reads whole files), then the accuracy check."""
    report, cost = timed(ortho_lora, prepared["inputs"], prepared["out"], overwrite=True)
    figures = {"op": cost, **{k: report.totals[k] for k in ("layers", "cos_file", "cos_file_after", "share_file")}}
    figures["input_mb"] = round(sum(Path(p).stat().st_size for p in prepared["inputs"]) / 2**20, 1)
    figures["output_mb"] = {Path(p).stem: round(Path(p).stat().st_size / 2**20, 1) for p in report.outputs}
    figures["shared_rank_max"] = max(r.rank or 0 for r in report.rows)
    figures["rebuild_rel_error_fp16"] = round(_rebuild_error(report, prepared), 6)
    return figures

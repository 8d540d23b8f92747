"""Merge benchmark: a rank-64 LoRA (every layer, convs included) into a full-size synthetic checkpoint,
streamed; wall time and peak RSS against the checkpoint's size, plus a check of sampled layers."""
from __future__ import annotations

import math
from pathlib import Path

import torch

from . import timed
from .. import arch as _arch
from ..fileio import TensorSpec, open_tensors, write_safetensors_streamed
from ..keys import rows_of, targets
from ..lorafile import read_lora, write_lora
from ..lowrank import LowRank
from ..merge import merge_lora
from ..shapes import matrix_shape
from ..synth import base_tensor

RANK = 64
SAMPLE = 8


def _write_base(path: Path, arch_id: str, full: bool) -> dict[str, tuple[int, ...]]:
    """Only the synthetic base checkpoint (fp16; position ids int64), streamed."""
    shapes = _arch.spec(arch_id, 1 if full else 16)
    if not path.exists():
        dtype = {k: torch.int64 if k.endswith("position_ids") else torch.float16 for k in shapes}
        specs = [TensorSpec(k, dtype[k], s) for k, s in shapes.items()]
        write_safetensors_streamed(path, specs, lambda k: base_tensor(k, shapes[k]).to(dtype[k]))
    return shapes


def _write_lora(path: Path, arch_id: str, shapes: dict) -> None:
    """A random rank-64 kohya LoRA on every target (dW ≈ 1% of a base weight's scale)."""
    if path.exists():
        return
    g = torch.Generator().manual_seed(0)
    lowranks = {}
    for t in targets(_arch.Arch(arch_id), shapes):
        inner = matrix_shape(t.shape)[1]
        r = min(RANK, t.shape[0], inner)
        up = torch.randn(t.shape[0], r, generator=g) * 0.01
        down = torch.randn(r, inner, generator=g) / math.sqrt(inner * r)
        lowranks[t.name] = LowRank(up, down, 1.0, t.shape)
    write_lora(path, lowranks, arch_id, torch.float16)


def prepare(workdir: Path, arch: str, full: bool) -> dict:
    base, lora = workdir / f"{arch}_base.safetensors", workdir / f"{arch}_lora_r{RANK}.safetensors"
    _write_lora(lora, arch, _write_base(base, arch, full))
    return {"base": str(base), "lora": str(lora), "out": str(workdir / f"{arch}_merged.safetensors")}


def _check(prepared: dict) -> float:
    """Largest |merged − (base + dW)| over sampled layers, in units of the fp16 rounding of the result."""
    lora = read_lora(prepared["lora"])
    worst = 0.0
    with open_tensors(prepared["base"]) as base, open_tensors(prepared["out"]) as out:
        shapes = {k: base.shape(k) for k in base.keys()}
        tgts = [t for t in targets(_arch.detect(shapes), shapes) if t.name in lora.modules]
        for t in tgts[:: max(1, len(tgts) // SAMPLE)]:
            want = rows_of(base.get(t.ckpt_key), t.rows).float() + lora.modules[t.name].delta().reshape(t.shape)
            got = rows_of(out.get(t.ckpt_key), t.rows).float()
            ulp = want.abs().clamp_min(2 ** -14) * 2 ** -10
            worst = max(worst, float(((got - want).abs() / ulp).max()))
    return worst


def command(prepared: dict) -> list[str]:
    return ["merge", prepared["base"], prepared["lora"], "-o", prepared["out"], "--overwrite", "--quiet"]


def inputs(prepared: dict) -> list[str]:
    return [prepared["base"], prepared["lora"]]


def output(prepared: dict) -> str:
    return prepared["out"]


def measure(workdir: Path, arch: str, prepared: dict) -> dict:
    """The merge timed on its own (`op`), then a check of sampled layers; the output is removed."""
    report, cost = timed(merge_lora, prepared["base"], prepared["lora"], 1.0, prepared["out"], overwrite=True)
    sizes = {k: round(Path(prepared[k]).stat().st_size / 2 ** 20, 1) for k in ("base", "lora", "out")}
    figures = {"op": cost, "checkpoint_mb": sizes["base"], "lora_mb": sizes["lora"], "output_mb": sizes["out"],
               "modules_merged": report.totals["modules_merged"], "layers_changed": report.totals["layers_changed"],
               "modules_unmatched": report.totals["modules_unmatched"],
               "max_error_fp16_ulps_sampled": round(_check(prepared), 3)}
    Path(prepared["out"]).unlink()
    return figures

"""The built-in demo: a tiny synthetic SD1.5 pair, a LoRA extracted from it, and a check that
base + LoRA reproduces the tuned weights. No downloads; seconds on a laptop CPU."""
from __future__ import annotations

from pathlib import Path

from . import arguments
from .extract import extract_lora
from .fileio import open_tensors
from .keys import rows_of, targets
from .arch import detect
from .lorafile import read_lora
from .lowrank import rel_error
from .progress import Progress
from .report import Report
from .run import Run
from .synth import write_pair

POLICY = "fraction=0.08,min=8,max=96"


def run_demo(folder: str | Path, arch: str = "sd15", overwrite: bool = False, progress: Progress | None = None) -> Report:
    """Write a synthetic pair into `folder` (made if missing; an existing pair is reused unless
    `overwrite`), extract `demo_lora.safetensors` from it and verify the round trip."""
    folder = arguments.path(folder, "folder")
    base, tuned = folder / f"{arch}_base.safetensors", folder / f"{arch}_tuned.safetensors"
    out = folder / "demo_lora.safetensors"
    with Run("demo", progress) as run:
        run.claim([out], overwrite=overwrite, make_folders=True)
        if overwrite or not (base.exists() and tuned.exists()):
            write_pair(arch, folder, overwrite=overwrite, progress=run.phase("synth"))
        run.use(extract_lora(base, tuned, POLICY, save_path=out, overwrite=overwrite, progress=progress))
        run.report.operation = "demo"
    run.report.totals["roundtrip_rel_error"] = roundtrip_error(base, tuned, out)
    return run.report


def roundtrip_error(base: Path, tuned: Path, lora_path: Path) -> float:
    """max over layers of ‖(W_base + dW_lora) − W_tuned‖_F / ‖W_tuned − W_base‖_F."""
    lora = read_lora(lora_path)
    worst = 0.0
    with open_tensors(base) as b, open_tensors(tuned) as t:
        shapes = {k: b.shape(k) for k in b.keys()}
        for tg in targets(detect(shapes), shapes):
            if tg.name not in lora.modules:
                continue
            w0, w1 = rows_of(b.get(tg.ckpt_key), tg.rows).float(), rows_of(t.get(tg.ckpt_key), tg.rows).float()
            worst = max(worst, rel_error(w0 + lora.modules[tg.name].delta(), w1) * float(w1.norm())
                        / float((w1 - w0).norm()))
    return worst

"""Batch resize benchmark: BATCH full-size LoRAs of rank RANK on every linear target, one recipe that
needs no base, resized in one call. Memory must stay flat (the peak RSS of the whole batch at most
FLAT_MB over that of its first file alone) and time linear in the files: the batch is timed on its
first file, its first FIRST files and all of them, each in a fresh process (benchmarks.in_child),
and `per_file_s` of each is set side by side (the first file's includes one-time warm-up). As a CLI
command: the whole batch."""
from __future__ import annotations

from pathlib import Path

from . import in_child
from ..resize import resize_files
from ..scores import parse_recipes
from .resize import random_lora

BATCH, FIRST, RANK = 40, 10, 8
RECIPE = "spn_lora=1,size=16"
FLAT_MB = 50


def prepare(workdir: Path, arch: str, full: bool) -> dict:
    folder = workdir / f"{arch}_batch_r{RANK}"
    folder.mkdir(exist_ok=True)
    loras = [folder / f"b{i:02d}.safetensors" for i in range(BATCH)]
    for i, path in enumerate(loras):
        if not path.exists():
            random_lora(path, arch, RANK, full, seed=100 + i)
    return {"loras": [str(p) for p in loras], "out": str(workdir / f"{arch}_batch_out"),
            "input_mb": round(sum(p.stat().st_size for p in loras) / 2**20, 1)}


def command(prepared: dict) -> list[str]:
    return ["resize", *prepared["loras"], "-o", prepared["out"], "-r", RECIPE, "--overwrite", "--quiet"]


def inputs(prepared: dict) -> list[str]:
    return prepared["loras"]


def output(prepared: dict) -> list[str]:
    tag = parse_recipes(RECIPE)[0].tag
    return [str(Path(prepared["out"]) / f"{Path(p).stem}_{tag}.safetensors") for p in prepared["loras"]]


def _batch(loras: list[str], out: str) -> dict:
    report = resize_files(loras, out, RECIPE, overwrite=True)
    return {"files": len(loras), "outputs": len(report.outputs)}


def measure(workdir: Path, arch: str, prepared: dict) -> dict:
    loras, out = prepared["loras"], prepared["out"]
    figures = {"files": len(loras), "rank": RANK, "recipe": RECIPE, "input_mb": prepared["input_mb"]}
    for key, part in (("first_file", loras[:1]), (f"first_{FIRST}", loras[:FIRST]), ("all", loras)):
        figures[key] = run = in_child(_batch, part, out)
        if "wall_s" in run:
            run["per_file_s"] = round(run["wall_s"] / len(part), 3)
    one, all_ = figures["first_file"], figures["all"]
    if "peak_rss_mb" in one and "peak_rss_mb" in all_:
        figures["rss_growth_mb"] = round(all_["peak_rss_mb"] - one["peak_rss_mb"], 1)
        figures["flat"] = figures["rss_growth_mb"] <= FLAT_MB
    some = figures[f"first_{FIRST}"]
    if "wall_s" in some and "wall_s" in all_:  # past the warm-up: all / first FIRST vs BATCH / FIRST
        figures["time_ratio_all_vs_first"] = round(all_["wall_s"] / some["wall_s"], 2)
        figures["time_ratio_linear"] = round(BATCH / FIRST, 2)
    return figures

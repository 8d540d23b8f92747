"""Resize benchmark: a rank-128 LoRA on every linear target of a full-size synthetic base, three
base-aware recipes with a cold and a warm norm cache, a kohya-equivalent sv_ratio run, a subspace
run (streams the base), an SD1.5 rank-32 → 16 resize against the dense SVD kohya's script does,
and σ_max methods on full-size layers. Each phase runs in its own process (benchmarks.in_child: its
own peak RSS). The cold run starts from a cold page cache too and is set beside reading the base
once from a cold page cache (`cold_x_base_read`; target ≤ 1.5). As a CLI command: the three recipes
with a warm norm cache (its own cache folder, filled when the inputs are prepared)."""
from __future__ import annotations

import math
import shutil
import time
from pathlib import Path

import torch

from . import in_child
from ._baseline import drop_cache, read_once
from ..arch import Arch, spec
from ..fileio import open_tensors
from ..keys import Target, targets
from ..lorafile import read_lora, write_lora
from ..lowrank import LowRank, rel_error
from ..normcache import spectral_norm
from ..parallel import layer_parallelism, parallel_map
from ..resize import resize_files
from ..scores import parse_recipes
from ..shapes import as_matrix, matrix_shape
from ..synth import write_pair

RANK = 128
RECIPES = "spn_ckpt=1,thr=-1.2:spn_lora=1,size=32:fro_ckpt=1,size=64"
KOHYA = "sv_ratio=20,rank=32"  # sd-scripts: --dynamic_method sv_ratio --dynamic_param 20 --new_rank 32
SUBSPACE = "subspace=1,spn_ckpt=1,size=32"
SAMPLE = 8


def random_lora(path: Path, arch: str, rank: int, full: bool, seed: int = 0) -> int:
    """A LoRA on every linear target with balanced factors: orthonormal U, V and a decaying spectrum
    σ_i ∝ 0.97^i scaled to ‖ΔW‖_F = ρ·√out (ρ log-uniform in [0.01, 0.1], ~ρ·‖W_base‖_F)."""
    tgts = targets(Arch(arch), spec(arch, 1 if full else 16), conv=False)

    def make(item: tuple[int, Target]) -> tuple[str, LowRank]:
        i, t = item
        g = torch.Generator().manual_seed(seed * 100003 + i)
        out, inner = matrix_shape(t.shape)
        r = min(rank, out, inner)
        u = torch.linalg.qr(torch.randn(out, r, generator=g))[0]
        v = torch.linalg.qr(torch.randn(inner, r, generator=g))[0]
        s = 0.97 ** torch.arange(r, dtype=torch.float32)
        rho = 10 ** (-2 + torch.rand(1, generator=g).item())
        s *= rho * math.sqrt(out) / s.norm()
        return t.name, LowRank(u * s.sqrt(), s.sqrt()[:, None] * v.T, 1.0, t.shape)

    lowranks = dict(parallel_map(make, enumerate(tgts)))
    write_lora(path, lowranks, arch, torch.float16, overwrite=True)
    return len(lowranks)


def prepare(workdir: Path, arch: str, full: bool) -> dict:
    base = workdir / f"{arch}_base.safetensors"
    if not base.exists():
        _, tuned = write_pair(arch, workdir, full=full, overwrite=True)
        tuned.unlink()  # only the base is needed
    lora, small = workdir / f"{arch}_r{RANK}.safetensors", workdir / "sd15_r32.safetensors"
    modules = random_lora(lora, arch, RANK, full) if not lora.exists() else len(read_lora(lora).modules)
    if not small.exists():
        random_lora(small, "sd15", 32, full, seed=1)
    prepared = {"base": str(base), "lora": str(lora), "sd15": str(small), "modules": modules,
                "lora_mb": round(lora.stat().st_size / 2**20, 1), "cli_cache": str(workdir / "norm-cache-cli"),
                "cli_out": str(workdir / "out-cli")}
    if not Path(prepared["cli_cache"]).is_dir():  # the command runs with a warm norm cache
        resize_files([lora], prepared["cli_out"], RECIPES, base, cache_dir=prepared["cli_cache"], overwrite=True)
    return prepared


def command(prepared: dict) -> list[str]:
    return ["resize", prepared["base"], prepared["lora"], "-o", prepared["cli_out"], "-r", RECIPES,
            "--cache-dir", prepared["cli_cache"], "--overwrite", "--quiet"]


def inputs(prepared: dict) -> list[str]:
    """What the command reads: the LoRA (of the base only its header, the norms come from the cache)."""
    return [prepared["lora"]]


def output(prepared: dict) -> list[str]:
    stem = Path(prepared["lora"]).stem
    return [str(Path(prepared["cli_out"]) / f"{stem}_{r.tag}.safetensors") for r in parse_recipes(RECIPES)]


def _resize(lora: str, out: str, recipes: str, base: str | None, cache: str) -> dict:
    report = resize_files([lora], out, recipes, base, cache_dir=cache, overwrite=True)
    return {**{f"{phase}_s": s for phase, s in report.totals["phase_seconds"].items()},
            **{k: report.totals[k] for k in ("base_norms",) if k in report.totals},
            "outputs": {Path(o["file"]).name: o for o in report.data["outputs"]}}


def _kohya_comparison(lora: str, out: str) -> dict:
    """rank=16 on the SD1.5 rank-32 LoRA, timed in a fresh process (first call: one-time imports
    included) and again; then on every SAMPLE-th layer the dense SVD of up@down that kohya's script
    does (timed, extrapolated to all layers) and the relative difference of our output from it."""
    times = []
    for _ in range(2):
        start = time.perf_counter()
        resize_files([lora], out, "rank=16", overwrite=True)
        times.append(time.perf_counter() - start)
    first_s, ours_s = times
    source, result = read_lora(lora).lowranks(), read_lora(Path(out) / (Path(lora).stem + "_rank16.safetensors"))
    names = list(source)[::SAMPLE]

    def dense(name: str) -> torch.Tensor:
        u, s, vh = torch.linalg.svd(as_matrix(source[name].delta()), full_matrices=False)
        return (u[:, :16] * s[:16]) @ vh[:16]

    start = time.perf_counter()
    truncated = list(parallel_map(dense, names))
    dense_s = (time.perf_counter() - start) * len(source) / len(names)
    errors = [rel_error(result.modules[n].delta().reshape(t.shape), t) for n, t in zip(names, truncated)]
    return {"first_call_s": round(first_s, 2), "ours_s": round(ours_s, 2), "dense_svd_sampled_layers": len(names),
            "dense_svd_estimate_s": round(dense_s, 1), "speedup": round(dense_s / ours_s, 1),
            "max_rel_diff_vs_dense_truncation": float(f"{max(errors):.2e}")}


def _spectral_methods(base: str) -> dict:
    """σ_max of a few full-size layers: matrix_norm(ord=2) (reference), 50 power iterations, ours."""
    rows = {}
    with open_tensors(base) as f, layer_parallelism():
        keys = [k for k in f.keys() if k.endswith((".ff.net.0.proj.weight", ".ff.net.2.weight", ".attn1.to_q.weight",
                                                    "in_layers.2.weight"))]
        picked = {}
        for k in keys:
            picked.setdefault(tuple(f.shape(k)), k)
        for shape, key in sorted(picked.items(), key=lambda kv: -math.prod(kv[0]))[:4]:
            w = as_matrix(f.get(key).float())
            t0 = time.perf_counter()
            exact = float(torch.linalg.matrix_norm(w, ord=2))
            t1 = time.perf_counter()
            x = torch.randn(w.shape[1], generator=torch.Generator().manual_seed(0))
            for _ in range(50):
                x = w.T @ (w @ x)
                x /= x.norm()
            power = float((w @ x).norm())
            t2 = time.perf_counter()
            ours = spectral_norm(w)
            t3 = time.perf_counter()
            rows["x".join(map(str, w.shape))] = {
                "matrix_norm_s": round(t1 - t0, 3), "power50_s": round(t2 - t1, 3),
                "power50_rel_err": float(f"{abs(power / exact - 1):.1e}"),
                "lanczos_s": round(t3 - t2, 3), "lanczos_rel_err": float(f"{abs(ours / exact - 1):.1e}")}
    return rows


def measure(workdir: Path, arch: str, prepared: dict) -> dict:
    cache, out = workdir / "norm-cache", workdir / "out"
    shutil.rmtree(cache, ignore_errors=True)
    out.mkdir(exist_ok=True)
    base, lora = prepared["base"], prepared["lora"]
    figures = {"modules": prepared["modules"], "rank": RANK, "lora_mb": prepared["lora_mb"],
               "threads": torch.get_num_threads(), "recipes": RECIPES}
    drop_cache([base])
    figures["base_read_cold_s"] = round(read_once([base]), 2)
    drop_cache([base, lora])
    figures["cold"] = cold = in_child(_resize, lora, str(out), RECIPES, base, str(cache))
    if "wall_s" in cold and figures["base_read_cold_s"] > 0:
        figures["cold_x_base_read"] = round(cold["wall_s"] / figures["base_read_cold_s"], 2)
    figures["warm"] = in_child(_resize, lora, str(out), RECIPES, base, str(cache))
    figures["kohya_sv_ratio"] = in_child(_resize, lora, str(out), KOHYA, None, str(cache))
    figures["subspace_warm"] = in_child(_resize, lora, str(out), SUBSPACE, base, str(cache))
    figures["sd15_r32_to_16"] = in_child(_kohya_comparison, prepared["sd15"], str(out))
    figures["sigma_max_methods"] = in_child(_spectral_methods, base)
    return figures

"""Extract a LoRA from a base and a tuned checkpoint, one layer at a time, straight from the files.

Per targeted layer: D = W_tuned − W_base (float32, the q/k/v row block for open_clip in_proj),
skipped (and reported) when max|D| ≤ skip; otherwise the top-r singular triplets of D reshaped to
[out, in·k·k] give up = U·√S, down = √S·Vᴴ (scale 1; on disk with the file's one alpha,
lorafile.file_alpha). r follows a rank policy (rank.py); 3×3
convs may follow their own policy or be left out.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from . import arch as _arch
from . import arguments
from .errors import OrthoLoraError
from .fileio import TensorFile, check_finite, open_tensors, prefetched
from .keys import Target, rows_of, targets
from .lorafile import write_lora
from .lowrank import LowRank, balanced
from .memory import PerThread, Workspace
from .parallel import parallel_map
from .prediction import checked as checked_prediction, detect as detect_prediction
from .progress import Progress
from .rank import RankPolicy, as_policy
from .report import Report, Row, Status
from .run import Run
from .shapes import as_matrix
from .svd import exact_svd, truncated_svd

SVD_METHODS = ("auto", "exact", "randomized")


def peak(x: torch.Tensor) -> float:
    """max|x| without an |x| temporary (NaN when x holds NaN; 0 when x is empty)."""
    if not x.numel():
        return 0.0
    lo, hi = torch.aminmax(x)
    lo, hi = float(lo), float(hi)
    return max(-lo, hi) if lo == lo and hi == hi else math.nan


def _sum_of_squares(x: torch.Tensor, out: torch.Tensor, scale: float) -> float:
    """Σx², from the squares of x·scale (a power of two: exact) formed in `out` (may be x) and
    summed by torch's cascaded float32 sum (relative error ~1e-7)."""
    sq = torch.square(x, out=out) if scale == 1.0 else torch.mul(x, scale, out=out).square_()
    return float(sq.sum()) / (scale * scale)


def _safe_scale(value: float) -> float:
    """1, or the power of two that brings `value` near 1 when its square would leave float32's range."""
    return 1.0 if value == 0.0 or 2.0 ** -40 < value < 2.0 ** 40 else 2.0 ** -math.frexp(value)[1]


def decompose(d: torch.Tensor, shape: tuple[int, ...], policy: RankPolicy, svd: str = "auto",
              work: Workspace | None = None) -> tuple[LowRank, float]:
    """Best rank-r approximation of a delta under `policy`; returns it and its relative Frobenius
    error ‖D − U_r·S_r·V_rᴴ‖_F / ‖D‖_F. Scratch arrays of D's size come from `work` (its
    `scratch` buffer) when given, so that a loop over layers reuses one."""
    mat = as_matrix(d)
    scratch = work.take("scratch", mat.shape, mat.dtype) if work is not None else torch.empty_like(mat)
    scale = _safe_scale(peak(mat))
    energy = _sum_of_squares(mat, scratch, scale)
    if policy.needs_spectrum(shape) or svd == "exact":
        u, s, vh = exact_svd(mat)
    else:
        u, s, vh = truncated_svd(mat, policy.cap(shape), method=svd)
    r = policy.choose(s, shape, energy)
    u, s, vh = u[:, :r], s[:r], vh[:r]
    residual = _sum_of_squares(torch.addmm(mat, u * s, vh, alpha=-1, out=scratch), scratch, scale) if r else energy
    return balanced(u, s, vh, shape), (residual / energy) ** 0.5 if energy else 0.0


def _pair_arch(base: TensorFile, tuned: TensorFile) -> tuple[_arch.Arch, dict]:
    shapes = {k: base.shape(k) for k in base.keys()}
    a = _arch.detect(shapes, str(base.path))
    b = _arch.detect({k: tuned.shape(k) for k in tuned.keys()}, str(tuned.path))
    if a != b:
        raise OrthoLoraError(f"base is {a.title} but tuned ({tuned.path}) is {b.title}", base.path)
    return a, shapes


def _by_tensor(todo: list[Target]) -> list[list[Target]]:
    """Consecutive targets of one checkpoint tensor (the q/k/v rows of an in_proj) grouped, so
    that it is read once."""
    groups: list[list[Target]] = []
    for t in todo:
        if groups and groups[-1][0].ckpt_key == t.ckpt_key:
            groups[-1].append(t)
        else:
            groups.append([t])
    return groups


def _layer_delta(t: Target, base: torch.Tensor, tuned: torch.Tensor, files: tuple[TensorFile, TensorFile],
                 work: Workspace) -> tuple[torch.Tensor, float]:
    """D = tuned − base (float32, the `rows` block, in `work`'s `delta` buffer) and max|D|.
    NaN/Inf in an input shows in max|D|: only then are the inputs checked, to name the file."""
    if base.shape != tuned.shape:
        raise OrthoLoraError(f"{t.ckpt_key} is {tuple(tuned.shape)} in the tuned file but "
                             f"{tuple(base.shape)} in the base", files[1].path)
    whole = (base, tuned)
    tuned, base = rows_of(tuned, t.rows), rows_of(base, t.rows)
    d = work.take("delta", tuned.shape, torch.float32).copy_(tuned)
    d.sub_(work.take("scratch", base.shape, torch.float32).copy_(base))
    largest = peak(d)
    if not math.isfinite(largest):
        for w, f in zip(whole, files):
            check_finite(w, t.ckpt_key, f.path)
        raise OrthoLoraError(f"tensor {t.ckpt_key}: tuned − base overflows float32", files[1].path)
    return d, largest


def extract(base: TensorFile, tuned: TensorFile, policy: RankPolicy, conv_policy: RankPolicy | None,
            skip: float = 1e-6, device: str | torch.device = "auto", svd: str = "auto",
            progress: Progress | None = None) -> tuple[str, dict[str, LowRank], Report]:
    """Extract from two open checkpoints. `conv_policy=None` leaves resnet/sampler layers out.
    Returns (architecture id, {kohya name: LowRank}, report)."""
    arch, shapes = _pair_arch(base, tuned)
    dev = arguments.device(device)
    todo = targets(arch, shapes, conv=conv_policy is not None)
    report = Report("extract", totals={"architecture": arch.title, "policy": policy.describe(),
                                       "conv_policy": conv_policy.describe() if conv_policy else "off"})
    out: dict[str, LowRank] = {}
    groups = _by_tensor(todo)
    layer_bytes = 4 * max((math.prod(t.shape) for t in todo), default=0)  # one float32 layer
    reads = {name: max((f.buffer_bytes(g[0].ckpt_key) for g in groups), default=0)
             for name, f in (("base", base), ("tuned", tuned))}
    if dev.type == "cpu":
        host = work = PerThread(dev, {"delta": layer_bytes, "scratch": layer_bytes, **reads})
    else:
        host, work = PerThread("cpu", reads, pin=True), PerThread(dev, {"delta": layer_bytes, "scratch": layer_bytes})

    def layers(group: list[Target]) -> list[tuple[Target, LowRank | None, float]]:
        """(target, LowRank or None when skipped, rel. error or max|D|) for one tensor's targets."""
        buffers, space = host.get(), work.get()
        pair = [f.get(group[0].ckpt_key, buffers.take(name, (f.buffer_bytes(group[0].ckpt_key),), torch.uint8))
                for name, f in (("base", base), ("tuned", tuned))]
        results = []
        for t in group:
            d, largest = _layer_delta(t, *pair, (base, tuned), space)
            if largest <= skip:
                results.append((t, None, largest))
                continue
            lr, err = decompose(d, t.shape, conv_policy if (conv_policy and t.kernel > 1) else policy, svd, space)
            results.append((t, LowRank(lr.up.cpu(), lr.down.cpu(), lr.scale, lr.shape), err))
        return results

    done = 0
    def hinted(group: list[Target]) -> str | None:
        key = group[0].ckpt_key
        return None if base.reads_direct(key) and tuned.reads_direct(key) else key

    for results in parallel_map(layers, prefetched(groups, (base, tuned), hinted)):
        for t, lr, value in results:
            row = report.add(Row(t.name, extra={"block": t.block, "shape": "×".join(map(str, t.shape))}))
            if lr is None:
                row.status, row.note = Status.SKIPPED, f"unchanged: max|ΔW| = {value:.3g} ≤ {skip:g}"
            else:
                out[t.name] = lr
                row.rank, row.rel_error = lr.rank, value
            done += 1
            if progress:
                progress(done, len(todo), t.name)
    skipped = [r.module for r in report.rows if r.status == Status.SKIPPED]
    report.totals.update({"modules": len(out), "skipped": len(skipped),
                          "skipped_text_encoder": sum(n.startswith("lora_te") for n in skipped)})
    if skipped:
        report.warnings.append(f"{len(skipped)} unchanged modules skipped (see rows with status 'skipped')")
    errs = [r.rel_error for r in report.rows if r.rel_error is not None]
    if errs:
        report.totals["mean_rel_error"] = sum(errs) / len(errs)
        report.totals["max_rel_error"] = max(errs)
    return arch.id, out, report


def extract_lora(base_path: str | Path, tuned_path: str | Path, rank: RankPolicy | str | float | int = 0.08,
                 min_rank: int = 8, max_rank: int | None = 96, save_path: str | Path | None = None, *,
                 conv_rank: RankPolicy | str | float | int | None = None, conv: bool = True,
                 skip: float = 1e-6, device: str = "auto", svd: str = "auto",
                 dtype: torch.dtype = torch.float16, overwrite: bool = False, prediction: str | None = None,
                 progress: Progress | None = None) -> Report:
    """Extract a LoRA from checkpoint files and (with `save_path`) write it as a kohya LoRA.

    `rank`: a float < 1 is a fraction of full rank (⌈rank·in·k²⌉, clamped to [min_rank, max_rank]);
    an int is a fixed rank; a string is any rank policy (`sv_ratio=20`, `fro=0.9,max=64`, …).
    `conv_rank` is the policy for 3×3 convs (default: same as `rank`); `conv=False` leaves all
    resnet/sampler layers out. `prediction` (`epsilon` / `v`; None or `auto`: detected, see
    prediction.py) is the tuned model's prediction type, recorded in the metadata.
    """
    policy = as_policy(rank, min_rank, max_rank)
    conv_policy = as_policy(conv_rank, min_rank, max_rank) if conv_rank is not None else policy
    skip = arguments.number(skip, "skip", 0)
    svd = arguments.choice(svd, SVD_METHODS, "svd")
    dtype = arguments.output_dtype(dtype)
    conv = arguments.flag(conv, "conv")
    dev = arguments.device(device)
    prediction = checked_prediction(prediction)
    base_path, tuned_path = arguments.path(base_path, "base_path"), arguments.path(tuned_path, "tuned_path")
    save_path = arguments.optional_path(save_path, "save_path")
    with Run("extract", progress) as run:
        if save_path is not None:
            run.claim([save_path], inputs=[base_path, tuned_path], overwrite=overwrite)
        with open_tensors(base_path) as base, open_tensors(tuned_path) as tuned:
            found = detect_prediction(_pair_arch(base, tuned)[0], (tuned, base), prediction)
            arch_id, lowranks, report = extract(base, tuned, policy, conv_policy if conv else None,
                                                skip, dev, svd, run.phase("layers"))
        run.use(report)
        report.totals["prediction"] = found.describe()
        if not found.sure:
            report.warnings.append(f"prediction type {found.describe()}; pass prediction='epsilon' or 'v' "
                                   "(CLI --prediction) if that is wrong")
        if save_path is not None:
            meta = {"ortholora_operation": "extract", "ortholora_base": base_path.name,
                    "ortholora_tuned": tuned_path.name, "ortholora_policy": report.totals["policy"],
                    "ortholora_conv_policy": report.totals["conv_policy"]}
            write = run.phase("write", 1)
            write_lora(save_path, lowranks, arch_id, dtype, meta, overwrite, found.type)
            write.step(save_path.name)
    return run.report

"""Extract a LoRA from a base and a tuned checkpoint, one layer at a time, straight from the files.

Per targeted layer: D = W_tuned − W_base (float32, the q/k/v row block for open_clip in_proj),
skipped (and reported) when max|D| ≤ skip; otherwise the top-r singular triplets of D reshaped to
[out, in·k·k] give up = U·√S, down = √S·Vᴴ (scale 1; on disk with the file's one alpha,
lorafile.file_alpha). r follows a rank policy (rank.py); 3×3
convs may follow their own policy or be left out.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import torch

from . import arch as _arch
from . import arguments
from .errors import OrthoLoraError
from .fileio import TensorFile, check_finite, open_tensors
from .keys import Target, rows_of, targets
from .lorafile import write_lora
from .lowrank import LowRank, balanced
from .prediction import checked as checked_prediction, detect as detect_prediction
from .progress import Progress
from .rank import RankPolicy, as_policy
from .report import Report, Row, Status
from .run import Run
from .shapes import as_matrix
from .svd import exact_svd, truncated_svd

SVD_METHODS = ("auto", "exact", "randomized")


def decompose(d: torch.Tensor, shape: tuple[int, ...], policy: RankPolicy, svd: str = "auto") -> tuple[LowRank, float]:
    """Best rank-r approximation of a delta under `policy`; returns it and its relative Frobenius error."""
    mat = as_matrix(d)
    energy = float(mat.double().square().sum())
    if policy.needs_spectrum(shape) or svd == "exact":
        u, s, vh = exact_svd(mat)
    else:
        u, s, vh = truncated_svd(mat, policy.cap(shape), method=svd)
    r = policy.choose(s, shape, energy)
    u, s, vh = u[:, :r], s[:r], vh[:r]
    residual = float((mat - (u * s) @ vh).double().square().sum()) if r else energy
    return balanced(u, s, vh, shape), (residual / energy) ** 0.5 if energy else 0.0


def _pair_arch(base: TensorFile, tuned: TensorFile) -> tuple[_arch.Arch, dict]:
    shapes = {k: base.shape(k) for k in base.keys()}
    a = _arch.detect(shapes, str(base.path))
    b = _arch.detect({k: tuned.shape(k) for k in tuned.keys()}, str(tuned.path))
    if a != b:
        raise OrthoLoraError(f"base is {a.title} but tuned ({tuned.path}) is {b.title}", base.path)
    return a, shapes


def read_ahead(base: TensorFile, tuned: TensorFile, keys: list[str]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(base, tuned) tensors for each key in order, the next distinct key read by a background
    thread while the caller computes (file reads release the GIL); a repeated key (q/k/v rows of
    one in_proj) is read once. At most two layers are held."""
    order = list(dict.fromkeys(keys))  # consecutive repeats share one read
    fetch = lambda key: (base.get(key), tuned.get(key))  # noqa: E731
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(fetch, order[0]) if order else None
        current_key, current, n = None, None, 0
        for key in keys:
            if key != current_key:
                current_key, current, n = key, pending.result(), n + 1
                pending = pool.submit(fetch, order[n]) if n < len(order) else None
            yield current


def _layer_delta(t: Target, base: torch.Tensor, tuned: torch.Tensor, files: tuple[TensorFile, TensorFile],
                 device: torch.device) -> torch.Tensor:
    if base.shape != tuned.shape:
        raise OrthoLoraError(f"{t.ckpt_key} is {tuple(tuned.shape)} in the tuned file but "
                             f"{tuple(base.shape)} in the base", files[1].path)
    for w, f in zip((base, tuned), files):
        check_finite(w, t.ckpt_key, f.path)
    return rows_of(tuned, t.rows).to(device, torch.float32) - rows_of(base, t.rows).to(device, torch.float32)


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
    pairs = read_ahead(base, tuned, [t.ckpt_key for t in todo])
    for i, t in enumerate(todo):
        d = _layer_delta(t, *next(pairs), (base, tuned), dev)
        peak = float(d.abs().max()) if d.numel() else 0.0
        row = report.add(Row(t.name, extra={"block": t.block, "shape": "×".join(map(str, t.shape))}))
        if peak <= skip:
            row.status, row.note = Status.SKIPPED, f"unchanged: max|ΔW| = {peak:.3g} ≤ {skip:g}"
        else:
            layer_policy = conv_policy if (conv_policy and t.kernel > 1) else policy
            lr, err = decompose(d, t.shape, layer_policy, svd)
            out[t.name] = LowRank(lr.up.cpu(), lr.down.cpu(), lr.scale, lr.shape)
            row.rank, row.rel_error = lr.rank, err
        if progress:
            progress(i + 1, len(todo), t.name)
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

"""One small adapter per operation, shared by the tab and the HTTP API.

Each takes the `UiConfig` and keyword options named like the CLI's (`dim`, `conv_dim`, `ratio`, …),
where files are names from the models folders (see `folders.Folders`), and returns the core's
`Report`. Bad input raises `OrthoLoraError`. The annotations are what the API checks JSON bodies
against, so keep them to str / int / float / bool / list[...] / None unions."""
from __future__ import annotations

import importlib
import math
from typing import Callable

import torch

from ..errors import OrthoLoraError
from ..progress import Progress
from ..report import Report
from .config import DEVICES, DTYPES, UiConfig
from .folders import OVERWRITE_HINT, Folders

TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
SVD_METHODS = ("auto", "exact", "randomized")
ARCHS = ("sd15", "sd2", "sdxl")


def _choice(value, allowed: tuple[str, ...], what: str) -> str:
    if value not in allowed:
        raise OrthoLoraError(f"{what} must be one of {', '.join(allowed)}, got {value!r}")
    return value


def _dtype(cfg: UiConfig, value: str | None, keep: bool = False) -> torch.dtype | None:
    """Output dtype: a name of DTYPES, or None/"" for the settings default ("keep" where allowed)."""
    if keep and value in (None, "", "keep"):
        return None
    name = value or cfg.current_defaults().dtype
    return TORCH_DTYPES[_choice(name, DTYPES, "dtype")]


def _policy_text(cfg: UiConfig, value) -> str:
    text = "" if value is None else str(value).strip()
    return text or cfg.current_defaults().rank_policy


def _ratios(value, what: str):
    """A number, a list of numbers, or text like "1, 0.5" → float or list of floats (None stays)."""
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, str):
        parts = [p for p in value.replace(";", ",").replace(" ", ",").split(",") if p]
        try:
            value = [float(p) for p in parts]
        except ValueError:
            raise OrthoLoraError(f"{what}s must be numbers separated by commas, got {value!r}") from None
    values = [value] if isinstance(value, (int, float)) else list(value)
    if not values or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                             for v in values):
        raise OrthoLoraError(f"{what}s must be finite numbers, got {value!r}")
    return float(values[0]) if len(values) == 1 else [float(v) for v in values]


def extract(cfg: UiConfig, *, base: str, tuned: str, out: str, dim: str | int | None = None,
            conv_dim: str | int | None = None, no_conv: bool = False, skip: float = 1e-6, svd: str = "auto",
            device: str | None = None, dtype: str | None = None, overwrite: bool = False,
            progress: Progress | None = None) -> Report:
    """Base + tuned checkpoint → LoRA in the LoRA folder."""
    from ..extract import extract_lora
    from ..rank import parse_policy

    f = Folders(cfg)
    base_path, tuned_path = f.checkpoint(base), f.checkpoint(tuned)
    if base_path == tuned_path:
        raise OrthoLoraError("base and tuned are the same file", base_path)
    out_path = f.lora_output(out, overwrite)
    conv_text = "" if conv_dim is None else str(conv_dim).strip()
    if not (isinstance(skip, (int, float)) and math.isfinite(skip) and skip >= 0):
        raise OrthoLoraError(f"skip must be a number ≥ 0, got {skip!r}")
    return extract_lora(base_path, tuned_path, parse_policy(_policy_text(cfg, dim)), save_path=out_path,
                        conv_dim=parse_policy(conv_text) if conv_text else None, conv=not no_conv,
                        skip=float(skip), device=_choice(device or cfg.current_defaults().device, DEVICES, "device"),
                        svd=_choice(svd, SVD_METHODS, "svd"), dtype=_dtype(cfg, dtype),
                        overwrite=overwrite, progress=progress)


def merge(cfg: UiConfig, *, base: str, loras: list[str], out: str, multiplier: float | list[float] | str = 1.0,
          dtype: str | None = None, overwrite: bool = False, progress: Progress | None = None) -> Report:
    """LoRA(s) → a new checkpoint in the (first) checkpoint folder; dtype None/"keep" keeps each tensor's."""
    from ..merge import merge_lora

    f = Folders(cfg)
    base_path, lora_paths = f.checkpoint(base), f.lora_list(loras)
    out_path = f.checkpoint_output(out, overwrite)
    mult = _ratios(multiplier, "multiplier")
    return merge_lora(base_path, lora_paths, 1.0 if mult is None else mult, out_path,
                      dtype=_dtype(cfg, dtype, keep=True), overwrite=overwrite, progress=progress)


def join(cfg: UiConfig, *, loras: list[str], out: str, ratio: float | list[float] | str | None = None,
         names: list[str] | str | None = None, dtype: str | None = None, overwrite: bool = False,
         progress: Progress | None = None) -> Report:
    """Exact join (rank concatenation, slices recorded for `v=` toggles)."""
    from ..join import join_loras

    f = Folders(cfg)
    paths = f.lora_list(loras)
    out_path = f.lora_output(out, overwrite)
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()] or None
    return join_loras(paths, out_path, _ratios(ratio, "ratio"), names=names or None, dtype=_dtype(cfg, dtype),
                      overwrite=overwrite, progress=progress)


def mix(cfg: UiConfig, *, loras: list[str], out: str, rank: str | int | None = None,
        ratio: float | list[float] | str | None = None, dtype: str | None = None, overwrite: bool = False,
        progress: Progress | None = None) -> Report:
    """Weighted merge recompressed to a rank policy (default: the settings' rank policy)."""
    from ..mix import mix_loras

    f = Folders(cfg)
    paths = f.lora_list(loras)
    out_path = f.lora_output(out, overwrite)
    return mix_loras(paths, out_path, _policy_text(cfg, rank), _ratios(ratio, "ratio"), dtype=_dtype(cfg, dtype),
                     overwrite=overwrite, progress=progress)


def diag(cfg: UiConfig, *, lora: str, spec: str, out: str, keep_zero: bool = False, dtype: str | None = None,
         overwrite: bool = False, progress: Progress | None = None) -> Report:
    """Bake a per-rank / per-slice diag into a new LoRA (the input's dtype unless given)."""
    from ..join import bake_diag

    f = Folders(cfg)
    path = f.lora(lora)
    out_path = f.lora_output(out, overwrite)
    return bake_diag(path, spec, out_path, drop_zero=not keep_zero, dtype=_dtype(cfg, dtype, keep=True),
                     overwrite=overwrite, progress=progress)


def ortho(cfg: UiConfig, *, loras: list[str], write: bool = True, prefix: str = "ortho", directions: int = 2,
          no_residuals: bool = False, global_lambda: bool = False, rank: str | int | None = None,
          dtype: str | None = None, overwrite: bool = False, progress: Progress | None = None) -> Report:
    """Shared / secondary directions and residuals of K ≥ 2 LoRAs (written with `write`), and the
    alignment report (`report.data` holds the K×K matrices)."""
    from ..ortho import ortho_lora
    from ..rank import parse_policy

    f = Folders(cfg)
    paths = f.lora_list(loras)
    if isinstance(directions, bool) or not isinstance(directions, int):
        raise OrthoLoraError(f"directions must be a whole number, got {directions!r}")
    rank_text = "" if rank is None else str(rank).strip()
    return ortho_lora(paths, cfg.lora_dir if write else None, directions=directions,
                      residuals=not no_residuals, global_lambda=global_lambda,
                      policy=parse_policy(rank_text) if rank_text else None, dtype=_dtype(cfg, dtype),
                      prefix=f.lora_prefix(prefix or "ortho"), overwrite=overwrite, progress=progress)


def inspect(cfg: UiConfig, *, file: str, arch: str | None = None, full_metadata: bool = True,
            progress: Progress | None = None) -> Report:
    """Per-module and per-block summary of a LoRA of the LoRA folder."""
    from ..inspect import inspect_lora

    path = Folders(cfg).lora(file)
    if arch in ("", "auto"):
        arch = None
    if arch is not None:
        _choice(arch, ARCHS, "arch")
    report = inspect_lora(path, arch, full_metadata=full_metadata)
    if progress:
        progress(1, 1, path.name)
    return report


def resize_available() -> bool:
    """Whether the core has its resize module (older cores: the tab shows a note instead)."""
    try:
        importlib.import_module("lib_ortholora.resize")
    except ImportError:
        return False
    return True


def resize(cfg: UiConfig, *, loras: list[str] | str, recipes: str, ckpt: str | None = None, arch: str | None = None,
           dtype: str | None = None, overwrite: bool = False, progress: Progress | None = None) -> Report:
    """Resize LoRAs with recipes (`sv_fro=0.99`, `rank=16`, `spn_ckpt=1,thr=-1.2`, several separated by
    ':'); outputs `<stem>_<recipe tag>` in the LoRA folder. `ckpt`: the base checkpoint that the
    *_ckpt / subspace scores need. Some files failing leaves warnings; all failing is an error."""
    if not resize_available():
        raise OrthoLoraError("resize is not available in this version of the toolbox")
    core = importlib.import_module("lib_ortholora.resize")
    from ..scores import parse_recipes

    f = Folders(cfg)
    paths = f.lora_list(loras)
    parsed = parse_recipes(recipes)
    base = f.checkpoint(ckpt) if ckpt not in (None, "") else None
    needs = [r.text for r in parsed if r.uses_ckpt]
    if needs and base is None:
        raise OrthoLoraError(f"recipe {needs[0]} needs the base checkpoint; choose one")
    if arch in ("", "auto"):
        arch = None
    if arch is not None:
        _choice(arch, ARCHS, "arch")
    for path in paths:
        for recipe in parsed:
            target = core.output_path(cfg.lora_dir, path.stem, recipe)
            if target.exists() and not overwrite:
                raise OrthoLoraError(f"exists; {OVERWRITE_HINT}", target)
    cfg.lora_dir.mkdir(parents=True, exist_ok=True)
    report = core.resize_files(paths, cfg.lora_dir, parsed, base, arch=arch, dtype=_dtype(cfg, dtype),
                               overwrite=overwrite, progress=progress)
    if report.totals.get("failed") and not report.outputs:
        raise OrthoLoraError(report.warnings[0] if report.warnings else "every LoRA failed to resize")
    return report


OPERATIONS: dict[str, Callable[..., Report]] = {
    "extract": extract, "merge": merge, "join": join, "mix": mix, "resize": resize, "ortho": ortho,
    "inspect": inspect, "diag": diag,
}

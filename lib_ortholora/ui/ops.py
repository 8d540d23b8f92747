"""One small adapter per operation, shared by the tab and the HTTP API.

Each takes the `UiConfig` and keyword options named like the library's parameters and the CLI's
long options (`rank`, `conv_rank`, `ratio`, …; a CLI `--no-X` flag is `X: false`), where files are
names from the models folders (see `folders.Folders`), and returns the core's `Report`. Bad input
raises `OrthoLoraError`; outputs follow the core's policy (`outputs`: an existing file is
`OutputExists` unless `overwrite`). The annotations are what the API checks JSON bodies against,
so keep them to str / int / float / bool / list[...] / None unions."""
from __future__ import annotations

import math
from typing import Callable

import torch

from ..arguments import choice, output_dtype
from ..errors import OrthoLoraError
from ..progress import Progress
from ..report import Report
from .config import DEVICES, UiConfig
from .folders import Folders


def _dtype(cfg: UiConfig, value: str | None, keep: bool = False) -> torch.dtype | None:
    """Output dtype: a name of DTYPES, or None/"" for the settings default ("keep" where allowed)."""
    if keep and value in (None, "", "keep"):
        return None
    return output_dtype(value or cfg.current_defaults().dtype)


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


def extract(cfg: UiConfig, *, base: str, tuned: str, out: str, rank: str | int | None = None,
            conv_rank: str | int | None = None, conv: bool = True, skip: float = 1e-6, svd: str = "auto",
            device: str | None = None, dtype: str | None = None, prediction: str = "auto",
            overwrite: bool = False, progress: Progress | None = None) -> Report:
    """Base + tuned checkpoint → LoRA in the LoRA folder (`prediction`: epsilon, v, or auto-detected)."""
    from ..extract import extract_lora

    f = Folders(cfg)
    base_path, tuned_path = f.checkpoint(base), f.checkpoint(tuned)
    if base_path == tuned_path:
        raise OrthoLoraError("base and tuned are the same file", base_path)
    conv_text = "" if conv_rank is None else str(conv_rank).strip()
    return extract_lora(base_path, tuned_path, _policy_text(cfg, rank), save_path=f.lora_output(out),
                        conv_rank=conv_text or None, conv=conv, skip=skip,
                        device=choice(device or cfg.current_defaults().device, DEVICES, "device"),
                        svd=svd, dtype=_dtype(cfg, dtype), prediction=prediction, overwrite=overwrite,
                        progress=progress)


def merge(cfg: UiConfig, *, base: str, loras: list[str], out: str, multiplier: float | list[float] | str = 1.0,
          dtype: str | None = None, overwrite: bool = False, progress: Progress | None = None) -> Report:
    """LoRA(s) → a new checkpoint in the (first) checkpoint folder; dtype None/"keep" keeps each tensor's."""
    from ..merge import merge_lora

    f = Folders(cfg)
    base_path, lora_paths = f.checkpoint(base), f.lora_list(loras)
    mult = _ratios(multiplier, "multiplier")
    return merge_lora(base_path, lora_paths, 1.0 if mult is None else mult, f.checkpoint_output(out),
                      dtype=_dtype(cfg, dtype, keep=True), overwrite=overwrite, progress=progress)


def join(cfg: UiConfig, *, loras: list[str], out: str, ratio: float | list[float] | str | None = None,
         names: list[str] | str | None = None, dtype: str | None = None, overwrite: bool = False,
         progress: Progress | None = None) -> Report:
    """Exact join (rank concatenation, slices recorded for `v=` toggles)."""
    from ..join import join_loras

    f = Folders(cfg)
    paths = f.lora_list(loras)
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()] or None
    return join_loras(paths, f.lora_output(out), _ratios(ratio, "ratio"), names=names or None,
                      dtype=_dtype(cfg, dtype), overwrite=overwrite, progress=progress)


def mix(cfg: UiConfig, *, loras: list[str], out: str, rank: str | int | None = None,
        ratio: float | list[float] | str | None = None, dtype: str | None = None, overwrite: bool = False,
        progress: Progress | None = None) -> Report:
    """Weighted merge recompressed to a rank policy (default: the settings' rank policy)."""
    from ..mix import mix_loras

    f = Folders(cfg)
    paths = f.lora_list(loras)
    return mix_loras(paths, f.lora_output(out), _policy_text(cfg, rank), _ratios(ratio, "ratio"),
                     dtype=_dtype(cfg, dtype), overwrite=overwrite, progress=progress)


def diag(cfg: UiConfig, *, lora: str, spec: str, out: str, keep_zero: bool = False, dtype: str | None = None,
         overwrite: bool = False, progress: Progress | None = None) -> Report:
    """Bake a per-rank / per-slice diag into a new LoRA (the input's dtype unless given)."""
    from ..diag import bake_diag

    f = Folders(cfg)
    return bake_diag(f.lora(lora), spec, f.lora_output(out), keep_zero=keep_zero, dtype=_dtype(cfg, dtype, keep=True),
                     overwrite=overwrite, progress=progress)


def ortho(cfg: UiConfig, *, loras: list[str], write: bool = True, prefix: str = "ortho", directions: int = 2,
          residuals: bool = True, global_lambda: bool = False, rank: str | int | None = None,
          dtype: str | None = None, overwrite: bool = False, progress: Progress | None = None) -> Report:
    """Shared / secondary directions and residuals of K ≥ 2 LoRAs (written with `write`), and the
    alignment report (`report.data` holds the K×K matrices)."""
    from ..ortho import ortho_lora

    f = Folders(cfg)
    paths = f.lora_list(loras)
    rank_text = "" if rank is None else str(rank).strip()
    return ortho_lora(paths, cfg.lora_dir if write else None, directions=directions, residuals=residuals,
                      global_lambda=global_lambda, rank=rank_text or None, dtype=_dtype(cfg, dtype),
                      prefix=f.lora_prefix(prefix or "ortho"), overwrite=overwrite, progress=progress)


def inspect(cfg: UiConfig, *, file: str, arch: str | None = None, full_metadata: bool = True,
            progress: Progress | None = None) -> Report:
    """Per-module and per-block summary of a LoRA of the LoRA folder."""
    from ..inspect import inspect_lora

    path = Folders(cfg).lora(file)
    return inspect_lora(path, None if arch in ("", "auto") else arch, full_metadata=full_metadata, progress=progress)


def resize(cfg: UiConfig, *, loras: list[str] | str, recipes: str, ckpt: str | None = None, arch: str | None = None,
           dtype: str | None = None, overwrite: bool = False, progress: Progress | None = None) -> Report:
    """Resize LoRAs with recipes (`sv_fro=0.99`, `rank=16`, `spn_ckpt=1,thr=-1.2`, several separated by
    ':'); outputs `<stem>_<recipe tag>` in the LoRA folder. `ckpt`: the base checkpoint that the
    *_ckpt / subspace scores need. All or nothing: any file failing leaves no output."""
    from ..resize import resize_files
    from ..scores import parse_recipes

    f = Folders(cfg)
    paths = f.lora_list(loras)
    parsed = parse_recipes(recipes)
    base = f.checkpoint(ckpt) if ckpt not in (None, "") else None
    needs = [r.text for r in parsed if r.uses_ckpt]
    if needs and base is None:
        raise OrthoLoraError(f"recipe {needs[0]} needs the base checkpoint; choose one")
    return resize_files(paths, cfg.lora_dir, parsed, base, arch=None if arch in ("", "auto") else arch,
                        dtype=_dtype(cfg, dtype), overwrite=overwrite, progress=progress)


OPERATIONS: dict[str, Callable[..., Report]] = {
    "extract": extract, "merge": merge, "join": join, "mix": mix, "resize": resize, "ortho": ortho,
    "inspect": inspect, "diag": diag,
}

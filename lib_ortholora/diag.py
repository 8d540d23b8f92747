"""Diag vectors: rescaling a LoRA's rank axis, dW = scale · up · diag(v) · down
(docs/formats.md#diag); on a joined LoRA (`joinmeta`) they toggle its sources' slices.

- ``parse_diag(text)``: the user's spec, one of two forms, items separated by ',' only
  (inside a webui prompt ':' separates the tag's items, so a spec never contains ':'):
    * per rank:  ``1,1,0,0.5`` with repetition ``1*8,0*4`` (floats, negatives allowed);
    * per slice: ``disney=1,krk=0`` -- or ``disney@1,krk@0``, the form to use inside a webui
      prompt, where an item holding a second '=' is taken as a positional multiplier by the
      built-in LoRA runtime and breaks the batch. Sources not named keep 1.
  Whitespace around items, names, '*', '=' and '@' is ignored. Anything else is an
  ``OrthoLoraError``; nothing else escapes.
- ``layout_vector`` / ``diag_vector`` / ``layout_vectors``: the float32 vector of one slice layout,
  of one module, of every layout of a ``SliceIndex`` (one per layout, shared by its modules).
- ``apply_diag_to_up(up, v)``: up's columns scaled by v (2-D [out, r] or kohya 4-D [out, r, 1, 1]);
  ``apply_diag`` / ``drop_zero_ranks`` on a ``LowRank``.
- ``bake_diag``: the operation, a file with a spec baked in.

The runtime hook (scripts/ortholora_hook.py) is a thin adapter over the pure parts.
"""
from __future__ import annotations

import itertools
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from . import arguments, prediction
from .arch import Arch
from .errors import OrthoLoraError, quote
from .fileio import open_tensors
from .joinmeta import (META_KEY, RESERVED_NAME_CHARS, JoinInfo, JoinSource, SliceIndex, join_info_from_metadata,
                       make_join_metadata, safe_source_name)
from .lorafile import carried_metadata, read_lora, write_lora
from .lowrank import LowRank
from .paths import PathLike
from .progress import Progress
from .report import Report, Row, Status
from .run import Run

MAX_DIAG_LENGTH = 65536
"""Longest per-rank vector a spec may expand to (guards against `1*999999999`)."""
MAX_SPEC_CHARS = 100_000

_FLOAT = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?", re.ASCII)
_COUNT = re.compile(r"\d{1,6}", re.ASCII)


@dataclass(frozen=True)
class DiagSpec:
    """A parsed spec. ``kind`` is "rank" (``values``) or "slice" (``slices``: (name, value) pairs)."""

    kind: str
    values: tuple[float, ...] = ()
    slices: tuple[tuple[str, float], ...] = ()

    def _items(self, assign: str) -> str:
        if self.kind == "slice":
            return ",".join(f"{n}{assign}{_fmt(x)}" for n, x in self.slices)
        out, i = [], 0
        while i < len(self.values):
            j = i
            while j + 1 < len(self.values) and self.values[j + 1] == self.values[i]:
                j += 1
            run = j - i + 1
            out.append(_fmt(self.values[i]) + (f"*{run}" if run > 1 else ""))
            i = j + 1
        return ",".join(out)

    @property
    def text(self) -> str:
        """Canonical text (runs compressed, per-slice written ``name=value``); parses back to self."""
        return self._items("=")

    @property
    def prompt_text(self) -> str:
        """Canonical text safe inside a webui prompt tag (per-slice written ``name@value``)."""
        return self._items("@")

    def __str__(self) -> str:
        return self.text


def _fmt(x: float) -> str:
    return f"{x:g}" if float(f"{x:g}") == x else repr(x)


def _parse_float(text: str, where: str) -> float:
    t = text.strip()
    if not _FLOAT.fullmatch(t):
        raise OrthoLoraError(f"diag spec: {where} {quote(t)} is not a number")
    x = float(t)
    if not math.isfinite(x):
        raise OrthoLoraError(f"diag spec: {where} {quote(t)} is not a finite number")
    return x


def parse_diag(spec: str) -> DiagSpec:
    """Parse a per-rank or per-slice spec (see the module doc). Bad input → OrthoLoraError."""
    if not isinstance(spec, str):
        raise OrthoLoraError(f"diag spec must be text, got {type(spec).__name__}")
    if len(spec) > MAX_SPEC_CHARS:
        raise OrthoLoraError(f"diag spec is too long ({len(spec)} characters)")
    text = spec.strip()
    if not text:
        raise OrthoLoraError("diag spec is empty")
    if ":" in text:
        raise OrthoLoraError(f"diag spec {quote(text)} contains ':'; separate items with ','")
    items = [s.strip() for s in text.split(",")]
    if any(not s for s in items):
        raise OrthoLoraError(f"diag spec {quote(text)} has an empty item")

    named = [("=" in s or "@" in s) for s in items]
    if any(named) and not all(named):
        raise OrthoLoraError(f"diag spec {quote(text)} mixes per-slice (name=value) and per-rank items")

    if all(named):
        slices: list[tuple[str, float]] = []
        seen: set[str] = set()
        for item in items:
            cut = min(i for i in (item.find("="), item.find("@")) if i >= 0)
            name, value = item[:cut].strip(), item[cut + 1:]
            if not name:
                raise OrthoLoraError(f"diag spec item {quote(item)} has no source name")
            if any(c in name for c in RESERVED_NAME_CHARS):
                raise OrthoLoraError(f"diag spec item {quote(item)}: bad source name {quote(name)}")
            if name in seen:
                raise OrthoLoraError(f"diag spec names source {quote(name)} twice")
            seen.add(name)
            slices.append((name, _parse_float(value, f"value of {name!r}")))
        return DiagSpec("slice", slices=tuple(slices))

    values: list[float] = []
    for item in items:
        if "*" in item:
            value, _, count = item.partition("*")
            count = count.strip()
            if not _COUNT.fullmatch(count):
                raise OrthoLoraError(f"diag spec item {quote(item)}: repeat count must be a whole number")
            n = int(count)
            if n < 1:
                raise OrthoLoraError(f"diag spec item {quote(item)}: repeat count must be at least 1")
        else:
            value, n = item, 1
        x = _parse_float(value, "value")
        if len(values) + n > MAX_DIAG_LENGTH:
            raise OrthoLoraError(f"diag spec expands to more than {MAX_DIAG_LENGTH} values")
        values.extend([x] * n)
    return DiagSpec("rank", values=tuple(values))


# --------------------------------------------------------------------------- vectors


def _plus(ranks: Iterable[int]) -> str:
    return "+".join(str(r) for r in ranks)


def _slice_values(spec: DiagSpec, info: JoinInfo) -> list[float]:
    """A per-slice spec's value for each source, in source order (1 where not named)."""
    value_of = dict(spec.slices)
    unknown = [n for n in value_of if n not in info.names]
    if unknown:
        raise OrthoLoraError(
            f"diag spec names unknown source(s) {', '.join(unknown)}; this LoRA joins {', '.join(info.names)}")
    return [float(value_of.get(n, 1.0)) for n in info.names]


def layout_vector(spec: DiagSpec, info: JoinInfo, ranks: tuple[int, ...], module: str) -> torch.Tensor:
    """The float32 vector of a module whose per-source ranks are ``ranks`` (``module`` names it in errors).

    Per slice: source i's value repeated r_i times. Per rank (n values): the values as they are when
    n = Σ r_i; otherwise, when n = Σ R_i (R = ``info.full_ranks``), v is read as one block of R_i
    values per source: a source the module lacks (r_i = 0) is skipped, a full one (r_i = R_i) takes
    its block, a partial one (0 < r_i < R_i) takes its block's value if the block is constant (which
    r_i of the R_i values were meant is otherwise unknown: refused). Anything else is refused.
    """
    if spec.kind == "slice":
        return torch.tensor([x for x, r in zip(_slice_values(spec, info), ranks) for _ in range(r)],
                            dtype=torch.float32)
    n, total, full = len(spec.values), sum(ranks), info.full_ranks
    if n == total:
        return torch.tensor(spec.values, dtype=torch.float32)
    if n != sum(full):
        raise OrthoLoraError(
            f"diag vector has {n} values but module {module} has rank {total} ({_plus(ranks)}); a per-rank v "
            f"needs the module's rank or the sources' full ranks {_plus(full)} = {sum(full)}")
    parts: list[float] = []
    start = 0
    for name, r, whole in zip(info.names, ranks, full):
        block = spec.values[start:start + whole]
        start += whole
        if r == whole:
            parts.extend(block)
        elif r:
            if len(set(block)) > 1:
                raise OrthoLoraError(
                    f"module {module} has {r} of source {name}'s {whole} ranks and v varies over that source's "
                    f"ranks; give that source one value (or use per-slice name=value)")
            parts.extend(block[:1] * r)
    return torch.tensor(parts, dtype=torch.float32)


def diag_vector(spec: DiagSpec | None, info: JoinInfo, module: str) -> torch.Tensor | None:
    """The float32 diag vector of ``module`` (length Σ r_i, see ``layout_vector``); None when ``spec`` is None."""
    if spec is None:
        return None
    return layout_vector(spec, info, info.module_ranks(module), module)


def layout_vectors(spec: DiagSpec, index: SliceIndex) -> list[torch.Tensor]:
    """One vector per group of ``index``, in its order; OrthoLoraError names a module that cannot take ``spec``."""
    return [layout_vector(spec, index.info, layout, names[0]) for layout, names in index.groups]


def apply_diag_to_up(up: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``up`` with column j multiplied by v[j] (up [out, r] or [out, r, 1, 1]); keeps up's dtype.

    Computed in float32 (or wider when up is wider), so dW = up·diag(v)·down·scale.
    """
    if up.dim() < 2:
        raise OrthoLoraError(f"lora_up must have at least 2 dimensions, got shape {tuple(up.shape)}")
    if v.dim() != 1 or v.shape[0] != up.shape[1]:
        raise OrthoLoraError(f"diag vector of shape {tuple(v.shape)} does not match lora_up of shape {tuple(up.shape)}")
    work = torch.promote_types(up.dtype, torch.float32) if up.is_floating_point() else torch.float32
    view = v.to(device=up.device, dtype=work).reshape(1, -1, *([1] * (up.dim() - 2)))
    out = up.to(work) * view
    return out.to(up.dtype) if up.is_floating_point() else out


def apply_diag(lr: LowRank, v: torch.Tensor) -> LowRank:
    """dW = scale·up·diag(v)·down: up's columns multiplied by v."""
    return LowRank(apply_diag_to_up(lr.up.float(), v), lr.down, lr.scale, lr.shape)


def drop_zero_ranks(lr: LowRank, v: torch.Tensor, ranks: Sequence[int]) -> tuple[LowRank, list[int]]:
    """Remove the directions where v = 0 (exact: they contribute nothing); per-slice ranks updated."""
    keep = v != 0
    bounds = [0, *itertools.accumulate(ranks)]
    new_ranks = [int(keep[a:b].sum()) for a, b in zip(bounds, bounds[1:])]
    return LowRank(lr.up[:, keep], lr.down[keep], lr.scale, lr.shape), new_ranks


# --------------------------------------------------------------------------- the operation


def _stored_dtype(path: Path) -> torch.dtype:
    """The dtype of the first floating tensor of a file."""
    with open_tensors(path) as f:
        return next((f.dtype(k) for k in f.keys() if f.dtype(k).is_floating_point), torch.float16)


def bake_diag(lora_path: PathLike, spec: str | DiagSpec, save_path: PathLike, *, keep_zero: bool = False,
              dtype: torch.dtype | None = None, overwrite: bool = False, progress: Progress | None = None) -> Report:
    """Write a LoRA with a diag spec baked in (up's columns × v). A per-slice spec needs a joined
    LoRA; a per-rank spec also works on a plain one (every module's rank must match). Directions
    with v = 0 leave the file (and the slices metadata shrinks to match) unless `keep_zero`."""
    path, save_path = arguments.path(lora_path, "lora_path"), arguments.path(save_path, "save_path")
    if isinstance(spec, str):
        spec = parse_diag(spec)
    keep_zero = arguments.flag(keep_zero, "keep_zero")
    dtype = None if dtype is None else arguments.output_dtype(dtype)
    with Run("diag", progress) as run:
        run.claim([save_path], inputs=[path], overwrite=overwrite)
        read = run.phase("read", 1)
        lf = read_lora(path)
        read.step(path.name)
        if lf.arch is None:
            raise OrthoLoraError("no module name matches SD1, SD2 or SDXL layers", path)
        lowranks = lf.lowranks()
        try:
            info = join_info_from_metadata(lf.metadata) or JoinInfo(
                (JoinSource(safe_source_name(lf.stem), path.name, 1.0),), {n: (lr.rank,) for n, lr in lowranks.items()})
        except OrthoLoraError as e:
            raise OrthoLoraError(e.problem, path) from None
        report = run.report
        out, ranks = {}, {}
        bake = run.phase("bake", len(lowranks))
        for name, lr in lowranks.items():
            bake.step(name)
            try:
                v = diag_vector(spec, info, name)
                if info.total_rank(name) != lr.rank:
                    raise OrthoLoraError(f"module {name} has rank {lr.rank} but the join metadata says "
                                         f"{info.total_rank(name)}")
            except OrthoLoraError as e:
                raise OrthoLoraError(e.problem, path) from None
            baked, r = apply_diag(lr, v), list(info.module_ranks(name))
            if not keep_zero:
                baked, r = drop_zero_ranks(baked, v, r)
            if baked.rank == 0:
                report.add(Row(name, Status.DROPPED, old_rank=lr.rank, rank=0))
                continue
            out[name], ranks[name] = baked, r
            report.add(Row(name, old_rank=lr.rank, rank=baked.rank, extra={"slices": "+".join(map(str, r))}))
        if not out:
            raise OrthoLoraError(f"diag {spec.text} leaves nothing: every direction is 0", path)
        extra = {**carried_metadata(lf.metadata, lf.arch), "ortholora_diag": spec.text}
        report.totals["architecture"] = Arch(lf.arch).title
        if META_KEY in lf.metadata:
            used = [i for i in range(len(info.sources)) if any(r[i] for r in ranks.values())]
            extra[META_KEY] = make_join_metadata([info.sources[i] for i in used],
                                                 {n: [r[i] for i in used] for n, r in ranks.items()})
            report.totals["sources_kept"] = ", ".join(info.sources[i].name for i in used)
        write = run.phase("write", 1)
        write_lora(save_path, out, lf.arch, dtype or _stored_dtype(path), extra, overwrite,
                   prediction.common([lf.metadata]))
        write.step(save_path.name)
        report.totals.update({"diag": spec.text, "modules": len(out), "dropped": report.count(Status.DROPPED)})
    return run.report

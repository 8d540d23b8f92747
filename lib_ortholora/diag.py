"""Per-rank / per-slice diag vectors for joined LoRAs (docs/formats.md#diag, docs/formats.md#join-metadata).

A joined LoRA stores, for every module, the concatenation of its sources' rank axes. A diag
vector v rescales that axis: dW = up · diag(v) · down · scale. This module holds the pure parts:

- ``parse_diag(text)``: the user's spec, one of two forms, items separated by ',' only
  (inside a webui prompt ':' separates the tag's items, so a spec never contains ':'):
    * per rank:  ``1,1,0,0.5`` with repetition ``1*8,0*4`` (floats, negatives allowed);
    * per slice: ``disney=1,krk=0`` -- or ``disney@1,krk@0``, the form to use inside a webui
      prompt, where an item holding a second '=' is taken as a positional multiplier by the
      built-in LoRA runtime and breaks the batch. Sources not named keep 1.
  Whitespace around items, names, '*', '=' and '@' is ignored. Anything else is an
  ``OrthoLoraError``; nothing else escapes.
- ``JoinInfo`` / ``join_info_from_metadata`` / ``make_join_metadata``: the ``ortholora_join``
  metadata (JSON) the join writes and the runtime hook reads.
- ``diag_vector(spec, info, module)``: the float32 vector for one module; ``SliceIndex``: a
  joined file's modules grouped by slice layout once, so a spec costs one vector per layout.
- ``apply_diag_to_up(up, v)``: up's columns scaled by v (2-D [out, r] or kohya 4-D [out, r, 1, 1]).

No webui import here; the hook (scripts/ortholora_hook.py) is a thin adapter over these.
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property

import torch

from .errors import OrthoLoraError

META_KEY = "ortholora_join"
"""safetensors metadata key that marks a joined LoRA."""

JOIN_VERSION = 1
MAX_DIAG_LENGTH = 65536
"""Longest per-rank vector a spec may expand to (guards against `1*999999999`)."""
MAX_SPEC_CHARS = 100_000
RESERVED_NAME_CHARS = ",=@:*<>"
"""Characters a source name cannot contain (they are syntax in a spec or a prompt)."""

_FLOAT = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?", re.ASCII)
_COUNT = re.compile(r"\d{1,6}", re.ASCII)


def _short(text: str, limit: int = 60) -> str:
    text = " ".join(text.split())
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


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
        raise OrthoLoraError(f"diag spec: {where} {_short(t)} is not a number")
    x = float(t)
    if not math.isfinite(x):
        raise OrthoLoraError(f"diag spec: {where} {_short(t)} is not a finite number")
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
        raise OrthoLoraError(f"diag spec {_short(text)} contains ':'; separate items with ','")
    items = [s.strip() for s in text.split(",")]
    if any(not s for s in items):
        raise OrthoLoraError(f"diag spec {_short(text)} has an empty item")

    named = [("=" in s or "@" in s) for s in items]
    if any(named) and not all(named):
        raise OrthoLoraError(f"diag spec {_short(text)} mixes per-slice (name=value) and per-rank items")

    if all(named):
        slices: list[tuple[str, float]] = []
        seen: set[str] = set()
        for item in items:
            cut = min(i for i in (item.find("="), item.find("@")) if i >= 0)
            name, value = item[:cut].strip(), item[cut + 1:]
            if not name:
                raise OrthoLoraError(f"diag spec item {_short(item)} has no source name")
            if any(c in name for c in RESERVED_NAME_CHARS):
                raise OrthoLoraError(f"diag spec item {_short(item)}: bad source name {_short(name)}")
            if name in seen:
                raise OrthoLoraError(f"diag spec names source {_short(name)} twice")
            seen.add(name)
            slices.append((name, _parse_float(value, f"value of {name!r}")))
        return DiagSpec("slice", slices=tuple(slices))

    values: list[float] = []
    for item in items:
        if "*" in item:
            value, _, count = item.partition("*")
            count = count.strip()
            if not _COUNT.fullmatch(count):
                raise OrthoLoraError(f"diag spec item {_short(item)}: repeat count must be a whole number")
            n = int(count)
            if n < 1:
                raise OrthoLoraError(f"diag spec item {_short(item)}: repeat count must be at least 1")
        else:
            value, n = item, 1
        x = _parse_float(value, "value")
        if len(values) + n > MAX_DIAG_LENGTH:
            raise OrthoLoraError(f"diag spec expands to more than {MAX_DIAG_LENGTH} values")
        values.extend([x] * n)
    return DiagSpec("rank", values=tuple(values))


# --------------------------------------------------------------------------- join metadata


@dataclass(frozen=True)
class JoinSource:
    name: str
    file: str
    ratio: float


@dataclass(frozen=True)
class JoinInfo:
    """Parsed ``ortholora_join``: sources in rank order and each module's per-source ranks."""

    sources: tuple[JoinSource, ...]
    ranks: Mapping[str, tuple[int, ...]]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.sources)

    def module_ranks(self, module: str) -> tuple[int, ...]:
        r = self.ranks.get(module)
        if r is None:
            raise OrthoLoraError(f"joined LoRA metadata has no ranks for module {module}")
        return r

    def total_rank(self, module: str) -> int:
        return sum(self.module_ranks(module))

    @cached_property
    def full_ranks(self) -> tuple[int, ...]:
        """Each source's largest rank over all modules: the blocks of a per-rank vector that does
        not match a module's own rank (see ``layout_vector``)."""
        return tuple(max(col) for col in zip(*self.ranks.values())) if self.ranks else (0,) * len(self.sources)


def safe_source_name(text: str) -> str:
    """``text`` made usable as a source name (reserved characters and whitespace runs → '_')."""
    out = "".join("_" if c in RESERVED_NAME_CHARS else c for c in str(text))
    out = "_".join(out.split())
    return out or "source"


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _join_info_from_obj(obj) -> JoinInfo:
    bad = "joined LoRA metadata (ortholora_join)"
    if not isinstance(obj, Mapping):
        raise OrthoLoraError(f"{bad} is not a JSON object")
    version = obj.get("version")
    if version != JOIN_VERSION or not _is_int(version):
        raise OrthoLoraError(f"{bad} has unsupported version {version!r} (expected {JOIN_VERSION})")
    raw_sources = obj.get("sources")
    if not isinstance(raw_sources, list) or not raw_sources:
        raise OrthoLoraError(f"{bad}: 'sources' must be a non-empty list")
    sources: list[JoinSource] = []
    for i, s in enumerate(raw_sources):
        if not isinstance(s, Mapping):
            raise OrthoLoraError(f"{bad}: source {i} is not an object")
        name, file, ratio = s.get("name"), s.get("file", ""), s.get("ratio", 1.0)
        if not isinstance(name, str) or not name or name != name.strip() \
                or any(c in name for c in RESERVED_NAME_CHARS):
            raise OrthoLoraError(f"{bad}: source {i} has a bad name {name!r}")
        if not isinstance(file, str):
            raise OrthoLoraError(f"{bad}: source {name!r} has a bad file {file!r}")
        if not _is_num(ratio):
            raise OrthoLoraError(f"{bad}: source {name!r} has a bad ratio {ratio!r}")
        sources.append(JoinSource(name, file, float(ratio)))
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise OrthoLoraError(f"{bad}: source names are not unique: {', '.join(names)}")
    raw_ranks = obj.get("ranks")
    if not isinstance(raw_ranks, Mapping):
        raise OrthoLoraError(f"{bad}: 'ranks' must be an object")
    ranks: dict[str, tuple[int, ...]] = {}
    for module, r in raw_ranks.items():
        if not isinstance(module, str) or not module:
            raise OrthoLoraError(f"{bad}: bad module name {module!r}")
        if not isinstance(r, (list, tuple)) or len(r) != len(sources) \
                or not all(_is_int(x) and x >= 0 for x in r):
            raise OrthoLoraError(f"{bad}: ranks of {module} must be {len(sources)} whole numbers >= 0")
        if sum(r) == 0:
            raise OrthoLoraError(f"{bad}: module {module} has total rank 0")
        ranks[module] = tuple(int(x) for x in r)
    return JoinInfo(tuple(sources), ranks)


def join_info_from_metadata(metadata: Mapping | None) -> JoinInfo | None:
    """The join record of a file's metadata; None when the file is not a joined LoRA.

    The value may be the JSON string as stored, or the already-decoded object (the webui decodes
    metadata strings that start with '{' when it reads a safetensors header).
    """
    if not isinstance(metadata, Mapping):
        return None
    raw = metadata.get(META_KEY)
    if raw is None:
        return None
    if isinstance(raw, (str, bytes)):
        try:
            obj = json.loads(raw)
        except (ValueError, RecursionError) as e:
            raise OrthoLoraError(f"joined LoRA metadata (ortholora_join) is not valid JSON: {e}") from None
    else:
        obj = raw
    return _join_info_from_obj(obj)


def make_join_metadata(sources: Sequence, ranks: Mapping[str, Sequence[int]]) -> str:
    """The ``ortholora_join`` string for a joined file.

    ``sources``: JoinSource objects, mappings with name/file/ratio, or (name, file, ratio) tuples,
    in rank order. ``ranks``: module → per-source ranks (0 where a source lacks the module).
    Validated exactly as the reader validates; bad input → OrthoLoraError.
    """
    rows = []
    for s in sources:
        if isinstance(s, JoinSource):
            name, file, ratio = s.name, s.file, s.ratio
        elif isinstance(s, Mapping):
            name, file, ratio = s.get("name"), s.get("file", ""), s.get("ratio", 1.0)
        elif isinstance(s, (tuple, list)) and len(s) == 3:
            name, file, ratio = s
        else:
            raise OrthoLoraError(f"join metadata: bad source {s!r}")
        if _is_num(ratio):
            ratio = float(ratio)
        rows.append({"name": name, "file": file, "ratio": ratio})
    obj = {
        "version": JOIN_VERSION,
        "sources": rows,
        "ranks": {m: [int(x) if _is_int(x) else x for x in r] if isinstance(r, (list, tuple)) else r
                  for m, r in ranks.items()},
    }
    _join_info_from_obj(obj)  # same checks as the reader
    return json.dumps(obj, separators=(",", ":"))


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


@dataclass(frozen=True)
class SliceIndex:
    """A joined LoRA's modules grouped by slice layout (their per-source ranks), built once per loaded
    file: a spec then costs one vector per distinct layout, shared by the modules of that layout."""

    info: JoinInfo
    groups: tuple[tuple[tuple[int, ...], tuple[str, ...]], ...]
    """(layout, module names) in first-seen order."""

    @classmethod
    def of(cls, info: JoinInfo, modules: Iterable[str]) -> SliceIndex:
        """Index ``modules``; OrthoLoraError when the metadata lacks one of them."""
        by_layout: dict[tuple[int, ...], list[str]] = {}
        for name in modules:
            by_layout.setdefault(info.module_ranks(name), []).append(name)
        return cls(info, tuple((layout, tuple(names)) for layout, names in by_layout.items()))

    def vectors(self, spec: DiagSpec) -> list[torch.Tensor]:
        """One vector per group, in ``groups`` order; OrthoLoraError names a module that cannot take ``spec``."""
        return [layout_vector(spec, self.info, layout, names[0]) for layout, names in self.groups]


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

"""The joined-LoRA format: the `ortholora_join` metadata record (docs/formats.md#join-metadata).

A joined file stores, for every module, the concatenation of its sources' rank axes; the record
says which sources (name, file, ratio) in rank order and each module's per-source ranks:
``{"version": 1, "sources": [{"name", "file", "ratio"}...], "ranks": {module: [r_1, r_2, ...]}}``.

- ``JoinInfo`` / ``JoinSource``: the parsed record; ``join_info_from_metadata`` reads it (from the
  JSON string as stored, or the object the webui decodes), ``make_join_metadata`` writes it, both
  with the same checks (bad input → ``OrthoLoraError``).
- ``SliceIndex``: a joined file's modules grouped by slice layout (their per-source ranks).
- ``safe_source_name``: any text made usable as a source name.

Pure: no torch, no file I/O, no webui import (the runtime hook reads this too).
"""
from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property

from .errors import OrthoLoraError

META_KEY = "ortholora_join"
"""safetensors metadata key that marks a joined LoRA."""

JOIN_VERSION = 1
RESERVED_NAME_CHARS = ",=@:*<>"
"""Characters a source name cannot contain (they are syntax in a diag spec or a prompt)."""


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


@dataclass(frozen=True)
class SliceIndex:
    """A joined LoRA's modules grouped by slice layout (their per-source ranks), built once per loaded
    file: a diag spec then costs one vector per distinct layout (``diag.layout_vectors``), shared by
    the modules of that layout."""

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

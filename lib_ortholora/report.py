"""Structured results of every operation: per-module rows plus totals, as a table or JSON."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any


class Status(str, Enum):
    """A row's outcome (a `str`, so it compares and serializes as its value)."""

    OK = "ok"                # done
    SKIPPED = "skipped"      # left out on purpose (an unchanged layer, an all-zero delta)
    DROPPED = "dropped"      # every direction of the module removed
    ZERO = "zero"            # the module holds no delta at all
    UNMATCHED = "unmatched"  # matches no layer of the checkpoint
    UNKNOWN = "unknown"      # matches no layer of the architecture

    __str__ = str.__str__
    __format__ = str.__format__


@dataclass
class Row:
    """One module's outcome."""

    module: str
    status: Status = Status.OK
    rank: int | None = None
    old_rank: int | None = None
    rel_error: float | None = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.status = Status(self.status)


@dataclass
class Report:
    """What an operation did: `rows` per module, `totals` (one vocabulary: `architecture`, `policy`,
    `seconds` and `phase_seconds` in every run, `output_mb` in every run that wrote, …), the files
    written (`outputs`), `warnings`, and plain `data` for the UI (e.g. ortho's heatmaps)."""

    operation: str
    rows: list[Row] = field(default_factory=list)
    totals: dict[str, Any] = field(default_factory=dict)
    outputs: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        return row

    def count(self, status: Status | str) -> int:
        return sum(r.status == status for r in self.rows)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, default=str)

    def columns(self) -> list[str]:
        """Columns that hold a value in at least one row (extra keys included)."""
        cols = ["module", "status"] + [c for c in ("old_rank", "rank", "rel_error")
                                       if any(getattr(r, c) is not None for r in self.rows)]
        for r in self.rows:
            cols += [k for k in r.extra if k not in cols]
        return cols + (["note"] if any(r.note for r in self.rows) else [])

    def table(self) -> list[list[str]]:
        """Rows as strings, header first (what the CLI prints and the UI shows)."""
        cols = self.columns()
        out = [cols]
        for r in self.rows:
            values = {**asdict(r), **r.extra}
            out.append([format_value(values.get(c)) for c in cols])
        return out

    def render(self, max_rows: int | None = None) -> str:
        """A plain-text table of the rows, then the totals and outputs."""
        table = self.table()
        shown = table if max_rows is None or len(table) <= max_rows + 1 else table[: max_rows + 1]
        widths = [max(len(row[i]) for row in shown) for i in range(len(table[0]))]
        lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in shown]
        if len(shown) < len(table):
            lines.append(f"… {len(table) - len(shown)} more rows (use --json for all)")
        lines += [f"{k}: {format_value(v)}" for k, v in self.totals.items()]
        lines += [f"warning: {w}" for w in self.warnings]
        lines += [f"wrote {p}" for p in self.outputs]
        return "\n".join(lines)


def format_value(v: Any) -> str:
    """A value as short text: floats to 4 significant digits, dicts as `k v, …`, lists as `a, b`."""
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict):
        return ", ".join(f"{k} {format_value(x)}" for k, x in v.items())
    if isinstance(v, (list, tuple)):
        return ", ".join(map(format_value, v))
    return str(v)

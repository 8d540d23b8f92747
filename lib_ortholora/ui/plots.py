"""Matplotlib figures for the result panels (Agg canvas, no pyplot state, safe from worker threads):
singular-value spectrum of one module, rank per block, energy per block, K×K alignment heatmaps.
Drawing only: the figures' numbers come from the core's reports and `inspect`."""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Mapping, Sequence

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..report import Report

ACCENT = "#d9480f"
MUTED = "#868e96"


def _figure(width: float = 7.0, height: float = 3.4) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


# --------------------------------------------------------------------------- spectrum

def spectrum(s: Sequence[float] | torch.Tensor, title: str, subtitle: str = "") -> Figure:
    """σ_i on a log scale, with the cumulative share of energy Σσ² on a second axis."""
    s = torch.as_tensor(s, dtype=torch.float64).flatten()
    fig = _figure()
    ax = fig.add_subplot()
    idx = list(range(1, len(s) + 1))
    positive = s.clamp_min(0)
    ax.bar(idx, positive.tolist(), color=ACCENT, width=0.8, label="σᵢ")
    if len(s) and float(positive.max()) > 0:
        ax.set_yscale("log")
    ax.set_xlabel("direction i")
    ax.set_ylabel("singular value σᵢ")
    energy = positive.square()
    total = float(energy.sum())
    if total > 0:
        twin = ax.twinx()
        twin.plot(idx, (energy.cumsum(0) / total).tolist(), color="#1c7ed6", marker=".", lw=1.2)
        twin.set_ylim(0, 1.02)
        twin.set_ylabel("cumulative energy share", color="#1c7ed6")
    ax.set_title(title if len(title) <= 70 else "…" + title[-69:], fontsize=9)
    if subtitle:
        fig.suptitle(subtitle, fontsize=8, color=MUTED)
    return fig


# --------------------------------------------------------------------------- per block

def _rows_by_block(report: Report) -> "OrderedDict[str, list[int]]":
    out: "OrderedDict[str, list[int]]" = OrderedDict()
    for r in report.rows:
        block = r.extra.get("block")
        if r.rank is None or block is None or r.status not in ("ok",):
            continue
        out.setdefault(str(block), []).append(int(r.rank))
    return out


def ranks_per_block(report: Report, title: str = "rank per block") -> Figure | None:
    """Mean rank of each block's modules, whiskers from the smallest to the largest."""
    by_block = _rows_by_block(report)
    if not by_block:
        return None
    names = list(by_block)
    means = [sum(v) / len(v) for v in by_block.values()]
    lo = [m - min(v) for m, v in zip(means, by_block.values())]
    hi = [max(v) - m for m, v in zip(means, by_block.values())]
    fig = _figure(max(6.0, 0.32 * len(names) + 2), 3.4)
    ax = fig.add_subplot()
    ax.bar(range(len(names)), means, color=ACCENT, yerr=[lo, hi], capsize=2, ecolor="#495057")
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("rank (mean, min–max)")
    ax.set_title(title, fontsize=9)
    return fig


def block_energy(energy: Mapping[str, float], title: str = "share of ‖ΔW‖² per block") -> Figure | None:
    items = [(b, float(e)) for b, e in energy.items() if e is not None]
    if not items:
        return None
    fig = _figure(max(6.0, 0.32 * len(items) + 2), 3.4)
    ax = fig.add_subplot()
    ax.bar(range(len(items)), [100 * e for _, e in items], color="#2f9e44")
    ax.set_xticks(range(len(items)), [b for b, _ in items], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("% of the LoRA's energy")
    ax.set_title(title, fontsize=9)
    return fig


# --------------------------------------------------------------------------- alignment

def _matrix(m: Sequence[Sequence[float | None]]) -> list[list[float]]:
    return [[math.nan if v is None else float(v) for v in row] for row in m]


def _short(name: str, n: int = 14) -> str:
    return name if len(name) <= n else name[: n - 1] + "…"


def alignment(scope: Mapping, loras: Sequence[str], title: str = "whole file") -> Figure:
    """Cosines between the K LoRAs before and after removing the shared direction, and each
    LoRA's energy share in the shared direction (`scope`: one entry of ortho's report data)."""
    k = len(loras)
    labels = [_short(s) for s in loras]
    fig = _figure(10.0, 3.6 + 0.15 * k)
    axes = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1, 1, 0.8]})
    image = None
    for ax, key, name in ((axes[0], "before", "cosine (inputs)"), (axes[1], "after", "cosine (residuals)")):
        m = _matrix(scope.get(key) or [[None] * k] * k)
        image = ax.imshow(m, cmap="RdBu_r", vmin=-1, vmax=1)
        ax.set_xticks(range(k), labels, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(k), labels, fontsize=7)
        ax.set_title(name, fontsize=9)
        if k <= 12:
            for i in range(k):
                for j in range(k):
                    v = m[i][j]
                    ax.text(j, i, "–" if math.isnan(v) else f"{v:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if not math.isnan(v) and abs(v) > 0.6 else "black")
    if image is not None:
        fig.colorbar(image, ax=axes[:2].tolist(), shrink=0.8)
    share = [0.0 if v is None else float(v) for v in (scope.get("share") or [None] * k)]
    axes[2].barh(range(k), share, color=ACCENT)
    axes[2].set_yticks(range(k), labels, fontsize=7)
    axes[2].invert_yaxis()
    axes[2].set_xlim(0, 1)
    axes[2].set_title("energy share in the shared direction", fontsize=9)
    fig.suptitle(f"alignment: {title}", fontsize=10)
    return fig


def alignment_scopes(data: Mapping) -> list[str]:
    """Scope labels for the selector: the whole file, then each block."""
    return ["whole file"] + [f"{b['block']} ({b['layers']} layers)" for b in data.get("blocks", [])]


def alignment_for(data: Mapping, label: str | None) -> Figure | None:
    if not data or not data.get("loras"):
        return None
    loras = data["loras"]
    for b in data.get("blocks", []):
        if label == f"{b['block']} ({b['layers']} layers)":
            return alignment(b, loras, f"block {b['block']}")
    return alignment(data.get("file") or {}, loras, "whole file")

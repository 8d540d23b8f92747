"""Resize recipes: parsing, per-direction scores and the choice of kept directions.

A layer's delta ΔW = Σ σ_i·u_i·v_iᵀ (σ descending, alpha/r included). Base-aware scores (after
elias-gaeros/resize_lora), in log10: a recipe's score of direction i is the weighted geometric mean
of σ_i over references, with the weights as written normalized to sum 1:
    log10 score_i = Σ_j w_j·log10(σ_i / ref_j) = log10 σ_i − Σ_j w_j·log10 ref_j,
    spn_ckpt: σ_max(W_base)   fro_ckpt: ‖W_base‖_F   spn_lora: σ_1   fro_lora: ‖σ‖_2 = ‖ΔW‖_F
    subspace: |u_iᵀ·W_base·v_i|   (W_base flattened to [out, in·k·k]; per direction)
A score recipe adds `thr=t` (keep score ≥ t, per layer) or `size=M` (rank every direction of every
layer by score and keep the best while their factor bytes, (out + in·k·k)·itemsize each, fit in
M MiB; the total lands less than one direction short of M; the file adds its header and alphas,
a few hundred KiB at most). Directions with σ = 0 score −∞: never kept.

kohya's methods, per layer on σ (our RankPolicy kinds), then capped by `rank=N` when given:
    sv_ratio=p       σ_i ≥ σ_1/p                              (RankPolicy sv_ratio)
    sv_fro=p         least k with ‖σ_≤k‖_2 ≥ p·‖σ‖_2           (RankPolicy fro at p², an energy share)
    sv_cumulative=p  least k with Σ_≤k σ_i ≥ p·Σ σ_i           (RankPolicy cumulative)
    rank=N           min(N, rank of the layer)                  (RankPolicy fixed)
Differences from sd-scripts' resize_lora.py: older versions returned one direction too many for
every dynamic method (an index that was already a count got +1 twice); its `--new_rank` (default
4) always caps dynamic methods, here only an explicit `rank=`; its fixed rank N pads layers of
lower rank with zero directions (we keep the layer's rank); it keeps one direction of an all-zero
layer (we drop the layer), takes its spectrum from a randomized SVD (2 iterations) for layers above
2048 × 2048, and compares σ_i > σ_1/p strictly (we keep ties).

Recipes are separated by ':'; each is a comma list: `spn_ckpt=1,thr=-1.2`, `spn_lora=1,size=32`
(a bare score name means weight 1), `sv_ratio=20`, `sv_fro=0.9,rank=64`, `rank=16`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from .errors import OrthoLoraError, quote
from .rank import RankPolicy
from .shapes import matrix_shape

SCORES = ("spn_ckpt", "spn_lora", "fro_ckpt", "fro_lora", "subspace")
CKPT_SCORES = frozenset({"spn_ckpt", "fro_ckpt", "subspace"})
KOHYA = {"sv_ratio": "sv_ratio", "sv_fro": "fro", "sv_cumulative": "cumulative"}
MAX_RANK = 1 << 20
MIB = 1 << 20


@dataclass(frozen=True)
class Recipe:
    """One parsed recipe: score weights (as written) with `thr` or `size` (MiB), or a kohya policy."""

    text: str
    weights: tuple[tuple[str, float], ...] = ()
    thr: float | None = None
    size: float | None = None
    policy: RankPolicy | None = None

    @property
    def tag(self) -> str:
        """File-name-safe form of `text`: `spn_ckpt=1,thr=-1.2` → `spnckpt1_thr-1.2`."""
        return "_".join(p.replace("_", "").replace("=", "") for p in self.text.split(","))

    @property
    def normalized(self) -> dict[str, float]:
        """Score weights divided by their sum."""
        total = sum(w for _, w in self.weights)
        return {k: w / total for k, w in self.weights if w}

    @property
    def uses_ckpt(self) -> bool:
        return any(k in CKPT_SCORES for k in self.normalized)

    @property
    def uses_subspace(self) -> bool:
        return "subspace" in self.normalized


def _fmt(x: float) -> str:
    return f"{x:.12g}"


def _bad(text: str, problem: str) -> OrthoLoraError:
    return OrthoLoraError(f"recipe {quote(text, 80)}: {problem}")


def _number(text: str, key: str, value: str | None) -> float:
    if not value:
        raise _bad(text, f"{key} needs a value ({key}=…)")
    try:
        x = float(value)
    except ValueError:
        raise _bad(text, f"{key}={quote(value)} is not a number") from None
    if not math.isfinite(x):
        raise _bad(text, f"{key} must be finite")
    return x


def _rank(text: str, value: str | None) -> int:
    try:
        n = int(value or "")
    except ValueError:
        raise _bad(text, f"rank={quote(value or '')} is not a whole number") from None
    if not 1 <= n <= MAX_RANK:
        raise _bad(text, f"rank must be between 1 and {MAX_RANK}")
    return n


def _fields(text: str) -> dict[str, str | None]:
    fields: dict[str, str | None] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not key:
            raise _bad(text, "empty item (stray ',' or '=')")
        if key not in SCORES and key not in KOHYA and key not in ("thr", "size", "rank"):
            known = ", ".join((*SCORES, "thr", "size", *KOHYA, "rank"))
            raise _bad(text, f"unknown key {quote(key)}; expected one of {known}")
        if key in fields:
            raise _bad(text, f"{key} given twice")
        fields[key] = value.strip() if sep else None
    return fields


def _score_recipe(text: str, fields: dict[str, str | None]) -> Recipe:
    weights = []
    for key in SCORES:
        if key in fields:
            w = 1.0 if fields[key] is None else _number(text, key, fields[key])
            if w < 0:
                raise _bad(text, f"weight {key}={_fmt(w)} is negative")
            weights.append((key, w))
    if sum(w for _, w in weights) <= 0:
        raise _bad(text, "score weights sum to 0")
    extra = [k for k in fields if k in KOHYA or k == "rank"]
    if extra:
        raise _bad(text, f"{extra[0]} cannot be combined with scores")
    chosen = [k for k in ("thr", "size") if k in fields]
    if len(chosen) != 1:
        raise _bad(text, "a score recipe needs exactly one of thr= or size=")
    value = _number(text, chosen[0], fields[chosen[0]])
    if chosen[0] == "size" and value <= 0:
        raise _bad(text, "size must be positive (MiB)")
    canon = ",".join([f"{k}={_fmt(w)}" for k, w in weights] + [f"{chosen[0]}={_fmt(value)}"])
    return Recipe(canon, tuple(weights), value if chosen[0] == "thr" else None,
                  value if chosen[0] == "size" else None)


def _kohya_recipe(text: str, fields: dict[str, str | None]) -> Recipe:
    if "thr" in fields or "size" in fields:
        raise _bad(text, "thr=/size= need scores (e.g. spn_lora=1,thr=-1)")
    methods = [k for k in KOHYA if k in fields]
    if len(methods) > 1:
        raise _bad(text, f"choose one of {', '.join(methods)}")
    cap = _rank(text, fields["rank"]) if "rank" in fields else None
    if not methods:
        if cap is None:
            raise _bad(text, "empty recipe")
        return Recipe(f"rank={cap}", policy=RankPolicy("fixed", float(cap)))
    method = methods[0]
    p = _number(text, method, fields[method])
    if method == "sv_ratio" and p < 1:
        raise _bad(text, "sv_ratio must be at least 1")
    if method != "sv_ratio" and not 0 < p <= 1:
        raise _bad(text, f"{method} must be in (0, 1]")
    value = p * p if method == "sv_fro" else p
    canon = f"{method}={_fmt(p)}" + (f",rank={cap}" if cap is not None else "")
    return Recipe(canon, policy=RankPolicy(KOHYA[method], value, 1, cap))


def parse_recipe(text: str) -> Recipe:
    """One recipe (see the module docstring); bad input raises OrthoLoraError only."""
    fields = _fields(text)
    if any(k in SCORES for k in fields):
        return _score_recipe(text, fields)
    return _kohya_recipe(text, fields)


def parse_recipes(text: str) -> list[Recipe]:
    """Recipes separated by ':'; refuses empty and duplicate ones."""
    if not isinstance(text, str) or not text.strip():
        raise OrthoLoraError("no recipe given (e.g. spn_ckpt=1,thr=-1.2:spn_lora=1,size=32)")
    recipes: list[Recipe] = []
    for part in text.split(":"):
        if not part.strip():
            raise _bad(text, "empty recipe between ':'")
        recipe = parse_recipe(part.strip())
        if any(r.text == recipe.text for r in recipes):
            raise _bad(text, f"{recipe.text} given twice")
        recipes.append(recipe)
    return recipes


# ---------------------------------------------------------------------------------------------
# Scores and selection (pure)


@dataclass
class LayerScoring:
    """What a layer contributes to selection: σ (descending, float64), weight shape, references."""

    s: torch.Tensor
    shape: tuple[int, ...]
    refs: dict[str, float | torch.Tensor]

    def direction_bytes(self, itemsize: int) -> int:
        return sum(matrix_shape(self.shape)) * itemsize


def references(s: torch.Tensor, spectral: float | None = None, frobenius: float | None = None,
               subspace: torch.Tensor | None = None) -> dict[str, float | torch.Tensor]:
    """Reference magnitudes of a layer: the LoRA's own always, the base's where given."""
    refs: dict[str, float | torch.Tensor] = {"spn_lora": float(s[0]) if len(s) else 0.0,
                                             "fro_lora": float(s.double().norm())}
    if spectral is not None:
        refs["spn_ckpt"] = spectral
    if frobenius is not None:
        refs["fro_ckpt"] = frobenius
    if subspace is not None:
        refs["subspace"] = subspace
    return refs


def log_scores(s: torch.Tensor, weights: Mapping[str, float], refs: Mapping[str, float | torch.Tensor]) -> torch.Tensor:
    """log10 σ_i − Σ_j w_j·log10 ref_j (float64); −∞ where σ_i = 0, +∞ where a reference is 0."""
    s = s.double()
    out = torch.log10(s)
    for key, w in weights.items():
        if key not in refs:
            raise OrthoLoraError(f"score {key} needs the base checkpoint")
        out = out - w * torch.log10(torch.as_tensor(refs[key], dtype=torch.float64).abs())
    return torch.where(s > 0, out, -math.inf)


def keep_budget(scores: Sequence[torch.Tensor], costs: Sequence[int], budget: float
                ) -> tuple[list[torch.Tensor], float]:
    """Masks keeping the best-scored directions (all layers together) while Σ bytes ≤ budget,
    and the lowest kept score (+∞ when nothing fits)."""
    flat = torch.cat([s.double() for s in scores]) if scores else torch.zeros(0, dtype=torch.float64)
    cost = torch.cat([torch.full((len(s),), c, dtype=torch.int64) for s, c in zip(scores, costs)]
                     ) if scores else torch.zeros(0, dtype=torch.int64)
    order = torch.argsort(flat, descending=True, stable=True)
    n = min(int((torch.cumsum(cost[order], 0) <= budget).sum()), int((flat > -math.inf).sum()))
    keep = torch.zeros(len(flat), dtype=torch.bool)
    keep[order[:n]] = True
    threshold = float(flat[order[n - 1]]) if n else math.inf
    return list(keep.split([len(s) for s in scores])), threshold


def keep_first(s: torch.Tensor, policy: RankPolicy, shape: tuple[int, ...]) -> torch.Tensor:
    """Mask of the first k directions, k from a kohya-style policy on the non-zero σ."""
    nonzero = s[s > 0]
    k = min(policy.choose(nonzero, shape), len(nonzero)) if len(nonzero) else 0
    return torch.arange(len(s)) < k


def select(recipe: Recipe, layers: Sequence[LayerScoring], itemsize: int
           ) -> tuple[list[torch.Tensor], float | None]:
    """Kept-direction masks per layer, and the log10 score threshold used (None for kohya)."""
    if recipe.policy is not None:
        return [keep_first(l.s, recipe.policy, l.shape) for l in layers], None
    weights = recipe.normalized
    scores = [log_scores(l.s, weights, l.refs) for l in layers]
    if recipe.thr is not None:
        return [sc >= recipe.thr for sc in scores], recipe.thr
    return keep_budget(scores, [l.direction_bytes(itemsize) for l in layers], recipe.size * MIB)

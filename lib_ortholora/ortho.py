"""Orthogonalize K ≥ 2 LoRAs (docs/formats.md#ortho): shared and secondary directions, λ, residuals, all exact.

Objective, per layer (default): min over λ ∈ R^K and a direction v of Σ_k ‖dW_k − λ_k·v‖²_F, the
top singular pair of the K × N matrix of flattened deltas. Solved exactly from the Gram matrix
G = [⟨dW_i, dW_j⟩] (`Layer.gram`, from the factors): G = QΛQᵀ, λ_{k,p} = √Λ_p·Q_kp and
v_p = Σ_k (Q_kp/√Λ_p)·dW_k, itself an exact concatenated LoRA. Direction p is the optimum after
removing directions 1…p−1 (the seed's "secondary" is p = 2); the v_p are mutually orthogonal and
Σ_p λ_{k,p}·v_p = dW_k over all p. Each direction's sign makes Σ_k λ_{k,p} > 0 and its scale
makes mean_k |λ_{k,p}| = 1 over the LoRAs present in the layer (for the principal direction, whose
λ usually share a sign, that is mean λ = 1); v absorbs the inverse. Directions with
√Λ_p ≤ NULL·√tr G are numerically zero and dropped (λ = 0). A LoRA without the layer
counts as a zero delta. Equal eigenvalues (e.g. K equally strong private parts) leave the
secondary direction non-unique: any unit vector of that eigenspace is optimal.

Global λ (`global_lambda=True`): one scale per LoRA shared by every layer,
min over λ ∈ R^K and v = (v_l) of Σ_l Σ_k ‖dW_{k,l} − λ_k·v_l‖²_F, each weight counting once (the
later Ortho-LoRA code fitted the same model by alternating steps, averaging each tensor's
squared error, i.e. weighting a layer by 1/numel). Its exact optimum is the eigen-decomposition of
ΣG_l: the same formulas with one λ for all layers; directions are orthogonal summed over the file,
not layer by layer, and large layers dominate the fit.

Outputs (`Options`; each an exact combination Σ_k w_k·dW_k, compressed by an SVD of a small
core, see `compress`): `shared` = v_1; `direction{p}` = v_p; `{stem}_residual` = dW_k − λ_{k,1}·v_1,
so that residual_k + λ_{k,1}·shared = input_k exactly. Every file's metadata `ortholora_ortho` (JSON)
holds the sources and λ for all K directions: input_k = Σ_p lambda[k][p]·direction_p.

What the residuals are. They are orthogonal to the shared direction, so the shared LoRA's weight
can be turned without touching them; they are not independent private parts. With K = 2 one
dimension is left after removing v_1: r_1 = λ_12·v_2 and r_2 = λ_22·v_2 are exactly anti-aligned
(cosine −1 when the inputs' cosine is positive, +1 when it is negative); with equal norms r_1 = −r_2 = (dW_1 − dW_2)/2,
the "A versus B" contrast. So for K = 2 the useful outputs are shared + secondary (a common LoRA
and an A-vs-B slider) with λ, which rebuild both inputs exactly. For K > 2, in the model
dW_k = S + P_k with mutually orthogonal private parts of equal norm, v_1 = S + P̄ and
r_k = P_k − P̄ (P̄ the mean private part): S is recovered up to P̄ (relative error ‖P‖/(√K·‖S‖)),
each private part up to the common P̄, and the residuals' mutual cosine is −1/(K−1), the least
alignment K vectors can have in the K−1 dimensions left (a regular simplex): removing the shared
part takes |cos| from ≈ 1 to 1/(K−1), near 0 only for many LoRAs. The alignment report shows it.
"""
from __future__ import annotations

import json
import math
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from . import align, arguments, prediction
from .arch import Arch
from .errors import OrthoLoraError
from .keys import name_table
from .lorafile import LoraReader, LoraWriter, open_lora, write_side_by_side
from .lowrank import LowRank, concat
from .parallel import parallel_map
from .progress import Progress
from .rank import RankPolicy, as_policy
from .report import Report, Row, Status
from .run import Run
from .svd import core_svd, gram, gram_root

NULL = 1e-7  # a direction with √Λ_p ≤ NULL·√tr G is numerically zero (eigh is exact to ~1e-8 of it)
NOISE = 1e-16  # an output's σ² ≤ NOISE·(Σ_k |w_k|·‖U_k‖_F·‖D_k‖_F)² is rounding noise of its float64 core


@dataclass(frozen=True)
class Directions:
    """The solution in the span of K deltas: v_p = Σ_k coef[k, p]·dW_k and dW_k = Σ_p lam[k, p]·v_p
    (both [K, K], direction p in column p, zero columns for null directions)."""

    lam: torch.Tensor
    coef: torch.Tensor

    def residual_weights(self) -> torch.Tensor:
        """A = I − λ_{:,1}·coef_{:,1}ᵀ: row k expresses dW_k − λ_{k,1}·v_1 in the inputs."""
        return torch.eye(len(self.lam), dtype=self.lam.dtype) - self.lam[:, :1] @ self.coef[:, :1].T

    def residual_gram(self, g: torch.Tensor) -> torch.Tensor:
        """Gram of the residuals, A·G·Aᵀ."""
        a = self.residual_weights()
        return a @ g @ a.T

    def explained(self, g: torch.Tensor) -> list[float]:
        """Share of tr G in each λ_p·v_p: ‖λ_{:,p}‖²·coef_pᵀ·G·coef_p / tr G (Λ_p / tr G per layer)."""
        total = float(g.trace())
        e = self.lam.square().sum(0) * torch.einsum("kp,kj,jp->p", self.coef, g, self.coef)
        return [float(v) / total if total > 0 else 0.0 for v in e]


def solve(g: torch.Tensor) -> Directions:
    """Exact directions of a Gram matrix (float64): eigen-decomposition, signs Σλ > 0 (ties: the
    largest |λ| positive), scale mean |λ| = 1 over the LoRAs with energy, null directions zeroed."""
    k = len(g)
    evals, q = torch.linalg.eigh(g.double())
    evals, q = evals.flip(0), q.flip(1)
    present = g.diagonal() > 0
    lam = torch.zeros(k, k, dtype=torch.float64)
    coef = torch.zeros(k, k, dtype=torch.float64)
    floor = NULL**2 * float(g.trace())
    for p in range(k):
        if not evals[p] > floor:
            continue
        root = float(evals[p].sqrt())
        l, c = q[:, p] * root, q[:, p] / root
        total = float(l.sum())
        sign = math.copysign(1.0, total if abs(total) > 1e-12 * float(l.abs().sum()) else float(l[l.abs().argmax()]))
        m = float(l[present].abs().mean())
        lam[:, p], coef[:, p] = sign * l / m, sign * c * m
    return Directions(lam, coef)


@dataclass(frozen=True)
class Layer:
    """One layer's K deltas as one concatenated form U·D = Σ_k dW_k (float64, `lowrank.concat`,
    owner[j] = the input of rank column j) with its Grams UᵀU and D·Dᵀ: any Σ_k w_k·dW_k is
    U·diag(w[owner])·D, decomposed from the same Grams (`svd.core_svd`)."""

    lr: LowRank
    owner: torch.Tensor
    gu: torch.Tensor
    gd: torch.Tensor
    k: int

    @classmethod
    def of(cls, parts: Sequence[LowRank | None]) -> Layer:
        lr, owner = concat(parts, dtype=torch.float64)
        return cls(lr, owner, gram(lr.up), gram(lr.down, rows=True), len(parts))

    def gram(self) -> torch.Tensor:
        """G_ij = ⟨dW_i, dW_j⟩ [K, K] (align.gram_of_grams)."""
        return align.gram_of_grams(self.gu, self.gd, self.owner, self.k)

    def _core(self, w: torch.Tensor, vectors: bool = True
              ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        """The SVD of U·diag(ω_i)·D, ω_i = w_i[owner], for each row i of `w` [n, K], as (ω, L, σ, R)
        of `svd.core_svd` (G_u scaled by ω_i on both sides, one B for all outputs; L and R only with
        `vectors`). Directions below the rounding noise of the float64 core,
        σ² ≤ NOISE·(Σ_k |w_ik|·‖U_k‖_F·‖D_k‖_F)², are zero."""
        omega = w[:, self.owner]
        sizes = [torch.zeros(self.k, dtype=torch.float64).index_add_(0, self.owner, g.diagonal()).clamp_min(0)
                 for g in (self.gu, self.gd)]  # ‖U_k‖²_F, ‖D_k‖²_F
        floor = NOISE * (w.abs() @ (sizes[0] * sizes[1]).sqrt()).square()
        left, sp, right = core_svd(omega[:, :, None] * self.gu * omega[:, None, :],
                                   gram_root(self.gd, self.lr.down.shape[1]), floor, rtol=0.0, vectors=vectors)
        return omega, left, sp, right

    def plan(self, w: torch.Tensor, policy: RankPolicy | None) -> list[tuple[int, float]]:
        """Σ_k w_ik·dW_k for each row i of `w` [n, K]: the rank `policy` picks (None: every direction
        above the noise, exact) and the relative Frobenius error of that truncation (from the
        singular values alone)."""
        out = []
        for si in self._core(w, vectors=False)[2]:
            keep = int((si > 0).sum())
            r = min(policy.choose(si[:keep], self.lr.shape), keep) if policy is not None and keep else keep
            kept = float(si[:keep].square().sum())
            out.append((r, math.sqrt(float(si[r:keep].square().sum()) / kept) if kept > 0 else 0.0))
        return out

    def form(self, w: torch.Tensor, ranks: Sequence[int]) -> list[LowRank | None]:
        """Σ_k w_ik·dW_k truncated to ranks[i] directions (from `plan`), as balanced factors (scale 1,
        float64; None at rank 0), formed in float64 as U·(ω_i·L·√S) and (√S·R)·D: the factors of
        different inputs may cancel (a shared part is collinear across the inputs), by ~100× in the
        benchmark's LoRAs, which float32 products would turn into errors near fp16's rounding."""
        if not any(ranks):
            return [None] * len(ranks)
        omega, left, sp, right = self._core(w)
        root = sp.sqrt()
        ups = torch.cat([omega[i, :, None] * left[i, :, :r] * root[i, :r] for i, r in enumerate(ranks)], 1)
        downs = torch.cat([root[i, :r, None] * right[i, :r] for i, r in enumerate(ranks)])
        up, down = self.lr.up @ ups, downs @ self.lr.down  # float64 (rounded once, to the file's dtype)
        return [LowRank(u, d, 1.0, self.lr.shape) if r else None
                for u, d, r in zip(up.split(list(ranks), 1), down.split(list(ranks), 0), ranks)]


@dataclass(frozen=True)
class Options:
    """What to make: `directions` direction outputs (1 = the shared one only, K = all, enough to
    rebuild every input), `residuals` (each input minus λ_{·,1}·shared), one `global_lambda` per
    LoRA or one λ per layer, the rank `policy` of every output (None: exact) and the output `dtype`."""

    directions: int = 2
    residuals: bool = True
    global_lambda: bool = False
    policy: RankPolicy | None = None
    dtype: torch.dtype = torch.float16

    def keys(self, k: int) -> list[tuple[str, int]]:
        """Outputs as (role, index): ("direction", p) for p = 1…directions (1 = shared), then
        ("residual", k) for every input k."""
        return [("direction", p) for p in range(1, self.directions + 1)] + (
            [("residual", i) for i in range(k)] if self.residuals else [])


def directions_of(grams: dict[str, torch.Tensor], global_lambda: bool) -> dict[str, Directions]:
    """Per-layer solutions, or the one solution of ΣG_l shared by every layer."""
    if global_lambda:
        k = len(next(iter(grams.values()))) if grams else 0
        one = solve(sum(grams.values(), torch.zeros(k, k, dtype=torch.float64)))
        return {name: one for name in grams}
    return {name: solve(g) for name, g in grams.items()}


def output_weights(d: Directions, keys: list[tuple[str, int]]) -> torch.Tensor:
    """Each output's weights over the inputs, one row per key: v_p = coef[:, p−1]ᵀ, residual k =
    row k of I − λ_{:,1}·coef_{:,1}ᵀ."""
    a = d.residual_weights()
    return torch.stack([d.coef[:, i - 1] if role == "direction" else a[i] for role, i in keys])


def alignment_report(stems: list[str], arch: str, grams: dict[str, torch.Tensor], ranks: dict[str, int],
                     sols: dict[str, Directions], global_lambda: bool) -> Report:
    """Rows per layer (cosines, λ_{·,1}, shares) and `data` with the K×K matrices per layer, per
    block and over the file, before and after removing the shared direction (see `align`)."""
    table = name_table(arch)
    report = Report("ortho", totals={"architecture": Arch(arch).title, "loras": len(stems),
                                     "lambda": "global" if global_lambda else "per layer", "layers": len(grams)})
    entries, per_layer = [], []
    for name, g in grams.items():
        d, block = sols[name], table[name].block
        row = report.add(Row(name, old_rank=ranks[name], extra={"block": block}))
        if float(g.trace()) <= 0:
            row.status, row.note = Status.SKIPPED, "zero in every LoRA"
            continue
        r = d.residual_gram(g)
        entries.append((block, g, r))
        layer = {"module": name, "block": block, **align.scope(g, r), "lambda": d.lam.tolist(),
                 "explained": d.explained(g)}
        per_layer.append(layer)
        row.extra.update({"cos": align.mean_offdiag(layer["before"]), "cos_after": align.mean_offdiag(layer["after"]),
                          "lambda": " ".join(f"{x:.3g}" for x in d.lam[:, 0].tolist()),
                          "share": " ".join("-" if x is None else f"{x:.3g}" for x in layer["share"])})
    zero = torch.zeros(len(stems), len(stems), dtype=torch.float64)
    whole = align.scope(sum((g for _, g, _ in entries), zero), sum((r for _, _, r in entries), zero))
    report.totals.update({"cos_file": align.mean_offdiag(whole["before"]),
                          "cos_file_after": align.mean_offdiag(whole["after"]),
                          "share_file": [None if x is None else round(x, 4) for x in whole["share"]]})
    if global_lambda and sols:
        report.totals["lambda_global"] = [round(x, 4) for x in next(iter(sols.values())).lam[:, 0].tolist()]
    report.data = {
        "loras": stems, "lambda_mode": report.totals["lambda"],
        "cosine": "cos_ij = sum_l <dW_il, dW_jl>_F / sqrt(sum_l |dW_il|_F^2 * sum_l |dW_jl|_F^2) over the scope's "
                  "layers (one layer, a block, the file); null where a LoRA has no delta in the scope",
        "after": "the same cosines for the residuals dW_k - lambda_k1 * v_1",
        "share": "1 - sum_l |residual_kl|_F^2 / sum_l |dW_kl|_F^2: LoRA k's energy in the shared direction",
        "explained": "per layer, the share of sum_k |dW_k|_F^2 in each lambda_p * v_p "
                     "(Lambda_p / tr G with per-layer lambda)",
        "file": whole, "blocks": align.by_block(entries), "layers": per_layer}
    return report


def _common_arch(files: list[LoraReader]) -> str:
    for f in files:
        if f.arch is None:
            raise OrthoLoraError("cannot tell which architecture this LoRA is for", f.path)
    if len({f.arch for f in files}) > 1:
        listing = ", ".join(f"{f.path.name} ({f.arch})" for f in files)
        raise OrthoLoraError(f"LoRAs of different architectures cannot be orthogonalized: {listing}",
                             next(f.path for f in files if f.arch != files[0].arch))
    return files[0].arch


def _layers(files: list[LoraReader], arch: str) -> dict[str, list[bool]]:
    """Layer name → which files have it, in the architecture's layer order (shapes must agree)."""
    out = {}
    for name in name_table(arch):
        present = [f for f in files if name in f.shapes]
        for f in present[1:]:
            if f.shapes[name] != present[0].shapes[name]:
                raise OrthoLoraError(f"module {name} is {f.shapes[name]} here but {present[0].shapes[name]} in "
                                     f"{present[0].path.name}", f.path)
        if present:
            out[name] = [name in f.shapes for f in files]
    return out


def _layer(name: str, where: list[bool], files: list[LoraReader]) -> Layer:
    """The layer's exact low-rank forms, read from each file that has it."""
    parts = []
    for has, f in zip(where, files):
        if not has:
            parts.append(None)
            continue
        m = f.module(name)
        lr = m.lowrank()
        if lr is None:
            raise OrthoLoraError(f"module {name} ({m.family}) has no exact low-rank form", f.path)
        parts.append(lr)
    return Layer.of(parts)


def _file_name(key: tuple[str, int], stems: list[str], prefix: str) -> str:
    role, i = key
    if role == "direction":
        return f"{prefix}_shared" if i == 1 else f"{prefix}_direction{i}"
    return f"{stems[i] if len(set(stems)) == len(stems) else f'{i + 1}_{stems[i]}'}_{prefix}_residual"


def _metadata(key: tuple[str, int], files: list[LoraReader], sols: dict[str, Directions],
              opts: Options) -> dict[str, str]:
    """`ortholora_ortho` JSON (role, mode, sources, λ for all K directions: per module, or one K×K
    list with a global λ) plus the provenance keys."""
    def table(d: Directions) -> list[list[float]]:
        return [[float(f"{x:.9g}") for x in row] for row in d.lam.tolist()]

    role, i = key
    info = {"version": 1, "role": "shared" if key == ("direction", 1) else role,
            **({"direction": i} if role == "direction" else {"source": i}),
            "mode": "global" if opts.global_lambda else "layer",
            "sources": [{"name": f.stem, "file": f.path.name} for f in files],
            "policy": opts.policy.describe() if opts.policy else "exact",
            "rebuild": "input_k = sum_p lambda[k][p] * direction_p = residual_k + lambda[k][0] * shared",
            "lambda": (table(next(iter(sols.values()))) if opts.global_lambda else
                       {name: table(d) for name, d in sols.items()})}
    return {"ortholora_operation": "ortho", "modelspec.merged_from": ", ".join(f.stem for f in files),
            "ortholora_ortho": json.dumps(info, separators=(",", ":"))}


def ortho_lora(paths: Sequence[str | Path], out_dir: str | Path | None = None, *, directions: int = 2,
               residuals: bool = True, global_lambda: bool = False, rank: RankPolicy | str | int | None = None,
               dtype: torch.dtype = torch.float16, prefix: str = "ortho", overwrite: bool = False,
               progress: Progress | None = None) -> Report:
    """Orthogonalize K ≥ 2 LoRA files of one architecture and report their alignment (`report.data`
    holds the heatmap data, see `align`). With `out_dir` (made if missing), write `{prefix}_shared`
    (v_1), `{prefix}_direction{p}` for 2 ≤ p ≤ `directions` and, with `residuals`,
    `{stem}_{prefix}_residual` (= input − λ_{·,1}·shared) per input, all or none; `rank`: the rank
    policy of every output (None: exact); see `Options`.

    Streamed, layer by layer: a first pass reads each layer of every input and keeps its K×K Gram
    (and, with per-layer λ, each output's rank); with one global λ a second pass finds the ranks
    once λ is known; the last pass reads each layer again and writes it into every output at once."""
    paths, out_dir = arguments.path_list(paths), arguments.optional_path(out_dir, "out_dir")
    if len(paths) < 2:
        raise OrthoLoraError(f"orthogonalization needs at least two LoRAs, got {len(paths)}")
    opts = Options(arguments.whole(directions, "directions", 0, len(paths)), arguments.flag(residuals, "residuals"),
                   arguments.flag(global_lambda, "global_lambda"), as_policy(rank) if rank is not None else None,
                   arguments.output_dtype(dtype))
    if not isinstance(prefix, str) or not prefix:
        raise OrthoLoraError(f"prefix must be a non-empty text, got {prefix!r}")
    with Run("ortho", progress) as run, ExitStack() as stack:
        targets = {}
        if out_dir is not None:
            targets = {key: Path(out_dir) / f"{_file_name(key, [p.stem for p in paths], prefix)}.safetensors"
                       for key in opts.keys(len(paths))}
            run.claim(targets.values(), inputs=paths, overwrite=overwrite, make_folders=True)
        read = run.phase("read", len(paths))
        files = []
        for p in paths:
            files.append(stack.enter_context(open_lora(p)))
            read.step(p.name)
        arch = _common_arch(files)
        layers = _layers(files, arch)
        keys = list(targets)
        per_layer = keys and not opts.global_lambda
        gram_phase = run.phase("gram", len(layers))

        def first(name: str) -> tuple[str, torch.Tensor, int, list[tuple[int, float]]]:
            layer = _layer(name, layers[name], files)
            g = layer.gram()
            return name, g, len(layer.owner), layer.plan(output_weights(solve(g), keys), opts.policy) if per_layer else []

        grams, ranks, plans = {}, {}, {}
        for name, g, r, plan in parallel_map(first, layers):
            grams[name], ranks[name], plans[name] = g, r, plan
            gram_phase.step(name)
        sols = directions_of(grams, opts.global_lambda)
        report = run.use(alignment_report([f.stem for f in files], arch, grams, ranks, sols, opts.global_lambda))
        report.totals.update({"directions": opts.directions,
                              "policy": opts.policy.describe() if opts.policy else "exact"})
        unknown = sum(len(f.unknown) for f in files)
        if unknown:
            report.warnings.append(f"{unknown} modules map to no {arch} layer and were left out")
        if targets:
            if opts.global_lambda:
                rank_phase = run.phase("rank", len(layers))

                def ranked(name: str) -> tuple[str, list[tuple[int, float]]]:
                    return name, _layer(name, layers[name], files).plan(output_weights(sols[name], keys), opts.policy)

                for name, plan in parallel_map(ranked, layers):
                    plans[name] = plan
                    rank_phase.step(name)
            _write_outputs(run, targets, files, layers, plans, sols, opts)
    return run.report


def _write_outputs(run: Run, targets: dict[tuple[str, int], Path], files: list[LoraReader],
                   layers: dict[str, list[bool]], plans: dict[str, list[tuple[int, float]]],
                   sols: dict[str, Directions], opts: Options) -> None:
    """Report each layer's ranks and errors (`plans`: per layer, per output), then read every layer
    again and write it into every output at once (one claimed output per key, written side by side,
    in name order), each output of the rank its plan found."""
    keys = list(targets)
    rows = {r.module: r for r in run.report.rows}
    shared = keys.index(("direction", 1)) if ("direction", 1) in keys else None
    for name, plan in plans.items():
        if any(r for r, _ in plan):
            rows[name].rel_error = max(e for _, e in plan)
            rows[name].rank = plan[shared][0] if shared is not None else None
    run.report.totals["max_rel_error"] = max((r.rel_error for r in rows.values() if r.rel_error is not None),
                                             default=0.0)
    shapes = {name: next(f.shapes[name] for has, f in zip(where, files) if has) for name, where in layers.items()}
    names = sorted(name for name, plan in plans.items() if any(r for r, _ in plan))
    write = run.phase("write", len(names))

    kind = prediction.common([f.metadata for f in files], run.report.warnings, [f.path.name for f in files])
    with ExitStack() as stack:
        writers = {}
        for i, key in enumerate(keys):
            layout = {name: (shapes[name], plan[i][0]) for name, plan in plans.items() if plan[i][0]}
            if layout:
                writers[key] = stack.enter_context(LoraWriter(targets[key], layout, files[0].arch, opts.dtype,
                                                              _metadata(key, files, sols, opts), prediction=kind))
            else:
                run.not_written(targets[key], "it is zero in every layer")

        def made(name: str) -> list[LowRank | None]:
            return _layer(name, layers[name], files).form(output_weights(sols[name], keys), [r for r, _ in plans[name]])

        write_side_by_side([writers.get(key) for key in keys], names, made, write.step)

"""Orthogonalize K ≥ 2 LoRAs (docs/formats.md#ortho): shared and secondary directions, λ, residuals, all exact.

Objective, per layer (default): min over λ ∈ R^K and a direction v of Σ_k ‖dW_k − λ_k·v‖²_F, the
top singular pair of the K × N matrix of flattened deltas. Solved exactly from the Gram matrix
G = [⟨dW_i, dW_j⟩] (align.gram, from the factors): G = QΛQᵀ, λ_{k,p} = √Λ_p·Q_kp and
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
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch

from . import align, arguments, prediction
from .arch import Arch
from .errors import OrthoLoraError
from .keys import name_table
from .lorafile import LoraFile, read_lora, write_lora
from .lowrank import LowRank
from .modules import NetworkModule
from .progress import Progress
from .rank import RankPolicy, as_policy
from .report import Report, Row, Status
from .run import Run

NULL = 1e-7  # a direction with √Λ_p ≤ NULL·√tr G is numerically zero (eigh is exact to ~1e-8 of it)
EPS = 1e-12  # singular values ≤ EPS·Σ_k |w_k|·‖dW_k‖ are float64 rounding noise of a combination


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
class Basis:
    """One layer's K deltas in a shared orthonormal frame: with the concatenated form U·D
    (align.stack), U = Qu·Ru and Dᵀ = Qd·Rd, so Σ_k w_k·dW_k = Qu·(Ru·diag(w[owner])·Rdᵀ)·Qdᵀ."""

    qu: torch.Tensor
    qd: torch.Tensor
    ru: torch.Tensor
    rd: torch.Tensor
    owner: torch.Tensor


def basis(parts: Sequence[LowRank | None]) -> Basis:
    """Two float64 QRs per layer, shared by every output of the layer."""
    up, down, owner = align.stack(parts)
    qu, ru = torch.linalg.qr(up)
    qd, rd = torch.linalg.qr(down.T)
    return Basis(qu.float(), qd.float(), ru, rd, owner)


def compress(b: Basis, w: torch.Tensor, shape: tuple[int, ...], policy: RankPolicy | None,
             floors: torch.Tensor) -> list[tuple[LowRank | None, float]]:
    """Σ_k w_ik·dW_k for each row i of `w` [n, K], as balanced factors: SVD Uc·S·Vcᵀ of the core
    Ru·diag(w_i[owner])·Rdᵀ (R×R, batched), up = Qu·Uc·√S, down = √S·Vcᵀ·Qdᵀ (the QR-factor SVD
    in docs/formats.md#factor-svd; one QR pair and one product per side for all outputs). Singular values ≤ floors[i] are
    rounding noise; `policy` (None: keep the rest, exact) picks the rank. Returns per row the
    factors (None when rank 0) and the relative Frobenius error of the truncation."""
    uc, s, vch = torch.linalg.svd((b.ru * w[:, b.owner][:, None, :]) @ b.rd.T, full_matrices=False)
    ranks, errs = [], []
    for si, floor in zip(s, floors.tolist()):
        keep = int((si > floor).sum())
        r = min(policy.choose(si[:keep], shape), keep) if policy is not None and keep else keep
        kept = float(si[:keep].square().sum())
        ranks.append(r)
        errs.append(math.sqrt(float(si[r:keep].square().sum()) / kept) if kept > 0 else 0.0)
    root = s.sqrt()
    up = b.qu @ torch.cat([uc[i, :, :r] * root[i, :r] for i, r in enumerate(ranks)], 1).float()
    down = torch.cat([root[i, :r, None] * vch[i, :r] for i, r in enumerate(ranks)]).float() @ b.qd.T
    ups, downs = up.split(ranks, 1), down.split(ranks, 0)
    return [(LowRank(u, d, 1.0, shape) if r else None, e) for u, d, r, e in zip(ups, downs, ranks, errs)]


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


def build_outputs(layers: Iterable[tuple[str, list[LowRank | None]]], grams: dict[str, torch.Tensor],
                  sols: dict[str, Directions], opts: Options
                  ) -> Iterator[tuple[str, dict[tuple[str, int], LowRank], float]]:
    """Per layer: its outputs {key: LowRank} (factors in `opts.dtype`, rank-0 outputs left out) and
    the largest relative truncation error among them."""
    for name, parts in layers:
        norms = grams[name].diagonal().clamp_min(0).sqrt()
        if not float(norms.sum()) > 0:
            yield name, {}, 0.0
            continue
        keys = opts.keys(len(parts))
        w = output_weights(sols[name], keys)
        shape = next(tuple(p.shape) for p in parts if p is not None)
        made = compress(basis(parts), w, shape, opts.policy, EPS * (w.abs() @ norms))
        found = {key: LowRank(lr.up.to(opts.dtype), lr.down.to(opts.dtype), 1.0, shape)
                 for key, (lr, _) in zip(keys, made) if lr is not None}
        yield name, found, max(err for _, err in made)


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


def _common_arch(files: list[LoraFile]) -> str:
    for f in files:
        if f.arch is None:
            raise OrthoLoraError("cannot tell which architecture this LoRA is for", f.path)
    if len({f.arch for f in files}) > 1:
        listing = ", ".join(f"{f.path.name} ({f.arch})" for f in files)
        raise OrthoLoraError(f"LoRAs of different architectures cannot be orthogonalized: {listing}",
                             next(f.path for f in files if f.arch != files[0].arch))
    return files[0].arch


def _modules(files: list[LoraFile], arch: str) -> dict[str, list[NetworkModule | None]]:
    """Module name → one module per file (None where absent), in the architecture's layer order."""
    out = {}
    for name in name_table(arch):
        mods = [f.modules.get(name) for f in files]
        present = [(f, m) for f, m in zip(files, mods) if m is not None]
        for f, m in present[1:]:
            if m.shape != present[0][1].shape:
                raise OrthoLoraError(f"module {name} is {m.shape} here but {present[0][1].shape} in "
                                     f"{present[0][0].path.name}", f.path)
        if present:
            out[name] = mods
    return out


def _lowranks(name: str, mods: list[NetworkModule | None], files: list[LoraFile]) -> list[LowRank | None]:
    """Exact low-rank forms, made on demand (the files keep their compact storage)."""
    out = []
    for m, f in zip(mods, files):
        lr = m.lowrank() if m is not None else None
        if m is not None and lr is None:
            raise OrthoLoraError(f"module {name} ({m.family}) has no exact low-rank form", f.path)
        out.append(lr)
    return out


def _file_name(key: tuple[str, int], stems: list[str], prefix: str) -> str:
    role, i = key
    if role == "direction":
        return f"{prefix}_shared" if i == 1 else f"{prefix}_direction{i}"
    return f"{stems[i] if len(set(stems)) == len(stems) else f'{i + 1}_{stems[i]}'}_{prefix}_residual"


def _metadata(key: tuple[str, int], files: list[LoraFile], sols: dict[str, Directions],
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
    policy of every output (None: exact); see `Options`."""
    paths, out_dir = arguments.path_list(paths), arguments.optional_path(out_dir, "out_dir")
    if len(paths) < 2:
        raise OrthoLoraError(f"orthogonalization needs at least two LoRAs, got {len(paths)}")
    opts = Options(arguments.whole(directions, "directions", 0, len(paths)), arguments.flag(residuals, "residuals"),
                   arguments.flag(global_lambda, "global_lambda"), as_policy(rank) if rank is not None else None,
                   arguments.output_dtype(dtype))
    if not isinstance(prefix, str) or not prefix:
        raise OrthoLoraError(f"prefix must be a non-empty text, got {prefix!r}")
    with Run("ortho", progress) as run:
        targets = {}
        if out_dir is not None:
            targets = {key: Path(out_dir) / f"{_file_name(key, [p.stem for p in paths], prefix)}.safetensors"
                       for key in opts.keys(len(paths))}
            run.claim(targets.values(), inputs=paths, overwrite=overwrite, make_folders=True)
        read = run.phase("read", len(paths))
        files = []
        for p in paths:
            files.append(read_lora(p))
            read.step(p.name)
        arch = _common_arch(files)
        modules = _modules(files, arch)
        gram = run.phase("gram", len(modules))
        grams, ranks = {}, {}
        for name, mods in modules.items():
            parts = _lowranks(name, mods, files)
            grams[name], ranks[name] = align.gram(parts), sum(p.rank for p in parts if p is not None)
            gram.step(name)
        sols = directions_of(grams, opts.global_lambda)
        report = run.use(alignment_report([f.stem for f in files], arch, grams, ranks, sols, opts.global_lambda))
        report.totals.update({"directions": opts.directions,
                              "policy": opts.policy.describe() if opts.policy else "exact"})
        unknown = sum(len(f.unknown) for f in files)
        if unknown:
            report.warnings.append(f"{unknown} modules map to no {arch} layer and were left out")
        if targets:
            _write_outputs(run, targets, files, modules, grams, sols, opts)
    return run.report


def _write_outputs(run: Run, targets: dict[tuple[str, int], Path], files: list[LoraFile],
                   modules: dict[str, list[NetworkModule | None]], grams: dict[str, torch.Tensor],
                   sols: dict[str, Directions], opts: Options) -> None:
    """Build every output layer by layer, then write each into its claimed target."""
    outputs: dict[tuple[str, int], dict[str, LowRank]] = {key: {} for key in targets}
    rows = {r.module: r for r in run.report.rows}
    layers = ((name, _lowranks(name, mods, files)) for name, mods in modules.items())
    build = run.phase("build", len(modules))
    for name, found, err in build_outputs(layers, grams, sols, opts):
        for key, lr in found.items():
            outputs[key][name] = lr
        if found:
            rows[name].rel_error = err
            rows[name].rank = found[("direction", 1)].rank if ("direction", 1) in found else None
        build.step(name)
    run.report.totals["max_rel_error"] = max((r.rel_error for r in rows.values() if r.rel_error is not None),
                                             default=0.0)
    modules.clear()  # the inputs' tensors are no longer needed: free them before writing
    for f in files:
        f.modules.clear()
    arch = files[0].arch
    write = run.phase("write", len(targets))
    for key, path in targets.items():
        found = outputs.pop(key)
        if found:
            write_lora(path, found, arch, opts.dtype, _metadata(key, files, sols, opts),
                       prediction=prediction.common([f.metadata for f in files], run.report.warnings,
                                                                 [f.path.name for f in files]))
        else:
            run.not_written(path, "it is zero in every layer")
        write.step(path.name)

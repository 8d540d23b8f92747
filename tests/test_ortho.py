"""Tests of lib_ortholora.ortho / align: exact Gram solution vs dense references, recovery of a
known shared component, orthogonality, exact rebuilds, alignment report, global λ, CLI."""
from __future__ import annotations

import json
import math

import pytest
import torch

from lib_ortholora.cli import main
from lib_ortholora.errors import OrthoLoraError
from lib_ortholora.lorafile import read_lora, write_lora
from lib_ortholora.lowrank import LowRank, concat, rel_error
from lib_ortholora.ortho import Layer, ortho_lora, solve
from lib_ortholora.rank import RankPolicy
from lib_ortholora.svd import factor_svd
from lorautil import full_tensors, lora_tensors, loha_tensors, sample_targets, save, tiny_targets

ARCH = "sd15"
F32 = torch.float32


def flat(lr: LowRank) -> torch.Tensor:
    return (lr.scale * (lr.up.double() @ lr.down.double())).reshape(-1)


def deltas(path) -> dict[str, torch.Tensor]:
    """Flattened float64 deltas of every module of a LoRA file."""
    return {n: m.delta().double().reshape(-1) for n, m in read_lora(path).modules.items()}


def meta(path) -> dict:
    return json.loads(read_lora(path).metadata["ortholora_ortho"])


def shared_private(folder, a: list[float], rho: float, tgts=None, seed: int = 0):
    """LoRAs dW_k = a_k·S + P_k with S (rank 2) and the P_k (rank 2) on disjoint bands of output
    rows: exactly orthogonal to each other, ‖P_k‖ = rho·‖S‖ for every k. Returns paths, S, P."""
    k = len(a)
    g = torch.Generator().manual_seed(seed)
    paths, shared, private = [], {}, [{} for _ in a]
    forms = [{} for _ in a]
    for t in tgts or tiny_targets(ARCH):
        out, n = t.shape[0], math.prod(t.shape[1:])
        band = out // (k + 1)
        us, up = torch.zeros(out, 2), torch.randn(band, 2, generator=g)
        us[:band] = torch.randn(band, 2, generator=g)
        ds, dp = torch.randn(2, n, generator=g) / math.sqrt(n), torch.randn(2, n, generator=g) / math.sqrt(n)
        s_lr = LowRank(us, ds, 1.0, t.shape)
        dp *= rho * s_lr.norm() / LowRank(up, dp, 1.0, (band, n)).norm()
        shared[t.name] = flat(s_lr)
        for i in range(k):
            ui = torch.zeros(out, 2)
            ui[(i + 1) * band:(i + 2) * band] = up
            private[i][t.name] = flat(LowRank(ui, dp, 1.0, t.shape))
            forms[i][t.name] = LowRank(torch.cat([a[i] * us, ui], 1), torch.cat([ds, dp]), 1.0, t.shape)
    for i, form in enumerate(forms):
        paths.append(folder / f"sp{i}.safetensors")
        write_lora(paths[-1], form, ARCH, F32)
    return paths, shared, private


def random_loras(folder, k: int, tgts, alpha: float = 2.0):
    """K independent random kohya LoRAs (rank 4, alpha ≠ rank) on `tgts`."""
    return [save(folder / f"r{i}.safetensors", lora_tensors(tgts, rank=4, seed=10 + i, alpha=alpha)) for i in range(k)]


def outputs(report) -> dict[str, str]:
    """Output file stem → path."""
    return {p.rsplit("/", 1)[-1].removesuffix(".safetensors"): p for p in report.outputs}


def test_gram_from_factors_matches_dense():
    tgts = sample_targets(ARCH)
    lrs = [LowRank(torch.randn(t.shape[0], r), torch.randn(r, math.prod(t.shape[1:])), 0.3 * (r - 2), t.shape)
           for t, r in zip(tgts, range(1, 20))]
    for t, lr in zip(tgts, lrs):
        parts = [lr, None, lr.scaled(-2.0), LowRank(lr.up[:, :1], lr.down[:1], 1.5, lr.shape)]
        zero = torch.zeros(lr.up.shape[0] * lr.down.shape[1], dtype=torch.float64)
        x = torch.stack([flat(p) if p is not None else zero for p in parts])
        assert torch.allclose(Layer.of(parts).gram(), x @ x.T, rtol=1e-10, atol=1e-10 * float((x @ x.T).abs().max())), t.name


def test_exact_solution_matches_dense_svd(tmp_path):
    """λ_{·,p}·v_pᵀ equals the p-th rank-1 term of the SVD of the K×N matrix of deltas, and the
    written direction files hold v_p = Σ_k coef[k,p]·dW_k."""
    tgts = sample_targets(ARCH)
    paths = random_loras(tmp_path, 3, tgts)
    report = ortho_lora(paths, tmp_path / "o", directions=3, residuals=False, dtype=F32)
    ins = [deltas(p) for p in paths]
    outs = [deltas(p) for p in outputs(report).values()]
    lam = {d["module"]: torch.tensor(d["lambda"], dtype=torch.float64) for d in report.data["layers"]}
    for t in tgts:
        x = torch.stack([d[t.name] for d in ins])
        u, s, vh = torch.linalg.svd(x, full_matrices=False)
        sol = solve(x @ x.T)
        assert torch.allclose(sol.lam, lam[t.name])
        for p in range(3):
            v = sol.coef[:, p] @ x
            term, ref = torch.outer(sol.lam[:, p], v), torch.outer(u[:, p] * s[p], vh[p])
            assert rel_error(term, ref) < 1e-8, (t.name, p)
            assert rel_error(outs[p][t.name], v) < 1e-5, (t.name, p)
        assert sol.lam[:, 0].abs().mean() == pytest.approx(1.0) and sol.lam[:, 0].sum() > 0


@pytest.mark.slow
def test_directions_are_orthogonal_and_rebuild_every_input(tmp_path):
    """Principal ⟂ secondary; Σ_p λ_{k,p}·v_p (λ from metadata, all K direction files) = dW_k and
    residual_k + λ_{k,1}·shared = dW_k, with inputs of mixed families, alphas and missing layers."""
    tgts = tiny_targets(ARCH)
    a = save(tmp_path / "a.safetensors", lora_tensors(tgts, rank=4, seed=1, alpha=1.0))
    b = save(tmp_path / "b.safetensors", lora_tensors(tgts[::2], rank=8, seed=2))
    c = save(tmp_path / "c.safetensors", loha_tensors([t for t in tgts if len(t.shape) == 2][1::3], rank=2, seed=3))
    paths = [a, b, c]
    report = ortho_lora(paths, tmp_path / "o", directions=3, dtype=F32)
    files = outputs(report)
    ins = [deltas(p) for p in paths]
    dirs = [deltas(files[n]) for n in ("ortho_shared", "ortho_direction2", "ortho_direction3")]
    res = [deltas(files[f"{p.stem}_ortho_residual"]) for p in paths]
    lam = meta(files["ortho_shared"])["lambda"]
    assert meta(files["ortho_direction3"])["lambda"] == lam
    for t in tgts:
        zero = torch.zeros(t.shape[0] * math.prod(t.shape[1:]), dtype=torch.float64)
        v = [d.get(t.name, zero) for d in dirs]
        if v[0].norm() > 0 and v[1].norm() > 0:
            assert abs(float(v[0] @ v[1])) < 1e-6 * float(v[0].norm() * v[1].norm()), t.name
        for k, x in enumerate(ins):
            want = x.get(t.name, zero)
            rebuilt = sum(lam[t.name][k][p] * v[p] for p in range(3))
            assert float((rebuilt - want).norm()) <= 1e-5 * max(float(want.norm()), 1e-30) + 1e-12, (t.name, k)
            again = res[k].get(t.name, zero) + lam[t.name][k][0] * v[0]
            assert float((again - want).norm()) <= 1e-5 * max(float(want.norm()), 1e-30) + 1e-12, (t.name, k)
    only_a = next(t.name for t in tgts if t.name not in ins[1] and t.name not in ins[2])
    assert lam[only_a][0][0] == pytest.approx(1.0) and lam[only_a][1][0] == lam[only_a][2][0] == 0
    assert only_a not in read_lora(files["a_ortho_residual"]).modules  # a's whole delta is the shared part
    layer = next(d for d in report.data["layers"] if d["module"] == only_a)
    assert layer["before"][0][1] is None and layer["share"][1] is None


@pytest.mark.slow
def test_recovers_shared_component_and_private_parts(tmp_path):
    """dW_k = a_k·S + P_k (P_k mutually orthogonal, equal norms ρ‖S‖): λ_{·,1} = a / mean(a) and, with
    P_a = Σ_j a_j·P_j / ‖a‖², v_1 = mean(a)·(S + P_a) and residual_k = P_k − a_k·P_a exactly; so
    S comes back with relative error ρ/‖a‖ and each private part up to its share of P_a."""
    a, rho = [0.5, 1.0, 1.5], 0.1
    paths, shared, private = shared_private(tmp_path, a, rho)
    report = ortho_lora(paths, tmp_path / "o", dtype=F32)
    files = outputs(report)
    v1 = deltas(files["ortho_shared"])
    res = [deltas(files[f"sp{k}_ortho_residual"]) for k in range(3)]
    norm_a2 = sum(x * x for x in a)
    for name, s in shared.items():
        pa = sum(x * p[name] for x, p in zip(a, private)) / norm_a2
        assert rel_error(v1[name], s + pa) < 1e-5, name
        assert rel_error(v1[name], s) == pytest.approx(rho / math.sqrt(norm_a2), rel=1e-3)
        for k in range(3):
            assert rel_error(res[k][name], private[k][name] - a[k] * pa) < 1e-4, (name, k)
    for layer in report.data["layers"]:
        assert [row[0] for row in layer["lambda"]] == pytest.approx(a, rel=1e-6)


@pytest.mark.parametrize("k", [2, 3, 5])
def test_residual_cosines_form_a_simplex(tmp_path, k):
    """Shared part dominating (cos ≈ 0.99): after removing it the residuals' mutual cosine is
    −1/(K−1), the least alignment K vectors can have in K−1 dimensions: −1 (anti-aligned
    multiples of v_2) for K = 2, −0.5 for K = 3, −0.25 for K = 5."""
    rho = 0.1
    paths, _, _ = shared_private(tmp_path, [1.0] * k, rho, tgts=sample_targets(ARCH))
    report = ortho_lora(paths)
    assert not report.outputs
    for scope in [report.data["file"], *report.data["blocks"], *report.data["layers"]]:
        for i in range(k):
            assert scope["share"][i] == pytest.approx(1 - rho**2 * (1 - 1 / k) / (1 + rho**2), rel=1e-6)
            for j in range(k):
                if i != j:
                    assert scope["before"][i][j] == pytest.approx(1 / (1 + rho**2), rel=1e-6)
                    assert scope["after"][i][j] == pytest.approx(-1 / (k - 1), abs=1e-6)
    assert report.totals["cos_file"] == pytest.approx(1 / (1 + rho**2), rel=1e-6)


@pytest.mark.slow
def test_two_loras_residuals_are_the_secondary_direction(tmp_path):
    """K = 2: residual_k = λ_{k,2}·v_2, and shared + secondary rebuild both inputs exactly."""
    tgts = sample_targets(ARCH)
    paths = random_loras(tmp_path, 2, tgts)
    report = ortho_lora(paths, tmp_path / "o", dtype=F32)
    files = outputs(report)
    v1, v2 = deltas(files["ortho_shared"]), deltas(files["ortho_direction2"])
    lam = meta(files["ortho_direction2"])["lambda"]
    ins = [deltas(p) for p in paths]
    for t in tgts:
        for k, p in enumerate(paths):
            res = deltas(files[f"{p.stem}_ortho_residual"])[t.name]
            assert rel_error(res, lam[t.name][k][1] * v2[t.name]) < 1e-5
            assert rel_error(lam[t.name][k][0] * v1[t.name] + lam[t.name][k][1] * v2[t.name], ins[k][t.name]) < 1e-5


def test_alternating_least_squares_converges_to_the_same_answer(tmp_path):
    """The seed's ALS (λ = 1, v = mean; λ ← X·v/‖v‖², v ← λᵀX/‖λ‖²), iterated to convergence,
    reaches the exact principal pair (both normalised to mean |λ| = 1)."""
    tgts = sample_targets(ARCH)
    paths, _, _ = shared_private(tmp_path, [0.7, 1.0, 1.6], 0.5, tgts=tgts)
    extra = random_loras(tmp_path, 1, tgts)
    ins = [deltas(p) for p in [*paths, *extra]]
    for t in tgts:
        x = torch.stack([d[t.name] for d in ins])
        v = x.mean(0)
        for _ in range(10000):
            lam = x @ v / (v @ v)
            new = lam @ x / (lam @ lam)
            done = rel_error(new, v) < 1e-14
            v = new
            if done:
                break
        lam = x @ v / (v @ v)
        m = lam.abs().mean()
        sol = solve(x @ x.T)
        assert torch.allclose(lam / m, sol.lam[:, 0], rtol=1e-8), t.name
        assert rel_error(v * m, sol.coef[:, 0] @ x) < 1e-8, t.name


@pytest.mark.slow
def test_global_lambda_matches_dense_svd_over_the_file(tmp_path):
    """One λ per LoRA for every layer: the top singular pair of the K × Σ_l N_l matrix of all
    deltas, its λ constant across layers and stored once in metadata; rebuild still exact."""
    tgts = sample_targets(ARCH)
    paths = random_loras(tmp_path, 3, tgts)
    report = ortho_lora(paths, tmp_path / "o", directions=3, global_lambda=True, dtype=F32)
    files = outputs(report)
    ins = [deltas(p) for p in paths]
    x = torch.cat([torch.stack([d[t.name] for d in ins]) for t in tgts], 1)
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    info = meta(files["ortho_shared"])
    lam = torch.tensor(info["lambda"], dtype=torch.float64)
    assert info["mode"] == "global" and report.totals["lambda_global"] == pytest.approx(lam[:, 0].tolist(), abs=1e-4)
    v = [torch.cat([deltas(files[n])[t.name] for t in tgts])
         for n in ("ortho_shared", "ortho_direction2", "ortho_direction3")]
    for p in range(3):
        assert rel_error(torch.outer(lam[:, p], v[p]), torch.outer(u[:, p] * s[p], vh[p])) < 1e-5
    assert rel_error(lam @ torch.stack(v), x) < 1e-5
    assert all(layer["lambda"] == report.data["layers"][0]["lambda"] for layer in report.data["layers"])


def test_rank_policy_compression_matches_factor_svd(tmp_path):
    tgts = sample_targets(ARCH)
    paths = random_loras(tmp_path, 3, tgts)
    report = ortho_lora(paths, tmp_path / "o", directions=1, residuals=False, rank=RankPolicy("fixed", 3), dtype=F32)
    shared = read_lora(outputs(report)["ortho_shared"])
    forms = [read_lora(p).lowranks() for p in paths]
    rows = {r.module: r for r in report.rows}
    for t in tgts:
        layer = next(d for d in report.data["layers"] if d["module"] == t.name)
        sol = solve(Layer.of([f[t.name] for f in forms]).gram())
        exact, _ = concat([f[t.name].scaled(float(sol.coef[k, 0])) for k, f in enumerate(forms)])
        s = factor_svd(exact).s
        want = float(s[3:].square().sum().sqrt() / s.square().sum().sqrt())
        assert shared.modules[t.name].rank == rows[t.name].rank == 3
        assert rows[t.name].rel_error == pytest.approx(want, rel=1e-4)
        assert rel_error(shared.modules[t.name].delta(), exact.delta()) == pytest.approx(want, rel=1e-3)
        assert layer["lambda"] == sol.lam.tolist()


def test_metadata_and_file_names(tmp_path):
    paths = random_loras(tmp_path, 2, sample_targets(ARCH))
    report = ortho_lora(paths, tmp_path / "o", directions=1, prefix="mix")
    files = outputs(report)
    assert sorted(files) == ["mix_shared", "r0_mix_residual", "r1_mix_residual"]
    lora = read_lora(files["r1_mix_residual"])
    info = json.loads(lora.metadata["ortholora_ortho"])
    assert lora.arch == ARCH and lora.metadata["ss_network_module"] == "networks.lora"
    assert info["role"] == "residual" and info["source"] == 1 and info["mode"] == "layer"
    assert [s["file"] for s in info["sources"]] == ["r0.safetensors", "r1.safetensors"]
    assert lora.metadata["modelspec.merged_from"] == "r0, r1"
    assert lora.modules[next(iter(lora.modules))].up.dtype == torch.float16
    with pytest.raises(OrthoLoraError, match="exists"):
        ortho_lora(paths, tmp_path / "o", directions=1, prefix="mix")


def test_refuses_bad_input(tmp_path):
    sd15 = random_loras(tmp_path, 2, sample_targets(ARCH))
    xl = save(tmp_path / "xl.safetensors", lora_tensors(sample_targets("sdxl"), seed=5, arch_id="sdxl"))
    with pytest.raises(OrthoLoraError, match=r"r0\.safetensors \(sd15\).*xl\.safetensors \(sdxl\)") as e:
        ortho_lora([*sd15, xl])
    assert e.value.path.endswith("xl.safetensors")
    with pytest.raises(OrthoLoraError, match="at least two"):
        ortho_lora(sd15[:1])
    with pytest.raises(OrthoLoraError, match="directions"):
        ortho_lora(sd15, directions=3)
    full = save(tmp_path / "full.safetensors", full_tensors(sample_targets(ARCH)))
    with pytest.raises(OrthoLoraError, match="no exact low-rank form") as e:
        ortho_lora([*sd15, full])
    assert e.value.path.endswith("full.safetensors")


def test_cli(tmp_path, capsys):
    tgts = sample_targets(ARCH)
    paths = random_loras(tmp_path, 3, tgts)
    code = main(["ortho", *map(str, paths), "-o", str(tmp_path / "o"), "--directions", "2", "--dtype", "fp32",
                 "--rank", "fro=0.99", "--json", "--quiet"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    data = out["data"]
    assert data["loras"] == ["r0", "r1", "r2"] and len(out["outputs"]) == 5
    assert len(data["file"]["before"]) == 3 and all(len(row) == 3 for row in data["file"]["after"])
    assert [b["block"] for b in data["blocks"]] == list(dict.fromkeys(t.block for t in tgts))
    assert sum(b["layers"] for b in data["blocks"]) == len(data["layers"]) == len(tgts)
    assert out["totals"]["policy"] == "fro=0.99"
    assert main(["ortho", str(paths[0]), str(paths[1]), "--global-lambda", "--quiet"]) == 0
    assert "cos_file" in capsys.readouterr().out
    assert main(["ortho", str(paths[0]), "--quiet"]) == 2


def test_layer_zero_in_every_lora_is_skipped(tmp_path):
    tgts = sample_targets(ARCH)
    paths = []
    for i in range(2):
        tensors = lora_tensors(tgts, seed=20 + i)
        tensors[f"{tgts[0].name}.lora_up.weight"].zero_()
        paths.append(save(tmp_path / f"z{i}.safetensors", tensors))
    report = ortho_lora(paths, tmp_path / "o", dtype=F32)
    row = next(r for r in report.rows if r.module == tgts[0].name)
    assert row.status == "skipped" and report.count("skipped") == 1
    assert all(tgts[0].name not in read_lora(p).modules for p in report.outputs)
    assert tgts[0].name not in {d["module"] for d in report.data["layers"]}

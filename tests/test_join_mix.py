"""Exact join (+ slices metadata), diag bake, and the weighted LoRA+LoRA merge with recompression."""
from __future__ import annotations

import json
import math

import pytest
import safetensors
import torch

import lorautil as U
from lib_ortholora.cli import main
from lib_ortholora.diag import apply_diag, bake_diag
from lib_ortholora.errors import OrthoLoraError
from lib_ortholora.join import join_loras
from lib_ortholora.joinmeta import META_KEY, join_info_from_metadata
from lib_ortholora.lorafile import read_lora
from lib_ortholora.lowrank import LowRank, concat
from lib_ortholora.mix import mix_loras
from lib_ortholora.sources import exact_lowrank

F32 = torch.float32


def deltas(path) -> dict[str, torch.Tensor]:
    """Every module's dW in its layer's shape (kohya-native names)."""
    lf = read_lora(path)
    return {n: m.delta().reshape(m.shape) for n, m in lf.modules.items()}


def weighted_sum(parts: list[dict[str, torch.Tensor]], ratios: list[float]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for part, r in zip(parts, ratios):
        for n, d in part.items():
            out[n] = out.get(n, 0) + r * d
    return out


def assert_close(got: dict, want: dict, tol: float = 1e-5) -> None:
    assert got.keys() == want.keys()
    for n in want:
        assert float((got[n] - want[n]).norm()) <= tol * max(1.0, float(want[n].norm())), n


@pytest.fixture
def sources(tmp_path):
    """Three sd15 files: a LoRA on three layers of each kind, LoHa and LoKr on overlapping subsets."""
    every = U.sample_targets("sd15", 3)
    some = U.sample_targets("sd15")
    files = {"disney": U.lora_tensors(every, rank=4, alpha=2.0, seed=1),
             "krk": U.loha_tensors(some[::2], rank=2, seed=2),
             "kron": U.lokr_tensors(some[1::2], rank=2, seed=3, variant="both")}
    return [U.save(tmp_path / f"{n}.safetensors", t) for n, t in files.items()]


def test_concat_keeps_each_source_in_its_slice():
    g = torch.Generator().manual_seed(0)
    a = LowRank(torch.randn(6, 2, generator=g), torch.randn(2, 5, generator=g), 0.5, (6, 5))
    b = LowRank(torch.randn(6, 3, generator=g), torch.randn(3, 5, generator=g), 2.0, (6, 5))
    joined, owner = concat([a, None, b], [1.5, 1.0, -0.25])
    assert owner.tolist() == [0, 0, 2, 2, 2] and joined.scale == 1.0
    assert torch.allclose(joined.delta(), 1.5 * a.delta() - 0.25 * b.delta(), atol=1e-6)
    first = apply_diag(joined, torch.tensor([1.0, 1, 0, 0, 0]))
    assert torch.allclose(first.delta(), 1.5 * a.delta(), atol=1e-6)


def test_join_is_exact_and_records_slices(tmp_path, sources):
    ratios = [0.8, -1.3, 0.6]
    out = tmp_path / "joined.safetensors"
    report = join_loras(sources, out, ratios, dtype=F32)
    parts = [deltas(p) for p in sources]
    assert_close(deltas(out), weighted_sum(parts, ratios))
    with safetensors.safe_open(out, "pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    info = join_info_from_metadata(meta)
    assert info.names == ("disney", "krk", "kron")
    assert [s.ratio for s in info.sources] == ratios and info.sources[1].file == "krk.safetensors"
    inputs = [read_lora(p) for p in sources]
    joined = read_lora(out)
    assert len({m.alpha for m in joined.modules.values()}) == 1  # a plain kohya LoRA, one alpha
    for name, module in joined.modules.items():
        assert module.family == "lora" and module.rank == info.total_rank(name)
        want = [exact_lowrank(lf.modules[name]).rank if name in lf.modules else 0
                for lf in inputs]
        assert list(info.module_ranks(name)) == want
    assert not any(k.endswith(("hada_w1_a", "lokr_w1")) for k in keys)
    assert report.totals["modules"] == len(parts[0])


@pytest.mark.parametrize("which", [0, 1, 2])
def test_diag_one_hot_slice_equals_that_source_alone(tmp_path, sources, which):
    ratios = [0.8, -1.3, 0.6]
    joined = tmp_path / "joined.safetensors"
    join_loras(sources, joined, ratios, dtype=F32)
    names = ["disney", "krk", "kron"]
    spec = ",".join(f"{n}={int(i == which)}" for i, n in enumerate(names))
    out = tmp_path / "one.safetensors"
    report = bake_diag(joined, spec, out)
    want = {n: ratios[which] * d for n, d in deltas(sources[which]).items()}
    assert_close(deltas(out), want)
    with safetensors.safe_open(out, "pt") as f:
        info = join_info_from_metadata(f.metadata())
        assert f.metadata()["ortholora_diag"] == spec
    assert info.names == (names[which],)  # zeroed slices left the file and the metadata
    assert all(r == (read_lora(out).modules[n].rank,) for n, r in info.ranks.items())
    assert report.count("dropped") == len(deltas(joined)) - len(want)


def test_diag_all_ones_equals_the_sum_and_keep_zero_keeps_rank(tmp_path, sources):
    joined = tmp_path / "joined.safetensors"
    join_loras(sources, joined, [1.0, 0.5, 2.0], dtype=F32)
    bake_diag(joined, "disney=1,krk=1,kron=1", tmp_path / "ones.safetensors")
    assert_close(deltas(tmp_path / "ones.safetensors"), deltas(joined))
    bake_diag(joined, "krk=0", tmp_path / "kept.safetensors", keep_zero=True)
    kept, full = read_lora(tmp_path / "kept.safetensors"), read_lora(joined)
    assert all(kept.modules[n].rank == full.modules[n].rank for n in full.modules)
    with safetensors.safe_open(tmp_path / "kept.safetensors", "pt") as f:
        assert join_info_from_metadata(f.metadata()).names == ("disney", "krk", "kron")


def test_diag_per_rank_on_a_plain_lora(tmp_path):
    tgts = U.sample_targets("sd15")
    path = U.save(tmp_path / "p.safetensors", U.lora_tensors(tgts, rank=4, alpha=1.0))
    out = tmp_path / "half.safetensors"
    bake_diag(path, "1,0.5,0*2", out)
    lf, src = read_lora(out), read_lora(path)
    for name, module in src.modules.items():
        lr = module.lowrank()
        want = lr.scale * (lr.up[:, :2] * torch.tensor([1.0, 0.5])) @ lr.down[:2]
        assert lf.modules[name].rank == 2
        assert torch.allclose(lf.modules[name].delta().reshape(want.shape), want, atol=1e-6)
    with safetensors.safe_open(out, "pt") as f:
        assert META_KEY not in f.metadata()
        assert f.get_tensor(f"{tgts[0].name}.lora_up.weight").dtype == F32  # the input's dtype is kept


def test_diag_errors_name_the_file(tmp_path, sources):
    with pytest.raises(OrthoLoraError, match="p.safetensors"):
        path = U.save(tmp_path / "p.safetensors", U.lora_tensors(U.sample_targets("sd15"), rank=4))
        bake_diag(path, "1,1,1", tmp_path / "o.safetensors")
    joined = tmp_path / "joined.safetensors"
    join_loras(sources, joined, dtype=F32)
    with pytest.raises(OrthoLoraError, match="unknown source"):
        bake_diag(joined, "nobody=0", tmp_path / "o.safetensors")


def test_join_refuses_mixed_architectures(tmp_path):
    a = U.save(tmp_path / "a.safetensors", U.lora_tensors(U.sample_targets("sd15")))
    b = U.save(tmp_path / "b.safetensors", U.lora_tensors(U.sample_targets("sdxl"), arch_id="sdxl"))
    with pytest.raises(OrthoLoraError, match="b.safetensors"):
        join_loras([a, b], tmp_path / "j.safetensors")


def test_mix_at_full_rank_equals_the_exact_sum(tmp_path, sources):
    ratios = [0.7, 1.1, -0.4]
    out = tmp_path / "mix.safetensors"
    report = mix_loras(sources, out, "fro=1", ratios, dtype=F32)
    assert_close(deltas(out), weighted_sum([deltas(p) for p in sources], ratios), 1e-4)
    assert report.totals["max_rel_error"] < 1e-6


def test_mix_truncation_is_the_best_rank_k_and_reports_its_error(tmp_path, sources):
    ratios = [1.0, 1.0, 1.0]
    out = tmp_path / "mix4.safetensors"
    report = mix_loras(sources, out, 3, ratios, dtype=F32)
    exact = weighted_sum([deltas(p) for p in sources], ratios)
    got = deltas(out)
    rows = {r.module: r for r in report.rows}
    for name, d in exact.items():
        m = d.reshape(d.shape[0], -1).double()
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        k = min(3, len(s))
        best = (u[:, :k] * s[:k]) @ vh[:k]
        assert rows[name].rank == k
        assert torch.allclose(got[name].reshape(m.shape).double(), best, atol=1e-4)
        err = float((m - best).norm() / m.norm())
        assert math.isclose(rows[name].rel_error, err, rel_tol=1e-3, abs_tol=1e-6)
    with safetensors.safe_open(out, "pt") as f:
        assert json.loads(f.metadata()["ortholora_mix"])["rank"] == "fixed=3"


def test_cli_join_diag_mix(tmp_path, sources, capsys):
    j, d, m = (tmp_path / f"{n}.safetensors" for n in ("j", "d", "m"))
    assert main(["join", *map(str, sources), "-r", "1", "0.5", "2", "--names", "a", "b", "c", "-o", str(j),
                 "--dtype", "fp32", "--quiet"]) == 0
    assert main(["diag", str(j), "b=0", "-o", str(d), "--quiet", "--json"]) == 0
    capsys.readouterr()
    assert main(["mix", *map(str, sources), "--rank", "fro=0.9,max=8", "-o", str(m), "--quiet", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["totals"]["policy"] == "fro=0.9,max=8"
    with safetensors.safe_open(d, "pt") as f:
        assert join_info_from_metadata(f.metadata()).names == ("a", "c")
    assert main(["diag", str(j), "zzz=0", "-o", str(tmp_path / "x.safetensors"), "--quiet"]) == 2

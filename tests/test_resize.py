"""Tests of resize: factor-form SVD, recipes and scores, size targets, the base-norm cache, files."""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import safetensors.torch
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lib_ortholora import normcache, parallel
from lib_ortholora.cli import main
from lib_ortholora.errors import OrthoLoraError
from lib_ortholora.fileio import SafetensorsFile, open_tensors
from lib_ortholora.lorafile import read_lora
from lib_ortholora.lowrank import LowRank
from lib_ortholora.memory import Workspace
from lib_ortholora.normcache import BaseCheckpoint, spectral_norm
from lib_ortholora.paths import cache_dir
from lib_ortholora.outputs import OutputExists
from lib_ortholora.resize import choose, output_path, resize_files, subspace_scale
from lib_ortholora.svd import Factored, factor_svd as factor
from lib_ortholora.scores import keep_budget, log_scores, parse_recipe, parse_recipes

from lorautil import lora_tensors, loha_tensors, save, tiny_targets


def spectrum_lowrank(s: list[float], shape: tuple[int, ...], scale: float = 1.0, seed: int = 0) -> LowRank:
    """A LowRank whose delta has exactly the singular values `s` (scale included), with
    deliberately non-orthogonal, unbalanced factors."""
    g = torch.Generator().manual_seed(seed)
    out, inner, k = shape[0], math.prod(shape[1:]), len(s)
    u = torch.linalg.qr(torch.randn(out, k, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(inner, k, generator=g, dtype=torch.float64))[0]
    t = torch.randn(k, k, generator=g, dtype=torch.float64) + 3 * torch.eye(k, dtype=torch.float64)
    sv = torch.tensor(s, dtype=torch.float64) / abs(scale)
    up = (u * sv) @ t * 7.0
    down = torch.linalg.solve(t, v.T) / 7.0
    return LowRank(up.float(), down.float(), scale, shape)


def dense(lr: LowRank) -> torch.Tensor:
    return lr.scale * (lr.up.double() @ lr.down.double())


def layer_delta(f: Factored) -> torch.Tensor:
    return (f.u().double() * f.s) @ f.vh().double()


def recipe_ranks(lr: LowRank, recipe: str) -> int:
    return choose({"m": factor(lr)}, [parse_recipe(recipe)])[0].rows[0].rank


# ---------------------------------------------------------------------------------------------
# Decomposition


@pytest.mark.parametrize("shape,rank,scale", [((40, 24), 6, 0.5), ((16, 8, 3, 3), 5, 2.0),
                                              ((6, 50), 10, 1.0), ((30, 20), 4, -0.75)])
def test_factor_equals_dense_svd(shape, rank, scale):
    g = torch.Generator().manual_seed(1)
    lr = LowRank(torch.randn(shape[0], rank, generator=g), torch.randn(rank, math.prod(shape[1:]), generator=g),
                 scale, shape)
    f = factor(lr)
    d = dense(lr)
    ds = torch.linalg.svdvals(d)
    full = min(d.shape)
    assert f.rank == rank and len(f.s) == min(rank, math.prod(shape[1:]))
    assert torch.allclose(f.s[:full], ds[: min(full, rank)], rtol=0, atol=1e-5 * float(ds[0]))
    assert torch.all(f.s[full:] == 0)
    assert torch.allclose(layer_delta(f), d, rtol=0, atol=1e-5 * float(d.abs().max()))
    live = f.s > 0
    u, vh = f.u()[:, live].double(), f.vh()[live].double()
    eye = torch.eye(int(live.sum()), dtype=torch.float64)
    assert torch.allclose(u.T @ u, eye, atol=1e-5) and torch.allclose(vh @ vh.T, eye, atol=1e-5)


def test_factor_recovers_handmade_spectrum_and_directions():
    s = [8.0, 4.0, 2.0, 1.0, 0.5, 0.25]
    lr = spectrum_lowrank(s, (30, 20), scale=0.25)
    f = factor(lr)
    assert torch.allclose(f.s, torch.tensor(s, dtype=torch.float64), rtol=1e-6)
    u, _, vh = torch.linalg.svd(dense(lr))
    assert torch.allclose((f.u().double().T @ u[:, :6]).diag().abs(), torch.ones(6, dtype=torch.float64), atol=1e-6)
    assert torch.allclose((f.vh().double() @ vh[:6].T).diag().abs(), torch.ones(6, dtype=torch.float64), atol=1e-6)


def test_factor_rank_deficient_and_zero_layers():
    g = torch.Generator().manual_seed(2)
    up = torch.randn(12, 3, generator=g)
    lr = LowRank(torch.cat([up, up[:, :1], torch.zeros(12, 1)], 1), torch.randn(5, 9, generator=g), 1.0, (12, 9))
    f = factor(lr)
    assert int((f.s > 0).sum()) == 3
    assert torch.allclose(layer_delta(f), dense(lr), atol=1e-5)
    zero = factor(LowRank(torch.zeros(12, 4), torch.randn(4, 9, generator=g), 1.0, (12, 9)))
    assert torch.all(zero.s == 0)
    sel = choose({"z": zero}, [parse_recipe("rank=4")])[0]
    assert not sel.masks["z"].any() and sel.layout({"z": zero}) == {} and sel.rows[0].status == "zero"


def test_factor_refuses_mismatched_factors():
    with pytest.raises(OrthoLoraError):
        factor(LowRank(torch.ones(4, 2), torch.ones(3, 5), 1.0, (4, 5)))


def test_subspace_scale_matches_dense():
    g = torch.Generator().manual_seed(3)
    lr = spectrum_lowrank([3.0, 2.0, 1.0, 0.1], (20, 15), seed=4)
    w = torch.randn(20, 15, generator=g)
    u, _, vh = torch.linalg.svd(dense(lr))
    expected = ((u[:, :4].T @ w.double()) * vh[:4]).sum(1).abs()
    assert torch.allclose(subspace_scale(factor(lr), w), expected, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Methods on hand-made spectra


S6 = [8.0, 4.0, 2.0, 1.0, 0.5, 0.25]


@pytest.mark.parametrize("recipe,expected", [
    ("rank=3", 3), ("rank=99", 6),
    ("sv_ratio=5", 3),                 # σ ≥ 8/5 = 1.6
    ("sv_ratio=10", 4),                # σ ≥ 0.8
    ("sv_ratio=1000", 6), ("sv_ratio=1000,rank=2", 2),
    ("sv_fro=0.95", 2),                # ‖σ_≤2‖/‖σ‖ = √(80/85.3125) = 0.968 (an energy share 0.95 would keep 3)
    ("sv_fro=0.99", 3),                # √(84/85.3125) = 0.9923
    ("sv_fro=1", 6),
    ("sv_cumulative=0.75", 2),         # 12/15.75 = 0.762
    ("sv_cumulative=0.9", 4),          # 14/15.75 = 0.889 < 0.9 ≤ 15/15.75
    ("sv_cumulative=1", 6),
    ("spn_lora=1,thr=-0.5", 2),        # σ/σ_1 ≥ 10^-0.5 = 0.316 → 8, 4
    ("fro_lora=1,thr=-1", 4),          # σ/‖σ‖ ≥ 0.1 (‖σ‖ = 9.2365) → 8, 4, 2, 1
    ("spn_lora=1,fro_lora=3,thr=-1", 4),  # 0.25·log(σ/8) + 0.75·log(σ/9.2365) ≥ −1 → σ ≥ 0.891
    ("spn_lora=1,fro_lora=3,thr=-0.9", 3),  # σ ≥ 1.122 (weights not normalized would keep none)
])
def test_methods_keep_the_defined_ranks(recipe, expected):
    assert recipe_ranks(spectrum_lowrank(S6, (30, 20), scale=0.5), recipe) == expected


def test_threshold_keeps_ties_and_scores_are_weighted_geometric_means():
    s = torch.tensor([4.0, 2.0, 1.0, 0.0], dtype=torch.float64)
    refs = {"spn_lora": 4.0, "fro_ckpt": 100.0}
    sc = log_scores(s, parse_recipe("spn_lora=1,fro_ckpt=1,thr=0").normalized, refs)
    expected = 0.5 * torch.log10(s[:3] / 4) + 0.5 * torch.log10(s[:3] / 100)
    assert torch.allclose(sc[:3], expected) and sc[3] == -math.inf


def test_keep_budget_lands_within_one_direction():
    g = torch.Generator().manual_seed(5)
    scores = [torch.randn(n, generator=g, dtype=torch.float64) for n in (5, 8, 3, 7)]
    scores[1][-2:] = -math.inf
    costs = [100, 260, 50, 180]
    for budget in (0, 49, 150, 777, 1500, 3000, 10**6):
        masks, thr = keep_budget(scores, costs, budget)
        used = sum(int(m.sum()) * c for m, c in zip(masks, costs))
        assert used <= budget
        dropped = [(float(s[~m].max()), c) for s, m, c in zip(scores, masks, costs) if (~m & (s > -math.inf)).any()]
        if dropped:
            best, cost = max(dropped)
            assert budget - used < cost  # the next direction would not have fitted
            assert all(float(s[m].min()) >= best for s, m in zip(scores, masks) if m.any())
            assert thr >= best
        assert not any((m & (s == -math.inf)).any() for s, m in zip(scores, masks))


# ---------------------------------------------------------------------------------------------
# Recipes


@pytest.mark.parametrize("text,canon,tag", [
    ("spn_ckpt=1,thr=-1.2", "spn_ckpt=1,thr=-1.2", "spnckpt1_thr-1.2"),
    (" spn_lora , size = 32 ", "spn_lora=1,size=32", "spnlora1_size32"),
    ("fro_ckpt=3,spn_lora=1,thr=-3.5", "spn_lora=1,fro_ckpt=3,thr=-3.5", "spnlora1_frockpt3_thr-3.5"),
    ("sv_ratio=20", "sv_ratio=20", "svratio20"),
    ("rank=64,sv_fro=0.9", "sv_fro=0.9,rank=64", "svfro0.9_rank64"),
    ("rank=16", "rank=16", "rank16"),
])
def test_recipe_parsing(text, canon, tag):
    r = parse_recipe(text)
    assert (r.text, r.tag) == (canon, tag)
    assert parse_recipe(r.text) == r


def test_recipe_details():
    a, b, c = parse_recipes("spn_ckpt=1,thr=-1.2:spn_lora=1,size=32:fro_lora=1,subspace=3,thr=-1")
    assert a.uses_ckpt and not b.uses_ckpt and c.uses_subspace
    assert c.normalized == {"fro_lora": 0.25, "subspace": 0.75}
    assert parse_recipe("sv_fro=0.9").policy.value == pytest.approx(0.81)  # kohya's p is a norm share


@pytest.mark.parametrize("bad", [
    "", " ", ":", "spn_ckpt=1", "spn_ckpt=1,thr=1,size=2", "spn_ckpt=1,size=0", "spn_ckpt=1,size=-3",
    "spn_ckpt=-1,thr=0", "spn_ckpt=0,thr=0", "spn_ckpt=nan,thr=0", "spn_ckpt=1,thr=inf", "spn_ckpt=1,thr=1e999",
    "spn_ckpt=1,spn_ckpt=2,thr=0", "spn_ckpt=x,thr=0", "thr=1", "size=3", "sv_ratio=0.5", "sv_fro=1.5",
    "sv_cumulative=0", "sv_ratio", "sv_ratio=2,sv_fro=0.5", "rank=0", "rank=1.5", "rank=" + "9" * 5000,
    "sv_ratio=2,spn_lora=1,thr=0", "sv_ratio=2,thr=1", "foo=1", "spn_lora=1,thr=0,", "=1",
    "rank=4:rank=4", "rank=4::rank=2", "spn_lora=1,thr=-1:spn_lora=1.0,thr=-1.0",
])
def test_bad_recipes(bad):
    with pytest.raises(OrthoLoraError):
        parse_recipes(bad)


TOKENS = st.sampled_from(["spn_ckpt", "spn_lora", "fro_ckpt", "fro_lora", "subspace", "thr", "size", "rank",
                          "sv_ratio", "sv_fro", "sv_cumulative", "=", ",", ":", "1", "-1.2", "0", "0.9", "nan",
                          "inf", "-inf", "1e999", "1_0", " ", "", "x", "٣", "\x00", "é", "1e-400", "99999999999"])


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.text(max_size=60), st.lists(TOKENS, max_size=14).map("".join)))
def test_recipe_parser_only_raises_orthoLoraError(text):
    try:
        recipes = parse_recipes(text)
    except OrthoLoraError as err:
        assert "\n" not in str(err)
        return
    for r in recipes:
        assert r.tag and all(c.isalnum() and c.isascii() or c in "._-+" for c in r.tag)
        assert parse_recipe(r.text) == r


# ---------------------------------------------------------------------------------------------
# Base norms and the cache


@pytest.mark.parametrize("shape", [(30, 20), (20, 30), (1, 7), (7, 1), (64, 64), (3, 3)])
def test_spectral_norm_is_accurate(shape):
    g = torch.Generator().manual_seed(6)
    w = torch.randn(shape, generator=g)
    assert spectral_norm(w) == pytest.approx(float(torch.linalg.matrix_norm(w.double(), ord=2)), rel=1e-5)
    assert spectral_norm(torch.zeros(shape)) == 0.0


def test_qkv_norms_use_the_row_block(pairs):
    base, _ = pairs("sd2")
    with BaseCheckpoint(base) as ckpt, open_tensors(base) as f:
        name = "lora_te_text_model_encoder_layers_0_self_attn_k_proj"
        t = ckpt.target(name)
        (got, w), = ckpt.read_group(ckpt.groups([name])[0], Workspace())
        block = f.get(t.ckpt_key)[t.rows[0]:t.rows[1]]
        assert got == t and torch.equal(w, block) and w.shape == t.shape


def test_default_cache_dir_respects_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_dir() == tmp_path / "ortholora"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir() == Path.home() / ".cache" / "ortholora"


def _lora(folder: Path, arch: str = "sd15", rank: int = 6, seed: int = 0, name: str = "lora", **kw) -> Path:
    tensors = lora_tensors(tiny_targets(arch), rank=rank, seed=seed, alpha=rank / 2, arch_id=arch, **kw)
    return save(folder / f"{name}.safetensors", tensors, kw.pop("metadata", None))


def _rewrite(path: Path, key: str, change) -> torch.Tensor:
    """Change one tensor of a safetensors file in place (same size, same header): its new value is
    `change(old)`, in the stored dtype. Returns the new value."""
    with open_tensors(path) as f:
        w = change(f.get(key).clone()).to(f.dtype(key)).contiguous()
    blob = path.read_bytes()
    n = int.from_bytes(blob[:8], "little")
    begin = json.loads(blob[8:8 + n])[key]["data_offsets"][0]
    with open(path, "r+b") as f:
        f.seek(8 + n + begin)
        f.write(w.reshape(-1).view(torch.uint8).numpy().tobytes())
    return w


def _exact(w: torch.Tensor) -> tuple[float, float]:
    flat = w.double().reshape(w.shape[0], -1)
    return float(torch.linalg.matrix_norm(flat, ord=2)), float(flat.norm())


def _norms(ckpt: Path, cache: Path, names: list[str]) -> tuple[dict, int]:
    with BaseCheckpoint(ckpt, cache) as base:
        assert not base.warnings
        return base.norms(names)


def _no_tensor_reads(monkeypatch) -> None:
    def refuse(*a, **k):
        raise AssertionError("tensor data read")
    monkeypatch.setattr(SafetensorsFile, "get", refuse)


@pytest.mark.slow
def test_norm_cache_is_used_and_invalidated(pairs, tmp_path, monkeypatch):
    base, _ = pairs("sd15")
    ckpt = tmp_path / "base.safetensors"
    shutil.copy(base, ckpt)
    lora = _lora(tmp_path)
    cache = tmp_path / "cache"
    run = lambda c=ckpt: resize_files([lora], tmp_path / "out", "spn_ckpt=1,thr=-2", c, cache_dir=cache,
                                      overwrite=True)
    first = run()
    assert first.totals["base_norms"] == f"computed {len(tiny_targets('sd15'))} layers"

    def refuse(w, work=None):
        raise AssertionError("norms recomputed")

    monkeypatch.setattr(normcache, "layer_norms", refuse)
    copy = tmp_path / "renamed.safetensors"
    shutil.copy(ckpt, copy)
    for again in (run(), run(copy)):  # same content, any path: from the cache
        assert again.totals["base_norms"] == "all from cache"
        assert len(again.outputs) == 1
    monkeypatch.undo()

    target = tiny_targets("sd15")[5]
    w = _rewrite(ckpt, target.ckpt_key, lambda w: w * 1.5)
    changed = run()
    assert changed.totals["base_norms"] == "computed 1 layers"
    norms, computed = _norms(ckpt, cache, [target.name])
    assert computed == 0 and (norms[target.name].spectral, norms[target.name].frobenius) == \
        pytest.approx(_exact(w), rel=1e-5)

    for p in cache.glob("*.json"):
        p.write_text("{not json")
    assert run().totals["base_norms"].startswith("computed")  # a broken cache file is rebuilt


QKV = [f"lora_te_text_model_encoder_layers_0_self_attn_{x}_proj" for x in "qkv"]


@pytest.mark.parametrize("change", ["q", "k", "v", "first-element", "last-element", "sign-bit"])
def test_norm_cache_sees_any_changed_byte(pairs, tmp_path, monkeypatch, change):
    """One row block of an open_clip in_proj_weight (q, k or v) changed, or a single element of a
    targeted tensor: that layer's norms are recomputed (and right), the others come from the cache.
    Each run starts fresh, as after a file copy or an edit, and with the file's digests recorded."""
    base, _ = pairs("sd2")
    ckpt = tmp_path / "base.safetensors"
    shutil.copy(base, ckpt)
    cache = tmp_path / "cache"
    with BaseCheckpoint(ckpt, cache) as b:
        fc1 = next(n for n in b.targets if n.endswith("layers_1_mlp_fc1"))
        t = b.target(QKV[0]) if change in "qkv" else b.target(fc1)
    names = QKV + [fc1]
    monkeypatch.setattr(normcache, "RACY_NS", 0)  # the file is settled: its digests get recorded
    before, computed = _norms(ckpt, cache, names)
    assert computed == len(names)

    if change in "qkv":
        hit = QKV["qkv".index(change)]
        rows = slice(*b.target(hit).rows)
        w = _rewrite(ckpt, t.ckpt_key, lambda w: torch.cat([w[:rows.start], w[rows] * 10, w[rows.stop:]]))[rows]
    else:
        hit = fc1
        at = {"first-element": 0, "last-element": -1, "sign-bit": 7}[change]
        w = _rewrite(ckpt, t.ckpt_key, lambda w: w.reshape(-1).index_put_(
            (torch.tensor(at),), -w.reshape(-1)[at] if change == "sign-bit" else torch.tensor(5.0)).reshape(w.shape))
    after, computed = _norms(ckpt, cache, names)
    assert (after[hit].spectral, after[hit].frobenius) == pytest.approx(_exact(w), rel=1e-5)
    assert after[hit] != before[hit] and all(after[n] == before[n] for n in names if n != hit)
    assert computed == 1


def test_warm_norm_cache_reads_no_tensor_data(pairs, tmp_path, monkeypatch):
    """Digests are recorded with the file's stat once the file is settled (last changed more than
    RACY_NS before hashing): a run then reads no tensor data. A file changed just now is hashed
    again on the next run (its norms still come from the cache)."""
    base, _ = pairs("sd15")
    ckpt = tmp_path / "base.safetensors"
    shutil.copy(base, ckpt)
    cache = tmp_path / "cache"
    names = [t.name for t in tiny_targets("sd15")[:6]]
    _norms(ckpt, cache, names)
    assert not list(cache.glob("file-*.json"))  # just written: not settled, nothing recorded
    monkeypatch.setattr(normcache, "layer_norms", lambda w, work=None: pytest.fail("norms recomputed"))
    reads = []
    real_get = SafetensorsFile.get
    monkeypatch.setattr(SafetensorsFile, "get", lambda self, key, buffer=None: reads.append(key) or real_get(self, key, buffer))
    monkeypatch.setattr(normcache, "RACY_NS", 0)
    assert _norms(ckpt, cache, names)[1] == 0 and reads  # hashed again, now recorded
    assert len(list(cache.glob("file-*.json"))) == 1
    _no_tensor_reads(monkeypatch)
    assert _norms(ckpt, cache, names)[1] == 0


def test_norm_cache_sees_a_change_whose_mtime_was_restored(pairs, tmp_path, monkeypatch):
    """A tool that rewrites bytes and sets the mtime back still changes ctime: the digests recorded
    for the old stat are not trusted."""
    base, _ = pairs("sd15")
    ckpt = tmp_path / "base.safetensors"
    shutil.copy(base, ckpt)
    cache = tmp_path / "cache"
    t = tiny_targets("sd15")[3]
    monkeypatch.setattr(normcache, "RACY_NS", 0)
    _norms(ckpt, cache, [t.name])
    st = ckpt.stat()
    w = _rewrite(ckpt, t.ckpt_key, lambda w: w.reshape(-1).index_put_((torch.tensor(0),), torch.tensor(9.0))
                 .reshape(w.shape))
    os.utime(ckpt, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert ckpt.stat().st_mtime_ns == st.st_mtime_ns and ckpt.stat().st_size == st.st_size
    norms, computed = _norms(ckpt, cache, [t.name])
    assert computed == 1 and norms[t.name].frobenius == pytest.approx(_exact(w)[1], rel=1e-5)


def test_a_file_without_an_inode_number_is_never_recorded(tmp_path, monkeypatch):
    """Its stat could be another file's: its digests are never trusted from a record."""
    f = tmp_path / "x.safetensors"
    f.write_bytes(b"x")
    assert normcache.FileState.of(f) is not None
    st = os.stat(f)
    no_inode = SimpleNamespace(st_dev=st.st_dev, st_ino=0, st_size=st.st_size, st_mtime_ns=1, st_ctime_ns=1)
    monkeypatch.setattr(normcache, "os", SimpleNamespace(stat=lambda path: no_inode))  # normcache's view only
    assert normcache.FileState.of(f) is None


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_base_checkpoint(pairs, tmp_path, dtype):
    """An fp8 checkpoint is a base like any other: norms of its values (computed in float32)."""
    base, _ = pairs("sd15")
    tensors = {k: v.to(dtype) if v.is_floating_point() else v
               for k, v in safetensors.torch.load_file(str(base)).items()}
    ckpt = tmp_path / "fp8.safetensors"
    safetensors.torch.save_file(tensors, str(ckpt))
    targets = tiny_targets("sd15")[:4]
    norms, _ = _norms(ckpt, tmp_path / "cache", [t.name for t in targets])
    for t in targets:
        assert (norms[t.name].spectral, norms[t.name].frobenius) == \
            pytest.approx(_exact(tensors[t.ckpt_key].float()), rel=1e-5)
    rep = resize_files([_lora(tmp_path)], tmp_path / "out", "spn_ckpt=1,thr=-2:subspace=1,thr=0", ckpt,
                       cache_dir=tmp_path / "cache")
    assert len(rep.outputs) == 2 and not rep.warnings


def test_parallel_map_keeps_order_and_draws_few_items_ahead():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        drawn = []

        def items():
            for i in range(20):
                drawn.append(i)
                yield i

        seen = []
        for x in parallel.parallel_map(lambda i: (i, torch.get_num_threads()), items()):
            seen.append(x)
            assert len(drawn) <= len(seen) + 4  # two per worker
        assert [i for i, _ in seen] == list(range(20)) and {n for _, n in seen} == {1}
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------
# Files


def _factor_bytes(path: Path, itemsize: int = 2) -> tuple[int, int]:
    """(Σ rank·(out + in·k·k)·itemsize over the file's modules, the largest single direction)."""
    lf = read_lora(path)
    total, largest = 0, 0
    for lr in lf.lowranks().values():
        per = (lr.shape[0] + math.prod(lr.shape[1:])) * itemsize
        total += lr.rank * per
        largest = max(largest, per)
    return total, largest


@pytest.mark.slow
def test_size_target_lands_within_one_direction(tmp_path):
    lora = _lora(tmp_path, rank=8)
    full, largest = _factor_bytes(lora, 4)
    for frac in (0.2, 0.5, 0.9):
        size = full / 2 * frac / 2**20  # fp16 output: half the fp32 input's bytes
        rep = resize_files([lora], tmp_path / "out", f"spn_lora=1,fro_lora=1,size={size:.6f}", overwrite=True)
        used, _ = _factor_bytes(Path(rep.outputs[0]))
        budget = float(f"{size:.6f}") * 2**20
        assert budget - largest / 2 < used <= budget


@pytest.mark.slow
def test_full_rank_reproduces_the_delta(tmp_path):
    lora = _lora(tmp_path, rank=6)
    loha = save(tmp_path / "loha.safetensors", loha_tensors(tiny_targets("sd15")[:40], rank=3))
    rep = resize_files([lora, loha], tmp_path / "out", "rank=1000:spn_lora=1,thr=-12", dtype=torch.float32)
    assert len(rep.outputs) == 4 and not rep.warnings
    for src in (lora, loha):
        before = read_lora(src).modules
        for out in (output_path(tmp_path / "out", src.stem, parse_recipe(r)) for r in ("rank=1000", "spn_lora=1,thr=-12")):
            after = read_lora(out).modules
            assert after.keys() == before.keys()
            with parallel.layer_parallelism():  # many tiny dense references
                for name, m in before.items():
                    d = m.delta()
                    assert torch.allclose(after[name].delta(), d, rtol=0, atol=2e-5 * float(d.abs().max()))


def test_outputs_are_balanced_with_one_alpha_and_metadata(tmp_path):
    meta = {"ss_num_epochs": "7", "ss_training_comment": "hi", "sshs_model_hash": "f" * 64,
            "ss_sd_model_hash": "abc", "ss_network_args": '{"conv_dim": "8"}', "modelspec.author": "me",
            "modelspec.hash_sha256": "0x" + "1" * 64}
    lora = save(tmp_path / "in.safetensors", lora_tensors(tiny_targets("sd15"), rank=6, alpha=3.0), meta)
    rep = resize_files([lora], tmp_path, "sv_ratio=3:rank=2")
    out = Path(rep.outputs[0])
    assert out.name == "in_svratio3.safetensors"
    with open_tensors(out) as f:
        md = f.metadata
        for key in f.keys():
            if key.endswith(".alpha"):
                name = key[: -len(".alpha")]
                down, up = f.get(name + ".lora_down.weight").float(), f.get(name + ".lora_up.weight").float()
                assert float(f.get(key)) == float(md["ss_network_alpha"])  # one alpha for the file
                assert torch.allclose(up.flatten(1).norm(dim=0), down.flatten(1).norm(dim=1), rtol=2e-3)
    assert md["ss_network_dim"] == "Dynamic" and md["ortholora_resize_recipe"] == "sv_ratio=3"
    assert md["ss_num_epochs"] == "7" and md["ss_training_comment"] == "hi" and md["modelspec.author"] == "me"
    assert md["sshs_model_hash"] != meta["sshs_model_hash"]
    assert "ss_sd_model_hash" not in md and "modelspec.hash_sha256" not in md
    assert "conv_dim" in md["ss_network_args"] and '"8"' not in md["ss_network_args"]
    fixed = read_lora(Path(rep.outputs[1]))
    assert fixed.metadata["ss_network_dim"] == "2" and all(m.rank == 2 for m in fixed.modules.values())
    assert {r.extra["recipe"] for r in rep.rows} == {"svratio3", "rank2"}
    assert all(0 <= r.extra["fro_kept"] <= 1 + 1e-9 and r.rel_error is not None for r in rep.rows)


@pytest.mark.slow
def test_base_scores_select_what_their_definition_says(pairs, tmp_path):
    base, _ = pairs("sd15")
    lora = _lora(tmp_path, rank=6)
    recipes = "spn_ckpt=1,thr=-1.3:fro_ckpt=1,thr=-2:subspace=1,thr=0.3"
    rep = resize_files([lora], tmp_path / "out", recipes, base, cache_dir=tmp_path / "c")
    rows = {(r.extra["recipe"], r.module): r for r in rep.rows}
    with open_tensors(base) as f, parallel.layer_parallelism():
        for name, m in read_lora(lora).modules.items():
            lr = m.lowrank()
            u, s, vh = torch.linalg.svd(dense(lr).reshape(lr.shape[0], -1))
            s, u, vh = s[: lr.rank], u[:, : lr.rank], vh[: lr.rank]
            target = next(x for x in tiny_targets("sd15") if x.name == name)
            w = f.get(target.ckpt_key).double().reshape(lr.shape[0], -1)
            spn, fro = float(torch.linalg.matrix_norm(w, ord=2)), float(w.norm())
            sub = ((u.T @ w) * vh).sum(1).abs()
            assert rows[("spnckpt1_thr-1.3", name)].rank == int((torch.log10(s / spn) >= -1.3).sum())
            assert rows[("frockpt1_thr-2", name)].rank == int((torch.log10(s / fro) >= -2).sum())
            assert rows[("subspace1_thr0.3", name)].rank == int((torch.log10(s / sub) >= 0.3).sum())
            err = rows[("spnckpt1_thr-1.3", name)]
            kept = err.rank
            assert err.extra["err_base"] == pytest.approx(float(s[kept:].norm()) / fro, rel=1e-4, abs=1e-9)


@pytest.mark.slow
def test_batch_with_a_corrupt_file_writes_nothing(tmp_path):
    """All or nothing: the error names the corrupt file; the outputs of the good file done before
    it are not published (nor is the folder the run made kept)."""
    good1, good2 = _lora(tmp_path, name="a"), _lora(tmp_path, name="c", seed=1)
    bad = tmp_path / "b.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    with pytest.raises(OrthoLoraError, match=r"/b\.safetensors: "):
        resize_files([good1, bad, good2], tmp_path / "out", "rank=2:sv_fro=0.9")
    assert not (tmp_path / "out").exists()
    rep = resize_files([good1, good2], tmp_path / "out", "rank=2:sv_fro=0.9")
    assert sorted(Path(p).name for p in rep.outputs) == ["a_rank2.safetensors", "a_svfro0.9.safetensors",
                                                         "c_rank2.safetensors", "c_svfro0.9.safetensors"]


def test_outputs_are_never_overwritten_without_overwrite(tmp_path):
    lora = _lora(tmp_path)
    resize_files([lora], tmp_path / "out", "rank=2")
    target = tmp_path / "out" / "lora_rank2.safetensors"
    before = target.read_bytes()
    with pytest.raises(OutputExists, match="lora_rank2.safetensors: exists"):
        resize_files([lora], tmp_path / "out", "rank=3:rank=2")
    assert sorted(os.listdir(tmp_path / "out")) == ["lora_rank2.safetensors"] and target.read_bytes() == before
    replaced = resize_files([_lora(tmp_path, seed=9)], tmp_path / "out", "rank=2", overwrite=True)
    assert replaced.outputs == [str(target)] and target.read_bytes() != before


def test_recipes_needing_the_base_refuse_without_it(tmp_path):
    with pytest.raises(OrthoLoraError, match="needs the base checkpoint"):
        resize_files([_lora(tmp_path)], tmp_path / "out", "spn_lora=1,subspace=1,thr=0")


@pytest.mark.slow
def test_cli(pairs, tmp_path, capsys):
    base, _ = pairs("sd15")
    lora = _lora(tmp_path)
    out = tmp_path / "out"
    cache = ["--cache-dir", str(tmp_path / "cache"), "--quiet"]
    assert main(["resize", str(base), str(lora), "-o", str(out), "-r", "spn_ckpt=1,thr=-1.5:spn_lora=1,size=0.01",
                 *cache]) == 0
    assert (out / "lora_spnckpt1_thr-1.5.safetensors").exists() and (out / "lora_spnlora1_size0.01.safetensors").exists()
    capsys.readouterr()
    assert main(["resize", str(lora), "-o", str(out), "-r", "sv_ratio=10", "--json", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["operation"] == "resize"
    assert (out / "lora_svratio10.safetensors").exists()
    assert main(["resize", str(lora), "-o", str(out), "-r", "fro_ckpt=1,thr=-2", "--quiet"]) == 2
    assert main(["resize", str(lora), "--ckpt", str(base), "-o", str(out), "-r", "fro_ckpt=1,thr=-2", *cache]) == 0
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"junk")
    capsys.readouterr()
    assert main(["resize", str(bad), str(lora), "-o", str(out), "-r", "rank=1", "--quiet"]) == 2
    assert not (out / "lora_rank1.safetensors").exists()
    assert capsys.readouterr().err.startswith(f"error: {bad}: ")

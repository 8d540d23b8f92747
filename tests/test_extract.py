import os
import pickle
import re

import pytest
import safetensors.torch
import torch

from lib_ortholora import arch as _arch
from lib_ortholora.errors import OrthoLoraError
from lib_ortholora.extract import extract_lora
from lib_ortholora.fileio import open_tensors
from lib_ortholora.keys import targets
from lib_ortholora.lorafile import read_lora
from lib_ortholora.lowrank import rel_error
from lib_ortholora.synth import DeltaSpec, delta, write_pair
from lib_ortholora.svd import exact_svd


def _layers(base_path, tuned_path):
    with open_tensors(base_path) as b, open_tensors(tuned_path) as t:
        shapes = {k: b.shape(k) for k in b.keys()}
        for tg in targets(_arch.detect(shapes), shapes):
            rows = slice(*tg.rows) if tg.rows else slice(None)
            yield tg, b.get(tg.ckpt_key)[rows].float(), t.get(tg.ckpt_key)[rows].float()


@pytest.mark.parametrize("arch_id", ["sd15", pytest.param("sd2", marks=pytest.mark.slow),
                                     pytest.param("sdxl", marks=pytest.mark.slow)])
def test_base_plus_lora_reconstructs_tuned(pairs, tmp_path, arch_id):
    base, tuned = pairs(arch_id)
    out = tmp_path / "x.safetensors"
    report = extract_lora(base, tuned, 8, min_rank=1, max_rank=None, save_path=out, dtype=torch.float32)
    lora = read_lora(out)
    assert lora.arch == arch_id and not lora.unknown
    assert report.totals["modules"] == len(lora.modules) == len(targets(_arch.Arch(arch_id), _arch.spec(arch_id, 16)))
    for tg, w0, w1 in _layers(base, tuned):
        merged = w0 + lora.modules[tg.name].delta()
        assert rel_error(merged - w0, w1 - w0) < 1e-3, tg.name


@pytest.mark.slow
def test_error_within_one_percent_of_exact_svd(pairs, tmp_path):
    base, tuned = pairs("sd15", noise=0.3)
    out = tmp_path / "x.safetensors"
    extract_lora(base, tuned, "fraction=0.25,min=4,max=12", save_path=out, dtype=torch.float32, svd="randomized")
    lora = read_lora(out)
    checked = 0
    for tg, w0, w1 in _layers(base, tuned):
        d = (w1 - w0).reshape(tg.shape[0], -1)
        r = lora.modules[tg.name].rank
        u, s, vh = exact_svd(d)
        best = rel_error((u[:, :r] * s[:r]) @ vh[:r], d)
        ours = rel_error(lora.modules[tg.name].delta().reshape(d.shape), d)
        assert ours <= best * 1.01 + 1e-6, tg.name
        checked += 1
    assert checked == 350


@pytest.mark.slow
def test_ranks_follow_policy_and_conv_policy(pairs, tmp_path):
    base, tuned = pairs("sd15")
    report = extract_lora(base, tuned, 4, min_rank=1, max_rank=None, conv_rank=2, save_path=tmp_path / "a.safetensors")
    by_name = {r.module: r for r in report.rows}
    assert by_name["lora_unet_down_blocks_0_resnets_0_conv1"].rank == 2  # 3×3 conv
    assert by_name["lora_unet_down_blocks_0_resnets_0_time_emb_proj"].rank == 4  # linear in a resnet
    assert by_name["lora_unet_down_blocks_0_attentions_0_proj_in"].rank == 4  # 1×1 conv
    report = extract_lora(base, tuned, 4, min_rank=1, max_rank=None, conv=False, save_path=tmp_path / "b.safetensors")
    assert report.totals["modules"] == 72 + 192
    lora = read_lora(tmp_path / "a.safetensors")
    assert lora.modules["lora_unet_down_blocks_0_resnets_0_conv1"].down.shape[1:] == (20, 3, 3)
    assert lora.modules["lora_unet_down_blocks_0_resnets_0_conv1"].up.shape[2:] == (1, 1)


@pytest.mark.slow
def test_sv_ratio_policy_finds_true_rank(pairs, tmp_path):
    base, tuned = pairs("sd15")  # exact rank-8 deltas with σ_i ∝ 0.8^i
    report = extract_lora(base, tuned, "sv_ratio=1000", save_path=tmp_path / "x.safetensors", conv=False)
    ranks = {r.rank for r in report.rows if r.status == "ok"}
    assert ranks == {8}


@pytest.mark.slow
def test_unchanged_text_encoder_is_reported(tmp_path):
    base, tuned = write_pair("sd15", tmp_path, dtype=torch.float32, deltas=DeltaSpec(text_rel=0.0, conv=False))
    report = extract_lora(base, tuned, 4, save_path=tmp_path / "x.safetensors")
    skipped = [r for r in report.rows if r.status == "skipped"]
    assert report.totals["skipped_text_encoder"] == 72
    assert len(skipped) == 72 + 86 and all("unchanged" in r.note for r in skipped)
    assert report.warnings and "158 unchanged modules skipped" in report.warnings[0]


def test_known_delta_is_what_synth_says(pairs):
    base, tuned = pairs("sd2")
    for tg, w0, w1 in list(_layers(base, tuned))[:20]:
        assert torch.allclose(w1 - w0, delta(tg, 0, DeltaSpec(noise=0.0)), atol=1e-5)


@pytest.mark.slow
def test_ckpt_inputs(pairs, tmp_path):
    base, tuned = pairs("sd15")
    paths = []
    for p in (base, tuned):
        with open_tensors(p) as f:
            sd = {k: f.get(k) for k in f.keys()}
        out = tmp_path / (p.stem + ".ckpt")
        torch.save({"state_dict": sd}, out)
        paths.append(out)
    report = extract_lora(*paths, 4, save_path=tmp_path / "x.safetensors")
    assert report.totals["modules"] == 350


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/ortholora_pwned",))


def test_malicious_ckpt_refused(pairs, tmp_path):
    base, _ = pairs("sd15")
    evil = tmp_path / "evil.ckpt"
    evil.write_bytes(pickle.dumps({"state_dict": _Evil()}))
    with pytest.raises(OrthoLoraError, match="evil.ckpt"):
        extract_lora(base, evil, 4, save_path=tmp_path / "x.safetensors")
    assert not os.path.exists("/tmp/ortholora_pwned")
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.slow
def test_mismatched_architectures(pairs, tmp_path):
    with pytest.raises(OrthoLoraError, match="SD1.x.*SDXL|SDXL.*SD1.x"):
        extract_lora(pairs("sd15")[0], pairs("sdxl")[1], 4, save_path=tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_refuses_to_overwrite(pairs, tmp_path):
    out = tmp_path / "x.safetensors"
    out.write_bytes(b"keep me")
    with pytest.raises(OrthoLoraError, match="exists"):
        extract_lora(*pairs("sd15"), 4, save_path=out)
    assert out.read_bytes() == b"keep me"
    extract_lora(*pairs("sd15"), 4, save_path=out, overwrite=True)
    assert read_lora(out).arch == "sd15"


@pytest.mark.slow
def test_demo_cli(tmp_path, capsys):
    from lib_ortholora.cli import main
    assert main(["demo", "-o", str(tmp_path), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "roundtrip_rel_error" in out and (tmp_path / "demo_lora.safetensors").exists()
    assert main(["extract", str(tmp_path / "x"), str(tmp_path / "y"), "-o", str(tmp_path / "z.safetensors")]) == 2


def _extract_open(base, tuned, threads: int, policy: str = "fro=0.9,max=6"):
    from lib_ortholora.extract import extract
    from lib_ortholora.rank import as_policy
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with open_tensors(base) as b, open_tensors(tuned) as t:
            return extract(b, t, as_policy(policy, 1, None), as_policy(policy, 1, None), device="cpu")
    finally:
        torch.set_num_threads(before)


def test_layers_spread_over_threads_give_the_same_lora_and_keep_no_shared_buffer(pairs):
    """Each worker thread reuses its own buffers; the LowRanks kept for the output are copies that
    share memory with nothing (SDXL: q/k/v row blocks of one in_proj read once)."""
    base, tuned = pairs("sdxl", noise=0.3)
    _, one, rep1 = _extract_open(base, tuned, 1)
    _, two, rep2 = _extract_open(base, tuned, 2)
    assert list(one) == list(two) and len(one) == len(targets(_arch.Arch("sdxl"), _arch.spec("sdxl", 16)))
    assert [(r.module, r.rank, r.rel_error) for r in rep1.rows] == [(r.module, r.rank, r.rel_error) for r in rep2.rows]
    storages = set()
    for name, lr in two.items():
        assert torch.equal(lr.up, one[name].up) and torch.equal(lr.down, one[name].down), name
        for t in (lr.up, lr.down):
            storages.add(t.untyped_storage().data_ptr())
            assert t.untyped_storage().nbytes() == t.nbytes, name  # owns exactly its values
    assert len(storages) == 2 * len(two)


def test_extracted_layers_match_a_fresh_reference(pairs):
    """Each LowRank is the truncated SVD of its own layer's delta (not of a stale buffer)."""
    base, tuned = pairs("sd2", noise=0.3)
    _, lowranks, report = _extract_open(base, tuned, 2, "4")
    errors = {r.module: r.rel_error for r in report.rows}
    for tg, w0, w1 in _layers(base, tuned):
        d = (w1 - w0).reshape(tg.shape[0], -1)
        u, s, vh = exact_svd(d)
        best = rel_error((u[:, :4] * s[:4]) @ vh[:4], d)
        ours = rel_error(lowranks[tg.name].delta().reshape(d.shape), d)
        assert ours <= best * 1.01 + 1e-6, tg.name
        assert errors[tg.name] == pytest.approx(ours, rel=1e-3, abs=1e-6), tg.name


@pytest.mark.parametrize("scale", [2.0 ** -110, 1.0, 2.0 ** 70])
def test_reported_error_holds_for_tiny_and_huge_deltas(scale):
    """The relative error comes from float32 squares of a rescaled delta: no under/overflow."""
    from lib_ortholora.extract import decompose
    from lib_ortholora.rank import as_policy
    d = torch.randn(96, 64, generator=torch.Generator().manual_seed(0))
    u, s, vh = exact_svd(d.double())
    want = float(s[6:].square().sum().sqrt() / s.square().sum().sqrt())
    lr, err = decompose(d * scale, (96, 64), as_policy(6, 1, None), "exact")
    assert err == pytest.approx(want, rel=1e-5)
    assert lr.rank == 6


def test_delta_that_overflows_float32_is_refused(pairs, tmp_path):
    base, tuned = pairs("sd15")
    key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight"
    paths = []
    for path, value in ((base, -3e38), (tuned, 3e38)):
        tensors = safetensors.torch.load_file(str(path))
        tensors[key][0, 0] = value
        paths.append(tmp_path / path.name)
        safetensors.torch.save_file(tensors, str(paths[-1]))
    with pytest.raises(OrthoLoraError, match=rf"{re.escape(key)}: tuned − base overflows float32"):
        extract_lora(*paths, 4, save_path=tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()

"""A real consumer loads what we write: diffusers (from PyPI, no network) reads LoRAs this project
wrote into tiny SD1.5 / SD2 / SDXL UNets and text encoders (the real module names), and each fused
weight must change by exactly the delta the file claims.

Two references, neither using this project's kohya → diffusers naming:
- extraction (SD1.5): base and tuned LDM checkpoints converted by diffusers' single-file converter:
  "base + our LoRA, as diffusers loads it" must equal "tuned, as diffusers converts it";
- any file (`interop_util.DiffusersCheck`): the LDM checkpoint with the file merged by `merge`, then
  converted by diffusers. Ranks vary from module to module (diffusers keeps one alpha per component,
  so a per-module alpha would be dropped for UNet attention and CLIP layers: `lorafile.file_alpha`)."""
from __future__ import annotations

import math

import pytest
import safetensors.torch
import torch

import diffusers  # noqa: E402,F401  (dev requirements; a missing consumer must fail, not skip)
import peft  # noqa: E402,F401

from lib_ortholora.arch import Arch, spec  # noqa: E402
from lib_ortholora.extract import extract_lora  # noqa: E402
from lib_ortholora.keys import targets  # noqa: E402
from lib_ortholora.lorafile import read_lora, write_lora  # noqa: E402

import interop_util as IU  # noqa: E402

RANK = 6
TOL = {torch.float32: 2e-5, torch.float16: 2e-3}


def _changed_targets():
    """About two thirds of all targets (text, attention, 1×1 and 3×3 convs, samplers) change."""
    tgts = targets(Arch("sd15"), spec("sd15", 16), conv=True)
    chosen = [t for i, t in enumerate(tgts) if i % 3 != 2]
    kinds = {("te" if t.is_text else "conv3" if t.kernel > 1 else "conv1" if len(t.shape) == 4 else "linear")
             for t in chosen}
    assert kinds == {"te", "conv3", "conv1", "linear"}
    # diffusers infers the text encoder's key style from out_proj (docs/interop-notes.md)
    assert any(t.name.endswith("self_attn_out_proj") for t in chosen)
    return tgts, chosen


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    """Base/tuned LDM checkpoints (fp32) differing by known rank-6 deltas on chosen targets, and
    the LoRA `extract_lora` makes from them (fp32, and the same written in fp16)."""
    folder = tmp_path_factory.mktemp("diffusers_interop")
    base, tuned = IU.sd15_base(), IU.sd15_base()
    tgts, chosen = _changed_targets()
    gen = torch.Generator().manual_seed(7)
    for t in chosen:
        inner = math.prod(t.shape[1:])
        d = torch.randn(t.shape[0], RANK, generator=gen) @ torch.randn(RANK, inner, generator=gen)
        d *= 0.05 * float(base[t.ckpt_key].norm()) / float(d.norm())
        tuned[t.ckpt_key] += d.reshape(t.shape)
    paths = {name: folder / f"{name}.safetensors" for name in ("base", "tuned", "lora32", "lora16")}
    safetensors.torch.save_file(base, str(paths["base"]))
    safetensors.torch.save_file(tuned, str(paths["tuned"]))
    report = extract_lora(paths["base"], paths["tuned"], RANK, save_path=paths["lora32"], svd="exact",
                          device="cpu", dtype=torch.float32)
    # the fp16 file extract_lora(dtype=fp16) writes: the same LowRanks through the same writer
    lf = read_lora(paths["lora32"])
    write_lora(paths["lora16"], lf.lowranks(), lf.arch, torch.float16, {"ortholora_operation": "extract"})
    return {"base": base, "tuned": tuned, "paths": paths, "report": report, "targets": tgts, "chosen": chosen}


@pytest.fixture(scope="module")
def sd15():
    return IU.DiffusersCheck("sd15")


@pytest.fixture(scope="module")
def expected(extracted, sd15):
    """diffusers' conversion of base and tuned: {"unet/…"/"text_encoder/…": tensor} each."""
    models = sd15.models
    IU.load_checkpoint("sd15", models, extracted["base"])
    base = IU.snapshot(models)
    IU.load_checkpoint("sd15", models, extracted["tuned"])
    tuned = IU.snapshot(models)
    IU.reset(models, sd15.base)
    return base, tuned


def _fused(sd15, extracted, path, scale: float = 1.0) -> dict[str, torch.Tensor]:
    models = sd15.models
    IU.load_checkpoint("sd15", models, extracted["base"])
    IU.diffusers_apply("sd15", models, path, scale)
    out = IU.snapshot(models)
    IU.reset(models, sd15.base)
    return out


def test_extract_report_skips_exactly_the_unchanged_layers(extracted):
    report = extracted["report"]
    chosen = {t.name for t in extracted["chosen"]}
    ok = {r.module for r in report.rows if r.status == "ok"}
    skipped = {r.module for r in report.rows if r.status == "skipped"}
    assert ok == chosen
    assert skipped == {t.name for t in extracted["targets"]} - chosen
    lf = read_lora(extracted["paths"]["lora32"])
    assert lf.arch == "sd15" and set(lf.modules) == chosen and not lf.unknown and not lf.stray_keys


def test_diffusers_conversion_covers_the_whole_checkpoint(expected, extracted):
    """Sanity of the reference: every chosen target moved a weight in diffusers' conversion."""
    base, tuned = expected
    moved = [k for k in base if not torch.equal(base[k], tuned[k])]
    assert len(moved) == len(extracted["chosen"])
    assert all(k.endswith(".weight") for k in moved)


@pytest.mark.parametrize("which,rtol", [("lora32", 2e-5), ("lora16", 2e-3)])
def test_diffusers_fuses_exactly_the_extracted_delta(sd15, extracted, expected, which, rtol):
    base, tuned = expected
    fused = _fused(sd15, extracted, extracted["paths"][which])
    assert fused.keys() == base.keys()
    should = {k for k in base if not torch.equal(base[k], tuned[k])}
    did = {k for k in base if not torch.equal(base[k], fused[k])}
    assert did == should, (sorted(did - should)[:5], sorted(should - did)[:5])
    worst = 0.0
    for k in should:
        want, got = tuned[k] - base[k], fused[k] - base[k]
        worst = max(worst, float((got - want).norm() / want.norm()))
    assert worst < rtol, f"largest relative error of a fused delta: {worst:.3g}"


def test_diffusers_lora_scale_is_linear(sd15, extracted, expected):
    """A multiplier scales every delta (diffusers' lora_scale is kohya's multiplier)."""
    base, tuned = expected
    fused = _fused(sd15, extracted, extracted["paths"]["lora32"], scale=-0.5)
    for k in base:
        want = -0.5 * (tuned[k] - base[k])
        got = fused[k] - base[k]
        if not want.any():
            assert torch.equal(fused[k], base[k]), k
        else:
            assert float((got - want).norm() / want.norm()) < 2e-5, k


def test_diffusers_loads_a_signed_join(sd15, extracted, expected, tmp_path):
    """An exact join (signed ratios folded into the factors, `ortholora_join` metadata) is an
    ordinary LoRA to diffusers: 0.5·dW − 1.5·dW fuses as −dW."""
    from lib_ortholora.join import join_loras

    lora = extracted["paths"]["lora32"]
    joined = tmp_path / "joined.safetensors"
    join_loras([lora, lora], joined, [0.5, -1.5], names=["a", "b"], dtype=torch.float32)
    base, tuned = expected
    fused = _fused(sd15, extracted, joined)
    for k in base:
        want = base[k] - tuned[k]
        if not want.any():
            assert torch.equal(fused[k], base[k]), k
        else:
            assert float((fused[k] - base[k] - want).norm() / want.norm()) < 2e-5, k


# --------------------------------------------------------------------------------------------
# Ranks that vary from module to module, every architecture, text encoders included

@pytest.fixture(scope="module", params=["sd15", "sd2", "sdxl"])
def checker(request):
    return IU.DiffusersCheck(request.param)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_varying_ranks_load_at_the_right_strength(checker, tmp_path, dtype):
    """Every module of a file whose ranks vary (UNet attention and text encoders included) is fused
    by diffusers at exactly its own strength (before: ×0.5 … ×0.38 on the alpha exceptions)."""
    lowranks = IU.varying_rank_lowranks(checker.arch)
    path = tmp_path / f"{checker.arch}.safetensors"
    write_lora(path, lowranks, checker.arch, dtype)
    errs = checker.errors(path)
    assert len(errs) == len(lowranks)  # one weight per module, nothing else
    assert max(errs.values()) < TOL[dtype], IU.strength_summary(errs, TOL[dtype])


def test_varying_ranks_with_a_multiplier(checker, tmp_path):
    """diffusers' lora_scale multiplies every module of a varying-rank file alike."""
    path = tmp_path / f"{checker.arch}.safetensors"
    write_lora(path, IU.varying_rank_lowranks(checker.arch, seed=1), checker.arch, torch.float32)
    errs = checker.errors(path, scale=-0.75)
    assert max(errs.values()) < TOL[torch.float32], IU.strength_summary(errs, TOL[torch.float32])

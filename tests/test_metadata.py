"""What a written LoRA says about the model it is for: modelspec.implementation, and the base
model's prediction type (SD2 768-v vs 512), detected from the checkpoints, overridable, and carried
through every operation. Also: `synth -o` creates its folder."""
from __future__ import annotations

import math

import pytest
import safetensors.torch
import torch

from lib_ortholora import prediction as P
from lib_ortholora.arch import Arch
from lib_ortholora.cli import main
from lib_ortholora.extract import extract_lora
from lib_ortholora.fileio import open_tensors
from lib_ortholora.diag import bake_diag
from lib_ortholora.join import join_loras
from lib_ortholora.keys import targets
from lib_ortholora.lorafile import read_lora, write_lora
from lib_ortholora.mix import mix_loras
from lib_ortholora.ortho import ortho_lora
from lib_ortholora.resize import resize_files

import interop_util as IU

V_SPEC = "stable-diffusion-v2-768-v/lora"


def _meta(path) -> dict[str, str]:
    with open_tensors(path) as f:
        return dict(f.metadata)


def _pair(tmp_path, arch: str, name: str = "model", stat: float | None = None, meta: dict | None = None,
          keys: dict | None = None):
    """A tiny base/tuned checkpoint pair (tuned = base + a rank-2 delta on a few layers); `stat`:
    the std SD2's statistic layer (norm1.bias of output_blocks.11.1) gets in both; `meta`: tuned's
    metadata; `keys`: extra tensors in tuned."""
    base = IU.base_checkpoint(arch)
    if stat is not None:
        b = base[P.SD2_STATISTIC_KEY]
        base[P.SD2_STATISTIC_KEY] = (b - b.mean()) / b.std(unbiased=False) * stat
    tuned = {k: v.clone() for k, v in base.items()}
    gen = torch.Generator().manual_seed(0)
    for t in targets(Arch(arch), {k: tuple(v.shape) for k, v in base.items()})[::40]:
        rows = slice(*t.rows) if t.rows else slice(None)
        d = torch.randn(t.shape[0], 2, generator=gen) @ torch.randn(2, math.prod(t.shape[1:]), generator=gen)
        tuned[t.ckpt_key][rows] += 0.01 * d.reshape(t.shape)
    tuned.update(keys or {})
    paths = tmp_path / f"{name}_base.safetensors", tmp_path / f"{name}.safetensors"
    safetensors.torch.save_file(base, str(paths[0]))
    safetensors.torch.save_file(tuned, str(paths[1]), meta)
    return paths


def _extract(tmp_path, pair, **kw):
    out = tmp_path / "out.safetensors"
    report = extract_lora(*pair, 4, save_path=out, device="cpu", overwrite=True, **kw)
    return _meta(out), report


@pytest.mark.parametrize("arch,impl", [("sd15", "diffusers"), ("sd2", "diffusers"),
                                       ("sdxl", "https://github.com/Stability-AI/generative-models")])
def test_every_file_names_its_implementation(tmp_path, arch, impl):
    """modelspec.implementation is a MUST of the ModelSpec; kohya's values (our keys are kohya's)."""
    meta, _ = _extract(tmp_path, _pair(tmp_path, arch))
    assert meta["modelspec.implementation"] == impl and meta["modelspec.sai_model_spec"] == "1.0.1"
    assert meta["modelspec.prediction_type"] == "epsilon"


def test_sd2_768_v_is_told_by_the_weight_statistic(tmp_path):
    """No metadata, no name hint: SD2's norm1.bias statistic (std > 0.09 → v) decides, and the report
    says it is a guess and how to override."""
    meta, report = _extract(tmp_path, _pair(tmp_path, "sd2", stat=0.12))
    assert meta["modelspec.architecture"] == V_SPEC and meta["modelspec.prediction_type"] == "v"
    assert meta["modelspec.resolution"] == "768x768" and meta["ss_base_model_version"] == "sd_v2_v"
    assert "weight statistic" in report.totals["prediction"] and "a guess" in report.totals["prediction"]
    assert any("--prediction" in w for w in report.warnings)
    meta, report = _extract(tmp_path, _pair(tmp_path, "sd2", stat=0.03))
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-512/lora"
    assert meta["modelspec.prediction_type"] == "epsilon" and meta["ss_base_model_version"] == "sd_v2"


@pytest.mark.parametrize("meta,expected", [
    ({"modelspec.prediction_type": "epsilon"}, "epsilon"),
    ({"modelspec.architecture": "stable-diffusion-v2-512"}, "epsilon"),
    ({"ss_base_model_version": "sd_v2_v"}, "v"),
    ({"modelspec.prediction_type": "v_prediction"}, "v"),
])
def test_checkpoint_metadata_outranks_the_statistic(tmp_path, meta, expected):
    stat = 0.12 if expected == "epsilon" else 0.03
    out, report = _extract(tmp_path, _pair(tmp_path, "sd2", stat=stat, meta=meta))
    assert out["modelspec.prediction_type"] == expected
    assert not any("prediction" in w for w in report.warnings)
    assert next(iter(meta)) in report.totals["prediction"]


def test_file_names_and_the_user_decide(tmp_path):
    meta, report = _extract(tmp_path, _pair(tmp_path, "sd2", name="v2-1_768-ema-pruned", stat=0.03))
    assert meta["modelspec.prediction_type"] == "v" and "file name" in report.totals["prediction"]
    meta, report = _extract(tmp_path, _pair(tmp_path, "sd2", stat=0.12), prediction="epsilon")
    assert meta["modelspec.prediction_type"] == "epsilon" and report.totals["prediction"] == "epsilon (given)"
    assert not any("prediction" in w for w in report.warnings)
    pair = _pair(tmp_path, "sd2", name="plain", stat=0.03)
    out = tmp_path / "cli.safetensors"
    assert main(["extract", str(pair[0]), str(pair[1]), "-o", str(out), "--rank", "4", "--device", "cpu",
                 "--prediction", "v", "--quiet"]) == 0
    assert _meta(out)["modelspec.architecture"] == V_SPEC
    with pytest.raises(Exception, match="unknown prediction type"):
        extract_lora(*pair, 4, device="cpu", prediction="x0")


def test_sdxl_v_pred_key(tmp_path):
    """A `v_pred` tensor marks a v-prediction SDXL checkpoint (ComfyUI's convention)."""
    meta, report = _extract(tmp_path, _pair(tmp_path, "sdxl", keys={"v_pred": torch.tensor([])}))
    assert meta["modelspec.prediction_type"] == "v" and "v_pred" in report.totals["prediction"]
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert read_lora(tmp_path / "out.safetensors").arch == "sdxl"


@pytest.mark.parametrize("name,arch,expected", [
    ("v2-1_768-ema-pruned", "sd2", "v"), ("768-v-ema", "sd2", "v"), ("512-base-ema", "sd2", "epsilon"),
    ("myModel_vPred_v10", "sdxl", "v"), ("noob-v-prediction", "sdxl", "v"), ("anime_eps_1.0", "sdxl", "epsilon"),
    ("realistic768", "sd15", None), ("sd_xl_base_1.0", "sdxl", None), ("model-v2", "sd2", None)])
def test_file_name_hints(name, arch, expected):
    assert P.from_name(f"{name}.safetensors", arch) == expected


def test_every_operation_carries_the_prediction_type(tmp_path):
    """A LoRA for a 768-v model stays one through resize, join, mix, diag and ortho; inputs that
    disagree leave the type unstated."""
    lrs = IU.varying_rank_lowranks("sd2")
    a, b, c = (tmp_path / f"{n}.safetensors" for n in "abc")
    write_lora(a, lrs, "sd2", torch.float32, {"ss_training_comment": "hi"}, prediction="v")
    d = tmp_path / "d.safetensors"  # one rank everywhere, for a per-rank diag spec
    write_lora(d, {n: lr for n, lr in lrs.items() if lr.rank == 4}, "sd2", torch.float32,
               {"ss_training_comment": "hi"}, prediction="v")
    write_lora(b, {n: lr.scaled(-0.5) for n, lr in lrs.items()}, "sd2", torch.float32, prediction="v")
    write_lora(c, lrs, "sd2", torch.float32, prediction="epsilon")
    outs = {"resize": resize_files([a], tmp_path / "r", "sv_ratio=4").outputs[0],
            "ortho": ortho_lora([a, b], tmp_path / "o").outputs[0]}
    join_loras([a, b], tmp_path / "join.safetensors", [1.0, 0.5], names=["a", "b"])
    mix_loras([a, b], tmp_path / "mix.safetensors", 3)
    bake_diag(tmp_path / "join.safetensors", "a@1,b@0", tmp_path / "diag.safetensors")
    bake_diag(d, "1*2,0*2", tmp_path / "diag1.safetensors")
    outs |= {n: tmp_path / f"{n}.safetensors" for n in ("join", "mix", "diag", "diag1")}
    for op, path in outs.items():
        meta = _meta(path)
        assert meta["modelspec.prediction_type"] == "v", op
        assert meta["modelspec.architecture"] == V_SPEC and meta["ss_base_model_version"] == "sd_v2_v", op
        assert meta["modelspec.implementation"] == "diffusers", op
    for op in ("resize", "diag1"):  # one input: its training metadata stays
        assert _meta(outs[op])["ss_training_comment"] == "hi", op
    disagreeing = {"join": join_loras([a, c], tmp_path / "both.safetensors"),
                   "mix": mix_loras([a, c], tmp_path / "mixboth.safetensors", 3),
                   "ortho": ortho_lora([a, c], tmp_path / "oboth")}
    for op, report in disagreeing.items():
        assert any("a.safetensors: v, c.safetensors: epsilon" in w for w in report.warnings), (op, report.warnings)
    assert not any("prediction" in w for w in ortho_lora([a, b], tmp_path / "o2").warnings)
    meta = _meta(tmp_path / "both.safetensors")
    assert "modelspec.prediction_type" not in meta and meta["modelspec.architecture"] == "stable-diffusion-v2-512/lora"


def test_synth_creates_its_output_folder(tmp_path):
    out = tmp_path / "not" / "yet"
    assert main(["synth", "--arch", "sd15", "-o", str(out), "--quiet"]) == 0
    assert (out / "sd15_base.safetensors").exists() and (out / "sd15_tuned.safetensors").exists()

"""LyCORIS files written by the `lycoris-lora` package's own networks (kohya entry point) on a tiny
SD1.5 UNet + CLIP text encoder are read by `lorafile.read_lora` to the same dW that LyCORIS itself
applies — LoHa, LoKr (mixed full / factorized W2, decompose_both, Tucker), LoCon (plain and Tucker),
full diffs (with bias) — and, where the module has an exact low-rank form, `lowrank().delta()`
equals it too. Families that are not a plain additive delta (IA3, DoRA, diag-OFT, BOFT, GLoRA) are
refused with one line naming the file and the family. LyCORIS's reference is taken from the
in-memory network (see docs/interop-notes.md for the 4.1.3 scale gotcha)."""
from __future__ import annotations

import pytest
import safetensors
import torch

import diffusers  # noqa: E402,F401  (dev requirements; a missing consumer must fail, not skip)
import lycoris  # noqa: E402,F401

from lib_ortholora.errors import OrthoLoraError  # noqa: E402
from lib_ortholora.keys import name_table  # noqa: E402
from lib_ortholora.lorafile import read_lora  # noqa: E402

import interop_util as IU  # noqa: E402

# (id, algo, preset, extra create_network kwargs, tensor suffixes of which the file must hold some)
CASES = [
    ("loha", "loha", IU.SD15_PRESET, {}, {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"}),
    ("lokr", "lokr", IU.SD15_PRESET, {"factor": 4}, {"lokr_w1", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "alpha"}),
    ("locon", "locon", IU.SD15_PRESET, {}, {"lora_down.weight", "lora_up.weight", "alpha"}),
    ("full", "full", IU.SD15_PRESET, {}, {"diff", "diff_b"}),
    ("loha-tucker", "loha", IU.CONV_PRESET, {"use_tucker": True}, {"hada_t1", "hada_t2"}),
    ("lokr-tucker", "lokr", IU.CONV_PRESET, {"use_tucker": True, "factor": 4}, {"lokr_t2"}),
    ("lokr-both", "lokr", IU.CONV_PRESET, {"decompose_both": True}, {"lokr_w1_a", "lokr_w1_b"}),
    ("locon-tucker", "locon", IU.CONV_PRESET, {"use_tucker": True}, {"lora_mid.weight"}),
]
FAMILY = {"loha": "loha", "lokr": "lokr", "locon": "lora", "full": "full"}


@pytest.fixture(scope="module")
def models():
    return IU.tiny_unet(), IU.tiny_te()


@pytest.fixture(scope="module")
def written(models, tmp_path_factory):
    """{case id: (file, LyCORIS's {kohya name: (dW, bias delta)})}, built lazily, once."""
    folder = tmp_path_factory.mktemp("lycoris")
    made = {}

    def get(case_id: str):
        if case_id not in made:
            _, algo, preset, kw, _ = next(c for c in CASES if c[0] == case_id)
            path = folder / f"{case_id}.safetensors"
            ref = IU.write_lycoris(*models, path, algo, preset, seed=len(made), **kw)
            made[case_id] = (path, ref)
        return made[case_id]

    return get


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    n = float(b.norm())
    return float((a - b).norm()) / n if n else float(a.norm())


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_read_lora_gives_lycoris_delta(written, case):
    case_id, algo, preset, _, keys = case
    path, ref = written(case_id)
    lf = read_lora(path)
    assert lf.arch == "sd15"
    assert set(lf.modules) == set(ref), sorted(set(ref) ^ set(lf.modules))[:5]
    assert not lf.stray_keys
    with safetensors.safe_open(str(path), "pt") as f:  # the file holds the variant asked for
        suffixes = {k.split(".", 1)[1] for k in f.keys()}
    assert suffixes & keys, sorted(suffixes)
    table = name_table("sd15")
    # conv_in, conv_out and time_embedding are no kohya target: read, but listed as unknown
    assert set(lf.unknown) == {n for n in ref if n not in table}
    worst_delta = worst_lowrank = 0.0
    for name, (dw, db) in ref.items():
        m = lf.modules[name]
        assert m.family == FAMILY[algo], name
        got = m.delta()
        assert got.dtype == torch.float32
        if name in table:
            assert tuple(got.shape) == tuple(dw.shape), name
        worst_delta = max(worst_delta, _rel(got.reshape(dw.shape), dw))
        lr = m.lowrank()
        if algo == "full":
            assert lr is None
            if db is not None:
                assert _rel(m.bias_delta(), db) < 1e-6, name
        else:
            assert lr is not None, name
            worst_lowrank = max(worst_lowrank, _rel(lr.delta().reshape(dw.shape), dw))
    assert worst_delta < 1e-5, f"{case_id}: worst relative error of delta() {worst_delta:.3g}"
    assert worst_lowrank < 1e-5, f"{case_id}: worst relative error of lowrank().delta() {worst_lowrank:.3g}"


def test_scale_is_alpha_over_dim(written):
    """alpha ≠ dim in these files, so a wrong or doubled scale would show above; check it directly."""
    path, _ = written("locon")
    lf = read_lora(path)
    scales = {round(m.lowrank().scale, 6) for m in lf.modules.values()}
    assert scales == {0.5, 0.75}  # alpha 2 / dim 4; 3×3 convs: conv_alpha 1.5 / conv_dim 2


REFUSED = [
    ("ia3", "ia3", {}, "IA3"),
    ("dora", "locon", {"dora_wd": True}, "DoRA"),
    ("diag-oft", "diag-oft", {}, "OFT"),
    ("boft", "boft", {"dim": 16, "conv_dim": 16}, "OFT"),  # BOFT needs width = m·2^n with m ≤ dim
    ("glora", "glora", {}, "GLoRA"),
]


@pytest.mark.parametrize("case_id,algo,kw,family", REFUSED, ids=[r[0] for r in REFUSED])
def test_non_additive_families_are_refused(models, tmp_path, case_id, algo, kw, family):
    path = tmp_path / f"{case_id}.safetensors"
    IU.write_lycoris(*models, path, algo, IU.CONV_PRESET, **kw)
    before = path.read_bytes()
    with pytest.raises(OrthoLoraError) as err:
        read_lora(path)
    text = str(err.value)
    assert "\n" not in text and str(path) in text and family in text, text
    assert path.read_bytes() == before

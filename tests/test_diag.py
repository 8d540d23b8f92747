"""lib_ortholora.diag (spec parser, diag vectors, up-column scaling) and lib_ortholora.joinmeta (join metadata)."""
from __future__ import annotations

import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lib_ortholora.diag import MAX_DIAG_LENGTH, DiagSpec, apply_diag_to_up, diag_vector, layout_vectors, parse_diag
from lib_ortholora.joinmeta import JoinInfo, JoinSource, SliceIndex, join_info_from_metadata, make_join_metadata
from lib_ortholora.joinmeta import safe_source_name
from lib_ortholora.errors import OrthoLoraError

# --------------------------------------------------------------------------- parse_diag


@pytest.mark.parametrize("text, values", [
    ("1,1,0,0.5", (1.0, 1.0, 0.0, 0.5)),
    ("1*3,0*2", (1, 1, 1, 0, 0)),
    (" 1 * 2 , -0.5 ,  2e-1 ", (1, 1, -0.5, 0.2)),
    ("1", (1.0,)),
    ("-1*2,.5,+3.", (-1, -1, 0.5, 3.0)),
    ("0.25*1", (0.25,)),
])
def test_parse_per_rank(text, values):
    spec = parse_diag(text)
    assert spec.kind == "rank"
    assert spec.values == tuple(float(x) for x in values)
    assert parse_diag(spec.text) == spec


@pytest.mark.parametrize("text, slices", [
    ("disney=1,krk=0", (("disney", 1.0), ("krk", 0.0))),
    (" disney = 0.5 , krk=-1 ", (("disney", 0.5), ("krk", -1.0))),
    ("disney@1,krk@0", (("disney", 1.0), ("krk", 0.0))),
    ("my lora@2", (("my lora", 2.0),)),
    ("a.b-c_d=1e-2", (("a.b-c_d", 0.01),)),
])
def test_parse_per_slice(text, slices):
    spec = parse_diag(text)
    assert spec.kind == "slice"
    assert spec.slices == slices
    assert parse_diag(spec.text) == spec
    assert parse_diag(spec.prompt_text) == spec
    assert "=" not in spec.prompt_text


def test_canonical_text_compresses_runs():
    assert parse_diag("1,1,1,0,0,0.5").text == "1*3,0*2,0.5"
    assert parse_diag("krk@0.5").text == "krk=0.5"
    assert parse_diag("krk=0.5").prompt_text == "krk@0.5"
    assert str(parse_diag("1*2")) == "1*2"
    x = 0.1234567891
    assert parse_diag(parse_diag(f"{x!r}").text).values == (x,)


@pytest.mark.parametrize("text", [
    "", "   ", ",", "1,,0", "1,", ",1", "abc", "1,abc", "nan", "inf", "1e999", "-inf",
    "1*", "*3", "1*0", "1*-2", "1*2.5", "1*x", "1**2", "1*99999999999",
    "1*40000,0*40000",  # too long once expanded
    "a=1,0", "0,a=1",  # mixed
    "=1", "@1", "a=", "a=x", "a=1*2", "a=1=2", "a=1,a=2",  # slice problems
    "a:1", "1:0",
    "1 2", "0x10", "1_0", "١", "1e", "e5", ". ",
])
def test_parse_rejects(text):
    with pytest.raises(OrthoLoraError) as e:
        parse_diag(text)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("bad", [None, 1, 1.0, b"1,0", ["1"], object()])
def test_parse_rejects_non_text(bad):
    with pytest.raises(OrthoLoraError):
        parse_diag(bad)


def test_parse_length_cap():
    assert len(parse_diag(f"1*{MAX_DIAG_LENGTH}").values) == MAX_DIAG_LENGTH
    with pytest.raises(OrthoLoraError):
        parse_diag(f"1*{MAX_DIAG_LENGTH},0")
    with pytest.raises(OrthoLoraError):
        parse_diag("1," * 200_000 + "1")


_alphabet = st.sampled_from(list("0123456789.,*=@:-+eE xa_") + ["nan", "inf", "٣", "\n", "\t", "1*9999999"])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.text(max_size=60), st.lists(_alphabet, max_size=30).map("".join)))
def test_parse_fuzz_only_ortholora_error(text):
    try:
        spec = parse_diag(text)
    except OrthoLoraError as e:
        assert "\n" not in str(e)
        return
    assert isinstance(spec, DiagSpec)
    assert parse_diag(spec.text) == spec
    if spec.kind == "rank":
        assert 1 <= len(spec.values) <= MAX_DIAG_LENGTH


# --------------------------------------------------------------------------- join metadata


SOURCES = [{"name": "disney", "file": "disney.safetensors", "ratio": 1.0},
           {"name": "krk", "file": "sub/krk.safetensors", "ratio": -0.5}]
RANKS = {"lora_unet_a": [4, 2], "lora_te_b": [0, 2], "lora_unet_c": [3, 0]}


def _info() -> JoinInfo:
    return join_info_from_metadata({"ortholora_join": make_join_metadata(SOURCES, RANKS)})


def test_join_metadata_round_trip():
    text = make_join_metadata(SOURCES, RANKS)
    obj = json.loads(text)
    assert obj["version"] == 1 and obj["ranks"]["lora_unet_a"] == [4, 2]
    info = join_info_from_metadata({"ortholora_join": text, "ss_network_dim": "6"})
    assert info.names == ("disney", "krk")
    assert info.sources[1] == JoinSource("krk", "sub/krk.safetensors", -0.5)
    assert info.ranks["lora_te_b"] == (0, 2)
    assert info.total_rank("lora_unet_a") == 6
    # the webui hands over metadata strings starting with '{' already JSON-decoded
    assert join_info_from_metadata({"ortholora_join": obj}) == info
    # tuples and JoinSource objects are accepted by the writer
    assert make_join_metadata([("disney", "disney.safetensors", 1), info.sources[1]], RANKS) == text


@pytest.mark.parametrize("metadata", [None, {}, {"ss_network_dim": "4"}, "not a dict"])
def test_join_metadata_absent(metadata):
    assert join_info_from_metadata(metadata) is None


@pytest.mark.parametrize("raw", [
    "{", "[]", "1", '"x"', 7,
    {"version": 2, "sources": SOURCES, "ranks": RANKS},
    {"version": True, "sources": SOURCES, "ranks": RANKS},
    {"version": 1, "sources": [], "ranks": RANKS},
    {"version": 1, "sources": [{"name": ""}], "ranks": {}},
    {"version": 1, "sources": [{"name": "a,b"}], "ranks": {}},
    {"version": 1, "sources": [{"name": "a"}, {"name": "a"}], "ranks": {}},
    {"version": 1, "sources": [{"name": "a", "ratio": "x"}], "ranks": {}},
    {"version": 1, "sources": [{"name": "a", "ratio": float("nan")}], "ranks": {}},
    {"version": 1, "sources": SOURCES, "ranks": {"m": [1]}},
    {"version": 1, "sources": SOURCES, "ranks": {"m": [1, -1]}},
    {"version": 1, "sources": SOURCES, "ranks": {"m": [1, 1.5]}},
    {"version": 1, "sources": SOURCES, "ranks": {"m": [0, 0]}},
    {"version": 1, "sources": SOURCES, "ranks": [1, 2]},
    {"version": 1, "sources": SOURCES},
])
def test_join_metadata_malformed(raw):
    value = raw if isinstance(raw, (str, dict)) else raw
    with pytest.raises(OrthoLoraError) as e:
        join_info_from_metadata({"ortholora_join": value})
    assert "\n" not in str(e.value)


def test_make_join_metadata_validates():
    with pytest.raises(OrthoLoraError):
        make_join_metadata([{"name": "a=b", "file": "", "ratio": 1}], {"m": [1]})
    with pytest.raises(OrthoLoraError):
        make_join_metadata(SOURCES, {"m": [1]})
    with pytest.raises(OrthoLoraError):
        make_join_metadata(["x"], {"m": [1]})


def test_safe_source_name():
    assert safe_source_name("a,b=c@d:e*f<g>h") == "a_b_c_d_e_f_g_h"
    assert safe_source_name("my  lora") == "my_lora"
    assert safe_source_name("") == "source"
    make_join_metadata([{"name": safe_source_name("x=y, z"), "file": "", "ratio": 1}], {"m": [1]})


# --------------------------------------------------------------------------- diag_vector


def test_diag_vector_per_rank():
    info = _info()
    v = diag_vector(parse_diag("1*4,0,0.5"), info, "lora_unet_a")
    assert v.dtype == torch.float32
    assert v.tolist() == [1, 1, 1, 1, 0, 0.5]
    with pytest.raises(OrthoLoraError, match="lora_unet_zzz"):
        diag_vector(parse_diag("1"), info, "lora_unet_zzz")


def test_diag_vector_per_rank_on_varying_ranks():
    """Ranks a 4+2, te_b 0+2, c 3+0 (full ranks 4+2): a 6-value v reads as a block per source."""
    info = _info()
    assert info.full_ranks == (4, 2)
    spec = parse_diag("1*4,0,0.5")
    assert diag_vector(spec, info, "lora_te_b").tolist() == [0, 0.5]  # lacks disney: krk's block
    assert diag_vector(spec, info, "lora_unet_c").tolist() == [1, 1, 1]  # 3 of disney's 4, block constant
    with pytest.raises(OrthoLoraError, match=r"lora_unet_c has 3 of source disney's 4 ranks") as e:
        diag_vector(parse_diag("1,0,1,1,0,0.5"), info, "lora_unet_c")
    assert "\n" not in str(e.value)
    assert diag_vector(parse_diag("2,3"), info, "lora_te_b").tolist() == [2, 3]  # the module's own rank
    with pytest.raises(OrthoLoraError, match=r"lora_unet_a has rank 6 \(4\+2\).*full ranks 4\+2 = 6"):
        diag_vector(parse_diag("2,3"), info, "lora_unet_a")


def test_slice_index_one_vector_per_layout():
    ranks = {"lora_unet_a": [4, 2], "lora_te_b": [0, 2], "lora_unet_c": [3, 0], "lora_unet_d": [4, 2]}
    info = join_info_from_metadata({"ortholora_join": make_join_metadata(SOURCES, ranks)})
    index = SliceIndex.of(info, ["lora_unet_a", "lora_te_b", "lora_unet_d"])
    assert index.groups == (((4, 2), ("lora_unet_a", "lora_unet_d")), ((0, 2), ("lora_te_b",)))
    vs = layout_vectors(parse_diag("krk@0.5"), index)
    assert [v.tolist() for v in vs] == [[1, 1, 1, 1, 0.5, 0.5], [0.5, 0.5]]
    for (_, names), v in zip(index.groups, vs):
        for name in names:
            assert torch.equal(diag_vector(parse_diag("krk@0.5"), info, name), v)
    with pytest.raises(OrthoLoraError, match="lora_unet_zzz"):
        SliceIndex.of(info, ["lora_unet_zzz"])
    with pytest.raises(OrthoLoraError, match="pixar"):
        layout_vectors(parse_diag("pixar@0"), index)


def test_diag_vector_per_slice():
    info = _info()
    spec = parse_diag("krk@0.25")
    assert diag_vector(spec, info, "lora_unet_a").tolist() == [1, 1, 1, 1, 0.25, 0.25]
    assert diag_vector(spec, info, "lora_te_b").tolist() == [0.25, 0.25]
    assert diag_vector(spec, info, "lora_unet_c").tolist() == [1, 1, 1]
    both = parse_diag("krk=2,disney=-1")
    assert diag_vector(both, info, "lora_unet_a").tolist() == [-1, -1, -1, -1, 2, 2]
    with pytest.raises(OrthoLoraError, match="disney, krk") as e:
        diag_vector(parse_diag("pixar=0"), info, "lora_unet_a")
    assert "pixar" in str(e.value)
    assert diag_vector(None, info, "lora_unet_a") is None


# --------------------------------------------------------------------------- apply_diag_to_up


def test_apply_diag_to_up_linear_and_conv():
    g = torch.Generator().manual_seed(0)
    up, down = torch.randn(5, 3, generator=g), torch.randn(3, 6, generator=g)
    v = torch.tensor([1.0, 0.0, -2.0])
    out = apply_diag_to_up(up, v)
    assert torch.allclose(out @ down, up @ torch.diag(v) @ down, atol=1e-6)
    assert torch.equal(out[:, 1], torch.zeros(5))
    up4 = up.reshape(5, 3, 1, 1)
    out4 = apply_diag_to_up(up4, v)
    assert out4.shape == up4.shape
    assert torch.equal(out4.reshape(5, 3), out)
    half = apply_diag_to_up(up.half(), v)
    assert half.dtype == torch.float16
    assert torch.allclose(half.float(), out, atol=1e-2)
    assert torch.equal(up, up4.reshape(5, 3))  # input untouched


@pytest.mark.parametrize("up, v", [
    (torch.ones(5), torch.ones(5)),
    (torch.ones(5, 3), torch.ones(4)),
    (torch.ones(5, 3), torch.ones(3, 1)),
])
def test_apply_diag_to_up_rejects(up, v):
    with pytest.raises(OrthoLoraError):
        apply_diag_to_up(up, v)

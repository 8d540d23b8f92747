"""Parsers fuzzed with hypothesis under a fixed, derandomized budget (reproducible in CI): the
safetensors header reader (fileio.open_tensors on whole files), the LoRA reader on files with random
module tensors (lorafile.read_lora + every module's delta / low-rank form), the resize recipe parser
(scores.parse_recipes, used by resize), the diag / `v=` parser (diag.parse_diag) and the rank policy
parser (rank.parse_policy). Whatever the input, they either succeed or raise OrthoLoraError — never
anything else — and what they accept round-trips through its canonical text."""
from __future__ import annotations

import atexit
import json
import math
import shutil
import tempfile
from pathlib import Path
from unittest.mock import patch

import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

from lib_ortholora import fileio
from lib_ortholora.diag import parse_diag
from lib_ortholora.errors import OrthoLoraError
from lib_ortholora.fileio import (MAX_HEADER_BYTES, MAX_JSON_DEPTH, SAFETENSORS_DTYPES, JsonOutline,
                                  json_outline, open_tensors)
from lib_ortholora.inspect import inspect_lora
from lib_ortholora.lorafile import read_lora
from lib_ortholora.rank import RankPolicy, parse_policy
from lib_ortholora.scores import parse_recipes

BUDGET = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                         HealthCheck.filter_too_much])

SCRATCH = Path(tempfile.mkdtemp(prefix="ortholora-fuzz-"))
atexit.register(shutil.rmtree, SCRATCH, ignore_errors=True)


def only_ortholora_errors(call):
    """Run `call`; an OrthoLoraError is fine (one line), anything else fails the test."""
    try:
        result = call()
    except OrthoLoraError as err:
        assert "\n" not in str(err), str(err)
        _event("refused")
        return None
    _event("accepted")
    return result


def _event(label: str) -> None:
    if currently_in_test_context():  # --hypothesis-show-statistics: how many inputs got through
        event(label)


# ---------------------------------------------------------------------------------------------
# safetensors header reader

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6)
DIM = st.one_of(st.integers(0, 6), st.integers(-3, 2**70), st.booleans(), st.floats(), st.text(max_size=2))
DTYPE = st.one_of(st.sampled_from(sorted(SAFETENSORS_DTYPES)), st.sampled_from(["F128", "f32", "", "U64"]), JSON)
ENTRY = st.one_of(
    st.fixed_dictionaries({"dtype": DTYPE, "shape": st.lists(DIM, max_size=4) | JSON,
                           "data_offsets": st.lists(DIM, max_size=3) | JSON}),
    st.fixed_dictionaries({}, optional={"dtype": DTYPE, "shape": st.lists(DIM, max_size=4),
                                        "data_offsets": st.lists(DIM, max_size=3), "x": JSON}),
    JSON)


@st.composite
def consistent_entries(draw):
    """Mostly-valid tensors laid out back to back (so fuzzing reaches the data reads); some empty
    ones with dimensions near the int64 limit."""
    out, offset = {}, 0
    for i in range(draw(st.integers(0, 4))):
        name = draw(st.sampled_from(sorted(SAFETENSORS_DTYPES)))
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        if draw(st.integers(0, 5)) == 0:  # empty, but with huge dimensions
            shape = [0] + draw(st.lists(st.sampled_from([2**31, 2**62, 2**63 - 1, 2**64]), min_size=1, max_size=3))
        size = math.prod(shape) * SAFETENSORS_DTYPES[name].itemsize
        out[f"t{i}"] = {"dtype": name, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    return out, offset


@st.composite
def safetensors_blobs(draw):
    kind = draw(st.sampled_from(["raw", "random-header", "consistent", "consistent-bent", "deep"]))
    if kind == "raw":
        return draw(st.binary(max_size=200))
    if kind == "deep":  # nesting around the cap, in an entry, in the metadata or at the root
        header, size = draw(consistent_entries())
        levels, dict_kind = draw(st.integers(0, 3 * MAX_JSON_DEPTH) | st.just(100_000)), draw(st.booleans())
        opening, closing = (b'{"k":', b"}") if dict_kind else (b"[", b"]")
        where = draw(st.sampled_from(["metadata", "shape", "root", "extra"]))
        if where == "metadata":
            header["__metadata__"] = {"x": "@deep@"}
        elif where == "root" or not header:
            header = "@deep@"
        else:
            header[next(iter(header))]["shape" if where == "shape" else "x"] = "@deep@"
        text = json.dumps(header).encode().replace(b'"@deep@"', opening * levels + b"1" + closing * levels)
        if not draw(st.integers(0, 3)):
            text = text[: draw(st.integers(0, len(text)))]  # cut: unbalanced
        return len(text).to_bytes(8, "little") + text + bytes(size)
    if kind == "random-header":
        header = draw(st.dictionaries(st.text(max_size=6), ENTRY, max_size=4) | JSON)
        data = draw(st.binary(max_size=64))
    else:
        header, size = draw(consistent_entries())
        data = bytes(range(256)) * (size // 256 + 1)
        data = data[: size + draw(st.integers(-8, 8)) if kind == "consistent-bent" else size]
        if draw(st.booleans()):
            header["__metadata__"] = draw(st.dictionaries(st.text(max_size=4), st.text(max_size=4) | JSON,
                                                          max_size=3))
    text = json.dumps(header).encode()
    length = len(text) if draw(st.integers(0, 5)) else draw(
        st.integers(0, 2**64 - 1) | st.sampled_from([MAX_HEADER_BYTES, MAX_HEADER_BYTES + 1]))
    blob = length.to_bytes(8, "little") + text + data
    if kind == "consistent-bent" and blob and draw(st.booleans()):  # flip one byte anywhere
        i = draw(st.integers(0, len(blob) - 1))
        blob = blob[:i] + bytes([blob[i] ^ draw(st.integers(1, 255))]) + blob[i + 1:]
    return blob


@BUDGET
@given(blob=safetensors_blobs(), suffix=st.sampled_from([".safetensors", ".safetensors", ".pt"]))
def test_tensor_file_reader_never_raises_anything_else(blob, suffix):
    path = SCRATCH / f"fuzz{suffix}"
    path.write_bytes(blob)

    def read():
        with open_tensors(path) as f:
            for key in f.keys():
                t = f.get(key)
                assert tuple(t.shape) == f.shape(key) and t.dtype == f.dtype(key)
            return f.metadata

    metadata = only_ortholora_errors(read)
    if metadata is not None:
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())


def depth(value: object) -> int:
    if isinstance(value, dict):
        return 1 + max(map(depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(depth, value), default=0)
    return 0


def objects(value: object) -> int:
    if isinstance(value, dict):
        return 1 + sum(map(objects, value.values()))
    return sum(map(objects, value)) if isinstance(value, list) else 0


TRICKY_TEXT = st.text(st.sampled_from('[]{}"\\/ax\u00e9\U0001f600'), max_size=8)
DEEP_JSON = st.recursive(st.none() | st.integers() | TRICKY_TEXT,
                         lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TRICKY_TEXT, inner, max_size=3),
                         max_leaves=30)


@BUDGET
@given(value=DEEP_JSON, ascii_only=st.booleans(), step=st.sampled_from([1, 2, 7, 1 << 20]))
def test_json_outline_is_what_json_parses(value, ascii_only, step):
    """Brackets inside strings (escaped quotes and backslashes included) do not count: the outline
    is exactly the parsed value's, for any JSON text, however it is cut into steps."""
    text = json.dumps(value, ensure_ascii=ascii_only).encode()
    with patch.object(fileio, "_OUTLINE_STEP", step):
        assert json_outline(text) == JsonOutline(True, depth(value), objects(value))


@pytest.mark.parametrize("text", [b"[" * 10, b"]", b"{}}", b'["]"', b'"\\"]', b'["\\"]', b"}{", b"[" * 10**6,
                                  b'"' + b'\\"' * 10**6])  # linear: a regex scan of this took hours
def test_json_outline_unbalanced(text):
    assert not json_outline(text).balanced


# ---------------------------------------------------------------------------------------------
# LoRA reader on random module tensors

NAMES = ["lora_unet_down_blocks_0_attentions_0_proj_in", "lora_te_text_model_encoder_layers_0_mlp_fc1",
         "lora_unet_up_blocks_1_resnets_0_conv1", "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k",
         "unet.down_blocks.1.attentions.0.proj_out", "lora_unet_nothing_here"]
SUFFIXES = ["lora_down.weight", "lora_up.weight", "lora_mid.weight", "alpha", "lora_A.weight", "lora_B.weight",
            "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
            "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2",
            "diff", "diff_b", "dora_scale", "on_input", "weight", "stray"]
TENSOR_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.uint8]


@st.composite
def lora_files(draw):
    tensors = {}
    for name in draw(st.lists(st.sampled_from(NAMES), min_size=1, max_size=3, unique=True)):
        # a plausible family most of the time, anything at other times
        family = draw(st.sampled_from([SUFFIXES[:4], SUFFIXES[4:6], SUFFIXES[6:12] + ["alpha"],
                                       SUFFIXES[12:19] + ["alpha"], SUFFIXES[19:21], SUFFIXES]))
        for suffix in draw(st.lists(st.sampled_from(family), min_size=1, max_size=6, unique=True)):
            shape = draw(st.lists(st.integers(0, 5), max_size=4))
            dtype = draw(st.sampled_from(TENSOR_DTYPES))
            t = torch.randn(shape) if dtype.is_floating_point else torch.randint(0, 3, shape)
            if dtype.is_floating_point and t.numel() and draw(st.integers(0, 9)) == 0:
                t.view(-1)[0] = draw(st.sampled_from([float("nan"), float("inf"), 0.0]))
            tensors[f"{name}.{suffix}"] = t.to(dtype)
    meta = draw(st.sampled_from([None, {"ss_base_model_version": "sd_v1"}, {"ss_base_model_version": "sdxl_base_v1-0"},
                                 {"modelspec.architecture": "stable-diffusion-v2-512/lora"}]))
    return tensors, meta


@BUDGET
@given(made=lora_files(), arch=st.sampled_from([None, None, "sd15", "sd2", "sdxl"]))
def test_lora_reader_never_raises_anything_else(made, arch):
    tensors, meta = made
    path = SCRATCH / "fuzz_lora.safetensors"
    safetensors.torch.save_file(tensors, str(path), meta)

    def read():
        lf = read_lora(path, arch)
        for name, m in lf.modules.items():
            d = m.delta()
            assert tuple(d.shape) == tuple(m.shape) and d.dtype == torch.float32, name
            lr = m.lowrank()
            if lr is not None:
                torch.testing.assert_close(lr.delta().reshape(d.shape), d, rtol=1e-4, atol=1e-4)
        inspect_lora(path, arch)
        return lf

    only_ortholora_errors(read)


# ---------------------------------------------------------------------------------------------
# Recipe, diag and rank-policy parsers


def grammar(tokens: list[str]):
    """Text built from a parser's own vocabulary (reaches deep branches) or arbitrary text."""
    numbers = st.one_of(st.integers(-5, 300).map(str), st.floats(allow_nan=True, allow_infinity=True).map(repr),
                        st.sampled_from(["1e999", "-0", ".5", "1_0", "0x10", "²", "١", "nan", "inf", "1e-400", "9" * 30]))
    piece = st.one_of(st.sampled_from(tokens), numbers, st.text(max_size=3))
    return st.one_of(st.lists(piece, max_size=12).map("".join), numbers, st.text(max_size=40))


NUMBER = st.one_of(st.integers(-3, 300).map(str), st.floats(-10, 10).map(lambda x: f"{x:.3g}"),
                   st.sampled_from(["0.5", "0.9", "1", "2", "10", "-1.2", "32", "1e999", "nan", "", "1_0", "²"]))


def items(keys: list[str], sep: str = ","):
    """`key=value` items (value sometimes missing) from a parser's keys, joined by `sep`."""
    item = st.tuples(st.sampled_from(keys), st.none() | NUMBER).map(lambda kv: kv[0] if kv[1] is None
                                                                    else f"{kv[0]}={kv[1]}")
    return st.lists(item, min_size=1, max_size=4).map(sep.join)


@st.composite
def recipe_like(draw):
    """One recipe shaped like a valid one (scores + thr/size, or a kohya method and/or rank=)."""
    if draw(st.booleans()):
        scores = draw(st.lists(st.sampled_from(RECIPE_KEYS[:5]), min_size=1, max_size=3, unique=True))
        parts = [k if draw(st.booleans()) else f"{k}={draw(NUMBER)}" for k in scores]
        parts.append(f"{draw(st.sampled_from(['thr', 'size']))}={draw(NUMBER)}")
    else:
        method = draw(st.sampled_from(["sv_ratio", "sv_fro", "sv_cumulative", None]))
        parts = [f"{method}={draw(NUMBER)}"] if method else []
        if method is None or draw(st.booleans()):
            parts.append(f"rank={draw(NUMBER)}")
    return ",".join(draw(st.permutations(parts)))


RECIPE_KEYS = ["spn_ckpt", "spn_lora", "fro_ckpt", "fro_lora", "subspace", "thr", "size", "rank", "sv_ratio",
               "sv_fro", "sv_cumulative"]
RECIPE_TOKENS = ["spn_ckpt", "spn_lora", "fro_ckpt", "fro_lora", "subspace", "thr", "size", "rank", "sv_ratio",
                 "sv_fro", "sv_cumulative", "=", "=", ",", ",", ":", " ", "-"]


@BUDGET
@given(text=grammar(RECIPE_TOKENS) | recipe_like() | recipe_like()
       | st.lists(items(RECIPE_KEYS) | recipe_like(), min_size=1, max_size=3).map(":".join))
@example("rank=²")
@example("rank=" + "9" * 5000)
@example("sv_fro=1e-400")
@example("spn_lora,size=1e308")
@example("spn_lora=0,fro_lora=0,thr=1")
def test_recipe_parser_never_raises_anything_else(text):
    recipes = only_ortholora_errors(lambda: parse_recipes(text))
    if recipes:
        again = parse_recipes(":".join(r.text for r in recipes))
        assert [r.text for r in again] == [r.text for r in recipes]
        assert all(r.tag and "/" not in r.tag and ":" not in r.tag for r in recipes)


DIAG_TOKENS = ["1", "0", "0.5", "-1", "*", "*", "=", "@", ",", ",", " ", "disney", "krk", "a", ":", "<", ">"]


@BUDGET
@given(text=grammar(DIAG_TOKENS) | items(["disney", "krk", "a b", "x@y"]).map(lambda t: t.replace("=", "@"))
       | st.lists(st.tuples(NUMBER, st.none() | st.integers(-1, 99)), min_size=1, max_size=6).map(
           lambda xs: ",".join(x if n is None else f"{x}*{n}" for x, n in xs)))
@example("1*999999")
@example("1e999")
@example("a=1,a@0")
@example("²")
def test_diag_parser_never_raises_anything_else(text):
    spec = only_ortholora_errors(lambda: parse_diag(text))
    if spec is not None:
        assert parse_diag(spec.text) == spec
        assert parse_diag(spec.prompt_text) == spec
        assert "=" not in spec.prompt_text and ":" not in spec.text


POLICY_TOKENS = ["fixed", "fraction", "sv_ratio", "threshold", "fro", "cumulative", "min", "max", "=", "=", ",",
                 ",", " ", "0.08", "8", "96"]


@BUDGET
@given(text=grammar(POLICY_TOKENS) | items(["fixed", "fraction", "sv_ratio", "threshold", "fro", "cumulative",
                                            "min", "max"]))
@example("²")
@example("١٢")
@example("9" * 400)
@example("fro=0.5,min=" + "9" * 5000)
@example("fixed=1e308,max=0")
def test_rank_policy_parser_never_raises_anything_else(text):
    policy = only_ortholora_errors(lambda: parse_policy(text))
    if policy is not None:
        assert isinstance(policy, RankPolicy)
        again = parse_policy(policy.describe())
        assert (again.kind, again.min_rank, again.max_rank) == (policy.kind, policy.min_rank, policy.max_rank)
        assert again.value == pytest.approx(policy.value, rel=1e-5)


@pytest.mark.parametrize("parser", [parse_recipes, parse_diag, parse_policy])
@pytest.mark.parametrize("value", [None, 3, b"1", ["1"], "\x00", "\ud800", "1" * 200_000])
def test_parsers_refuse_odd_values(parser, value):
    with pytest.raises(OrthoLoraError) as refused:
        parser(value)
    assert "\n" not in str(refused.value)

"""The public API keeps its promise: a bad argument of any public operation is one `OrthoLoraError`
line (never AttributeError, AssertionError, OverflowError, a traceback from deep inside, or a
silent acceptance), raised before any output exists; and the lazy API is visible to type checkers."""
from __future__ import annotations

import ast
import io
import os
import sys
from pathlib import Path

import pytest
import torch

import lib_ortholora
from lib_ortholora import bake_diag, extract_lora, inspect_lora, join_loras, merge_lora, mix_loras, ortho_lora
from lib_ortholora import Report, resize_files, run_demo
from lib_ortholora.cli import main
from lib_ortholora.diag import parse_diag
from lib_ortholora.errors import OrthoLoraError, quote
from lib_ortholora.lorafile import read_lora
from lib_ortholora.rank import KINDS, parse_policy
from lib_ortholora.scores import parse_recipes
from test_bad_inputs import kit  # noqa: F401 - the fixture

NO_CUDA = not torch.cuda.is_available()


def bad_calls(kit, out: Path) -> dict[str, object]:
    o = out / "x.safetensors"
    b, t, a, c = kit.base, kit.tuned, kit.lora, kit.lora2
    calls = {
        "extract rank text": lambda: extract_lora(b, t, "bogus", save_path=o),
        "extract rank nan": lambda: extract_lora(b, t, float("nan"), save_path=o),
        "extract rank list": lambda: extract_lora(b, t, [4], save_path=o),
        "extract rank 2.5": lambda: extract_lora(b, t, 2.5, save_path=o),
        "extract min_rank text": lambda: extract_lora(b, t, 4, "8", save_path=o),
        "extract max_rank < min": lambda: extract_lora(b, t, 0.1, 8, 2, save_path=o),
        "extract svd": lambda: extract_lora(b, t, 4, save_path=o, svd="bogus"),
        "extract device": lambda: extract_lora(b, t, 4, save_path=o, device="quantum"),
        "extract device cuda:99": lambda: extract_lora(b, t, 4, save_path=o, device="cuda:99"),
        "extract dtype": lambda: extract_lora(b, t, 4, save_path=o, dtype="fp8"),
        "extract dtype int": lambda: extract_lora(b, t, 4, save_path=o, dtype=torch.int8),
        "extract skip": lambda: extract_lora(b, t, 4, save_path=o, skip=-1),
        "extract skip text": lambda: extract_lora(b, t, 4, save_path=o, skip="x"),
        "extract conv": lambda: extract_lora(b, t, 4, save_path=o, conv="no"),
        "extract policy 1e400": lambda: extract_lora(b, t, "fixed=1e400", save_path=o),
        "merge multiplier text": lambda: merge_lora(b, a, "x", o),
        "merge multiplier 1e300": lambda: merge_lora(b, a, 1e300, o),
        "merge multipliers count": lambda: merge_lora(b, a, [1, 2], o),
        "merge dtype": lambda: merge_lora(b, a, 1.0, o, dtype="fp8"),
        "merge lora path": lambda: merge_lora(b, 5, 1.0, o),
        "join ratio 1e300": lambda: join_loras([a, c], o, 1e300),
        "join ratio nan": lambda: join_loras([a, c], o, [1.0, float("nan")]),
        "join ratio text": lambda: join_loras([a, c], o, "1"),
        "join dtype": lambda: join_loras([a, c], o, dtype=torch.float64),
        "join paths": lambda: join_loras(5, o),
        "mix ratio 1e300": lambda: mix_loras([a, c], o, 4, 1e300),
        "mix rank": lambda: mix_loras([a, c], o, "fro=2"),
        "mix rank none": lambda: mix_loras([a, c], o, None),
        "diag keep_zero": lambda: bake_diag(a, "1,1,0,1", o, keep_zero="no"),
        "diag dtype": lambda: bake_diag(a, "1,1,0,1", o, dtype="half"),
        "resize recipe": lambda: resize_files([a], out, "bogus=1"),
        "resize arch": lambda: resize_files([a], out, "rank=2", arch="sd9"),
        "resize dtype": lambda: resize_files([a], out, "rank=2", dtype="fp64"),
        "ortho rank": lambda: ortho_lora([a, c], out, rank="bogus"),
        "ortho rank 2.5": lambda: ortho_lora([a, c], out, rank=2.5),
        "ortho directions text": lambda: ortho_lora([a, c], out, directions="2"),
        "ortho directions 99": lambda: ortho_lora([a, c], out, directions=99),
        "ortho residuals": lambda: ortho_lora([a, c], out, residuals="yes"),
        "ortho dtype": lambda: ortho_lora([a, c], out, dtype="fp8"),
        "ortho prefix": lambda: ortho_lora([a, c], out, prefix=5),
        "inspect arch": lambda: inspect_lora(a, "sd9"),
    }
    if NO_CUDA:
        calls["extract device cuda"] = lambda: extract_lora(b, t, 4, save_path=o, device="cuda")
    return calls


def test_bad_arguments_are_one_line_errors_before_any_output(kit, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    out.mkdir()
    escaped = {}
    for name, call in bad_calls(kit, out).items():
        try:
            call()
        except OrthoLoraError as err:
            assert "\n" not in str(err), (name, str(err))
        except Exception as err:  # noqa: BLE001 - what this test is about
            escaped[name] = f"{type(err).__name__}: {err}"
        else:
            escaped[name] = "accepted"
        assert os.listdir(out) == [], name
    assert not escaped, escaped


@pytest.mark.parametrize("kind", KINDS)
def test_extreme_policy_values_end_in_a_policy_or_the_one_line_error(kind):
    """1e308 and its neighbours in every field: parsed into a policy that then works on a layer,
    or refused with OrthoLoraError — never an overflow from inside."""
    s = torch.logspace(0, -3, 20, dtype=torch.float64)
    for value in ("1e308", "1.7976931348623157e308", "1e-308", "5e-324", "1e309"):
        for text in (f"{kind}={value}", f"{kind}=0.5,min={value}", f"{kind}=0.5,max={value}",
                     f"{kind}=1,min=1,max=99999999999999999999"):
            try:
                policy = parse_policy(text)
            except OrthoLoraError:
                continue
            assert 0 <= policy.cap((20, 40)) <= 20
            assert 0 <= policy.choose(s, (20, 40), float(s.square().sum())) <= 20


def test_cli_huge_ratio_and_unusable_device_are_one_line(kit, tmp_path, capsys):  # noqa: F811
    o = tmp_path / "x.safetensors"
    argvs = [["mix", kit.lora, kit.lora2, "-r", "1e300", "--rank", "4", "-o", o]]
    if NO_CUDA:
        argvs.append(["extract", kit.base, kit.tuned, "--device", "cuda", "-o", o])
    for argv in argvs:
        capsys.readouterr()
        assert main([*map(str, argv), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert not o.exists()


def test_the_lazy_api_is_visible_to_type_checkers():
    """The TYPE_CHECKING block imports exactly the lazy names, each from the module it is served from."""
    tree = ast.parse(Path(lib_ortholora.__file__).read_text(encoding="utf-8"))
    block = next(n for n in tree.body if isinstance(n, ast.If) and getattr(n.test, "id", "") == "TYPE_CHECKING")
    seen = {a.name: imp.module for imp in block.body for a in imp.names}
    assert seen == {name: module for name, module in lib_ortholora._API.items()}
    for name in lib_ortholora.__all__:
        assert getattr(lib_ortholora, name) is not None


def test_every_operation_takes_bytes_paths_and_names_that_are_not_utf8(kit, tmp_path):  # noqa: F811
    """A path may be given as bytes (what os.listdir(bytes) gives for a name that is not UTF-8):
    every operation takes it as the str os.fsdecode makes of it, and what it writes names the file
    in valid UTF-8 (metadata: the byte as \\xff)."""
    b = os.fsencode
    odd = os.fsdecode(b"odd\xff")
    out = tmp_path / odd
    try:
        out.mkdir()
    except (OSError, UnicodeError):
        pytest.skip("this file system takes no name that is not UTF-8")
    lora = out / f"{odd}.safetensors"
    calls = {
        "extract": lambda: extract_lora(b(kit.base), b(kit.tuned), 2, save_path=b(lora)),
        "inspect": lambda: inspect_lora(b(lora)),
        "merge": lambda: merge_lora(b(kit.base), b(lora), 1.0, b(out / "merged.safetensors")),
        "merge default output": lambda: merge_lora(b(kit.base), [b(lora)], 0.5, overwrite=True),
        "join": lambda: join_loras([b(kit.lora), b(lora)], b(out / "joined.safetensors")),
        "mix": lambda: mix_loras([b(kit.lora), b(lora)], b(out / "mixed.safetensors"), 4),
        "diag": lambda: bake_diag(b(out / "joined.safetensors"), "good=1", b(out / "baked.safetensors")),
        "resize": lambda: resize_files([b(lora)], b(out / "resized"), "spn_ckpt=1,thr=-9", b(kit.base)),
        "ortho": lambda: ortho_lora([b(kit.lora), b(lora)], b(out / "ortho")),
        "demo": lambda: run_demo(b(out / "demo")),
    }
    for name, call in calls.items():
        assert isinstance(call(), Report), name
    assert read_lora(lora).metadata["ss_output_name"] == "odd\\xff"
    assert (out / "resized" / f"{odd}_spnckpt1_thr-9.safetensors").is_file()


def test_the_cli_prints_reports_that_name_files_that_are_not_utf8(kit, tmp_path, monkeypatch):  # noqa: F811
    """stdout is strict UTF-8 (PYTHONIOENCODING=utf-8, or any non-UTF-8 terminal): a report naming
    such a file still prints, its bytes as \\xff, and exits 0."""
    lora = tmp_path / os.fsdecode(b"\xff.safetensors")
    try:
        lora.write_bytes(Path(kit.lora).read_bytes())
    except (OSError, UnicodeError):
        pytest.skip("this file system takes no name that is not UTF-8")
    for extra in ([], ["--json"]):
        raw = io.BytesIO()
        monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(raw, encoding="utf-8", errors="strict"))
        assert main(["inspect", str(lora), "--quiet", *extra]) == 0
        sys.stdout.flush()
        shown = raw.getvalue().decode("utf-8")
        assert ("\\xff.safetensors" if not extra else "\\udcff.safetensors") in shown, shown[:300]
        assert sys.stdout.errors == "strict"  # put back


@pytest.mark.parametrize("parse, text", [
    (parse_policy, "x" * 200_000), (parse_policy, "fro=" + "x" * 200_000), (parse_policy, "y" * 200_000 + "=1"),
    (parse_policy, "a," * 100_000), (parse_recipes, "rank=" + "x" * 200_000), (parse_recipes, "a" * 200_000),
    (parse_recipes, "rank=4," + "q" * 200_000 + "=1"), (parse_recipes, "spn_lora=" + "1e" * 100_000),
    (parse_recipes, "sv_fro=x" + " " * 100_000 + "y"), (parse_diag, "1," + "x" * 99_000),
])
def test_a_long_input_is_quoted_short_in_its_error(parse, text):
    """The error quotes a short prefix of what was typed, never all of it."""
    with pytest.raises(OrthoLoraError) as err:
        parse(text)
    assert len(str(err.value)) < 400 and "..." in str(err.value), str(err.value)[:500]


def test_quote():
    assert quote("a  b\n c") == "'a b c'"
    assert quote("x" * 100, 20) == repr("x" * 17 + "...")
    assert quote("x" + " " * 500 + "y", 20) == repr("x...")  # cut before the end, though short when folded

"""Bad inputs, one test each: the API raises one `OrthoLoraError` line naming the file and the
problem, the CLI prints that line and exits non-zero, the UI/HTTP API turn it into an error, and
nothing is left behind: no output (no temp file either) and every input byte-identical.

Not errors (tested to stay that way): a missing alpha (alpha = rank), alpha stored in bf16,
unknown keys (reported), all-zero layers."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import safetensors.torch
import torch

import interop_util as IU
import lorautil as U
from lib_ortholora import fileio
from lib_ortholora.cli import main
from lib_ortholora.diag import bake_diag
from lib_ortholora.errors import OrthoLoraError, printable
from lib_ortholora.extract import extract_lora
from lib_ortholora.fileio import open_tensors, safe_output_path
from lib_ortholora.inspect import inspect_lora
from lib_ortholora.join import join_loras
from lib_ortholora.lorafile import read_lora, write_lora
from lib_ortholora.lowrank import LowRank
from lib_ortholora.merge import merge_lora
from lib_ortholora.mix import mix_loras
from lib_ortholora.ortho import ortho_lora
from lib_ortholora.outputs import OutputExists
from lib_ortholora.report import Report
from lib_ortholora.resize import resize_files

FF = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj"  # (160, 20): not square
FF_KEY = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight"


# ---------------------------------------------------------------------------------------------
# Helpers


def digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class Guard:
    """Records the inputs' bytes and the listings of the folders outputs would go to; `check()`
    asserts that nothing changed: inputs intact, no output, no temp file."""

    def __init__(self, inputs, folders):
        self.inputs = {Path(p): digest(p) for p in inputs}
        self.folders = {Path(f): sorted(os.listdir(f)) for f in folders}

    def check(self) -> None:
        for path, h in self.inputs.items():
            assert digest(path) == h, f"input {path} changed"
        for folder, names in self.folders.items():
            assert sorted(os.listdir(folder)) == names, f"{folder} changed: {sorted(os.listdir(folder))}"


def one_line(text: str, named, problem: str) -> None:
    assert "\n" not in text.strip(), text
    for path in named:
        assert str(path) in text, f"{path} not named in: {text}"
    assert re.search(problem, text), f"{problem!r} not in: {text}"


def api_refused(call, named, problem: str) -> str:
    """The call raises one line naming `named` with `problem`; a batch operation (resize) may
    instead return a report whose every file failed, with that line among its warnings."""
    try:
        result = call()
    except OrthoLoraError as err:
        one_line(str(err), named, problem)
        return str(err)
    assert isinstance(result, Report), f"no error raised (returned {result!r})"
    assert not result.outputs, result.outputs  # a batch skips what it refuses, with a warning
    hits = [w for w in result.warnings if all(str(p) in w for p in named) and re.search(problem, w)]
    assert hits, result.warnings
    one_line(hits[0], named, problem)
    return hits[0]


def cli_refused(argv, named, problem: str, capsys) -> str:
    """Exit status non-zero and one `error: …` line on stderr naming `named` with `problem` (a
    batch command may name the file in its report's warning lines on stdout instead)."""
    capsys.readouterr()
    code = main([*map(str, argv), "--quiet"])
    out, err = capsys.readouterr()
    assert code != 0, f"exit status 0 for {argv}\n{out}\n{err}"
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    if all(str(p) in lines[0] for p in named) and re.search(problem, lines[0]):
        return lines[0]
    warned = [line for line in out.splitlines() if line.startswith("warning: ")
              and all(str(p) in line for p in named) and re.search(problem, line)]
    assert warned, f"{named} / {problem!r} not reported:\n{out}\n{err}"
    return warned[0]


def refused_everywhere(case, named, problem: str, capsys, guard: Guard) -> None:
    api, argv = case
    api_refused(api, named, problem)
    guard.check()
    cli_refused(argv, named, problem, capsys)
    guard.check()


TUNED_KEYS = (FF_KEY, "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.out_proj.weight",
              "model.diffusion_model.output_blocks.3.0.in_layers.2.weight")


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    """Good inputs: the tiny sd15 base checkpoint (fp32) and a tuned twin that differs on three
    layers only (so extraction is quick), SD1 LoRAs, an SDXL LoRA."""
    d = tmp_path_factory.mktemp("bad_inputs_kit")
    tensors = IU.sd15_base()
    base = d / "sd15_base.safetensors"
    safetensors.torch.save_file(tensors, str(base))
    gen = torch.Generator().manual_seed(3)
    for key in TUNED_KEYS:
        w = tensors[key]
        tensors[key] = w + 0.05 * (torch.randn(w.shape[0], 2, generator=gen)
                                   @ torch.randn(2, w[0].numel(), generator=gen)).reshape(w.shape)
    tuned = d / "sd15_tuned3.safetensors"
    safetensors.torch.save_file(tensors, str(tuned))
    tg = U.sample_targets("sd15")
    return SimpleNamespace(
        base=base, tuned=tuned, dir=d, targets=tg,
        lora=U.save(d / "good.safetensors", U.lora_tensors(tg, alpha=2.0)),
        lora2=U.save(d / "good2.safetensors", U.lora_tensors(tg, seed=1)),
        xl=U.save(d / "xl.safetensors", U.lora_tensors(U.sample_targets("sdxl"), arch_id="sdxl")))


def lora_ops(kit, bad: Path, out: Path) -> dict[str, tuple]:
    """(API call, CLI argv) of every operation that reads a LoRA, with `bad` as that LoRA."""
    o = out / "out.safetensors"
    return {
        "inspect": (lambda: inspect_lora(bad), ["inspect", bad]),
        "merge": (lambda: merge_lora(kit.base, bad, 1.0, o), ["merge", kit.base, bad, "-o", o]),
        "join": (lambda: join_loras([kit.lora, bad], o), ["join", kit.lora, bad, "-o", o]),
        "mix": (lambda: mix_loras([kit.lora, bad], o, 4), ["mix", kit.lora, bad, "--rank", "4", "-o", o]),
        "resize": (lambda: resize_files([bad], out, "rank=2"), ["resize", bad, "-o", out, "-r", "rank=2"]),
        "ortho": (lambda: ortho_lora([kit.lora, bad], out), ["ortho", kit.lora, bad, "-o", out]),
        "diag": (lambda: bake_diag(bad, "1,1,0,1", o), ["diag", bad, "1,1,0,1", "-o", o]),
    }


def ckpt_ops(kit, bad: Path, out: Path) -> dict[str, tuple]:
    """(API call, CLI argv) of every operation that reads a checkpoint, with `bad` as that checkpoint."""
    o = out / "out.safetensors"
    return {
        "extract-base": (lambda: extract_lora(bad, kit.tuned, 4, save_path=o),
                         ["extract", bad, kit.tuned, "--rank", "4", "-o", o]),
        "extract-tuned": (lambda: extract_lora(kit.base, bad, 4, save_path=o),
                          ["extract", kit.base, bad, "--rank", "4", "-o", o]),
        "merge": (lambda: merge_lora(bad, kit.lora, 1.0, o), ["merge", bad, kit.lora, "-o", o]),
        "resize-ckpt": (lambda: resize_files([kit.lora], out, "spn_ckpt=1,thr=-1", bad),
                        ["resize", kit.lora, "--ckpt", bad, "-o", out, "-r", "spn_ckpt=1,thr=-1"]),
    }


def lora_refused(kit, tmp_path: Path, capsys, bad: Path, op: str, problem: str) -> None:
    """`op` with `bad` as one of its LoRAs is refused everywhere and leaves nothing behind."""
    out = tmp_path / "out"
    out.mkdir()
    guard = Guard([bad, kit.lora, kit.base], [tmp_path, out])
    refused_everywhere(lora_ops(kit, bad, out)[op], [bad], problem, capsys, guard)


LORA_OPS = ("inspect", "merge", "join", "mix", "resize", "ortho", "diag")
CKPT_OPS = ("extract-base", "extract-tuned", "merge", "resize-ckpt")


# ---------------------------------------------------------------------------------------------
# Unreadable files: empty, truncated, garbled / oversized header, offsets out of range


def _header(blob: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def _with_header(header: dict, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data


def _last_tensor(header: dict) -> str:
    return max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])


def _shift_last(blob: bytes, by: int) -> bytes:
    header, data = _header(blob)
    name = _last_tensor(header)
    header[name]["data_offsets"] = [x + by for x in header[name]["data_offsets"]]
    return _with_header(header, data)


def _reverse_first(blob: bytes) -> bytes:
    header, data = _header(blob)
    name = next(k for k in header if k != "__metadata__")
    header[name]["data_offsets"] = header[name]["data_offsets"][::-1]
    header[name]["shape"] = [0]  # so only the order of the offsets is wrong
    return _with_header(header, data)


def _garble(blob: bytes, fill: bytes) -> bytes:
    n = int.from_bytes(blob[:8], "little")
    return blob[:8] + (fill * n)[:n] + blob[8 + n:]


UNREADABLE = {
    "empty": (lambda b: b"", r"too short to be a safetensors file \(0 bytes\)"),
    "truncated": (lambda b: b[: len(b) * 2 // 3], r"truncated or corrupt"),
    "garbled-header": (lambda b: _garble(b, b"\xfe\xff"), r"bad safetensors header \(not UTF-8\)"),
    "non-json-header": (lambda b: _garble(b, b"{x"), r"bad safetensors header \(not valid JSON"),
    "oversized-header": (lambda b: (2**40).to_bytes(8, "little") + b[8:], r"header length \d+ is over"),
    "header-past-end": (lambda b: (len(b)).to_bytes(8, "little") + b[8:], r"truncated or not a safetensors"),
    "offsets-past-end": (lambda b: _shift_last(b, 64), r"data_offsets .* out of range"),
    "offsets-reversed": (_reverse_first, r"data_offsets .* out of range"),
}


@pytest.mark.parametrize("op", LORA_OPS)
@pytest.mark.parametrize("kind", UNREADABLE)
def test_unreadable_lora(kit, tmp_path, capsys, kind, op):
    build, problem = UNREADABLE[kind]
    bad = tmp_path / f"{kind}.safetensors"
    bad.write_bytes(build(kit.lora.read_bytes()))
    lora_refused(kit, tmp_path, capsys, bad, op, problem)


@pytest.mark.parametrize("op", CKPT_OPS)
@pytest.mark.parametrize("kind", ["empty", "truncated", "non-json-header", "offsets-past-end"])
def test_unreadable_checkpoint(kit, tmp_path, capsys, kind, op):
    build, problem = UNREADABLE[kind]
    bad = tmp_path / f"{kind}.safetensors"
    bad.write_bytes(build(Path(kit.base).read_bytes()))
    out = tmp_path / "out"
    out.mkdir()
    guard = Guard([bad, kit.lora, kit.tuned], [tmp_path, out])
    refused_everywhere(ckpt_ops(kit, bad, out)[op], [bad], problem, capsys, guard)


# ---------------------------------------------------------------------------------------------
# A pickle that would run code


class Evil:
    marker: Path

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _evil_file(path: Path, marker: Path, zip_format: bool) -> Path:
    Evil.marker = marker
    payload = {"state_dict": {"w": Evil()}}
    if zip_format:
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    return path


@pytest.mark.parametrize("zip_format", [True, False], ids=["torch-zip", "raw-pickle"])
@pytest.mark.parametrize("op", ["inspect", "merge", "join", "extract-base", "merge-ckpt"])
def test_pickle_that_would_run_code(kit, tmp_path, capsys, op, zip_format):
    marker = tmp_path / "pwned"
    bad = _evil_file(tmp_path / "evil.ckpt", marker, zip_format)
    out = tmp_path / "out"
    out.mkdir()
    ops = lora_ops(kit, bad, out) | {"merge-ckpt": ckpt_ops(kit, bad, out)["merge"],
                                     "extract-base": ckpt_ops(kit, bad, out)["extract-base"]}
    guard = Guard([bad, kit.lora, kit.base, kit.tuned], [tmp_path, out])
    refused_everywhere(ops[op], [bad], r"refused: not a plain weights file", capsys, guard)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# Architecture and shape mismatches


def test_lora_for_another_architecture_merge(kit, tmp_path, capsys):
    o = tmp_path / "m.safetensors"
    guard = Guard([kit.xl, kit.base], [tmp_path])
    case = (lambda: merge_lora(kit.base, kit.xl, 1.0, o), ["merge", kit.base, kit.xl, "-o", o])
    refused_everywhere(case, [kit.xl, kit.base], r"made for SDXL cannot merge into the SD1\.x", capsys, guard)


def test_extract_pair_of_different_architectures(kit, tmp_path, capsys):
    xl_tuned = tmp_path / "xl_tuned.safetensors"  # what arch.detect looks at: an SDXL key set
    safetensors.torch.save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(20, 4, 3, 3),
                                 "conditioner.embedders.1.model.transformer.resblocks.0.ln_1.weight": torch.ones(80)},
                                str(xl_tuned))
    o = tmp_path / "x.safetensors"
    guard = Guard([kit.base, xl_tuned], [tmp_path])
    case = (lambda: extract_lora(kit.base, xl_tuned, 4, save_path=o),
            ["extract", kit.base, xl_tuned, "--rank", "4", "-o", o])
    refused_everywhere(case, [kit.base, xl_tuned], r"base is SD1\.x but tuned .* is SDXL", capsys, guard)


def test_join_loras_of_different_architectures(kit, tmp_path, capsys):
    o = tmp_path / "j.safetensors"
    guard = Guard([kit.lora, kit.xl], [tmp_path])
    case = (lambda: join_loras([kit.lora, kit.xl], o), ["join", kit.lora, kit.xl, "-o", o])
    refused_everywhere(case, [kit.xl], r"made for SDXL", capsys, guard)


@pytest.mark.parametrize("how", ["transposed", "wider"])
def test_merge_module_shape_differs_from_layer(kit, tmp_path, capsys, how):
    """A module whose dW has the layer's element count but not its shape ((in, out) for (out, in))
    must not be reshaped into it."""
    r = 4
    out_dim, in_dim = (20, 160) if how == "transposed" else (320, 20)
    bad = U.save(tmp_path / f"{how}.safetensors", {f"{FF}.lora_down.weight": torch.randn(r, in_dim),
                                                  f"{FF}.lora_up.weight": torch.randn(out_dim, r),
                                                  f"{FF}.alpha": torch.tensor(4.0)}, {"ss_base_model_version": "sd_v1"})
    o = tmp_path / "m.safetensors"
    guard = Guard([bad, kit.base], [tmp_path])
    case = (lambda: merge_lora(kit.base, bad, 1.0, o), ["merge", kit.base, bad, "-o", o])
    refused_everywhere(case, [bad], rf"module {FF} has shape \({out_dim}, {in_dim}\) but layer .* is \(160, 20\)",
                       capsys, guard)


def test_extract_layer_shape_differs(kit, tmp_path, capsys):
    tensors = safetensors.torch.load_file(str(kit.tuned))
    tensors[FF_KEY] = tensors[FF_KEY].T.contiguous()
    tuned = tmp_path / "tuned_T.safetensors"
    safetensors.torch.save_file(tensors, str(tuned))
    o = tmp_path / "x.safetensors"
    guard = Guard([kit.base, tuned], [tmp_path])
    case = (lambda: extract_lora(kit.base, tuned, 4, save_path=o), ["extract", kit.base, tuned, "--rank", "4", "-o", o])
    refused_everywhere(case, [tuned], rf"{re.escape(FF_KEY)} is \(20, 160\) in the tuned file but \(160, 20\)",
                       capsys, guard)


def _broken_factors(kind: str) -> dict[str, torch.Tensor]:
    tg = [t for t in U.sample_targets("sd15") if t.name == "lora_te_text_model_encoder_layers_0_mlp_fc1"]
    if kind == "lora-rank":
        t = U.lora_tensors(tg)
        t[f"{tg[0].name}.lora_down.weight"] = t[f"{tg[0].name}.lora_down.weight"][:3]
    elif kind == "lora-empty":
        t = U.lora_tensors(tg)
        t[f"{tg[0].name}.lora_up.weight"] = torch.zeros(0)
    elif kind == "loha":
        t = U.loha_tensors(tg)
        t[f"{tg[0].name}.hada_w2_b"] = t[f"{tg[0].name}.hada_w2_b"][:, :-1]
    elif kind == "lokr":
        t = U.lokr_tensors(tg)
        t[f"{tg[0].name}.lokr_w2_b"] = t[f"{tg[0].name}.lokr_w2_b"][:1]
    else:
        t = U.full_tensors(tg)
        t[f"{tg[0].name}.diff_b"] = torch.zeros(7)
    return t


@pytest.mark.parametrize("op", ["inspect", "merge", "join"])
@pytest.mark.parametrize("kind", ["lora-rank", "lora-empty", "loha", "lokr", "full-bias"])
def test_factors_that_do_not_fit_together(kit, tmp_path, capsys, kind, op):
    bad = U.save(tmp_path / f"{kind}.safetensors", _broken_factors(kind))
    lora_refused(kit, tmp_path, capsys, bad, op,
                 r"module lora_te_text_model_encoder_layers_0_mlp_fc1: its tensors do not fit together")


def test_join_sources_disagree_on_a_layer_shape(kit, tmp_path, capsys):
    """Both files read fine on their own; together they describe one layer two ways."""
    r = 2
    a = U.save(tmp_path / "a.safetensors", {f"{FF}.lora_down.weight": torch.randn(r, 20),
                                            f"{FF}.lora_up.weight": torch.randn(160, r)})
    b = U.save(tmp_path / "b.safetensors", {f"{FF}.lora_down.weight": torch.randn(r, 40),
                                            f"{FF}.lora_up.weight": torch.randn(160, r)})
    o = tmp_path / "j.safetensors"
    guard = Guard([a, b], [tmp_path])
    refused_everywhere((lambda: join_loras([a, b], o), ["join", a, b, "-o", o]), [b], rf"{FF}", capsys, guard)
    refused_everywhere((lambda: mix_loras([a, b], o, 2), ["mix", a, b, "--rank", "2", "-o", o]), [b], rf"{FF}",
                       capsys, guard)


# ---------------------------------------------------------------------------------------------
# NaN / Inf


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("where", ["lora_up.weight", "alpha"])
@pytest.mark.parametrize("op", ["inspect", "merge", "join", "resize"])
def test_nan_or_inf_in_a_lora_tensor(kit, tmp_path, capsys, value, where, op):
    tensors = U.lora_tensors(kit.targets)
    name = kit.targets[3].name
    tensors[f"{name}.{where}"] = tensors[f"{name}.{where}"].clone()
    tensors[f"{name}.{where}"].view(-1)[0] = value
    bad = U.save(tmp_path / "nan.safetensors", tensors)
    out = tmp_path / "out"
    out.mkdir()
    guard = Guard([bad, kit.base], [tmp_path, out])
    counts = "1 NaN and 0 Inf" if value != value else "0 NaN and 1 Inf"
    refused_everywhere(lora_ops(kit, bad, out)[op], [bad], rf"tensor '{name}\.{re.escape(where)}' has {counts}",
                       capsys, guard)


@pytest.mark.parametrize("side", ["base", "tuned"])
def test_nan_in_a_checkpoint_layer_extract(kit, tmp_path, capsys, side):
    tensors = safetensors.torch.load_file(str(kit.base if side == "base" else kit.tuned))
    tensors[FF_KEY][3, 5] = float("nan")
    bad = tmp_path / f"{side}_nan.safetensors"
    safetensors.torch.save_file(tensors, str(bad))
    base, tuned = (bad, kit.tuned) if side == "base" else (kit.base, bad)
    o = tmp_path / "x.safetensors"
    guard = Guard([base, tuned], [tmp_path])
    case = (lambda: extract_lora(base, tuned, 4, save_path=o), ["extract", base, tuned, "--rank", "4", "-o", o])
    refused_everywhere(case, [bad], rf"{re.escape(FF_KEY)}.* NaN", capsys, guard)


def _base_holding(kit, tmp_path: Path, value: float) -> tuple[Path, Path]:
    """The base checkpoint with `value` in one element of FF_KEY, and a LoRA on that layer only."""
    tensors = safetensors.torch.load_file(str(kit.base))
    tensors[FF_KEY][2, 3] = value
    bad = tmp_path / "base_nonfinite.safetensors"
    safetensors.torch.save_file(tensors, str(bad))
    return bad, U.save(tmp_path / "ff.safetensors", U.lora_tensors([t for t in U.tiny_targets("sd15") if t.name == FF]))


def test_inf_in_a_checkpoint_layer_merge(kit, tmp_path, capsys):
    """Named in the checkpoint (the input that holds it), not in the output being written."""
    bad, lora = _base_holding(kit, tmp_path, float("inf"))
    o = tmp_path / "m.safetensors"
    guard = Guard([bad, lora], [tmp_path])
    case = (lambda: merge_lora(bad, lora, 1.0, o), ["merge", bad, lora, "-o", o])
    refused_everywhere(case, [bad], rf"{re.escape(FF_KEY)}' has 0 NaN and 1 Inf", capsys, guard)


# ---------------------------------------------------------------------------------------------
# Families that are not a plain LoRA


def _not_plain(kind: str, tg) -> dict[str, torch.Tensor]:
    t = tg[0]
    if kind == "DoRA":
        out = U.lora_tensors([t])
        out[f"{t.name}.dora_scale"] = torch.ones(1, t.shape[1])
        return out
    if kind == "OFT":
        return {f"{t.name}.oft_blocks": torch.zeros(4, t.shape[0] // 4, t.shape[0] // 4),
                f"{t.name}.alpha": torch.tensor(0.0)}
    return {f"{t.name}.weight": torch.ones(t.shape[0]), f"{t.name}.on_input": torch.tensor(0)}  # IA3


@pytest.mark.parametrize("op", ["inspect", "merge", "join", "resize"])
@pytest.mark.parametrize("kind", ["DoRA", "OFT", "IA3"])
def test_dora_oft_ia3_refused(kit, tmp_path, capsys, kind, op):
    tg = [t for t in kit.targets if t.name == "lora_te_text_model_encoder_layers_0_mlp_fc1"]
    bad = U.save(tmp_path / f"{kind}.safetensors", U.lora_tensors(kit.targets[4:6]) | _not_plain(kind, tg))
    lora_refused(kit, tmp_path, capsys, bad, op, rf"{kind} module {tg[0].name} is not a plain low-rank delta")


@pytest.mark.parametrize("op", ["resize", "ortho"])
def test_full_diff_where_a_low_rank_form_is_needed(kit, tmp_path, capsys, op):
    bad = U.save(tmp_path / "full.safetensors", U.full_tensors(kit.targets[:3]))
    lora_refused(kit, tmp_path, capsys, bad, op, r"\(full\) has no exact low-rank form")


# ---------------------------------------------------------------------------------------------
# Malformed alpha; one layer under two key styles (one delta would be dropped)


@pytest.mark.parametrize("op", ["inspect", "merge", "join", "resize"])
@pytest.mark.parametrize("family,shape", [("lora", (0,)), ("lora", (3,)), ("lora", (1, 2)), ("loha", (3,)),
                                          ("lokr", (0,))])
def test_alpha_that_is_not_one_number(kit, tmp_path, capsys, family, shape, op):
    tg = [t for t in kit.targets if t.name == "lora_te_text_model_encoder_layers_0_mlp_fc1"]
    tensors = {"lora": U.lora_tensors, "loha": U.loha_tensors, "lokr": U.lokr_tensors}[family](tg)
    tensors[f"{tg[0].name}.alpha"] = torch.ones(shape)
    bad = U.save(tmp_path / f"alpha_{family}.safetensors", U.lora_tensors(kit.targets[4:6]) | tensors)
    lora_refused(kit, tmp_path, capsys, bad, op,
                 rf"module {tg[0].name}: alpha has shape {re.escape(str(list(shape)))}; it must be one number")


def _two_styles(kind: str) -> tuple[dict[str, torch.Tensor], str]:
    """A file holding one layer twice, and the refusal expected."""
    ff = [t for t in U.tiny_targets("sd15") if t.name == FF]
    kohya = U.lora_tensors(ff)
    if kind in ("kohya+compvis", "kohya+peft"):
        other = U.lora_tensors(ff, style=kind.split("+")[1], seed=3)
        raw = next(iter(other)).rsplit(".lora_", 1)[0]
        return kohya | other, rf"layer {FF} is in the file twice, as {FF} and {re.escape(raw)}: two key styles"
    if kind == "te-alias":
        te = [t for t in U.tiny_targets("sd15") if t.name == "lora_te_text_model_encoder_layers_0_mlp_fc1"]
        short = {k.replace("_text_model_", "_", 1): v for k, v in U.lora_tensors(te, seed=3).items()}
        return U.lora_tensors(te) | short, r"layer lora_te_text_model_encoder_layers_0_mlp_fc1 is in the file twice"
    if kind == "down+lora_A":
        extra = {f"{FF}.lora_A.weight": kohya[f"{FF}.lora_down.weight"] * 2}
        return kohya | extra, rf"module {FF} has lora_down\.weight and lora_A\.weight: one factor under two key styles"
    if kind == "lokr-w1+w1ab":
        lokr = U.lokr_tensors(ff, variant="both")
        lokr[f"{FF}.lokr_w1"] = lokr[f"{FF}.lokr_w1_a"] @ lokr[f"{FF}.lokr_w1_b"]
        return lokr, rf"module {FF} has lokr_w1 and lokr_w1_a and lokr_w1_b: one factor under two key styles"
    return kohya | U.loha_tensors(ff), rf"module {FF} holds lora tensors and also hada_w1_a, .*: two modules for one layer"


TWO_STYLES = ["kohya+compvis", "kohya+peft", "te-alias", "down+lora_A", "lokr-w1+w1ab", "lora+loha"]


@pytest.mark.parametrize("op", ["inspect", "merge", "join", "resize"])
@pytest.mark.parametrize("kind", TWO_STYLES)
def test_one_layer_under_two_key_styles(kit, tmp_path, capsys, kind, op):
    tensors, problem = _two_styles(kind)
    bad = U.save(tmp_path / "twice.safetensors", tensors)
    lora_refused(kit, tmp_path, capsys, bad, op, problem)


# ---------------------------------------------------------------------------------------------
# Decided from the header: a checkpoint read as a LoRA, crafted headers


def test_checkpoint_read_as_a_lora_is_refused_from_its_header(kit, tmp_path, capsys, monkeypatch):
    """No tensor of the checkpoint is read before the refusal: it costs the header, whatever the
    file's size."""
    out = tmp_path / "out"
    out.mkdir()
    reads = []
    real_get = fileio.SafetensorsFile.get
    monkeypatch.setattr(fileio.SafetensorsFile, "get",
                        lambda self, key: reads.append((self.path, key)) or real_get(self, key))
    with pytest.raises(OrthoLoraError) as err:
        read_lora(kit.base)
    assert reads == []
    one_line(str(err.value), [kit.base], r"no LoRA modules found \(a checkpoint \(SD1\.x\), not a LoRA\)")
    guard = Guard([kit.base, kit.lora], [tmp_path, out])
    for op in ("inspect", "join", "diag"):
        refused_everywhere(lora_ops(kit, kit.base, out)[op], [kit.base], r"no LoRA modules found", capsys, guard)
    assert not [key for path, key in reads if path == kit.base]


def _raw(path: Path, header: bytes, data: bytes = b"") -> Path:
    path.write_bytes(len(header).to_bytes(8, "little") + header + data)
    return path


def _deep(levels: int, inner: bytes = b"1") -> bytes:
    return b"[" * levels + inner + b"]" * levels


def _crafted(kind: str, lora: Path) -> tuple[bytes, str]:
    """A header (plus data) a crafted or broken file could carry, and the refusal expected."""
    header, data = _header(lora.read_bytes())
    name = next(k for k in header if k != "__metadata__")
    if kind == "header-over-cap":  # valid JSON, padded past the cap
        text = json.dumps(header).encode()
        return text + b" " * (fileio.MAX_HEADER_BYTES + 1 - len(text)), r"header length 16777217 is over 16777216"
    if kind == "deep-shape":
        text = json.dumps(header).encode().replace(b'"shape": [', b'"shape": ' + b"[" * 100_000 + b"[", 1)
        text = text.replace(b"], \"data_offsets\"", b"]" + b"]" * 100_000 + b', "data_offsets"', 1)
        return text, r"bad safetensors header \(JSON nested deeper than 8 levels\)"
    if kind == "deep-metadata":
        header["__metadata__"] = {**header.get("__metadata__", {}), "x": "@deep@"}
        text = json.dumps(header).encode()
        return text.replace(b'"@deep@"', _deep(200_000)), r"bad safetensors header \(JSON nested deeper than 8 levels\)"
    if kind == "deep-unclosed":
        return b"{" * 1_000_000, r"bad safetensors header \(not valid JSON: unbalanced brackets or quotes\)"
    if kind == "shape-overflow":
        header[name] = {"dtype": "F32", "shape": [0, 2**62, 2**62], "data_offsets": [0, 0]}
        return json.dumps(header).encode(), r"shape \[0, 4611686018427387904, 4611686018427387904\] is too large"
    if kind == "many-tensors":
        header |= {f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(fileio.MAX_TENSORS)}
        return json.dumps(header).encode(), r"bad safetensors header \(over 32768 tensors\)"
    header[name]["shape"] = [2**40] * 2
    return json.dumps(header).encode(), rf"tensor {re.escape(repr(name))}: .* is too large|data_offsets span"


CRAFTED = ["header-over-cap", "deep-shape", "deep-metadata", "deep-unclosed", "shape-overflow", "shape-huge",
           "many-tensors"]


@pytest.mark.parametrize("op", ["inspect", "join", "resize"])
@pytest.mark.parametrize("kind", CRAFTED)
def test_crafted_header_lora(kit, tmp_path, capsys, kind, op):
    header, problem = _crafted(kind, kit.lora)
    bad = _raw(tmp_path / f"{kind}.safetensors", header, _header(kit.lora.read_bytes())[1])
    lora_refused(kit, tmp_path, capsys, bad, op, problem)


@pytest.mark.parametrize("op", CKPT_OPS)
@pytest.mark.parametrize("kind", ["deep-metadata", "shape-overflow"])
def test_crafted_header_checkpoint(kit, tmp_path, capsys, kind, op):
    header, problem = _crafted(kind, Path(kit.base))
    bad = _raw(tmp_path / f"{kind}.safetensors", header, _header(Path(kit.base).read_bytes())[1])
    out = tmp_path / "out"
    out.mkdir()
    guard = Guard([bad, kit.lora, kit.tuned], [tmp_path, out])
    refused_everywhere(ckpt_ops(kit, bad, out)[op], [bad], problem, capsys, guard)


# ---------------------------------------------------------------------------------------------
# Torch files holding tensors that are not plain arrays


def _odd_tensor(kind: str, t: torch.Tensor) -> torch.Tensor:
    if kind == "sparse":
        return t.to_sparse()
    if kind == "expanded":  # stride 0: 1 stored value seen as the whole tensor
        return torch.ones(1).expand(t.shape)
    return t.to(torch.complex64)


ODD = {"sparse": r"is sparse_coo, not a dense tensor", "expanded": r"repeats its stored values",
       "complex": r"has dtype complex64, which cannot be read"}


@pytest.mark.parametrize("kind", ODD)
@pytest.mark.parametrize("op", ["inspect", "merge", "extract-base", "extract-tuned", "merge-ckpt", "resize-ckpt"])
def test_torch_file_with_a_tensor_that_is_not_plain(kit, tmp_path, capsys, kind, op):
    out = tmp_path / "out"
    out.mkdir()
    if op in ("inspect", "merge"):
        tensors = U.lora_tensors(kit.targets)
        key = next(k for k in tensors if k.endswith("lora_up.weight"))
    else:
        tensors = safetensors.torch.load_file(str(kit.base if op != "extract-tuned" else kit.tuned))
        key = FF_KEY
    tensors[key] = _odd_tensor(kind, tensors[key])
    bad = tmp_path / f"{kind}.ckpt"
    torch.save({"state_dict": tensors}, bad)
    ops = lora_ops(kit, bad, out) | {"merge-ckpt": ckpt_ops(kit, bad, out)["merge"]} | ckpt_ops(kit, bad, out)
    guard = Guard([bad, kit.lora, kit.base, kit.tuned], [tmp_path, out])
    refused_everywhere(ops[op], [bad], rf"tensor {re.escape(repr(key))} {ODD[kind]}", capsys, guard)


# ---------------------------------------------------------------------------------------------
# NaN in the base checkpoint of a resize


@pytest.mark.parametrize("recipe", ["spn_ckpt=1,thr=-1", "subspace=1,thr=0"])
def test_nan_in_the_base_checkpoint_resize(kit, tmp_path, capsys, recipe):
    bad, lora = _base_holding(kit, tmp_path, float("nan"))
    out = tmp_path / "out"
    out.mkdir()
    guard = Guard([bad, lora], [tmp_path, out])
    case = (lambda: resize_files([lora], out, recipe, bad, cache_dir=tmp_path / "out" / "cache"),
            ["resize", lora, "--ckpt", bad, "-o", out, "-r", recipe, "--cache-dir", out / "cache"])
    refused_everywhere(case, [bad], rf"tensor {re.escape(repr(FF_KEY))} has 1 NaN and 0 Inf values", capsys, guard)


# ---------------------------------------------------------------------------------------------
# File names that are not UTF-8


NOT_UTF8 = os.fsdecode(b"\xff\xfe-lora.safetensors")


@pytest.mark.parametrize("op", ["inspect", "merge", "join", "resize"])
def test_file_name_that_is_not_utf8(kit, tmp_path, capsys, op):
    """The one line shows the name's bytes escaped (\\xff) and is valid UTF-8 (printable, JSON-able)."""
    bad = tmp_path / NOT_UTF8
    bad.write_bytes(b"junk")
    out = tmp_path / "out"
    out.mkdir()
    guard = Guard([bad, kit.lora, kit.base], [tmp_path, out])
    api, argv = lora_ops(kit, bad, out)[op]
    shown = printable(str(bad))
    assert "\\xff\\xfe-lora" in shown
    line = api_refused(api, [shown], r"too short to be a safetensors file")
    line.encode("utf-8")
    guard.check()
    cli_refused(argv, [shown], r"too short", capsys).encode("utf-8")
    guard.check()


def test_file_names_as_bytes_and_surrogate_escapes_are_read(kit, tmp_path):
    good = tmp_path / NOT_UTF8
    shutil.copy(kit.lora, good)
    for name in (good, str(good), os.fsencode(good)):
        assert read_lora(name).modules.keys() == read_lora(kit.lora).modules.keys()
        with open_tensors(name) as f:
            assert len(f) == len(safetensors.torch.load_file(str(kit.lora)))
    with pytest.raises(OrthoLoraError) as err:
        read_lora(os.fsencode(tmp_path / os.fsdecode(b"missing-\xff.safetensors")))
    assert str(err.value).encode("utf-8") and "missing-\\xff" in str(err.value)


# ---------------------------------------------------------------------------------------------
# Not errors: missing alpha, bf16 alpha, unknown keys, all-zero layers


def _merged_delta(kit, lora: Path, tmp_path: Path, key: str) -> torch.Tensor:
    o = tmp_path / f"{lora.stem}_merged.safetensors"
    merge_lora(kit.base, lora, 1.0, o)
    with safetensors.safe_open(str(o), "pt") as f, safetensors.safe_open(str(kit.base), "pt") as b:
        return f.get_tensor(key).float() - b.get_tensor(key).float()


def test_missing_alpha_means_alpha_equals_rank(kit, tmp_path, capsys):
    ff = [t for t in U.tiny_targets("sd15") if t.name == FF]
    tensors = {k: v for k, v in U.lora_tensors(ff, rank=4, alpha=1.0).items() if not k.endswith(".alpha")}
    path = U.save(tmp_path / "no_alpha.safetensors", tensors)
    m = read_lora(path).modules[FF]
    assert m.alpha == 4.0 and m.lowrank().scale == 1.0
    want = tensors[f"{FF}.lora_up.weight"] @ tensors[f"{FF}.lora_down.weight"]
    torch.testing.assert_close(_merged_delta(kit, path, tmp_path, FF_KEY), want, rtol=1e-5, atol=1e-6)
    assert main(["inspect", str(path), "--quiet"]) == 0
    assert "warning" not in capsys.readouterr().out


@pytest.mark.parametrize("shape", [(), (1,)], ids=["0-dim", "[1]"])
def test_alpha_stored_in_bf16(kit, tmp_path, shape):
    ff = [t for t in U.tiny_targets("sd15") if t.name == FF]
    tensors = U.lora_tensors(ff, rank=4)
    tensors[f"{FF}.alpha"] = torch.tensor(3.0, dtype=torch.bfloat16).reshape(shape)
    path = U.save(tmp_path / "bf16_alpha.safetensors", tensors)
    assert read_lora(path).modules[FF].lowrank().scale == 0.75
    want = 0.75 * tensors[f"{FF}.lora_up.weight"] @ tensors[f"{FF}.lora_down.weight"]
    torch.testing.assert_close(_merged_delta(kit, path, tmp_path, FF_KEY), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rank", [256, 257, 1025])
def test_written_alpha_survives_bf16(tmp_path, rank):
    """bf16 holds integers exactly only up to 256: alpha = 257 would read back as 256 (scale off by
    0.4 %). The writer keeps alpha exact (float32 where the file's dtype cannot hold it)."""
    gen = torch.Generator().manual_seed(0)
    n = rank + 3
    lr = LowRank(torch.randn(n, rank, generator=gen), torch.randn(rank, n, generator=gen), 1.0, (n, n))
    path = tmp_path / f"r{rank}.safetensors"
    write_lora(path, {"lora_unet_made_up_layer": lr}, "sd15", torch.bfloat16)
    m = read_lora(path).modules["lora_unet_made_up_layer"]
    assert m.alpha == rank and m.lowrank().scale == 1.0


def test_unknown_keys_are_reported_not_fatal(kit, tmp_path, capsys):
    tensors = U.lora_tensors(kit.targets)
    tensors["lora_unet_not_a_layer.lora_down.weight"] = torch.randn(2, 8)
    tensors["lora_unet_not_a_layer.lora_up.weight"] = torch.randn(8, 2)
    tensors["some.stray_tensor"] = torch.zeros(3)
    path = U.save(tmp_path / "unknown.safetensors", tensors)
    lf = read_lora(path)
    assert lf.unknown == ["lora_unet_not_a_layer"] and lf.stray_keys == ["some.stray_tensor"]
    for op in LORA_OPS:
        if op == "diag":
            continue  # a per-rank diag needs every module to have the spec's rank
        out = tmp_path / f"out_{op}"
        out.mkdir()
        report = lora_ops(kit, path, out)[op][0]()
        assert any("not_a_layer" in w or "unknown" in w or "1 module" in w for w in report.warnings), \
            (op, report.warnings)
    capsys.readouterr()
    assert main(["inspect", str(path), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"warning: 1 module\(s\) match no layer", printed)
    assert re.search(r"warning: 1 tensor\(s\) outside any module: some\.stray_tensor", printed)
    o = tmp_path / "m.safetensors"
    assert main(["merge", str(kit.base), str(path), "-o", str(o), "--quiet"]) == 0
    assert "lora_unet_not_a_layer" in capsys.readouterr().out and o.exists()


def _zero_lora(kit, tmp_path: Path, all_zero: bool) -> Path:
    tensors = U.lora_tensors(kit.targets)
    for key in tensors:
        if key.endswith("lora_up.weight") and (all_zero or kit.targets[0].name in key):
            tensors[key] = torch.zeros_like(tensors[key])
    return U.save(tmp_path / f"{'all_zero' if all_zero else 'one_zero'}.safetensors", tensors)


def _finite_file(path: Path) -> None:
    for name, t in safetensors.torch.load_file(str(path)).items():
        assert bool(torch.isfinite(t.float()).all()), (path, name)


def test_all_zero_layers_are_handled(kit, tmp_path):
    zero = _zero_lora(kit, tmp_path, all_zero=False)
    name = kit.targets[0].name
    report = inspect_lora(zero)
    row = next(r for r in report.rows if r.module == name)
    assert row.extra["norm"] == 0.0
    assert all(v == v for v in report.totals["block_energy"].values())
    join_loras([zero, kit.lora], tmp_path / "j.safetensors")
    _finite_file(tmp_path / "j.safetensors")
    report = mix_loras([zero, zero], tmp_path / "mx.safetensors", "fro=0.99")
    assert next(r for r in report.rows if r.module == name).status == "skipped"
    assert name not in read_lora(tmp_path / "mx.safetensors").modules
    report = resize_files([zero], tmp_path / "rs", "sv_fro=0.9")
    assert next(r for r in report.rows if r.module == name).status in ("zero", "dropped")
    for out in report.outputs:
        _finite_file(Path(out))
    report = ortho_lora([zero, kit.lora2], tmp_path / "or")
    for out in report.outputs:
        _finite_file(Path(out))
    assert not any(isinstance(v, float) and v != v for r in report.rows for v in (r.rel_error, *r.extra.values()))
    merge_lora(kit.base, zero, 1.0, tmp_path / "m.safetensors")


@pytest.mark.slow
def test_all_zero_everything_leaves_nothing_to_write(kit, tmp_path, capsys):
    zero = _zero_lora(kit, tmp_path, all_zero=True)
    o = tmp_path / "mx.safetensors"
    guard = Guard([zero], [tmp_path])
    case = (lambda: mix_loras([zero, zero], o, 4), ["mix", zero, zero, "--rank", "4", "-o", o])
    refused_everywhere(case, [o], r"nothing to write", capsys, guard)
    o = tmp_path / "x.safetensors"
    guard = Guard([kit.base], [tmp_path])
    case = (lambda: extract_lora(kit.base, kit.base, 4, save_path=o), ["extract", kit.base, kit.base, "-o", o])
    refused_everywhere(case, [o], r"nothing to write: every module was skipped", capsys, guard)


# ---------------------------------------------------------------------------------------------
# Outputs: existing files, names escaping the models folder, a disk that fills up


def output_ops(kit, out_file: Path, out_dir: Path, overwrite: bool = False) -> dict[str, tuple]:
    """(API call, CLI argv) of every operation that writes, into `out_file` or `out_dir`."""
    o, ow, flag = out_file, overwrite, ["--overwrite"] if overwrite else []
    return {
        "extract": (lambda: extract_lora(kit.base, kit.tuned, 4, save_path=o, overwrite=ow),
                    ["extract", kit.base, kit.tuned, "--rank", "4", "-o", o, *flag]),
        "merge": (lambda: merge_lora(kit.base, kit.lora, 1.0, o, overwrite=ow),
                  ["merge", kit.base, kit.lora, "-o", o, *flag]),
        "join": (lambda: join_loras([kit.lora, kit.lora2], o, overwrite=ow),
                 ["join", kit.lora, kit.lora2, "-o", o, *flag]),
        "mix": (lambda: mix_loras([kit.lora, kit.lora2], o, 4, overwrite=ow),
                ["mix", kit.lora, kit.lora2, "--rank", "4", "-o", o, *flag]),
        "diag": (lambda: bake_diag(kit.lora, "1,1,0,1", o, overwrite=ow), ["diag", kit.lora, "1,1,0,1", "-o", o, *flag]),
        "resize": (lambda: resize_files([kit.lora], out_dir, "rank=2", overwrite=ow),
                   ["resize", kit.lora, "-o", out_dir, "-r", "rank=2", *flag]),
        "ortho": (lambda: ortho_lora([kit.lora, kit.lora2], out_dir, directions=1, residuals=False, overwrite=ow),
                  ["ortho", kit.lora, kit.lora2, "-o", out_dir, "--directions", "1", "--no-residuals", *flag]),
    }


def _existing_output(kit, tmp_path: Path, op: str, content: bytes) -> tuple[Path, Path, Path, "Guard"]:
    """An output folder whose file for `op` already holds `content`: (out_dir, out_file, that file,
    a Guard over it and the inputs)."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out_file = out_dir / "out.safetensors"
    target = {"resize": out_dir / "good_rank2.safetensors",
              "ortho": out_dir / "ortho_shared.safetensors"}.get(op, out_file)
    target.write_bytes(content)
    return out_dir, out_file, target, Guard([target, kit.base, kit.tuned, kit.lora, kit.lora2], [out_dir])


@pytest.mark.parametrize("op", ["extract", "merge", "join", "mix", "diag", "resize", "ortho"])
def test_output_that_exists_is_not_replaced(kit, tmp_path, capsys, op):
    out_dir, out_file, target, guard = _existing_output(kit, tmp_path, op, b"keep me")
    refused_everywhere(output_ops(kit, out_file, out_dir)[op], [target], r"exists", capsys, guard)
    assert target.read_bytes() == b"keep me"


@pytest.mark.parametrize("op", ["extract", "merge", "join", "mix", "diag", "resize", "ortho"])
def test_existing_output_is_refused_before_any_work(kit, tmp_path, op):
    """One typed error (`OutputExists`), raised before the first step of work is reported."""
    out_dir, out_file, target, _ = _existing_output(kit, tmp_path, op, b"keep me")

    def no_work(done, total, what):
        raise AssertionError(f"work started ({what}) before the existing output was refused")

    o, d = out_file, out_dir
    calls = {
        "extract": lambda: extract_lora(kit.base, kit.tuned, 4, save_path=o, progress=no_work),
        "merge": lambda: merge_lora(kit.base, kit.lora, 1.0, o, progress=no_work),
        "join": lambda: join_loras([kit.lora, kit.lora2], o, progress=no_work),
        "mix": lambda: mix_loras([kit.lora, kit.lora2], o, 4, progress=no_work),
        "diag": lambda: bake_diag(kit.lora, "1,1,0,1", o, progress=no_work),
        "resize": lambda: resize_files([kit.lora], d, "rank=2", progress=no_work),
        "ortho": lambda: ortho_lora([kit.lora, kit.lora2], d, directions=1, residuals=False, progress=no_work),
    }
    with pytest.raises(OutputExists) as err:
        calls[op]()
    assert err.value.path == str(target) and target.read_bytes() == b"keep me"


def _copy_inputs(kit, folder: Path) -> SimpleNamespace:
    folder.mkdir()
    names = ("base", "tuned", "lora", "lora2")
    return SimpleNamespace(**{k: Path(shutil.copy(getattr(kit, k), folder)) for k in names})


@pytest.mark.parametrize("kind", ["same-path", "hard-link", "symlink"])
@pytest.mark.parametrize("op", ["extract", "merge", "join", "mix", "diag", "resize", "ortho"])
def test_output_that_is_an_input_is_refused_even_with_overwrite(kit, tmp_path, capsys, op, kind):
    """The output would replace an input (the same path, a hard link or a symlink to it): refused
    before any work even with overwrite; every input byte-identical."""
    d = tmp_path / "d"
    k = _copy_inputs(kit, d)
    victim = {"extract": "tuned", "merge": "base"}.get(op, "lora2")
    target = {"resize": d / "good_rank2.safetensors", "ortho": d / "ortho_shared.safetensors"}.get(
        op, d / "out.safetensors")
    if kind == "same-path":
        getattr(k, victim).rename(target)
        setattr(k, victim, target)
    elif kind == "hard-link":
        os.link(getattr(k, victim), target)
    else:
        target.symlink_to(getattr(k, victim))
    o, flag = d / "out.safetensors", "--overwrite"
    cases = {
        "extract": (lambda: extract_lora(k.base, k.tuned, 4, save_path=o, overwrite=True),
                    ["extract", k.base, k.tuned, "--rank", "4", "-o", o, flag]),
        "merge": (lambda: merge_lora(k.base, k.lora, 1.0, o, overwrite=True), ["merge", k.base, k.lora, "-o", o, flag]),
        "join": (lambda: join_loras([k.lora, k.lora2], o, overwrite=True), ["join", k.lora, k.lora2, "-o", o, flag]),
        "mix": (lambda: mix_loras([k.lora, k.lora2], o, 4, overwrite=True),
                ["mix", k.lora, k.lora2, "--rank", "4", "-o", o, flag]),
        "diag": (lambda: bake_diag(k.lora2, "1,1,0,1", o, overwrite=True), ["diag", k.lora2, "1,1,0,1", "-o", o, flag]),
        "resize": (lambda: resize_files([k.lora, k.lora2], d, "rank=2", overwrite=True),
                   ["resize", k.lora, k.lora2, "-o", d, "-r", "rank=2", flag]),
        "ortho": (lambda: ortho_lora([k.lora, k.lora2], d, directions=1, residuals=False, overwrite=True),
                  ["ortho", k.lora, k.lora2, "-o", d, "--directions", "1", "--no-residuals", flag]),
    }
    guard = Guard([k.base, k.tuned, k.lora, k.lora2, target], [d])
    refused_everywhere(cases[op], [target], r"is also an input of this run", capsys, guard)


def test_resize_inputs_sharing_a_stem_are_refused(kit, tmp_path, capsys):
    """d1/x and d2/x would both write out/x_rank2: refused before any work (nothing written)."""
    a, b, out = tmp_path / "d1", tmp_path / "d2", tmp_path / "out"
    for folder in (a, b, out):
        folder.mkdir()
    x1, x2 = Path(shutil.copy(kit.lora, a / "x.safetensors")), Path(shutil.copy(kit.lora2, b / "x.safetensors"))
    case = (lambda: resize_files([x1, x2], out, "rank=2"), ["resize", x1, x2, "-o", out, "-r", "rank=2"])
    refused_everywhere(case, [out / "x_rank2.safetensors"], r"two outputs of this run", capsys,
                       Guard([x1, x2], [out]))


def test_multi_file_runs_are_all_or_nothing(kit, tmp_path, capsys, monkeypatch):
    """resize with a good file then a bad one, ortho whose second write fails: no output at all."""
    out = tmp_path / "out"
    out.mkdir()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"")
    guard = Guard([kit.lora, bad], [out])
    case = (lambda: resize_files([kit.lora, bad], out, "rank=2"), ["resize", kit.lora, bad, "-o", out, "-r", "rank=2"])
    refused_everywhere(case, [bad], r"too short", capsys, guard)

    from lib_ortholora.lorafile import LoraWriter
    real, calls = LoraWriter.write, []

    def second_fails(writer, name, tensors):  # the outputs are written side by side, module by module
        if writer.path not in calls:
            calls.append(writer.path)
        if writer.path == calls[-1] and len(calls) == 2:
            raise OrthoLoraError("cannot write: No space left on device", writer.path)
        return real(writer, name, tensors)

    monkeypatch.setattr(LoraWriter, "write", second_fails)
    with pytest.raises(OrthoLoraError, match="No space left"):
        ortho_lora([kit.lora, kit.lora2], out, directions=2, residuals=False)
    assert len(calls) == 2
    guard.check()


def test_cli_output_names_are_the_users_own(kit, tmp_path, capsys):
    """'..' and ':' are fine in names given on the command line (only UI names are restricted)."""
    out = tmp_path / "out"
    lora = Path(shutil.copy(kit.lora, tmp_path / "v1..final:b.safetensors"))
    assert main(["resize", str(lora), "-o", str(out), "-r", "rank=2", "--quiet"]) == 0
    assert main(["ortho", str(lora), str(kit.lora2), "-o", str(out), "--prefix", "a..b:c", "--directions", "1",
                 "--no-residuals", "--quiet"]) == 0
    assert sorted(os.listdir(out)) == ["a..b:c_shared.safetensors", "v1..final:b_rank2.safetensors"]


def test_output_must_be_safetensors(kit, tmp_path, capsys):
    """`-o x.ckpt` would hold safetensors bytes that no tool reads as a .ckpt: refused."""
    o = tmp_path / "x.ckpt"
    case = (lambda: join_loras([kit.lora, kit.lora2], o), ["join", kit.lora, kit.lora2, "-o", o])
    refused_everywhere(case, [o], r"must be a \.safetensors file", capsys, Guard([kit.lora], [tmp_path]))


def test_overwrite_keeps_the_permissions(kit, tmp_path):
    o = tmp_path / "j.safetensors"
    o.write_bytes(b"old")
    os.chmod(o, 0o600)
    join_loras([kit.lora, kit.lora2], o, overwrite=True)
    assert read_lora(o).modules and (o.stat().st_mode & 0o777) == 0o600


def test_a_run_that_writes_nothing_fails(kit, tmp_path, capsys):
    """A recipe that keeps no direction: one line saying nothing was written, exit 2."""
    out = tmp_path / "out"
    out.mkdir()
    case = (lambda: resize_files([kit.lora], out, "spn_lora=1,thr=1"),
            ["resize", kit.lora, "-o", out, "-r", "spn_lora=1,thr=1"])
    refused_everywhere(case, [out / "good_spnlora1_thr1.safetensors"], r"nothing was written", capsys,
                       Guard([kit.lora], [out]))


def test_demo_and_bench_never_replace_files_unasked(tmp_path, capsys):
    demo = tmp_path / "demo"
    demo.mkdir()
    (demo / "demo_lora.safetensors").write_bytes(b"mine")
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "sd15_extract_r32.safetensors").write_bytes(b"mine too")
    guard = Guard([demo / "demo_lora.safetensors", bench / "sd15_extract_r32.safetensors"], [demo, bench])
    cli_refused(["demo", "-o", demo], [demo / "demo_lora.safetensors"], r"exists; pass --overwrite", capsys)
    cli_refused(["bench", "extract", "--small", "--workdir", bench], [bench], r"pass --overwrite", capsys)
    guard.check()


def test_an_error_starts_its_own_line_after_a_progress_bar(kit, tmp_path, capsys, monkeypatch):
    """The bar's line is ended before the error is printed."""
    import sys

    from lib_ortholora import cli
    from lib_ortholora.progress import TextBar

    class EveryStep(TextBar):  # draws every step, to the captured stderr
        def __init__(self, label):
            super().__init__(label, stream=sys.stderr)

        def __call__(self, done, total, what):
            self._last = float("-inf")
            super().__call__(done, total, what)

    monkeypatch.setattr(cli, "TextBar", EveryStep)
    tensors = safetensors.torch.load_file(str(kit.tuned))
    tensors[FF_KEY][0, 0] = float("nan")
    tuned = tmp_path / "nan.safetensors"
    safetensors.torch.save_file(tensors, str(tuned))
    capsys.readouterr()
    assert main(["extract", str(kit.base), str(tuned), "--rank", "4", "-o", str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err
    lines = [line.split("\r")[-1] for line in err.split("\n")]
    assert any(line.startswith("error: ") and "NaN" in line for line in lines), err


@pytest.mark.parametrize("name", ["../escape", "/tmp/abs", "sub/x", "..\\x", ".hidden", "a:b", "x\ty", ""])
def test_output_name_escaping_the_models_folder(tmp_path, name):
    folder = tmp_path / "Lora"
    folder.mkdir()
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(OrthoLoraError) as err:
        safe_output_path(folder, name)
    one_line(str(err.value), [folder], r"output name .* (must|is|contains|resolves)")
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_output_symlink_out_of_the_models_folder(tmp_path):
    folder = tmp_path / "Lora"
    folder.mkdir()
    (folder / "link.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
    with pytest.raises(OrthoLoraError, match="resolves outside"):
        safe_output_path(folder, "link")


class FullDisk:
    """An unbuffered file that takes `room` bytes in total, then fails with ENOSPC."""

    def __init__(self, file, room: int):
        self.file, self.room = file, room

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        if self.room <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        n = self.file.write(view[: self.room])
        self.room -= n
        return n

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()


@pytest.mark.parametrize("op", ["extract", "merge", "join", "mix", "diag", "resize", "ortho"])
def test_disk_fills_up_mid_write(kit, tmp_path, capsys, monkeypatch, op):
    """The write fails after some bytes: one line naming the output, the previous output (asked to
    be overwritten) and the inputs intact, no temp file left."""
    out_dir, out_file, target, guard = _existing_output(kit, tmp_path, op, b"previous version")
    real_open = open
    monkeypatch.setattr(fileio, "open", lambda *a, **k: FullDisk(real_open(*a, **k), 1000), raising=False)
    api, argv = output_ops(kit, out_file, out_dir, overwrite=True)[op]
    api_refused(api, [target], r"cannot write: No space left on device")
    guard.check()
    cli_refused(argv, [target], r"cannot write: No space left on device", capsys)
    guard.check()
    monkeypatch.undo()
    assert target.read_bytes() == b"previous version"


# ---------------------------------------------------------------------------------------------
# The UI and its HTTP API show the same one line


@pytest.fixture
def ui_cfg(kit, tmp_path):
    from lib_ortholora.ui import UiConfig

    lora_dir, ckpt_dir = tmp_path / "Lora", tmp_path / "Stable-diffusion"
    lora_dir.mkdir()
    ckpt_dir.mkdir()
    shutil.copy(kit.base, ckpt_dir / "base.safetensors")
    shutil.copy(kit.tuned, ckpt_dir / "tuned.safetensors")
    shutil.copy(kit.xl, lora_dir / "xl.safetensors")
    (lora_dir / "empty.safetensors").write_bytes(b"")
    (lora_dir / "taken.safetensors").write_bytes(b"keep me")
    return UiConfig(lora_dir, [ckpt_dir])


UI_CASES = {
    "empty": ("inspect", {"file": "empty.safetensors"}, "Lora/empty.safetensors", r"too short"),
    "other-arch": ("merge", {"base": "base.safetensors", "loras": ["xl.safetensors"], "out": "m"},
                   "Lora/xl.safetensors", r"made for SDXL"),
    "escape": ("extract", {"base": "base.safetensors", "tuned": "tuned.safetensors", "out": "../escape"},
               "Lora", r"output name '\.\./escape'"),
    "exists": ("extract", {"base": "base.safetensors", "tuned": "tuned.safetensors", "out": "taken"},
               "Lora/taken.safetensors", r"exists"),
}


@pytest.mark.parametrize("case", UI_CASES)
def test_ui_and_http_api_show_the_error(ui_cfg, tmp_path, case):
    from lib_ortholora.ui import api, ops
    from lib_ortholora.ui.runner import execute

    op, body, named, problem = UI_CASES[case]
    named = tmp_path / named
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    guard = Guard(files, [p for p in tmp_path.rglob("*") if p.is_dir()] + [tmp_path])
    api_refused(lambda: api.run_operation(ui_cfg, op, dict(body)), [named], problem)
    guard.check()
    outcome = execute(ui_cfg, op, lambda progress: ops.OPERATIONS[op](ui_cfg, **body, progress=progress))
    assert not outcome.ok
    shown = outcome.status.replace("\\", "")
    assert "Error" in shown and str(named) in shown and re.search(problem, shown), shown
    guard.check()

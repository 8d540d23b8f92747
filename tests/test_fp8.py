"""fp8 (e4m3fn / e5m2) checkpoints, common SDXL downloads: extracted from (computed in float32),
merged into (the stored dtype kept unless another is asked) and read as resize bases (see
test_resize.test_fp8_base_checkpoint)."""
from __future__ import annotations

from pathlib import Path

import pytest
import safetensors.torch
import torch

import lorautil as U
from lib_ortholora import arch as _arch
from lib_ortholora.errors import OrthoLoraError
from lib_ortholora.extract import extract, extract_lora
from lib_ortholora.fileio import open_tensors
from lib_ortholora.keys import targets
from lib_ortholora.lorafile import read_lora
from lib_ortholora.merge import merge_lora
from lib_ortholora.rank import as_policy

FP8 = [torch.float8_e4m3fn, torch.float8_e5m2]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def cast(path: Path, out: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """`path`'s floating tensors stored as `dtype` in `out`; returns what was written."""
    tensors = {k: v.to(dtype) if v.is_floating_point() else v
               for k, v in safetensors.torch.load_file(str(path)).items()}
    safetensors.torch.save_file(tensors, str(out))
    return tensors


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


@pytest.mark.parametrize("dtype", FP8, ids=["e4m3fn", "e5m2"])
def test_extract_from_fp8_checkpoints(pairs, tmp_path, dtype):
    """The LoRA extracted from an fp8 pair is the one extracted from its values in float32."""
    base, tuned = pairs("sd15")
    b8, t8 = tmp_path / "base8.safetensors", tmp_path / "tuned8.safetensors"
    values = [cast(base, b8, dtype), cast(tuned, t8, dtype)]
    b32, t32 = tmp_path / "base32.safetensors", tmp_path / "tuned32.safetensors"
    for tensors, path in zip(values, (b32, t32)):
        safetensors.torch.save_file({k: v.float() if v.is_floating_point() else v for k, v in tensors.items()},
                                    str(path))
    policy = as_policy(4, 1, None)
    results = []
    for b, t in ((b8, t8), (b32, t32)):
        with open_tensors(b) as bf, open_tensors(t) as tf:
            results.append(extract(bf, tf, policy, policy, svd="exact"))
    (arch8, low8, report8), (arch32, low32, _) = results
    assert arch8 == arch32 == "sd15" and low8.keys() == low32.keys()
    assert len(low8) == report8.totals["modules"] > 300
    for name, lr in low32.items():
        torch.testing.assert_close(low8[name].delta(), lr.delta(), rtol=0, atol=0)
    out = tmp_path / "x.safetensors"
    assert extract_lora(b8, t8, 4, save_path=out).outputs == [str(out)]


def test_nan_in_an_fp8_checkpoint_is_refused(pairs, tmp_path):
    base, tuned = pairs("sd15")
    b8 = tmp_path / "base8.safetensors"
    tensors = cast(base, b8, torch.float8_e4m3fn)
    key = next(t.ckpt_key for t in targets(_arch.Arch("sd15"), _arch.spec("sd15", 16)))
    bits(tensors[key])[5] = 0x7F  # e4m3fn's NaN
    safetensors.torch.save_file(tensors, str(b8))
    with pytest.raises(OrthoLoraError, match=rf"{b8}: tensor '{key}' has 1 NaN and 0 Inf values"):
        extract_lora(b8, tuned, 4)


@pytest.mark.parametrize("asked", [None, torch.float16], ids=["kept", "fp16"])
@pytest.mark.parametrize("dtype", FP8, ids=["e4m3fn", "e5m2"])
def test_merge_into_an_fp8_checkpoint(pairs, tmp_path, dtype, asked):
    """Merged layers are cast(W.float() + dW) to the stored dtype (or the one asked); every other
    tensor is bit-identical (or cast to the dtype asked)."""
    base, _ = pairs("sd15")
    b8 = tmp_path / "base8.safetensors"
    stored = cast(base, b8, dtype)
    tg = U.sample_targets("sd15")
    lora = U.save(tmp_path / "l.safetensors", U.lora_tensors(tg, alpha=2.0))
    out = tmp_path / "m.safetensors"
    merge_lora(b8, lora, 0.5, out, dtype=asked)
    merged = safetensors.torch.load_file(str(out))
    want = asked or dtype
    expected = {k: v.to(want) if v.is_floating_point() else v for k, v in stored.items()}
    modules = read_lora(lora).modules
    for key in {t.ckpt_key for t in tg}:
        acc = stored[key].float()
        for t in tg:
            if t.ckpt_key == key:
                acc[slice(*t.rows) if t.rows else slice(None)] += 0.5 * modules[t.name].delta().reshape(t.shape)
        expected[key] = acc.to(want)
    for key, w in expected.items():
        assert merged[key].dtype == w.dtype and torch.equal(bits(merged[key]), bits(w)), key

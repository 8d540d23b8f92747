"""The write side of lorafile: one alpha per file (`file_alpha`), factors that carry √(r/alpha), and
a round trip that reproduces every module's dW whatever its rank, in float32 and float16."""
from __future__ import annotations

import math

import pytest
import torch

from lib_ortholora.lorafile import file_alpha, read_lora, write_lora
from lib_ortholora.lowrank import LowRank, rel_error
from lib_ortholora.fileio import open_tensors

FF = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_2"


def _lr(gen: torch.Generator, out: int, inner: int, r: int, sigma: float = 1.0, scale: float = 1.0) -> LowRank:
    """A rank-r LowRank with singular values ≈ sigma (orthonormal factors, balanced)."""
    u = torch.linalg.qr(torch.randn(out, r, generator=gen))[0]
    v = torch.linalg.qr(torch.randn(inner, r, generator=gen))[0].T
    return LowRank(u * math.sqrt(sigma), v * math.sqrt(sigma), scale, (out, inner))


def _names(n: int, prefix: str = "lora_unet_layer") -> list[str]:
    return [f"{prefix}_{i}" for i in range(n)]


def test_file_alpha_is_the_most_common_unet_rank():
    gen = torch.Generator().manual_seed(0)
    ranks = {"lora_unet_a": 8, "lora_unet_b": 8, "lora_unet_c": 3, "lora_te_a": 5, "lora_te_b": 5, "lora_te_c": 5}
    lrs = {n: _lr(gen, 16, 16, r) for n, r in ranks.items()}
    assert file_alpha(lrs) == 8  # the UNet's, though the text encoder has more of 5
    assert file_alpha({n: lr for n, lr in lrs.items() if n.startswith("lora_te")}) == 5
    assert file_alpha({"lora_unet_a": lrs["lora_unet_a"], "lora_unet_c": lrs["lora_unet_c"]}) == 3  # tie: smaller
    assert file_alpha({}) == 1


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
def test_every_module_keeps_its_delta_with_one_alpha(tmp_path, dtype, tol):
    """Ranks 1 … 320 in one file (alpha = the common 4): each module's dW survives, signs and scales
    included; every alpha tensor holds the same value, which the metadata states."""
    gen = torch.Generator().manual_seed(1)
    ranks = [4] * 6 + [1, 2, 3, 5, 64, 320]
    lrs = {n: _lr(gen, 320, 400, r, scale=(-1) ** i * (0.3 + i)) for i, (n, r) in enumerate(zip(_names(len(ranks)), ranks))}
    path = tmp_path / "varying.safetensors"
    meta = write_lora(path, lrs, "sd15", dtype)
    assert meta["ss_network_alpha"] == "4" and meta["ss_network_dim"] == "Dynamic"
    with open_tensors(path) as f:
        alphas = {float(f.get(k)) for k in f.keys() if k.endswith(".alpha")}
    assert alphas == {4.0}
    back = read_lora(path, "sd15")
    for name, lr in lrs.items():
        m = back.modules[name]
        assert m.rank == lr.rank and m.alpha == 4.0
        assert rel_error(m.delta(), lr.delta()) < tol, (name, lr.rank)


@pytest.mark.parametrize("sigma", [1e-4, 1e-2, 1.0, 300.0])
def test_fp16_range_over_the_rank_spread(tmp_path, sigma):
    """fp16 keeps ~3 digits between 6.1e-5 and 65504. The factors of a rank-r module are scaled by
    √(r/alpha): with rank 1 next to alpha 96 (×0.10) and rank 1280 next to alpha 1 (×35.8), deltas
    whose singular values span 1e-4 … 300 still come back within 2e-3 (this project's fp16 bound)."""
    gen = torch.Generator().manual_seed(2)
    for ranks in ([96, 96, 1], [1, 1, 1280]):
        lrs = {n: _lr(gen, 1280, 1280, r, sigma) for n, r in zip(_names(3), ranks)}
        path = tmp_path / f"r{ranks[-1]}_{sigma:g}.safetensors"
        write_lora(path, lrs, "sd15", torch.float16, overwrite=True)
        back = read_lora(path, "sd15")
        for name, lr in lrs.items():
            assert rel_error(back.modules[name].delta(), lr.delta()) < 2e-3, (ranks, name)


def test_overflow_still_refused(tmp_path):
    """A factor beyond fp16's range is refused by name (the √(r/alpha) scaling can push it there)."""
    from lib_ortholora.errors import OrthoLoraError

    gen = torch.Generator().manual_seed(3)
    lrs = {FF: _lr(gen, 64, 64, 64, sigma=2e9), "lora_unet_x": _lr(gen, 64, 64, 1)}
    with pytest.raises(OrthoLoraError, match="overflows float16"):
        write_lora(tmp_path / "big.safetensors", lrs, "sd15", torch.float16)

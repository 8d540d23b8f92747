"""`inspect`: family, architecture, per-module rank/alpha/scale/norm, block energy, metadata, JSON."""
from __future__ import annotations

import json
import math

import pytest
import torch

import lorautil as U
from lib_ortholora.cli import main
from lib_ortholora.inspect import block_energy, inspect_lora, module_spectrum
from lib_ortholora.keys import name_table
from lib_ortholora.lorafile import read_lora


@pytest.mark.parametrize("arch_id", ["sd15", "sd2", "sdxl"])
def test_inspect_lora(tmp_path, arch_id):
    tgts = U.tiny_targets(arch_id)
    path = U.save(tmp_path / "l.safetensors", U.lora_tensors(tgts, rank=4, alpha=2.0, arch_id=arch_id),
                  {"ss_network_dim": "4", "ss_tag_frequency": "x" * 5000})
    report = inspect_lora(path)
    assert report.totals["family"] == "lora"
    assert report.totals["architecture"] == {"sd15": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL"}[arch_id]
    assert report.totals["modules"] == len(tgts) and report.totals["rank"] == "4"
    assert report.totals["metadata"]["ss_network_dim"] == "4"
    assert len(report.totals["metadata"]["ss_tag_frequency"]) < 400
    lf = read_lora(path)
    table = name_table(arch_id)
    for row in report.rows:
        module = lf.modules[row.module]
        assert row.status == "ok" and row.rank == 4 and row.extra["alpha"] == 2.0 and row.extra["scale"] == 0.5
        assert math.isclose(row.extra["norm"], float(module.delta().norm()), rel_tol=1e-4)
        assert row.extra["block"] == table[row.module].block
    energy = report.totals["block_energy"]
    assert math.isclose(sum(energy.values()), 1.0, rel_tol=1e-4)
    blocks = list(energy)
    assert blocks[0].startswith("TE") and "MID" in blocks and blocks[-1].startswith("OUT")
    te = sum(r.extra["norm"] ** 2 for r in report.rows if r.extra["block"].startswith("TE"))
    total = sum(r.extra["norm"] ** 2 for r in report.rows)
    assert math.isclose(sum(v for b, v in energy.items() if b.startswith("TE")), te / total, rel_tol=1e-3)


def test_inspect_lycoris_families(tmp_path):
    tgts = U.sample_targets("sdxl")
    tensors = {**U.loha_tensors(tgts[:4], rank=2, alpha=1.0), **U.lokr_tensors(tgts[4:8], variant="full"),
               **U.full_tensors(tgts[8:], shapes=U.tiny_shapes("sdxl"))}
    report = inspect_lora(U.save(tmp_path / "y.safetensors", tensors))
    assert report.totals["family"] == "full+loha+lokr" and report.totals["architecture"] == "SDXL"
    rows = {r.module: r for r in report.rows}
    lf = read_lora(tmp_path / "y.safetensors")
    for name, row in rows.items():
        assert math.isclose(row.extra["norm"], float(lf.modules[name].delta().norm()), rel_tol=1e-4)
    assert rows[tgts[0].name].rank == 2 and rows[tgts[0].name].extra["scale"] == 0.5
    assert rows[tgts[4].name].rank is None and rows[tgts[4].name].extra["scale"] == 1.0
    assert rows[tgts[8].name].extra["family"] == "full" and rows[tgts[8].name].extra["scale"] is None


def test_block_energy_counts_unknown_names():
    energy = block_energy({"lora_te_text_model_encoder_layers_0_mlp_fc1": 3.0, "mystery": 4.0}, "sd15")
    assert math.isclose(energy["TE"], 9 / 25) and math.isclose(energy["?"], 16 / 25)
    assert energy["IN01"] == 0.0


def test_cli_inspect_json(tmp_path, capsys):
    path = U.save(tmp_path / "l.safetensors", U.lora_tensors(U.sample_targets("sd15"), rank=3),
                  {"ss_tag_frequency": "y" * 5000})
    assert main(["inspect", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["operation"] == "inspect" and report["totals"]["rank"] == "3"
    assert len(report["totals"]["metadata"]["ss_tag_frequency"]) == 5000  # JSON keeps metadata whole
    assert main(["inspect", str(path)]) == 0
    text = capsys.readouterr().out
    assert "architecture: SD1.x" in text and "block_energy" in text


@pytest.mark.parametrize("make", [U.lora_tensors, U.loha_tensors, U.full_tensors])
def test_module_spectrum_is_the_singular_values_of_the_delta(tmp_path, make):
    """From the factors where there is an exact low-rank form, else from dW: the same numbers."""
    lf = read_lora(U.save(tmp_path / "l.safetensors", make(U.sample_targets("sd15"))))
    for name, module in lf.modules.items():
        got = module_spectrum(module)
        want = torch.linalg.svdvals(module.delta().double().reshape(module.shape[0], -1))
        assert got.dtype == torch.float64 and torch.all(got[:-1] >= got[1:]), name
        n = min(len(got), len(want))
        assert torch.allclose(got[:n], want[:n], rtol=1e-4, atol=1e-6 * float(want[0])), name
        assert all(float(x) <= 1e-5 * float(want[0]) for x in got[n:]), name

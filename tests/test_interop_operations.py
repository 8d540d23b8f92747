"""Every operation's output loads in diffusers at exactly the strength it claims, for SD1.5, SD2 and
SDXL, text encoders included: extract at the default rank policy, a base-aware resize, join, mix,
a baked diag and ortho's outputs all have ranks that vary from module to module (asserted, so the
check cannot pass by having none). See interop_util.DiffusersCheck for the reference."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lib_ortholora.extract import extract_lora
from lib_ortholora.diag import bake_diag
from lib_ortholora.join import join_loras
from lib_ortholora.lorafile import read_lora, write_lora
from lib_ortholora.mix import mix_loras
from lib_ortholora.ortho import ortho_lora
from lib_ortholora.resize import resize_files

import interop_util as IU

pytestmark = pytest.mark.slow
TOL = 1e-4  # the file's own dW (its fp16 factors read in float32) against diffusers' fused float32 weights


@pytest.fixture(scope="module", params=["sd15", "sd2", "sdxl"])
def outputs(request, pairs, tmp_path_factory):
    """{operation: output file} for one architecture, every output written in fp16 (the default)."""
    arch = request.param
    folder = tmp_path_factory.mktemp(f"ops_{arch}")
    base, tuned = pairs(arch)
    a, b = folder / "a.safetensors", folder / "b.safetensors"
    extract_lora(base, tuned, save_path=a, device="cpu")  # fraction=0.08,min=8,max=96
    write_lora(b, IU.varying_rank_lowranks(arch, seed=3), arch)
    made = {"extract": a}
    made["resize"] = Path(resize_files([a], folder / "resized", "spn_ckpt,thr=-1.5", base).outputs[0])
    made["join"] = folder / "join.safetensors"
    join_loras([a, b], made["join"], [0.8, -0.5], names=["a", "b"])
    made["mix"] = folder / "mix.safetensors"
    mix_loras([a, b], made["mix"], "fro=0.9", [1.0, 0.6])
    made["diag"] = folder / "diag.safetensors"
    bake_diag(made["join"], "a@0.5,b@0", made["diag"])
    report = ortho_lora([a, b], folder / "ortho")
    made["ortho_shared"] = next(Path(p) for p in report.outputs if p.endswith("ortho_shared.safetensors"))
    made["ortho_residual"] = next(Path(p) for p in report.outputs if "a_ortho_residual" in p)
    return arch, made


@pytest.fixture(scope="module")
def checkers():
    made = {}

    def get(arch: str) -> IU.DiffusersCheck:
        if arch not in made:
            made.clear()  # one architecture's models at a time
            made[arch] = IU.DiffusersCheck(arch)
        return made[arch]

    return get


@pytest.mark.parametrize("op", ["extract", "resize", "join", "mix", "diag", "ortho_shared", "ortho_residual"])
def test_every_output_loads_at_its_strength(outputs, checkers, op):
    arch, made = outputs
    lf = read_lora(made[op])
    alphas = {m.alpha for m in lf.modules.values()}
    assert len(alphas) == 1 and lf.metadata["ss_network_alpha"] == f"{alphas.pop():g}"
    IU.assert_rank_exceptions({n: m.rank for n, m in lf.modules.items()}, float(lf.metadata["ss_network_alpha"]),
                              everywhere=False)
    errs = IU.DiffusersCheck.errors(checkers(arch), made[op])
    assert len(errs) == len(lf.modules)
    assert max(errs.values()) < TOL, IU.strength_summary(errs, TOL)

"""Every LoRA family read from a file: dW equals a direct reference formula, the exact low-rank form
equals dW, key styles resolve to kohya names, architectures are detected, unsupported types refused."""
from __future__ import annotations

import math

import pytest
import torch

import lorautil as U
from lib_ortholora.errors import OrthoLoraError
from lib_ortholora.lorafile import read_lora
from lib_ortholora.sources import exact_lowrank

META = {"sd15": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}


def groups(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name, suffix = key.split(".", 1)
        out.setdefault(name, {})[suffix] = value
    return out


def scale_of(g: dict[str, torch.Tensor], rank: int | None) -> float:
    return 1.0 if rank is None else float(g["alpha"]) / rank


# --- direct reference formulas (dense, written independently of lib_ortholora) ----------------

def ref_lora(g, shape):
    up, down = g["lora_up.weight"], g["lora_down.weight"]
    s = scale_of(g, down.shape[0])
    if "lora_mid.weight" in g:
        return s * torch.einsum("or,rshw,si->oihw", up.flatten(1), g["lora_mid.weight"], down.flatten(1))
    return s * (up.flatten(1) @ down.flatten(1)).reshape(shape)


def ref_loha(g, shape):
    s = scale_of(g, g["hada_w1_b"].shape[0])
    if "hada_t1" in g:
        w = [torch.einsum("po,pqhw,qi->oihw", g[f"hada_w{i}_a"], g[f"hada_t{i}"], g[f"hada_w{i}_b"]) for i in (1, 2)]
        return s * w[0] * w[1]
    return s * ((g["hada_w1_a"] @ g["hada_w1_b"]) * (g["hada_w2_a"] @ g["hada_w2_b"])).reshape(shape)


def ref_lokr(g, shape):
    w1 = g["lokr_w1"] if "lokr_w1" in g else g["lokr_w1_a"] @ g["lokr_w1_b"]
    b, d = shape[0] // w1.shape[0], shape[1] // w1.shape[1]
    if "lokr_w2" in g:
        w2 = g["lokr_w2"]
    elif "lokr_t2" in g:
        w2 = torch.einsum("ib,ijhw,jd->bdhw", g["lokr_w2_a"], g["lokr_t2"], g["lokr_w2_b"])
    else:
        w2 = (g["lokr_w2_a"] @ g["lokr_w2_b"].flatten(1)).reshape(b, d, *shape[2:])
    dim = g["lokr_w1_b"].shape[0] if "lokr_w1_b" in g else g["lokr_w2_b"].shape[0] if "lokr_w2_b" in g else None
    w1 = w1.reshape(*w1.shape, *[1] * (w2.dim() - 2))
    return scale_of(g, dim) * torch.kron(w1.contiguous(), w2.contiguous())


REFS = {"lora": ref_lora, "loha": ref_loha, "lokr": ref_lokr, "full": lambda g, shape: g["diff"]}

CASES = [("lora", {}), ("lora", {"tucker": True}), ("lora", {"alpha": 1.5}),
         ("loha", {}), ("loha", {"tucker": True}), ("loha", {"alpha": 2.0})]
CASES += [("lokr", {"variant": v}) for v in U.LOKR_VARIANTS] + [("lokr", {"variant": "both", "alpha": 0.5})]
CASES += [("full", {})]


def build(family: str, tgts, arch_id: str, **kw) -> dict[str, torch.Tensor]:
    if family == "lora":
        return U.lora_tensors(tgts, rank=3, arch_id=arch_id, **kw)
    if family == "loha":
        return U.loha_tensors(tgts, rank=3, **kw)
    if family == "lokr":
        return U.lokr_tensors(tgts, rank=2, **kw)
    return U.full_tensors(tgts, shapes=U.tiny_shapes(arch_id))


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> bool:
    return float((a - b).norm()) <= tol * max(1.0, float(b.norm()))


@pytest.mark.parametrize("arch_id", ["sd15", "sd2", "sdxl"])
@pytest.mark.parametrize("family,kw", CASES, ids=[f"{f}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" for f, kw in CASES])
def test_delta_matches_reference(tmp_path, arch_id, family, kw):
    tgts = U.sample_targets(arch_id)
    tensors = build(family, tgts, arch_id, **kw)
    lf = read_lora(U.save(tmp_path / "x.safetensors", tensors, {"ss_base_model_version": META[arch_id]}))
    assert lf.arch == arch_id and not lf.unknown and not lf.stray_keys
    by_target = {t.name: t for t in tgts}
    for name, g in groups(tensors).items():
        t, module = by_target[name], lf.modules[name]
        assert module.family == family
        ref = REFS[family](g, t.shape).reshape(t.shape)
        assert close(module.delta().reshape(t.shape), ref), name
        lr = module.lowrank()
        if family == "full":
            assert lr is None
        else:
            assert close(lr.delta().reshape(t.shape), ref), name
        exact = exact_lowrank(module)
        assert exact.shape[0] == t.shape[0] and len(exact.shape) == len(t.shape)
        assert exact.rank <= min(t.shape[0], math.prod(t.shape[1:]))
        assert close(exact.delta().reshape(t.shape), ref, 1e-4), name


def test_full_bias_delta(tmp_path):
    tgts = U.sample_targets("sd2")
    tensors = U.full_tensors(tgts, shapes=U.tiny_shapes("sd2"))
    lf = read_lora(U.save(tmp_path / "f.safetensors", tensors))
    with_bias = [n for n, g in groups(tensors).items() if "diff_b" in g]
    assert with_bias
    for name in with_bias:
        assert torch.equal(lf.modules[name].bias_delta(), tensors[f"{name}.diff_b"])


def test_loha_lowrank_is_rank_r_squared(tmp_path):
    tgts = [t for t in U.sample_targets("sdxl") if t.shape[0] >= 48]
    lf = read_lora(U.save(tmp_path / "h.safetensors", U.loha_tensors(tgts, rank=3)))
    for module in lf.modules.values():
        assert module.rank == 3 and module.lowrank().rank == 9


def test_lokr_scale_is_one_when_both_factors_are_full(tmp_path):
    tgts = U.sample_targets("sd15")
    tensors = U.lokr_tensors(tgts, variant="full", alpha=7.0)
    lf = read_lora(U.save(tmp_path / "k.safetensors", tensors))
    for name, module in lf.modules.items():
        assert module.rank is None and module.lowrank().scale == 1.0


@pytest.mark.parametrize("style", ["peft", "compvis"])
@pytest.mark.parametrize("arch_id", ["sd15", "sdxl"])
def test_key_styles_resolve_to_kohya_names(tmp_path, style, arch_id):
    if style == "compvis" and arch_id == "sdxl":
        pytest.skip("SDXL kohya names are checkpoint-style already")
    tgts = U.sample_targets(arch_id)
    kohya = read_lora(U.save(tmp_path / "k.safetensors", U.lora_tensors(tgts, arch_id=arch_id)))
    other = read_lora(U.save(tmp_path / "o.safetensors", U.lora_tensors(tgts, style=style, arch_id=arch_id)))
    assert other.arch == arch_id and not other.unknown
    assert set(other.modules) == set(kohya.modules) == {t.name for t in tgts}
    for name, module in other.modules.items():
        ref = kohya.modules[name].delta()
        if style == "peft":  # no alpha in PEFT files: scale 1
            ref = ref * kohya.modules[name].rank / kohya.modules[name].alpha
        assert close(module.delta(), ref)


@pytest.mark.parametrize("arch_id", ["sd15", "sd2", "sdxl"])
@pytest.mark.parametrize("family", ["lora", "loha", "lokr"])
def test_architecture_detected_without_metadata(tmp_path, arch_id, family):
    tgts = U.tiny_targets(arch_id)
    tensors = build(family, tgts, arch_id)
    assert read_lora(U.save(tmp_path / "x.safetensors", tensors)).arch == arch_id


@pytest.mark.parametrize("suffix,family", [("dora_scale", "DoRA"), ("oft_blocks", "OFT"), ("on_input", "IA3"),
                                           ("a1.weight", "GLoRA")])
def test_unsupported_families_are_refused_by_name(tmp_path, suffix, family):
    tgts = U.sample_targets("sd15", 1)
    tensors = U.lora_tensors(tgts)
    tensors[f"{tgts[0].name}.{suffix}"] = torch.ones(tgts[0].shape[0])
    path = U.save(tmp_path / "bad.safetensors", tensors)
    with pytest.raises(OrthoLoraError) as err:
        read_lora(path)
    assert family in str(err.value) and "bad.safetensors" in str(err.value)

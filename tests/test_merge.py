"""Merge into a checkpoint: base + Σ m_i·dW_i on every mapped layer (q/k/v row blocks included),
bias deltas into biases, every other tensor bit-identical; errors and reports."""
from __future__ import annotations

import json

import pytest
import safetensors
import torch

import lorautil as U
from lib_ortholora.cli import main
from lib_ortholora.errors import OrthoLoraError
from lib_ortholora.fileio import open_tensors
from lib_ortholora.lorafile import read_lora
from lib_ortholora.merge import bias_key, merge_lora


def load(path) -> dict[str, torch.Tensor]:
    with open_tensors(path) as f:
        return {k: f.get(k).clone() for k in f.keys()}


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (dtype, shape and bytes)."""
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)))


def lora_set(tmp_path, arch_id: str) -> list:
    """A kohya LoRA on every layer plus LoHa, LoKr (Tucker) and full-diff files on a few layers each."""
    sample = U.sample_targets(arch_id)
    files = {
        "lora": U.lora_tensors(U.tiny_targets(arch_id), rank=4, alpha=2.0, arch_id=arch_id),
        "loha": U.loha_tensors(sample, rank=2, tucker=True),
        "lokr": U.lokr_tensors(sample, rank=2, variant="tucker"),
        "full": U.full_tensors(sample, shapes=U.tiny_shapes(arch_id)),
    }
    return [U.save(tmp_path / f"{name}.safetensors", t) for name, t in files.items()]


def expected(base: dict, paths: list, mults: list[float], arch_id: str) -> tuple[dict, set[str]]:
    out = {k: v.clone() for k, v in base.items()}
    touched = set()
    by_name = {t.name: t for t in U.tiny_targets(arch_id)}
    for path, m in zip(paths, mults):
        for name, module in read_lora(path).modules.items():
            t = by_name[name]
            rows = slice(*t.rows) if t.rows else slice(None)
            out[t.ckpt_key][rows] += m * module.delta().reshape(t.shape)
            touched.add(t.ckpt_key)
            if module.bias_delta() is not None:
                out[bias_key(t)][rows] += m * module.bias_delta()
                touched.add(bias_key(t))
    return out, touched


@pytest.mark.parametrize("arch_id", ["sd15", pytest.param("sd2", marks=pytest.mark.slow),
                                     pytest.param("sdxl", marks=pytest.mark.slow)])
def test_merge_equals_base_plus_weighted_deltas(tmp_path, pairs, arch_id):
    base_path = pairs(arch_id)[0]
    paths = lora_set(tmp_path, arch_id)
    mults = [0.7, -0.5, 1.25, 0.3]
    out = tmp_path / "merged.safetensors"
    report = merge_lora(base_path, paths, mults, out)
    base, merged = load(base_path), load(out)
    want, touched = expected(base, paths, mults, arch_id)
    assert list(merged) == list(base)
    assert any(k.endswith("in_proj_weight") for k in touched) == (arch_id != "sd15")
    assert any(k.endswith("bias") for k in touched)
    for key, w in merged.items():
        if key in touched:
            assert w.dtype == base[key].dtype
            assert torch.allclose(w, want[key], rtol=0, atol=1e-5), key
            assert not torch.equal(w, base[key]), key
        else:
            assert same(w, base[key]), key
    assert report.count("unmatched") == 0
    assert report.totals["layers_changed"] + report.totals["biases_changed"] == len(touched)


def test_qkv_rows_only_touch_their_block(tmp_path, pairs):
    base_path = pairs("sd2")[0]
    q = [t for t in U.tiny_targets("sd2") if t.rows and t.name.endswith("self_attn_q_proj")][:1]
    path = U.save(tmp_path / "q.safetensors", U.lora_tensors(q))
    out = tmp_path / "m.safetensors"
    merge_lora(base_path, path, 1.0, out)
    key, (a, b) = q[0].ckpt_key, q[0].rows
    base, merged = load(base_path)[key], load(out)[key]
    assert torch.equal(merged[b:], base[b:]) and not torch.equal(merged[a:b], base[a:b])


@pytest.mark.slow
def test_fp16_checkpoint_keeps_dtype_and_adds_in_fp32(tmp_path):
    from lib_ortholora.synth import write_pair
    base_path, _ = write_pair("sd15", tmp_path, dtype=torch.float16)
    tgts = U.sample_targets("sd15")
    path = U.save(tmp_path / "l.safetensors", U.lora_tensors(tgts, dtype=torch.float16))
    merge_lora(base_path, path, 1.0, tmp_path / "a.safetensors")
    merge_lora(base_path, path, 1.0, tmp_path / "b.safetensors", dtype=torch.float32)
    base, kept, wide = load(base_path), load(tmp_path / "a.safetensors"), load(tmp_path / "b.safetensors")
    module = read_lora(path).modules[tgts[0].name]
    key = tgts[0].ckpt_key
    want = base[key].float() + module.delta().reshape(base[key].shape)
    assert kept[key].dtype == torch.float16  # rounded once, from the float32 sum
    assert torch.allclose(kept[key].float(), want, rtol=2 ** -11, atol=2 ** -24)
    assert wide[key].dtype == torch.float32 and torch.allclose(wide[key], want, atol=1e-6)
    assert wide["cond_stage_model.transformer.text_model.embeddings.position_ids"].dtype == torch.int64


@pytest.mark.slow
def test_ckpt_input_gives_safetensors(tmp_path, pairs):
    base_path = pairs("sd15")[0]
    base = load(base_path)
    ckpt = tmp_path / "base.ckpt"
    torch.save({"state_dict": base}, ckpt)
    path = U.save(tmp_path / "l.safetensors", U.lora_tensors(U.sample_targets("sd15")))
    merge_lora(ckpt, path, 0.5, tmp_path / "from_ckpt.safetensors")
    merge_lora(base_path, path, 0.5, tmp_path / "from_st.safetensors")
    a, b = load(tmp_path / "from_ckpt.safetensors"), load(tmp_path / "from_st.safetensors")
    assert a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)


def test_other_architecture_is_refused_naming_both(tmp_path, pairs):
    base_path = pairs("sd15")[0]
    path = U.save(tmp_path / "xl.safetensors", U.lora_tensors(U.sample_targets("sdxl"), arch_id="sdxl"))
    with pytest.raises(OrthoLoraError) as err:
        merge_lora(base_path, path, 1.0, tmp_path / "m.safetensors")
    text = str(err.value)
    assert "xl.safetensors" in text and base_path.name in text and "SDXL" in text and "SD1.x" in text
    assert not (tmp_path / "m.safetensors").exists()


def test_unmatched_modules_are_reported(tmp_path, pairs):
    base_path = pairs("sd15")[0]
    tensors = U.lora_tensors(U.sample_targets("sd15"))
    tensors["lora_unet_not_a_layer.lora_down.weight"] = torch.zeros(2, 4)
    tensors["lora_unet_not_a_layer.lora_up.weight"] = torch.zeros(4, 2)
    path = U.save(tmp_path / "l.safetensors", tensors)
    report = merge_lora(base_path, path, 1.0, tmp_path / "m.safetensors")
    assert [r.module for r in report.rows if r.status == "unmatched"] == ["lora_unet_not_a_layer"]
    assert any("lora_unet_not_a_layer" in w for w in report.warnings)


def test_refuses_to_replace_an_input(tmp_path, pairs):
    base_path = pairs("sd15")[0]
    path = U.save(tmp_path / "l.safetensors", U.lora_tensors(U.sample_targets("sd15")))
    with pytest.raises(OrthoLoraError):
        merge_lora(base_path, path, 1.0, path, overwrite=True)


@pytest.mark.slow
def test_cli_merge(tmp_path, pairs, capsys):
    base_path = pairs("sdxl")[0]
    paths = lora_set(tmp_path, "sdxl")[:2]
    out = tmp_path / "cli.safetensors"
    code = main(["merge", str(base_path), *map(str, paths), "-m", "0.5", "1", "-o", str(out), "--json", "--quiet"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["operation"] == "merge" and report["outputs"] == [str(out)]
    with safetensors.safe_open(out, "pt") as f:
        assert json.loads(f.metadata()["ortholora_merge"])[1]["multiplier"] == 1.0


def test_nothing_to_merge_writes_nothing(tmp_path, pairs):
    base_path = pairs("sd15")[0]
    tensors = {"lora_unet_nowhere.lora_down.weight": torch.zeros(2, 4),
               "lora_unet_nowhere.lora_up.weight": torch.zeros(4, 2)}
    path = U.save(tmp_path / "none.safetensors", tensors)
    with pytest.raises(OrthoLoraError, match="nothing to merge"):
        merge_lora(base_path, path, 1.0, tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()

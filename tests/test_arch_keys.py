import json
from pathlib import Path

import pytest

from lib_ortholora import arch, keys
from lib_ortholora.errors import OrthoLoraError

DATA = Path(__file__).parent / "data"
COUNTS = {"sd15": (72, 192, 278), "sd2": (138, 192, 278), "sdxl": (264, 722, 788)}


@pytest.mark.parametrize("arch_id", list(COUNTS))
@pytest.mark.parametrize("div", [1, 16])
def test_module_counts(arch_id, div):
    tg = keys.targets(arch.Arch(arch_id), arch.spec(arch_id, div))
    te = [t for t in tg if t.is_text]
    unet = [t for t in tg if not t.is_text]
    assert (len(te), sum(not t.conv for t in unet), len(unet)) == COUNTS[arch_id]


def test_sd15_keys_and_names_match_reference():
    assert set(arch.spec("sd15")) == set(json.loads((DATA / "sd15_checkpoint_keys.json").read_text()))
    table = json.loads((DATA / "sd15_kohya_names.json").read_text())
    mine = {t.ckpt_key: t.name for t in keys.targets(arch.Arch("sd15"), arch.spec("sd15"))}
    assert mine == table


@pytest.mark.parametrize("arch_id", list(COUNTS))
def test_mapping_is_a_bijection(arch_id):
    tg = keys.targets(arch.Arch(arch_id), arch.spec(arch_id))
    forward = {(t.ckpt_key, t.rows): t.name for t in tg}
    assert len(set(forward.values())) == len(forward) == len(tg)
    table = keys.name_table(arch_id)
    for (ckpt_key, rows), name in forward.items():
        assert keys.resolve(arch_id, name) == name
        assert (table[name].ckpt_key, table[name].rows) == (ckpt_key, rows)


@pytest.mark.parametrize("arch_id", list(COUNTS))
def test_name_table_holds_the_real_layers(arch_id):
    """name_table is the architecture's own table: each layer's shape and q/k/v rows as the real
    checkpoint has them (not those of the tiny test models, whose widths are divided by 16)."""
    real = {t.name: t for t in keys.targets(arch.Arch(arch_id), arch.spec(arch_id))}
    tiny = {t.name: t for t in keys.targets(arch.Arch(arch_id), arch.spec(arch_id, 16))}
    table = keys.name_table(arch_id)
    assert table == real
    assert all(table[n].shape != tiny[n].shape for n in table)


def test_qkv_row_split_sd2_and_sdxl():
    for arch_id, prefix, n in (("sd2", "lora_te_", 23), ("sdxl", "lora_te2_", 32)):
        tg = {t.name: t for t in keys.targets(arch.Arch(arch_id), arch.spec(arch_id))}
        d = 1024 if arch_id == "sd2" else 1280
        for i, q in enumerate("qkv"):
            t = tg[f"{prefix}text_model_encoder_layers_0_self_attn_{q}_proj"]
            assert t.ckpt_key.endswith("resblocks.0.attn.in_proj_weight")
            assert t.rows == (i * d, (i + 1) * d) and t.shape == (d, d)
        assert f"{prefix}text_model_encoder_layers_{n - 1}_mlp_fc1" in tg
        assert f"{prefix}text_model_encoder_layers_{n}_mlp_fc1" not in tg


@pytest.mark.parametrize("arch_id,alias,native", [
    ("sd15", "lora_unet_input_blocks_1_1_proj_in", "lora_unet_down_blocks_0_attentions_0_proj_in"),
    ("sd15", "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
     "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"),
    ("sd15", "text_encoder.text_model.encoder.layers.3.mlp.fc2", "lora_te_text_model_encoder_layers_3_mlp_fc2"),
    ("sd15", "lora_te_encoder_layers_3_mlp_fc2", "lora_te_text_model_encoder_layers_3_mlp_fc2"),
    ("sd15", "lora_unet_output_blocks_2_1_conv", "lora_unet_up_blocks_0_upsamplers_0_conv"),
    ("sd15", "lora_unet_input_blocks_3_0_op", "lora_unet_down_blocks_0_downsamplers_0_conv"),
    ("sdxl", "lora_unet_down_blocks_1_attentions_0_transformer_blocks_1_attn2_to_k",
     "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k"),
    ("sdxl", "lora_unet_up_blocks_0_upsamplers_0_conv", "lora_unet_output_blocks_2_2_conv"),
    ("sdxl", "text_encoder_2.text_model.encoder.layers.31.self_attn.q_proj",
     "lora_te2_text_model_encoder_layers_31_self_attn_q_proj"),
    ("sdxl", "text_encoder.text_model.encoder.layers.0.mlp.fc1", "lora_te1_text_model_encoder_layers_0_mlp_fc1"),
])
def test_aliases(arch_id, alias, native):
    assert keys.resolve(arch_id, alias) == native


def test_blocks():
    tg = {t.name: t.block for t in keys.targets(arch.Arch("sd15"), arch.spec("sd15", 16))}
    assert tg["lora_unet_down_blocks_0_attentions_0_proj_in"] == "IN01"
    assert tg["lora_unet_mid_block_attentions_0_proj_out"] == "MID"
    assert tg["lora_unet_up_blocks_3_attentions_2_proj_out"] == "OUT11"
    assert tg["lora_te_text_model_encoder_layers_0_mlp_fc1"] == "TE"


@pytest.mark.parametrize("arch_id", list(COUNTS))
@pytest.mark.parametrize("inpaint", [False, True])
def test_detect(arch_id, inpaint):
    assert arch.detect(arch.spec(arch_id, 16, inpaint)) == arch.Arch(arch_id, inpaint)


def test_detect_rejects_unknown():
    with pytest.raises(OrthoLoraError, match="no UNet"):
        arch.detect({"foo.weight": (3, 3)}, "x.safetensors")
    shapes = {k: v for k, v in arch.spec("sd15", 16).items() if not k.startswith("cond_stage_model")}
    with pytest.raises(OrthoLoraError, match="top-level prefixes seen: first_stage_model, model"):
        arch.detect(shapes, "x.safetensors")

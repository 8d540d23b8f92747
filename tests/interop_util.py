"""Helpers for the consumer (interoperability) tests: a tiny diffusers SD1.5 UNet + CLIP text encoder
whose every weight has the shape `arch.spec("sd15", 16)` gives its checkpoint key, diffusers' own
LDM → diffusers conversion, a holder for diffusers' LoRA loader, and LyCORIS networks (kohya naming)
on the same models. Nothing here reaches the network. See docs/interop-notes.md."""
from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

# Widths of arch.spec("sd15", 16): model channels 320/16 = 20 (levels 20, 40, 80, 80), context
# 768/16 = 48, CLIP-L 768/16 = 48 wide (MLP 192) with all 12 layers, vocab 49408/16 = 3088.
# Heads only split widths (no weight shape depends on them): 4 heads divide 20, 40, 80 and 48.
# GroupNorm groups must divide every channel count, including the up blocks' concatenated skips
# (20 … 160): 4 does.
UNET_CONFIG = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    block_out_channels=(20, 40, 80, 80), attention_head_dim=4, cross_attention_dim=48, norm_num_groups=4)
TE_CONFIG = dict(hidden_size=48, intermediate_size=192, num_hidden_layers=12, num_attention_heads=4,
                 vocab_size=3088, max_position_embeddings=77, bos_token_id=0, eos_token_id=2, pad_token_id=1)


@functools.lru_cache(maxsize=1)
def _sd15_base() -> dict[str, torch.Tensor]:
    from lib_ortholora.arch import spec
    from lib_ortholora.synth import base_tensor

    return {k: base_tensor(k, s) for k, s in spec("sd15", 16).items()}


def sd15_base() -> dict[str, torch.Tensor]:
    """A fresh copy of the tiny SD1.5 base checkpoint (LDM layout, float32), the values `synth`
    writes for its base; built once per process."""
    return {k: v.clone() for k, v in _sd15_base().items()}


def tiny_unet(seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**UNET_CONFIG)


def tiny_te(seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    return CLIPTextModel(CLIPTextConfig(**TE_CONFIG))


def ldm_to_diffusers(checkpoint: dict[str, torch.Tensor], unet, te) -> tuple[dict, dict]:
    """diffusers' own conversion of an LDM/webui SD1 checkpoint into (UNet, text encoder) state dicts
    keyed like `unet` and `te` (transformers 5 dropped the `text_model.` level)."""
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint

    u = convert_ldm_unet_checkpoint(checkpoint, unet.config)
    te_keys = set(te.state_dict())
    t = {}
    for k, v in convert_ldm_clip_checkpoint(checkpoint).items():
        k = k.removeprefix("text_model.")
        if k in te_keys:
            t[k] = v
    return u, t


def load_checkpoint(unet, te, checkpoint: dict[str, torch.Tensor]) -> None:
    """Put an LDM checkpoint's weights into the diffusers models (every key must be covered)."""
    u, t = ldm_to_diffusers(checkpoint, unet, te)
    unet.load_state_dict(u, strict=True)
    te.load_state_dict(t, strict=True)


def snapshot(unet, te) -> dict[str, torch.Tensor]:
    """`unet/<key>` and `te/<key>` → a copy of every tensor of both models."""
    out = {f"unet/{k}": v.detach().clone() for k, v in unet.state_dict().items()}
    out |= {f"te/{k}": v.detach().clone() for k, v in te.state_dict().items()}
    return out


def holder(unet, te):
    """An object with diffusers' SD LoRA loader (`load_lora_weights`, `fuse_lora`, …) on the models."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    class Holder(StableDiffusionLoraLoaderMixin):
        hf_device_map = None

        def __init__(self):
            self.unet, self.text_encoder = unet, te

        @property
        def components(self):
            return {"unet": self.unet, "text_encoder": self.text_encoder}

    return Holder()


def diffusers_apply(unet, te, lora_path: str | os.PathLike, scale: float = 1.0) -> None:
    """Load a LoRA file with diffusers, fuse it into the weights and drop the adapter layers."""
    h = holder(unet, te)
    h.load_lora_weights(str(lora_path))
    h.fuse_lora(components=["unet", "text_encoder"], lora_scale=scale)
    h.unload_lora_weights()


# --------------------------------------------------------------------------------------------
# LyCORIS (lycoris-lora, kohya entry point)

SD15_PRESET = {
    "enable_conv": True,
    "unet_target_module": ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"],
    "unet_target_name": ["conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"],
    "text_encoder_target_module": ["CLIPAttention", "CLIPMLP"],
    "text_encoder_target_name": [],
}
CONV_PRESET = {  # only resnet / sampler layers: 3x3 convs (Tucker variants), 1x1 shortcuts, time_emb_proj
    "enable_conv": True,
    "unet_target_module": ["ResnetBlock2D", "Downsample2D", "Upsample2D"],
    "unet_target_name": [],
    "text_encoder_target_module": [],
    "text_encoder_target_name": [],
}
class TEWrap(torch.nn.Module):
    """Restores the `text_model.` level, so LyCORIS names TE modules `lora_te_text_model_…`."""

    def __init__(self, te):
        super().__init__()
        self.text_model = te


def lyco_dw(m) -> torch.Tensor:
    """The dW LyCORIS's patched forward applies (LoHa/LoKr get_diff_weight double-applies the scale
    in 4.1.3; see docs/interop-notes.md)."""
    import lycoris

    if isinstance(m, lycoris.LoConModule):
        return m.get_diff_weight(m.multiplier)[0].reshape(m.shape).detach().float()
    if isinstance(m, (lycoris.LohaModule, lycoris.LokrModule)):
        return (m.get_weight(m.shape) * m.scalar * m.multiplier).detach().float()
    return m.get_diff_weight(m.multiplier)[0].reshape(m.shape).detach().float()


def lyco_bias(m) -> torch.Tensor | None:
    """The bias delta of a LyCORIS full-diff module (None for other families)."""
    import lycoris

    if isinstance(m, lycoris.FullModule):
        b = m.get_diff_weight(m.multiplier)[1]
        return None if b is None else b.detach().float()
    return None


def write_lycoris(unet, te, path: Path, algo: str, preset: dict, *, dim: int = 4, alpha: float = 2.0,
                  conv_dim: int = 2, conv_alpha: float = 1.5, seed: int = 0, **kw) -> dict[str, tuple]:
    """Build a LyCORIS network on the models, randomize every factor, save it with LyCORIS's own
    writer and un-patch the models. Returns {kohya name: (dW, bias delta or None)} as LyCORIS
    computes them."""
    import toml
    from lycoris.kohya import create_network

    preset_file = path.with_suffix(".toml")
    preset_file.write_text(toml.dumps(preset))
    wrap = TEWrap(te)
    net = create_network(1.0, dim, alpha, None, wrap, unet, algo=algo, conv_dim=conv_dim,
                         conv_alpha=conv_alpha, preset=str(preset_file), **kw)
    net.apply_to(wrap, unet, apply_text_encoder=True, apply_unet=True)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():  # LyCORIS starts at dW = 0: randomize everything
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    try:
        net.save_weights(str(path), None, {})
        return {m.lora_name: (lyco_dw(m), lyco_bias(m)) for m in net.loras}
    finally:
        for m in net.loras:
            m.restore()

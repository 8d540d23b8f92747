"""Helpers for the consumer (interoperability) tests: tiny diffusers SD1.5 / SD2 / SDXL UNets and text
encoders whose every weight has the shape `arch.spec(arch, 16)` gives its checkpoint key, diffusers' own
LDM → diffusers conversion, diffusers' LoRA loader on them, and LyCORIS networks (kohya naming)
on the SD1.5 models. Nothing here reaches the network. See docs/interop-notes.md."""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

# Widths of arch.spec(arch, 16): model channels 320/16 = 20 (levels 20, 40, 80[, 80]), context
# 768/16 = 48 (SD1.5), 1024/16 = 64 (SD2), 2048/16 = 128 (SDXL); CLIP-L 48 wide (MLP 192, 12
# layers), OpenCLIP-H 64 wide (MLP 256; diffusers keeps 23 of its 24 layers), OpenCLIP-bigG 80
# wide (MLP 320, 32 layers, projection 80); vocab 49408/16 = 3088. SDXL's added conditioning:
# pooled text 80 + 6 time ids × 16 = 176 = 2816/16.
# Heads only split widths (no weight shape depends on them): 4 heads divide 20, 40, 80 and 48.
# GroupNorm groups must divide every channel count, including the up blocks' concatenated skips
# (20 … 160): 4 does.
_SD_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    block_out_channels=(20, 40, 80, 80), attention_head_dim=4, norm_num_groups=4)
UNET_CONFIG = dict(_SD_UNET, cross_attention_dim=48)
_CLIP = dict(vocab_size=3088, max_position_embeddings=77, bos_token_id=0, eos_token_id=2, pad_token_id=1,
             num_attention_heads=4)
TE_CONFIG = dict(_CLIP, hidden_size=48, intermediate_size=192, num_hidden_layers=12)


@dataclass(frozen=True)
class TextEncoder:
    """A diffusers pipeline's text encoder: its component name, transformers class and config,
    and where its weights sit in an LDM checkpoint (`openclip`: open_clip layout under `prefix`)."""

    component: str
    cls: str
    config: dict
    prefix: str = ""
    openclip: bool = False


@dataclass(frozen=True)
class Family:
    unet: dict
    text_encoders: tuple[TextEncoder, ...]
    mixin: str


FAMILIES = {
    "sd15": Family(UNET_CONFIG, (TextEncoder("text_encoder", "CLIPTextModel", TE_CONFIG),),
                   "StableDiffusionLoraLoaderMixin"),
    "sd2": Family(dict(_SD_UNET, cross_attention_dim=64, use_linear_projection=True),
                  (TextEncoder("text_encoder", "CLIPTextModel",
                               dict(_CLIP, hidden_size=64, intermediate_size=256, num_hidden_layers=23,
                                    hidden_act="gelu"), "cond_stage_model.model.", True),),
                  "StableDiffusionLoraLoaderMixin"),
    "sdxl": Family(dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
                        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                        block_out_channels=(20, 40, 80), transformer_layers_per_block=(1, 2, 10),
                        attention_head_dim=4, norm_num_groups=4, cross_attention_dim=128,
                        use_linear_projection=True, addition_embed_type="text_time",
                        addition_time_embed_dim=16, projection_class_embeddings_input_dim=176),
                   (TextEncoder("text_encoder", "CLIPTextModel", TE_CONFIG),
                    TextEncoder("text_encoder_2", "CLIPTextModelWithProjection",
                                dict(_CLIP, hidden_size=80, intermediate_size=320, num_hidden_layers=32,
                                     hidden_act="gelu", projection_dim=80),
                                "conditioner.embedders.1.model.", True)),
                   "StableDiffusionXLLoraLoaderMixin"),
}


@functools.lru_cache(maxsize=3)
def _base(arch: str) -> dict[str, torch.Tensor]:
    from lib_ortholora.arch import spec
    from lib_ortholora.synth import base_tensor

    return {k: base_tensor(k, s) for k, s in spec(arch, 16).items()}


def base_checkpoint(arch: str) -> dict[str, torch.Tensor]:
    """A fresh copy of the tiny base checkpoint of `arch` (LDM layout, float32), the values `synth`
    writes for its base; built once per process."""
    return {k: v.clone() for k, v in _base(arch).items()}


def sd15_base() -> dict[str, torch.Tensor]:
    return base_checkpoint("sd15")


def tiny_models(arch: str, seed: int = 0) -> dict[str, torch.nn.Module]:
    """{"unet": …, "text_encoder": …[, "text_encoder_2": …]} of `arch`, randomly initialized."""
    import transformers
    from diffusers import UNet2DConditionModel

    fam = FAMILIES[arch]
    torch.manual_seed(seed)
    models = {"unet": UNet2DConditionModel(**fam.unet)}
    for te in fam.text_encoders:
        cls = getattr(transformers, te.cls)
        models[te.component] = cls(getattr(transformers, "CLIPTextConfig")(**te.config))
    return models


def tiny_unet(seed: int = 0):
    return tiny_models("sd15", seed)["unet"]


def tiny_te(seed: int = 0):
    return tiny_models("sd15", seed)["text_encoder"]


def ldm_to_diffusers(arch: str, checkpoint: dict[str, torch.Tensor], models: dict) -> dict[str, dict]:
    """diffusers' own conversion of an LDM/webui checkpoint into state dicts keyed like `models`
    (transformers 5 dropped CLIPTextModel's `text_model.` level; CLIPTextModelWithProjection keeps it)."""
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_open_clip_checkpoint)

    out = {"unet": convert_ldm_unet_checkpoint(checkpoint, models["unet"].config)}
    for te in FAMILIES[arch].text_encoders:
        model = models[te.component]
        converted = (convert_open_clip_checkpoint(model, checkpoint, te.prefix) if te.openclip
                     else convert_ldm_clip_checkpoint(checkpoint))
        if not hasattr(model, "text_model"):
            converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
        keys = set(model.state_dict())
        out[te.component] = {k: v for k, v in converted.items() if k in keys}
    return out


def load_checkpoint(arch: str, models: dict, checkpoint: dict[str, torch.Tensor]) -> None:
    """Put an LDM checkpoint's weights into the diffusers models (every key must be covered)."""
    for component, state in ldm_to_diffusers(arch, checkpoint, models).items():
        models[component].load_state_dict(state, strict=True)


def snapshot(models: dict) -> dict[str, torch.Tensor]:
    """`<component>/<key>` → a copy of every tensor of every model."""
    return {f"{c}/{k}": v.detach().clone() for c, m in models.items() for k, v in m.state_dict().items()}


def holder(arch: str, models: dict):
    """An object with diffusers' LoRA loader of `arch` (`load_lora_weights`, `fuse_lora`, …) on the models."""
    import diffusers.loaders

    mixin = getattr(diffusers.loaders, FAMILIES[arch].mixin)

    class Holder(mixin):
        hf_device_map = None

        def __init__(self):
            for name, model in models.items():
                setattr(self, name, model)

        @property
        def components(self):
            return dict(models)

    return Holder()


def diffusers_apply(arch: str, models: dict, lora_path: str | os.PathLike, scale: float = 1.0) -> None:
    """Load a LoRA file with diffusers, fuse it into the weights and drop the adapter layers."""
    h = holder(arch, models)
    h.load_lora_weights(str(lora_path))
    h.fuse_lora(components=list(models), lora_scale=scale)
    h.unload_lora_weights()
def reset(models: dict, state: dict[str, torch.Tensor]) -> None:
    """Put a `snapshot` back into the models (after `diffusers_apply` left them fused)."""
    for c, m in models.items():
        m.load_state_dict({k.split("/", 1)[1]: v for k, v in state.items() if k.startswith(c + "/")}, strict=True)


class DiffusersCheck:
    """diffusers' reading of a LoRA file against this project's own, on the tiny models of `arch`
    holding the base checkpoint `synth` writes (seed 0).

    `expected(lora)`: what the file claims, per diffusers weight: the LDM checkpoint with every module's
    dW merged (`merge.plan_merge`, float32), converted by diffusers' own LDM converter, minus the
    converted base. `fused(lora)`: what diffusers' `load_lora_weights` + `fuse_lora` changes. Both are
    {"<component>/<weight key>": delta} over the weights that changed."""

    def __init__(self, arch: str):
        self.arch = arch
        self.checkpoint = base_checkpoint(arch)
        self.models = tiny_models(arch)
        load_checkpoint(arch, self.models, self.checkpoint)
        self.base = snapshot(self.models)

    def _deltas(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: state[k] - v for k, v in self.base.items() if not torch.equal(state[k], v)}

    def expected(self, lora: str | os.PathLike, multiplier: float = 1.0) -> dict[str, torch.Tensor]:
        from lib_ortholora.arch import Arch
        from lib_ortholora.lorafile import read_lora
        from lib_ortholora.merge import merged_tensor, plan_merge

        shapes = {k: tuple(v.shape) for k, v in self.checkpoint.items()}
        plan, _ = plan_merge(Arch(self.arch), shapes, [(read_lora(lora, self.arch), multiplier)], Path(lora))
        merged = dict(self.checkpoint)
        for key, contributions in plan.items():
            merged[key] = merged_tensor(self.checkpoint[key], contributions, torch.float32)
        load_checkpoint(self.arch, self.models, merged)
        out = self._deltas(snapshot(self.models))
        reset(self.models, self.base)
        return out

    def fused(self, lora: str | os.PathLike, scale: float = 1.0) -> dict[str, torch.Tensor]:
        diffusers_apply(self.arch, self.models, lora, scale)
        out = self._deltas(snapshot(self.models))
        reset(self.models, self.base)
        return out

    def errors(self, lora: str | os.PathLike, scale: float = 1.0) -> dict[str, float]:
        """‖fused − expected‖/‖expected‖ per changed weight; a weight only one side changed counts as inf."""
        want, got = self.expected(lora, scale), self.fused(lora, scale)
        errs = {k: float("inf") for k in want.keys() ^ got.keys()}
        for k in want.keys() & got.keys():
            errs[k] = float((got[k] - want[k]).norm() / want[k].norm())
        return errs


def strength_summary(errs: dict[str, float], tol: float) -> str:
    """The weights above `tol`, for an assertion message."""
    bad = sorted((e, k) for k, e in errs.items() if e > tol)
    return f"{len(bad)}/{len(errs)} weights off (worst: {bad[-3:]})"


# --------------------------------------------------------------------------------------------
# Files whose ranks vary from module to module

MODE, EXCEPTIONS = 4, (1, 2, 3, 5, 8)


def varying_rank_lowranks(arch: str, seed: int = 0) -> dict:
    """A LowRank on every target of `arch` (UNet attention, resnets, samplers, every text encoder):
    rank 4, but every 7th module one of EXCEPTIONS (capped by the layer); scales ≠ 1, ‖dW‖ ≈ 5 % of
    a base weight. (Few exceptions keep diffusers quick: PEFT matches every module against every
    rank exception's pattern.)"""
    from lib_ortholora.arch import Arch, spec
    from lib_ortholora.keys import targets
    from lib_ortholora.lowrank import LowRank

    gen = torch.Generator().manual_seed(seed)
    out = {}
    for i, t in enumerate(targets(Arch(arch), spec(arch, 16), conv=True)):
        inner = math.prod(t.shape[1:])
        r = min(EXCEPTIONS[i // 7 % len(EXCEPTIONS)] if i % 7 == 3 else MODE, t.shape[0], inner)
        up, down = torch.randn(t.shape[0], r, generator=gen), torch.randn(r, inner, generator=gen)
        lr = LowRank(up, down, 1.0, t.shape)
        out[t.name] = lr.scaled(0.05 * math.sqrt(t.shape[0]) / lr.norm() * (1 + i % 3))
    assert_rank_exceptions({n: lr.rank for n, lr in out.items()}, MODE)
    return out


def assert_rank_exceptions(ranks: dict[str, int], alpha: float, everywhere: bool = True) -> None:
    """The file tests what it should: modules whose rank is not the file's alpha where diffusers
    used to drop per-module alphas, UNet attention q/k/v/out or a text encoder (transformers 5);
    `everywhere`: in UNet self- and cross-attention, text-encoder attention and MLP, resnet/sampler
    convs and every component."""
    exceptions = [n for n, r in ranks.items() if r != alpha]
    assert any("_attn1_to_" in n or "_attn2_to_" in n or n.startswith("lora_te") for n in exceptions)
    if not everywhere:
        return
    for kind in ("_attn1_to_", "_attn2_to_", "_self_attn_", "_mlp_fc", "_conv"):
        assert any(kind in n for n in exceptions), kind
    for prefix in {n.split("_", 2)[1] for n in ranks}:  # unet, te / te1, te2
        assert any(n.startswith(f"lora_{prefix}_") for n in exceptions), prefix


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

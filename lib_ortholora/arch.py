"""Stable Diffusion architectures: exact checkpoint key names and shapes, and detection.

`spec(arch, div)` lists every tensor of a webui/LDM-layout checkpoint (UNet, text encoders,
VAE) with its shape; `div` divides every hidden width (1 = real size, 16 = tiny test models with
the same key set). `detect(shapes)` tells SD1.x, SD2.x and SDXL apart from a key→shape map.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Iterator, Mapping

from .errors import OrthoLoraError
from .shapes import Shape

UNET = "model.diffusion_model."


@dataclass(frozen=True)
class Variant:
    """How a LoRA for one prediction type of an architecture is labelled in its metadata."""

    base_version: str
    """kohya's `ss_base_model_version`."""
    modelspec: str
    """`modelspec.architecture`."""
    resolution: str
    """`modelspec.resolution`."""


@dataclass(frozen=True)
class ArchNames:
    """What an architecture is called: by us (`title`) and in LoRA metadata (kohya, modelspec)."""

    title: str
    modelspec_family: str
    """The prefix of every `modelspec.architecture` value read as this architecture."""
    implementation: str
    """`modelspec.implementation`: the codebase whose module names the keys follow, as kohya writes
    it (SD1/SD2 UNet names are diffusers', SDXL's are Stability's generative-models')."""
    epsilon: Variant
    v: Variant
    """SD1 and SDXL have no separate ModelSpec id for v-prediction (`modelspec.prediction_type`
    says it); SD2's 768-v models do."""

    def variant(self, prediction: str | None) -> Variant:
        """The labels written for a base of this prediction type (epsilon when unknown)."""
        return self.v if prediction == "v" else self.epsilon

    @property
    def base_versions(self) -> tuple[str, ...]:
        """kohya's `ss_base_model_version` values read as this architecture."""
        return tuple(dict.fromkeys((self.epsilon.base_version, self.v.base_version)))


_SDXL_BASE = Variant("sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora", "1024x1024")
ARCH_NAMES = {
    "sd15": ArchNames("SD1.x", "stable-diffusion-v1", "diffusers",
                      Variant("sd_v1", "stable-diffusion-v1/lora", "512x512"),
                      Variant("sd_v1_v", "stable-diffusion-v1/lora", "512x512")),
    "sd2": ArchNames("SD2.x", "stable-diffusion-v2", "diffusers",
                     Variant("sd_v2", "stable-diffusion-v2-512/lora", "512x512"),
                     Variant("sd_v2_v", "stable-diffusion-v2-768-v/lora", "768x768")),
    "sdxl": ArchNames("SDXL", "stable-diffusion-xl", "https://github.com/Stability-AI/generative-models",
                      _SDXL_BASE, _SDXL_BASE),
}
"""The one table of architectures: id → names."""
ARCHS = tuple(ARCH_NAMES)


@dataclass(frozen=True)
class Arch:
    """An architecture id (`sd15`, `sd2`, `sdxl`) plus variant flags."""

    id: str
    inpaint: bool = False

    @property
    def title(self) -> str:
        return ARCH_NAMES[self.id].title + (" inpainting" if self.inpaint else "")


@dataclass(frozen=True)
class _UNetCfg:
    ch: int
    mult: tuple[int, ...]
    depth: tuple[int, ...]  # transformer depth per level (0 = no attention)
    mid_depth: int
    ctx: int
    linear_proj: bool
    adm: int  # SDXL's label embedding input width (0 = none)


@dataclass(frozen=True)
class _TextCfg:
    prefix: str
    openclip: bool
    width: int
    layers: int
    vocab: int = 49408


def _unet_cfg(arch: str, d: int) -> _UNetCfg:
    if arch == "sdxl":
        return _UNetCfg(320 // d, (1, 2, 4), (0, 2, 10), 10, 2048 // d, True, 2816 // d)
    ctx = 768 if arch == "sd15" else 1024
    return _UNetCfg(320 // d, (1, 2, 4, 4), (1, 1, 1, 0), 1, ctx // d, arch == "sd2", 0)


def _text_cfgs(arch: str, d: int) -> list[_TextCfg]:
    if arch == "sd15":
        return [_TextCfg("cond_stage_model.transformer.", False, 768 // d, 12, 49408 // d)]
    if arch == "sd2":
        return [_TextCfg("cond_stage_model.model.", True, 1024 // d, 24, 49408 // d)]
    return [_TextCfg("conditioner.embedders.0.transformer.", False, 768 // d, 12, 49408 // d),
            _TextCfg("conditioner.embedders.1.model.", True, 1280 // d, 32, 49408 // d)]


def _lin(name: str, o: int, i: int, bias: bool = True) -> Iterator[tuple[str, Shape]]:
    yield f"{name}.weight", (o, i)
    if bias:
        yield f"{name}.bias", (o,)


def _conv(name: str, o: int, i: int, k: int = 3) -> Iterator[tuple[str, Shape]]:
    yield f"{name}.weight", (o, i, k, k)
    yield f"{name}.bias", (o,)


def _norm(name: str, c: int) -> Iterator[tuple[str, Shape]]:
    yield f"{name}.weight", (c,)
    yield f"{name}.bias", (c,)


def _resblock(p: str, i: int, o: int, emb: int) -> Iterator[tuple[str, Shape]]:
    yield from _norm(p + "in_layers.0", i)
    yield from _conv(p + "in_layers.2", o, i)
    yield from _lin(p + "emb_layers.1", o, emb)
    yield from _norm(p + "out_layers.0", o)
    yield from _conv(p + "out_layers.3", o, o)
    if i != o:
        yield from _conv(p + "skip_connection", o, i, 1)


def _transformer(p: str, c: int, ctx: int, depth: int, linear: bool) -> Iterator[tuple[str, Shape]]:
    proj = _lin if linear else (lambda n, o, i: _conv(n, o, i, 1))
    yield from _norm(p + "norm", c)
    yield from proj(p + "proj_in", c, c)
    for t in range(depth):
        b = f"{p}transformer_blocks.{t}."
        for a, kv in (("attn1", c), ("attn2", ctx)):
            yield from _lin(f"{b}{a}.to_q", c, c, False)
            yield from _lin(f"{b}{a}.to_k", c, kv, False)
            yield from _lin(f"{b}{a}.to_v", c, kv, False)
            yield from _lin(f"{b}{a}.to_out.0", c, c)
        yield from _lin(b + "ff.net.0.proj", 8 * c, c)
        yield from _lin(b + "ff.net.2", c, 4 * c)
        for n in (1, 2, 3):
            yield from _norm(f"{b}norm{n}", c)
    yield from proj(p + "proj_out", c, c)


def _unet(arch: str, d: int, inpaint: bool) -> Iterator[tuple[str, Shape]]:
    u = _unet_cfg(arch, d)
    emb = 4 * u.ch
    yield from _lin(UNET + "time_embed.0", emb, u.ch)
    yield from _lin(UNET + "time_embed.2", emb, emb)
    if u.adm:
        yield from _lin(UNET + "label_emb.0.0", emb, u.adm)
        yield from _lin(UNET + "label_emb.0.2", emb, emb)
    yield from _conv(UNET + "input_blocks.0.0", u.ch, 9 if inpaint else 4)
    skips, ch, n = [u.ch], u.ch, 1
    for level, m in enumerate(u.mult):
        for _ in range(2):
            p = f"{UNET}input_blocks.{n}."
            yield from _resblock(p + "0.", ch, m * u.ch, emb)
            ch = m * u.ch
            if u.depth[level]:
                yield from _transformer(p + "1.", ch, u.ctx, u.depth[level], u.linear_proj)
            skips.append(ch)
            n += 1
        if level < len(u.mult) - 1:
            yield from _conv(f"{UNET}input_blocks.{n}.0.op", ch, ch)
            skips.append(ch)
            n += 1
    yield from _resblock(UNET + "middle_block.0.", ch, ch, emb)
    yield from _transformer(UNET + "middle_block.1.", ch, u.ctx, u.mid_depth, u.linear_proj)
    yield from _resblock(UNET + "middle_block.2.", ch, ch, emb)
    n = 0
    for level in reversed(range(len(u.mult))):
        out = u.mult[level] * u.ch
        for j in range(3):
            p = f"{UNET}output_blocks.{n}."
            yield from _resblock(p + "0.", ch + skips.pop(), out, emb)
            ch, slot = out, 1
            if u.depth[level]:
                yield from _transformer(p + "1.", ch, u.ctx, u.depth[level], u.linear_proj)
                slot = 2
            if level and j == 2:
                yield from _conv(f"{p}{slot}.conv", ch, ch)
            n += 1
    yield from _norm(UNET + "out.0", u.ch)
    yield from _conv(UNET + "out.2", 4, u.ch)


def _text(t: _TextCfg) -> Iterator[tuple[str, Shape]]:
    w, p = t.width, t.prefix
    if t.openclip:
        yield p + "positional_embedding", (77, w)
        yield p + "token_embedding.weight", (t.vocab, w)
        for n in range(t.layers):
            b = f"{p}transformer.resblocks.{n}."
            yield from _norm(b + "ln_1", w)
            yield b + "attn.in_proj_weight", (3 * w, w)
            yield b + "attn.in_proj_bias", (3 * w,)
            yield from _lin(b + "attn.out_proj", w, w)
            yield from _norm(b + "ln_2", w)
            yield from _lin(b + "mlp.c_fc", 4 * w, w)
            yield from _lin(b + "mlp.c_proj", w, 4 * w)
        yield from _norm(p + "ln_final", w)
        yield p + "text_projection", (w, w)
        yield p + "logit_scale", ()
        return
    e = p + "text_model.embeddings."
    yield e + "position_embedding.weight", (77, w)
    yield e + "position_ids", (1, 77)
    yield e + "token_embedding.weight", (t.vocab, w)
    for n in range(t.layers):
        b = f"{p}text_model.encoder.layers.{n}."
        for x in (1, 2):
            yield from _norm(f"{b}layer_norm{x}", w)
        yield from _lin(b + "mlp.fc1", 4 * w, w)
        yield from _lin(b + "mlp.fc2", w, 4 * w)
        for q in ("k", "out", "q", "v"):
            yield from _lin(f"{b}self_attn.{q}_proj", w, w)
    yield from _norm(p + "text_model.final_layer_norm", w)


def _vae_resnet(p: str, i: int, o: int) -> Iterator[tuple[str, Shape]]:
    yield from _conv(p + "conv1", o, i)
    yield from _conv(p + "conv2", o, o)
    if i != o:
        yield from _conv(p + "nin_shortcut", o, i, 1)
    yield from _norm(p + "norm1", i)
    yield from _norm(p + "norm2", o)


def _vae_mid(p: str, c: int) -> Iterator[tuple[str, Shape]]:
    for x in ("k", "proj_out", "q", "v"):
        yield from _conv(f"{p}mid.attn_1.{x}", c, c, 1)
    yield from _norm(p + "mid.attn_1.norm", c)
    yield from _vae_resnet(p + "mid.block_1.", c, c)
    yield from _vae_resnet(p + "mid.block_2.", c, c)


def _vae(d: int) -> Iterator[tuple[str, Shape]]:
    ch, mult, p = 128 // d, (1, 2, 4, 4), "first_stage_model."
    top = ch * mult[-1]
    yield from _conv(p + "decoder.conv_in", top, 4)
    yield from _conv(p + "decoder.conv_out", 3, ch)
    yield from _vae_mid(p + "decoder.", top)
    yield from _norm(p + "decoder.norm_out", ch)
    c = top
    for level in reversed(range(len(mult))):
        o = ch * mult[level]
        for b in range(3):
            yield from _vae_resnet(f"{p}decoder.up.{level}.block.{b}.", c, o)
            c = o
        if level:
            yield from _conv(f"{p}decoder.up.{level}.upsample.conv", o, o)
    yield from _conv(p + "encoder.conv_in", ch, 3)
    yield from _conv(p + "encoder.conv_out", 8, top)
    c = ch
    for level, m in enumerate(mult):
        o = ch * m
        for b in range(2):
            yield from _vae_resnet(f"{p}encoder.down.{level}.block.{b}.", c, o)
            c = o
        if level < len(mult) - 1:
            yield from _conv(f"{p}encoder.down.{level}.downsample.conv", o, o)
    yield from _vae_mid(p + "encoder.", top)
    yield from _norm(p + "encoder.norm_out", top)
    yield from _conv(p + "post_quant_conv", 4, 4, 1)
    yield from _conv(p + "quant_conv", 8, 8, 1)


@lru_cache(maxsize=16)
def spec(arch: str, div: int = 1, inpaint: bool = False) -> dict[str, Shape]:
    """Every tensor key of an `arch` checkpoint with its shape, widths divided by `div`."""
    if arch not in ARCHS:
        raise OrthoLoraError(f"unknown architecture {arch!r}; expected one of {', '.join(ARCHS)}")
    out: dict[str, Shape] = {}
    for t in _text_cfgs(arch, div):
        out.update(_text(t))
    out.update(_unet(arch, div, inpaint))
    out.update(_vae(div))
    return out


def detect(shapes: Mapping[str, Shape], path: str | None = None) -> Arch:
    """Tell the architecture of a checkpoint from its key set and the conv_in shape."""
    keys = shapes.keys()
    conv_in = shapes.get(UNET + "input_blocks.0.0.weight")
    if conv_in is None:
        sample = ", ".join(sorted(keys)[:3]) or "no tensors"
        raise OrthoLoraError(f"not a Stable Diffusion checkpoint: no UNet ({UNET}…) keys; saw {sample}", path)
    inpaint = len(conv_in) == 4 and conv_in[1] == 9
    if any(k.startswith("conditioner.embedders.1.model.transformer.") for k in keys):
        return Arch("sdxl", inpaint)
    if any(k.startswith("cond_stage_model.model.transformer.resblocks.") for k in keys):
        return Arch("sd2", inpaint)
    if any(k.startswith("cond_stage_model.transformer.") for k in keys):
        return Arch("sd15", inpaint)
    prefixes = sorted({k.split(".")[0] for k in keys})
    raise OrthoLoraError(
        "unsupported architecture: UNet found but no SD1 (CLIP-L), SD2 (open_clip) or SDXL text "
        f"encoder keys; top-level prefixes seen: {', '.join(prefixes)}", path)

"""Targeted layers: checkpoint key ↔ kohya LoRA module name, for every architecture.

kohya name = prefix + "_" + module path with "." → "_". SD1/SD2 UNets use diffusers paths,
SDXL keeps checkpoint paths; open_clip `in_proj_weight` splits by rows into q, k, v.
Other key styles (checkpoint-style SD1 names, diffusers-style SDXL names, PEFT dotted paths,
text-encoder names without `text_model_`) resolve through `resolve()`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Mapping

import torch

from .arch import UNET, Arch, Shape, spec

_TRANSFORMER_CHILD = re.compile(
    r"\.(proj_in|proj_out|transformer_blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2)))$")
_CONV_CHILD = re.compile(r"\.(\d+\.(in_layers\.2|out_layers\.3|emb_layers\.1|skip_connection|op)|\d+\.conv)$")
_RESNET_PARTS = {"in_layers.2": "conv1", "out_layers.3": "conv2", "emb_layers.1": "time_emb_proj",
                 "skip_connection": "conv_shortcut"}
_OPENCLIP = {"attn.out_proj": "self_attn.out_proj", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}


@dataclass(frozen=True)
class Target:
    """One LoRA-targetable layer. `rows` is the q/k/v row block of an open_clip in_proj_weight
    (`rows_of` takes it out of the stored tensor)."""

    ckpt_key: str
    name: str
    shape: Shape
    rows: tuple[int, int] | None
    block: str  # TE / TE1 / TE2 / IN00… / MID / OUT00…
    conv: bool  # only targeted when conv (LoCon) layers are on

    @property
    def is_text(self) -> bool:
        return self.block.startswith("TE")

    @property
    def kernel(self) -> int:
        return self.shape[2] if len(self.shape) == 4 else 1


def rows_of(tensor: torch.Tensor, rows: tuple[int, int] | None) -> torch.Tensor:
    """A target's part of its checkpoint tensor: the row block `rows` (a view: q, k or v of an open_clip
    `in_proj_weight` / `in_proj_bias`), or the whole tensor when `rows` is None."""
    return tensor[rows[0]:rows[1]] if rows else tensor


def _diffusers_unet_path(path: str) -> str:
    """LDM UNet module path (without `model.diffusion_model.`) → diffusers module path."""
    parts = path.split(".")
    if parts[0] == "middle_block":
        sub = {"0": "resnets.0", "1": "attentions.0", "2": "resnets.1"}[parts[1]]
        head, rest = f"mid_block.{sub}", parts[2:]
    else:
        n, s, rest = int(parts[1]), parts[2], parts[3:]
        if parts[0] == "input_blocks":
            level, slot = (n - 1) // 3, (n - 1) % 3
            head = (f"down_blocks.{level}.downsamplers.0" if slot == 2 else
                    f"down_blocks.{level}.{'resnets' if s == '0' else 'attentions'}.{slot}")
            rest = ["conv"] if slot == 2 else rest
        else:
            level, slot = n // 3, n % 3
            if rest == ["conv"]:
                head = f"up_blocks.{level}.upsamplers.0"
            else:
                head = f"up_blocks.{level}.{'resnets' if s == '0' else 'attentions'}.{slot}"
    tail = ".".join(rest)
    if head.split(".")[-2] == "resnets":
        tail = _RESNET_PARTS.get(tail, tail)
    return f"{head}.{tail}"


def _block(path: str) -> str:
    kind, n = path.split(".")[:2]
    if kind == "middle_block":
        return "MID"
    return f"{'IN' if kind == 'input_blocks' else 'OUT'}{int(n):02d}"


def _unet_targets(arch: Arch, shapes: Mapping[str, Shape]) -> list[Target]:
    out = []
    for key, shape in shapes.items():
        if not (key.startswith(UNET) and key.endswith(".weight")):
            continue
        path = key[len(UNET):-len(".weight")]
        attn = bool(_TRANSFORMER_CHILD.search("." + path))
        if not attn and not _CONV_CHILD.search("." + path):
            continue
        if not attn and path.split(".")[0] not in ("input_blocks", "middle_block", "output_blocks"):
            continue
        if path.startswith("input_blocks.0."):
            continue
        native = path if arch.id == "sdxl" else _diffusers_unet_path(path)
        out.append(Target(key, "lora_unet_" + native.replace(".", "_"), shape, None, _block(path), not attn))
    return out


def _text_targets(arch: Arch, shapes: Mapping[str, Shape]) -> list[Target]:
    encoders = {"sd15": [("cond_stage_model.transformer.", "lora_te", "TE", False)],
                "sd2": [("cond_stage_model.model.", "lora_te", "TE", True)],
                "sdxl": [("conditioner.embedders.0.transformer.", "lora_te1", "TE1", False),
                         ("conditioner.embedders.1.model.", "lora_te2", "TE2", True)]}[arch.id]
    out = []
    for prefix, lora, block, openclip in encoders:
        if openclip:
            layers = 1 + max(int(k[len(prefix):].split(".")[2]) for k in shapes
                             if k.startswith(prefix + "transformer.resblocks."))
            used = layers - 1 if arch.id == "sd2" else layers  # SD2 never uses its last layer
            for n in range(used):
                src = f"{prefix}transformer.resblocks.{n}."
                dst = f"{lora}_text_model_encoder_layers_{n}_"
                w = shapes[src + "attn.in_proj_weight"]
                d = w[0] // 3
                for i, q in enumerate("qkv"):
                    out.append(Target(src + "attn.in_proj_weight", f"{dst}self_attn_{q}_proj", (d, w[1]),
                                      (i * d, (i + 1) * d), block, False))
                for a, b in _OPENCLIP.items():
                    out.append(Target(f"{src}{a}.weight", dst + b.replace(".", "_"), shapes[f"{src}{a}.weight"],
                                      None, block, False))
            continue
        pat = re.compile(re.escape(prefix) + r"text_model\.encoder\.layers\.\d+\.(self_attn\.[qkvout]+_proj|mlp\.fc[12])\.weight$")
        for key, shape in shapes.items():
            if pat.match(key):
                path = key[len(prefix):-len(".weight")]
                out.append(Target(key, f"{lora}_{path.replace('.', '_')}", shape, None, block, False))
    return out


def targets(arch: Arch, shapes: Mapping[str, Shape], conv: bool = True) -> list[Target]:
    """Every LoRA-targetable layer of a checkpoint (text encoders first), convs only if `conv`."""
    found = _text_targets(arch, shapes) + _unet_targets(arch, shapes)
    return [t for t in found if conv or not t.conv]


@lru_cache(maxsize=8)
def name_table(arch_id: str) -> dict[str, Target]:
    """kohya-native name → Target of the architecture's real-size checkpoint (the layers of a file
    for this architecture; a smaller model of the same key set has other widths, see `targets`)."""
    arch = Arch(arch_id)
    return {t.name: t for t in targets(arch, spec(arch_id))}


@lru_cache(maxsize=8)
def _aliases(arch_id: str) -> dict[str, str]:
    """Every accepted spelling of a module name → its kohya-native name."""
    out: dict[str, str] = {}
    for t in name_table(arch_id).values():
        out[t.name] = t.name
        if t.is_text:
            out[t.name.replace("_text_model_", "_", 1)] = t.name
            continue
        path = t.ckpt_key[len(UNET):-len(".weight")]
        for other in (path, _diffusers_unet_path(path)):
            out["lora_unet_" + other.replace(".", "_")] = t.name
    return out


_PEFT_PREFIX = {"unet.": "lora_unet_", "text_encoder.": "lora_te_", "text_encoder_2.": "lora_te2_"}


def resolve(arch_id: str, name: str) -> str | None:
    """Map a module name in any supported style to the kohya-native name, or None if unknown."""
    for peft, kohya in _PEFT_PREFIX.items():
        if name.startswith(peft):
            name = kohya + name[len(peft):]
            if arch_id == "sdxl" and kohya == "lora_te_":
                name = "lora_te1_" + name[len(kohya):]
            break
    return _aliases(arch_id).get(name.replace(".", "_"))


def guess_arch(names: list[str]) -> str | None:
    """The architecture whose name table resolves most of `names` (None if none does)."""
    best, score = None, 0
    for arch_id in ("sdxl", "sd15", "sd2"):
        n = sum(resolve(arch_id, x) is not None for x in names)
        if n > score:
            best, score = arch_id, n
    return best

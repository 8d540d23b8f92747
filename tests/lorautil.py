"""Test helpers: random LoRA / LoCon / LoHa / LoKr / full-diff tensor dicts with real module names for
the tiny synthetic architectures (widths / 16), and a saver. Every builder takes a list of
`keys.Target` (see `tiny_targets` / `sample_targets`) and a seed, and returns {key: tensor} exactly
as the family's training code stores it (kohya / LyCORIS / PEFT layouts)."""
from __future__ import annotations

import math
import re
from pathlib import Path

import safetensors.torch
import torch

from lib_ortholora.arch import UNET, Arch, spec
from lib_ortholora.keys import Target, _diffusers_unet_path, targets

STYLES = ("kohya", "peft", "compvis")
LOKR_VARIANTS = ("full", "w1ab", "w2ab", "both", "tucker")
_TE_PATH = re.compile(r"text_model_encoder_layers_(\d+)_(self_attn|mlp)_(\w+)$")
_PEFT_TE = {"lora_te_": "text_encoder.", "lora_te1_": "text_encoder.", "lora_te2_": "text_encoder_2."}


def tiny_shapes(arch_id: str) -> dict[str, tuple[int, ...]]:
    """key → shape of the tiny (widths / 16) checkpoint that `synth.write_pair` writes."""
    return spec(arch_id, 16)


def tiny_targets(arch_id: str, conv: bool = True) -> list[Target]:
    """Every targetable layer of the tiny checkpoint of `arch_id`."""
    return targets(Arch(arch_id), tiny_shapes(arch_id), conv)


def sample_targets(arch_id: str, per_kind: int = 2) -> list[Target]:
    """A few targets of each kind: text Linear, q/k/v row blocks, UNet Linear, 1×1 and 3×3 convs."""
    kinds: dict[str, list[Target]] = {}
    for t in tiny_targets(arch_id):
        kind = ("qkv" if t.rows else "text" if t.is_text else
                "conv3" if t.kernel > 1 else "conv1" if len(t.shape) == 4 else "linear")
        kinds.setdefault(kind, []).append(t)
    return [t for group in kinds.values() for t in group[:per_kind]]


def module_name(t: Target, style: str = "kohya", arch_id: str = "sd15") -> str:
    """The module name a file of `style` uses: kohya-native, PEFT dotted paths, or checkpoint-style UNet."""
    if style == "kohya" or (style == "compvis" and t.is_text):
        return t.name
    if style == "compvis":
        return "lora_unet_" + t.ckpt_key[len(UNET):-len(".weight")].replace(".", "_")
    if style != "peft":
        raise ValueError(f"unknown style {style!r}")
    if t.is_text:
        prefix = next(p for p in sorted(_PEFT_TE, key=len, reverse=True) if t.name.startswith(p))
        n, group, rest = _TE_PATH.search(t.name).groups()
        return f"{_PEFT_TE[prefix]}text_model.encoder.layers.{n}.{group}.{rest}"
    path = t.ckpt_key[len(UNET):-len(".weight")]
    return "unet." + (path if arch_id == "sdxl" else _diffusers_unet_path(path))


def _rand(g: torch.Generator, *shape: int, std: float = 0.1) -> torch.Tensor:
    return torch.randn(shape, generator=g) * std


def _inner(t: Target) -> int:
    return math.prod(t.shape[1:])


def lora_tensors(tgts: list[Target], rank: int = 4, seed: int = 0, alpha: float | None = None,
                 style: str = "kohya", tucker: bool = False, arch_id: str = "sd15",
                 dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """kohya LoRA/LoCon (down [r, in(, k, k)], up [out, r(, 1, 1)], alpha), Tucker `lora_mid` on k×k
    convs when `tucker`; PEFT style writes lora_A/lora_B and no alpha."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for t in tgts:
        r = min(rank, t.shape[0], _inner(t))
        name = module_name(t, style, arch_id)
        conv = len(t.shape) == 4
        mid = tucker and t.kernel > 1
        down = _rand(g, r, t.shape[1], *((1, 1) if mid else t.shape[2:]), std=1 / math.sqrt(_inner(t)))
        up = _rand(g, t.shape[0], r, *((1, 1) if conv else ()))
        if style == "peft":
            out[f"{name}.lora_A.weight"], out[f"{name}.lora_B.weight"] = down, up
        else:
            out[f"{name}.lora_down.weight"], out[f"{name}.lora_up.weight"] = down, up
            out[f"{name}.alpha"] = torch.tensor(float(alpha if alpha is not None else r))
        if mid:
            out[f"{name}.lora_mid.weight"] = _rand(g, r, r, t.kernel, t.kernel, std=0.5)
    return {k: v.to(dtype) for k, v in out.items()}


def loha_tensors(tgts: list[Target], rank: int = 4, seed: int = 0, alpha: float | None = None,
                 tucker: bool = False) -> dict[str, torch.Tensor]:
    """LyCORIS LoHa: hada_w{1,2}_a [out, r], hada_w{1,2}_b [r, in·k·k]; with `tucker` on k×k convs:
    hada_t{1,2} [r, r, k, k], hada_w{1,2}_a [r, out], hada_w{1,2}_b [r, in]."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for t in tgts:
        r = min(rank, t.shape[0], _inner(t))
        n = t.name
        for i in (1, 2):
            if tucker and t.kernel > 1:
                out[f"{n}.hada_t{i}"] = _rand(g, r, r, t.kernel, t.kernel, std=0.5)
                out[f"{n}.hada_w{i}_a"] = _rand(g, r, t.shape[0], std=0.5)
                out[f"{n}.hada_w{i}_b"] = _rand(g, r, t.shape[1], std=0.5)
            else:
                out[f"{n}.hada_w{i}_a"] = _rand(g, t.shape[0], r, std=0.5)
                out[f"{n}.hada_w{i}_b"] = _rand(g, r, _inner(t), std=0.5)
        out[f"{n}.alpha"] = torch.tensor(float(alpha if alpha is not None else r))
    return out


def kron_split(n: int) -> tuple[int, int]:
    """n = p·q with p the largest divisor of n not above √n (p ≤ q)."""
    p = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return p, n // p


def lokr_tensors(tgts: list[Target], rank: int = 2, seed: int = 0, alpha: float | None = None,
                 variant: str = "w2ab") -> dict[str, torch.Tensor]:
    """LyCORIS LoKr with out = a·b, in = c·d: W1 [a, c] (`lokr_w1`, or `lokr_w1_a`/`_b` for "w1ab" and
    "both"), W2 [b, d(, k, k)] (`lokr_w2` for "full"/"w1ab", `lokr_w2_a` [b, r] / `lokr_w2_b`
    [r, d·k·k] for "w2ab"/"both", Tucker `lokr_t2` [r, r, k, k] + `lokr_w2_a` [r, b] + `lokr_w2_b`
    [r, d] for "tucker" on k×k convs, else as "w2ab")."""
    if variant not in LOKR_VARIANTS:
        raise ValueError(f"unknown LoKr variant {variant!r}")
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for t in tgts:
        (a, b), (c, d) = kron_split(t.shape[0]), kron_split(t.shape[1])
        k, n = t.shape[2:], t.name
        r = max(1, min(rank, a, b, c, d))  # LyCORIS uses one dim for every factor
        if variant in ("w1ab", "both"):
            out[f"{n}.lokr_w1_a"], out[f"{n}.lokr_w1_b"] = _rand(g, a, r, std=0.5), _rand(g, r, c, std=0.5)
        else:
            out[f"{n}.lokr_w1"] = _rand(g, a, c, std=0.5)
        if variant in ("full", "w1ab"):
            out[f"{n}.lokr_w2"] = _rand(g, b, d, *k, std=0.5)
        elif variant == "tucker" and t.kernel > 1:
            out[f"{n}.lokr_t2"] = _rand(g, r, r, *k, std=0.5)
            out[f"{n}.lokr_w2_a"], out[f"{n}.lokr_w2_b"] = _rand(g, r, b, std=0.5), _rand(g, r, d, std=0.5)
        else:
            out[f"{n}.lokr_w2_a"] = _rand(g, b, r, std=0.5)
            out[f"{n}.lokr_w2_b"] = _rand(g, r, d * math.prod(k), std=0.5)
        out[f"{n}.alpha"] = torch.tensor(float(alpha if alpha is not None else r))
    return out


def full_tensors(tgts: list[Target], seed: int = 0, shapes: dict | None = None) -> dict[str, torch.Tensor]:
    """LyCORIS full deltas: `diff` [target shape]; `diff_b` [out] where `shapes` (the checkpoint's)
    has a bias for the layer (open_clip q/k/v: a row block of in_proj_bias)."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for t in tgts:
        out[f"{t.name}.diff"] = _rand(g, *t.shape, std=0.01)
        bias = t.ckpt_key.replace("in_proj_weight", "in_proj_bias").removesuffix(".weight") + (
            "" if t.rows else ".bias")
        if shapes is not None and bias in shapes:
            out[f"{t.name}.diff_b"] = _rand(g, t.shape[0], std=0.01)
    return out


def save(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    """Write `tensors` (contiguous copies) as a safetensors file; returns the path."""
    path = Path(path)
    safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata)
    return path

"""What a Stable Diffusion model predicts, epsilon (the noise) or v, and how that was told.

SD2's 768-v models predict v, its 512-base and inpainting models epsilon; some SD1 and SDXL
fine-tunes predict v as well. A LoRA records its base model's prediction type in its metadata
(`lorafile.lora_metadata`); the weights alone cannot say for sure, so for a checkpoint the
evidence is taken in this order, the first that speaks deciding:

1. the caller's word (`given`, CLI `--prediction`);
2. metadata: `modelspec.prediction_type`; `modelspec.architecture` (`…-v2-768-v…` → v,
   `…-v2-512…` → epsilon); kohya's `ss_base_model_version` (`sd_v1_v`/`sd_v2_v` → v,
   `sd_v1`/`sd_v2` → epsilon);
3. a `v_pred` tensor in the checkpoint (the marker ComfyUI reads, and v-prediction SDXL
   fine-tunes carry, to select v);
4. the file name: `vpred`, `v-pred`, `v_pred`, `v-prediction`, `768-v` → v; `eps`, `epsilon` →
   epsilon; for SD2 also a bare `768` → v and `512` → epsilon (Stability's SD2 file names);
5. SD2 only, 4 input channels (SD2 inpainting predicts epsilon): the weight statistic ComfyUI's
   model detection uses, population std of
   `model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias` > 0.09 → v. Its basis
   is empirical, a difference between the released SD2 768-v and 512 checkpoints in that layer
   norm's bias, not a consequence of v-prediction (its authors note they were not sure how well it
   works), so a fine-tune may fall on either side;
6. epsilon, the default of SD1 and SDXL.

Steps 4–6 are guesses (`sure=False`): the caller reports them and how to override.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from .arch import UNET, Arch
from .errors import OrthoLoraError
from .fileio import TensorFile

PREDICTIONS = ("epsilon", "v")
SD2_STATISTIC_KEY = UNET + "output_blocks.11.1.transformer_blocks.0.norm1.bias"
SD2_STATISTIC_THRESHOLD = 0.09
_SPELLINGS = {"v": "v", "v_prediction": "v", "v-prediction": "v", "vpred": "v", "v_pred": "v",
              "epsilon": "epsilon", "eps": "epsilon", "noise": "epsilon"}
_V_NAME = re.compile(r"(?:^|[^a-z0-9])(?:v[-_]?pred(?:iction)?|768[-_]?v)(?:[^a-z0-9]|$)")
_EPS_NAME = re.compile(r"(?:^|[^a-z0-9])eps(?:ilon)?(?:[^a-z0-9]|$)")


@dataclass(frozen=True)
class Prediction:
    """A prediction type, the evidence that decided it, and whether that evidence is certain."""

    type: str
    source: str
    sure: bool = True

    def describe(self) -> str:
        return f"{self.type} ({self.source}{'' if self.sure else ', a guess'})"


def normalized(value: str | None) -> str | None:
    """`v` / `epsilon` from the spellings in use (`v_prediction`, `eps`, …); None if not one."""
    return _SPELLINGS.get(value.strip().lower()) if value else None


def checked(value: str | None) -> str | None:
    """A caller's prediction type, normalized; an error naming the choices if it is not one."""
    if value is None or value == "auto":
        return None
    found = normalized(value)
    if found is None:
        raise OrthoLoraError(f"unknown prediction type {value!r}; use {', '.join(PREDICTIONS)} or auto")
    return found


def from_metadata(meta: Mapping[str, str]) -> tuple[str, str] | None:
    """(type, the key that said so) from a checkpoint's or a LoRA's metadata, or None."""
    found = normalized(meta.get("modelspec.prediction_type"))
    if found:
        return found, "modelspec.prediction_type"
    spec = meta.get("modelspec.architecture", "")
    if "-v2-768-v" in spec or "-v2-512" in spec:
        return ("v" if "768-v" in spec else "epsilon"), "modelspec.architecture"
    version = meta.get("ss_base_model_version", "")
    if version in ("sd_v1", "sd_v1_v", "sd_v2", "sd_v2_v"):
        return ("v" if version.endswith("_v") else "epsilon"), "ss_base_model_version"
    return None


def from_name(name: str, arch_id: str) -> str | None:
    """The prediction type a file name states (see the module docstring), or None."""
    stem = Path(name).stem.lower()
    if _V_NAME.search(stem):
        return "v"
    if _EPS_NAME.search(stem):
        return "epsilon"
    if arch_id == "sd2":
        if re.search(r"(?:^|\D)768(?:\D|$)", stem):
            return "v"
        if re.search(r"(?:^|\D)512(?:\D|$)", stem):
            return "epsilon"
    return None


def detect(arch: Arch, files: Sequence[TensorFile], given: str | None = None) -> Prediction:
    """The prediction type of the model in `files` (the tuned checkpoint first, then its base):
    each kind of evidence is asked of every file before the next kind (module docstring)."""
    told = checked(given)
    if told:
        return Prediction(told, "given")
    for f in files:
        found = from_metadata(f.metadata)
        if found:
            return Prediction(found[0], f"{found[1]} of {f.path.name}")
    for f in files:
        if "v_pred" in f:
            return Prediction("v", f"v_pred key in {f.path.name}")
    for f in files:
        found = from_name(f.path.name, arch.id)
        if found:
            return Prediction(found, f"file name {f.path.name}", sure=False)
    if arch.id == "sd2" and not arch.inpaint:
        for f in files:
            if SD2_STATISTIC_KEY in f:
                std = float(f.get(SD2_STATISTIC_KEY).float().std(unbiased=False))
                kind = "v" if std > SD2_STATISTIC_THRESHOLD else "epsilon"
                sign = ">" if kind == "v" else "≤"
                return Prediction(kind, f"weight statistic of {f.path.name}: std {std:.3g} {sign} "
                                        f"{SD2_STATISTIC_THRESHOLD:g}", sure=False)
    if arch.id == "sd2":
        return Prediction("epsilon", "SD2 inpainting" if arch.inpaint else "default", sure=arch.inpaint)
    return Prediction("epsilon", "default")


def common(metas: Sequence[Mapping[str, str]], warnings: list[str] | None = None,
           names: Sequence[str] = ()) -> str | None:
    """The prediction type every input LoRA's metadata states, if they all state the same one.
    Inputs that state different types get a line in `warnings` (naming them by `names`)."""
    stated = [(from_metadata(m) or (None, ""))[0] for m in metas]
    kinds = {k for k in stated if k}
    if len(kinds) > 1 and warnings is not None:
        said = ", ".join(f"{n}: {k}" for n, k in zip(names or map(str, range(1, len(stated) + 1)), stated) if k)
        warnings.append(f"the inputs state different prediction types ({said}); the output states none")
    found = set(stated)
    return found.pop() if len(found) == 1 else None


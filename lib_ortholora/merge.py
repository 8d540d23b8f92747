"""Merge LoRAs into a checkpoint, streamed tensor by tensor (F§5).

For every mapped layer W ← cast(W.float() + Σ_i m_i·dW_i) to the output dtype; open_clip q/k/v add
into their row blocks of `in_proj_weight`; full-diff bias deltas add into the layer's bias (row
blocks of `in_proj_bias`). Every other tensor is written back unchanged (bit-identical unless an
output dtype is asked). Peak memory: the LoRAs plus about one checkpoint tensor.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch

from .arch import Arch, Shape, detect
from .errors import OrthoLoraError
from .fileio import TensorFile, TensorSpec, check_finite, open_tensors, write_safetensors_streamed
from .join import as_ratios
from .keys import Target, targets
from .lorafile import LoraFile, read_lora
from .memory import Workspace
from .modules import NetworkModule
from .progress import Progress
from .report import Report, Row

PathLike = str | os.PathLike
ADDMM_MAX_RANK = 128


@dataclass(frozen=True)
class Contribution:
    """m · dW of one module (or its bias delta when `bias`), added into `rows` of a checkpoint tensor."""

    module: NetworkModule
    multiplier: float
    rows: tuple[int, int] | None
    bias: bool = False

    def add_into(self, block: torch.Tensor) -> None:
        """block += m·dW in place. A low-rank form of rank ≤ ADDMM_MAX_RANK is added by addmm (no
        dW-sized temporary); wider forms (LoHa's r², big LoKr) cost less as the dense dW."""
        lr = None if self.bias else self.module.lowrank()
        if lr is not None and lr.rank <= ADDMM_MAX_RANK:
            block.view(block.shape[0], -1).addmm_(lr.up.float(), lr.down.float(), alpha=self.multiplier * lr.scale)
            return
        delta = self.module.bias_delta() if self.bias else self.module.delta()
        block.add_(delta.reshape(block.shape), alpha=self.multiplier)


def bias_key(t: Target) -> str:
    """The checkpoint key of a target layer's bias (`in_proj_bias` for open_clip q/k/v)."""
    if t.rows:
        return t.ckpt_key.replace("in_proj_weight", "in_proj_bias")
    return t.ckpt_key.removesuffix(".weight") + ".bias"


def _listing(names: Sequence[str], shown: int = 5) -> str:
    """`3 name(s): a, b, c` (the first `shown` names)."""
    more = " …" if len(names) > shown else ""
    return f"{len(names)} name(s): {', '.join(names[:shown])}{more}"


def plan_merge(arch: Arch, shapes: Mapping[str, Shape], loras: Sequence[tuple[LoraFile, float]],
               ckpt_path: PathLike | None = None) -> tuple[dict[str, list[Contribution]], Report]:
    """Map checkpoint key → contributions, and a report row per LoRA module (ok / unmatched).

    A LoRA made for another architecture, or a module whose size differs from its layer, raises."""
    table = {t.name: t for t in targets(arch, shapes)}
    plan: dict[str, list[Contribution]] = {}
    report = Report("merge")
    for lora, mult in loras:
        if lora.arch is not None and lora.arch != arch.id:
            raise OrthoLoraError(f"LoRA made for {Arch(lora.arch).title} cannot merge into the {arch.title} "
                                 f"checkpoint {ckpt_path}", lora.path)
        unmatched = []
        for name, module in lora.modules.items():
            t = table.get(name) if name not in lora.unknown else None
            row = report.add(Row(name, extra={"lora": lora.stem, "family": module.family}))
            if t is None:
                row.status, row.note = "unmatched", "no layer of this checkpoint has this name"
                unmatched.append(name)
                continue
            flat = (module.shape[0], torch.Size(module.shape[1:]).numel())
            if flat != (t.shape[0], torch.Size(t.shape[1:]).numel()):  # not only numel: (in, out) ≠ (out, in)
                rows = f" (rows {t.rows[0]}:{t.rows[1]})" if t.rows else ""
                raise OrthoLoraError(f"module {name} has shape {module.shape} but layer {t.ckpt_key}{rows} of "
                                     f"{ckpt_path} is {t.shape}: made for another model?", lora.path)
            plan.setdefault(t.ckpt_key, []).append(Contribution(module, mult, t.rows))
            row.extra["layer"] = t.ckpt_key
            if module.bias_delta() is not None:
                key = bias_key(t)
                if key in shapes:
                    plan.setdefault(key, []).append(Contribution(module, mult, t.rows, bias=True))
                else:
                    row.note = "bias delta dropped: the layer has no bias"
                    report.warnings.append(f"{lora.stem}: {name}: bias delta dropped (the layer has no bias)")
        if lora.stray_keys:
            report.warnings.append(f"{lora.stem}: ignored {_listing(lora.stray_keys)} (not part of any module)")
        if unmatched:
            report.warnings.append(f"{lora.stem}: {_listing(unmatched)} matched no layer")
    return plan, report


def merged_tensor(w: torch.Tensor, contributions: Sequence[Contribution], dtype: torch.dtype,
                  work: Workspace | None = None, out: str = "out") -> torch.Tensor:
    """cast(w.float() + Σ contributions, dtype); each contribution lands in its row block. With
    `work`, the float32 sum lives in its `acc` buffer and the cast in the buffer named `out` (the
    result is valid until that buffer is taken again)."""
    acc = work.take("acc", w.shape, torch.float32).copy_(w) if work is not None else w.to(torch.float32, copy=True)
    del w  # the caller passes its only reference: free it before the deltas are formed
    for c in contributions:
        c.add_into(acc[slice(*c.rows)] if c.rows else acc)
    if work is None:
        return acc.to(dtype)
    return work.take(out, acc.shape, dtype).copy_(acc)


def _workspace(f: TensorFile, plan: Mapping[str, list[Contribution]], dtype: torch.dtype | None) -> Workspace:
    """Buffers for `produce`, sized once: two for the largest tensor read, the float32 sum of the
    largest merged layer, and two for its cast output."""
    work = Workspace()
    merged = max((math.prod(f.shape(k)) for k in plan), default=0)
    work.reserve("acc", 4 * merged)
    for slot in (0, 1):  # the writer writes one slot's tensor while the other is produced
        work.reserve(f"read{slot}", max((f.nbytes(k) for k in f.keys()), default=0))
        work.reserve(f"out{slot}", merged * max((_out_dtype(f.dtype(k), dtype).itemsize for k in plan), default=0))
    return work


def _out_dtype(stored: torch.dtype, dtype: torch.dtype | None) -> torch.dtype:
    return dtype if dtype is not None and stored.is_floating_point else stored


def read_for(path: Path, arch_id: str) -> LoraFile:
    """Read a LoRA; SD1 and SD2 share module names, so without architecture metadata a file guessed
    as the other of the two is read for the checkpoint's (the shape check still guards the merge)."""
    lf = read_lora(path)
    decided = lf.metadata.get("ss_base_model_version") or lf.metadata.get("modelspec.architecture")
    if {lf.arch, arch_id} == {"sd15", "sd2"} and not decided:
        return read_lora(path, arch_id)
    return lf


def merge_lora(base_path: PathLike, lora_path: PathLike | Sequence[PathLike], multiplier: float | Sequence[float] = 1.0,
               save_path: PathLike | None = None, *, dtype: torch.dtype | None = None, overwrite: bool = False,
               progress: Progress | None = None) -> Report:
    """Merge one or several LoRA-like files (any supported family) into a checkpoint.

    `multiplier`: one value for all, or one per LoRA. `dtype`: output dtype of the floating tensors
    (None keeps each tensor's own). Output is safetensors at `save_path` (default
    `<base>-merged.safetensors` next to the base); the base may also be a .ckpt."""
    base = Path(base_path)
    paths = [Path(lora_path)] if isinstance(lora_path, (str, os.PathLike)) else [Path(p) for p in lora_path]
    if not paths:
        raise OrthoLoraError("no LoRA file given")
    mults = as_ratios(multiplier, len(paths), "multiplier")
    out = Path(save_path) if save_path is not None else base.with_name(f"{base.stem}-merged.safetensors")
    if out.resolve() in {p.resolve() for p in (base, *paths)}:
        raise OrthoLoraError("the output would replace one of the inputs", out)
    with open_tensors(base) as f:
        shapes = {k: f.shape(k) for k in f.keys()}
        arch = detect(shapes, str(base))
        loras = [(read_for(p, arch.id), m) for p, m in zip(paths, mults)]
        plan, report = plan_merge(arch, shapes, loras, base)
        if not plan:
            raise OrthoLoraError(f"nothing to merge: no module of {', '.join(p.name for p in paths)} matches a "
                                 f"layer of this {arch.title} checkpoint", base)
        specs = [TensorSpec(k, _out_dtype(f.dtype(k), dtype), shapes[k]) for k in f.keys()]
        work = _workspace(f, plan, dtype)
        done = 0

        def produce(key: str) -> torch.Tensor:
            """The output tensor of `key`, in `work`'s buffers of slot 0 or 1 by turns: the writer
            still writes the previous result during this call (see write_safetensors_streamed)."""
            nonlocal done
            done += 1
            if progress:
                progress(done, len(specs), key)
            if done < len(specs):
                f.prefetch(specs[done].name)  # the OS reads the next tensor while this one is merged
            slot = done % 2
            w = f.get(key, work.take(f"read{slot}", (f.nbytes(key),), torch.uint8))
            if key not in plan:
                return w
            merged = merged_tensor(w, plan[key], _out_dtype(f.dtype(key), dtype), work, f"out{slot}")
            try:
                check_finite(merged, key, out)
            except OrthoLoraError:
                check_finite(f.get(key), key, base)  # NaN/Inf already in the checkpoint: name that file
                raise
            return merged

        meta = {k: v for k, v in f.metadata.items() if "hash" not in k.lower()}
        meta["ortholora_merge"] = json.dumps([{"file": p.name, "multiplier": m} for p, m in zip(paths, mults)])
        write_safetensors_streamed(out, specs, produce, meta, overwrite)
    biases = sum(cs[0].bias for cs in plan.values())
    report.totals.update({
        "checkpoint": f"{base.name} ({arch.title})",
        "loras": ", ".join(f"{p.name}×{m:g}" for p, m in zip(paths, mults)),
        "layers_changed": len(plan) - biases,
        "biases_changed": biases,
        "tensors_unchanged": len(shapes) - len(plan),
        "modules_merged": report.count("ok"),
        "modules_unmatched": report.count("unmatched"),
        "dtype": "kept" if dtype is None else str(dtype).replace("torch.", ""),
    })
    report.outputs.append(str(out))
    return report

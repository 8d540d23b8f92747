"""Merge LoRAs into a checkpoint, streamed tensor by tensor (docs/formats.md#merge).

For every mapped layer W ← cast(W.float() + Σ_i m_i·dW_i) to the output dtype; open_clip q/k/v add
into their row blocks of `in_proj_weight`; full-diff bias deltas add into the layer's bias (row
blocks of `in_proj_bias`). Every other tensor is written back unchanged (bit-identical unless an
output dtype is asked). Layers are merged on worker threads (one per core, each single-threaded)
while a writer thread writes; unchanged tensors are copied file to file. Peak memory: the LoRAs plus
a few checkpoint layers.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

from . import arguments
from .arch import Arch, Shape, detect
from .dtypes import torch_name
from .errors import OrthoLoraError
from .fileio import (FileSlice, TensorFile, TensorSpec, check_finite, open_tensors, prefetched,
                     write_safetensors_streamed)
from .keys import Target, targets
from .lorafile import LoraFile, read_lora
from .memory import PerThread, Ring, Workspace
from .modules import NetworkModule
from .parallel import parallel_map
from .paths import PathLike
from .progress import Progress
from .report import Report, Row, Status
from .run import Run
from .shapes import matrix_shape

ADDMM_MAX_RANK = 128
BLOCK = 1 << 20  # float32 elements of the rows merged at a time (4 MiB: stays in cache)
AHEAD = 32  # tensors handed to the workers ahead of the writer (memory is bounded by the ring)


@dataclass(frozen=True)
class Contribution:
    """m · dW of one module (or its bias delta when `bias`), added into `rows` of a checkpoint tensor."""

    module: NetworkModule
    multiplier: float
    rows: tuple[int, int] | None
    bias: bool = False

    def form(self) -> tuple[torch.Tensor, torch.Tensor | None, float]:
        """m·dW (or m·bias delta) over the rows of its block, flattened: (up, down, alpha) with
        m·dW = alpha·up@down, or (dW, None, m). A low-rank form of rank ≤ ADDMM_MAX_RANK stays
        factored (added by addmm: no dW-sized temporary); wider forms (LoHa's r², big LoKr) cost
        less as the dense dW."""
        lr = None if self.bias else self.module.lowrank()
        if lr is not None and lr.rank <= ADDMM_MAX_RANK:
            return lr.up.float(), lr.down.float(), self.multiplier * lr.scale
        delta = self.module.bias_delta() if self.bias else self.module.delta()
        return delta.float().reshape(delta.shape[0], -1), None, self.multiplier


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
                row.status, row.note = Status.UNMATCHED, "no layer of this checkpoint has this name"
                unmatched.append(name)
                continue
            if matrix_shape(module.shape) != matrix_shape(t.shape):  # not only numel: (in, out) ≠ (out, in)
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
                  out: torch.Tensor | None = None, work: Workspace | None = None) -> torch.Tensor:
    """cast(w.float() + Σ contributions, dtype), each contribution in its row block, computed in
    blocks of rows of ≤ BLOCK elements whose float32 sum stays in cache (in `work`'s `acc` buffer
    when given). The result goes to `out` (default: a new tensor), which may be w's own memory
    when dtype has w's item size: each block is read before it is written."""
    rows = w.shape[0]
    flat = w.reshape(rows, -1)
    out = torch.empty(w.shape, dtype=dtype) if out is None else out
    flat_out = out.view(rows, -1)
    forms = [(c.rows or (0, rows), c.form()) for c in contributions]
    step = max(1, BLOCK // max(1, flat.shape[1]))
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        shape = (r1 - r0, flat.shape[1])
        acc = (work.take("acc", shape, torch.float32) if work is not None else torch.empty(shape)).copy_(flat[r0:r1])
        for (a, b), (up, down, alpha) in forms:
            lo, hi = max(a, r0), min(b, r1)
            if lo < hi and down is None:
                acc[lo - r0:hi - r0].add_(up[lo - a:hi - a], alpha=alpha)
            elif lo < hi:
                acc[lo - r0:hi - r0].addmm_(up[lo - a:hi - a], down, alpha=alpha)
        flat_out[r0:r1].copy_(acc)
    return out


def _merged(f: TensorFile, plan: Mapping[str, list[Contribution]], dtype: torch.dtype | None,
            paths: tuple[Path, Path]) -> tuple[Callable[[str], tuple[str, torch.Tensor | FileSlice]], Ring,
                                               Callable[[str], None], Callable[[str], str | None]]:
    """(output(key), its buffer ring, written(key), hinted(key)). `output` (run on worker threads,
    any number of keys ahead) gives each output tensor: an unchanged tensor as its stored bytes
    (copied file to file), anything else in a ring buffer of its own (merged layers in place when
    the item size is kept) until `written(key)` gives it back. Ring turns follow the file order.
    `hinted` is the key to prefetch (`fileio.prefetched`), None for one read directly."""
    base, out = paths
    to = {k: _out_dtype(f.dtype(k), dtype) for k in f.keys()}
    # read into a ring buffer: what changes, and unchanged tensors that fit one and that a cold
    # file hands over without its page cache (directio); the rest is copied file to file
    largest = max((f.buffer_bytes(k) for k in plan), default=0)
    turns = {k: i for i, k in enumerate(k for k in f.keys() if k in plan or to[k] != f.dtype(k) or f.stored(k) is None
                                        or (f.reads_direct(k) and f.buffer_bytes(k) <= largest))}
    ring = Ring(2 * torch.get_num_threads() + 2,  # ≥ the layers computed at once + the one being written
                sizes={"read": max((f.buffer_bytes(k) for k in turns), default=0)})
    scratch = PerThread("cpu", {"acc": 4 * BLOCK})
    held: dict[str, Workspace] = {}

    def output(key: str) -> tuple[str, torch.Tensor | FileSlice]:
        if key not in turns:
            return key, f.stored(key)
        work = ring.acquire(turns[key])
        try:
            buf = work.take("read", (f.buffer_bytes(key),), torch.uint8)
            w = f.get(key, buf)
            if key not in plan:
                result = w if to[key] == w.dtype else work.take("out", w.shape, to[key]).copy_(w)
            else:
                own = w.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr() and to[key].itemsize == w.dtype.itemsize
                result = merged_tensor(w, plan[key], to[key], w.view(to[key]) if own else
                                       work.take("out", w.shape, to[key]), scratch.get())
                try:
                    check_finite(result, key, out)
                except OrthoLoraError:
                    check_finite(f.get(key), key, base)  # NaN/Inf already in the checkpoint: name that file
                    raise
        except BaseException:
            ring.release(work)
            raise
        held[key] = work
        return key, result

    def written(key: str) -> None:
        if key in held:
            ring.release(held.pop(key))

    def hinted(key: str) -> str | None:
        """The key, to prefetch, unless it is read directly (then None)."""
        return None if key in turns and f.reads_direct(key) else key

    return output, ring, written, hinted


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
    base = arguments.path(base_path, "base_path")
    paths = arguments.path_list(lora_path)
    if not paths:
        raise OrthoLoraError("no LoRA file given")
    mults = arguments.as_ratios(multiplier, len(paths), "multiplier")
    dtype = None if dtype is None else arguments.output_dtype(dtype)
    out = arguments.optional_path(save_path, "save_path") or base.with_name(f"{base.stem}-merged.safetensors")
    with Run("merge", progress) as run:
        run.claim([out], inputs=[base, *paths], overwrite=overwrite)
        with open_tensors(base) as f:
            shapes = {k: f.shape(k) for k in f.keys()}
            arch = detect(shapes, str(base))
            read = run.phase("read", len(paths))
            loras = []
            for p, m in zip(paths, mults):
                loras.append((read_for(p, arch.id), m))
                read.step(p.name)
            plan, report = plan_merge(arch, shapes, loras, base)
            report = run.use(report)
            if not plan:
                raise OrthoLoraError(f"nothing to merge: no module of {', '.join(p.name for p in paths)} matches a "
                                     f"layer of this {arch.title} checkpoint", base)
            specs = [TensorSpec(k, _out_dtype(f.dtype(k), dtype), shapes[k]) for k in f.keys()]
            step = run.phase("merge", len(specs)).step
            meta = {k: v for k, v in f.metadata.items() if "hash" not in k.lower()}
            meta["ortholora_merge"] = json.dumps([{"file": p.name, "multiplier": m} for p, m in zip(paths, mults)])
            output, ring, written, hinted = _merged(f, plan, dtype, (base, out))
            # layers merged on worker threads, in order, while the writer writes the previous ones
            stream = parallel_map(output, prefetched([s.name for s in specs], (f,), hinted), ahead=AHEAD)

            def produce(key: str) -> torch.Tensor | FileSlice:
                step(key)
                got, item = next(stream)
                assert got == key
                return item

            try:
                write_safetensors_streamed(out, specs, produce, meta, overwrite, written)
            finally:
                ring.close()  # workers waiting for a buffer end, then the map shuts down
                stream.close()
        biases = sum(cs[0].bias for cs in plan.values())
        report.totals.update({
            "checkpoint": base.name,
            "architecture": arch.title,
            "loras": ", ".join(f"{p.name}×{m:g}" for p, m in zip(paths, mults)),
            "layers_changed": len(plan) - biases,
            "biases_changed": biases,
            "tensors_unchanged": len(shapes) - len(plan),
            "modules_merged": report.count(Status.OK),
            "modules_unmatched": report.count(Status.UNMATCHED),
            "dtype": "kept" if dtype is None else torch_name(dtype),
        })
    return run.report

"""Read any LoRA-like file into kohya-named modules; write kohya LoRA files with full metadata."""
from __future__ import annotations

import datetime
import json
import math
import os
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import __version__
from .dtypes import torch_name
from .errors import OrthoLoraError
from .arch import ARCH_NAMES, detect
from .fileio import SafetensorsWriter, TensorFile, TensorSpec, all_finite, check_finite, layout_order, open_tensors
from .keys import guess_arch, name_table, resolve
from .lowrank import LowRank, kohya_layout
from .modules import NetworkModule, build_module, suffix_of
from .parallel import parallel_map
from .shapes import as_matrix, matrix_shape



@dataclass
class LoraFile:
    """A LoRA read into memory. `modules` are keyed by kohya-native name for `arch`
    (or by the name as written when it maps to no layer; those are listed in `unknown`)."""

    path: Path | None
    arch: str | None
    modules: dict[str, NetworkModule]
    metadata: dict[str, str] = field(default_factory=dict)
    unknown: list[str] = field(default_factory=list)
    stray_keys: list[str] = field(default_factory=list)

    @property
    def stem(self) -> str:
        return self.path.stem if self.path else "lora"

    def lowranks(self) -> dict[str, LowRank]:
        """Exact low-rank forms of every known module; error naming the file for those without one."""
        out = {}
        for name, m in self.modules.items():
            if name in self.unknown:
                continue
            lr = m.lowrank()
            if lr is None:
                raise OrthoLoraError(f"module {name} ({m.family}) has no exact low-rank form", self.path)
            out[name] = lr
        return out


def _arch_from_metadata(meta: dict[str, str]) -> str | None:
    version, spec = meta.get("ss_base_model_version"), meta.get("modelspec.architecture", "")
    found = ([a for a, names in ARCH_NAMES.items() if version in names.base_versions]
             or [a for a, names in ARCH_NAMES.items() if spec.startswith(names.modelspec_family)])
    if found:
        return found[0]
    return "sd2" if meta.get("ss_v2") == "True" else None


def _sd1_or_sd2(groups: dict[str, dict[str, torch.Tensor]]) -> str:
    """SD1 and SD2 share UNet names: SD1's proj_in/out are 1×1 convs, SD2's are Linear; SD2's
    text encoder has more than 12 layers."""
    for name, t in groups.items():
        if name.replace(".", "_").endswith(("proj_in", "proj_out")):
            down = t.get("lora_down.weight", t.get("lora_A.weight"))
            if down is not None:
                return "sd15" if down.dim() == 4 else "sd2"
        if "encoder_layers_" in name.replace(".", "_"):
            n = name.replace(".", "_").split("encoder_layers_")[1].split("_")[0]
            if n.isdigit() and int(n) >= 12:
                return "sd2"
    return "sd15"


def _layer_layout(shape: tuple[int, ...], layer: tuple[int, ...]) -> tuple[int, ...]:
    """A module's shape in its layer's layout (delta() is in weight shape): factor families that
    store flattened factors (LoHa, LoKr) give (out, in) for a 1×1 conv such as SD1's proj_in, which is
    (out, in, 1, 1); a 4-D form of a Linear layer becomes 2-D. Other mismatches are left for the
    operations to report."""
    if len(shape) == len(layer) or len(layer) not in (2, 4) or len(shape) not in (2, 4):
        return shape
    inner = matrix_shape(shape)[1]
    if len(layer) == 2:
        return (shape[0], inner) if shape[2:] == (1, 1) else shape
    k = layer[2] * layer[3]
    return (shape[0], inner // k, layer[2], layer[3]) if inner % k == 0 else shape


def _dry_run(raw: str, group: dict[str, torch.Tensor], kernel: int | None, layer: tuple[int, ...] | None,
             path: Path) -> tuple[int, ...] | None:
    """Build the module from shapes only (meta tensors, no data touched; see _header_group) and form
    its delta and low-rank form, so factors that do not fit together, or tensors of another family
    beside the claiming one's (two deltas for one layer, one of them dropped), are refused here,
    naming the module, instead of failing deep inside an operation (or worse, being written out).
    Returns the module's shape in its layer's layout (see _layer_layout; factor families only), or
    None if no family claims it."""
    shapes = ", ".join(f"{s} {tuple(t.shape)}" for s, t in group.items())
    try:
        with torch.device("meta"):
            module = build_module(raw, group, kernel)
            if module is None:
                return None
            foreign = sorted(set(group) - type(module).suffixes)
            if foreign:
                raise OrthoLoraError(f"module {raw} holds {module.family} tensors and also "
                                     f"{', '.join(foreign)}: two modules for one layer")
            lr = module.lowrank()
            if layer is not None and lr is not None:
                module.shape = _layer_layout(module.shape, layer)
            shape = tuple(module.shape)
            fits = math.prod(shape) > 0
            if lr is None or type(module).delta is not NetworkModule.delta:  # the default is lr.delta()
                fits = fits and tuple(module.delta().shape) == shape
            if lr is not None:
                lr = module.lowrank()
                up, down = as_matrix(lr.up), as_matrix(lr.down)  # up @ down must make the layer's matrix
                fits = (fits and lr.rank > 0 and up.shape[1] == lr.rank
                        and (up.shape[0], down.shape[1]) == matrix_shape(shape))
            bias = module.bias_delta()
            fits = fits and (bias is None or tuple(bias.shape) == shape[:1])
    except OrthoLoraError as e:
        raise OrthoLoraError(e.problem, path) from None
    except Exception:  # noqa: BLE001 - any shape error of any family is the same bad input
        fits = False
    if not fits:
        raise OrthoLoraError(f"module {raw}: its tensors do not fit together ({shapes})", path)
    return shape


def _group_keys(f: TensorFile) -> tuple[dict[str, dict[str, str]], list[str]]:
    """Tensor keys by module name and suffix (from the header alone), and the keys of no module."""
    groups: dict[str, dict[str, str]] = {}
    stray = []
    for key in f.keys():
        split = suffix_of(key)
        if split is None:
            stray.append(key)
        else:
            groups.setdefault(split[0], {})[split[1]] = key
    return groups, stray


def _header_group(f: TensorFile, keys: dict[str, str]) -> dict[str, torch.Tensor]:
    """A module's tensors as meta tensors (the header's shapes and dtypes, no data read), except an
    alpha that is the single number it must be: that one is read."""
    return {suffix: f.get(key) if suffix == "alpha" and math.prod(f.shape(key)) == 1
            else torch.empty(f.shape(key), dtype=f.dtype(key), device="meta")
            for suffix, key in keys.items()}


def _not_a_lora(f: TensorFile) -> str:
    try:
        found = f"a checkpoint ({detect({k: f.shape(k) for k in f.keys()}).title}), not a LoRA"
    except OrthoLoraError:
        found = "not a LoRA file?"
    return f"no LoRA modules found ({found})"


Plan = dict[str, tuple[str, int | None, tuple[int, ...]]]  # module name → (name in the file, kernel, shape)


def _plan(groups: dict[str, dict[str, torch.Tensor]], arch: str | None, path: Path
          ) -> tuple[Plan, list[str], list[str]]:
    """Resolve and dry-run every module (header only): (plan, names in the file matching no layer,
    names no family claims). One layer named twice (two key styles) is refused."""
    table = name_table(arch) if arch else {}
    plan: Plan = {}
    unknown, unclaimed = [], []
    for raw, group in groups.items():
        name = resolve(arch, raw) if arch else None
        target = table.get(name) if name else None
        kernel = target.kernel if target else None
        shape = _dry_run(raw, group, kernel, target.shape if target else None, path)
        if shape is None:
            unclaimed.append(raw)
            continue
        if (name or raw) in plan:
            raise OrthoLoraError(f"layer {name} is in the file twice, as {plan[name][0]} and {raw}: two key "
                                 "styles for one layer", path)
        plan[name or raw] = (raw, kernel, shape)
        if name is None:
            unknown.append(raw)
    return plan, unknown, unclaimed


class LoraReader:
    """A LoRA file opened for reading module by module (`open_lora`): its architecture, metadata and
    the plan of its modules come from the header (names, shapes; every module built on meta tensors,
    see _dry_run), and `module(name)` reads that one module's tensors (checked for NaN/Inf). Safe to
    call from several threads. `names` are in file order; `shapes` maps them to their layer layout."""

    def __init__(self, path: Path, arch: str | None):
        self.path = path
        self._file = open_tensors(path)
        try:
            self._open(arch)
        except BaseException:
            self._file.close()
            raise

    def _open(self, arch: str | None) -> None:
        f, path = self._file, self.path
        self.metadata = dict(f.metadata)
        self._keys, self.stray_keys = _group_keys(f)
        if not self._keys:
            raise OrthoLoraError(_not_a_lora(f), path)
        groups = {raw: _header_group(f, group) for raw, group in self._keys.items()}
        guessed = arch is None
        arch = arch or _arch_from_metadata(self.metadata) or guess_arch(list(groups))
        if guessed and arch in ("sd15", "sd2") and not (self.metadata.get("ss_base_model_version")
                                                        or self.metadata.get("modelspec.architecture")):
            arch = _sd1_or_sd2(groups)
        self.arch = arch
        self._plan, self.unknown, unclaimed = _plan(groups, arch, path)
        self.stray_keys += [key for raw in unclaimed for key in self._keys[raw].values()]
        self.names = list(self._plan)
        self.shapes = {name: shape for name, (_, _, shape) in self._plan.items()}

    @property
    def stem(self) -> str:
        return self.path.stem

    def __enter__(self) -> LoraReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    def module(self, name: str) -> NetworkModule:
        """The module `name` (one of `names`), its tensors read now."""
        raw, kernel, shape = self._plan[name]
        tensors = {suffix: self._file.get(key) for suffix, key in self._keys[raw].items()}
        for suffix, t in tensors.items():
            check_finite(t, f"{raw}.{suffix}", self.path)
        module = build_module(name, tensors, kernel)
        module.shape = shape
        return module


def open_lora(path: str | bytes | os.PathLike, arch: str | None = None) -> LoraReader:
    """Open a kohya / LyCORIS / PEFT LoRA file for reading module by module (`LoraReader`).
    Architecture: `arch`, else metadata, else names.

    Decided from the header first: module names, shapes (every module built on meta tensors) and
    layer names are checked before any tensor data is read, so a checkpoint or a malformed file is
    refused at the cost of its header."""
    return LoraReader(Path(os.fsdecode(path)), arch)


def read_lora(path: str | bytes | os.PathLike, arch: str | None = None) -> LoraFile:
    """Read a whole LoRA file (`open_lora`, then every module's tensors)."""
    with open_lora(path, arch) as r:
        modules = {name: r.module(name) for name in r.names}
    return LoraFile(r.path, r.arch, modules, r.metadata, r.unknown, r.stray_keys)


def file_alpha(lowranks: Mapping[str, LowRank]) -> int:
    """The one alpha every module of a written file carries: the most common UNet rank (ties: the
    smaller), or the most common rank when there is no UNet module; 1 for an empty set.

    Each module's scale is alpha/r (kohya, the webui, ComfyUI, diffusers all read it so) and its
    factors absorb √(r/alpha) (`LowRank.to_kohya`). One value per file, because diffusers keeps a
    single alpha per component (its most common) and drops per-module exceptions for UNet attention
    and CLIP text-encoder layers: with one value there is no exception to drop, and its rank_pattern
    gives every module its own r. The most common UNet rank also keeps those modules exact in older
    diffusers (≤ 0.32), which applies UNet factors at scale 1 whenever ranks differ. Its factors
    grow by at most √(r_max/alpha) and shrink by at least √(r_min/alpha) (fp16: checked in write_lora)."""
    unet = [lr.rank for name, lr in lowranks.items() if lr.rank and name.startswith("lora_unet_")]
    counts = Counter(unet or [lr.rank for lr in lowranks.values() if lr.rank])
    return min(counts, key=lambda r: (-counts[r], r)) if counts else 1


def lora_metadata(arch: str, lowranks: Mapping[str, LowRank], title: str, extra: dict[str, str] | None = None,
                  prediction: str | None = None) -> dict[str, str]:
    """kohya (`ss_*`) and ModelSpec metadata for a LoRA written with one alpha (`file_alpha`).
    `prediction` (`epsilon` / `v`, None when unknown) picks the variant: SD2 v is 768-v; it is
    stated as modelspec.prediction_type only when known (unknown reads as the architecture's default)."""
    ranks = {lr.rank for name, lr in lowranks.items() if len(lr.shape) == 2 or lr.shape[2] == 1}
    conv_ranks = {lr.rank for lr in lowranks.values() if len(lr.shape) == 4 and lr.shape[2] > 1}
    dim = str(ranks.pop()) if len(ranks) == 1 else ("Dynamic" if ranks else "0")
    alpha = str(file_alpha(lowranks))
    names = ARCH_NAMES[arch]
    variant = names.variant(prediction)
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": dim,
        "ss_network_alpha": alpha,
        "ss_v2": str(arch == "sd2"),
        "ss_base_model_version": variant.base_version,
        "ss_output_name": title,
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": variant.modelspec,
        "modelspec.implementation": names.implementation,
        "modelspec.title": title,
        "modelspec.date": datetime.date.today().isoformat(),
        "modelspec.resolution": variant.resolution,
        "ortholora_version": __version__,
    }
    if prediction:
        meta["modelspec.prediction_type"] = prediction
    if conv_ranks:
        conv = str(conv_ranks.pop()) if len(conv_ranks) == 1 else "Dynamic"
        meta["ss_network_args"] = json.dumps({"conv_dim": conv, "conv_alpha": alpha})
    meta.update(extra or {})
    return meta


class LoraWriter:
    """One kohya LoRA file (the file's one alpha, `file_alpha`, and factors as `LowRank.to_kohya`
    writes them, `lora_metadata`, fresh sshs hashes) written module by module: every module's shape
    and rank are given up front (the header holds them all), then each module in the order of
    `names` (sorted: the file's layout is safetensors' own when all tensors share a dtype), written
    at once: `add(name, lowrank)`, or `write(name, encode(name, lowrank))` where the encoding (the
    costly part, thread-safe) runs on worker threads. `close()` (or leaving the `with` block)
    finishes the file; `metadata` is then final."""

    def __init__(self, path: str | Path, layout: Mapping[str, tuple[tuple[int, ...], int]], arch: str,
                 dtype: torch.dtype = torch.float16, extra_metadata: dict[str, str] | None = None,
                 overwrite: bool = False, prediction: str | None = None):
        self.path, self.dtype = Path(path), dtype
        self.names = sorted(n for n, (_, rank) in layout.items() if rank)
        if not self.names:
            raise OrthoLoraError("nothing to write: every module was skipped or empty", self.path)
        shapes = {n: _meta_lowrank(*layout[n]) for n in self.names}
        self.alpha = file_alpha(shapes)
        self._specs = {n: sorted((TensorSpec(k, dt, shape)
                                  for k, (dt, shape) in kohya_layout(n, layout[n][0], layout[n][1], dtype,
                                                                     self.alpha).items()),
                                 key=layout_order) for n in self.names}
        self._ranks = {n: layout[n][1] for n in self.names}
        self._next = 0
        meta = lora_metadata(arch, shapes, self.path.stem, extra_metadata, prediction)
        self._writer = SafetensorsWriter(self.path, [t for n in self.names for t in self._specs[n]], meta,
                                         overwrite, hashed=True)
        self.metadata = self._writer.metadata

    def __enter__(self) -> LoraWriter:
        return self

    def __exit__(self, *exc) -> None:
        self._writer.__exit__(*exc)

    def encode(self, name: str, lr: LowRank) -> dict[str, torch.Tensor]:
        """Module `name`'s tensors as the file holds them, after checking its rank is the one
        announced and that they fit the dtype."""
        if name not in self._ranks:
            raise OrthoLoraError(f"module {name} was not announced", self.path)
        if lr.rank != self._ranks[name]:
            raise OrthoLoraError(f"module {name} has rank {lr.rank}, not the {self._ranks[name]} announced", self.path)
        tensors = lr.to_kohya(name, self.dtype, self.alpha)
        for key, t in tensors.items():
            if not all_finite(t):
                raise OrthoLoraError(f"tensor {key} overflows {torch_name(self.dtype)}; "
                                     "choose a wider output dtype", self.path)
        return tensors

    def write(self, name: str, tensors: Mapping[str, torch.Tensor]) -> None:
        """Write module `name` (the next of `names`) from its `encode`d tensors."""
        if self._next >= len(self.names) or name != self.names[self._next]:
            raise OrthoLoraError(f"module {name} written out of order", self.path)
        for spec in self._specs[name]:
            self._writer.write(spec.name, tensors[spec.name])
        self._next += 1

    def add(self, name: str, lr: LowRank) -> None:
        """Write module `name` (the next of `names`), of the rank announced for it."""
        self.write(name, self.encode(name, lr))

    def close(self) -> dict[str, str]:
        self.metadata = self._writer.close()
        return self.metadata


def write_side_by_side(writers: Sequence[LoraWriter | None], names: Sequence[str],
                       make: Callable[[str], Sequence[LowRank | None]], step: Callable[[str], None]) -> None:
    """Write several LoRA files at once, module by module in `names` order: `make(name)` gives the
    module's LowRank for each writer (None: not in that file); making and encoding run on worker
    threads, the writes in order on this one."""
    def work(name: str) -> tuple[str, list[dict[str, torch.Tensor] | None]]:
        return name, [w.encode(name, lr) if lr is not None else None for w, lr in zip(writers, make(name))]

    for name, encoded in parallel_map(work, names):
        for writer, tensors in zip(writers, encoded):
            if tensors is not None:
                writer.write(name, tensors)
        step(name)


def _meta_lowrank(shape: tuple[int, ...], rank: int) -> LowRank:
    """A LowRank of this shape and rank without data (meta tensors): what the metadata needs."""
    out, inner = matrix_shape(shape)
    return LowRank(torch.empty(out, rank, device="meta"), torch.empty(rank, inner, device="meta"), 1.0, tuple(shape))


def write_lora(path: str | Path, lowranks: dict[str, LowRank], arch: str, dtype: torch.dtype = torch.float16,
               extra_metadata: dict[str, str] | None = None, overwrite: bool = False,
               prediction: str | None = None) -> dict[str, str]:
    """Write kohya-named LoRA tensors (one alpha for the file, balanced factors) atomically; returns
    metadata (`lora_metadata`; `prediction`: the base model's prediction type when known)."""
    with LoraWriter(path, {n: (lr.shape, lr.rank) for n, lr in lowranks.items()}, arch, dtype, extra_metadata,
                    overwrite, prediction) as writer:
        for name in writer.names:
            writer.add(name, lowranks[name])
    return writer.metadata


def carried_metadata(meta: Mapping[str, str], arch: str) -> dict[str, str]:
    """The input's `ss_*` training and `modelspec.*` descriptive metadata that still holds for an
    output made from that one input (resize, diag): nothing lora_metadata recomputes (the prediction
    type is passed on by itself), no ss_network_* (shape), no hashes."""
    recomputed = set(lora_metadata(arch, {}, "", prediction="v"))
    return {k: v for k, v in meta.items()
            if k.startswith(("ss_", "modelspec.")) and "hash" not in k.lower()
            and not k.startswith("ss_network_") and k not in recomputed}


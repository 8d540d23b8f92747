"""Toggle benchmark: switching ``v`` on an already loaded joined LoRA, over every target module of
the architecture; the prompt-time hook's own work and the re-merge it causes, timed separately.

The hook's part is what scripts/ortholora_hook.py does per toggle, run here on its pure parts (the
hook itself needs the webui): parse the spec, one vector per slice layout (``SliceIndex``, built
once per load and timed apart), hand every module its layout's vector and mark its layer for
re-merge (layers are ``nn.Module`` objects, as in the webui). The re-merge is what the webui then
does per layer on its next forward: restore the weight from its backup, add up·diag(v)·down·scale,
on real-shaped float32 weights, one weight/backup pair per distinct shape (memory stays at one
layer of each shape). The joined LoRA has two sources: rank 4–8 (varying with the module) and 4.
"""
from __future__ import annotations

import math
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from ..arch import Arch, spec
from ..diag import apply_diag_to_up, layout_vectors, parse_diag
from ..joinmeta import SliceIndex, join_info_from_metadata, make_join_metadata
from ..keys import targets
from ..lowrank import rel_error
from ..shapes import matrix_shape

SOURCES = [{"name": "style", "file": "style.safetensors", "ratio": 1.0},
           {"name": "krk", "file": "krk.safetensors", "ratio": 1.0}]
SPECS = ("style@1,krk@0", "style@0,krk@1", "krk@0.5", "1*8,0*4")
CHECK = ("style=0.25,krk=2", (0.25, 2.0))
"""A spec and its per-source values, for the accuracy check."""
HOOK_TOGGLES = 200
MERGE_TOGGLES = 3
SAMPLE = 8
DIRTY = object()


def prepare(workdir: Path, arch: str, full: bool) -> dict:
    return {"div": 1 if full else 16}


def _loaded(arch: str, div: int) -> tuple[list, dict]:
    """Module stand-ins (name, factors, layer) of a joined LoRA on every target, and per-shape buffers."""
    g = torch.Generator().manual_seed(0)
    modules, buffers = [], {}
    for i, t in enumerate(targets(Arch(arch), spec(arch, div))):
        ranks = (4 + i % 5, 4)
        inner = matrix_shape(t.shape)[1]
        if t.shape not in buffers:
            w0 = torch.randn(t.shape, generator=g) * 0.02
            buffers[t.shape] = SimpleNamespace(weight=w0.clone(), network_weights_backup=w0)
        r = sum(ranks)
        up = torch.randn(t.shape[0], r, generator=g) * 0.01
        down = torch.randn(r, inner, generator=g) / math.sqrt(inner)
        layer = torch.nn.Module()  # the webui's layer: attribute writes go through nn.Module.__setattr__
        layer.network_weights_backup, layer.network_current_names = buffers[t.shape].network_weights_backup, ()
        modules.append(SimpleNamespace(name=t.name, ranks=ranks, up=up, down=down, scale=1.0 / r,
                                       shape=t.shape, layer=layer, ortholora_v=None))
    return modules, buffers


def _toggle(index: SliceIndex, groups: list[list], text: str) -> None:
    """The hook's per-toggle work (update_network, the webui bookkeeping aside)."""
    vectors = layout_vectors(parse_diag(text), index)
    for mods, v in zip(groups, vectors):
        for m in mods:
            m.ortholora_v = v
            if getattr(m.layer, "network_weights_backup", None) is not None:
                m.layer.network_current_names = DIRTY


def _remerge(modules: list, buffers: dict) -> float:
    """Seconds the webui's lazy merge spends on the dirty layers: W = backup + up·diag(v)·down·scale."""
    seconds = 0.0
    for m in modules:
        buf = buffers[m.shape]
        start = time.perf_counter()
        buf.weight.copy_(buf.network_weights_backup)
        updown = (apply_diag_to_up(m.up, m.ortholora_v) @ m.down).reshape(m.shape) * m.scale
        buf.weight += updown
        seconds += time.perf_counter() - start
        m.layer.network_current_names = ()
    return seconds


def _check(index: SliceIndex, groups: list[list], modules: list, buffers: dict) -> float:
    """After toggling to ``CHECK``: largest relative error of (merged − backup) vs up·diag(v)·down·scale
    on sampled layers, v written out from the per-source values."""
    text, values = CHECK
    _toggle(index, groups, text)
    worst = 0.0
    for m in modules[:: max(1, len(modules) // SAMPLE)]:
        buf = buffers[m.shape]
        _remerge([m], buffers)
        v = torch.tensor([x for x, r in zip(values, m.ranks) for _ in range(r)])
        want = ((m.up * v) @ m.down).reshape(m.shape) * m.scale
        worst = max(worst, rel_error(buf.weight - buf.network_weights_backup, want))
    return worst


def measure(workdir: Path, arch: str, prepared: dict) -> dict:
    modules, buffers = _loaded(arch, prepared["div"])
    info = join_info_from_metadata({"ortholora_join": make_join_metadata(SOURCES, {m.name: m.ranks for m in modules})})
    start = time.perf_counter()
    index = SliceIndex.of(info, [m.name for m in modules])
    by_name = {m.name: m for m in modules}
    groups = [[by_name[n] for n in names] for _, names in index.groups]
    build_ms = (time.perf_counter() - start) * 1000

    hook_ms = []
    for i in range(HOOK_TOGGLES):
        start = time.perf_counter()
        _toggle(index, groups, SPECS[i % len(SPECS)])
        hook_ms.append((time.perf_counter() - start) * 1000)
    merge_s = []
    for i in range(MERGE_TOGGLES):
        _toggle(index, groups, SPECS[i % len(SPECS)])
        merge_s.append(_remerge(modules, buffers))
    return {"modules": len(modules), "layouts": len(index.groups), "index_build_ms": round(build_ms, 2),
            "hook_ms_median": round(statistics.median(hook_ms), 3), "hook_ms_max": round(max(hook_ms), 3),
            "hook_toggles": HOOK_TOGGLES, "remerge_s_median": round(statistics.median(merge_s), 3),
            "remerge_toggles": MERGE_TOGGLES, "max_rel_error_sampled": _check(index, groups, modules, buffers)}

"""Streaming of resize and ortho: each module is read, computed and handed to the streamed writer
(`lorafile.LoraWriter`) one at a time, never a whole output held; the outputs equal exact dense
references; the writer refuses what would break its file."""
from __future__ import annotations

import hashlib
import json
import math
import weakref
from pathlib import Path

import pytest
import safetensors.torch
import torch

from lib_ortholora import lorafile, ortho, resize
from lib_ortholora.errors import OrthoLoraError
from lib_ortholora.fileio import open_tensors
from lib_ortholora.lorafile import LoraWriter, read_lora, write_lora
from lib_ortholora.lowrank import LowRank
from lib_ortholora.ortho import ortho_lora
from lib_ortholora.resize import output_path, resize_files
from lib_ortholora.scores import parse_recipe

from lorautil import lora_tensors, sample_targets, save, tiny_targets

RECIPES = "spn_lora=1,thr=-1.5:fro_lora=1,size=0.05:rank=3"
F32 = torch.float32


def _dense(lr: LowRank) -> torch.Tensor:
    return lr.scale * (lr.up.double().flatten(1) @ lr.down.double().flatten(1))


class Held:
    """Counts the modules handed to LoraWriter.write whose tensors are still alive at each call: an
    operation that collects an output before writing it holds them all."""

    def __init__(self, monkeypatch):
        self.alive: weakref.WeakSet = weakref.WeakSet()
        self.most = self.calls = 0
        write = LoraWriter.write

        def counting(writer, name, tensors):
            self.alive.add(tensors[f"{name}.lora_up.weight"])
            self.calls += 1
            self.most = max(self.most, len(self.alive))
            return write(writer, name, tensors)

        monkeypatch.setattr(LoraWriter, "write", counting)


@pytest.fixture
def lora(tmp_path) -> Path:
    return save(tmp_path / "in.safetensors", lora_tensors(tiny_targets("sd15"), rank=6, alpha=3.0))


def test_resize_writes_module_by_module(lora, tmp_path, monkeypatch):
    names = read_lora(lora).modules.keys()
    held = Held(monkeypatch)
    reads: list[str] = []
    module = lorafile.LoraReader.module
    monkeypatch.setattr(lorafile.LoraReader, "module", lambda r, name: reads.append(name) or module(r, name))
    rep = resize_files([lora], tmp_path / "out", RECIPES, dtype=F32)
    assert len(rep.outputs) == 3 and held.calls >= len(names)
    # two passes over the file (spectra, then the kept directions), each module read once per pass
    assert sorted(reads) == sorted(list(names) * 2)
    # at most the modules in flight (a few per worker) are alive at once, of every output together
    assert held.most <= 3 * 8 < held.calls


def test_resize_outputs_equal_the_dense_truncated_svd(tmp_path):
    """Each layer of each output is the best rank-k approximation of the input layer (k = the row's
    rank), as a float64 SVD of the formed delta gives it."""
    lora = save(tmp_path / "in.safetensors", lora_tensors(sample_targets("sd15", 4), rank=6, alpha=3.0))
    rep = resize_files([lora], tmp_path / "out", RECIPES, dtype=F32)
    source = read_lora(lora).lowranks()
    for recipe in RECIPES.split(":"):
        tag = parse_recipe(recipe).tag
        out = read_lora(output_path(tmp_path / "out", lora.stem, parse_recipe(recipe))).modules
        ranks = {r.module: r.rank for r in rep.rows if r.extra["recipe"] == tag}
        for name, lr in source.items():
            k = ranks[name]
            if not k:
                assert name not in out
                continue
            u, s, vh = torch.linalg.svd(_dense(lr), full_matrices=False)
            want = (u[:, :k] * s[:k]) @ vh[:k]
            got = out[name].delta().double().reshape(want.shape)
            assert float((got - want).norm()) <= 1e-5 * float(s[0]) * math.sqrt(k), (recipe, name)


def test_resize_recomputes_what_it_does_not_keep(lora, tmp_path, monkeypatch):
    """With no room for decompositions between the passes (KEEP_BYTES = 0) the write pass
    decomposes each module again: the same files, byte for byte."""
    kept = resize_files([lora], tmp_path / "kept", RECIPES, dtype=F32)
    monkeypatch.setattr(resize, "KEEP_BYTES", 0)
    again = resize_files([lora], tmp_path / "again", RECIPES, dtype=F32)
    for a, b in zip(kept.outputs, again.outputs):
        with open_tensors(a) as fa, open_tensors(b) as fb:
            assert list(fa.keys()) == list(fb.keys())
            for key in fa.keys():
                assert torch.equal(fa.get(key), fb.get(key)), key


def test_resize_first_pass_keeps_no_factors(lora, tmp_path, monkeypatch):
    seen = {}
    decompose = resize._decompose

    def spy(*args, **kwargs):
        spectra, scales = decompose(*args, **kwargs)
        seen.update(spectra)
        return spectra, scales

    monkeypatch.setattr(resize, "_decompose", spy)
    resize_files([lora], tmp_path / "out", RECIPES, dtype=F32)
    assert seen and all(f.up is None and f.down is None for f in seen.values())


@pytest.mark.parametrize("global_lambda", [False, True])
def test_ortho_writes_module_by_module_and_rebuilds_the_inputs(tmp_path, monkeypatch, global_lambda):
    tgts = tiny_targets("sd15")[::4]
    paths = [save(tmp_path / f"r{i}.safetensors", lora_tensors(tgts, rank=4, seed=10 + i, alpha=2.0))
             for i in range(3)]
    held = Held(monkeypatch)
    rep = ortho_lora(paths, tmp_path / "out", directions=3, global_lambda=global_lambda, dtype=F32)
    assert len(rep.outputs) == 6 and held.calls >= 6 * len(tgts) // 2
    assert held.most <= 6 * 8 < held.calls
    files = {Path(p).stem: read_lora(p) for p in rep.outputs}
    lam = json.loads(files["ortho_shared"].metadata["ortholora_ortho"])["lambda"]
    dirs = [files["ortho_shared"], files["ortho_direction2"], files["ortho_direction3"]]
    for k, path in enumerate(paths):
        source = read_lora(path).lowranks()
        for name, lr in list(source.items())[::3]:
            weights = lam[k] if global_lambda else lam[name][k]
            rebuilt = sum(w * d.modules[name].delta().double().flatten(1) for w, d in zip(weights, dirs)
                          if name in d.modules)
            want = _dense(lr)
            assert float((rebuilt - want).norm()) <= 1e-5 * float(want.norm()), name


def test_ortho_write_pass_takes_the_ranks_of_its_plan(tmp_path, monkeypatch):
    """The write pass forms each output with the rank the first pass reported, even when a policy
    decided it: the header announced those ranks."""
    paths = [save(tmp_path / f"r{i}.safetensors", lora_tensors(tiny_targets("sd15"), rank=4, seed=i))
             for i in range(2)]
    rep = ortho_lora(paths, tmp_path / "out", rank="fro=0.9", dtype=F32)
    shared = read_lora(next(p for p in rep.outputs if p.endswith("ortho_shared.safetensors")))
    assert {r.module: r.rank for r in rep.rows if r.rank} == {n: m.rank for n, m in shared.modules.items()}


# ---------------------------------------------------------------------------------------------
# The streamed LoRA writer


def _lowranks(n: int = 4, seed: int = 0) -> dict[str, LowRank]:
    g = torch.Generator().manual_seed(seed)
    tgts = tiny_targets("sd15")[:n]
    return {t.name: LowRank(torch.randn(t.shape[0], 2 + i, generator=g),
                            torch.randn(2 + i, math.prod(t.shape[1:]), generator=g), 0.5, t.shape)
            for i, t in enumerate(tgts)}


def test_lora_writer_layout_is_safetensors_own(tmp_path):
    """A file written module by module has the data section safetensors' own writer gives the same
    tensors (dtype, then name order), and its sshs hash is the sha256 of that data."""
    lowranks = _lowranks()
    meta = write_lora(tmp_path / "a.safetensors", lowranks, "sd15", F32)
    alpha = lorafile.file_alpha(lowranks)
    tensors = {k: v for n, lr in lowranks.items() for k, v in lr.to_kohya(n, F32, alpha).items()}
    blob = (tmp_path / "a.safetensors").read_bytes()
    ours = blob[8 + int.from_bytes(blob[:8], "little"):]
    theirs = safetensors.torch.save(tensors)
    assert ours == theirs[8 + int.from_bytes(theirs[:8], "little"):]
    assert meta["sshs_model_hash"] == hashlib.sha256(ours).hexdigest()


def test_lora_writer_refuses_out_of_order_and_unannounced_ranks(tmp_path):
    lowranks = _lowranks()
    layout = {n: (lr.shape, lr.rank) for n, lr in lowranks.items()}
    target = tmp_path / "w.safetensors"
    with pytest.raises(OrthoLoraError, match="out of order"):
        with LoraWriter(target, layout, "sd15", F32) as w:
            w.add(w.names[1], lowranks[w.names[1]])
    assert not target.exists() and not list(tmp_path.iterdir())
    with pytest.raises(OrthoLoraError, match="announced"):
        with LoraWriter(target, layout, "sd15", F32) as w:
            first = w.names[0]
            w.add(first, LowRank(torch.ones(lowranks[first].shape[0], 3), torch.ones(3, lowranks[first].down.shape[1]),
                                 1.0, lowranks[first].shape))
    with pytest.raises(OrthoLoraError, match="never written"):
        with LoraWriter(target, layout, "sd15", F32) as w:
            w.add(w.names[0], lowranks[w.names[0]])
    assert not target.exists() and not list(tmp_path.iterdir())  # no output, no temp file left

"""scripts/ortholora_hook.py against the webui stand-in in tests/webui_stub (see its README.md)."""
from __future__ import annotations

import importlib.util
import logging
import os
import sys
import types
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F

from lib_ortholora.diag import make_join_metadata

HOOK = Path(__file__).resolve().parents[1] / "scripts" / "ortholora_hook.py"

SOURCES = [{"name": "disney", "file": "disney.safetensors", "ratio": 1.0},
           {"name": "krk", "file": "krk.safetensors", "ratio": 0.7}]
R1, R2 = 4, 2
ALPHA = 3.0  # scale = alpha / rank = 0.5


def _import_hook():
    spec = importlib.util.spec_from_file_location("ortholora_hook", HOOK)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["ortholora_hook"] = mod
    spec.loader.exec_module(mod)
    return mod


class Webui(types.SimpleNamespace):
    def generate(self, prompt, which=None, p=None, webui_errors=False):
        """One batch: parse the prompt's tags, activate (→ our script), then forward target layers."""
        p = p or self.processing.StableDiffusionProcessing(prompt, scripts=self.runner)
        self.errors.recorded.clear()
        p.activate_extra_networks()
        assert webui_errors or not self.errors.recorded, self.errors.recorded
        out = self.model.run(which)
        return p, out


@pytest.fixture
def webui(stub_path, tmp_path):
    from modules import shared
    lora_dir = tmp_path / "Lora"
    lora_dir.mkdir()
    shared.cmd_opts.lora_dir = str(lora_dir)  # before `networks` lists the folder at import

    import extra_networks_lora
    import lora_patches
    import networks
    import stub_model
    from modules import errors, extra_networks, processing, script_callbacks, scripts

    model = stub_model.TinySD()
    shared.sd_model = model
    networks.assign_network_names_to_compvis_modules(model)
    networks.originals = lora_patches.LoraPatches()
    try:
        extra_networks.initialize()
        extra_networks_lora.register()
        hook = _import_hook()
        runner = scripts.ScriptRunner([hook.OrthoLoraScript()])
        w = Webui(shared=shared, networks=networks, errors=errors, processing=processing, hook=hook,
                  runner=runner, model=model, lora_dir=lora_dir, stub_model=stub_model,
                  script_callbacks=script_callbacks,
                  W0={k: layer.weight.detach().clone() for k, layer in model.layers().items()},
                  B0={k: layer.bias.detach().clone() for k, layer in model.layers().items()})
        errors.recorded.clear()
        yield w
    finally:
        networks.originals.undo()


# --------------------------------------------------------------------------- LoRA files


def lora_tensors(model, ranks, seed=0):
    """kohya tensors for the three target layers; returns (tensors, {name: (up2d, down2d)})."""
    g = torch.Generator().manual_seed(seed)
    tensors, factors = {}, {}
    for name, layer in model.layers().items():
        r = sum(ranks[name]) if isinstance(ranks, dict) else ranks
        out_f = layer.weight.shape[0]
        if layer.weight.dim() == 4:
            in_f, k = layer.weight.shape[1], layer.weight.shape[2]
            down = torch.randn(r, in_f, k, k, generator=g)
            up = torch.randn(out_f, r, 1, 1, generator=g)
        else:
            down = torch.randn(r, layer.weight.shape[1], generator=g)
            up = torch.randn(out_f, r, generator=g)
        tensors[f"{name}.lora_down.weight"] = down
        tensors[f"{name}.lora_up.weight"] = up
        tensors[f"{name}.alpha"] = torch.tensor(ALPHA)
        factors[name] = (up.reshape(out_f, r), down.reshape(r, -1))
    return tensors, factors


def write_joined(w, stem="joined", ranks=None, seed=0, extra_meta=None):
    ranks = ranks or {k: [R1, R2] for k in w.model.layers()}
    tensors, factors = lora_tensors(w.model, ranks, seed)
    meta = {"ortholora_join": make_join_metadata(SOURCES, ranks), "ss_network_dim": str(R1 + R2)}
    meta.update(extra_meta or {})
    safetensors.torch.save_file(tensors, str(w.lora_dir / f"{stem}.safetensors"), metadata=meta)
    return factors


def write_plain(w, stem="plain", rank=3, seed=5, only=None):
    tensors, factors = lora_tensors(w.model, rank, seed)
    if only:
        tensors = {k: t for k, t in tensors.items() if k.split(".")[0] in only}
        factors = {k: f for k, f in factors.items() if k in only}
    safetensors.torch.save_file(tensors, str(w.lora_dir / f"{stem}.safetensors"),
                                metadata={"ss_network_dim": str(rank)})
    return factors


def expected(w, factors, v, te=1.0, unet=1.0, rank=R1 + R2, dyn=None):
    """{name: W + up·diag(v)·down·(alpha/rank)·multiplier} (v None = all ones)."""
    out = {}
    for name, (up, down) in factors.items():
        vv = torch.ones(up.shape[1]) if v is None else torch.as_tensor(v[name] if isinstance(v, dict) else v,
                                                                         dtype=torch.float32)
        u, d = up * vv, down
        if dyn is not None:
            u, d = u[:, :dyn], d[:dyn]
        mult = te if name.startswith("lora_te") else unet
        out[name] = w.W0[name] + (u @ d).reshape(w.W0[name].shape) * (ALPHA / rank) * mult
    return out


def assert_weights(w, want, atol=1e-5):
    layers = w.model.layers()
    for name, W in want.items():
        assert torch.allclose(layers[name].weight, W, atol=atol), name


def hook_records(caplog):
    return [r for r in caplog.records if r.name == "ortholora"]


# --------------------------------------------------------------------------- tests


def test_module_type_first_and_installed_once(webui):
    hook, networks = webui.hook, webui.networks
    assert isinstance(networks.module_types[0], hook.ModuleTypeOrthoLora)
    hook.install()
    assert sum(isinstance(t, hook.ModuleTypeOrthoLora) for t in networks.module_types) == 1
    webui.script_callbacks.script_unloaded_callback()
    assert not any(getattr(t, "ortholora", False) for t in networks.module_types)


@pytest.mark.parametrize("tag, v, te, unet, dyn", [
    ("<lora:joined:0.5:1.5:v=1*4,0*2>", [1, 1, 1, 1, 0, 0], 0.5, 1.5, None),
    ("<lora:joined:1:v=0.5,-1,0,2,1,0.25>", [0.5, -1, 0, 2, 1, 0.25], 1.0, 1.0, None),
    ("<lora:joined:0.8:v=krk@0>", [1, 1, 1, 1, 0, 0], 0.8, 0.8, None),
    ("<lora:joined:1:v=disney@0.5,krk@2>", [0.5] * 4 + [2, 2], 1.0, 1.0, None),
    ("<lyco:joined:1:v=0*4,1*2>", [0, 0, 0, 0, 1, 1], 1.0, 1.0, None),
    ("<lora:joined:1:1:5:v=0,1*5>", [0, 1, 1, 1, 1, 1], 1.0, 1.0, 5),  # dyn keeps the first 5 ranks
])
def test_merge_matches_formula(webui, tag, v, te, unet, dyn):
    factors = write_joined(webui)
    webui.generate(f"a photo {tag}")
    assert_weights(webui, expected(webui, factors, v, te=te, unet=unet, dyn=dyn))
    net = webui.networks.loaded_networks[0]
    assert all(isinstance(m, webui.hook.OrthoLoraModule) for m in net.modules.values())
    layers = webui.model.layers()
    for name in layers:  # biases untouched
        assert torch.equal(layers[name].bias, webui.B0[name])


def test_slice_with_equals_breaks_the_builtin_batch(webui):
    """Why '@' exists: the webui files `v=disney=0.5` as a positional multiplier and float() fails."""
    write_joined(webui)
    webui.generate("<lora:joined:1:v=disney=0.5>", webui_errors=True)
    assert any("could not convert" in e for e in webui.errors.recorded)
    assert webui.networks.loaded_networks == []
    assert_weights(webui, webui.W0, atol=0)


def test_v_change_without_reload(webui, monkeypatch):
    factors = write_joined(webui)
    loads = []
    real_load = webui.networks.load_network
    monkeypatch.setattr(webui.networks, "load_network", lambda *a: loads.append(a) or real_load(*a))

    webui.generate("<lora:joined:1:v=1*4,0*2>")
    net = webui.networks.loaded_networks[0]
    assert_weights(webui, expected(webui, factors, [1] * 4 + [0] * 2))

    webui.generate("<lora:joined:1:v=0*4,1*2>")
    assert webui.networks.loaded_networks[0] is net and len(loads) == 1
    assert_weights(webui, expected(webui, factors, [0] * 4 + [1] * 2))

    webui.generate("<lora:joined:1:v=disney@0.25>")
    assert_weights(webui, expected(webui, factors, [0.25] * 4 + [1] * 2))

    webui.generate("<lora:joined:1>")  # v removed → the plain joined LoRA
    assert_weights(webui, expected(webui, factors, None))

    webui.generate("<lora:joined:1:v=1*4,0*2>")
    assert_weights(webui, expected(webui, factors, [1] * 4 + [0] * 2))
    assert len(loads) == 1

    webui.generate("no lora")
    assert_weights(webui, webui.W0, atol=0)


def test_stub_keeps_stale_weights_without_invalidation(webui, monkeypatch):
    """The stand-in's stale-weight rule is real: a hook that does not invalidate would fail above."""
    factors = write_joined(webui)
    webui.generate("<lora:joined:1:v=1*4,0*2>")
    monkeypatch.setattr(webui.hook, "mark_dirty", lambda layer: False)
    webui.generate("<lora:joined:1:v=0*4,1*2>")
    assert_weights(webui, expected(webui, factors, [1] * 4 + [0] * 2))  # old v still merged


def test_layer_not_forwarded_keeps_no_stale_merge(webui):
    """A layer marked dirty but not run (e.g. cached text-encoder conds) must not keep a merge later."""
    factors = write_joined(webui)
    te = webui.stub_model.TE_LINEAR
    unet = [k for k in webui.model.layers() if k != te]
    webui.generate("<lora:joined:1:v=1*4,0*2>")
    webui.generate("<lora:joined:1:v=0*4,1*2>", which=unet)
    webui.generate("no lora")
    assert_weights(webui, webui.W0, atol=0)
    webui.generate("<lora:joined:1:v=0*4,1*2>")
    assert_weights(webui, expected(webui, factors, [0] * 4 + [1] * 2))


def test_rewritten_file_is_remerged(webui):
    write_joined(webui, seed=0)
    webui.generate("<lora:joined:1:v=krk@0>")
    path = webui.lora_dir / "joined.safetensors"
    factors = write_joined(webui, seed=9)
    st = path.stat()
    os.utime(path, (st.st_atime, st.st_mtime + 10))
    webui.generate("<lora:joined:1>")  # same name and multipliers: only the new object tells
    assert_weights(webui, expected(webui, factors, None))
    webui.generate("<lora:joined:1:v=krk@0>")
    assert_weights(webui, expected(webui, factors, [1] * 4 + [0] * 2))


def test_infotext_carries_v(webui):
    write_joined(webui)
    write_joined(webui, stem="other", seed=3)
    p, _ = webui.generate("<lora:joined:1:v=1,1,1,1,0,0> <lora:other:0.5:v=krk@0.5>")
    assert p.extra_generation_params["OrthoLoRA v"] == "joined: 1*4,0*2; other: krk@0.5"
    p, _ = webui.generate("<lora:joined:1>")
    assert "OrthoLoRA v" not in p.extra_generation_params


@pytest.mark.parametrize("bad", ["1*3", "pixar@0", "1,,0", "x", "1*99999999", "disney@1,0"])
def test_malformed_v_logs_once_and_stays_plain(webui, caplog, bad):
    factors = write_joined(webui)
    webui.generate("<lora:joined:1:v=0*6>")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        p, _ = webui.generate(f"<lora:joined:1:v={bad}>")
    recs = hook_records(caplog)
    assert len(recs) == 1, [r.getMessage() for r in recs]
    msg = recs[0].getMessage()
    assert "\n" not in msg and "joined" in msg and "plain" in msg
    assert webui.errors.recorded == []  # nothing was raised into the webui
    assert_weights(webui, expected(webui, factors, None))
    assert "OrthoLoRA v" not in p.extra_generation_params
    # the same problem in the same run is not repeated
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        webui.generate(f"<lora:joined:1:v={bad}>", p=p)
    assert hook_records(caplog) == []


def test_per_rank_length_names_module(webui, caplog):
    ranks = {name: ([0, 2] if name.startswith("lora_te") else [R1, R2]) for name in webui.model.layers()}
    write_joined(webui, ranks=ranks)
    with caplog.at_level(logging.WARNING):
        webui.generate("<lora:joined:1:v=1*6>")
    (rec,) = hook_records(caplog)
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in rec.getMessage()


def test_per_slice_with_missing_source_module(webui):
    ranks = {name: ([0, 2] if name.startswith("lora_te") else [R1, R2]) for name in webui.model.layers()}
    factors = write_joined(webui, ranks=ranks)
    webui.generate("<lora:joined:1:v=disney@0,krk@3>")
    v = {name: ([3, 3] if name.startswith("lora_te") else [0] * 4 + [3, 3]) for name in factors}
    for name, (up, down) in factors.items():
        r = up.shape[1]
        W = webui.W0[name] + ((up * torch.tensor(v[name], dtype=torch.float32)) @ down).reshape(
            webui.W0[name].shape) * (ALPHA / r)
        assert torch.allclose(webui.model.layers()[name].weight, W, atol=1e-5), name


def test_hook_never_raises(webui, caplog, monkeypatch):
    write_joined(webui)

    def boom(*a, **k):
        raise ValueError("kaput")

    monkeypatch.setattr(webui.hook, "parse_diag", boom)
    script = webui.runner.alwayson_scripts[0]
    p = webui.processing.StableDiffusionProcessing("<lora:joined:1:v=1*6>", scripts=None)
    p.activate_extra_networks()
    with caplog.at_level(logging.WARNING):
        script.after_extra_networks_activate(p, batch_number=0, prompts=p.prompts, seeds=[0], subseeds=[0],
                                             extra_network_data=p.extra_network_data)
        script.after_extra_networks_activate(p)  # no extra_network_data at all
        script.after_extra_networks_activate(None, extra_network_data={"lora": [object(), None]})
    assert any("kaput" in r.getMessage() for r in hook_records(caplog))


def test_functional_mode_same_outputs(webui):
    factors = write_joined(webui)
    xs = webui.model.inputs()
    layers = webui.model.layers()
    merged = {}
    for tag in (":v=1*4,0*2", ":v=krk@-1", ""):
        webui.generate(f"<lora:joined:0.5:2{tag}>")
        merged[tag] = {k: layers[k](xs[k]).clone() for k in layers}
    webui.generate("no lora")
    webui.shared.opts.lora_functional = True
    vs = {":v=1*4,0*2": [1] * 4 + [0] * 2, ":v=krk@-1": [1] * 4 + [-1, -1], "": None}
    for tag, v in vs.items():
        _, out = webui.generate(f"<lora:joined:0.5:2{tag}>")
        want = expected(webui, factors, v, te=0.5, unet=2.0)
        for k, layer in layers.items():
            assert torch.equal(layer.weight, webui.W0[k])  # functional mode never merges
            if layer.weight.dim() == 4:
                ref = F.conv2d(xs[k], want[k], webui.B0[k], padding=1)
            else:
                ref = F.linear(xs[k], want[k], webui.B0[k])
            assert torch.allclose(out[k], ref, atol=1e-4), (tag, k)
            assert torch.allclose(out[k], merged[tag][k], atol=1e-4), (tag, k)


def test_non_joined_lora_untouched(webui, caplog):
    from network_lora import NetworkModuleLora
    plain = write_plain(webui)
    with caplog.at_level(logging.WARNING):
        webui.generate("<lora:plain:1:v=0*3>")
    net = webui.networks.loaded_networks[0]
    assert all(type(m) is NetworkModuleLora for m in net.modules.values())
    assert_weights(webui, expected(webui, plain, None, rank=3))
    (rec,) = hook_records(caplog)
    assert "not a joined LoRA" in rec.getMessage()


def test_only_the_changed_lora_is_marked_dirty(webui):
    te, conv, lin = (webui.stub_model.TE_LINEAR, webui.stub_model.UNET_CONV, webui.stub_model.UNET_LINEAR)
    ranks = {te: [R1, R2], lin: [R1, R2]}
    tensors, jf = lora_tensors(webui.model, {**ranks, conv: [R1, R2]}, 0)
    tensors = {k: t for k, t in tensors.items() if not k.startswith(conv)}
    safetensors.torch.save_file(tensors, str(webui.lora_dir / "joined.safetensors"),
                                metadata={"ortholora_join": make_join_metadata(SOURCES, ranks)})
    pf = write_plain(webui, only={conv})
    webui.generate("<lora:joined:1:v=1*6> <lora:plain:1>")
    p = webui.processing.StableDiffusionProcessing("<lora:joined:1:v=0*6> <lora:plain:1>", scripts=webui.runner)
    p.activate_extra_networks()
    layers = webui.model.layers()
    assert layers[te].network_current_names == webui.hook.DIRTY
    assert layers[lin].network_current_names == webui.hook.DIRTY
    assert layers[conv].network_current_names != webui.hook.DIRTY
    webui.model.run()
    want = expected(webui, {k: jf[k] for k in (te, lin)}, [0] * 6)
    want.update(expected(webui, pf, None, rank=3))
    assert_weights(webui, want)


def test_setting_off_gives_plain(webui):
    factors = write_joined(webui)
    webui.generate("<lora:joined:1:v=0*6>")
    webui.shared.opts.ortholora_hook_enabled = False
    p, _ = webui.generate("<lora:joined:1:v=0*6>")
    assert_weights(webui, expected(webui, factors, None))
    assert "OrthoLoRA v" not in p.extra_generation_params
    webui.shared.opts.ortholora_hook_enabled = True
    webui.generate("<lora:joined:1:v=0*6>")
    assert_weights(webui, webui.W0)


def test_metadata_decoded_by_webui_and_malformed_metadata(webui, caplog):
    net_meta = webui.networks  # the stub, like the webui, JSON-decodes '{…' metadata strings
    factors = write_joined(webui)
    webui.generate("<lora:joined:1:v=krk@0>")
    assert isinstance(net_meta.loaded_networks[0].network_on_disk.metadata["ortholora_join"], dict)
    assert_weights(webui, expected(webui, factors, [1] * 4 + [0] * 2))

    factors = write_joined(webui, stem="broken", extra_meta={"ortholora_join": '{"version": 7}'})
    with caplog.at_level(logging.WARNING):
        webui.generate("<lora:broken:1:v=krk@0>")
    assert_weights(webui, expected(webui, factors, None))
    assert any("broken" in r.getMessage() for r in hook_records(caplog))


@pytest.mark.parametrize("networks_module", [None, types.ModuleType("networks")])
def test_hook_off_without_a1111_runtime(stub_path, caplog, networks_module):
    """Forge ships a `networks` module without module_types; a webui without Lora has none."""
    sys.modules["networks"] = networks_module  # None makes `import networks` fail
    with caplog.at_level(logging.WARNING):
        hook = _import_hook()
    assert hook.HOOK_AVAILABLE is False
    (rec,) = hook_records(caplog)
    assert "hook is off" in rec.getMessage()
    script = hook.OrthoLoraScript()
    from modules import processing
    p = processing.StableDiffusionProcessing("<lora:x:1:v=1>")
    script.after_extra_networks_activate(p, extra_network_data={})
    assert p.extra_generation_params == {}


def test_small_helpers(stub_path):
    from modules.extra_networks import ExtraNetworkParams
    from modules.shared import opts  # noqa: F401  (stub present; networks not needed here)
    sys.modules["networks"] = None
    hook = _import_hook()
    assert hook.find_v(["n", "1", "v=1*4,0*2"]) == "1*4,0*2"
    assert hook.find_v(["n", " v =a=1"]) == "a=1"
    assert hook.find_v(["n", "v=1", "v=0"]) == "0"
    assert hook.find_v(["v=1"]) is None  # the name slot is not an item
    assert hook.find_v(["n", 1.0, "te=1"]) is None
    data = {"lora": [ExtraNetworkParams(["a", "v=1"]), ExtraNetworkParams(["b"]), ExtraNetworkParams(["a"])],
            "lyco": [ExtraNetworkParams(["c", "0.5", "v=x@1"])], "hypernet": [ExtraNetworkParams(["h", "v=9"])]}
    assert hook.requested_specs(data) == {"a": "1", "b": None, "c": "x@1"}
    assert hook.requested_specs(None) == {}
    layer = torch.nn.Linear(2, 2)
    assert hook.mark_dirty(layer) is False and not hasattr(layer, "network_current_names")
    layer.network_weights_backup = layer.weight.detach().clone()
    assert hook.mark_dirty(layer) is True and layer.network_current_names == hook.DIRTY

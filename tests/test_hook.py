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

from lib_ortholora.joinmeta import make_join_metadata

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

    def process(self, prompt, webui_errors=False, scripts=None, **kwargs):
        """A whole generation through process_images (txt2img, hires fix when enable_hr=True).
        Returns (p, the merged weights seen in each pass)."""
        p = self.processing.StableDiffusionProcessingTxt2Img(prompt, scripts=scripts or self.runner, **kwargs)
        passes = []

        def sample(p):
            self.model.run()
            passes.append({k: w.detach().clone() for k, w in self.model.weights().items()})

        self.errors.recorded.clear()
        self.processing.process_images(p, sample)
        assert webui_errors or not self.errors.recorded, self.errors.recorded
        return p, passes


@pytest.fixture
def webui(stub_path, tmp_path, request):
    """The stand-in webui with a tiny model: SD1 by default, or the arch given as the fixture's param."""
    from modules import shared
    lora_dir = tmp_path / "Lora"
    lora_dir.mkdir()
    shared.cmd_opts.lora_dir = str(lora_dir)  # before `networks` lists the folder at import

    import extra_networks_lora
    import lora_patches
    import networks
    import stub_model
    from modules import errors, extra_networks, processing, script_callbacks, scripts

    model = stub_model.MODELS[getattr(request, "param", "sd1")]()
    shared.sd_model = model
    networks.assign_network_names_to_compvis_modules(model)
    networks.originals = lora_patches.LoraPatches()
    try:
        extra_networks.initialize()
        extra_networks_lora.register()
        hook = _import_hook()
        runner = scripts.ScriptRunner([hook.OrthoLoraScript()])
        w = Webui(shared=shared, networks=networks, errors=errors, processing=processing, hook=hook,
                  runner=runner, model=model, lora_dir=lora_dir, stub_model=stub_model, scripts=scripts,
                  script_callbacks=script_callbacks,
                  W0={k: t.detach().clone() for k, t in model.weights().items()},
                  B0={k: layer.bias.detach().clone() for k, layer in model.layers().items() if hasattr(layer, "bias")})
        errors.recorded.clear()
        yield w
    finally:
        networks.originals.undo()


# --------------------------------------------------------------------------- LoRA files


def lora_tensors(model, ranks, seed=0):
    """kohya tensors for the model's targets; returns (tensors, {name: (up2d, down2d)})."""
    g = torch.Generator().manual_seed(seed)
    tensors, factors = {}, {}
    for name, weight in model.weights().items():
        r = sum(ranks[name]) if isinstance(ranks, dict) else ranks
        out_f = weight.shape[0]
        if weight.dim() == 4:
            in_f, k = weight.shape[1], weight.shape[2]
            down = torch.randn(r, in_f, k, k, generator=g)
            up = torch.randn(out_f, r, 1, 1, generator=g)
        else:
            down = torch.randn(r, weight.shape[1], generator=g)
            up = torch.randn(out_f, r, generator=g)
        tensors[f"{name}.lora_down.weight"] = down
        tensors[f"{name}.lora_up.weight"] = up
        tensors[f"{name}.alpha"] = torch.tensor(ALPHA)
        factors[name] = (up.reshape(out_f, r), down.reshape(r, -1))
    return tensors, factors


def write_joined(w, stem="joined", ranks=None, seed=0, extra_meta=None, sources=SOURCES):
    ranks = ranks or {k: [R1, R2] for k in w.model.weights()}
    tensors, factors = lora_tensors(w.model, ranks, seed)
    meta = {"ortholora_join": make_join_metadata(sources, ranks), "ss_network_dim": str(R1 + R2)}
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


def touch_later(path, seconds=10):
    """Move a file's mtime forward, as a rewrite a moment later would."""
    st = path.stat()
    os.utime(path, (st.st_atime, st.st_mtime + seconds))


def delta(w, factors, v, te=1.0, unet=1.0, rank=None, dyn=None):
    """{name: up·diag(v)·down·(alpha/rank)·multiplier} (v None = all ones; rank None = the module's)."""
    out = {}
    for name, (up, down) in factors.items():
        vv = torch.ones(up.shape[1]) if v is None else torch.as_tensor(v[name] if isinstance(v, dict) else v,
                                                                         dtype=torch.float32)
        u, d = up * vv, down
        if dyn is not None:
            u, d = u[:, :dyn], d[:dyn]
        mult = te if name.startswith("lora_te") else unet
        out[name] = (u @ d).reshape(w.W0[name].shape) * (ALPHA / (rank or up.shape[1])) * mult
    return out


def expected(w, factors, v, te=1.0, unet=1.0, rank=None, dyn=None):
    """{name: W + up·diag(v)·down·(alpha/rank)·multiplier} (v None = all ones)."""
    return {k: w.W0[k] + d for k, d in delta(w, factors, v, te, unet, rank, dyn).items()}


def assert_weights(w, want, atol=1e-5, got=None):
    got = got or w.model.weights()
    for name, W in want.items():
        assert torch.allclose(got[name], W, atol=atol), name


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


def test_slice_with_equals_breaks_the_builtin_batch(webui, caplog):
    """The failure our prompt fix prevents, reproduced in the stand-in as in the real 1.10.1: an item
    with two '=' is positional, float() fails, the whole lora activation is lost (the unrelated
    plain LoRA too), and the hook has nothing to say because it never sees a loaded network."""
    write_joined(webui)
    write_plain(webui)
    without_hook = webui.scripts.ScriptRunner([])
    with caplog.at_level(logging.WARNING):
        webui.process("<lora:joined:1:v=disney=0.5> <lora:plain:1>", scripts=without_hook, webui_errors=True)
    assert any("could not convert" in e for e in webui.errors.recorded)
    assert webui.networks.loaded_networks == []
    assert_weights(webui, webui.W0, atol=0)
    assert hook_records(caplog) == []


@pytest.mark.parametrize("tag, fixed", [
    ("<lora:joined:1:v=disney=0.5,krk=0>", "<lora:joined:1:v=disney@0.5,krk@0>"),
    ("<lora:joined:1:v=disney@0.5,krk@0>", "<lora:joined:1:v=disney@0.5,krk@0>"),
    ("<lora:joined:v=disney=0.5,krk=0>", "<lora:joined:v=disney@0.5,krk@0>"),
    ("<lora:joined:1:1:v=disney = 0.5, krk= 0>", "<lora:joined:1:1:v=disney @ 0.5, krk@ 0>"),
    ("<lyco:joined:1:v=krk=0,disney=0.5>", "<lyco:joined:1:v=krk@0,disney@0.5>"),
    ("<lora:joined:1:v=disney=0.5,krk@0>", "<lora:joined:1:v=disney@0.5,krk@0>"),
])
def test_slice_with_equals_works_and_nothing_else_changes(webui, caplog, tag, fixed):
    """Both per-slice spellings apply; only the v item of lora/lyco tags is rewritten (before parsing),
    in every batch, in tags a style brought; negative prompts (never parsed for networks) stay."""
    jf, pf = write_joined(webui), write_plain(webui)
    webui.shared.prompt_styles.styles["st"] = ("{prompt}, <lora:plain:0.5:v=x=1>", "")
    with caplog.at_level(logging.WARNING):
        p, _ = webui.process(f"a <hypernet:h:v=a=1>, {tag} b=c, <lora:plain:1>", n_iter=2,
                             negative_prompt=f"neg {tag}", styles=["st"])
    want_prompt = f"a <hypernet:h:v=a=1>, {fixed} b=c, <lora:plain:1>, <lora:plain:0.5:v=x@1>"
    assert p.all_prompts == [want_prompt] * 2 and p.main_prompt == want_prompt
    assert p.all_negative_prompts == [f"neg {tag}"] * 2
    assert [i["Prompt"] for i in p.infotexts] == [[want_prompt]] * 2
    # the webui applies the last of two tags of one LoRA twice: here plain at 0.5, twice
    want = expected(webui, jf, [0.5] * 4 + [0, 0])
    for name, d in delta(webui, pf, None, unet=0.5, te=0.5, rank=3).items():
        want[name] = want[name] + 2 * d
    assert_weights(webui, want)
    assert p.infotexts[1]["OrthoLoRA v"] == "joined: " + ("krk@0,disney@0.5" if "krk=0,d" in tag else "disney@0.5,krk@0")
    msgs = [r.getMessage() for r in hook_records(caplog)]
    assert len(msgs) == 1 and "plain" in msgs[0] and "not a joined LoRA" in msgs[0], msgs


def test_rewrite_prompt_only_touches_v_items(stub_path):
    sys.modules["networks"] = None
    hook = _import_hook()
    rw = hook.rewrite_prompt
    assert rw("<lora:j:1:v=a=1,b=0>") == "<lora:j:1:v=a@1,b@0>"
    assert rw("<lyco:j: v =a=1:te=0.5>") == "<lyco:j: v =a@1:te=0.5>"
    for same in ("<lora:j:1:v=1*4,0*2>", "<lora:j:1:v=a@1>", "<hypernet:j:v=a=1>", "<lora:j:te=1:unet=0>",
                 "no tags v=a=1", "<lora:v=a=1>", "<lora:j:w=a=1>", "<LORA:j:v=a=1>", "<lora:j:1:vv=a=1>"):
        assert rw(same) == same
    text = "x <lora:a:1:v=s=1> y <lora:b:0.5:v=t=0,u=2>, (z:1.2) <lora:c>"
    assert rw(text) == "x <lora:a:1:v=s@1> y <lora:b:0.5:v=t@0,u@2>, (z:1.2) <lora:c>"
    assert rw(rw(text)) == rw(text)


def test_prompt_fix_covers_hires_and_batch_prompts(webui):
    """Lists another script fills later (all_hr_prompts, the batch's prompts) are fixed before parsing."""
    jf = write_joined(webui)
    p, passes = webui.process("<lora:joined:1:v=krk=0>", enable_hr=True, hr_prompt="<lora:joined:1:v=disney=0>")
    assert p.all_hr_prompts == ["<lora:joined:1:v=disney@0>"]
    assert_weights(webui, expected(webui, jf, [1] * 4 + [0] * 2), got=passes[0])
    assert_weights(webui, expected(webui, jf, [0] * 4 + [1] * 2), got=passes[1])

    class Wildcards(webui.scripts.Script):  # fills the batch's prompt after our process() ran
        def title(self):
            return "wildcards"

        def show(self, is_img2img):
            return webui.scripts.AlwaysVisible

        def before_process_batch(self, p, *args, **kwargs):
            p.prompts[0] = "<lora:joined:1:v=krk=2>"

    runner = webui.scripts.ScriptRunner([Wildcards(), *webui.runner.alwayson_scripts])
    webui.process("anything", scripts=runner)
    assert_weights(webui, expected(webui, jf, [1] * 4 + [2] * 2))


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


def test_per_rank_on_varying_ranks(webui, caplog):
    """TE lacks source 1 (0+2), the conv has 2 of its 4 ranks (2+2): a v of the full 4+2 ranks
    applies where that is unambiguous, and is refused with the reason where it is not."""
    te, lin, conv = webui.stub_model.TE_LINEAR, webui.stub_model.UNET_LINEAR, webui.stub_model.UNET_CONV
    factors = write_joined(webui, ranks={te: [0, R2], lin: [R1, R2], conv: [2, R2]})
    webui.generate("<lora:joined:1:v=1*4,0.5*2>")
    assert_weights(webui, expected(webui, factors, {te: [0.5] * 2, lin: [1] * 4 + [0.5] * 2, conv: [1, 1, 0.5, 0.5]}))
    for v, why in (("1,0,1,1,0.5*2", f"{conv} has 2 of source disney's 4 ranks and v varies"),
                   ("1*5", f"module {te} has rank 2 (0+2); a per-rank v needs the module's rank or the sources' "
                           "full ranks 4+2 = 6")):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            webui.generate(f"<lora:joined:1:v={v}>")
        (rec,) = hook_records(caplog)
        assert why in rec.getMessage() and "plain" in rec.getMessage()
        assert_weights(webui, expected(webui, factors, None))


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
    assert hook.requested_specs(data) == {"a": ["1", None], "b": [None], "c": ["x@1"]}
    data = {"lyco": [ExtraNetworkParams(["a", "v=2"])], "lora": [ExtraNetworkParams(["a", "v=1"])]}
    assert hook.requested_specs(data) == {"a": ["2", "1"]}  # the webui's order: kinds as first seen
    assert hook.requested_specs(None) == {}
    layer = torch.nn.Linear(2, 2)
    assert hook.mark_dirty(layer) is False and not hasattr(layer, "network_current_names")
    layer.network_weights_backup = layer.weight.detach().clone()
    assert hook.mark_dirty(layer) is True and layer.network_current_names == hook.DIRTY


# --------------------------------------------------------------------------- issue 11 §3/§4


def test_rewritten_file_uses_the_layout_of_its_bytes(webui):
    """`join --overwrite` outside the webui: same total rank, sources in a new order. The webui
    reloads the weights (newer mtime) but its NetworkOnDisk keeps the old metadata; a Refresh
    afterwards does not reload the network. The layout must follow the bytes every time."""
    write_joined(webui)  # disney 4 + krk 2
    webui.generate("<lora:joined:1:v=krk@0>")
    path = webui.lora_dir / "joined.safetensors"
    factors = write_joined(webui, seed=9, sources=SOURCES[::-1], ranks={k: [R2, R1] for k in webui.model.weights()})
    touch_later(path)
    want = expected(webui, factors, [0] * 2 + [1] * 4)
    webui.generate("<lora:joined:1:v=krk@0>")
    assert_weights(webui, want)
    webui.networks.list_available_networks()  # the Lora tab's Refresh
    webui.generate("<lora:joined:1:v=krk@0>")
    assert_weights(webui, want)


def test_joined_file_rewritten_as_a_plain_lora(webui):
    """Same name, same multipliers: only the new network object tells that the layers hold the old
    file's merge (with its v); they must be re-merged from the new bytes."""
    write_joined(webui)
    webui.generate("<lora:joined:1:v=krk@0>")
    path = webui.lora_dir / "joined.safetensors"
    tensors, factors = lora_tensors(webui.model, 3, seed=4)
    safetensors.torch.save_file(tensors, str(path), metadata={"ss_network_dim": "3"})
    touch_later(path)
    webui.generate("<lora:joined:1>")
    assert_weights(webui, expected(webui, factors, None))


def test_file_changing_while_loading_is_not_trusted(webui, caplog, monkeypatch):
    """Rewritten between the webui's read of the weights and the hook's read of the header: the hook
    cannot tell which layout the loaded bytes have, says so, and leaves the LoRA plain until the
    next generation reloads it."""
    from modules import sd_models
    old = write_joined(webui)
    path = webui.lora_dir / "joined.safetensors"
    real = sd_models.read_state_dict
    new = {}

    def read_then_rewrite(filename, map_location=None):
        sd = real(filename, map_location)
        monkeypatch.setattr(sd_models, "read_state_dict", real)
        new.update(write_joined(webui, seed=9, sources=SOURCES[::-1], ranks={k: [R2, R1] for k in webui.model.weights()}))
        touch_later(path)
        return sd

    monkeypatch.setattr(sd_models, "read_state_dict", read_then_rewrite)
    with caplog.at_level(logging.WARNING):
        webui.generate("<lora:joined:1:v=krk@0>")
    (rec,) = hook_records(caplog)
    assert "changed on disk while the webui loaded it" in rec.getMessage()
    assert_weights(webui, expected(webui, old, None))
    webui.generate("<lora:joined:1:v=krk@0>")
    assert_weights(webui, expected(webui, new, [0] * 2 + [1] * 4))


def test_same_joined_lora_twice_says_so(webui, caplog):
    factors = write_joined(webui)
    with caplog.at_level(logging.WARNING):
        p, _ = webui.process("<lora:joined:1:v=krk@0> x <lora:joined:0.5:v=disney@0>")
    (rec,) = hook_records(caplog)
    msg = rec.getMessage()
    assert "<lora:joined> is in the prompt 2 times with different v (krk@0, disney@0)" in msg
    assert "last tag's v (disney@0)" in msg and "\n" not in msg
    d = delta(webui, factors, [0] * 4 + [1] * 2, te=0.5, unet=0.5)
    assert_weights(webui, {k: webui.W0[k] + 2 * d[k] for k in d})
    assert p.infotexts[0]["OrthoLoRA v"] == "joined: disney@0"
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        webui.process("<lora:joined:1:v=krk@0> x <lora:joined:1:v=krk=0.0>")  # the same v: nothing to say
    assert hook_records(caplog) == []


@pytest.mark.parametrize("first, hires, want_first, want_hires", [
    ("v=krk@0", "v=disney@0", "joined: krk@0", "joined: disney@0"),
    ("v=krk@0", "v=krk=0", "joined: krk@0", None),
    ("v=krk@0", "", "joined: krk@0", "none"),
    ("", "v=1*4,0*2", None, "joined: 1*4,0*2"),
])
def test_hires_infotext_records_each_pass(webui, first, hires, want_first, want_hires):
    factors = write_joined(webui)
    tag = "<lora:joined:1" + (f":{first}>" if first else ">")
    hr_tag = "<lora:joined:1" + (f":{hires}>" if hires else ">")
    p, passes = webui.process(tag, enable_hr=True, hr_prompt=hr_tag, n_iter=2)
    v_of = {"v=krk@0": [1] * 4 + [0] * 2, "v=krk=0": [1] * 4 + [0] * 2, "v=disney@0": [0] * 4 + [1] * 2,
            "v=1*4,0*2": [1] * 4 + [0] * 2, "": None}
    for i, info in enumerate(p.infotexts):
        assert info.get("OrthoLoRA v") == want_first
        assert info.get("OrthoLoRA hires v") == want_hires
        assert_weights(webui, expected(webui, factors, v_of[first]), got=passes[2 * i])
        assert_weights(webui, expected(webui, factors, v_of[hires]), got=passes[2 * i + 1])


@pytest.mark.parametrize("webui", ["sd2", "sdxl"], indirect=True)
def test_open_clip_attention_path(webui):
    """SD2 / SDXL text encoder 2: kohya q/k/v/out_proj on one MultiheadAttention (in_proj thirds,
    out_proj), as the real runtime merges them; v toggles re-merge that attention layer too."""
    mha = [k for k in webui.model.weights() if "_self_attn_" in k and webui.model.layers()[k].__class__.__name__
           == "MultiheadAttention"]
    assert len(mha) == 4
    plain = write_plain(webui)
    webui.generate("<lora:plain:0.7>")
    assert_weights(webui, expected(webui, plain, None, te=0.7, unet=0.7))
    factors = write_joined(webui)
    for v, want in (("krk@0", [1] * 4 + [0] * 2), ("1,0,1,0,1,0", [1, 0] * 3), ("disney@-1", [-1] * 4 + [1] * 2)):
        webui.generate(f"<lora:joined:0.5:2:v={v}>")
        assert_weights(webui, expected(webui, factors, want, te=0.5, unet=2))
    webui.generate("<lora:joined:0.5:2>")
    assert_weights(webui, expected(webui, factors, None, te=0.5, unet=2))
    webui.shared.opts.lora_functional = True  # attention layers are merged even then
    webui.generate("<lora:joined:1:v=krk@0>")
    want = expected(webui, factors, [1] * 4 + [0] * 2)
    assert_weights(webui, {k: want[k] for k in mha})


def test_toggle_copies_nothing_and_shares_vectors(webui, monkeypatch):
    """A toggle only hands each module its layout's vector: no module copies, one tensor per layout."""
    import copy
    te = webui.stub_model.TE_LINEAR
    factors = write_joined(webui, ranks={k: ([0, R2] if k == te else [R1, R2]) for k in webui.model.weights()})
    webui.generate("<lora:joined:1:v=krk@0>")
    net = webui.networks.loaded_networks[0]
    ups = {k: (m.up_model, m.up_model.weight.clone()) for k, m in net.modules.items()}

    def no_copies(*a, **k):
        raise AssertionError("copied on toggle")

    monkeypatch.setattr(copy, "deepcopy", no_copies)
    monkeypatch.setattr(torch.nn.Module, "__deepcopy__", no_copies, raising=False)
    webui.generate("<lora:joined:1:v=krk@0.5>")
    for k, m in net.modules.items():
        assert m.up_model is ups[k][0] and torch.equal(m.up_model.weight, ups[k][1])
    vs = {m.ortholora_name: m.ortholora_v for m in net.modules.values()}
    assert vs[webui.stub_model.UNET_LINEAR] is vs[webui.stub_model.UNET_CONV]
    assert vs[te].tolist() == [0.5, 0.5]
    assert_weights(webui, expected(webui, factors, {k: ([0.5] * 2 if k == te else [1] * 4 + [0.5] * 2) for k in factors}))


def test_bench_toggle_measures_hook_and_remerge_apart(tmp_path):
    """`bench toggle` (registered beside the others) on SD1.5's 350 modules at tiny widths."""
    from lib_ortholora import benchmarks
    from lib_ortholora.benchmarks import toggle
    assert "toggle" in benchmarks.NAMES
    figures = toggle.measure(tmp_path, "sd15", toggle.prepare(tmp_path, "sd15", full=False))
    assert figures["modules"] == 350 and figures["layouts"] == 5
    assert figures["hook_ms_median"] > 0 and figures["remerge_s_median"] > 0
    assert figures["max_rel_error_sampled"] < 1e-5

"""The LoRA Toolbox tab (lib_ortholora.ui) on gradio 3.41, without a server: the Blocks build, and the
per-operation adapters run real operations on tiny synthetic models; then the webui adapter
(scripts/ortholora_tab.py) against the stand-in in tests/webui_stub."""
from __future__ import annotations

import importlib.util
import shutil
import sys
import threading
import types
from pathlib import Path

import pytest

gr = pytest.importorskip("gradio")

from matplotlib.figure import Figure  # noqa: E402
from safetensors import safe_open  # noqa: E402

from lib_ortholora.diag import parse_diag  # noqa: E402
from lib_ortholora.lorafile import read_lora  # noqa: E402
from lib_ortholora.ui import UiConfig, build_tab  # noqa: E402
from lib_ortholora.ui import ops, plots, tab_extract, tab_inspect, tab_joinmix, tab_merge, tab_ortho  # noqa: E402
from lib_ortholora.ui import tab_resize, views  # noqa: E402
from lib_ortholora.ui.config import Defaults  # noqa: E402
from lib_ortholora.ui.folders import Folders  # noqa: E402
from lib_ortholora.report import Report  # noqa: E402
from lib_ortholora.ui.runner import Cancelled, CancelRegistry, Outcome, ProgressBridge, execute  # noqa: E402
from lib_ortholora.ui.runner import report_status  # noqa: E402
from lib_ortholora.ui.widgets import written_signal_html  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TAB_SCRIPT = ROOT / "scripts" / "ortholora_tab.py"
BASE, TUNED = "sd15_base.safetensors", "sd15_tuned.safetensors"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def models(demo_root, tmp_path):
    """A private copy of the demo models folder (webui layout)."""
    return Path(shutil.copytree(demo_root, tmp_path / "models"))


@pytest.fixture
def cfg(models):
    written = []
    c = UiConfig.for_models(models, defaults=Defaults(rank_policy="8"), on_written=written.append)
    c.written = written
    return c


def _files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


# --------------------------------------------------------------------------- building


def test_tab_builds_with_every_subtab(cfg):
    blocks = build_tab(cfg)
    assert isinstance(blocks, gr.Blocks)
    ids = {getattr(b, "elem_id", None) for b in blocks.blocks.values()}
    for op in ("extract", "merge", "joinmix", "resize", "ortho", "inspect"):
        assert f"ortholora_tab_{op}" in ids
    for elem in ("ortholora_extract_base", "ortholora_extract_tuned", "ortholora_extract_run",
                 "ortholora_extract_stop", "ortholora_extract_table", "ortholora_extract_spectrum",
                 "ortholora_merge_loras", "ortholora_ortho_alignment", "ortholora_prompt_tag",
                 "ortholora_insert_prompt", "ortholora_written"):
        assert elem in ids, elem
    titles = [getattr(b, "label", None) for b in blocks.blocks.values() if isinstance(b, gr.Tab)]
    assert {"Extract", "Merge into checkpoint", "Join / Mix", "Resize", "Orthogonalize", "Inspect"} <= set(titles)
    # the pickers list the folders; multi-select where an operation takes several LoRAs
    ctx = blocks.ortholora_context
    by_id = {p.dropdown.elem_id: p for p in ctx.pickers}
    assert by_id["ortholora_extract_base"].dropdown.choices == [(BASE, BASE), (TUNED, TUNED)] \
        or by_id["ortholora_extract_base"].dropdown.choices == [BASE, TUNED]
    assert by_id["ortholora_merge_loras"].multiselect and not by_id["ortholora_inspect_lora"].multiselect
    # long jobs go through the queue with a progress bar; refreshes do not
    config = blocks.get_config_file()
    ids = {c["id"]: c.get("props", {}).get("elem_id") for c in config["components"]}

    def deps_of(elem_id):
        out = []
        for d in config["dependencies"]:
            targets = [t[0] if isinstance(t, (list, tuple)) else t for t in d["targets"]]
            if any(ids.get(t) == elem_id for t in targets) and d.get("trigger_after") is None:
                out.append(d)
        return out

    (run,) = deps_of("ortholora_extract_run")
    assert run["queue"] is not False and run["show_progress"] == "full"
    (stop,) = deps_of("ortholora_extract_stop")[:1]
    assert stop["queue"] is False
    assert any(d["cancels"] for d in config["dependencies"])  # Stop also cancels the queued run
    (refresh,) = deps_of("ortholora_extract_base_refresh")
    assert refresh["queue"] is False


def test_standalone_blocks_carry_css_and_js(cfg):
    blocks = build_tab(cfg, standalone=True)
    assert "ortholora-hidden" in (blocks.css or "")
    assert any("__ortholoraLoaded" in (d.get("js") or "") for d in blocks.get_config_file()["dependencies"])


def test_pickers_refresh(cfg, models):
    blocks = build_tab(cfg)
    picker = next(p for p in blocks.ortholora_context.pickers if p.dropdown.elem_id == "ortholora_inspect_lora")
    shutil.copy(models / "Lora" / "demo_style.safetensors", models / "Lora" / "fresh.safetensors")
    update = picker.update(blocks.ortholora_context, "demo_style.safetensors")
    assert "fresh.safetensors" in update["choices"] and update["value"] == "demo_style.safetensors"
    (models / "Lora" / "demo_style.safetensors").unlink()
    assert picker.update(blocks.ortholora_context, "demo_style.safetensors")["value"] is None


# --------------------------------------------------------------------------- folders


def test_folders_resolve_only_listed_files(cfg, models):
    f = Folders(cfg)
    assert f.lora_names() == ["demo_joined.safetensors", "demo_other.safetensors", "demo_style.safetensors"]
    assert f.lora("demo_style") == models / "Lora" / "demo_style.safetensors"
    assert f.checkpoint("sd15_base") == models / "Stable-diffusion" / BASE
    for bad in ("../Stable-diffusion/sd15_base.safetensors", "/etc/passwd", "", "nope"):
        with pytest.raises(ops.OrthoLoraError):
            f.lora(bad)
    for bad in ("../x", "..", "/tmp/x", "a/b", ".hidden", "C:x"):
        with pytest.raises(ops.OrthoLoraError):
            f.lora_output(bad)


# --------------------------------------------------------------------------- operations


def test_extract_records_the_chosen_prediction_type(cfg, models):
    """The tab's Prediction type control reaches the file's metadata (auto leaves detection on)."""
    assert tab_extract.run(cfg, BASE, TUNED, "pred_v", rank="4", no_conv=True, prediction="v").ok
    assert tab_extract.run(cfg, BASE, TUNED, "pred_auto", rank="4", no_conv=True).ok
    for name, expected in (("pred_v", "v"), ("pred_auto", "epsilon")):
        with safe_open(str(models / "Lora" / f"{name}.safetensors"), "pt") as f:
            assert f.metadata()["modelspec.prediction_type"] == expected


def test_extract_writes_into_the_lora_folder_with_table_and_plots(cfg, models):
    o = tab_extract.run(cfg, BASE, TUNED, "ui_extract", rank="8", no_conv=True)
    assert o.ok, o.status
    out = models / "Lora" / "ui_extract.safetensors"
    assert out.is_file() and cfg.written == [out]
    assert o.written == [out]
    assert o.table[0][:2] == ["module", "status"] and len(o.table) > 100
    assert "Extract" in o.status and "ui_extract.safetensors" in o.status
    for key in ("spectrum", "ranks", "energy"):
        assert isinstance(o.figures[key], Figure), key
    assert o.source == "ui_extract.safetensors" and o.module in o.modules
    assert read_lora(out).modules[o.module].rank == 8
    # the spectrum of any other module, as the module dropdown asks for it
    fig = views.spectrum_view(Folders(cfg).lora(o.source), o.modules[-1])
    assert isinstance(fig, Figure)



def test_status_gives_one_timing():
    """The done line says how long the run took; the report's own `seconds` total is not repeated."""
    status = report_status(Report("extract", totals={"modules": 350, "seconds": 1.56}), "Extract", 5.2)
    assert "finished in 5.2 s" in status and "**modules** 350" in status
    assert "seconds" not in status and "1.56" not in status


def test_escaping_output_names_are_refused(cfg, models):
    before_root, before_lora = _files(models), _files(models / "Lora")
    for name in ("../x", "../../x", "/tmp/ortholora-x", "sub/x", ".."):
        o = tab_extract.run(cfg, BASE, TUNED, name, rank="8")
        assert not o.ok
        assert "Error" in o.status and "Traceback" not in o.status
    assert _files(models) == before_root and _files(models / "Lora") == before_lora
    assert not (models / "x.safetensors").exists() and not Path("/tmp/ortholora-x.safetensors").exists()


def test_no_overwrite_without_the_checkbox(cfg, models):
    target = models / "Lora" / "demo_style.safetensors"
    before = target.read_bytes()
    o = tab_extract.run(cfg, BASE, TUNED, "demo_style", rank="4", no_conv=True)
    assert not o.ok and "Overwrite existing files" in o.status
    assert target.read_bytes() == before
    o = tab_extract.run(cfg, BASE, TUNED, "demo_style", rank="4", no_conv=True, overwrite=True)
    assert o.ok, o.status
    assert target.read_bytes() != before
    assert read_lora(target).modules[o.module].rank == 4


def test_merge_into_checkpoint(cfg, models):
    o = tab_merge.run(cfg, BASE, ["demo_style.safetensors", "demo_other.safetensors"], "1, 0.5", "keep", "merged")
    assert o.ok, o.status
    out = models / "Stable-diffusion" / "merged.safetensors"
    assert out.is_file() and o.written == [out]
    assert o.table and o.table[0][0] == "module"
    o = tab_merge.run(cfg, BASE, ["demo_style.safetensors"], "1, 2, 3", "keep", "merged2")
    assert not o.ok and "multiplier" in o.status
    o = tab_merge.run(cfg, BASE, [], "1", "keep", "merged3")
    assert not o.ok and "no LoRA chosen" in o.status


@pytest.mark.slow
def test_join_inspect_prompt_tag_and_bake(cfg, models):
    o = tab_joinmix.run(cfg, ["demo_style.safetensors", "demo_other.safetensors"], tab_joinmix.MODES[0],
                        "1, -0.5", "a, b", "", "fp32", "joined_ab")
    assert o.ok, o.status
    assert (models / "Lora" / "joined_ab.safetensors").is_file()
    assert isinstance(o.figures["ranks"], Figure)

    o = tab_inspect.run(cfg, "joined_ab.safetensors")
    assert o.ok, o.status
    assert isinstance(o.figures["energy"], Figure) and isinstance(o.figures["spectrum"], Figure)
    assert [s["name"] for s in o.extra["joined"]] == ["a", "b"]
    tag = o.extra["tag"]
    assert tag == "<lora:joined_ab:1:v=a@1,b@1>"
    # the webui splits a tag's items on ':' and each item on '=' at most twice: v= must stay named
    item = tag[1:-1].split(":")[3]
    assert len(item.split("=", 2)) == 2
    assert parse_diag(item.split("=", 1)[1]).slices == (("a", 1.0), ("b", 1.0))

    o = tab_inspect.bake(cfg, "joined_ab.safetensors", "a=1,b=0", "only_a")
    assert o.ok, o.status
    baked = read_lora(models / "Lora" / "only_a.safetensors")
    joined = read_lora(models / "Lora" / "joined_ab.safetensors")
    name = next(iter(baked.modules))
    assert baked.modules[name].rank < joined.modules[name].rank

    o = tab_inspect.run(cfg, "demo_style.safetensors")
    assert o.ok and "joined" not in o.extra


def test_mix(cfg, models):
    o = tab_joinmix.run(cfg, ["demo_style.safetensors", "demo_other.safetensors"], tab_joinmix.MODES[1],
                        "", "", "4", "fp16", "mixed")
    assert o.ok, o.status
    lf = read_lora(models / "Lora" / "mixed.safetensors")
    assert {m.rank for m in lf.modules.values()} == {4}
    o = tab_joinmix.run(cfg, ["demo_style.safetensors"], tab_joinmix.MODES[1], "", "", "nonsense", "fp16", "m2")
    assert not o.ok and "rank policy" in o.status


@pytest.mark.slow
def test_ortho_alignment_heatmap(cfg, models):
    o = tab_ortho.run(cfg, ["demo_style.safetensors", "demo_joined.safetensors"], True, "orth", 2, True, False, "",
                      "fp16")
    assert o.ok, o.status
    for name in ("orth_shared", "orth_direction2", "demo_style_orth_residual", "demo_joined_orth_residual"):
        assert (models / "Lora" / f"{name}.safetensors").is_file(), name
    assert isinstance(o.figures["alignment"], Figure)
    assert o.alignment["loras"] == ["demo_style", "demo_joined"]
    scopes = plots.alignment_scopes(o.alignment)
    assert scopes[0] == "whole file" and len(scopes) > 2
    assert isinstance(plots.alignment_for(o.alignment, scopes[1]), Figure)
    # report only: nothing written
    before = _files(models / "Lora")
    o = tab_ortho.run(cfg, ["demo_style.safetensors", "demo_other.safetensors"], False, "x", 2, True, False, "",
                      "fp16")
    assert o.ok and _files(models / "Lora") == before and isinstance(o.figures["alignment"], Figure)
    o = tab_ortho.run(cfg, ["demo_style.safetensors"], True, "y", 2)
    assert not o.ok and "at least two" in o.status
    o = tab_ortho.run(cfg, ["demo_style.safetensors", "demo_other.safetensors"], True, "../y", 2)
    assert not o.ok and "Error" in o.status


@pytest.mark.slow
def test_resize_with_recipes(cfg, models, monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # base-norm cache
    o = tab_resize.run(cfg, ["demo_style.safetensors", "demo_joined.safetensors"], "rank=4:sv_fro=0.9")
    assert o.ok, o.status
    for name in ("demo_style_rank4", "demo_joined_rank4", "demo_style_svfro0.9", "demo_joined_svfro0.9"):
        assert (models / "Lora" / f"{name}.safetensors").is_file(), name
    assert {m.rank for m in read_lora(models / "Lora" / "demo_joined_rank4.safetensors").modules.values()} == {4}
    assert isinstance(o.figures["ranks"], Figure)
    o = tab_resize.run(cfg, ["demo_style.safetensors"], "rank=4")
    assert not o.ok and "Overwrite existing files" in o.status
    o = tab_resize.run(cfg, ["demo_style.safetensors"], "spn_ckpt=1,thr=-1.2", "sd15_base.safetensors")
    assert o.ok, o.status
    o = tab_resize.run(cfg, ["demo_style.safetensors"], "spn_ckpt=1,thr=-1.2")
    assert not o.ok and "needs the base checkpoint" in o.status


def test_errors_are_one_clear_line(cfg):
    o = tab_inspect.run(cfg, "missing.safetensors")
    assert not o.ok and "no LoRA named" in o.status and "\n" not in o.status
    o = tab_extract.run(cfg, BASE, BASE, "same", rank="8")
    assert not o.ok and "same file" in o.status

    def boom(progress):
        raise ValueError("bad thing")

    o = execute(cfg, "Test", boom)
    assert not o.ok and "unexpected ValueError: bad thing" in o.status and "Traceback" not in o.status


# --------------------------------------------------------------------------- progress, cancel


def test_progress_bridge_reports_and_cancels():
    seen = []
    bridge = ProgressBridge(lambda value, desc=None: seen.append((value, desc)), label="extract", interval=0)
    bridge(1, 10, "layer_a")
    bridge(10, 10, "layer_b")
    assert seen == [((1, 10), "extract layer_a"), ((10, 10), "extract layer_b")]
    flag = threading.Event()
    bridge = ProgressBridge(None, flag)
    bridge(1, 2, "x")
    flag.set()
    with pytest.raises(Cancelled):
        bridge(2, 2, "y")
    reg = CancelRegistry()
    f1 = reg.start("s", "extract")
    assert reg.cancel("s", "extract") and f1.is_set()
    reg.finish("s", "extract", f1)
    assert not reg.cancel("s", "extract")


def test_stop_leaves_no_partial_file(cfg, models):
    flag = threading.Event()
    calls = []

    def ui(value, desc=None):  # the first update reaches the UI at once; the next core step must stop
        calls.append(value)
        flag.set()

    before = _files(models / "Lora")
    o = tab_extract.run(cfg, BASE, TUNED, "stopped", rank="8", ui_progress=ui, cancel=flag)
    assert not o.ok and "Cancelled" in o.status
    assert _files(models / "Lora") == before  # no output, no temp file
    o = tab_merge.run(cfg, BASE, ["demo_style.safetensors"], "1", "keep", "stopped_ckpt", ui_progress=None,
                      cancel=_set(threading.Event()))
    assert not o.ok and "Cancelled" in o.status
    assert not any(p.name.startswith((".stopped", "stopped")) for p in (models / "Stable-diffusion").iterdir())


def _set(flag):
    flag.set()
    return flag


def test_written_signal_names_the_kind(cfg, models):
    html = written_signal_html([str(models / "Lora" / "a.safetensors"),
                                str(models / "Stable-diffusion" / "m.safetensors")], Folders(cfg))
    assert "ortholora-written-data" in html and "data-stamp" in html
    assert "&quot;lora&quot;" in html and "&quot;checkpoint&quot;" in html


def test_outcome_values_fill_every_output(cfg):
    blocks = build_tab(cfg)
    ctx = blocks.ortholora_context
    for _, results in ctx.runs:
        ok = Outcome(True, "done", table=[["module", "status"], ["m", "ok"]])
        assert len(results.values(ok)) == len(results.outputs)
        assert len(results.values(Outcome(False, "❌"))) == len(results.outputs)


# --------------------------------------------------------------------------- webui adapter


@pytest.fixture
def webui(models, stub_path):
    """The webui stand-in (conftest's stub_path) with cmd_opts pointing at the demo models."""
    from modules import script_callbacks, shared
    script_callbacks.callback_map.clear()
    shared.cmd_opts.lora_dir = str(models / "Lora")
    shared.cmd_opts.ckpt_dir = None
    paths = types.ModuleType("modules.paths")
    paths.models_path = str(models)
    sys.modules["modules.paths"] = paths
    import networks
    networks.list_available_networks()
    spec = importlib.util.spec_from_file_location("ortholora_tab", TAB_SCRIPT)
    tab = importlib.util.module_from_spec(spec)
    sys.modules["ortholora_tab"] = tab
    spec.loader.exec_module(tab)
    return types.SimpleNamespace(tab=tab, shared=shared, callbacks=script_callbacks, networks=networks,
                                 models=models)


def test_webui_adapter_registers_tab_settings_and_api(webui):
    cb = webui.callbacks.callback_map
    assert len(cb["ui_tabs"]) == 1 and len(cb["ui_settings"]) == 1 and len(cb["app_started"]) == 1

    cb["ui_settings"][0]()
    opts = webui.shared.opts
    for key, default in (("ortholora_device", "auto"), ("ortholora_dtype", "fp16"),
                         ("ortholora_rank_policy", "fraction=0.08,min=8,max=96"), ("ortholora_hook_enabled", True)):
        assert opts.data_labels[key].section == ("ortholora", "LoRA Toolbox")
        assert getattr(opts, key) == default

    tabs = cb["ui_tabs"][0]()
    assert len(tabs) == 1
    blocks, title, elem_id = tabs[0]
    assert isinstance(blocks, gr.Blocks) and title == "LoRA Toolbox" and elem_id == "ortholora"
    ctx = blocks.ortholora_context
    assert ctx.cfg.lora_dir == webui.models / "Lora"
    assert ctx.cfg.ckpt_dirs == [webui.models / "Stable-diffusion"]
    assert BASE in ctx.folders.checkpoint_names()

    from fastapi import FastAPI
    from fastapi.testclient import TestClient
    app = FastAPI()
    cb["app_started"][0](None, app)  # no --api: like the webui's own API, nothing is served
    assert not any(r.path.startswith("/ortholora") for r in app.routes)
    webui.shared.cmd_opts.api = True
    cb["app_started"][0](None, app)
    paths = {r.path for r in app.routes}
    for op in ("extract", "merge", "join", "mix", "resize", "ortho", "inspect"):
        assert f"/ortholora/v1/{op}" in paths
    r = TestClient(app, base_url="http://127.0.0.1").post("/ortholora/v1/inspect", json={"file": "demo_joined"})
    assert r.status_code == 200 and r.json()["operation"] == "inspect"


def test_webui_settings_drive_defaults_and_written_files_reach_the_lora_list(webui):
    webui.callbacks.callback_map["ui_settings"][0]()
    webui.shared.opts.ortholora_rank_policy = "4"
    webui.shared.opts.ortholora_dtype = "fp32"
    cfg = webui.tab.webui_config()
    assert cfg.current_defaults() == Defaults("auto", "fp32", "4")
    assert "fresh" not in webui.networks.available_networks
    o = tab_extract.run(cfg, BASE, TUNED, "fresh", no_conv=True)  # empty policy → the settings' "4"
    assert o.ok, o.status
    assert "fresh" in webui.networks.available_networks  # on_written → update_available_networks_by_names
    lf = read_lora(webui.models / "Lora" / "fresh.safetensors")
    assert {m.rank for m in lf.modules.values()} == {4}


def test_webui_checkpoint_list_and_api_auth(webui):
    from modules import sd_models
    ckpt = webui.models / "Stable-diffusion" / BASE
    sd_models.checkpoints_list = {"sd15_base.safetensors [abc123]": types.SimpleNamespace(
        name="sd15_base.safetensors", filename=str(ckpt))}
    cfg = webui.tab.webui_config()
    # the webui's labels first; files it has not listed yet (a fresh merge) from the folder
    assert Folders(cfg).checkpoint_names() == ["sd15_base.safetensors", TUNED]
    sd_models.checkpoints_list = {"sd15_base.safetensors [abc123]": types.SimpleNamespace(
        name="renamed/base.safetensors", filename=str(ckpt))}
    assert Folders(cfg).checkpoint_names() == ["renamed/base.safetensors", TUNED]
    assert Folders(cfg).checkpoint("renamed/base.safetensors") == ckpt

    from fastapi import FastAPI
    from fastapi.testclient import TestClient
    webui.shared.cmd_opts.api, webui.shared.cmd_opts.api_auth = True, "alice:secret"
    app = FastAPI()
    webui.tab.on_app_started(None, app)
    client = TestClient(app, base_url="http://127.0.0.1")  # a Host the routes answer to
    assert client.get("/ortholora/v1/files").status_code == 401
    r = client.get("/ortholora/v1/files", auth=("alice", "secret"))
    assert r.status_code == 200 and r.json()["checkpoints"] == ["renamed/base.safetensors", TUNED]


def test_webui_tab_degrades_to_a_message(webui, monkeypatch):
    import lib_ortholora.ui as ui

    def broken(cfg, standalone=False):
        raise RuntimeError("no gradio today")

    monkeypatch.setattr(ui, "build_tab", broken)
    blocks, title, _ = webui.tab.on_ui_tabs()[0]
    assert title == "LoRA Toolbox"
    assert any("no gradio today" in str(getattr(b, "value", "")) for b in blocks.blocks.values())

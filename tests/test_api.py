"""HTTP API of the LoRA Toolbox (/ortholora/v1/...) with FastAPI's TestClient on the demo models:
real operations answer the report as JSON; bad input answers 400 with the one-line message."""
from __future__ import annotations

import argparse
import inspect
import shutil
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi import FastAPI  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from lib_ortholora.cli import parser as cli_parser  # noqa: E402
from lib_ortholora.lorafile import read_lora  # noqa: E402
from lib_ortholora.ui import UiConfig  # noqa: E402
from lib_ortholora.ui import ops  # noqa: E402
from lib_ortholora.ui.api import PREFIX, add_routes, options  # noqa: E402

BASE, TUNED = "sd15_base.safetensors", "sd15_tuned.safetensors"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def api(demo_root, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    models = Path(shutil.copytree(demo_root, tmp_path / "models"))
    written = []
    cfg = UiConfig.for_models(models, on_written=written.append)
    app = FastAPI()
    add_routes(app, cfg)
    client = TestClient(app, base_url="http://127.0.0.1")  # a Host the routes answer to
    client.models, client.written = models, written
    return client


def post(client, op, body, status=200):
    r = client.post(f"{PREFIX}/{op}", json=body)
    assert r.status_code == status, r.text
    return r.json()


def test_routes_and_listing(api):
    paths = {r.path for r in api.app.routes}
    for op in ("extract", "merge", "join", "mix", "resize", "ortho", "inspect"):
        assert f"{PREFIX}/{op}" in paths
    files = api.get(f"{PREFIX}/files").json()
    assert files == {"loras": ["demo_joined.safetensors", "demo_other.safetensors", "demo_style.safetensors"],
                     "checkpoints": [BASE, TUNED]}


def test_extract_on_the_demo_models(api):
    report = post(api, "extract", {"base": BASE, "tuned": "sd15_tuned", "out": "api_lora", "rank": "8",
                                   "conv": False, "dtype": "fp32", "device": "cpu"})
    out = api.models / "Lora" / "api_lora.safetensors"
    assert report["operation"] == "extract" and report["outputs"] == [str(out)]
    assert out.is_file() and api.written == [out]
    assert report["totals"]["modules"] == len(report["rows"]) - report["totals"]["skipped"]
    assert {m.rank for m in read_lora(out).modules.values()} == {8}
    # the same again without overwrite: 400 with the reason; with it: replaced
    r = api.post(f"{PREFIX}/extract", json={"base": BASE, "tuned": TUNED, "out": "api_lora", "rank": 4})
    assert r.status_code == 400 and "exists" in r.json()["detail"] and "overwrite" in r.json()["detail"]
    post(api, "extract", {"base": BASE, "tuned": TUNED, "out": "api_lora", "rank": 4, "conv": False,
                          "overwrite": True})
    assert {m.rank for m in read_lora(out).modules.values()} == {4}


@pytest.mark.parametrize("body, message", [
    ({"base": BASE, "tuned": TUNED}, "missing option(s) 'out'"),
    ({"base": BASE, "tuned": TUNED, "out": "x", "dim": 3}, "unknown option(s) 'dim'"),
    ({"base": BASE, "tuned": TUNED, "out": "x", "conv": "yes"}, "'conv' must be true or false"),
    ({"base": BASE, "tuned": TUNED, "out": "x", "skip": float("nan")}, "must be a number"),
    ({"base": BASE, "tuned": TUNED, "out": "../evil"}, "must be a plain file name"),
    ({"base": BASE, "tuned": TUNED, "out": "/tmp/evil"}, "is an absolute path"),
    ({"base": "../Lora/demo_style.safetensors", "tuned": TUNED, "out": "x"}, "no checkpoint named"),
    ({"base": BASE, "tuned": "nope", "out": "x"}, "no checkpoint named 'nope'"),
    ({"base": BASE, "tuned": TUNED, "out": "x", "rank": "bogus"}, "rank policy"),
    ({"base": BASE, "tuned": TUNED, "out": "x", "dtype": "fp8"}, "dtype must be one of"),
    ({"base": BASE, "tuned": TUNED, "out": "x", "svd": "magic"}, "svd must be one of"),
    ([1, 2], "must be a JSON object"),
])
def test_bad_extract_input_is_400_with_the_message(api, body, message):
    before = set((api.models / "Lora").iterdir())
    r = api.post(f"{PREFIX}/extract", content=_json(body), headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    detail = r.json()["detail"]
    assert message in detail and "\n" not in detail and "Traceback" not in detail
    assert set((api.models / "Lora").iterdir()) == before
    assert not Path("/tmp/evil.safetensors").exists()


def _json(body):
    import json
    return json.dumps(body)  # NaN stays NaN (Python's json writes it), like a careless client


def test_invalid_json_and_unknown_operation(api):
    r = api.post(f"{PREFIX}/inspect", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["detail"]
    assert api.post(f"{PREFIX}/nonsense", json={}).status_code in (404, 405)


def test_inspect_join_mix_merge_ortho(api):
    report = post(api, "inspect", {"file": "demo_joined"})
    assert report["totals"]["architecture"] == "SD1.x"
    assert "ortholora_join" in report["totals"]["metadata"]  # full metadata by default

    post(api, "join", {"loras": ["demo_style", "demo_other"], "out": "j", "ratio": [1, 0.5], "names": ["a", "b"]})
    assert "ortholora_join" in read_lora(api.models / "Lora" / "j.safetensors").metadata

    post(api, "mix", {"loras": ["demo_style", "demo_other"], "out": "m", "rank": 4})
    assert {m.rank for m in read_lora(api.models / "Lora" / "m.safetensors").modules.values()} == {4}

    report = post(api, "merge", {"base": BASE, "loras": ["demo_style"], "multiplier": 0.5, "out": "merged"})
    assert (api.models / "Stable-diffusion" / "merged.safetensors").is_file()
    assert report["totals"]["modules_merged"] > 0

    report = post(api, "ortho", {"loras": ["demo_style", "demo_joined"], "write": False})
    assert report["data"]["loras"] == ["demo_style", "demo_joined"]
    assert len(report["data"]["file"]["before"]) == 2 and report["outputs"] == []

    r = api.post(f"{PREFIX}/ortho", json={"loras": ["demo_style"]})
    assert r.status_code == 400 and "at least two" in r.json()["detail"]
    r = api.post(f"{PREFIX}/join", json={"loras": [], "out": "z"})
    assert r.status_code == 400 and "no LoRA chosen" in r.json()["detail"]


def test_resize_and_diag(api):
    report = post(api, "resize", {"loras": ["demo_style"], "recipes": "rank=4"})
    out = api.models / "Lora" / "demo_style_rank4.safetensors"
    assert report["outputs"] == [str(out)] and out.is_file()
    r = api.post(f"{PREFIX}/resize", json={"loras": ["demo_style"], "recipes": "spn_ckpt=1,thr=-1"})
    assert r.status_code == 400 and "needs the base checkpoint" in r.json()["detail"]
    post(api, "diag", {"lora": "demo_joined", "spec": "style=1,other=0", "out": "only_style"})
    assert (api.models / "Lora" / "only_style.safetensors").is_file()


# Where the JSON API and the CLI differ on purpose: {operation: (CLI-only options, API-only options)}.
CLI_PRINTING = {"json", "quiet"}  # how the CLI prints its report; the API always answers JSON
API_DIFFERS = {
    # the API takes LoRA names (and `ckpt`) relative to the models folders, writes into the LoRA
    # folder, and keeps the norm cache where the server has it
    "resize": ({"files", "out", "cache_dir"}, {"loras"}),
    # outputs go to the LoRA folder; `write` says whether to write them at all (CLI: -o or not)
    "ortho": ({"out"}, {"write"}),
    # the tab shortens long metadata values
    "inspect": (set(), {"full_metadata"}),
}


@pytest.fixture(scope="module")
def cli_commands():
    """{command: (option dests, required dests)} from the real argparse parsers."""
    parser, _ = cli_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    out = {}
    for name, p in sub.choices.items():
        actions = [a for a in p._actions if not isinstance(a, argparse._HelpAction)]
        out[name] = ({a.dest for a in actions}, {a.dest for a in actions if a.required or not a.option_strings})
    return out


@pytest.mark.parametrize("op", sorted(ops.OPERATIONS))
def test_options_mirror_the_cli(op, cli_commands):
    assert op in cli_commands, f"the API has {op!r} but the CLI does not"
    cli, cli_required = cli_commands[op]
    assert CLI_PRINTING <= cli
    cli_only, api_only = API_DIFFERS.get(op, (set(), set()))
    api = options(ops.OPERATIONS[op])
    assert cli_only <= cli and api_only <= set(api) and not api_only & cli, "API_DIFFERS is out of date"
    assert set(api) - api_only == cli - CLI_PRINTING - cli_only
    api_required = {k for k, (_, default) in api.items() if default is inspect.Parameter.empty}
    assert api_required - api_only <= cli_required, "an option the API requires is optional on the CLI"

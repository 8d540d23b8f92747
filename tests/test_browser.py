"""The standalone LoRA Toolbox (`python -m lib_ortholora ui`) driven in headless Chromium over the
DevTools protocol (plain websockets, no browser download): pick the demo models in the Extract
sub-tab, run it, see the report table and a plot, find the file, and keep a screenshot.

Set ORTHOLORA_SCREENSHOT=path to copy the screenshot there too (docs/screenshot-extract.png)."""
from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian: apt-get install "
                                                          "chromium); CI installs it")
sync_client = pytest.importorskip("websockets.sync.client", reason="websockets >= 11 is needed for DevTools")
pytest.importorskip("gradio")

from lib_ortholora.ui.standalone import demo_models  # noqa: E402

CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio", "--window-size=1280,1800",
                "--remote-debugging-port=0"]
BASE, TUNED = "sd15_base.safetensors", "sd15_tuned.safetensors"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(predicate, timeout: float, what: str, interval: float = 0.25):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _stop(proc: subprocess.Popen) -> None:
    """End a process this test started (and its own process group: Chromium's helpers)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    return demo_models(tmp_path_factory.getbasetemp() / "ortholora-demo-models")


@pytest.fixture
def server(demo_root, tmp_path):
    """`python -m lib_ortholora ui --models DIR` on a free loopback port."""
    models = Path(shutil.copytree(demo_root, tmp_path / "models"))
    port = _free_port()
    log = open(tmp_path / "server.log", "w")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "XDG_CACHE_HOME": str(tmp_path / "cache")}
    proc = subprocess.Popen([sys.executable, "-m", "lib_ortholora", "ui", "--models", str(models), "--port", str(port),
                             "--host", "127.0.0.1"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}/"

    def up():
        if proc.poll() is not None:
            raise AssertionError(f"the UI server exited ({proc.returncode}):\n"
                                 + (tmp_path / "server.log").read_text()[-3000:])
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    try:
        _wait(up, 180, "the UI server")
        yield url, models
    finally:
        _stop(proc)
        log.close()


class DevTools:
    """A minimal Chrome DevTools Protocol client for one page."""

    def __init__(self, ws_url: str):
        self.ws = sync_client.connect(ws_url, max_size=None, open_timeout=20)
        self.ids = itertools.count(1)

    def send(self, method: str, timeout: float = 60, **params):
        i = next(self.ids)
        self.ws.send(json.dumps({"id": i, "method": method, "params": params}))
        end = time.monotonic() + timeout
        while True:
            msg = json.loads(self.ws.recv(timeout=max(0.1, end - time.monotonic())))
            if msg.get("id") == i:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def js(self, expression: str):
        r = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expression[:80]}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def exists(self, selector: str) -> bool:
        return bool(self.js(f"!!document.querySelector({json.dumps(selector)})"))

    def click(self, selector: str) -> None:
        """A real mouse click at the element's centre (gradio's widgets listen to mouse events)."""
        xy = self.js(f"""(() => {{
            const e = document.querySelector({json.dumps(selector)});
            if (!e) return null;
            e.scrollIntoView({{block: "center"}});
            const b = e.getBoundingClientRect();
            return [b.x + b.width / 2, b.y + b.height / 2];
        }})()""")
        assert xy, f"nothing matches {selector}"
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", type=kind, x=xy[0], y=xy[1], button="left", clickCount=1)

    def type_into(self, selector: str, text: str) -> None:
        self.click(selector)
        self.js(f"document.querySelector({json.dumps(selector)}).select()")
        self.send("Input.insertText", text=text)

    def choose(self, dropdown: str, value: str) -> None:
        """Open a gradio dropdown and click one of its options."""
        self.click(f"{dropdown} input")
        option = f'{dropdown} li[aria-label="{value}"]'  # gradio 3.41 and 4.x both label options
        _wait(lambda: self.exists(option), 10, f"option {value} of {dropdown}")
        self.click(option)
        _wait(lambda: self.js(f"document.querySelector('{dropdown} input').value") == value, 10,
              f"{dropdown} to show {value}")

    def open_tab(self, title: str, op: str) -> None:
        """Click the sub-tab button titled `title` and wait for its run button (gradio re-renders the
        tab buttons on every switch, so they are looked up each time)."""
        self.js(f"""document.querySelectorAll('[data-test=tab]').forEach(b => b.removeAttribute('data-test'));
                    [...document.querySelectorAll('#ortholora_tabs > .tab-nav > button, #ortholora_tabs button')]
                    .find(b => b.textContent.trim() === {json.dumps(title)}).setAttribute('data-test', 'tab')""")
        self.click("[data-test=tab]")
        _wait(lambda: self.js(f"document.querySelector('#ortholora_{op}_run').offsetParent !== null"), 10,
              f"the {title} sub-tab")

    def close(self) -> None:
        self.ws.close()


@pytest.fixture
def page(tmp_path):
    profile = tmp_path / "chromium-profile"
    proc = subprocess.Popen([CHROMIUM, *CHROME_FLAGS, f"--user-data-dir={profile}", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "chromium.log", "w"),
                            start_new_session=True)
    try:
        port_file = profile / "DevToolsActivePort"
        _wait(lambda: port_file.exists() and port_file.read_text().split(), 60, "Chromium's DevTools port")
        port = int(port_file.read_text().split()[0])

        def page_target():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2) as r:
                    return next((t for t in json.load(r) if t.get("type") == "page"), None)
            except OSError:
                return None

        target = _wait(page_target, 30, "a Chromium page")
        tools = DevTools(target["webSocketDebuggerUrl"])
        try:
            tools.send("Page.enable")
            tools.send("Runtime.enable")
            tools.send("Emulation.setDeviceMetricsOverride", width=1280, height=1800, deviceScaleFactor=1,
                       mobile=False)
            yield tools
        finally:
            tools.close()
    finally:
        _stop(proc)


@pytest.mark.slow
def test_extract_in_the_browser(server, page, tmp_path):
    url, models = server
    page.send("Page.navigate", url=url)
    _wait(lambda: page.exists("#ortholora_extract_base input"), 120, "the LoRA Toolbox tab")
    assert page.js("window.__ortholoraLoaded === true"), "javascript/ortholora.js was not loaded"

    # the Extract sub-tab (the first one; clicked anyway, as a user would)
    page.open_tab("Extract", "extract")

    page.choose("#ortholora_extract_base", BASE)
    page.choose("#ortholora_extract_tuned", TUNED)
    page.type_into("#ortholora_extract_dim textarea, #ortholora_extract_dim input", "8")
    page.type_into("#ortholora_extract_out textarea, #ortholora_extract_out input", "browser_lora")
    page.click("#ortholora_extract_run")

    status = "#ortholora_extract_status"
    text = _wait(lambda: (lambda t: t if ("finished" in t or "Error" in t) else None)(
        page.js(f"document.querySelector('{status}').innerText")), 300, "the extract to finish")
    assert "finished" in text and "Error" not in text, text
    out = models / "Lora" / "browser_lora.safetensors"
    assert out.is_file()
    assert str(out) in text

    # the report table and the plots
    _wait(lambda: page.js("document.querySelectorAll('#ortholora_extract_table tbody tr').length") > 10, 30,
          "the report table")
    headers = page.js("[...document.querySelectorAll('#ortholora_extract_table thead th')]"
                      ".map(th => th.innerText.trim())")
    assert {"module", "status", "rank", "rel_error"} <= set(headers), headers
    first_row = page.js("document.querySelector('#ortholora_extract_table tbody tr').innerText")
    assert "lora_" in first_row
    spectrum = "#ortholora_extract_spectrum img"
    _wait(lambda: page.exists(spectrum), 30, "the spectrum plot")
    _wait(lambda: page.js(f"document.querySelector('{spectrum}').naturalWidth") > 200, 30,
          "the spectrum image to load")

    # the hidden signal the webui's JS watches says what was written
    _wait(lambda: "browser_lora" in (page.js(
        "(document.querySelector('#ortholora_written .ortholora-written-data') || {}).dataset?.written") or ""),
        30, "the written-files signal")

    page.js("window.scrollTo(0, 0)")
    time.sleep(0.5)
    shot = page.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)
    png = tmp_path / "screenshot-extract.png"
    png.write_bytes(base64.b64decode(shot["data"]))
    assert png.stat().st_size > 10_000
    if os.environ.get("ORTHOLORA_SCREENSHOT"):
        shutil.copyfile(png, os.environ["ORTHOLORA_SCREENSHOT"])

    # every LoRA picker was refreshed: the new file is offered in Inspect
    page.open_tab("Inspect", "inspect")
    page.choose("#ortholora_inspect_lora", "browser_lora.safetensors")

    # a joined LoRA: its slices, the prompt tag, and the JS button that puts the tag into a prompt
    page.choose("#ortholora_inspect_lora", "demo_joined.safetensors")
    page.click("#ortholora_inspect_run")
    _wait(lambda: "finished" in page.js("document.querySelector('#ortholora_inspect_status').innerText"), 120,
          "the inspection")
    _wait(lambda: page.js("document.querySelector('#ortholora_joined').offsetParent !== null"), 30,
          "the joined-LoRA panel")
    tag = "<lora:demo_joined:1:v=style@1,other@1>"
    assert page.js("document.querySelector('#ortholora_prompt_tag textarea, #ortholora_prompt_tag input').value") \
        == tag
    # the webui's txt2img prompt, as it is in the page there (the standalone page has none)
    page.js("""(document.querySelector('gradio-app') || document.body).insertAdjacentHTML('beforeend',
               '<div id="txt2img_prompt"><textarea>a photo of a cat</textarea></div>');
               document.documentElement.classList.remove('ortholora-standalone');""")
    page.click("#ortholora_insert_prompt")
    _wait(lambda: page.js("document.querySelector('#txt2img_prompt textarea').value")
          == f"a photo of a cat, {tag}", 10, "the tag in the prompt")

    # an output name that would leave the LoRA folder is refused, visibly, with no traceback
    page.open_tab("Extract", "extract")
    page.type_into("#ortholora_extract_out textarea, #ortholora_extract_out input", "../escape")
    page.click("#ortholora_extract_run")
    text = _wait(lambda: (lambda t: t if "Error" in t else None)(
        page.js(f"document.querySelector('{status}').innerText")), 120, "the refusal")
    assert "plain file name" in text and "Traceback" not in text
    assert not (models / "escape.safetensors").exists()

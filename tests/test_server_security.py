"""Attacks on the HTTP side, with forged requests against REAL running servers (sockets, not a
TestClient): the standalone server (`serve`, in this process, started from a working directory
full of bait), the routes mounted by the webui adapter (on a uvicorn server), the `ui` command
(in a child process). What a page on evil.example can make a browser send: simple requests
(text/plain, forms, bodies without a type), `no-cors` fetches, websockets (no CORS at all), DNS
rebinding (its own Host name resolving to 127.0.0.1), Origin `null`; and what a local file
layout can do: symlinks in the working directory and loops in the LoRA folder."""
from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

gr = pytest.importorskip("gradio")
uvicorn = pytest.importorskip("uvicorn")

from fastapi import FastAPI, Request  # noqa: E402
from test_ui import models, webui  # noqa: E402,F401  (fixtures: the webui stand-in over a copy of the demo models)

from lib_ortholora.ui.standalone import serve  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EVIL = "http://evil.example"
JOIN = {"loras": ["demo_style", "demo_other"]}
SECRET = b"TOPSECRET"


# --------------------------------------------------------------------------- raw HTTP


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def send(port: int, method: str, path: str, headers: dict | None = None, body: bytes = b"",
         host: str | None = None) -> tuple[int, dict[str, str], bytes]:
    """One request exactly as written (path, Host and all headers), as a browser or attacker sends it."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        if host != "":  # "": no Host header at all
            conn.putheader("Host", host or f"127.0.0.1:{port}")
        for key, value in (headers or {}).items():
            conn.putheader(key, value)
        if method not in ("GET", "HEAD"):
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body or None)
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def post_json(port: int, path: str, body, headers: dict | None = None, host: str | None = None):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return send(port, "POST", path, {"Content-Type": "application/json", **(headers or {})}, data, host)


def ws_handshake(port: int, path: str, headers: dict | None = None, host: str | None = None) -> int:
    """The status a websocket upgrade gets (101 = accepted); browsers send Origin, never a preflight."""
    lines = [f"GET {path} HTTP/1.1", f"Host: {host or f'127.0.0.1:{port}'}", "Upgrade: websocket",
             "Connection: Upgrade", "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version: 13",
             *(f"{k}: {v}" for k, v in (headers or {}).items()), "", ""]
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall("\r\n".join(lines).encode())
        head = b""
        while b"\r\n" not in head:
            chunk = s.recv(4096)
            if not chunk:
                break
            head += chunk
    return int(head.split(b"\r\n", 1)[0].split()[1])


# --------------------------------------------------------------------------- forged requests

# (what, headers, Host) of requests a foreign page makes the user's browser send; each must be
# refused before it reaches an operation
FORGED = [
    ("text/plain simple request", {"Content-Type": "text/plain", "Origin": EVIL}, None),
    ("text/plain without Origin (old browser, no-cors)", {"Content-Type": "text/plain;charset=UTF-8"}, None),
    ("form post", {"Content-Type": "application/x-www-form-urlencoded", "Origin": EVIL}, None),
    ("multipart form post", {"Content-Type": "multipart/form-data; boundary=x", "Origin": EVIL}, None),
    ("Blob body without a type", {}, None),
    ("JSON from a foreign origin", {"Content-Type": "application/json", "Origin": EVIL}, None),
    ("JSON from Origin null (sandboxed iframe, data: URL)", {"Content-Type": "application/json", "Origin": "null"},
     None),
    ("JSON from another port of this machine", {"Content-Type": "application/json",
                                                "Origin": "http://127.0.0.1:1"}, None),
    ("JSON with Sec-Fetch-Site cross-site", {"Content-Type": "application/json", "Sec-Fetch-Site": "cross-site",
                                             "Sec-Fetch-Mode": "no-cors"}, None),
    ("DNS rebinding (evil.example → 127.0.0.1)", {"Content-Type": "application/json",
                                                  "Origin": "http://evil.example:{port}"}, "evil.example:{port}"),
    ("DNS rebinding, no Origin (GET-like tools)", {"Content-Type": "application/json"}, "evil.example:{port}"),
]


def forge(port: int, method: str, path: str, headers: dict, host: str | None, body: bytes = b""):
    fill = {k: v.format(port=port) for k, v in headers.items()}
    return send(port, method, path, fill, body, host.format(port=port) if host is not None else None)


def refused(status: int, headers: dict, body: bytes) -> bool:
    """Refused, not merely failed: 403 (who) or 415 (what), never a wildcard CORS grant."""
    return status in (403, 415) and headers.get("access-control-allow-origin") != "*"


def assert_forged_join_refused(port: int, models: Path, what: str, headers: dict, host: str | None) -> None:
    """A join a foreign page asks for (into its own output name): refused, nothing written."""
    out = "pwned_" + "".join(c if c.isalnum() else "_" for c in what)
    status, resp, body = forge(port, "POST", "/ortholora/v1/join", headers, host,
                               json.dumps({**JOIN, "out": out}).encode())
    assert refused(status, resp, body), (what, status, body[:300])
    assert not (models / "Lora" / f"{out}.safetensors").exists()


# --------------------------------------------------------------------------- the standalone server


@pytest.fixture(scope="module")
def bait(tmp_path_factory, demo_root):
    """A working directory as careless as they come: a secret file, symlinks to a folder and a file
    outside it, and the models folder itself inside it."""
    root = tmp_path_factory.mktemp("bait")
    cwd, outside = root / "cwd", root / "outside"
    cwd.mkdir()
    outside.mkdir()
    (cwd / "secret.txt").write_bytes(SECRET + b"-cwd")
    (outside / "outside.txt").write_bytes(SECRET + b"-outside")
    (cwd / "link").symlink_to(outside, target_is_directory=True)
    (cwd / "filelink.txt").symlink_to(outside / "outside.txt")
    (cwd / "rootlink").symlink_to("/", target_is_directory=True)
    shutil.copytree(demo_root, cwd / "models")
    return cwd


@pytest.fixture(scope="module")
def standalone(bait):
    """`serve(...)` on a free loopback port, started from the bait directory."""
    old = os.getcwd()
    os.chdir(bait)
    port = free_port()
    blocks = None
    try:
        blocks, app, url = serve(bait / "models", host="127.0.0.1", port=port, block=False, quiet=True)
        yield port, blocks, bait / "models"
    finally:
        if blocks is not None:
            blocks.close()
        os.chdir(old)


@pytest.mark.parametrize("what, headers, host", FORGED, ids=[f[0] for f in FORGED])
def test_standalone_api_refuses_forged_writes(standalone, what, headers, host):
    port, _, models = standalone
    assert_forged_join_refused(port, models, what, headers, host)


def test_standalone_api_serves_scripts_and_the_page(standalone):
    port, _, models = standalone
    # curl / requests: JSON, no Origin
    status, _, body = post_json(port, "/ortholora/v1/join", {**JOIN, "out": "from_script"})
    assert status == 200, body[:300]
    assert (models / "Lora" / "from_script.safetensors").is_file()
    # the tab's own page (same origin; localhost works like 127.0.0.1)
    for origin, host in ((f"http://127.0.0.1:{port}", None), (f"http://localhost:{port}", f"localhost:{port}")):
        status, _, body = post_json(port, "/ortholora/v1/inspect", {"file": "from_script"}, {"Origin": origin}, host)
        assert status == 200, (origin, body[:300])
    status, _, body = send(port, "GET", "/ortholora/v1/files", {"Sec-Fetch-Site": "same-origin"})
    assert status == 200 and "from_script.safetensors" in json.loads(body)["loras"]


GRADIO_POSTS = ["/run/predict", "/api/predict", "/reset", "/upload", "/login", "/queue/join"]


@pytest.mark.parametrize("path", GRADIO_POSTS)
@pytest.mark.parametrize("what, headers, host", FORGED, ids=[f[0] for f in FORGED])
def test_standalone_gradio_refuses_forged_posts(standalone, path, what, headers, host):
    port = standalone[0]
    body = json.dumps({"fn_index": 0, "data": [], "session_hash": "x"}).encode()
    status, resp, out = forge(port, "POST", path, headers, host, body)
    assert refused(status, resp, out), (what, status, out[:300])


@pytest.mark.parametrize("headers, host", [
    ({"Origin": EVIL}, None),
    ({"Origin": "null"}, None),
    ({"Origin": "http://127.0.0.1:1"}, None),
    ({"Origin": "http://evil.example:{port}"}, "evil.example:{port}"),
    ({}, "evil.example:{port}"),
    ({"Origin": "http://127.0.0.1:{port}", "Sec-Fetch-Site": "cross-site"}, None),
], ids=["foreign", "null", "other-port", "rebinding", "rebinding-no-origin", "sec-fetch-cross-site"])
def test_standalone_queue_websocket_refuses_foreign_pages(standalone, headers, host):
    port = standalone[0]
    fill = {k: v.format(port=port) for k, v in headers.items()}
    assert ws_handshake(port, "/queue/join", fill, host.format(port=port) if host else None) == 403


def test_standalone_queue_websocket_serves_its_page(standalone):
    port = standalone[0]
    assert ws_handshake(port, "/queue/join", {"Origin": f"http://127.0.0.1:{port}"}) == 101
    assert ws_handshake(port, "/queue/join") == 101  # a local script (gradio_client)


def _file_attacks(cwd: Path, port: int) -> list[str]:
    return [
        "/file=secret.txt", "/file=./secret.txt", f"/file={cwd}/secret.txt", "/file=%73ecret.txt",
        "/file=link/outside.txt", "/file=link%2Foutside.txt", "/file=filelink.txt", f"/file={cwd}/link/outside.txt",
        "/file=rootlink/etc/hostname", "/file=rootlink/etc/passwd", "/file=/etc/passwd", "/file=//etc/passwd",
        "/file=../cwd/secret.txt", "/file=..%2Fcwd%2Fsecret.txt", "/file=%2e%2e/cwd/secret.txt",
        "/file=%252e%252e%252fcwd%252fsecret.txt", "/file=..\\cwd\\secret.txt", "/file=.%5Csecret.txt",
        "/file=models/Lora/demo_style.safetensors", f"/file={cwd}/models/Stable-diffusion/sd15_base.safetensors",
        "/file/secret.txt", "/file/link/outside.txt", "/file=/proc/self/environ", "/file=/proc/self/cwd/secret.txt",
        f"/file=http://127.0.0.1:{port}/config", "/file=https://evil.example/x", "/file%3Dsecret.txt",
        "/file=secret.txt/", "/file=link/",
    ]


def test_standalone_file_route_serves_nothing_but_gradio_temp_files(standalone, bait):
    port = standalone[0]
    for path in _file_attacks(bait, port):
        for method in ("GET", "HEAD"):
            status, headers, body = send(port, method, path)
            assert status == 403, (method, path, status, body[:200])
            assert SECRET not in body and "access-control-allow-origin" not in headers, path


def test_standalone_other_routes_serve_no_local_file(standalone, bait):
    port = standalone[0]
    for path in ("//file=secret.txt", "/static/..%2F..%2F..%2Fsecret.txt", "/assets/%2e%2e/%2e%2e/secret.txt",
                 "/static/%2e%2e%2f%2e%2e%2fetc%2fpasswd", f"/proxy=http://127.0.0.1:{port}/file=secret.txt",
                 "/favicon.ico/../secret.txt", "/secret.txt", "/models/Lora/demo_style.safetensors"):
        status, _, body = send(port, "GET", path)
        assert status >= 400 and SECRET not in body and b"root:" not in body, (path, status)


def test_standalone_file_route_still_serves_gradio_temp_files(standalone, tmp_path):
    """Plots and downloads: files gradio itself copied into its temp folder (and only while they
    are still those files)."""
    port, blocks, _ = standalone
    component = next(b for b in blocks.blocks.values() if hasattr(b, "make_temp_copy_if_needed"))
    src = tmp_path / "download.txt"
    src.write_bytes(b"a download " + os.urandom(8).hex().encode())
    temp = component.make_temp_copy_if_needed(src)
    assert temp != str(src)
    status, headers, body = send(port, "GET", f"/file={temp}", {"Sec-Fetch-Site": "same-origin"})
    assert status == 200 and body == src.read_bytes()
    assert "access-control-allow-origin" not in headers
    # the same file for an <img> on a foreign page: refused
    status, _, _ = send(port, "GET", f"/file={temp}", {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors",
                                                       "Sec-Fetch-Dest": "image"})
    assert status == 403
    # a temp file swapped for a symlink to a secret: refused
    os.unlink(temp)
    os.symlink(bait_secret := tmp_path / "secret.txt", temp)
    bait_secret.write_bytes(SECRET)
    status, _, body = send(port, "GET", f"/file={temp}")
    assert status == 403 and SECRET not in body
    os.unlink(temp)


def test_standalone_no_wildcard_cors_and_no_config_for_foreign_pages(standalone, bait):
    port = standalone[0]
    status, headers, body = send(port, "GET", "/config", {"Origin": EVIL})
    assert status == 403 and str(bait).encode() not in body
    status, headers, body = send(port, "GET", "/config", host=f"evil.example:{port}")
    assert status == 403 and str(bait).encode() not in body
    status, headers, _ = send(port, "GET", "/config")  # the page itself, or curl
    assert status == 200 and "access-control-allow-origin" not in headers
    status, headers, _ = send(port, "OPTIONS", "/ortholora/v1/join", {
        "Origin": EVIL, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"})
    assert "access-control-allow-origin" not in headers and status >= 400
    # a foreign page may not even embed it (clickjacking) or load its scripts
    status, headers, _ = send(port, "GET", "/", {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate",
                                                 "Sec-Fetch-Dest": "iframe"})
    assert status == 403
    status, headers, _ = send(port, "GET", "/")
    assert status == 200 and "frame-ancestors 'self'" in headers.get("content-security-policy", "")
    # a link followed from another site still opens the page
    status, _, _ = send(port, "GET", "/", {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate",
                                           "Sec-Fetch-Dest": "document"})
    assert status == 200


def test_standalone_refusals_are_one_line_json(standalone):
    port = standalone[0]
    status, headers, body = post_json(port, "/run/predict", {"fn_index": 0, "data": []}, {"Origin": EVIL})
    detail = json.loads(body)["detail"]
    assert status == 403 and "evil.example" in detail and "\n" not in detail
    status, _, body = send(port, "POST", "/ortholora/v1/join", {"Content-Type": "text/plain"}, b"{}")
    detail = json.loads(body)["detail"]
    assert status == 415 and "application/json" in detail
    status, _, body = send(port, "GET", "/config", host="evil.example")
    detail = json.loads(body)["detail"]
    assert status == 403 and "evil.example" in detail and "--allow-host" in detail


def test_standalone_lan_address_when_asked(tmp_path, demo_root):
    """`--host 0.0.0.0` (or a LAN address): reachable by address; names only when allowed."""
    port = free_port()
    models = Path(shutil.copytree(demo_root, tmp_path / "models"))
    blocks, _, _ = serve(models, host="0.0.0.0", port=port, block=False, quiet=True, allow_hosts=["studio.lan"])
    try:
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"192.0.2.7:{port}", f"[::1]:{port}",
                     f"studio.lan:{port}", f"STUDIO.LAN.:{port}"):
            status, _, body = send(port, "GET", "/ortholora/v1/files", host=host)
            assert status == 200, (host, body[:200])
        for host in (f"evil.example:{port}", f"studio.lan.evil.example:{port}", "", f"127.0.0.1.evil.example:{port}"):
            status, _, _ = send(port, "GET", "/ortholora/v1/files", host=host)
            assert status in (400, 403), host
        # the same origin by address works; a foreign origin still does not
        status, _, _ = post_json(port, "/ortholora/v1/inspect", {"file": "demo_style"},
                                 {"Origin": f"http://192.0.2.7:{port}"}, f"192.0.2.7:{port}")
        assert status == 200
        status, _, _ = post_json(port, "/ortholora/v1/inspect", {"file": "demo_style"},
                                 {"Origin": f"http://192.0.2.8:{port}"}, f"192.0.2.7:{port}")
        assert status == 403
    finally:
        blocks.close()


# --------------------------------------------------------------------------- request bodies


NESTED = b"[" * 100_000 + b"]" * 100_000


@pytest.mark.parametrize("body", [NESTED, b'{"file": ' + NESTED + b"}", b'{"file": "x", "arch": ' + b"[" * 900
                                  + b"]" * 900 + b"}"], ids=["top", "in-option", "deep-but-parseable"])
def test_standalone_api_deeply_nested_json_is_400(standalone, body):
    port = standalone[0]
    status, _, out = post_json(port, "/ortholora/v1/inspect", body)
    detail = json.loads(out)["detail"]
    assert status == 400 and "\n" not in detail and len(detail) < 1000, detail[:300]


def test_standalone_gradio_deeply_nested_json_is_not_500(standalone):
    port = standalone[0]
    status, _, _ = post_json(port, "/run/predict", NESTED)
    assert 400 <= status < 500


def test_standalone_api_does_not_echo_a_huge_input(standalone):
    port, _, models = standalone
    status, _, out = post_json(port, "/ortholora/v1/inspect", {"file": "x" * 500_000})
    detail = json.loads(out)["detail"]
    assert status == 400 and "no LoRA named" in detail and len(detail) < 1000
    status, _, out = post_json(port, "/ortholora/v1/inspect", {"y" * 500_000: 1})
    detail = json.loads(out)["detail"]
    assert status == 400 and "unknown option" in detail and len(detail) < 1000
    status, _, out = post_json(port, "/ortholora/v1/inspect", {"file": "x" * 3_000_000})
    assert status == 413 and len(json.loads(out)["detail"]) < 1000


# --------------------------------------------------------------------------- inside the webui


@contextlib.contextmanager
def running(app):
    """A FastAPI app on a real uvicorn server (loopback, free port) for the duration."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    end = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < end, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(30)


def _webui_app(webui, **cmd_opts):
    app = FastAPI()

    @app.post("/sdapi/v1/other-extension")
    async def other(request: Request):
        return {"got": (await request.body()).decode()}

    webui.shared.cmd_opts.api = True
    for key, value in cmd_opts.items():
        setattr(webui.shared.cmd_opts, key, value)
    webui.tab.on_app_started(None, app)
    return app


@pytest.mark.parametrize("what, headers, host", FORGED, ids=[f[0] for f in FORGED])
def test_webui_routes_refuse_forged_writes(webui, what, headers, host):
    with running(_webui_app(webui)) as port:
        assert_forged_join_refused(port, webui.models, what, headers, host)


def test_webui_routes_serve_scripts_the_page_and_leave_other_routes_alone(webui, monkeypatch):
    with running(_webui_app(webui)) as port:
        status, _, body = post_json(port, "/ortholora/v1/join", {**JOIN, "out": "ok1"})
        assert status == 200, body[:300]
        status, _, body = post_json(port, "/ortholora/v1/inspect", {"file": "ok1"},
                                    {"Origin": f"http://localhost:{port}"}, f"localhost:{port}")
        assert status == 200, body[:300]
        # only our routes are guarded: another extension's route is the webui's business
        status, _, body = send(port, "POST", "/sdapi/v1/other-extension",
                               {"Content-Type": "text/plain", "Origin": EVIL}, b"hello")
        assert status == 200 and json.loads(body) == {"got": "hello"}
        status, _, body = post_json(port, "/ortholora/v1/inspect", b"[" * 100_000)
        assert status == 400


def test_webui_routes_follow_listen_cors_and_allowed_hosts(webui, monkeypatch):
    # --listen: any address of the machine, names only when allowed
    monkeypatch.setenv("ORTHOLORA_ALLOWED_HOSTS", "sd.example, studio.lan")
    app = _webui_app(webui, listen=True, cors_allow_origins="http://app.example,http://other.example",
                     cors_allow_origins_regex=r"https://.*\.trusted\.example")
    with running(app) as port:
        for host in (f"192.0.2.7:{port}", f"sd.example:{port}", "studio.lan"):
            assert send(port, "GET", "/ortholora/v1/files", host=host)[0] == 200, host
        assert send(port, "GET", "/ortholora/v1/files", host=f"evil.example:{port}")[0] == 403
        # origins the user allowed with --cors-allow-origins(-regex) may drive the API
        for origin in ("http://app.example", "https://ui.trusted.example"):
            status, _, body = post_json(port, "/ortholora/v1/inspect", {"file": "demo_style"}, {"Origin": origin})
            assert status == 200, (origin, body[:200])
        assert post_json(port, "/ortholora/v1/inspect", {"file": "demo_style"}, {"Origin": EVIL})[0] == 403
        # but never a non-JSON body
        status, _, _ = send(port, "POST", "/ortholora/v1/inspect",
                            {"Content-Type": "text/plain", "Origin": "http://app.example"}, b'{"file": "demo_style"}')
        assert status == 415


def test_webui_routes_behind_a_tunnel_take_any_host_but_still_no_foreign_origin(webui, monkeypatch):
    """--share / --ngrok: the tunnel's name is not known in advance; Origin and JSON rules stay."""
    monkeypatch.delenv("ORTHOLORA_ALLOWED_HOSTS", raising=False)
    for opts in ({"share": True}, {"ngrok": "token"}, {}):
        for key in ("share", "ngrok"):
            monkeypatch.setattr(webui.shared.cmd_opts, key, opts.get(key), raising=False)
        policy = webui.tab.request_policy()
        tunnel = {"host": "abc123.gradio.live", "content-type": "application/json"}
        assert (policy.refusal("POST", tunnel) is None) == bool(opts), opts
        assert policy.refusal("POST", {**tunnel, "origin": EVIL})[0] == 403
        assert policy.refusal("POST", {**tunnel, "content-type": "text/plain"})[0] in (403, 415)


def test_webui_routes_keep_api_auth(webui):
    with running(_webui_app(webui, api_auth="alice:secret")) as port:
        assert send(port, "GET", "/ortholora/v1/files")[0] == 401
        import base64
        auth = {"Authorization": "Basic " + base64.b64encode(b"alice:secret").decode()}
        assert send(port, "GET", "/ortholora/v1/files", auth)[0] == 200
        # a rebinding page gets no login prompt, just the refusal
        assert send(port, "GET", "/ortholora/v1/files", auth, host="evil.example")[0] == 403


# --------------------------------------------------------------------------- the LoRA folder


def test_symlink_loops_in_the_lora_folder_end_the_listing(tmp_path, demo_root):
    """Two loops (each folder links back to the root) used to branch forever; each file is listed
    once, and a symlinked folder that is not a loop still is."""
    models = Path(shutil.copytree(demo_root, tmp_path / "models"))
    lora = models / "Lora"
    (lora / "sub").mkdir()
    shutil.copy(lora / "demo_style.safetensors", lora / "sub" / "nested.safetensors")
    (lora / "loop1").symlink_to(lora, target_is_directory=True)
    (lora / "sub" / "loop2").symlink_to(lora, target_is_directory=True)
    (lora / "zz_alias").symlink_to(lora / "sub", target_is_directory=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(lora / "demo_other.safetensors", elsewhere / "linked.safetensors")
    (lora / "ext").symlink_to(elsewhere, target_is_directory=True)
    code = ("import json, sys; from lib_ortholora.ui.folders import Folders; from lib_ortholora.ui import UiConfig;"
            "print(json.dumps(Folders(UiConfig.for_models(sys.argv[1])).lora_names()))")
    try:
        run = subprocess.run([sys.executable, "-c", code, str(models)], cwd=ROOT, capture_output=True, text=True,
                             timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("listing a LoRA folder with two symlink loops did not end within 60 s")
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout) == ["demo_joined.safetensors", "demo_other.safetensors", "demo_style.safetensors",
                                      "ext/linked.safetensors", "sub/nested.safetensors"]


# --------------------------------------------------------------------------- the `ui` command


def _ui(tmp_path, demo_root, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "lib_ortholora", "ui", "--models", str(demo_root), *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def test_ui_on_a_busy_port_or_a_bad_host_is_one_line_exit_2(tmp_path, demo_root):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cases = [(["--port", str(port)], str(port)),
                 (["--host", "no-such-host.invalid"], "no-such-host.invalid"),
                 (["--host", "192.0.2.1"], "192.0.2.1"),
                 (["--port", "70000"], "70000")]
        for args, named in cases:
            run = _ui(tmp_path, demo_root, *args)
            lines = run.stderr.strip().splitlines()
            assert run.returncode == 2 and len(lines) == 1, (args, run.returncode, run.stderr[-2000:])
            assert lines[0].startswith("error: ") and named in lines[0] and "Traceback" not in run.stderr

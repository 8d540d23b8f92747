"""The tab without the webui: `python -m lib_ortholora ui [--models DIR]`. DIR has the webui's
layout (DIR/Lora, DIR/Stable-diffusion); without it a demo folder of tiny synthetic models is built
once (`demo-models` in the cache folder, `paths.cache_dir`, or a temporary folder).

Every request passes `guard.RequestGuard` (gradio's page, queue, websocket and file routes as well
as the API): only Host names of the address served, no other origin, JSON bodies only, and
`/file=` serves nothing but gradio's own temp files."""
from __future__ import annotations

import functools
import ipaddress
import os
import socket
import sys
import tempfile
from pathlib import Path
from typing import Iterable

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from ..errors import OrthoLoraError  # noqa: E402
from ..paths import cache_dir  # noqa: E402
from ..progress import Progress  # noqa: E402
from .config import UiConfig  # noqa: E402
from .guard import RequestPolicy, normalize_name  # noqa: E402

GRADIO_PORTS = range(7860, 7960)  # gradio's own default range

DEMO_MARK = ".ortholora-demo-v1"


def default_demo_dir() -> Path:
    """`demo-models` in the cache folder when it can be written, else a temporary folder."""
    cache = cache_dir("demo-models")
    try:
        cache.mkdir(parents=True, exist_ok=True)
        probe = cache / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
        return cache
    except OSError:
        return Path(tempfile.mkdtemp(prefix="ortholora-demo-models-"))


def demo_models(folder: str | os.PathLike | None = None, progress: Progress | None = None) -> Path:
    """Build (once) tiny synthetic SD1.5 models in the webui layout: a base/tuned pair in
    Stable-diffusion/, and in Lora/ `demo_style` (extracted from the pair), `demo_other` (from a
    pair of another seed) and `demo_joined` (both joined, with slices)."""
    from ..extract import extract_lora
    from ..join import join_loras
    from ..synth import write_pair

    root = Path(folder) if folder is not None else default_demo_dir()
    if (root / DEMO_MARK).exists() and (root / "Stable-diffusion" / "sd15_base.safetensors").exists():
        return root
    ckpt, lora = root / "Stable-diffusion", root / "Lora"
    ckpt.mkdir(parents=True, exist_ok=True)
    lora.mkdir(parents=True, exist_ok=True)
    base, tuned = write_pair("sd15", ckpt, overwrite=True, progress=progress)
    extract_lora(base, tuned, 8, save_path=lora / "demo_style.safetensors", overwrite=True)
    with tempfile.TemporaryDirectory(prefix="ortholora-demo-") as tmp:
        base2, tuned2 = write_pair("sd15", tmp, seed=1, overwrite=True)
        extract_lora(base2, tuned2, 8, save_path=lora / "demo_other.safetensors", overwrite=True)
    join_loras([lora / "demo_style.safetensors", lora / "demo_other.safetensors"],
               lora / "demo_joined.safetensors", names=["style", "other"], overwrite=True)
    (root / DEMO_MARK).write_text("tiny synthetic SD1.5 models written by lib_ortholora.ui.standalone\n")
    return root


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def listen_port(host: str, port: int | None) -> int:
    """The port to serve on (`port`, or the first free one of gradio's range), checked by binding
    it on `host` now; OrthoLoraError (one line) for an address or port this machine cannot serve."""
    if port is not None and not 0 < port < 65536:
        raise OrthoLoraError(f"port {port}: must be between 1 and 65535")
    try:
        family, _, _, _, address = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except (OSError, ValueError) as e:  # ValueError: NUL bytes, bad IDNA names
        raise OrthoLoraError(f"host {host!r}: not an address this machine can listen on "
                             f"({getattr(e, 'strerror', None) or e})") from None
    error: OSError | None = None
    for candidate in [port] if port is not None else GRADIO_PORTS:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((address[0], candidate, *address[2:]))
                return candidate
            except OSError as e:
                error = e
    ports = port if port is not None else f"{GRADIO_PORTS[0]}-{GRADIO_PORTS[-1]}"
    raise OrthoLoraError(f"cannot listen on {host} port {ports}: {(error and error.strerror) or error}")


def serve(models: str | os.PathLike | None = None, host: str = "127.0.0.1", port: int | None = None,
          cfg: UiConfig | None = None, block: bool = True, api: bool = True, quiet: bool = False,
          allow_hosts: Iterable[str] = ()):
    """Serve the tab (and the HTTP API under /ortholora/v1) on host:port. Requests must name the
    server by `host` (any address of the machine when it is 0.0.0.0 or ::, plus `localhost` for
    those and loopback) or by one of `allow_hosts` ("*": any name). Returns (blocks, app, url);
    with `block` it serves until interrupted, then closes. A bad host or a busy port raises
    OrthoLoraError before anything is built."""
    host = normalize_name(host or "127.0.0.1")
    port = listen_port(host, port)
    policy = RequestPolicy.for_address(host, allow_hosts)

    from starlette.middleware import Middleware

    from . import compat
    from .api import add_routes
    from .app import build_tab
    from .guard import RequestGuard, drop_cors

    if cfg is None:
        if models is None:
            print("building the demo models (first run only)…", file=sys.stderr)
            models = demo_models()
        cfg = UiConfig.for_models(models)
    for folder in (cfg.lora_dir, *cfg.ckpt_dirs):
        Path(folder).mkdir(parents=True, exist_ok=True)
    if not _loopback(host):
        print(f"warning: serving on {host}: anyone who can reach it can read and write model files in these "
              "folders", file=sys.stderr)
    blocks = build_tab(cfg, standalone=True)
    compat.queue(blocks)
    guard = Middleware(RequestGuard, policy=policy, file_allowed=functools.partial(compat.made_by_gradio, blocks))
    try:  # the guard is in place from the first request on; gradio's wildcard CORS goes right after
        app, url, _ = blocks.launch(server_name=f"[{host}]" if ":" in host else host, server_port=port,
                                    prevent_thread_lock=True, quiet=True, show_api=False, inbrowser=False,
                                    app_kwargs={"middleware": [guard]})
    except OSError as e:
        raise OrthoLoraError(f"cannot serve on {host} port {port}: {e}") from None
    drop_cors(app)
    if api:
        add_routes(app, cfg, policy=policy)
    if not quiet:
        print(f"LoRA Toolbox on {url}  (models: {cfg.lora_dir.parent}; Ctrl+C stops)", flush=True)
    if block:
        try:
            blocks.block_thread()
        finally:
            blocks.close()
    return blocks, app, url

"""The tab without the webui: `python -m lib_ortholora ui [--models DIR]`. DIR has the webui's
layout (DIR/Lora, DIR/Stable-diffusion); without it a demo folder of tiny synthetic models is built
once (~/.cache/ortholora/demo-models, or a temporary folder)."""
from __future__ import annotations

import ipaddress
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from ..progress import Progress  # noqa: E402
from .config import UiConfig  # noqa: E402

DEMO_MARK = ".ortholora-demo-v1"


def default_demo_dir() -> Path:
    """~/.cache/ortholora/demo-models when it can be written, else a temporary folder."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ortholora" / "demo-models"
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
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(models: str | os.PathLike | None = None, host: str = "127.0.0.1", port: int | None = None,
          cfg: UiConfig | None = None, block: bool = True, api: bool = True, quiet: bool = False):
    """Serve the tab (and the HTTP API under /ortholora/v1) on host:port. Returns
    (blocks, app, url); with `block` it serves until interrupted, then closes."""
    from . import compat
    from .api import add_routes
    from .app import build_tab

    if cfg is None:
        if models is None:
            print("building the demo models (first run only)…", file=sys.stderr)
            models = demo_models()
        cfg = UiConfig.for_models(models)
    for folder in (cfg.lora_dir, *cfg.ckpt_dirs):
        Path(folder).mkdir(parents=True, exist_ok=True)
    if not _loopback(host):
        print(f"warning: serving on {host}: anyone who can reach it can read and write model files "
              "in these folders", file=sys.stderr)
    blocks = build_tab(cfg, standalone=True)
    compat.queue(blocks)
    app, url, _ = blocks.launch(server_name=host, server_port=port, prevent_thread_lock=True, quiet=True,
                                show_api=False, inbrowser=False)
    if api:
        add_routes(app, cfg)
    if not quiet:
        print(f"LoRA Toolbox on {url}  (models: {cfg.lora_dir.parent}; Ctrl+C stops)", flush=True)
    if block:
        try:
            blocks.block_thread()
        finally:
            blocks.close()
    return blocks, app, url

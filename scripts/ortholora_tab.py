"""Webui adapter of the LoRA Toolbox: the tab (lib_ortholora.ui), its settings section, and the
HTTP API under /ortholora/v1. Everything here only translates between the webui and
`lib_ortholora.ui.UiConfig`; the tab itself imports nothing of the webui.

The API routes (and only they: the webui's own and other extensions' routes are left alone)
refuse non-JSON bodies, other origins than the page's (except --cors-allow-origins(-regex)), and
Host names the webui does not listen on (loopback; with --listen any address; --server-name;
names in the ORTHOLORA_ALLOWED_HOSTS environment variable; any behind --share / --ngrok), then
check --api-auth.

Folders: LoRAs in `--lora-dir` (default models/Lora); checkpoints from the webui's own list
(`modules.sd_models.checkpoints_list`) or `--ckpt-dir` and models/Stable-diffusion. Anything that
cannot be imported degrades: no settings, no API, or a tab that says what is missing."""
import logging
import os
import secrets

from lib_ortholora.paths import LORA_SUFFIXES
from lib_ortholora.ui.config import DEFAULT_RANK_POLICY, DEVICES, DTYPES, Defaults, UiConfig
from lib_ortholora.ui.guard import RequestPolicy
from modules import script_callbacks, shared

log = logging.getLogger("ortholora")

TAB_TITLE, TAB_ID = "LoRA Toolbox", "ortholora"
SECTION = ("ortholora", "LoRA Toolbox")
OPT_DEVICE, OPT_DTYPE, OPT_RANK, OPT_HOOK = ("ortholora_device", "ortholora_dtype", "ortholora_rank_policy",
                                             "ortholora_hook_enabled")


def _models_path():
    try:
        from modules import paths
        return paths.models_path
    except (ImportError, AttributeError):
        return os.path.join(os.getcwd(), "models")


def lora_dir():
    return getattr(shared.cmd_opts, "lora_dir", None) or os.path.join(_models_path(), "Lora")


def ckpt_dirs():
    found = []
    for folder in (getattr(shared.cmd_opts, "ckpt_dir", None), os.path.join(_models_path(), "Stable-diffusion")):
        if folder and os.path.abspath(folder) not in [os.path.abspath(f) for f in found]:
            found.append(folder)
    return found


def list_checkpoints():
    """{label: file} from the webui's checkpoint list (empty when it is not available)."""
    try:
        from modules import sd_models
    except ImportError:
        return {}
    out = {}
    for title, info in dict(getattr(sd_models, "checkpoints_list", None) or {}).items():
        filename = getattr(info, "filename", None)
        if filename:
            out[getattr(info, "name", None) or title] = filename
    return out


def defaults():
    opts = shared.opts
    return Defaults(getattr(opts, OPT_DEVICE, "auto"), getattr(opts, OPT_DTYPE, "fp16"),
                    getattr(opts, OPT_RANK, DEFAULT_RANK_POLICY))


def on_written(path):
    """A new LoRA → the webui's LoRA list learns it (the JS side refreshes the cards)."""
    if not str(path).lower().endswith(LORA_SUFFIXES):
        return
    try:
        if os.path.commonpath([os.path.abspath(path), os.path.abspath(lora_dir())]) != os.path.abspath(lora_dir()):
            return
    except ValueError:
        return
    try:
        import networks
    except ImportError:
        return
    stem = os.path.splitext(os.path.basename(path))[0]
    if hasattr(networks, "update_available_networks_by_names"):
        networks.update_available_networks_by_names([stem])
    elif hasattr(networks, "list_available_networks"):
        networks.list_available_networks()


def webui_config():
    return UiConfig(lora_dir(), ckpt_dirs(), defaults=defaults, list_checkpoints=list_checkpoints,
                    on_written=on_written, title=TAB_TITLE)


def on_ui_tabs():
    import gradio as gr
    try:
        from lib_ortholora.ui import build_tab
        blocks = build_tab(webui_config())
    except Exception as e:  # noqa: BLE001 - the rest of the webui must come up regardless
        log.exception("LoRA Toolbox: the tab could not be built")
        with gr.Blocks(analytics_enabled=False) as blocks:
            gr.Markdown(f"**LoRA Toolbox could not start:** {type(e).__name__}: {e}")
    return [(blocks, TAB_TITLE, TAB_ID)]


def on_ui_settings():
    try:
        import gradio as gr
        radio = gr.Radio
    except ImportError:
        radio = None

    def option(key, default, label, choices=None):
        info = shared.OptionInfo(default, label, radio if choices else None,
                                 {"choices": list(choices)} if choices else None, section=SECTION)
        if key != OPT_HOOK and hasattr(info, "needs_reload_ui"):
            info = info.needs_reload_ui()
        shared.opts.add_option(key, info)

    option(OPT_DEVICE, "auto", "Default device for extraction (auto = cuda when available)", DEVICES)
    option(OPT_DTYPE, "fp16", "Output dtype of written LoRAs", DTYPES)
    option(OPT_RANK, DEFAULT_RANK_POLICY, "Default rank policy (e.g. 32, fraction=0.08,min=8,max=96, fro=0.99,max=64)")
    option(OPT_HOOK, True, "Apply the v= slice / rank values of joined LoRAs at generation (runtime hook)")


def _api_auth():
    """The webui's --api-auth credentials, applied to our routes too (none when it is not set)."""
    creds = getattr(shared.cmd_opts, "api_auth", None)
    if not creds:
        return []
    from fastapi import Depends, HTTPException
    from fastapi.security import HTTPBasic, HTTPBasicCredentials

    users = dict(c.strip().split(":", 1) for c in str(creds).split(",") if ":" in c)

    def check(credentials: HTTPBasicCredentials = Depends(HTTPBasic())):
        expected = users.get(credentials.username)
        if expected is None or not secrets.compare_digest(credentials.password.encode(), expected.encode()):
            raise HTTPException(status_code=401, detail="Incorrect username or password",
                                headers={"WWW-Authenticate": "Basic"})

    return [Depends(check)]


def _csv(value):
    return [v.strip() for v in str(value or "").split(",") if v.strip()]


def request_policy():
    """Who may call our routes, from the webui's own options (see the module docstring)."""
    opts = shared.cmd_opts
    address = getattr(opts, "server_name", None) or ("0.0.0.0" if getattr(opts, "listen", False) else "127.0.0.1")
    tunnel = bool(getattr(opts, "share", False) or getattr(opts, "ngrok", None))
    origins = frozenset(o.rstrip("/") for o in _csv(getattr(opts, "cors_allow_origins", None)))
    return RequestPolicy.for_address(address, _csv(os.environ.get("ORTHOLORA_ALLOWED_HOSTS")), any_host=tunnel,
                                     origins=origins, origin_regex=getattr(opts, "cors_allow_origins_regex", None),
                                     allow_hint="set ORTHOLORA_ALLOWED_HOSTS=NAME")


def on_app_started(demo, app):
    """Our routes follow the webui's own API: served only when it was started with --api."""
    if not getattr(shared.cmd_opts, "api", False):
        log.info("LoRA Toolbox: HTTP API off (start the webui with --api to serve /ortholora/v1)")
        return
    try:
        from lib_ortholora.ui.api import add_routes
        add_routes(app, webui_config, dependencies=_api_auth(), policy=request_policy())
    except Exception:  # noqa: BLE001
        log.exception("LoRA Toolbox: the HTTP API could not be added")


script_callbacks.on_ui_tabs(on_ui_tabs)
script_callbacks.on_ui_settings(on_ui_settings)
script_callbacks.on_app_started(on_app_started)

"""`ui`: the LoRA Toolbox tab in a browser, without the webui (gradio; loopback by default)."""
from __future__ import annotations

from pathlib import Path


def add(sub) -> None:
    p = sub.add_parser("ui", help="serve the LoRA Toolbox tab standalone (needs gradio)",
                       description="Serves the webui tab on its own. --models DIR uses the webui layout "
                                   "(DIR/Lora, DIR/Stable-diffusion); without it, tiny synthetic demo models "
                                   "are built once under $XDG_CACHE_HOME/ortholora/demo-models (default "
                                   "~/.cache/ortholora/demo-models). The HTTP API is served under /ortholora/v1 "
                                   "too. Requests must name the server as --host does (with 0.0.0.0: any address "
                                   "of this machine; other names with --allow-host), come from the tab's own page or "
                                   "from no page (scripts), and send JSON.")
    p.add_argument("--models", metavar="DIR", help="models folder (default: the demo models)")
    p.add_argument("--port", type=int, help="port (default: gradio's, 7860 or the next free one)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, this machine only; "
                                                       "0.0.0.0: every address, reachable from the network)")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="another name the server may be reached by (e.g. this machine's network name, or a "
                        "reverse proxy's); repeatable")
    p.add_argument("--no-api", action="store_true", help="do not serve the HTTP API")


def run(args):
    try:
        from ..ui.standalone import serve
    except ImportError as e:
        from ..errors import OrthoLoraError
        raise OrthoLoraError(f"the UI needs gradio ({e}); pip install -r requirements-dev.txt") from None
    serve(Path(args.models) if args.models else None, host=args.host, port=args.port, api=not args.no_api,
          allow_hosts=args.allow_host)
    return None

"""HTTP API: `POST /ortholora/v1/{operation}` with a JSON object of the operation's options (the
CLI's, see `ops`), files named relative to the models folders; answers the report as JSON, or
HTTP 400 `{"detail": "<one-line message>"}` for bad input (413 for a body over 1 MiB). `GET
/ortholora/v1/files` lists the LoRAs and checkpoints the API can read. Every route first passes a
`guard.RequestPolicy` (JSON bodies only, no foreign origin or Host)."""
from __future__ import annotations

import inspect
import json
import logging
import math
import reprlib
import types
import typing
from typing import Any, Callable, Sequence, Union

from fastapi import Depends, HTTPException, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from ..errors import OrthoLoraError
from ..report import Report
from . import ops
from .config import UiConfig
from .folders import Folders
from .guard import RequestPolicy, route_dependency
from .runner import notify_written

PREFIX = "/ortholora/v1"
MAX_BODY = 1 << 20  # options only: names, numbers, short texts
MAX_DETAIL = 600  # characters of an error message sent back (it may quote the input)
log = logging.getLogger("ortholora")
_HIDDEN = {"cfg", "progress"}
_QUOTE = reprlib.Repr()
_QUOTE.maxstring = _QUOTE.maxother = 80
_QUOTE.maxlevel, _QUOTE.maxlist, _QUOTE.maxdict = 2, 6, 6


def _quote(value: Any) -> str:
    """repr of a piece of the input, cut short (at any size or depth)."""
    return _QUOTE.repr(value)


def _detail(message: str) -> str:
    return message if len(message) <= MAX_DETAIL else message[:MAX_DETAIL] + "…"


def options(fn: Callable) -> dict[str, tuple[Any, Any]]:
    """{option: (type hint, default or inspect.Parameter.empty)} of an `ops` function."""
    hints = typing.get_type_hints(fn)
    return {name: (hints.get(name, Any), p.default) for name, p in inspect.signature(fn).parameters.items()
            if name not in _HIDDEN}


def _matches(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return any(_matches(value, a) for a in typing.get_args(hint))
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(hint) or (Any,)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    return False


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    if origin is list:
        return f"a list of {_describe(typing.get_args(hint)[0]).removeprefix('a ')}s"
    return {str: "a string", int: "a whole number", float: "a number", bool: "true or false",
            type(None): "null"}.get(hint, str(hint))


def parse_body(op: str, fn: Callable, body: Any) -> dict[str, Any]:
    """Check a JSON body against the operation's options; bad input → OrthoLoraError (one line)."""
    if body is None:
        body = {}
    if not isinstance(body, dict):
        raise OrthoLoraError(f"{op}: the request body must be a JSON object")
    known = options(fn)
    unknown = sorted(k for k in body if k not in known)
    if unknown:
        named = ", ".join(map(_quote, unknown[:5])) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise OrthoLoraError(f"{op}: unknown option(s) {named}; known: {', '.join(known)}")
    missing = [k for k, (_, default) in known.items() if default is inspect.Parameter.empty and k not in body]
    if missing:
        raise OrthoLoraError(f"{op}: missing option(s) {', '.join(map(repr, missing))}")
    for key, value in body.items():
        hint = known[key][0]
        if not _matches(value, hint):
            raise OrthoLoraError(f"{op}: option {key!r} must be {_describe(hint)}, got {_quote(value)}")
    return dict(body)


def _clean(value: Any) -> Any:
    """JSON-safe: non-finite floats → null, tuples → lists, anything else unknown → str."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return str(value)


def run_operation(cfg: UiConfig, op: str, body: Any) -> Report:
    """Validate and run; OrthoLoraError for bad input; on success the host hears of new files."""
    fn = ops.OPERATIONS.get(op)
    if fn is None:
        raise OrthoLoraError(f"unknown operation {op!r}; known: {', '.join(ops.OPERATIONS)}")
    report = fn(cfg, **parse_body(op, fn, body))
    notify_written(cfg, report)
    return report


async def _body(op: str, request: Request) -> Any:
    """The JSON body (None when empty); HTTPException 413 over MAX_BODY, 400 when not JSON."""
    too_big = HTTPException(status_code=413, detail=f"{op}: the request body is over {MAX_BODY} bytes")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY:
        raise too_big
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_BODY:
            raise too_big
    if not raw.strip():
        return None
    try:
        return json.loads(raw)
    except RecursionError:
        raise HTTPException(status_code=400, detail=f"{op}: the request body is nested too deeply") from None
    except ValueError as e:
        raise HTTPException(status_code=400,
                            detail=_detail(f"{op}: the request body is not valid JSON ({e})")) from None


def _endpoint(op: str, get_cfg: Callable[[], UiConfig]):
    async def endpoint(request: Request):
        body = await _body(op, request)
        try:  # in a worker thread: the server keeps answering while the operation runs
            report = await run_in_threadpool(run_operation, get_cfg(), op, body)
        except OrthoLoraError as e:
            raise HTTPException(status_code=400, detail=_detail(str(e))) from None
        except Exception as e:  # noqa: BLE001 - one line to the client, the traceback to the console
            log.exception("LoRA Toolbox API: %s failed", op)
            return JSONResponse({"detail": _detail(f"unexpected {type(e).__name__}: {e}")}, status_code=500)
        return JSONResponse(_clean(report.to_dict()))

    endpoint.__name__ = f"ortholora_{op}"
    endpoint.__doc__ = (ops.OPERATIONS[op].__doc__ or "").strip() + "\n\nOptions: " + ", ".join(
        f"{k} ({_describe(h)}{'' if d is inspect.Parameter.empty else f', default {d!r}'})"
        for k, (h, d) in options(ops.OPERATIONS[op]).items())
    return endpoint


def add_routes(app, cfg: UiConfig | Callable[[], UiConfig], prefix: str = PREFIX,
               dependencies: Sequence = (), policy: RequestPolicy | None = None) -> list[str]:
    """Add the API to a FastAPI app; `cfg` may be a callable returning the current config. Every
    route checks `policy` (default: a server on this machine only, see `guard`) before
    `dependencies` (e.g. the webui's --api-auth). Returns the paths added."""
    get_cfg = cfg if callable(cfg) and not isinstance(cfg, UiConfig) else (lambda: cfg)
    guarded = [Depends(route_dependency(policy or RequestPolicy())), *dependencies]
    paths = []
    for op in ops.OPERATIONS:
        path = f"{prefix}/{op}"
        app.add_api_route(path, _endpoint(op, get_cfg), methods=["POST"], dependencies=guarded,
                          tags=["LoRA Toolbox"])
        paths.append(path)

    def files():
        f = Folders(get_cfg())
        return {"loras": f.lora_names(), "checkpoints": f.checkpoint_names()}

    app.add_api_route(f"{prefix}/files", files, methods=["GET"], dependencies=guarded, tags=["LoRA Toolbox"])
    paths.append(f"{prefix}/files")
    return paths

"""HTTP API: `POST /ortholora/v1/{operation}` with a JSON object of the operation's options (the
CLI's, see `ops`), files named relative to the models folders; answers the report as JSON, or
HTTP 400 `{"detail": "<one-line message>"}` for bad input. `GET /ortholora/v1/files` lists the
LoRAs and checkpoints the API can read."""
from __future__ import annotations

import inspect
import json
import logging
import math
import types
import typing
from typing import Any, Callable, Sequence, Union

from fastapi import HTTPException, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from ..errors import OrthoLoraError
from ..report import Report
from . import ops
from .config import UiConfig
from .folders import Folders
from .runner import notify_written

PREFIX = "/ortholora/v1"
log = logging.getLogger("ortholora")
_HIDDEN = {"cfg", "progress"}


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
        raise OrthoLoraError(f"{op}: unknown option(s) {', '.join(map(repr, unknown))}; "
                             f"known: {', '.join(known)}")
    missing = [k for k, (_, default) in known.items() if default is inspect.Parameter.empty and k not in body]
    if missing:
        raise OrthoLoraError(f"{op}: missing option(s) {', '.join(map(repr, missing))}")
    for key, value in body.items():
        hint = known[key][0]
        if not _matches(value, hint):
            raise OrthoLoraError(f"{op}: option {key!r} must be {_describe(hint)}, got {value!r}")
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


def _endpoint(op: str, get_cfg: Callable[[], UiConfig]):
    async def endpoint(request: Request):
        raw = await request.body()
        try:
            body = json.loads(raw) if raw.strip() else {}
        except ValueError as e:
            raise HTTPException(status_code=400, detail=f"{op}: the request body is not valid JSON ({e})") from None
        try:  # in a worker thread: the server keeps answering while the operation runs
            report = await run_in_threadpool(run_operation, get_cfg(), op, body)
        except OrthoLoraError as e:
            raise HTTPException(status_code=400, detail=str(e)) from None
        except Exception as e:  # noqa: BLE001 - one line to the client, the traceback to the console
            log.exception("LoRA Toolbox API: %s failed", op)
            return JSONResponse({"detail": f"unexpected {type(e).__name__}: {e}"}, status_code=500)
        return JSONResponse(_clean(report.to_dict()))

    endpoint.__name__ = f"ortholora_{op}"
    endpoint.__doc__ = (ops.OPERATIONS[op].__doc__ or "").strip() + "\n\nOptions: " + ", ".join(
        f"{k} ({_describe(h)}{'' if d is inspect.Parameter.empty else f', default {d!r}'})"
        for k, (h, d) in options(ops.OPERATIONS[op]).items())
    return endpoint


def add_routes(app, cfg: UiConfig | Callable[[], UiConfig], prefix: str = PREFIX,
               dependencies: Sequence = ()) -> list[str]:
    """Add the API to a FastAPI app; `cfg` may be a callable returning the current config.
    Returns the paths added."""
    get_cfg = cfg if callable(cfg) and not isinstance(cfg, UiConfig) else (lambda: cfg)
    paths = []
    for op in ops.OPERATIONS:
        path = f"{prefix}/{op}"
        app.add_api_route(path, _endpoint(op, get_cfg), methods=["POST"], dependencies=list(dependencies),
                          tags=["LoRA Toolbox"])
        paths.append(path)

    def files():
        f = Folders(get_cfg())
        return {"loras": f.lora_names(), "checkpoints": f.checkpoint_names()}

    app.add_api_route(f"{prefix}/files", files, methods=["GET"], dependencies=list(dependencies),
                      tags=["LoRA Toolbox"])
    paths.append(f"{prefix}/files")
    return paths

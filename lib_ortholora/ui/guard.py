"""Who may talk to the toolbox over HTTP: the page this server served, and scripts on a machine
that can reach it; never another web page the user happens to have open.

A browser lets any page send some requests to any address without asking first (a "simple"
request: a `text/plain` or form body, a body without a type, a `no-cors` fetch, an `<img>`), opens
websockets to anywhere, and believes a name the attacker controls that resolves to 127.0.0.1 (DNS
rebinding). So a request is refused, with one line of JSON `{"detail": ...}`, when
- its `Host` is not a name this server answers to (403): a rebound name is a foreign one;
- its `Origin` is another origin than the one it was sent to (403), `null` included, unless the
  host application allowed that origin (the webui's `--cors-allow-origins`);
- the browser marks it as coming from another site (`Sec-Fetch-Site`, 403), except a plain
  top-level navigation (following a link to the page shows the page, nothing else);
- it carries a body that is not JSON (415): the only bodies a foreign page can send unasked.
`RequestPolicy` decides; `RequestGuard` applies it to every route and websocket of an ASGI app
(the standalone server, gradio's own routes included) and limits gradio's `/file=` to the files
gradio made; `route_dependency` applies it to single FastAPI routes (ours, inside the webui)."""

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping
from urllib.parse import urlsplit

from ..errors import OrthoLoraError

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}
WILDCARD_ADDRESSES = frozenset({"0.0.0.0", "::"})
FRAME_HEADERS = ((b"content-security-policy", b"frame-ancestors 'self'"), (b"x-frame-options", b"SAMEORIGIN"))


def _ip(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return None


def normalize_name(name: str) -> str:
    """A host name as compared: lower case, no trailing dot, no IPv6 brackets, IPs in canonical form."""
    name = name.strip().lower().rstrip(".")
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    ip = _ip(name)
    return str(ip) if ip is not None else name


def split_host(value: str) -> tuple[str, int | None] | None:
    """`Host` header → (normalized name, port or None); None when it is not a host[:port]."""
    value = value.strip()
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return None
        name, rest = value[:end + 1], value[end + 1:]
    elif value.count(":") == 1:
        name, rest = value.split(":")
        rest = ":" + rest
    else:
        name, rest = value, ""
    if rest and not (rest[0] == ":" and rest[1:].isascii() and rest[1:].isdigit() and len(rest) <= 6):
        return None
    name = normalize_name(name)
    if not name or any(c in name for c in "/\\@?# "):
        return None
    return name, int(rest[1:]) if rest else None


@dataclass(frozen=True)
class RequestPolicy:
    """What a request must look like. `names`: Host names answered (normalized); `loopback`: any
    loopback address too; `any_address`: any IP address (a server bound to every interface:
    an address is never a rebound name); `any_host`: no Host check at all (behind a tunnel whose
    name is not known); `origins` / `origin_regex`: other origins the host application allows;
    `allow_hint`: how the user adds a name, quoted in the refusal."""

    names: frozenset[str] = frozenset({"localhost"})
    loopback: bool = True
    any_address: bool = False
    any_host: bool = False
    origins: frozenset[str] = frozenset()
    origin_regex: str | None = None
    allow_hint: str = "--allow-host NAME"
    _regex: re.Pattern | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.origin_regex:
            object.__setattr__(self, "_regex", re.compile(self.origin_regex))

    @classmethod
    def for_address(cls, address: str, names: Iterable[str] = (), **kwargs) -> "RequestPolicy":
        """The policy of a server listening on `address`: its own name (and `localhost` and the
        loopback addresses when it is loopback or every interface; any address when every
        interface), plus `names` ("*": any Host)."""
        extra = set()
        for raw in names:
            if raw.strip() == "*":
                kwargs["any_host"] = True
                continue
            parsed = split_host(raw)
            if parsed is None:
                raise OrthoLoraError(f"allowed host {raw!r} is not a host name or address")
            extra.add(parsed[0])
        bound = normalize_name(address)
        ip = _ip(bound)
        if bound in WILDCARD_ADDRESSES:
            return cls(frozenset({"localhost", *extra}), loopback=True, any_address=True, **kwargs)
        if bound == "localhost" or (ip is not None and ip.is_loopback):
            return cls(frozenset({"localhost", bound, *extra}), loopback=True, **kwargs)
        return cls(frozenset({bound, *extra}), loopback=False, **kwargs)

    def host_ok(self, name: str) -> bool:
        if self.any_host or name in self.names:
            return True
        ip = _ip(name)
        return ip is not None and (self.any_address or (self.loopback and ip.is_loopback))

    def origin_allowed(self, origin: str) -> bool:
        """An origin the host application allowed explicitly (not merely the same origin)."""
        return origin.rstrip("/") in self.origins or bool(self._regex and self._regex.fullmatch(origin))

    def refusal(self, method: str, headers: Mapping[str, str], websocket: bool = False) -> tuple[int, str] | None:
        """None when the request may go on, else (HTTP status, one-line reason)."""
        host = split_host(headers.get("host") or "")
        if host is None:
            return 400, "refused: no valid Host header"
        if not self.host_ok(host[0]):
            return 403, (f"refused: this server does not answer to the name {host[0][:100]!r} (a page of that site "
                         f"cannot use it); to allow it: {self.allow_hint.replace('NAME', host[0][:100])}")
        origin = headers.get("origin")
        allowed = origin is not None and self.origin_allowed(origin)
        if origin is not None and not allowed and not _same_origin(origin, host):
            return 403, f"refused: a request from another origin ({origin[:100]!r})"
        site = (headers.get("sec-fetch-site") or "").lower()
        if site in ("cross-site", "same-site") and not allowed and not (
                method in ("GET", "HEAD") and (headers.get("sec-fetch-mode") or "").lower() == "navigate"
                and (headers.get("sec-fetch-dest") or "").lower() == "document"):
            return 403, "refused: a request from another site"
        if not websocket and method not in SAFE_METHODS and not _is_json(headers.get("content-type")):
            return 415, "refused: the request body must be JSON (Content-Type: application/json)"
        return None


def _same_origin(origin: str, host: tuple[str, int | None]) -> bool:
    """`Origin` names the server the request went to: same name, and the same port (a Host
    without a port is the default port of the origin's scheme)."""
    try:
        parts = urlsplit(origin)
        port = parts.port
    except ValueError:
        return False
    default = DEFAULT_PORTS.get(parts.scheme)
    if default is None or not parts.hostname:
        return False
    return normalize_name(parts.hostname) == host[0] and (port or default) == (host[1] or default)


def _is_json(content_type: str | None) -> bool:
    kind = (content_type or "").split(";")[0].strip().lower()
    return kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))


def file_request(path: str) -> str | None:
    """The file a gradio `/file=` (or old `/file/`) URL path asks for, else None."""
    for prefix in ("/file=", "/file/"):
        if path.startswith(prefix):
            return path[len(prefix):]
    return None


class RequestGuard:
    """ASGI middleware: every HTTP request and websocket of the wrapped app passes `policy`;
    `/file=` serves only what `file_allowed` accepts; no page of another site may frame a response."""

    def __init__(self, app, policy: RequestPolicy, file_allowed: Callable[[str], bool] | None = None):
        self.app, self.policy, self.file_allowed = app, policy, file_allowed

    async def __call__(self, scope, receive, send):
        kind = scope["type"]
        if kind not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        from starlette.datastructures import Headers

        refusal = self.policy.refusal(scope.get("method", "GET"), Headers(scope=scope), websocket=kind == "websocket")
        requested = file_request(scope.get("path", ""))
        if refusal is None and requested is not None and not (self.file_allowed and self.file_allowed(requested)):
            refusal = 403, "refused: only files this server made (plots, downloads) are served"
        if refusal is not None:
            if kind == "websocket":  # closing before accepting: the handshake is answered 403
                return await send({"type": "websocket.close", "code": 1008})
            from starlette.responses import JSONResponse
            return await JSONResponse({"detail": refusal[1]}, status_code=refusal[0])(scope, receive, send)
        if kind == "websocket":
            return await self.app(scope, receive, send)

        async def framed(message):
            if message["type"] == "http.response.start":
                present = {k.lower() for k, _ in message.get("headers", [])}
                message = {**message, "headers": [*message.get("headers", []),
                                                  *(h for h in FRAME_HEADERS if h[0] not in present)]}
            await send(message)

        await self.app(scope, receive, framed)


def drop_cors(app) -> None:
    """Remove CORS middleware from a (running) Starlette app: gradio 3.41 grants every origin."""
    app.user_middleware = [m for m in app.user_middleware if "CORS" not in m.cls.__name__]
    app.middleware_stack = app.build_middleware_stack()


def route_dependency(policy: RequestPolicy) -> Callable:
    """A FastAPI dependency applying `policy` to the routes it is attached to (HTTPException on refusal)."""
    from fastapi import HTTPException, Request

    def request_guard(request: Request) -> None:
        refusal = policy.refusal(request.method, request.headers)
        if refusal is not None:
            raise HTTPException(status_code=refusal[0], detail=refusal[1])

    return request_guard

"""HTTP hardening of the web app, as plain ASGI middleware (outside FastAPI's routing, so that a
request is refused before any of its body is read or parsed):

- `BodyLimit`: per-route request body caps. A declared ``Content-Length`` over the route's cap is
  answered 413 at once, without reading the body; a chunked body is counted as it streams and
  refused (413) as soon as it passes the cap. Uploads must declare their length (411).
- `HostGuard`: the ``Host`` header must name an allowed host (DNS-rebinding defence); requests that
  change state (any method but GET/HEAD/OPTIONS) carrying an ``Origin`` or ``Referer`` must come
  from the same origin (CSRF defence; browsers always send ``Origin`` on cross-site POSTs, so a
  request with neither is a non-browser client and is served); every response gets
  ``X-Content-Type-Options: nosniff`` and a Content-Security-Policy (HTML pages: scripts, styles and
  images from this server only, ``frame-ancestors 'none'``).
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable, Mapping
from urllib.parse import urlsplit

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

#: Host names always allowed besides the bound address.
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
#: Policy of the HTML pages of the app.
PAGE_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
#: Policy of the Swagger UI page (/docs): its bundle sets inline styles.
DOCS_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
#: Policy of everything else (JSON, images): nothing may run, nothing may frame it.
OTHER_CSP = "default-src 'none'; frame-ancestors 'none'"
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_ANY_HOST = frozenset({"0.0.0.0", "::", ""})


async def _send_json(send: Send, status: int, detail: str, headers: Mapping[str, str] | None = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    raw = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"x-content-type-options", b"nosniff"),
        (b"connection", b"close"),
    ]
    raw += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def _header(scope: Scope, name: bytes) -> str | None:
    for k, v in scope.get("headers", ()):
        if k == name:
            return v.decode("latin-1")
    return None


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` when a streamed body passes its route's cap (answered 413)."""

    def __init__(self, limit: int):
        super().__init__(413, f"request body too large: the limit for this route is {limit:,} bytes")


class BodyLimit:
    """Per-route request body caps (see module docstring).

    Args:
        app: the wrapped ASGI app.
        limits: path -> largest body in bytes (exact path match).
        default: cap of every other path.
        length_required: paths whose requests must declare ``Content-Length`` (411 otherwise).
    """

    def __init__(self, app: ASGIApp, limits: Mapping[str, int], default: int, length_required: Iterable[str] = ()):
        self.app = app
        self.limits = dict(limits)
        self.default = int(default)
        self.length_required = frozenset(length_required)

    def limit_for(self, path: str) -> int:
        return self.limits.get(path, self.default)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        limit = self.limit_for(path)
        length = _header(scope, b"content-length")
        chunked = "chunked" in (_header(scope, b"transfer-encoding") or "").lower()
        if length is not None:
            if not length.strip().isdigit():
                await _send_json(send, 400, "invalid Content-Length header")
                return
            if int(length) > limit:
                what = "upload" if path in self.length_required else "request body"
                await _send_json(
                    send, 413, f"{what} too large: {int(length):,} bytes declared, the limit is {limit:,} bytes"
                )
                return
        elif path in self.length_required and scope.get("method") not in _SAFE_METHODS:
            await _send_json(send, 411, "uploads need a Content-Length header")
            return
        if length is not None and not chunked:
            await self.app(scope, receive, send)  # the server enforces the declared length
            return

        seen = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge as exc:  # raised where no handler turned it into a response
            if started:
                raise
            await _send_json(send, 413, str(exc.detail))


def _split_host(value: str) -> tuple[str, int | None]:
    """``("example.com", 5000)`` from a Host header value (``[::1]:5000`` style for IPv6)."""
    value = value.strip()
    if value.startswith("["):
        end = value.find("]")
        host, rest = value[1:end], value[end + 1 :]
        port = rest[1:] if rest.startswith(":") else ""
    elif value.count(":") == 1:
        host, port = value.split(":")
    else:
        host, port = value, ""
    return host.lower().rstrip("."), int(port) if port.isdigit() else None


def default_allowed_hosts(bind_host: str) -> list[str]:
    """The bound address (unless it is a wildcard address) and the loopback names."""
    hosts = list(LOCAL_HOSTS)
    bound = bind_host.strip("[]").lower()
    if bound not in _ANY_HOST and bound not in hosts:
        hosts.insert(0, bound)
    return hosts


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def normalise_hosts(hosts: Iterable[str]) -> list[str]:
    """Lower-cased host names / addresses of an allow-list.

    Raises:
        ValueError: an empty list, or an entry with a scheme, path or port.
    """
    out = [h.strip().lower().strip("[]").rstrip(".") for h in hosts if h.strip()]
    if not out:
        raise ValueError("allowed hosts: the list is empty; pass at least one host name (e.g. localhost)")
    for h in out:
        if "/" in h or (":" in h and not _is_ip(h)):
            raise ValueError(
                f"allowed host {h!r}: expected a host name or address without scheme or port (e.g. photos.example.com)"
            )
    return out


class HostGuard:
    """Host allow-list, same-origin rule for state-changing requests, security headers.

    Args:
        app: the wrapped ASGI app.
        allowed_hosts: host names or addresses (no port); ``*.example.com`` allows sub-domains,
            ``*`` allows any host (no DNS-rebinding protection).
        docs_path: path of the Swagger UI page (gets `DOCS_CSP`).
    """

    def __init__(self, app: ASGIApp, allowed_hosts: Iterable[str], docs_path: str = "/docs"):
        self.app = app
        hosts = normalise_hosts(allowed_hosts)
        self.any_host = "*" in hosts
        self.exact = {h for h in hosts if not h.startswith("*.")}
        self.suffixes = tuple(h[1:] for h in hosts if h.startswith("*."))
        self.docs_path = docs_path

    def host_allowed(self, host: str) -> bool:
        return self.any_host or host in self.exact or (bool(self.suffixes) and host.endswith(self.suffixes))

    @staticmethod
    def same_origin(source: str, host_header: str) -> bool:
        """Whether ``source`` (an Origin or Referer value) names the origin the request was sent to."""
        try:
            parts = urlsplit(source)
            port = parts.port
        except ValueError:
            return False
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return False
        port = port or (443 if parts.scheme == "https" else 80)
        host, host_port = _split_host(host_header)
        return parts.hostname.lower().rstrip(".") == host and (host_port or port in (80, 443)) == port

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        host_header = _header(scope, b"host")
        if host_header is None:
            await _send_json(send, 400, "missing Host header")
            return
        host, _ = _split_host(host_header)
        if not self.host_allowed(host):
            await _send_json(
                send,
                400,
                f"host {host[:100]!r} is not allowed; start the server with "
                "`--allowed-host NAME` to serve it under that name",
            )
            return
        if scope.get("method", "GET") not in _SAFE_METHODS:
            origin = _header(scope, b"origin")
            source = origin if origin is not None else _header(scope, b"referer")
            if source is not None and not self.same_origin(source, host_header):
                await _send_json(
                    send,
                    403,
                    "cross-origin request refused: state-changing requests must come from this server's own pages",
                )
                return
        path = scope.get("path", "")

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [
                    (k, v)
                    for k, v in message.get("headers", ())
                    if k not in (b"x-content-type-options", b"content-security-policy", b"x-frame-options")
                ]
                ctype = next((v for k, v in headers if k == b"content-type"), b"")
                if ctype.startswith(b"text/html"):
                    csp = DOCS_CSP if path == self.docs_path else PAGE_CSP
                    headers += [(b"x-frame-options", b"DENY"), (b"referrer-policy", b"same-origin")]
                else:
                    csp = OTHER_CSP
                headers += [(b"x-content-type-options", b"nosniff"), (b"content-security-policy", csp.encode())]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


__all__ = ["BodyLimit", "BodyTooLarge", "HostGuard", "default_allowed_hosts", "normalise_hosts", "PAGE_CSP", "DOCS_CSP"]

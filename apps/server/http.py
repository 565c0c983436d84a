"""Plain HTTP in front of the websocket: the browser client, /healthz, and the handshake checks.

`websockets` calls process_request before every handshake; returning a Response answers the
request as plain HTTP (the page, the health check, a refusal), returning None lets the websocket
handshake go on (only for /ws, and only after the Host, Origin and token checks pass).
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import re
from http import HTTPStatus
from importlib import resources
from typing import Callable
from urllib.parse import parse_qs

from websockets.datastructures import Headers
from websockets.http11 import Response

WS_PATH = "/ws"
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}


def is_loopback(name: str | None) -> bool:
    """'localhost' exactly, or an IP address in 127.0.0.0/8 or ::1. A name that only starts like
    one ('127.evil.example', '127.0.0.1.evil.example') is not: it resolves wherever its owner says."""
    if not name:
        return False
    if name.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False
STATIC = {"/": ("index.html", "text/html; charset=utf-8"),
          "/index.html": ("index.html", "text/html; charset=utf-8"),
          "/app.js": ("app.js", "text/javascript; charset=utf-8"),
          "/style.css": ("style.css", "text/css; charset=utf-8")}


def load_static() -> dict[str, bytes]:
    """The browser client's files, shipped as package data in apps/web/."""
    web = resources.files("apps") / "web"
    return {name: (web / name).read_bytes() for name, _ in set(STATIC.values())}


# A Host header (RFC 9110): a DNS name or IPv4 address, or an IPv6 address in brackets, then at most
# a numeric port. Nothing else: no user info ('evil@127.0.0.1'), fragment, path, or port of letters.
_HOST = re.compile(r"(?P<name>[A-Za-z0-9_.-]+|\[(?P<v6>[0-9A-Fa-f:.]+)\])(?::(?P<port>[0-9]{1,5}))?")
_DEFAULT_PORTS = {"http": 80, "https": 443}


def parse_host(value: str | None) -> tuple[str, int | None] | None:
    """'localhost:8765' -> ('localhost', 8765); '[::1]:80' -> ('::1', 80); 'example.org' ->
    ('example.org', None). None for anything malformed ('127.0.0.1:abc', '127.0.0.1:80.evil',
    'evil@127.0.0.1', '127.0.0.1#.evil', '::1' without brackets, a port over 65535)."""
    if not value:
        return None
    m = _HOST.fullmatch(value)
    if m is None:
        return None
    name = m["name"].lower()
    if m["v6"] is not None:
        try:
            name = str(ipaddress.IPv6Address(m["v6"]))
        except ValueError:
            return None
    elif not name.strip(".") or ".." in name:
        return None
    port = int(m["port"]) if m["port"] is not None else None
    if port is not None and not 0 < port < 65536:
        return None
    return name, port


def parse_origin(value: str | None) -> tuple[str, str, int] | None:
    """'http://127.0.0.1:8765' -> ('http', '127.0.0.1', 8765), the port defaulting by scheme; None
    unless it is exactly an http(s) scheme, '://', and a host as parse_host takes it (one trailing
    '/' tolerated)."""
    if not value:
        return None
    scheme, sep, rest = value.lower().partition("://")
    if not sep or scheme not in _DEFAULT_PORTS:
        return None
    host = parse_host(rest[:-1] if rest.endswith("/") else rest)
    if host is None:
        return None
    return scheme, host[0], host[1] if host[1] is not None else _DEFAULT_PORTS[scheme]


def hostname(host_header: str | None) -> str | None:
    """'localhost:8765' -> 'localhost'; '[::1]:80' -> '::1'; None when malformed (parse_host)."""
    host = parse_host(host_header)
    return host[0] if host is not None else None


def _normal_name(name: str) -> str:
    """An --allow-host name as parse_host gives it: lower case, an IPv6 address in its short form."""
    name = name.lower().strip("[]") if name.startswith("[") else name.lower()
    try:
        return str(ipaddress.IPv6Address(name))
    except ValueError:
        return name


def response(status: int, body: bytes, content_type: str, extra: dict | None = None) -> Response:
    headers = Headers()
    headers["Content-Type"] = content_type
    headers["Content-Length"] = str(len(body))
    headers["Cache-Control"] = "no-store"
    headers["X-Content-Type-Options"] = "nosniff"
    headers["Referrer-Policy"] = "no-referrer"
    headers["Connection"] = "close"
    for k, v in (extra or {}).items():
        headers[k] = v
    return Response(status, HTTPStatus(status).phrase, headers, body)


def text(status: int, message: str) -> Response:
    return response(status, (message + "\n").encode(), "text/plain; charset=utf-8")


class Gate:
    """Host, Origin and token checks for one server configuration."""

    def __init__(self, bind_host: str, allowed_origins: tuple[str, ...] = (),
                 allowed_hosts: tuple[str, ...] = (), token: str | None = None) -> None:
        self.origins = {o.rstrip("/").lower() for o in allowed_origins}
        self.token = token
        # DNS-rebinding guard: a server bound to loopback answers only to loopback host names.
        loopback = is_loopback(bind_host)
        self.hosts = {_normal_name(h) for h in allowed_hosts} | (LOOPBACK_NAMES if loopback else set())
        self.check_host = loopback or bool(allowed_hosts)

    def host_ok(self, host_header: str | None) -> bool:
        if host_header is not None and parse_host(host_header) is None:
            return False  # malformed: refused whatever the configuration
        if not self.check_host or "*" in self.hosts:
            return True
        name = hostname(host_header)
        return name is not None and (name in self.hosts or is_loopback(name))

    def origin_ok(self, origin: str | None, host_header: str | None) -> bool:
        if origin is None:
            return True  # not a browser: browsers always send Origin on websocket handshakes
        text = origin.rstrip("/").lower()
        if "*" in self.origins or text in self.origins:
            return True
        parsed = parse_origin(origin)
        if parsed is None:
            return False
        scheme, name, port = parsed
        host = parse_host(host_header)
        if host is not None and host[0] == name and (host[1] or _DEFAULT_PORTS[scheme]) == port:
            return True  # same origin as the page this server served
        return is_loopback(name)

    def token_ok(self, query: str, headers: Headers) -> bool:
        if not self.token:
            return True
        given = parse_qs(query).get("token", [None])[0]
        auth = headers.get("Authorization", "")
        if given is None and auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        return given is not None and hmac.compare_digest(given.encode(), self.token.encode())


def make_process_request(gate: Gate, health: Callable[[], dict], admin: dict[str, Callable] | None = None):
    """`admin`: more paths (the front door's /drain), each `fn(query) -> (status, dict)`, answered only
    to loopback clients and with the token when the server has one."""
    static = load_static()
    admin = admin or {}

    def process_request(connection, request):
        path, _, query = request.path.partition("?")
        hosts = request.headers.get_all("Host")
        if len(hosts) > 1:
            return text(400, "more than one Host header")
        host = hosts[0] if hosts else None
        if not gate.host_ok(host):
            return text(403, f"host {host!r} is not allowed (start the server with --allow-host)")
        if path == WS_PATH:
            if not gate.origin_ok(request.headers.get("Origin"), host):
                return text(403, "origin not allowed (start the server with --allow-origin)")
            if not gate.token_ok(query, request.headers):
                return text(401, "missing or wrong token (?token=... or Authorization: Bearer)")
            return None  # go on with the websocket handshake
        if path == "/healthz":
            if not gate.token_ok(query, request.headers):  # it tells sessions and load: not public
                return text(401, "missing or wrong token (?token=... or Authorization: Bearer)")
            return response(200, json.dumps(health()).encode(), "application/json")
        if path in admin:
            peer = getattr(connection, "remote_address", None)
            if not (peer and is_loopback(str(peer[0]))):
                return text(403, "administration is answered to loopback clients only")
            if not gate.token_ok(query, request.headers):
                return text(401, "missing or wrong token (?token=... or Authorization: Bearer)")
            status, body = admin[path](parse_qs(query))
            return response(status, json.dumps(body).encode(), "application/json")
        if path in STATIC:
            name, ctype = STATIC[path]
            csp = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                   f"connect-src 'self' ws://{host} wss://{host}; base-uri 'none'; "
                   "form-action 'none'; frame-ancestors 'none'")
            return response(200, static[name], ctype, {"Content-Security-Policy": csp})
        if path == "/favicon.ico":
            return response(204, b"", "image/x-icon")
        return text(404, f"not found: {path[:200]}")

    return process_request


async def listen(handler, cfg, health: Callable[[], dict], admin: dict[str, Callable] | None = None):
    """The websocket server of a ServerConfig `cfg`: /ws for `handler`, the page, /healthz, `admin`."""
    from websockets.asyncio.server import serve

    gate = Gate(cfg.host, cfg.allowed_origins, cfg.allowed_hosts, cfg.token)
    # The transport limit is a backstop (the connection closes with 1009 past it); frames
    # between max_message_bytes and it get a polite `frame_too_large` error instead.
    hard = max(4 * cfg.limits.max_message_bytes, 1 << 20)
    return await serve(handler, cfg.host, cfg.port, max_size=hard, compression="deflate" if cfg.compression else None,
                       process_request=make_process_request(gate, health, admin))


def base_url(host: str, server) -> str:
    """http://host:port/ of a listening server (IPv6 hosts bracketed)."""
    port = server.sockets[0].getsockname()[1]
    return f"http://{host if ':' not in host else f'[{host}]'}:{port}/"


class Listening:
    """`port` and `url` of a server object holding `server` (from `listen`) and `cfg`."""

    @property
    def port(self) -> int:
        return self.server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return base_url(self.cfg.host, self.server)

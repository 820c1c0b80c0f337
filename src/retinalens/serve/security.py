"""What stands between the network and the app: one pure ASGI middleware, outermost.

In order, for every HTTP request:
  1. Host allow-list: a page on evil.example whose name was rebound to 127.0.0.1 (DNS rebinding)
     sends `Host: evil.example`, and is refused (421) before it can read an analysis.
  2. Origin check on state-changing methods: a form on another site posting to this server is
     refused (403). Requests without Origin or Referer (curl, scripts) are not browsers' cross-site ones.
  3. The API token, when one is set: `Authorization: Bearer TOKEN`, or the cookie the login page sets.
     /healthz (for probes) and /login stay open.
  4. Security headers on every response, errors included (CSP, frame and sniffing protection,
     no Referer); HTML pages bring their own CSP with the hashes of their inline script and style.
  5. The access log: method, route template, status and duration. Never a path or a query: ids and
     whatever a client typed there could identify a patient.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import logging
import re
import socket
import time
from typing import Any
from urllib.parse import urlsplit

from .limits import ASGIApp, Message, Receive, Send, send_json

COOKIE = "retinalens_session"
OPEN_PATHS = ("/healthz", "/login")
HTML_PATHS = ("/", "/model", "/docs")  # a browser without the cookie is sent to the login page
UNSAFE_METHODS = ("POST", "PUT", "PATCH", "DELETE")
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")
HEADERS = {
    "content-security-policy": "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cross-origin-resource-policy": "same-origin",
}
# uvicorn's own handler prints it (a child of uvicorn.error: same format, same level, on stderr).
ACCESS_LOG = logging.getLogger("uvicorn.error.access")


def is_loopback(host: str) -> bool:
    """Whether every address `host` names is this machine's loopback (a name is resolved)."""
    name = host.strip("[]")
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        pass
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(name, None)}
    except OSError:
        return False  # binding will fail and say so
    return bool(addresses) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)


def host_name(host: str) -> str:
    """A Host header (or a --host) without its port, lower case; IPv6 in brackets."""
    host = host.strip().lower()
    if host.startswith("["):
        return host.split("]")[0] + "]"
    if host.count(":") > 1:  # a bare IPv6 address (--host ::1)
        return f"[{host}]"
    return host.rsplit(":", 1)[0]


def session_value(token: str) -> str:
    """The login cookie: derived from the token (the token itself never sits in the browser)."""
    return hmac.new(token.encode(), b"retinalens-session", hashlib.sha256).hexdigest()


def csp_for_page(html: str) -> str:
    """A CSP that lets this app's own files under /static ('self') and exactly this page's inline
    <script> and <style> blocks run: their sha256 hashes, nothing else (no 'unsafe-inline': an injected
    script would not run)."""
    def hashes(tag: str) -> str:
        blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.S)
        return " ".join(["'self'", *(f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'"
                                     for b in blocks)])

    return (f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; img-src 'self' data:; "
            "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'")


class Guard:
    def __init__(self, app: ASGIApp, allowed_hosts: set[str], token: str | None, routes: list[Any]) -> None:
        self.app = app
        self.allowed_hosts = allowed_hosts
        self.token = token
        self.routes = routes  # the app's, to name the route of a request answered before it was routed

    def _route(self, scope: dict[str, Any]) -> str:
        from starlette.routing import Match

        route = scope.get("route") or next((r for r in self.routes if r.matches(scope)[0] == Match.FULL), None)
        return getattr(route, "path", None) or "(no route)"

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), [0]

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                present = {k.lower() for k, _ in message.get("headers", [])}
                extra = [(k.encode(), v.encode()) for k, v in HEADERS.items() if k.encode() not in present]
                message = message | {"headers": [*message.get("headers", []), *extra]}
            await send(message)

        try:
            refusal = self._refusal(scope)
            if refusal:
                await send_json(send_with_headers, *refusal)
            else:
                await self.app(scope, receive, send_with_headers)
        finally:
            ACCESS_LOG.info("%s %s %s %.0f ms", scope["method"], self._route(scope), status[0] or "-",
                            (time.perf_counter() - start) * 1000)

    def _refusal(self, scope: dict[str, Any]) -> tuple[int, str, dict[str, str]] | None:
        """(status, message, headers) when the request is refused; None when it may go on."""
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers") or []}
        host = headers.get("host", "")
        if host_name(host) not in self.allowed_hosts:
            return 421, "this server does not answer for that host name (see --allowed-host)", {}
        if scope["method"] in UNSAFE_METHODS:
            origin = headers.get("origin") or headers.get("referer")
            if origin is not None and urlsplit(origin).netloc.lower() != host.lower():
                return 403, "cross-origin request refused", {}
        if self.token and scope["path"] not in OPEN_PATHS and not self._authorised(headers):
            if scope["method"] == "GET" and scope["path"] in HTML_PATHS:
                return 303, "log in first", {"location": "/login"}
            return 401, "an API token is required (Authorization: Bearer TOKEN)", {"www-authenticate": "Bearer"}
        return None

    def _authorised(self, headers: dict[str, str]) -> bool:
        assert self.token
        scheme, _, given = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), self.token.encode()):
            return True
        cookies = dict(part.strip().partition("=")[::2] for part in headers.get("cookie", "").split(";"))
        return hmac.compare_digest(cookies.get(COOKIE, "").encode(), session_value(self.token).encode())


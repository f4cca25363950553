"""Who may talk to the server, checked before any handler runs (ASGI middleware):

- Host: a server bound to a loopback address answers only requests whose Host header names a
  loopback host (localhost, 127.x.x.x, ::1) or one of --allowed-hosts, so a web page cannot reach
  it through DNS rebinding (a hostile name that resolves to 127.0.0.1). 403 otherwise.
- Origin: a browser's cross-origin POST (a page at another origin posting to the API: CSRF) is
  refused with 403 unless its origin is in --allowed-origins; requests without Origin (curl, SDKs)
  and same-origin ones pass.
- --api-key: every route but /health needs `Authorization: Bearer KEY` (401 otherwise).
"""

from __future__ import annotations

import hmac
import ipaddress
import json
from dataclasses import dataclass
from urllib.parse import urlsplit

OPEN_PATHS = ("/health",)            # probes of load balancers and orchestrators carry no key
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


def is_loopback(host: str) -> bool:
    """True for localhost names and loopback addresses (127.0.0.0/8, ::1), brackets allowed."""
    host = host.strip().lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def host_name(value: str) -> str:
    """The host of a Host header or an origin's netloc, without the port."""
    value = value.strip().lower()
    if value.startswith("["):                     # [::1]:8000
        return value[1:value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


@dataclass(frozen=True)
class Access:
    api_key: str | None = None
    bound_host: str = "127.0.0.1"
    allowed_hosts: tuple = ()          # extra Host names; "*" = any
    allowed_origins: tuple = ()        # origins ("https://app.example") a browser may post from; "*" = any

    def __post_init__(self):
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("--api-key must not be empty; leave it out to serve without a key")
        for origin in self.allowed_origins:
            if origin != "*" and not urlsplit(origin).netloc:
                raise ValueError(f"--allowed-origins: {origin!r} is not an origin; write scheme://host[:port]")

    @property
    def check_host(self) -> bool:
        return "*" not in self.allowed_hosts and (is_loopback(self.bound_host) or bool(self.allowed_hosts))

    def refusal(self, method: str, path: str, headers: dict):
        """Why this request is refused (an APIError), or None."""
        from .protocol import APIError       # pydantic: not at import, the CLI's flags use Access
        host = headers.get("host", "")
        if self.check_host:
            name = host_name(host)
            if not (is_loopback(name) or name in (h.lower() for h in self.allowed_hosts)):
                return APIError(403, f"Host {host!r} is not allowed: this server answers only requests to "
                                     f"loopback names; add the name with --allowed-hosts", code="host_not_allowed")
        origin = headers.get("origin")
        if origin is not None and method not in SAFE_METHODS and not self.origin_allowed(origin, host):
            return APIError(403, f"cross-origin request from {origin!r} refused; allow that origin with "
                                 f"--allowed-origins", code="origin_not_allowed")
        if self.api_key is not None and path not in OPEN_PATHS:
            scheme, _, key = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not key.strip():
                return APIError(401, "missing API key: send the header 'Authorization: Bearer <key>'",
                                code="invalid_api_key")
            if not hmac.compare_digest(key.strip().encode(), self.api_key.encode()):
                return APIError(401, "incorrect API key provided", code="invalid_api_key")
        return None

    def origin_allowed(self, origin: str, host: str) -> bool:
        if "*" in self.allowed_origins or origin.rstrip("/") in (o.rstrip("/") for o in self.allowed_origins):
            return True
        return urlsplit(origin).netloc.lower() == host.strip().lower()     # same origin


class AccessMiddleware:
    def __init__(self, app, access: Access, on_refused=None):
        self.app, self.access, self.on_refused = app, access, on_refused

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        err = self.access.refusal(scope["method"], scope["path"], headers)
        if err is None:
            return await self.app(scope, receive, send)
        if self.on_refused is not None:
            self.on_refused(err.status)
        body = json.dumps(err.body()).encode()
        extra = [(b"www-authenticate", b"Bearer")] if err.status == 401 else []
        await send({"type": "http.response.start", "status": err.status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()), *extra]})
        await send({"type": "http.response.body", "body": body})

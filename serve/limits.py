"""Bounds on the work one client can cause: body size and read time, header read time,
sequences per request, and the waiting queue. Each is a `serve` flag; a request past one gets
OpenAI's error shape with 413, 408, 400 or 429 (+ Retry-After), never a stalled server."""

from __future__ import annotations

import asyncio
import json
import math
from dataclasses import dataclass, fields

MiB = 2**20
DRAIN = 4       # an oversized body up to 4x the limit is read and dropped before the 413


@dataclass(frozen=True)
class Limits:
    max_request_bytes: int = 16 * MiB     # a 131k-token prompt as ids is ~1 MiB of JSON
    max_seqs_per_request: int = 256       # prompts x n of one request
    max_waiting_seqs: int = 1024          # sequences queued behind the running batch, all requests
    header_timeout: float = 10.0          # seconds to receive a request's headers
    body_timeout: float = 30.0            # seconds to receive a request's body
    shutdown_timeout: float = 30.0        # seconds SIGTERM waits for in-flight requests
    retry_after: int = 1                  # seconds a 429 asks the client to wait

    def __post_init__(self):
        for f in fields(self):
            value, flag = getattr(self, f.name), "--" + f.name.replace("_", "-")
            number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if f.type == "int" and not (number and int(value) == value and value >= 1):
                raise ValueError(f"{flag} must be a positive integer, got {value!r}")
            if f.name == "shutdown_timeout" and not (number and value >= 0):
                raise ValueError(f"{flag} must be a finite number of seconds >= 0, got {value!r}")
            if f.type == "float" and f.name != "shutdown_timeout" and not (number and value > 0):
                raise ValueError(f"{flag} must be a positive finite number of seconds, got {value!r}")


# (protocol and errors import pydantic: imported where used, so the CLI's flags stay light)
def check_request_seqs(limits: Limits, num_prompts: int, n: int, param: str) -> None:
    from .protocol import APIError
    if num_prompts * n > limits.max_seqs_per_request:
        raise APIError(400, f"this request asks for {num_prompts} prompt(s) x n={n} = {num_prompts * n} sequences; "
                            f"this server takes at most {limits.max_seqs_per_request} per request "
                            f"(--max-seqs-per-request); split the request", param=param)


def check_queue(limits: Limits, waiting: int, adding: int) -> None:
    from .errors import Overloaded
    if waiting + adding > limits.max_waiting_seqs:
        raise Overloaded(f"the server is overloaded: {waiting} sequences are waiting (at most "
                         f"{limits.max_waiting_seqs}, --max-waiting-seqs); retry after {limits.retry_after} s",
                         limits.retry_after)


# ---- the body: size and read time, before any handler sees it ----------------------------------
def _error_response(status: int, message: str, code: str):
    from .protocol import APIError
    body = json.dumps(APIError(status, message, code=code).body()).encode()
    # the unread rest of the body would be taken for the next request: close the connection
    return [{"type": "http.response.start", "status": status,
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                         (b"connection", b"close")]},
            {"type": "http.response.body", "body": body}]


class BodyLimitMiddleware:
    """Reads a request's whole body under `max_request_bytes` and `body_timeout` (ASGI), then
    hands it to the app in one piece; later receive() calls (disconnect watching) pass through."""

    def __init__(self, app, limits: Limits, on_refused=None):
        self.app, self.limits, self.on_refused = app, limits, on_refused

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        limit = self.limits.max_request_bytes
        length = dict(scope["headers"]).get(b"content-length")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.limits.body_timeout

        async def next_message():
            try:
                return await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                return None

        async def too_large(message):
            # read on (and drop) a body of up to DRAIN x the limit, so the client, still sending,
            # gets to read the 413 instead of a reset connection; anything bigger is cut off
            seen = size
            while message is not None and message.get("more_body", False) and seen <= DRAIN * limit:
                message = await next_message()
                seen += len(message.get("body", b"")) if message else 0
            return await self._refuse(send, 413, f"the request body is {'over ' if not known else ''}"
                                                 f"{known or limit} bytes; this server takes at most {limit} "
                                                 f"(--max-request-bytes)", "request_too_large")

        known = int(length) if length is not None and length.isdigit() else None
        size = 0
        if known is not None and known > limit:
            if known > DRAIN * limit:
                return await self._refuse(send, 413, f"the request body is {known} bytes; this server takes at "
                                                     f"most {limit} (--max-request-bytes)", "request_too_large")
            return await too_large({"more_body": True})
        chunks = []
        while True:
            message = await next_message()
            if message is None:
                return await self._refuse(send, 408, f"the request body did not arrive within "
                                                     f"{self.limits.body_timeout:g} s (--body-timeout)",
                                          "request_timeout")
            if message["type"] == "http.disconnect":
                return None
            size += len(message.get("body", b""))
            if size > limit:
                return await too_large(message)
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send, status, message, code):
        if self.on_refused is not None:
            self.on_refused(status)
        for m in _error_response(status, message, code):
            await send(m)


# ---- the headers: a client that never finishes them is cut off ---------------------------------
def timed_protocol(header_timeout: float) -> type:
    """uvicorn's h11 protocol with a deadline on each request's headers (a slow-headers client
    would otherwise hold its connection forever; uvicorn times only idle keep-alive)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class TimedH11Protocol(H11Protocol):
        _header_timer = None

        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm()

        def data_received(self, data):
            if self._header_timer is None and (self.cycle is None or self.cycle.response_complete):
                self._arm()       # the first bytes of the next request on a kept-alive connection
            super().data_received(data)

        def handle_events(self):
            super().handle_events()
            if self.cycle is not None and not self.cycle.response_complete:
                self._disarm()    # headers complete: a request is under way

        def connection_lost(self, exc):
            self._disarm()
            super().connection_lost(exc)

        def _arm(self):
            self._disarm()
            self._header_timer = self.loop.call_later(header_timeout, self._expired)

        def _disarm(self):
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _expired(self):
            self._header_timer = None
            if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
                self.transport.close()

    return TimedH11Protocol

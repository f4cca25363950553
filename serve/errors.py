"""The last line of defence: an exception no handler expected becomes a 500 in OpenAI's error
shape with a generic message (the details go to the server log only), and the connection stays
usable. (Starlette's own handler re-raises, and uvicorn then drops the keep-alive connection.)"""

from __future__ import annotations

import json
import logging

from .protocol import APIError

log = logging.getLogger("ernie_hal.serve")
INTERNAL = "internal server error; the details are in the server log"


class Overloaded(APIError):
    """429: the waiting queue is full; `headers` carries Retry-After, as an overloaded server sends."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(429, message, type="server_error", code="server_overloaded")
        self.headers = {"Retry-After": str(retry_after)}


class CatchAllMiddleware:
    def __init__(self, app, on_error=None):
        self.app, self.on_error = app, on_error

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracked(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception:
            log.exception("unhandled error in %s %s", scope["method"], scope["path"])
            if self.on_error is not None:
                self.on_error(500)
            if started:     # a stream under way: nothing more can be said; the log has it
                return
            body = json.dumps(APIError(500, INTERNAL, type="server_error").body()).encode()
            await send({"type": "http.response.start", "status": 500,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})

"""Graceful shutdown on SIGTERM / SIGINT: stop accepting connections, let in-flight requests
finish for up to `--shutdown-timeout` seconds, then end each remaining one properly (a 503
error body, or an SSE error event followed by `[DONE]`) before the engine thread stops.

uvicorn's own shutdown waits, then cancels the handlers' tasks: the client sees a plain-text
500 or a stream cut mid-way. `GracefulServer` drains the engine's live requests first, so by
the time uvicorn waits for the connections, every answer has been completed."""

from __future__ import annotations

import asyncio
import logging

import uvicorn

from .limits import timed_protocol

log = logging.getLogger("ernie_hal.serve")
WRITE_GRACE = 5.0       # seconds uvicorn then gives the ended answers to reach their clients


class Draining:
    """Shared by the server (refuses new work while set) and GracefulServer (sets it)."""

    def __init__(self):
        self.active = False


async def drain(server, timeout: float, poll: float = 0.05) -> int:
    """Refuse new work, wait up to `timeout` s for the live requests, then end the rest.
    Returns how many requests had to be ended."""
    server.draining.active = True
    live = server.engine.live
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while live and loop.time() < deadline:
        await asyncio.sleep(poll)
    left = list(live)
    for handle in left:
        handle.end()
    if left:
        log.warning("shutdown: %d request(s) still running after %g s; ended with 503", len(left), timeout)
    return len(left)


class GracefulServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, server):
        super().__init__(config)
        self.ernie = server

    async def shutdown(self, sockets=None) -> None:
        for s in self.servers:          # stop accepting now, not after the drain
            s.close()
        await drain(self.ernie, self.ernie.limits.shutdown_timeout)
        await super().shutdown(sockets)


def uvicorn_server(server, app, host: str, port: int, log_level: str = "info") -> GracefulServer:
    """The uvicorn server `ernie-hal serve` runs: h11 with a header deadline, graceful drain."""
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            http=timed_protocol(server.limits.header_timeout),
                            timeout_graceful_shutdown=WRITE_GRACE)
    return GracefulServer(config, server)

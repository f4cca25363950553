"""The OpenAI-compatible server: `build_server(model, ...)` wires engine, KV cache, scheduler and
engine thread around a loaded Model; `create_app(server)` is the FastAPI app that `ernie-hal
serve` runs under uvicorn. `bench.py` is the client side of `ernie-hal bench serving`."""

from .app import Server, build_server, create_app

__all__ = ["Server", "build_server", "create_app"]

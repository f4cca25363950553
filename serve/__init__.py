"""The OpenAI-compatible server: `build_server(model, ...)` wires engine, KV cache, scheduler and
engine thread around a loaded Model; `create_app(server)` is the FastAPI app that `ernie-hal
serve` runs under uvicorn. `bench.py` is the client side of `ernie-hal bench serving`."""

__all__ = ["Server", "build_server", "create_app"]


def __getattr__(name):
    # lazy: the CLI imports serve.limits / serve.security for its flags without loading FastAPI
    if name in __all__:
        from . import app
        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

import os
import sys

import pytest

# Without a GPU the Triton kernels run under Triton's interpreter on CPU tensors. The variable
# must be set before anything imports triton (transformers does, at collection), so here, first.
if "TRITON_INTERPRET" not in os.environ:
    import torch
    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Random-weight models are written into a per-session cache, never the user's. Session
    scope, so it is set before any module-scoped fixture loads a model."""
    old = os.environ.get("ERNIE_HAL_CACHE")
    os.environ["ERNIE_HAL_CACHE"] = str(tmp_path_factory.getbasetemp() / "ernie-hal-cache")
    os.environ.pop("ERNIE_HAL_DISABLE_PLUGIN_AUTOLOAD", None)
    yield
    if old is None:
        os.environ.pop("ERNIE_HAL_CACHE", None)
    else:
        os.environ["ERNIE_HAL_CACHE"] = old


@pytest.fixture
def cli():
    """Runs `python -m ernie_hal ARGS` as a user would, in a subprocess, with the test cache."""
    import subprocess

    def run(args, timeout=300, env=None, input=None):
        return subprocess.run([sys.executable, "-m", "ernie_hal", *args], env=env or dict(os.environ),
                              capture_output=True, text=True, timeout=timeout, input=input)
    return run


@pytest.fixture(scope="session")
def serve_in_thread():
    """A context manager: an ernie-hal Server behind uvicorn on a free loopback port, in a
    thread of this process; yields the base URL and stops the server afterwards."""
    import contextlib
    import socket
    import threading
    import time

    import uvicorn

    from ernie_hal.serve import create_app

    @contextlib.contextmanager
    def serve(server):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        uv = uvicorn.Server(uvicorn.Config(create_app(server), host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=uv.run, daemon=True)
        thread.start()
        deadline = time.time() + 30
        while not uv.started:
            assert time.time() < deadline and thread.is_alive(), "the server did not start"
            time.sleep(0.02)
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            uv.should_exit = True
            thread.join(30)
    return serve

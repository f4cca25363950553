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

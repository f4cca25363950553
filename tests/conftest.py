import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Random-weight models are written into a per-session cache, never the user's."""
    cache = tmp_path_factory.getbasetemp() / "ernie-hal-cache"
    monkeypatch.setenv("ERNIE_HAL_CACHE", str(cache))
    monkeypatch.delenv("ERNIE_HAL_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    yield


@pytest.fixture
def cli_env(tmp_path_factory):
    """Environment for running `python -m ernie_hal` in a subprocess."""
    env = dict(os.environ)
    env["ERNIE_HAL_CACHE"] = str(tmp_path_factory.getbasetemp() / "ernie-hal-cache")
    return env


def run_cli(args, env, timeout=300):
    import subprocess
    return subprocess.run([sys.executable, "-m", "ernie_hal", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)

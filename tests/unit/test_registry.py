"""Registry: built-ins as plugins, entry-point plugins, explicit vs auto device selection,
kernel binding with and without fallback."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import ernie_hal
from ernie_hal.core.plugins.kernel_table import OPS, KernelNotAvailable, OpSpec
from ernie_hal.core.plugins.registry import DeviceError, DeviceRequest, Registry

HERE = os.path.dirname(os.path.abspath(__file__))
PLUGINS = os.path.join(os.path.dirname(HERE), "plugins")


def toy_registry():
    sys.path.insert(0, PLUGINS)
    try:
        import toy_accel
    finally:
        sys.path.remove(PLUGINS)
    reg = Registry(autoload=False)
    reg.register(toy_accel, name="toy")
    return reg


def test_builtin_backends_register_through_the_hook():
    names = {s.name for s in Registry(autoload=False).specs()}
    assert {"cpu", "cuda", "rocm", "ixuca"} <= names


def test_device_request_parsing():
    assert DeviceRequest.parse("cuda:1") == DeviceRequest("cuda", 1)
    assert DeviceRequest.parse("auto") == DeviceRequest("auto", None)
    with pytest.raises(DeviceError, match="bad device"):
        DeviceRequest.parse("cuda:x")


def test_explicit_missing_device_fails_loudly_with_the_probe_reason():
    reg = Registry(autoload=False)
    for name in ("rocm", "cuda", "ixuca"):
        if reg.probe(name).available:
            continue
        with pytest.raises(DeviceError) as e:
            reg.pick(name)
        assert reg.probe(name).reason in str(e.value)


def test_auto_falls_back_to_cpu_and_unknown_names_are_listed():
    reg = Registry(autoload=False)
    backend = reg.pick("auto")
    assert backend.name in {s.name for s in reg.specs()}
    with pytest.raises(DeviceError, match="registered backends: .*cpu"):
        reg.pick("tpu")
    with pytest.raises(DeviceError, match="cpu:3 does not exist"):
        reg.pick("cpu:3")


def test_min_memory_is_enforced():
    reg = Registry(autoload=False)
    with pytest.raises(DeviceError, match="min_memory"):
        reg.pick("cpu", min_memory=1 << 60)


def test_plugin_kernel_wins_and_reference_fills_the_rest_only_with_fallback():
    reg = toy_registry()
    backend = reg.pick("toyaccel")
    table = reg.kernel_table(backend, OpSpec(torch.float32, allow_fallback=True))
    assert table.sources["rms_norm"] == "toy.rms_norm"
    assert set(table.ops) == set(OPS)
    with pytest.raises(KernelNotAvailable, match="toy accelerator only implements rms_norm"):
        reg.kernel_table(backend, OpSpec(torch.float32, allow_fallback=False))


def test_cpu_binds_every_op_without_fallback():
    reg = Registry(autoload=False)
    table = reg.kernel_table(reg.pick("cpu"), OpSpec(torch.float32, allow_fallback=False))
    assert set(table.ops) == set(OPS)


def test_blocking_a_builtin_by_name(monkeypatch):
    monkeypatch.setenv("ERNIE_HAL_BLOCK_PLUGINS", "rocm")
    assert "rocm" not in {s.name for s in Registry(autoload=False).specs()}


def _install_entry_point(tmp_path):
    """A real distribution on sys.path whose entry point names the toy plugin module."""
    dist = tmp_path / "toy_accel_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-accel-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[ernie_hal.backends]\ntoy = toy_accel\n")
    (tmp_path / "toy_accel.py").write_text(open(os.path.join(PLUGINS, "toy_accel.py")).read())
    return str(tmp_path)


def test_entry_point_plugin_loads_and_autoload_can_be_disabled(tmp_path):
    site = _install_entry_point(tmp_path)
    env = dict(os.environ, PYTHONPATH=site + os.pathsep + os.environ.get("PYTHONPATH", ""))
    code = textwrap.dedent("""
        import json, ernie_hal
        rows = ernie_hal.devices(smoke_test=True)
        print(json.dumps([[r["backend"], r["available"], r["smoke_test"]] for r in rows]))
    """)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    assert ["toy", True, "PASS"] in rows
    env["ERNIE_HAL_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert "toy" not in [r[0] for r in json.loads(out.stdout.strip().splitlines()[-1])]


def test_pick_device_api_returns_a_backend():
    backend = ernie_hal.pick_device("cpu")
    assert backend.info.memory_total > 0 and backend.device == torch.device("cpu")

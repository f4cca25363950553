"""GPU backends (cuda, rocm, ixuca): probing and factories against faked machines.

Probes are pure functions of a Snapshot, so every machine here is a fake one; the real
probe() is checked only for what it must never do (write os.environ, initialise CUDA).
"""

import os
import shutil
import subprocess
from types import SimpleNamespace

import pytest
import torch

from ernie_hal.backends._torch_cuda_like import (GiB, KiB, GpuFacts, Snapshot, lookup, read_nvml_like, torch_build,
                                                 visible_subset)
from ernie_hal.backends.cuda import backend as cuda_backend, plugin as cuda_plugin, probe as cuda_probe
from ernie_hal.backends.cuda.devices import NVIDIA
from ernie_hal.backends.ixuca import backend as ix_backend, plugin as ix_plugin, probe as ix_probe
from ernie_hal.backends.rocm import backend as rocm_backend, plugin as rocm_plugin, probe as rocm_probe
from ernie_hal.backends.rocm.devices import AMD

PROBES = {"cuda": cuda_probe, "rocm": rocm_probe, "ixuca": ix_probe}

CPU = Snapshot("2.13.0+cpu")
H100 = GpuFacts("NVIDIA H100 80GB HBM3", 85_045_395_456, 84 * GiB, "sm_90")
MI300X_VF = GpuFacts("AMD Instinct MI300X VF", 205_822_885_888, 200 * GiB, "gfx942")
BI_V150 = GpuFacts("Iluvatar BI-V150", 32 * GiB, 31 * GiB, "sm_71")  # ixML reports cc 7.1


def cuda_snap(*facts, count=None, **kw):
    return Snapshot("2.6.0+cu124", cuda="12.4", devices=facts,
                    device_count=len(facts) if count is None else count, **kw)


def rocm_snap(*facts, count=None, **kw):
    return Snapshot("2.6.0+rocm6.2", hip="6.2.41133", devices=facts,
                    device_count=len(facts) if count is None else count, **kw)


def corex_snap(*facts, count=None):
    return Snapshot("2.7.1+corex.4.4.0", cuda="10.2", devices=facts,
                    device_count=len(facts) if count is None else count)


def probe_all(snap):
    return {name: mod.probe_from(snap) for name, mod in PROBES.items()}


# ---- probing -------------------------------------------------------------------------------
def test_cpu_torch_leaves_all_three_unavailable_with_their_reasons():
    r = probe_all(CPU)
    assert not any(x.available for x in r.values())
    assert r["cuda"].reason == "torch built without CUDA (this is a CPU build: torch 2.13.0+cpu)"
    assert "torch built without HIP (install a ROCm build of PyTorch" in r["rocm"].reason
    assert "no Iluvatar CoreX runtime found (torch is not the CoreX build" in r["ixuca"].reason


def test_cuda_torch_with_an_h100():
    r = probe_all(cuda_snap(H100))
    assert r["cuda"].available and not r["rocm"].available and not r["ixuca"].available
    (dev,) = r["cuda"].devices
    assert (dev.backend, dev.arch, dev.name, dev.torch_device) == ("cuda", "sm_90", H100.name, "cuda:0")
    assert dev.bandwidth_gbps == 3350 and dev.memory_total == H100.memory_total
    assert "this is a CUDA build" in r["rocm"].reason


def test_cuda_without_a_management_library_still_counts_devices():
    r = cuda_probe.probe_from(cuda_snap(count=2))
    assert r.available and [d.torch_device for d in r.devices] == ["cuda:0", "cuda:1"]
    assert r.devices[0].bandwidth_gbps == 0.0  # nothing known until the device is opened


def test_rocm_torch_with_an_mi300x_vf():
    r = probe_all(rocm_snap(MI300X_VF))
    assert r["rocm"].available and not r["ixuca"].available
    (dev,) = r["rocm"].devices
    assert (dev.arch, dev.bandwidth_gbps, dev.name) == ("gfx942", 5300, "AMD Instinct MI300X VF")
    assert not r["cuda"].available  # ROCm torch also has torch.cuda: cuda must not claim it
    assert "torch built with HIP, not CUDA — use --device rocm" in r["cuda"].reason


def test_mi325x_is_told_from_mi300x_by_memory():
    nameless = GpuFacts("", 256 * GiB, 0, "gfx942")
    (dev,) = rocm_probe.probe_from(rocm_snap(nameless)).devices
    assert (dev.name, dev.bandwidth_gbps) == ("AMD Instinct MI325X", 6000)


def test_mi355x_by_gfx950():
    (dev,) = rocm_probe.probe_from(rocm_snap(GpuFacts("", 288 * GiB, 0, "gfx950"))).devices
    assert (dev.name, dev.arch, dev.bandwidth_gbps) == ("AMD Instinct MI355X", "gfx950", 8000)
    assert lookup(AMD, "gfx950").shared_memory == 160 * KiB


def test_corex_torch_is_ixuca_not_cuda():
    r = probe_all(corex_snap(BI_V150, BI_V150))
    assert r["ixuca"].available and not r["cuda"].available and not r["rocm"].available
    assert "use --device ixuca" in r["cuda"].reason
    dev = r["ixuca"].devices[1]
    assert (dev.arch, dev.bandwidth_gbps, dev.torch_device) == ("BI-V150", 1150, "cuda:1")


def test_iluvatar_devices_under_an_unmarked_torch_still_go_to_ixuca():
    snap = Snapshot("2.4.0", cuda="10.2", devices=(BI_V150,), device_count=1)  # no "+corex" tag
    assert ix_probe.probe_from(snap).available and not cuda_probe.probe_from(snap).available


def test_zero_devices_and_count_failures_give_reasons():
    assert "no GPU visible (no NVIDIA driver" in cuda_probe.probe_from(cuda_snap(count=0)).reason
    hidden = rocm_snap(count=0, visible=(("HIP_VISIBLE_DEVICES", ""),))
    assert rocm_probe.probe_from(hidden).reason == "ROCm torch present but no GPU visible (HIP_VISIBLE_DEVICES='')"
    assert "no GPU visible" in ix_probe.probe_from(corex_snap(count=0)).reason
    broken = cuda_snap(count=0, count_error="RuntimeError: driver too old")
    assert "driver too old" in cuda_probe.probe_from(broken).reason


@pytest.mark.parametrize("version,cuda,hip,build", [
    ("2.13.0+cpu", None, None, "cpu"),
    ("2.6.0+cu124", "12.4", None, "cuda"),
    ("2.6.0+rocm6.2", None, "6.2.41133", "hip"),
    ("2.10.0+corex.4.5.0.20260419", "10.2", None, "corex"),  # CoreX also reports a CUDA version
])
def test_torch_build(version, cuda, hip, build):
    assert torch_build(version, cuda, hip) == build


# ---- tables --------------------------------------------------------------------------------
def test_lookup_matches_name_tokens_then_memory():
    assert lookup(NVIDIA, "sm_90", "NVIDIA H200").name == "NVIDIA H200"   # not H20
    assert lookup(NVIDIA, "sm_90", "NVIDIA H20").name == "NVIDIA H20"
    assert lookup(NVIDIA, "sm_90", "NVIDIA H100 PCIe").bandwidth_gbps == 2000
    assert lookup(NVIDIA, "sm_80", "NVIDIA A100-SXM4-40GB").bandwidth_gbps == 1555
    assert lookup(NVIDIA, "sm_80", "NVIDIA A100-SXM4-80GB").bandwidth_gbps == 2039
    assert lookup(NVIDIA, "sm_89", "NVIDIA L40S").name == "NVIDIA L40S"    # not L4
    assert lookup(NVIDIA, "sm_90", "", 141 * GiB).name == "NVIDIA H200"
    assert lookup(NVIDIA, "sm_75", "Tesla T4") is None                     # unknown arch
    assert lookup(NVIDIA, "", "") is None                                  # nothing to go on


def test_every_table_entry_is_complete():
    from ernie_hal.backends.ixuca.devices import ILUVATAR
    for spec in NVIDIA + AMD + ILUVATAR:
        assert spec.memory > 0 and spec.bandwidth_gbps > 0 and spec.warp_size in (32, 64)
        assert spec.match and spec.source, spec.name


def test_visible_devices_map_physical_facts():
    a, b, c = GpuFacts("a"), GpuFacts("b"), GpuFacts("c")
    assert visible_subset((a, b, c), (("CUDA_VISIBLE_DEVICES", "2,0"),)) == (c, a)
    assert visible_subset((a, b), (("CUDA_VISIBLE_DEVICES", "GPU-1234"),)) == ()
    both = (("HIP_VISIBLE_DEVICES", "1"), ("CUDA_VISIBLE_DEVICES", "1"))  # HIP reads one, not both
    assert visible_subset((a, b), both) == (b,)


FAKE_NVML_C = r"""
typedef struct { unsigned long long total, free, used; } mem_t;
int nvmlInit_v2(void) { return 0; }
int nvmlShutdown(void) { return 0; }
int nvmlDeviceGetCount_v2(unsigned *n) { *n = 2; return 0; }
int nvmlDeviceGetHandleByIndex_v2(unsigned i, void **h) { *h = (void *)(long)(i + 1); return 0; }
int nvmlDeviceGetName(void *h, char *buf, unsigned len) {
    const char *s = "Iluvatar BI-V150"; unsigned k = 0;
    for (; s[k] && k + 1 < len; k++) buf[k] = s[k];
    buf[k] = 0; return 0;
}
int nvmlDeviceGetMemoryInfo(void *h, mem_t *m) {
    m->total = 34359738368ULL; m->free = (long)h * 1024ULL; m->used = 0; return 0;
}
"""


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler to build a fake ixML")
def test_nvml_like_reader_against_a_fake_library(tmp_path):
    src, lib = tmp_path / "fake.c", tmp_path / "libfake.so"
    src.write_text(FAKE_NVML_C)
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(lib), str(src)], check=True)
    facts = read_nvml_like((str(tmp_path / "missing.so"), str(lib)))
    assert [(f.name, f.memory_total, f.memory_free, f.arch) for f in facts] == [
        ("Iluvatar BI-V150", 32 * GiB, 1024, ""), ("Iluvatar BI-V150", 32 * GiB, 2048, "")]
    assert read_nvml_like((str(tmp_path / "missing.so"),)) is None


# ---- the real probe on this machine --------------------------------------------------------
@pytest.mark.parametrize("name", sorted(PROBES))
def test_real_probe_writes_no_environment_and_creates_no_context(name):
    was_initialized = torch.cuda.is_initialized()
    before = dict(os.environ)
    result = PROBES[name].probe()
    assert dict(os.environ) == before
    if not was_initialized:
        assert not torch.cuda.is_initialized()
    if torch.version.cuda is None and torch.version.hip is None:  # a CPU build, like CI
        assert not result.available and result.reason


def test_plugins_register_one_spec_each():
    specs = [p.ernie_hal_register_backends()[0] for p in (cuda_plugin, rocm_plugin, ix_plugin)]
    assert [(s.name, s.priority) for s in specs] == [("cuda", 30), ("rocm", 30), ("ixuca", 30)]
    assert {"hip", "amd"} <= set(specs[1].aliases)


# ---- factories with a faked torch.cuda -----------------------------------------------------
@pytest.fixture
def fake_torch(monkeypatch):
    def install(version, *props, cuda=None, hip=None, triton="3.9.0", free=10 * GiB):
        monkeypatch.setattr(torch, "__version__", version)
        monkeypatch.setattr(torch.version, "cuda", cuda)
        monkeypatch.setattr(torch.version, "hip", hip)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: len(props))
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i=0: props[i])
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i=0: (free, props[i].total_memory))
        monkeypatch.setattr(torch.cuda, "set_device", lambda d: current.append(torch.device(d)))
        for mod in (cuda_backend, rocm_backend, ix_backend):
            monkeypatch.setattr(mod, "triton_version", lambda: triton)
        return current
    current = []
    return install


def h100_props():
    return SimpleNamespace(name="NVIDIA H100 80GB HBM3", major=9, minor=0, total_memory=85_045_395_456,
                           multi_processor_count=132, warp_size=32, shared_memory_per_block=48 * KiB,
                           shared_memory_per_block_optin=227 * KiB)


def test_cuda_factory_builds_info_and_caps(fake_torch):
    fake_torch("2.6.0+cu124", h100_props(), cuda="12.4")
    b = cuda_backend.make_backend(0)
    assert isinstance(b, cuda_backend.CudaBackend) and b.name == "cuda"
    assert (b.info.arch, b.info.bandwidth_gbps, b.info.torch_device) == ("sm_90", 3350, "cuda:0")
    assert (b.info.memory_total, b.info.memory_free) == (85_045_395_456, 10 * GiB)
    c = b.caps
    assert torch.bfloat16 in c.dtypes and c.warp_size == 32 and c.max_shared_memory == 227 * KiB
    assert c.pinned_host_memory and c.async_copy and c.streams and c.graphs and c.triton
    with pytest.raises(ValueError, match="cuda:1 does not exist"):
        cuda_backend.make_backend(1)


def test_cuda_factory_without_triton(fake_torch):
    fake_torch("2.6.0+cu124", h100_props(), cuda="12.4", triton=None)
    assert not cuda_backend.make_backend(0).caps.triton


def test_rocm_factory_reads_gcn_arch_and_lds(fake_torch):
    mi300 = SimpleNamespace(name="AMD Instinct MI300X VF", major=9, minor=4, total_memory=205_822_885_888,
                            gcnArchName="gfx942:sramecc+:xnack-", warp_size=64, shared_memory_per_block=64 * KiB)
    mi355 = SimpleNamespace(name="AMD Instinct MI355X", major=9, minor=5, total_memory=288 * GiB,
                            gcnArchName="gfx950:sramecc+:xnack-")  # no warp_size: table says 64
    fake_torch("2.6.0+rocm6.2", mi300, mi355, hip="6.2.41133")
    b = rocm_backend.make_backend(0)
    assert (b.info.arch, b.info.bandwidth_gbps, b.caps.warp_size) == ("gfx942", 5300, 64)
    assert b.caps.max_shared_memory == 64 * KiB and b.caps.graphs and b.caps.triton
    b = rocm_backend.make_backend(1)
    assert (b.info.arch, b.info.bandwidth_gbps, b.caps.warp_size) == ("gfx950", 8000, 64)
    assert b.caps.max_shared_memory == 160 * KiB
    with pytest.raises(RuntimeError, match="built with HIP, not CUDA"):
        cuda_backend.make_backend(0)


def test_factories_make_their_device_current(fake_torch):
    """cuda:N / rocm:N with N != 0: the factory sets the thread's device, or Triton launches and
    graph capture would land on device 0."""
    mi300 = SimpleNamespace(name="AMD Instinct MI300X", major=9, minor=4, total_memory=192 * GiB,
                            gcnArchName="gfx942:sramecc+:xnack-")
    current = fake_torch("2.6.0+rocm6.2", mi300, mi300, hip="6.2.41133")
    b = rocm_backend.make_backend(1)
    assert current == [torch.device("cuda:1")] and b.device == torch.device("cuda:1")
    b.bind_thread()
    assert current[-1] == torch.device("cuda:1")


def test_ixuca_factory_on_corex(fake_torch):
    bi = SimpleNamespace(name="Iluvatar BI-V150 OAM", major=7, minor=1, total_memory=32 * GiB,
                         shared_memory_per_block=64 * KiB)
    fake_torch("2.7.1+corex.4.4.0", bi, cuda="10.2", triton="3.1.0+corex.4.4.0")
    b = ix_backend.make_backend(0)
    assert (b.info.backend, b.info.arch, b.info.bandwidth_gbps) == ("ixuca", "BI-V150", 1150)
    assert torch.bfloat16 in b.caps.dtypes and b.caps.warp_size == 64 and b.caps.triton
    assert not b.caps.graphs  # not confirmed on CoreX
    with pytest.raises(RuntimeError, match="CoreX build"):
        cuda_backend.make_backend(0)


def test_ixuca_factory_ignores_upstream_triton(fake_torch):
    bi = SimpleNamespace(name="Iluvatar BI-V150", major=7, minor=1, total_memory=32 * GiB)
    fake_torch("2.7.1+corex.4.4.0", bi, cuda="10.2", triton="3.9.0")
    assert not ix_backend.make_backend(0).caps.triton


def test_device_free_counts_torch_cache_and_budget(fake_torch, monkeypatch):
    fake_torch("2.6.0+cu124", h100_props(), cuda="12.4")
    b = cuda_backend.make_backend(0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d=None: (10 * GiB, 80 * GiB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d=None: 3 * GiB)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d=None: 1 * GiB)
    assert b.free_memory() == 12 * GiB
    b.set_budget(5 * GiB)
    assert b.free_memory() == 5 * GiB


# ---- real device: only where one is present --------------------------------------------------
def _present_backend():
    if not torch.cuda.is_available():
        return None
    build = torch_build(str(torch.__version__), torch.version.cuda, getattr(torch.version, "hip", None))
    return {"cuda": cuda_backend, "hip": rocm_backend, "corex": ix_backend}[build].make_backend(0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU visible to torch")
def test_memory_verbs_on_the_real_device():
    b = _present_backend()
    host = b.pinned_empty((1024,), torch.float32).copy_(torch.arange(1024.0))
    assert host.is_pinned()
    dev = b.alloc((1024,), torch.float32)
    stream = b.new_stream()
    b.copy_to_device(dev, host, stream)
    done = b.record_event(stream)
    b.wait_event(done)
    back = b.pinned_empty((1024,), torch.float32)
    b.copy_to_host(back, dev * 2)
    b.synchronize()
    assert torch.equal(back, torch.arange(1024.0) * 2)
    assert b.memory.in_use == 4096 and 0 < b.free_memory() <= b.info.memory_total
    b.free(dev)
    assert b.memory.in_use == 0

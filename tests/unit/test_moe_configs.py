"""The MoE decode tiles the cuda and rocm backends bind fit the device they are bound for, read
from its (faked) properties: shared memory per program under the limit, and a one-token step of
21B-A3B launching enough programs to fill every SM / CU (on H100 also within one wave)."""

from types import SimpleNamespace

import pytest

from ernie_hal.backends.cuda import backend as cuda_backend
from ernie_hal.backends.cuda.kernels import BINDER as CUDA
from ernie_hal.backends.rocm import backend as rocm_backend
from ernie_hal.backends.rocm.kernels import BINDER as ROCM
from ernie_hal.kernels.triton.moe import decode_programs, gate_up_shared_memory, pick_config

from .test_gpu_probing import GiB, KiB, fake_torch, h100_props  # noqa: F401 - fixture

# (top_k, moe_intermediate I, hidden H): 21B-A3B and 300B-A47B
MOE_21B, MOE_300B = (6, 1536, 2560), (8, 3584, 8192)


def mi300x_props():
    return SimpleNamespace(name="AMD Instinct MI300X", major=9, minor=4, total_memory=192 * GiB,
                           gcnArchName="gfx942:sramecc+:xnack-", warp_size=64, shared_memory_per_block=64 * KiB,
                           multi_processor_count=304)


def h200_props():
    return SimpleNamespace(name="NVIDIA H200", major=9, minor=0, total_memory=150_000_000_000,
                           multi_processor_count=132, warp_size=32, shared_memory_per_block=48 * KiB,
                           shared_memory_per_block_optin=227 * KiB)


def _decode_cfg(binder, backend, T):
    return pick_config(binder.configs(backend)["ops"]["moe"]["config"], T)


@pytest.mark.parametrize("props", [h100_props, h200_props])
def test_hopper_decode_tiles_fit_and_fill_one_wave(fake_torch, props):
    fake_torch("2.6.0+cu124", props(), cuda="12.4")
    b = cuda_backend.make_backend(0)
    sms, limit = b.caps.compute_units, b.caps.max_shared_memory
    assert sms == 132 and limit == 227 * KiB
    for T in (1, 8):
        cfg = _decode_cfg(CUDA, b, T)
        smem = gate_up_shared_memory(cfg)
        assert smem <= limit, (T, cfg, smem)
        per_sm = limit // smem
        assert per_sm >= 2, f"{smem} B per block leaves one block per SM"
    cfg = _decode_cfg(CUDA, b, 1)
    gate_up, down = decode_programs(cfg, *MOE_21B)
    assert sms <= gate_up <= sms * per_sm and sms <= down <= sms * per_sm, (gate_up, down, per_sm)
    assert min(decode_programs(cfg, *MOE_300B)) >= sms


def test_mi300x_decode_tiles_fit_lds_and_fill_the_cus(fake_torch):
    fake_torch("2.6.0+rocm6.2", mi300x_props(), hip="6.2.41133")
    b = rocm_backend.make_backend(0)
    cus, lds = b.caps.compute_units, b.caps.max_shared_memory
    assert cus == 304 and lds == 64 * KiB
    for T in (1, 8):
        assert gate_up_shared_memory(_decode_cfg(ROCM, b, T)) <= lds
    cfg = _decode_cfg(ROCM, b, 1)
    for shape in (MOE_21B, MOE_300B):
        gate_up, down = decode_programs(cfg, *shape)
        assert gate_up >= cus and down >= cus, (shape, gate_up, down)


def test_every_shipped_moe_bucket_fits_its_devices_shared_memory(fake_torch):
    """No bucket of any shipped file asks for more shared memory than the device has."""
    fake_torch("2.6.0+cu124", h100_props(), cuda="12.4")
    b = cuda_backend.make_backend(0)
    buckets = CUDA.configs(b)["ops"]["moe"]["config"]
    for max_t in buckets:
        assert gate_up_shared_memory(pick_config(buckets, int(max_t))) <= b.caps.max_shared_memory, max_t

"""The CPU backend's native rope + KV write and decode attention (backends/cpu/attention.c)
against the reference ops: rope and the cache write bit for bit, attention within fp32 round-off
of the reference, and the fallbacks to the reference for what the native ops do not take."""

import pytest
import torch

from ernie_hal.backends.cpu.attention_kernels import RopeTable, make_gqa_attention, make_rope_kv_write
from ernie_hal.backends.cpu.native import load as load_native
from ernie_hal.kernels.reference.attention import gqa_attention as ref_attention
from ernie_hal.kernels.reference.rope import rope_kv_write as ref_rope_kv_write

NATIVE, WHY = load_native()
pytestmark = pytest.mark.skipif(NATIVE is None, reason=f"native CPU kernels unavailable: {WHY}")
DTYPES = [torch.float32, torch.bfloat16]


def _qkv(T, nh, nkv, d, dtype, g):
    """q, k, v as column slices of one fused projection's output, as the executor passes them."""
    qkv = torch.randn(T, (nh + 2 * nkv) * d, generator=g).to(dtype)
    q, k, v = qkv.split((nh * d, nkv * d, nkv * d), dim=-1)
    return q.view(T, nh, d), k.view(T, nkv, d), v.view(T, nkv, d)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,nh,nkv,d", [(1, 16, 2, 128), (5, 4, 2, 32), (3, 4, 1, 16), (64, 20, 4, 128)])
def test_rope_kv_write_is_bit_identical_to_reference(dtype, T, nh, nkv, d):
    g = torch.Generator().manual_seed(T * nh + d)
    q, k, v = _qkv(T, nh, nkv, d, dtype, g)
    positions = torch.randint(0, 9000, (T,), generator=g)
    slots = torch.randperm(8 * 16, generator=g)[:T]
    caches = [torch.zeros(8, 16, nkv, d, dtype=dtype) for _ in range(4)]
    want = ref_rope_kv_write(q, k, v, positions, 500000.0, caches[0], caches[1], slots)
    got = make_rope_kv_write(NATIVE)(q, k, v, positions, 500000.0, caches[2], caches[3], slots)
    assert got.dtype == dtype and got.shape == (T, nh, d)
    assert torch.equal(got, want)
    assert torch.equal(caches[2], caches[0]) and torch.equal(caches[3], caches[1])


def test_rope_table_grows_past_the_positions_seen():
    table = RopeTable()
    small = table.get(32, 10000.0, 10)[0].shape[0]
    assert table.get(32, 10000.0, small + 1)[0].shape[0] > small
    big = torch.tensor([small + 5])
    q, k, v = _qkv(1, 2, 1, 32, torch.float32, torch.Generator().manual_seed(1))
    caches = [torch.zeros(2, 4, 1, 32) for _ in range(4)]
    slots = torch.tensor([3])
    want = ref_rope_kv_write(q, k, v, big, 10000.0, caches[0], caches[1], slots)
    assert torch.equal(make_rope_kv_write(NATIVE)(q, k, v, big, 10000.0, caches[2], caches[3], slots), want)


def test_rope_kv_write_falls_back_for_a_cache_of_another_dtype():
    q, k, v = _qkv(2, 4, 2, 16, torch.float32, torch.Generator().manual_seed(2))
    pos, slots = torch.tensor([0, 1]), torch.tensor([5, 6])
    caches = [torch.zeros(2, 4, 2, 16, dtype=torch.bfloat16) for _ in range(4)]
    want = ref_rope_kv_write(q, k, v, pos, 10000.0, caches[0], caches[1], slots)
    assert torch.equal(make_rope_kv_write(NATIVE)(q, k, v, pos, 10000.0, caches[2], caches[3], slots), want)
    assert torch.equal(caches[2], caches[0])


def _paged(ctxs, nh, nkv, d, bs, dtype, g):
    B = len(ctxs)
    per = max(-(-c // bs) for c in ctxs)
    blocks = B * per + 1
    k_cache = torch.randn(blocks, bs, nkv, d, generator=g).to(dtype)
    v_cache = torch.randn(blocks, bs, nkv, d, generator=g).to(dtype)
    tables = torch.randperm(blocks, generator=g)[:B * per].view(B, per).to(torch.int32).contiguous()
    q = torch.randn(B, nh, d, generator=g).to(dtype)
    return q, k_cache, v_cache, tables, torch.tensor(ctxs, dtype=torch.int32), torch.arange(B + 1, dtype=torch.int32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ctxs,nh,nkv,d", [([1], 16, 2, 128), ([300], 16, 2, 128), ([1, 17, 40], 4, 2, 32),
                                           ([700, 1300], 20, 4, 128), ([5, 9], 4, 4, 16), ([33], 8, 1, 64)])
def test_decode_attention_matches_reference(dtype, ctxs, nh, nkv, d):
    g = torch.Generator().manual_seed(sum(ctxs) + nh)
    args = _paged(ctxs, nh, nkv, d, 16, dtype, g)
    scale = d ** -0.5
    want = ref_attention(*args, scale)
    got = make_gqa_attention(NATIVE)(*args, scale)
    assert got.dtype == dtype and got.shape == want.shape
    # fp32 scores, softmax and sums in another order: fp32 round-off, then the dtype's rounding
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=8e-3, rtol=8e-3)
    torch.testing.assert_close(got.float(), want.float(), **tol)


def test_decode_attention_ignores_what_lies_past_the_context():
    """Padded table entries and the rest of a partial block are never read into the result."""
    g = torch.Generator().manual_seed(3)
    q, kc, vc, tables, lens, qsl = _paged([20], 4, 2, 32, 16, torch.float32, g)
    got = make_gqa_attention(NATIVE)(q, kc, vc, tables, lens, qsl, 0.2)
    last = int(tables[0, 1])
    kc[last, 4:] = float("nan")
    vc[last, 4:] = float("nan")
    assert torch.equal(make_gqa_attention(NATIVE)(q, kc, vc, tables, lens, qsl, 0.2), got)


def test_prefill_attention_is_the_reference():
    g = torch.Generator().manual_seed(4)
    kc = torch.randn(4, 16, 2, 32, generator=g)
    vc = torch.randn(4, 16, 2, 32, generator=g)
    q = torch.randn(7, 4, 32, generator=g)
    tables = torch.tensor([[0, 1]], dtype=torch.int32)
    lens, qsl = torch.tensor([7], dtype=torch.int32), torch.tensor([0, 7], dtype=torch.int32)
    assert torch.equal(make_gqa_attention(NATIVE)(q, kc, vc, tables, lens, qsl, 0.1),
                       ref_attention(q, kc, vc, tables, lens, qsl, 0.1))


def test_the_cpu_backend_binds_the_native_attention_for_plain_and_quantized_models():
    from ernie_hal.backends.cpu.plugin import ernie_hal_get_kernel
    from ernie_hal.core.plugins.registry import get_registry
    backend = get_registry().pick("cpu")
    for spec in ({}, {"quantization": "wint8"}):
        assert ernie_hal_get_kernel(backend, "rope_kv_write", spec).ernie_hal_impl == "cpu-native-rope-kv"
        assert ernie_hal_get_kernel(backend, "gqa_attention", spec).ernie_hal_impl == "cpu-native-decode-attention"

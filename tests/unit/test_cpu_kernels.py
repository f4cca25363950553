"""The CPU backend's fast kernels (backends/cpu) against the reference ops, and fusion at load
(core/runtime/fuse.py): fused weights give the unfused model's logits."""

import pytest
import torch

from ernie_hal.backends.cpu import kernels as cpu_kernels
from ernie_hal.backends.cpu.native import load as load_native
from ernie_hal.core.runtime.fuse import fused_rows, fused_stack
from ernie_hal.kernels import reference as ref

NATIVE, WHY = load_native()
needs_native = pytest.mark.skipif(NATIVE is None, reason=f"native GEMV unavailable: {WHY}")
ALLOC = lambda shape, dtype: torch.empty(shape, dtype=dtype)  # noqa: E731
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def _close_to_fp64(got, x, w, dtype):
    """The fast result against the exact product, no further than the reference op is."""
    exact = (x.double() @ w.double().t())
    ours = (got.double() - exact).abs().max().item()
    theirs = (ref.linear(x, w).double() - exact).abs().max().item()
    scale = exact.abs().max().item()
    assert ours <= max(theirs * 1.5, scale * (2 ** -7 if dtype == torch.bfloat16 else 1e-6)), (ours, theirs)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,k,n", [(1, 1024, 300), (3, 100, 77), (8, 64, 33), (1, 31, 5)])
def test_native_linear_matches_reference(dtype, rows, k, n):
    g = torch.Generator().manual_seed(rows * k + n)
    x = torch.randn(rows, k, generator=g).to(dtype)
    w = torch.randn(n, k, generator=g).to(dtype)
    linear = cpu_kernels.make_linear(NATIVE)
    got = linear(x, w)
    assert got.dtype == dtype and got.shape == (rows, n)
    torch.testing.assert_close(got.float(), ref.linear(x, w).float(), **TOL[dtype])
    _close_to_fp64(got, x, w, dtype)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [8, 15, 16, 17, 33, 100, 1032])   # tails below / past the 16- and 32-wide steps
def test_native_linear_every_decode_row_count_and_row_tail(dtype, k):
    """M = 1..8 (each its own specialization), odd N (a 16-row block's tail), K off the vector widths."""
    for rows in range(1, cpu_kernels.GEMV_MAX_ROWS + 1):
        g = torch.Generator().manual_seed(rows * k)
        x = torch.randn(rows, k, generator=g).to(dtype)
        w = torch.randn(37, k, generator=g).to(dtype)
        got = cpu_kernels.make_linear(NATIVE)(x, w)
        torch.testing.assert_close(got.float(), ref.linear(x, w).float(), **TOL[dtype])
        _close_to_fp64(got, x, w, dtype)
    empty = cpu_kernels.make_linear(NATIVE)(torch.randn(0, k).to(dtype), w)   # an empty batch
    assert empty.shape == (0, 37)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_portable_c_gemv_matches_reference(monkeypatch, dtype):
    """The loops a machine without AVX2 runs (built without -march=native)."""
    from ernie_hal.backends.cpu import native
    monkeypatch.setenv("ERNIE_HAL_CPU_NATIVE", "portable")
    lib, why = native.load.__wrapped__()
    if lib is None:
        pytest.skip(f"no C compiler: {why}")
    assert lib.isa == "portable C"
    linear = cpu_kernels.make_linear(lib)
    for rows, k in ((1, 1024), (3, 31), (8, 100)):
        x, w = torch.randn(rows, k).to(dtype), torch.randn(21, k).to(dtype)
        torch.testing.assert_close(linear(x, w).float(), ref.linear(x, w).float(), **TOL[dtype])
        _close_to_fp64(linear(x, w), x, w, dtype)


@needs_native
def test_native_linear_takes_strided_rows_and_falls_back_for_prefill():
    linear = cpu_kernels.make_linear(NATIVE, own_gemm=False)     # the own GEMM: test_cpu_gemm.py
    big = torch.randn(2, 96, dtype=torch.bfloat16)
    x = big[:, 16:80]                                  # rows strided, columns contiguous
    w = torch.randn(40, 64, dtype=torch.bfloat16)
    torch.testing.assert_close(linear(x, w).float(), ref.linear(x, w).float(), **TOL[torch.bfloat16])
    many = torch.randn(cpu_kernels.GEMV_MAX_ROWS + 5, 64)   # prefill-sized: torch's GEMM, exactly
    w32 = torch.randn(40, 64)
    assert torch.equal(linear(many, w32), ref.linear(many, w32))
    half = torch.randn(1, 64, dtype=torch.float16)          # a dtype the GEMV lacks: torch's op
    w16 = torch.randn(8, 64, dtype=torch.float16)
    assert torch.equal(linear(half, w16), ref.linear(half, w16))


@needs_native
@pytest.mark.parametrize("rows,K", [((32, 8, 8), 48), ((31, 9, 7), 100)])   # odd parts: a row pair spans two
def test_fused_rows_give_the_unfused_projections_exactly(rows, K):
    """Each output is one row's dot product whether it runs alone or beside its neighbour (batch 1
    takes rows in pairs), so fused and unfused weights agree bit for bit."""
    linear = cpu_kernels.make_linear(NATIVE)
    parts = [torch.randn(r, K, dtype=torch.bfloat16) for r in rows]
    buf, views = fused_rows([p.shape for p in parts], torch.bfloat16, ALLOC,
                            lambda i, out: out.copy_(parts[i]))
    assert buf.shape == (sum(rows), K) and all(v.data_ptr() >= buf.data_ptr() for v in views)
    assert all(torch.equal(v, p) for v, p in zip(views, parts))
    x = torch.randn(1, K, dtype=torch.bfloat16)
    fused = linear(x, buf).split(rows, dim=-1)
    for got, p in zip(fused, parts):
        assert torch.equal(got, linear(x, p))        # one row's dot product either way


def _gate_up(dtype, I=24, H=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    gate, up = (torch.randn(I, H, generator=g).to(dtype) for _ in range(2))
    down = torch.randn(H, I, generator=g).to(dtype)
    _, (fg, fu) = fused_rows([gate.shape, up.shape], dtype, ALLOC,
                             lambda i, out: out.copy_((gate, up)[i]))
    return gate, up, down, fg, fu


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 4, 20])
def test_fused_swiglu_matches_reference(dtype, rows):
    gate, up, down, fg, fu = _gate_up(dtype)
    assert cpu_kernels.fused_rows(fg, fu) is not None and cpu_kernels.fused_rows(gate, up) is None
    linear = cpu_kernels.make_linear(NATIVE) if NATIVE is not None else ref.linear
    swiglu = cpu_kernels.make_swiglu_mlp(linear)
    x = torch.randn(rows, 40).to(dtype)
    want = ref.swiglu_mlp(x, gate, up, down)
    torch.testing.assert_close(swiglu(x, fg, fu, down).float(), want.float(), **TOL[dtype])
    fused, unfused = swiglu(x, fg, fu, down), swiglu(x, gate, up, down)
    if NATIVE is not None and rows <= cpu_kernels.GEMV_MAX_ROWS:
        assert torch.equal(fused, unfused)     # the GEMV computes each output row alone
    else:                                      # a BLAS GEMM may block [gate; up] differently
        torch.testing.assert_close(fused, unfused, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 7])
def test_grouped_experts_match_reference(dtype, T):
    E, I, H, k = 6, 16, 32, 2
    g = torch.Generator().manual_seed(T)
    gate, up = (torch.randn(E, I, H, generator=g).to(dtype) for _ in range(2))
    down = torch.randn(E, H, I, generator=g).to(dtype)
    _, (fg, fu) = fused_stack(E, [(I, H), (I, H)], dtype, ALLOC,
                              lambda e, j, out: out.copy_((gate, up)[j][e]))
    assert torch.equal(fg, gate) and torch.equal(fu, up)
    router, bias = torch.randn(E, H, generator=g), torch.randn(E, generator=g) * 0.1
    x = torch.randn(T, H, generator=g).to(dtype)
    linear = cpu_kernels.make_linear(NATIVE) if NATIVE is not None else ref.linear
    ops = cpu_kernels.fast_ops(NATIVE) if NATIVE is not None else None
    swiglu = cpu_kernels.make_swiglu_mlp(linear)
    moe = cpu_kernels.make_moe(cpu_kernels.make_moe_experts(swiglu), swiglu)
    shared = _gate_up(dtype, I=16, H=32, seed=9)
    want = ref.moe(x, router, bias, gate, up, down, k, 1e-12, shared=shared[:3])
    got = moe(x, router, bias, fg, fu, down, k, 1e-12, shared=(shared[3], shared[4], shared[2]))
    torch.testing.assert_close(got.float(), want.float(), **TOL[dtype])
    if ops is not None:
        assert set(ops) == {"linear", "swiglu_mlp", "moe_experts", "moe", "rms_norm", "add_rms_norm",
                            "rope_kv_write", "gqa_attention"}


def test_the_cpu_backend_binds_the_fast_kernels_where_the_library_builds():
    import ernie_hal
    m = ernie_hal.load("tiny-moe", device="cpu", dtype="fp32")
    kinds = m.kernels
    if NATIVE is None:
        assert "reference" in kinds["linear"] and "reference" in kinds["gqa_attention"]
    else:
        assert kinds["linear"].startswith("cpu-native-gemv") and kinds["moe"] == "cpu-grouped-experts"
        assert kinds["gqa_attention"] == "cpu-native-decode-attention" and kinds["rope_kv_write"] == "cpu-native-rope-kv"
    assert kinds["moe_route"].startswith("ernie_hal.kernels.reference")


@pytest.mark.parametrize("preset,dtype", [("tiny", "fp32"), ("tiny-moe", "bf16")])
def test_fused_weights_give_the_unfused_model_logits(preset, dtype):
    """The loader's fusion changes nothing: logits with [q;k;v] and [gate;up] buffers equal those
    with separate copies of the same weights, on the same kernels."""
    import ernie_hal
    m = ernie_hal.load(preset, device="cpu", dtype=dtype)
    ids = list(range(5, 17))
    fused, one = m.logits(ids), m.logits(ids[:1])
    for lw in m.model.weights.layers:
        assert lw.qkv is not None and lw.q.data_ptr() == lw.qkv.data_ptr()
        lw.qkv = None
        lw.q, lw.k, lw.v = (t.clone() for t in (lw.q, lw.k, lw.v))
        if lw.mlp is not None:
            lw.mlp = tuple(t.clone() for t in lw.mlp)
        if lw.shared is not None:
            lw.shared = tuple(t.clone() for t in lw.shared)
        if lw.experts is not None:
            lw.experts = tuple(t.contiguous().clone() for t in lw.experts)
    unfused = m.logits(ids)
    torch.testing.assert_close(fused, unfused, **TOL[m.dtype])
    if NATIVE is not None:   # decode-sized: the GEMV computes each output row alone, so exactly equal
        assert torch.equal(one, m.logits(ids[:1]))


def test_native_library_says_why_when_it_cannot_be_used(monkeypatch, tmp_path):
    from ernie_hal.backends.cpu import native
    monkeypatch.setenv("ERNIE_HAL_CPU_NATIVE", "0")
    lib, why = native.load.__wrapped__()
    assert lib is None and "ERNIE_HAL_CPU_NATIVE=0" in why
    monkeypatch.delenv("ERNIE_HAL_CPU_NATIVE")
    monkeypatch.setenv("ERNIE_HAL_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    lib, why = native.load.__wrapped__()
    assert lib is None and "build failed" in why and not list(tmp_path.rglob("*.so"))


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,H", [(1, 1024), (3, 64), (8, 200), (40, 96)])
def test_native_norms_match_reference(dtype, rows, H):
    """bf16: bit for bit (the same roundings in the same order); fp32: within an ulp or two (the
    sum of squares is added in another order)."""
    norms = cpu_kernels.make_norms(NATIVE)
    g = torch.Generator().manual_seed(rows + H)
    x, r = (torch.randn(rows, H, generator=g).to(dtype) for _ in range(2))
    w = (1 + 0.1 * torch.randn(H, generator=g)).to(dtype)
    out, summed = norms["add_rms_norm"](x, r, w, 1e-6)
    want, want_summed = ref.add_rms_norm(x, r, w, 1e-6)
    assert torch.equal(summed, want_summed)
    one = norms["rms_norm"](x, w, 1e-5)
    if dtype == torch.bfloat16:
        assert torch.equal(out, want) and torch.equal(one, ref.rms_norm(x, w, 1e-5))
    else:
        torch.testing.assert_close(out, want, rtol=2e-6, atol=2e-6)
        torch.testing.assert_close(one, ref.rms_norm(x, w, 1e-5), rtol=2e-6, atol=2e-6)


@needs_native
def test_native_norms_leave_other_inputs_to_the_reference():
    norms = cpu_kernels.make_norms(NATIVE)
    cases = [torch.randn(2, 64, dtype=torch.float16),                          # a dtype norm.c lacks
             torch.randn(cpu_kernels.NORM_MAX_ROWS + 1, 64),                    # prefill-sized
             torch.randn(64, 4).t()]                                            # not contiguous
    for x in cases:
        w = torch.rand(x.shape[1], dtype=x.dtype)
        assert torch.equal(norms["rms_norm"](x, w, 1e-6), ref.rms_norm(x, w, 1e-6))
        out, summed = norms["add_rms_norm"](x, x, w, 1e-6)
        want, want_summed = ref.add_rms_norm(x, x, w, 1e-6)
        assert torch.equal(out, want) and torch.equal(summed, want_summed)

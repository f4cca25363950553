"""The conformance matrix: backend x op x dtype x shape, every result against kernels/reference
run on the CPU in float64 (float32 for production-size inputs: the oracle), plus a whole tiny
model (dense and MoE) per backend against the cpu model in float32.

Each backend is asked for its own kernel per op with fallback disallowed, so what is tested is
what that backend binds; an op it does not bind is a skip with its reasons (ernie_hal_explain),
as llama.cpp's test-backend-ops reports "not supported". Tolerances: one table per dtype for
O(1) outputs; a backend may tighten or loosen it per op through its config data (the bound
function's `ernie_hal_tolerance`). Statuses: pass (max abs error), fail (max abs error and
where), skip (reason). Used by tests/conformance and `ernie-hal conformance`.
"""

from __future__ import annotations

import functools
import zlib
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from ..plugins.emulate import emulated
from ..plugins.binding_report import bindings, impl_of, native_kernel  # noqa: F401 - bindings is public here
from ..plugins.kernel_table import OPS
from ..quant import PackedWeight, quantize, resolve

# weight-only quantized ops: the op's kernel for a model whose weights are packed (core/quant)
QUANT_OPS = ("linear.wint8", "linear.wint4", "swiglu_mlp.wint8", "swiglu_mlp.wint4", "moe_experts.wint8",
             "moe_experts.wint4", "moe.wint8", "moe.wint4", "embedding.wint8", "embedding.wint4")

# (atol, rtol) per dtype: |got - want| <= atol + rtol * |want| against the float64 oracle, for
# outputs of order one. Wide enough for the reference itself run in that dtype (the cpu row).
TOLERANCE = {
    torch.float32: (1e-4, 1e-4),
    torch.float16: (5e-3, 5e-3),
    torch.bfloat16: (4e-2, 2e-2),
}
# Whole-model logits (a few layers of roundings compound): against the cpu fp32 model.
# Logits of the tiny presets are O(1) (max ~1, std ~0.16); the cpu reference itself is off by
# ~4e-4 in fp16 and ~4e-3 in bf16, so these leave a 15-25x margin for kernel rounding order.
MODEL_TOLERANCE = {
    torch.float32: (5e-4, 5e-4),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (6e-2, 3e-2),
}
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16,
          "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
MODEL_PRESETS = ("tiny", "tiny-moe")
INTERPRETER_BF16 = ("the Triton interpreter computes bf16 wrongly (loads and stores are exact, "
                    "arithmetic is not); bf16 runs natively on the device")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


@dataclass
class Result:
    backend: str           # "rocm"
    device: str            # "AMD Instinct MI300X (emulated)"
    op: str                # "moe", ..., or "model"
    dtype: str             # "float16"
    shape: str             # what the case covers
    status: str            # "pass" | "fail" | "skip"
    max_error: float | None
    reason: str = ""
    impl: str = ""         # which implementation ran: triton, aiter, reference, ...

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Case:
    op: str
    shape: str                                  # names the edge it covers
    make: Callable                              # (dtype, generator) -> list of call arguments
    slow: bool = False


# ---- inputs ----------------------------------------------------------------------------------
def _rand(g, *shape, dtype, scale=1.0):
    x = torch.randn(*shape, generator=g, dtype=torch.float32)
    return (x.mul_(scale) if scale != 1.0 else x).to(dtype)


def _norm_args(T, H, residual):
    def make(dtype, g):
        x = _rand(g, T, H, dtype=dtype)
        w = (1 + 0.1 * torch.randn(H, generator=g, dtype=torch.float64)).to(dtype)
        return [x, _rand(g, T, H, dtype=dtype), w, 1e-5] if residual else [x, w, 1e-5]
    return make


def _positions(g, T, span=4096):
    return torch.randint(0, span, (T,), generator=g, dtype=torch.int64)


def _rope_args(T, nh, nkv, d):
    def make(dtype, g):
        return [_rand(g, T, nh, d, dtype=dtype), _rand(g, T, nkv, d, dtype=dtype), _positions(g, T), 500000.0]
    return make


def _cache_args(T, nh, nkv, d, fused, blocks=6, bs=16):
    def make(dtype, g):
        slots = torch.randperm(blocks * bs, generator=g)[:T].to(torch.int64)
        k, v = _rand(g, T, nkv, d, dtype=dtype), _rand(g, T, nkv, d, dtype=dtype)
        kc, vc = (_rand(g, blocks, bs, nkv, d, dtype=dtype) for _ in range(2))
        if fused:
            return [_rand(g, T, nh, d, dtype=dtype), k, v, _positions(g, T), 500000.0, kc, vc, slots]
        return [k, v, kc, vc, slots]
    return make


def _attention_args(q_lens, ctx_lens, nh, nkv, d, bs=16):
    """Ragged sequences; each one's blocks scattered through the cache in shuffled order, block
    tables one column wider than needed (padded with 0, as KVCache pads)."""
    def make(dtype, g):
        nbs = [-(-c // bs) for c in ctx_lens]
        num_blocks = sum(nbs) + 2
        perm = torch.randperm(num_blocks, generator=g)
        tables = torch.zeros(len(q_lens), max(nbs) + 1, dtype=torch.int32)
        used = 0
        for b, n in enumerate(nbs):
            tables[b, :n] = perm[used:used + n]
            used += n
        starts = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
        return [_rand(g, sum(q_lens), nh, d, dtype=dtype),
                _rand(g, num_blocks, bs, nkv, d, dtype=dtype), _rand(g, num_blocks, bs, nkv, d, dtype=dtype),
                tables, torch.tensor(ctx_lens, dtype=torch.int32), starts, d ** -0.5]
    return make


def _mlp_weights(g, H, I, dtype, E=None):
    lead = () if E is None else (E,)
    return (_rand(g, *lead, I, H, dtype=dtype, scale=H ** -0.5), _rand(g, *lead, I, H, dtype=dtype, scale=H ** -0.5),
            _rand(g, *lead, H, I, dtype=dtype, scale=I ** -0.5))


def _swiglu_args(T, H, I):
    def make(dtype, g):
        return [_rand(g, T, H, dtype=dtype), *_mlp_weights(g, H, I, dtype)]
    return make


def _router(g, T, H, E, dtype, bias):
    x = _rand(g, T, H, dtype=dtype)
    router = _rand(g, E, H, dtype=torch.float32, scale=H ** -0.5)
    b = (0.05 * torch.randn(E, generator=g, dtype=torch.float64)).float() if bias else None
    return x, router, b


def _route_args(T, H, E, k, bias=True):
    def make(dtype, g):
        x, router, b = _router(g, T, H, E, dtype, bias)
        return [x, router, b, k, 1e-12]
    return make


def _experts_args(T, H, I, E, k):
    def make(dtype, g):
        x = _rand(g, T, H, dtype=dtype)
        ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).to(torch.int64)
        w = torch.rand(T, k, generator=g, dtype=torch.float64)
        return [x, (w / w.sum(-1, keepdim=True)).to(dtype), ids, *_mlp_weights(g, H, I, dtype, E)]
    return make


def _moe_args(T, H, I, E, k, shared_I=0):
    def make(dtype, g):
        x, router, b = _router(g, T, H, E, dtype, True)
        shared = _mlp_weights(g, H, shared_I, dtype) if shared_I else None
        return [x, router, b, *_mlp_weights(g, H, I, dtype, E), k, 1e-12, shared]
    return make


def _embedding_args(T, V, H):
    def make(dtype, g):
        return [torch.randint(0, V, (T,), generator=g), _rand(g, V, H, dtype=dtype)]
    return make


def _linear_args(T, K, N):
    def make(dtype, g):
        return [_rand(g, T, K, dtype=dtype), _rand(g, N, K, dtype=dtype, scale=K ** -0.5)]
    return make


def _wlinear_args(T, K, N, scheme, group):
    def make(dtype, g):
        w = _rand(g, N, K, dtype=torch.float32, scale=K ** -0.5)
        return [_rand(g, T, K, dtype=dtype), quantize(w, resolve(scheme, group), dtype)]
    return make


def _packed(ws, scheme, group, dtype):
    """fp32 weights -> PackedWeights of `scheme` (a stack stays one stacked PackedWeight)."""
    return tuple(quantize(w.float(), resolve(scheme, group), dtype) for w in ws)


def _wswiglu_args(T, H, I, scheme, group):
    def make(dtype, g):
        return [_rand(g, T, H, dtype=dtype), *_packed(_mlp_weights(g, H, I, torch.float32), scheme, group, dtype)]
    return make


def _wexperts_args(T, H, I, E, k, scheme, group):
    def make(dtype, g):
        x, w, ids, *experts = _experts_args(T, H, I, E, k)(torch.float32, g)
        return [x.to(dtype), w.to(dtype), ids, *_packed(experts, scheme, group, dtype)]
    return make


def _wmoe_args(T, H, I, E, k, scheme, group, shared_I=0):
    def make(dtype, g):
        x, router, b = _router(g, T, H, E, dtype, True)
        experts = _packed(_mlp_weights(g, H, I, torch.float32, E), scheme, group, dtype)
        shared = _packed(_mlp_weights(g, H, shared_I, torch.float32), scheme, group, dtype) if shared_I else None
        return [x, router, b, *experts, k, 1e-12, shared]
    return make


def _wembedding_args(T, V, H, scheme, group):
    def make(dtype, g):
        ids = torch.cat([torch.randint(0, V, (T - 2,), generator=g), torch.tensor([0, V - 1])])  # both ends
        return [ids, quantize(_rand(g, V, H, dtype=torch.float32), resolve(scheme, group), dtype)]
    return make


# Every parametrized shape names the edge it covers. Tiny by default: the Triton interpreter
# runs every program in numpy. `slow` ones are the production widths.
CASES = (
    Case("embedding", "T=7 V=100 H=64", _embedding_args(7, 100, 64)),
    Case("linear", "T=7 64->96 (N not a power of two)", _linear_args(7, 64, 96)),
    Case("linear", "T=1 2560->2560 (decode, 21B-A3B width)", _linear_args(1, 2560, 2560), slow=True),
    Case("linear.wint8", "T=1 256->72 per channel (GEMV tiles, N not a power of two)",
         _wlinear_args(1, 256, 72, "wint8", -1)),
    Case("linear.wint8", "T=40 256->72 g32 (GEMM tiles, ragged rows)", _wlinear_args(40, 256, 72, "wint8", 32)),
    Case("linear.wint4", "T=1 256->72 g128 (GEMV tiles)", _wlinear_args(1, 256, 72, "wint4", 128)),
    Case("linear.wint4", "T=40 256->72 per channel (GEMM tiles)", _wlinear_args(40, 256, 72, "wint4", -1)),
    Case("swiglu_mlp.wint8", "T=1 H=64 I=96 per channel (decode GEMV, I not a power of two)",
         _wswiglu_args(1, 64, 96, "wint8", -1)),
    Case("swiglu_mlp.wint4", "T=20 H=64 I=128 g32 (GEMM tiles, ragged rows)", _wswiglu_args(20, 64, 128, "wint4", 32)),
    Case("moe_experts.wint8", "T=5 E=8 k=2 H=64 I=32 g32 (experts with no token)",
         _wexperts_args(5, 64, 32, 8, 2, "wint8", 32)),
    Case("moe_experts.wint4", "T=3 E=16 k=1 H=64 I=64 per channel (most experts empty)",
         _wexperts_args(3, 64, 64, 16, 1, "wint4", -1)),
    Case("moe.wint8", "T=6 E=8 k=2 H=64 I=32 per channel + shared (tiny-moe)",
         _wmoe_args(6, 64, 32, 8, 2, "wint8", -1, 64)),
    Case("moe.wint8", "T=1 E=8 k=2 H=128 I=64 g64 + shared (decode)", _wmoe_args(1, 128, 64, 8, 2, "wint8", 64, 64)),
    Case("moe.wint4", "T=5 E=7 k=3 H=64 I=64 g32 (odd E, no shared)", _wmoe_args(5, 64, 64, 7, 3, "wint4", 32)),
    Case("moe.wint4", "T=1 E=8 k=2 H=128 I=128 g128 + shared (decode, default group)",
         _wmoe_args(1, 128, 128, 8, 2, "wint4", 128, 128)),
    Case("moe.wint4", "T=64 E=64 k=6 H=256 I=128 g128 + shared (21B-A3B routing)",
         _wmoe_args(64, 256, 128, 64, 6, "wint4", 128, 256), slow=True),
    Case("embedding.wint8", "T=7 V=100 H=96 per channel (H not a power of two, first and last rows)",
         _wembedding_args(7, 100, 96, "wint8", -1)),
    Case("embedding.wint4", "T=7 V=100 H=64 g32 (first and last rows)", _wembedding_args(7, 100, 64, "wint4", 32)),
    Case("rms_norm", "T=1 H=64 (one decode row)", _norm_args(1, 64, False)),
    Case("rms_norm", "T=7 H=96 (H not a power of two)", _norm_args(7, 96, False)),
    Case("rms_norm", "T=256 H=2560 (21B-A3B hidden)", _norm_args(256, 2560, False), slow=True),
    Case("add_rms_norm", "T=1 H=64 (one decode row)", _norm_args(1, 64, True)),
    Case("add_rms_norm", "T=7 H=96 (H not a power of two)", _norm_args(7, 96, True)),
    Case("add_rms_norm", "T=256 H=8192 (300B hidden)", _norm_args(256, 8192, True), slow=True),
    Case("rope", "T=5 nh=4 nkv=2 d=32 (GQA, positions to 4095)", _rope_args(5, 4, 2, 32)),
    Case("rope", "T=3 nh=2 nkv=2 d=8 (4 pairs, MHA)", _rope_args(3, 2, 2, 8)),
    Case("rope", "T=64 nh=20 nkv=4 d=128 (21B-A3B heads)", _rope_args(64, 20, 4, 128), slow=True),
    Case("kv_cache_write", "T=5 nkv=2 d=32 (scattered slots)", _cache_args(5, 4, 2, 32, False)),
    Case("rope_kv_write", "T=5 nh=4 nkv=2 d=32 (scattered slots)", _cache_args(5, 4, 2, 32, True)),
    Case("rope_kv_write", "T=1 nh=4 nkv=1 d=16 (decode, MQA)", _cache_args(1, 4, 1, 16, True)),
    Case("rope_kv_write", "T=64 nh=20 nkv=4 d=128 (21B-A3B heads)", _cache_args(64, 20, 4, 128, True, 8, 16),
         slow=True),
    Case("gqa_attention", "decode B=3 ctx=1,17,40 (ragged, partial blocks)",
         _attention_args([1, 1, 1], [1, 17, 40], 4, 2, 32)),
    Case("gqa_attention", "decode B=2 ctx=700,1300 (split along the context)",
         _attention_args([1, 1], [700, 1300], 4, 2, 16)),
    Case("gqa_attention", "prefill B=2 q=5,12 (ragged, causal)", _attention_args([5, 12], [5, 12], 4, 2, 32)),
    Case("gqa_attention", "chunked prefill B=2 q=4,3 ctx=20,3 (cached prefix)",
         _attention_args([4, 3], [20, 3], 4, 1, 16)),
    Case("gqa_attention", "prefill B=1 q=512 nh=20 nkv=4 d=128 (21B-A3B)",
         _attention_args([512], [512], 20, 4, 128), slow=True),
    Case("gqa_attention", "decode B=16 ctx=2048 nh=20 nkv=4 d=128 (21B-A3B)",
         _attention_args([1] * 16, [2048] * 16, 20, 4, 128), slow=True),
    Case("swiglu_mlp", "T=1 H=64 I=96 (decode, I not a power of two)", _swiglu_args(1, 64, 96)),
    Case("swiglu_mlp", "T=9 H=64 I=128", _swiglu_args(9, 64, 128)),
    Case("swiglu_mlp", "T=128 H=1024 I=3072 (0.3B MLP)", _swiglu_args(128, 1024, 3072), slow=True),
    Case("moe_route", "T=5 E=8 k=2 (with bias)", _route_args(5, 64, 8, 2)),
    Case("moe_route", "T=4 E=7 k=7 (odd E, k = E)", _route_args(4, 64, 7, 7)),
    Case("moe_route", "T=3 E=8 k=2 (no bias)", _route_args(3, 64, 8, 2, bias=False)),
    Case("moe_experts", "T=5 E=8 k=2 H=64 I=32 (experts with no token)", _experts_args(5, 64, 32, 8, 2)),
    Case("moe_experts", "T=1 E=8 k=2 (decode)", _experts_args(1, 64, 32, 8, 2)),
    Case("moe", "T=6 E=8 k=2 H=64 I=32 + shared (tiny-moe)", _moe_args(6, 64, 32, 8, 2, 64)),
    Case("moe", "T=5 E=7 k=3 I=48 (odd E, no shared)", _moe_args(5, 64, 48, 7, 3)),
    Case("moe", "T=4 E=6 k=6 (k = E)", _moe_args(4, 64, 32, 6, 6)),
    Case("moe", "T=1 E=8 k=2 + shared (decode)", _moe_args(1, 64, 32, 8, 2, 64)),
    Case("moe", "T=256 E=64 k=6 H=256 I=128 + shared (21B-A3B routing)", _moe_args(256, 256, 128, 64, 6, 256),
         slow=True),
    Case("moe", "T=1 E=64 k=6 H=2560 I=1536 + shared (21B-A3B decode)", _moe_args(1, 2560, 1536, 64, 6, 3072),
         slow=True),
)


def cases(ops=None, slow: bool = False) -> list:
    """The cases for `ops` (None: all); "model" and "decode_graphs" name whole-model rows."""
    known = set(OPS) | set(QUANT_OPS)
    wanted = known if ops is None else set(ops) - {"model", "decode_graphs", "parallel"}
    unknown = wanted - known
    if unknown:
        raise ValueError(f"unknown ops {sorted(unknown)}; choose from {', '.join(OPS + QUANT_OPS)}, model, "
                         f"decode_graphs, parallel")
    return [c for c in CASES if c.op in wanted and (slow or not c.slow)]


# ---- running one case -------------------------------------------------------------------------
def _seed(*parts) -> int:
    return zlib.crc32("|".join(map(str, parts)).encode())


def _to(x, device=None, dtype_map=None):
    """Move a (nested) call argument: tensors to `device`, floating ones through `dtype_map`."""
    if isinstance(x, torch.Tensor):
        if dtype_map is not None and x.is_floating_point():
            x = x.to(dtype_map(x.dtype))
        return x.to(device).clone() if device is not None else x.clone()
    if isinstance(x, (tuple, list)):
        return type(x)(_to(t, device, dtype_map) for t in x)
    if isinstance(x, PackedWeight):     # integers and fp32 scales move as they are
        return x.to(device) if device is not None else x
    return x


def _outputs(op: str, result, args) -> list:
    """The tensors to compare: what the op returns plus any cache it writes."""
    if op == "kv_cache_write":
        return [args[2], args[3]]
    if op == "rope_kv_write":
        return [result, args[5], args[6]]
    if op == "moe_route":   # top-k order may differ: compare per row sorted by expert id
        weights, ids = result
        order = ids.argsort(dim=-1)
        return [weights.gather(-1, order), ids.gather(-1, order)]
    return list(result) if isinstance(result, tuple) else [result]


def compare(got: list, want: list, atol: float, rtol: float) -> tuple:
    """(ok, max abs error, what failed)."""
    worst, problems = 0.0, []
    for i, (g, w) in enumerate(zip(got, want)):
        g = g.detach().cpu()
        if g.shape != w.shape:
            return False, None, f"output {i}: shape {tuple(g.shape)}, expected {tuple(w.shape)}"
        if not g.is_floating_point():
            bad = int((g != w).sum())
            if bad:
                problems.append(f"output {i}: {bad} of {w.numel()} integers differ")
            continue
        g64, w64 = g.double(), w.double()
        if not torch.isfinite(g64).all():
            return False, float("nan"), f"output {i}: non-finite values"
        err = (g64 - w64).abs()
        worst = max(worst, float(err.max()) if err.numel() else 0.0)
        over = err > atol + rtol * w64.abs()
        if over.any():
            problems.append(f"output {i}: {int(over.sum())} of {w.numel()} values beyond "
                            f"atol={atol:g} rtol={rtol:g}")
    return not problems, worst, "; ".join(problems)


def tolerance(fn, dtype: torch.dtype, table=TOLERANCE) -> tuple:
    atol, rtol = table[dtype]
    override = (getattr(fn, "ernie_hal_tolerance", None) or {}).get(dtype_name(dtype))
    if override:
        atol, rtol = override.get("atol", atol), override.get("rtol", rtol)
    return atol, rtol


def skip_reason(backend, dtype: torch.dtype, impl: str = "triton", forced: bool = False) -> str:
    """Why (backend, dtype) is not tested; bf16 Triton kernels are not run by the interpreter
    unless asked for (`forced`)."""
    if dtype not in backend.caps.dtypes:
        return f"{backend.info.name} does not support {dtype_name(dtype)}"
    if dtype == torch.bfloat16 and emulated(backend) and "triton" in impl and not forced:
        return INTERPRETER_BF16
    return ""


def run_case(registry, backend, case: Case, dtype: torch.dtype, forced: bool = False) -> Result:
    row = dict(backend=backend.name, device=backend.info.name, op=case.op, dtype=dtype_name(dtype),
               shape=case.shape)
    why = skip_reason(backend, dtype, impl="", forced=forced)
    if why:
        return Result(**row, status="skip", max_error=None, reason=why)
    fn, why = native_kernel(registry, backend, case.op, dtype)
    if fn is None:
        return Result(**row, status="skip", max_error=None, reason=why)
    impl = impl_of(fn)
    why = skip_reason(backend, dtype, impl=impl, forced=forced)
    if why:
        return Result(**row, status="skip", max_error=None, reason=why, impl=impl)
    args = case.make(dtype, torch.Generator().manual_seed(_seed(case.op, case.shape)))
    oracle_args = _to(args, None, lambda dt: _oracle_dtype(args))
    want = [w.double() if w.is_floating_point() else w
            for w in _outputs(case.op, reference_op(case.op)(*oracle_args), oracle_args)]
    dev_args = _to(args, backend.device)
    if "." in case.op:      # packed weights in the layout the backend's kernels read (bound at load)
        prep, _ = native_kernel(registry, backend, "prepare_weight." + case.op.split(".")[1], dtype)
        if prep is not None:
            role = "embed" if case.op.startswith("embedding.") else None   # a lookup reads rows
            dev_args = _prepared(dev_args, lambda w: prep(w, role))
    try:
        result = fn(*dev_args)
        backend.synchronize()
        got = _outputs(case.op, result, dev_args)
    except Exception as e:  # a kernel that raises is a failure with its message, not a crash
        return Result(**row, status="fail", max_error=None, reason=f"{type(e).__name__}: {e}", impl=impl)
    atol, rtol = tolerance(fn, dtype)
    ok, err, why = compare(got, want, atol, rtol)
    return Result(**row, status="pass" if ok else "fail", max_error=err, reason=why, impl=impl)


def _prepared(x, prep):
    """Every PackedWeight in a (nested) call argument through prepare_weight (moe's shared MLP)."""
    if isinstance(x, PackedWeight):
        return prep(x)
    if isinstance(x, (tuple, list)):
        return type(x)(_prepared(t, prep) for t in x)
    return x


def _oracle_dtype(args) -> torch.dtype:
    """float64, or float32 for production-size inputs (the 21B-A3B experts would take 6 GB)."""
    def numel(x):
        if isinstance(x, torch.Tensor):
            return x.numel() if x.is_floating_point() else 0
        return sum(map(numel, x)) if isinstance(x, (tuple, list)) else 0
    return torch.float64 if numel(args) <= ORACLE_FP64_LIMIT else torch.float32


ORACLE_FP64_LIMIT = 1 << 24    # elements


def reference_op(op: str):
    from ...kernels.reference import OPS as REF, OPS_QUANT
    base, _, scheme = op.partition(".")
    return (OPS_QUANT if scheme else REF)[base]


# ---- a whole tiny model ------------------------------------------------------------------------
PROMPTS = ([3, 17, 101, 5, 250, 9, 77, 12, 400], [8, 2, 511, 64, 33])   # ragged prefill
DECODE = ([21, 7], [300, 45])                                         # then two decode steps


@torch.inference_mode()
def model_logits(model) -> torch.Tensor:
    """float32 logits of a ragged prefill of PROMPTS then two decode steps, rows concatenated."""
    from ..runtime.kvcache import KVCache
    c, backend = model.config, model.backend
    kv = KVCache(c.num_hidden_layers, 8, 16, c.num_key_value_heads, c.head_dim, model.dtype,
                 backend.device, alloc=backend.alloc)
    ids = [0, 1]
    for s in ids:
        kv.add_sequence(s)
    out = []
    steps = [list(PROMPTS)] + [[[a], [b]] for a, b in zip(*DECODE)]
    for step in steps:
        meta = kv.prepare(ids, [len(t) for t in step])
        tokens = torch.tensor([t for seq in step for t in seq], dtype=torch.long, device=backend.device)
        out.append(model.forward(tokens, meta, kv).float().cpu())
    return torch.cat(out)


@functools.lru_cache(maxsize=4)
def _oracle_logits(path: str) -> torch.Tensor:
    from ..plugins.registry import get_registry
    from ..api import load
    return model_logits(load(path, device=get_registry().pick("cpu"), dtype=torch.float32).model)


def run_model(registry, backend, preset: str, dtype: torch.dtype, forced: bool = False) -> Result:
    from ..api import load
    from ..model.defaults import random_model_path
    row = dict(backend=backend.name, device=backend.info.name, op="model", dtype=dtype_name(dtype),
               shape=f"{preset}: ragged prefill + 2 decode steps")
    why = skip_reason(backend, dtype, forced=forced)
    if why:
        return Result(**row, status="skip", max_error=None, reason=why)
    path = random_model_path(preset)
    try:
        model = load(path, device=backend, dtype=dtype).model
        got = model_logits(model)
    except Exception as e:
        return Result(**row, status="fail", max_error=None, reason=f"{type(e).__name__}: {e}")
    want = _oracle_logits(path).double()
    atol, rtol = MODEL_TOLERANCE[dtype]
    ok, err, why = compare([got], [want], atol, rtol)
    impls = {op: impl_of(fn) for op, fn in model.kernels.ops.items()}
    fallback = [op for op in impls if native_kernel(registry, backend, op, dtype)[0] is None]
    note = f"reference fallback for {', '.join(fallback)}" if fallback else ""
    summary = ", ".join(f"{n} {k}" for k, n in _count(impls.values()))
    return Result(**row, status="pass" if ok else "fail", max_error=err,
                  reason="; ".join(filter(None, [why, note])), impl=summary)


def _count(values) -> list:
    counts: dict = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return sorted(counts.items(), key=lambda kv: -kv[1])


GRAPH_PROMPTS = ([3, 17, 101, 5], [8, 2, 511, 64, 33, 9, 12], [40] * 19, [250, 7])


def run_decode_graphs(backend, preset: str, dtype: torch.dtype, forced: bool = False) -> Result:
    """Greedy decoding replayed from captured device graphs gives the eager run's ids (batch 1
    and 4, the captured sizes themselves, so both runs launch the same kernels on the same
    shapes). max_error counts differing tokens."""
    from ..api import load
    from ..model.defaults import random_model_path
    row = dict(backend=backend.name, device=backend.info.name, op="decode_graphs", dtype=dtype_name(dtype),
               shape=f"{preset}: greedy, batch 1 then 4 (a KV regrow), 12 tokens")
    why = skip_reason(backend, dtype, forced=forced) or (
        "" if backend.caps.graphs else f"{backend.info.name} cannot capture device graphs")
    if why:
        return Result(**row, status="skip", max_error=None, reason=why)
    path = random_model_path(preset)
    kw = dict(max_new_tokens=12, temperature=0, ignore_eos=True)
    try:
        graphed, eager = (load(path, device=backend, dtype=dtype, eager=e) for e in (False, True))
        got = [c.token_ids for n in (1, 4) for c in graphed.generate([list(p) for p in GRAPH_PROMPTS[:n]], **kw)]
        want = [c.token_ids for n in (1, 4) for c in eager.generate([list(p) for p in GRAPH_PROMPTS[:n]], **kw)]
    except Exception as e:
        return Result(**row, status="fail", max_error=None, reason=f"{type(e).__name__}: {e}")
    state, m = graphed.engine.decode_graphs, graphed.engine.graph_metrics()
    if not state.startswith("on"):
        return Result(**row, status="fail", max_error=None, reason=f"decode graphs {state}")
    # batch 4 needs a bigger KV cache than batch 1: graphs must survive the regrow, every step replayed
    if m["decode_graph_binds"] < 2 or m["decode_graph_eager_steps"]:
        return Result(**row, status="fail", max_error=None,
                      reason=f"after {m['decode_graph_binds'] - 1} KV regrow(s), {m['decode_graph_eager_steps']} "
                             f"decode steps ran eager; {state}")
    differ = sum(a != b for g, w in zip(got, want) for a, b in zip(g, w))
    return Result(**row, status="pass" if differ == 0 else "fail", max_error=float(differ),
                  reason="" if differ == 0 else f"{differ} greedy tokens differ from the eager run; {state}")


def run_parallel(backend, preset: str, dtype: torch.dtype, tp: int, expert_parallel: bool,
                 forced: bool = False) -> Result:
    """The model split over `tp` ranks (worker processes on this backend's devices) gives the
    logits of one process on the same device, ragged prefill and decode steps included."""
    from ..api import load
    from ..model.defaults import random_model_path
    mode = "expert" if expert_parallel else "tensor"
    row = dict(backend=backend.name, device=backend.info.name, op="parallel", dtype=dtype_name(dtype),
               shape=f"{preset}: {mode} parallel x{tp} vs 1 process")
    why = skip_reason(backend, dtype, forced=forced) or (
        "emulated backends cannot start worker processes" if emulated(backend) else "")
    if why:
        return Result(**row, status="skip", max_error=None, reason=why)
    path = random_model_path(preset)
    split = None
    try:
        want = model_logits(load(path, device=backend, dtype=dtype).model).double()
        split = load(path, device=backend.info.label, dtype=dtype, tensor_parallel_size=tp,
                     expert_parallel=expert_parallel and "moe" in preset)
        got = model_logits(split.model)
    except Exception as e:
        return Result(**row, status="fail", max_error=None, reason=f"{type(e).__name__}: {e}")
    finally:
        if split is not None:
            split.close()
    atol, rtol = MODEL_TOLERANCE[dtype]
    ok, err, why = compare([got], [want], atol, rtol)
    return Result(**row, status="pass" if ok else "fail", max_error=err, reason=why,
                  impl=f"all_reduce={split.kernels.get('all_reduce', '?')}")


# ---- the matrix -------------------------------------------------------------------------------
def run(registry, backend, ops=None, dtypes=None, slow: bool = False, models: bool = True,
        forced_dtypes: bool = False, progress=None, tensor_parallel_size: int = 1,
        expert_parallel: bool = False) -> list:
    """Every case x dtype on `backend`, then the model rows. `dtypes` None: the backend's."""
    dts = list(dtypes) if dtypes else [d for d in (torch.float32, torch.float16, torch.bfloat16)
                                       if d in backend.caps.dtypes]
    out = []
    kernel_ops = None if ops is None else [op for op in ops if op not in ("model", "decode_graphs", "parallel")]
    for case in cases(kernel_ops, slow) if kernel_ops is None or kernel_ops else []:
        for dt in dts:
            r = run_case(registry, backend, case, dt, forced=forced_dtypes)
            out.append(r)
            if progress:
                progress(r)
    if models and (ops is None or "model" in ops):
        for preset in MODEL_PRESETS:
            for dt in dts:
                r = run_model(registry, backend, preset, dt, forced=forced_dtypes)
                out.append(r)
                if progress:
                    progress(r)
    if models and (ops is None or "decode_graphs" in ops):
        for dt in dts:
            r = run_decode_graphs(backend, "tiny-moe", dt, forced=forced_dtypes)
            out.append(r)
            if progress:
                progress(r)
    if models and tensor_parallel_size > 1 and (ops is None or "parallel" in ops):
        for preset in MODEL_PRESETS:
            for dt in dts:
                r = run_parallel(backend, preset, dt, tensor_parallel_size, expert_parallel, forced=forced_dtypes)
                out.append(r)
                if progress:
                    progress(r)
    return out


def absent(name: str, reason: str, ops=None, dtypes=None) -> list:
    """One skip row per op for a backend that is not here, with its probe reason."""
    dts = [dtype_name(d) for d in dtypes] if dtypes else ["all"]
    rows = [op for op in OPS if ops is None or op in ops] + [
        op for op in ("model", "decode_graphs") if ops is None or op in ops]
    return [Result(name, "-", op, dt, "all", "skip", None, reason) for op in rows for dt in dts]

"""Kernel launches per decoder layer of one forward, counted where they are issued.

A small decode batch on a GPU is bound by launches, not bandwidth (~5 us each), so their count per
layer is the number to cut. Counted on any device, the cpu included (Triton kernels under the
interpreter), from two sources:
  - every Triton kernel launch (`kernel[grid](...)`), by kernel name;
  - every aten op the forward dispatches that does device work (views, empty tensors and other
    metadata-only ops excluded): on a GPU each is at least one kernel (a cuBLAS GEMM, an
    elementwise or a copy), so this is a lower bound of what the profiler shows.
Host syncs (`.item()`, a device tensor copied to the cpu) are counted apart: inside a step they
stall the launch queue and make graph capture fail (none exist on the cpu backend).
Launches are attributed to the layer whose weights were last asked for (the weight store's
`layer(i)`), "embed" before the first and "head" after `output()`.
"""

from __future__ import annotations

import threading
from collections import Counter, defaultdict
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_NO_WORK = {"empty", "empty_like", "empty_strided", "lift_fresh", "detach", "alias", "set_",
            "resize_", "_reshape_alias", "sym_size", "sym_stride", "sym_numel", "is_same_size",
            "result_type"}
SYNC = "aten._local_scalar_dense"


def _does_work(func) -> bool:
    name = func.overloadpacket.__name__
    return not (getattr(func, "is_view", False) or name in _NO_WORK or name.startswith("empty"))


class LaunchCounter:
    """Launches per attribution bucket: bucket -> Counter(kernel -> count)."""

    def __init__(self):
        self.by_layer: dict = defaultdict(Counter)
        self.where = "embed"
        self._in_triton = threading.local()

    def add(self, name: str) -> None:
        self.by_layer[self.where][name] += 1

    def totals(self) -> dict:
        return {k: sum(v.values()) for k, v in self.by_layer.items()}

    def syncs(self) -> int:
        return sum(c[SYNC] for c in self.by_layer.values())

    def launches(self, where) -> int:
        """Launches (host syncs not counted) of one bucket."""
        c = self.by_layer.get(where, Counter())
        return sum(n for k, n in c.items() if k != SYNC)


class _Dispatch(TorchDispatchMode):
    def __init__(self, counter: LaunchCounter):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        c = self.counter
        if not getattr(c._in_triton, "on", False) and _does_work(func):
            c.add(SYNC if _is_sync(func, args, kwargs or {}) else f"aten.{func.overloadpacket.__name__}")
        return func(*args, **(kwargs or {}))


def _is_sync(func, args, kwargs) -> bool:
    """A read of device memory by the host: .item(), or a copy from a device tensor to the cpu
    (.tolist(), .cpu()). On the cpu backend there is no such thing."""
    name = func.overloadpacket.__name__
    if name == "_local_scalar_dense":
        return args[0].device.type != "cpu"
    if name == "_to_copy" and args and isinstance(args[0], torch.Tensor) and args[0].device.type != "cpu":
        return str(kwargs.get("device", args[0].device)).startswith("cpu")
    return False


def _triton_runners():
    """The classes whose `run` launches a kernel (compiled and interpreted)."""
    out = []
    try:
        from triton.runtime.jit import JITFunction
        out.append(JITFunction)
    except Exception:  # noqa: BLE001 - triton is optional
        pass
    try:
        from triton.runtime.interpreter import InterpretedFunction
        out.append(InterpretedFunction)
    except Exception:  # noqa: BLE001
        pass
    return out


@contextmanager
def count_launches(weights=None):
    """Count inside the block; with `weights` (the model's weight store), per layer."""
    counter = LaunchCounter()
    patched = []
    for cls in _triton_runners():
        original = cls.run

        def run(self, *a, _original=original, **k):
            counter.add(f"triton.{getattr(self, '__name__', None) or getattr(self.fn, '__name__', '?')}")
            counter._in_triton.on = True        # the interpreter's own tensor work is not ours
            try:
                return _original(self, *a, **k)
            finally:
                counter._in_triton.on = False
        cls.run = run
        patched.append((cls, original))
    store = []
    if weights is not None:
        layer, output = weights.layer, weights.output

        def counted_layer(i):
            counter.where = i
            return layer(i)

        def counted_output():
            counter.where = "head"
            return output()
        weights.layer, weights.output = counted_layer, counted_output
        store = [(weights, layer, output)]
    try:
        with _Dispatch(counter):
            yield counter
    finally:
        for cls, original in patched:
            cls.run = original
        for w, layer, output in store:
            w.layer, w.output = layer, output


def decode_step_launches(model, batch: int = 1, context: int = 8) -> dict:
    """Launch counts of one eager decode step of `model` (an api.Model) over `batch` sequences
    with `context` cached tokens each: per layer kind (dense / moe), totals and host syncs."""
    eng = model.engine
    from ..runtime.sampling import SamplingParams
    params = SamplingParams(max_new_tokens=2, temperature=0, ignore_eos=True)
    seqs = [eng.new_sequence([5 + i] * context, params) for i in range(batch)]
    kv = eng.ensure_kv(sum(eng.blocks_for(context + 2) for _ in seqs))
    for s in seqs:
        kv.add_sequence(s.seq_id)
    try:
        eng.step(seqs)                              # prefill
        graphs, eng.graphs = eng.graphs, None       # count the eager forward
        try:
            with count_launches(model.model.weights) as c:
                eng.step(seqs)                      # one decode step (forward + sampling)
        finally:
            eng.graphs = graphs
    finally:
        for s in seqs:
            eng.free(s)
    blocks = model.model.graph.blocks
    kinds = {b.index: ("moe" if b.moe is not None else "dense") for b in blocks}
    per_kind: dict = {}
    for i, kind in kinds.items():
        per_kind.setdefault(kind, []).append(c.launches(i))
    layers = sum(c.launches(i) for i in kinds)
    return {"batch": batch, "context": context, "layers": len(kinds),
            "per_layer": {k: max(v) for k, v in per_kind.items()},
            "per_layer_ops": {kinds[i]: dict(sorted((k, n) for k, n in c.by_layer[i].items() if k != "aten._local_scalar_dense"))
                              for i in sorted(kinds, reverse=True)},
            "decoder_layers_total": layers, "embed": c.launches("embed"), "head_and_sampling": c.launches("head"),
            "step_total": layers + c.launches("embed") + c.launches("head"), "host_syncs": c.syncs(),
            "kernels": {k: dict(v) for k, v in ((str(i), c.by_layer[i]) for i in c.by_layer)}}

"""`ernie-hal devices`: every backend, its probe, and a real tiny op on each available device,
checked against the reference on the CPU (like `python -m tinygrad.device`)."""

from __future__ import annotations

import dataclasses

import torch

from .kernel_table import OpSpec


def describe_all(registry, smoke_test: bool = True) -> list:
    rows = []
    for spec in sorted(registry.specs(), key=lambda s: (-s.priority, s.name)):
        probe = registry.probe(spec.name)
        if not probe.available:
            rows.append(_row(spec.name, False, probe.reason))
            continue
        for i, dev in enumerate(probe.devices or (None,)):
            try:
                backend = spec.factory(i)
            except Exception as e:  # the device is listed but cannot be opened
                rows.append(_row(spec.name, False, f"cannot open {spec.name}:{i}: {type(e).__name__}: {e}"))
                continue
            row = _row(spec.name, True, "", backend.info)
            row["capabilities"] = capabilities(backend.caps)
            if smoke_test:
                row["smoke_test"], row["smoke_detail"] = smoke(registry, backend)
                row["kernels"] = _kernel_sources(registry, backend)
                row["quantization"] = _quant_kernels(registry, backend)
            rows.append(row)
    return rows


def capabilities(caps) -> dict:
    """Capabilities as JSON: dtypes by name, the rest as they are."""
    out = dataclasses.asdict(caps)
    out["dtypes"] = [str(d).replace("torch.", "") for d in caps.dtypes]
    return out


def _row(name, available, reason, info=None) -> dict:
    return {"backend": name, "available": available, "reason": reason,
            "device": info.label if info else None, "name": info.name if info else None,
            "arch": info.arch if info else None, "memory_bytes": info.memory_total if info else None,
            "bandwidth_gbps": info.bandwidth_gbps if info else None,
            "smoke_test": None, "smoke_detail": "", "kernels": {}, "capabilities": {}}


def _kernel_sources(registry, backend) -> dict:
    """op -> the implementation the backend binds (triton, aiter, reference, ...), or
    "reference (fallback: why)" where it has no kernel of its own."""
    try:
        from .binding_report import bindings
        return bindings(registry, backend, torch.float32)
    except Exception as e:
        return {"error": str(e)}


def _quant_kernels(registry, backend) -> dict:
    """Per weight-only scheme, the implementation each op that takes packed weights binds
    (embedding, linear, swiglu_mlp, moe_experts, moe), or "reference (fallback: why)"."""
    out = {}
    for scheme in ("wint8", "wint4"):
        try:
            from .binding_report import bindings
            out[scheme] = bindings(registry, backend, torch.float32, scheme)
        except Exception as e:
            out[scheme] = {"error": str(e)}
    return out


def smoke(registry, backend) -> tuple:
    """RMSNorm, rotary embedding and a linear on the device versus the CPU reference, fp32."""
    from ...kernels import reference as ref
    try:
        table = registry.kernel_table(backend, OpSpec(dtype=torch.float32))
        g = torch.Generator().manual_seed(0)
        x, w = torch.randn(8, 64, generator=g), torch.randn(64, generator=g)
        m, q = torch.randn(32, 64, generator=g), torch.randn(8, 2, 16, generator=g)
        pos = torch.arange(8)
        dev = backend.device
        got = table.linear(table.rms_norm(x.to(dev), w.to(dev), 1e-5), m.to(dev))
        gq, _ = table.rope(q.to(dev), q.to(dev), pos.to(dev), 500000.0)
        backend.synchronize()
        want = ref.linear(ref.rms_norm(x, w, 1e-5), m)
        wq, _ = ref.rope(q, q, pos, 500000.0)
        err = max((got.cpu() - want).abs().max().item(), (gq.cpu() - wq).abs().max().item())
        ok = err < 1e-3
        return ("PASS" if ok else "FAIL"), f"max abs error {err:.2e}"
    except Exception as e:
        return "FAIL", f"{type(e).__name__}: {e}"

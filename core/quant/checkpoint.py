"""The quantized checkpoint format (`ernie-hal quantize` writes it, the loader reads it).

Safetensors shards like the -PT checkpoint's, same tensor names; for every quantized weight
(core/quant/scheme.py QUANTIZED_ROLES):
  <name>          the packed integers: I8 [out, in] (wint8) or U8 [out, in/2] (wint4: q + 8,
                  low nibble = even column)
  <name>_scale    F32 [out, in / group_size] (one column per channel)
Norms, the router (F32) and its correction bias stay as in the source checkpoint. config.json
carries `quantization_config` (QuantSpec.as_config) and keeps torch_dtype: the dtype the
unquantized weights had, which the model still computes in by default.
"""

from __future__ import annotations

import torch

from .format import PackedWeight, empty_packed
from .quantize import block_rows, quantize_rows_into
from .scheme import QuantError, QuantSpec, from_config, resolve

SCALE_SUFFIX = "_scale"


def scale_name(name: str) -> str:
    return name + SCALE_SUFFIX


def stored_spec(config) -> QuantSpec | None:
    """The scheme a checkpoint's config.json declares (ModelConfig.extra), or None."""
    qc = (config.extra or {}).get("quantization_config")
    return None if qc is None else from_config(qc, "config.json")


def choose(stored: QuantSpec | None, quantization, group_size, where: str) -> QuantSpec | None:
    """The scheme a load runs with. `quantization` None (or "auto") takes the checkpoint's own;
    asking a quantized checkpoint for another scheme or group size is an error (its weights are
    already rounded: requantizing would compound the error silently)."""
    if quantization in (None, "auto"):
        if stored is None:
            return resolve(None, group_size) if group_size is None else resolve("none", group_size)
        if group_size is not None and group_size != stored.group_size:
            raise QuantError(f"{where} is quantized {stored.label}; --group-size {group_size} does not match: "
                             f"drop --group-size or quantize the original checkpoint again")
        return stored
    asked = resolve(quantization, group_size if group_size is not None or stored is None
                    or str(quantization).lower() != stored.scheme else stored.group_size)
    if stored is not None and asked != stored:
        what = "none" if asked is None else asked.label
        raise QuantError(f"{where} is a quantized checkpoint ({stored.label}); it cannot be loaded with "
                         f"--quantization {what}: load it with --quantization {stored.scheme} (or omit the flag), "
                         f"or load the original checkpoint")
    return asked


def packed_shapes(spec: QuantSpec, shape) -> tuple:
    """((data shape, dtype), (scale shape, fp32)) of a weight of logical `shape`."""
    *lead, cols = shape
    data = (tuple(lead) + (cols if spec.bits == 8 else cols // 2,), torch.int8 if spec.bits == 8 else torch.uint8)
    return data, (tuple(lead) + (spec.groups(cols),), torch.float32)


def expected_tensors(graph) -> dict:
    """{name: (shape, dtype)} a quantized checkpoint of `graph` (built with its quant) holds."""
    out = {}
    for w in graph.weights():
        if w.quant is None:
            out[w.name] = (w.shape, w.dtype)
        else:
            data, scales = packed_shapes(w.quant, w.shape)
            out[w.name] = data
            out[scale_name(w.name)] = scales
    return out


def read_packed(ckpt, ref, dtype: torch.dtype, stored: bool, alloc=None, out: PackedWeight | None = None,
                index: int | None = None) -> PackedWeight:
    """Weight `ref` (a WeightRef with .quant) as a PackedWeight in storage from `alloc`.
    stored: the checkpoint already holds it packed (read data and scales straight in); else
    quantize it from the float tensor (`quantize_from`). `out`/`index`: fill expert `index` of a
    packed stack instead of allocating; `out` alone: fill that PackedWeight (a fused buffer's rows)."""
    if out is None:
        pw = empty_packed(ref.quant, ref.shape, dtype, alloc)
    else:
        pw = out if index is None else out[index]
    if stored:
        ckpt.read(ref.name, out=pw.data, release=True)
        ckpt.read(scale_name(ref.name), out=pw.scales, release=True)
    else:
        quantize_from(ckpt, ref, pw)
    return out if out is not None else pw


def quantize_from(ckpt, ref, pw: PackedWeight) -> None:
    """Quantize float tensor `ref` of the checkpoint into `pw`, a block of rows at a time: read
    (Checkpoint.read_slice, its own dtype, on the host), quantize, drop its file pages. Only one
    block is ever held in float, so peak host memory is the packed model plus a few MiB."""
    src = ckpt.ref(ref.name)
    ref.quant.check(ref.name, tuple(src.shape))
    lead, inner = src.shape[0], tuple(src.shape[1:])
    per_row = max(1, src.numel // max(lead, 1) // src.shape[-1])     # rows of `in` values per dim-0 index
    step = max(1, block_rows(src.shape[-1]) // per_row)
    buf = torch.empty((min(step, lead),) + inner, dtype=src.dtype)
    for r in range(0, lead, step):
        block = buf[:min(step, lead - r)]
        ckpt.read_slice(ref.name, block, 0, r, r + block.shape[0], release=True)
        quantize_rows_into(block, pw, r * per_row)


__all__ = ["SCALE_SUFFIX", "scale_name", "stored_spec", "choose", "packed_shapes", "expected_tensors",
           "read_packed", "quantize_from", "QuantError"]

"""write_quantized_checkpoint: a -PT checkpoint -> the quantized checkpoint format
(core/quant/checkpoint.py), streamed one tensor at a time and made visible all at once.

Each weight is read from the source, quantized, written and dropped, so memory holds one float
tensor and its packed form at a time. The result appears by rename from a temporary sibling
directory: an interrupted run leaves nothing half-written under the output name.
"""

from __future__ import annotations

import json
import os
import shutil

import torch

from ..atomic import write_json
from ..quant import checkpoint as qckpt
from ..quant.quantize import quantize
from ..quant.scheme import QuantError, QuantSpec
from .checkpoint_reader import INDEX, SINGLE, Checkpoint
from .checkpoint_writer import DEFAULT_MAX_SHARD_BYTES, _move_into_place, _sibling, plan_shards, shard_header
from .graph import build

SKIP = {"config.json", INDEX}


def write_quantized_checkpoint(src: str, out_dir: str, spec: QuantSpec,
                               max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, progress=None,
                               overwrite: bool = False) -> str:
    """Quantize checkpoint `src` into `out_dir` (must not exist or be empty unless overwrite).
    Tokenizer and generation files are copied; config.json gains `quantization_config`."""
    ckpt = Checkpoint.open(src)
    if qckpt.stored_spec(ckpt.config) is not None:
        raise QuantError(f"{src} is already quantized ({qckpt.stored_spec(ckpt.config).label}); "
                         f"quantize the original checkpoint")
    graph = build(ckpt.config, untied_head=ckpt.lm_head_name == "lm_head.weight", quant=spec)
    ckpt.validate(graph.expected_tensors())
    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.exists(out_dir) and not overwrite and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise FileExistsError(f"{out_dir} exists and is not empty; choose another output directory "
                              f"or pass --overwrite")
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    tensors = qckpt.expected_tensors(graph)
    order = {n: i for i, n in enumerate(tensors)}
    # model order inside each shard (not widest-first): a weight's scales follow its integers, so one
    # quantized weight is in memory at a time; the reader copies the rare unaligned tensor once
    shards = [sorted(s, key=lambda e: order[e[0]]) for s in plan_shards(tensors, max_shard_bytes)]
    refs = {w.name: w for w in graph.weights()}
    staging = _sibling(out_dir, "tmp")
    os.mkdir(staging)
    try:
        with open(os.path.join(src, "config.json"), encoding="utf-8") as f:
            raw = json.load(f)
        raw["quantization_config"] = spec.as_config()
        write_json(os.path.join(staging, "config.json"), raw)
        for name in sorted(os.listdir(src)):
            p = os.path.join(src, name)
            if os.path.isfile(p) and name not in SKIP and not name.endswith(".safetensors"):
                shutil.copy2(p, os.path.join(staging, name))     # tokenizer, generation config
        files = [SINGLE] if len(shards) == 1 else [
            f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        pending = {}      # a quantized weight's scales, until they are written
        for fname, entries in zip(files, shards):
            with open(os.path.join(staging, fname), "wb") as f:
                f.write(shard_header(entries))
                for name, shape, dtype, nbytes in entries:
                    t = _tensor(ckpt, refs, pending, name, spec)
                    assert t.dtype == dtype and tuple(t.shape) == shape, (name, t.shape, shape)
                    f.write(t.contiguous().view(-1).view(torch.uint8).numpy())
                    if progress is not None:
                        progress(nbytes)
        if len(shards) > 1:
            weight_map = {e[0]: fn for fn, s in zip(files, shards) for e in s}
            write_json(os.path.join(staging, INDEX), {
                "metadata": {"total_size": sum(e[3] for s in shards for e in s)},
                "weight_map": {n: weight_map[n] for n in tensors}})
        _move_into_place(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        ckpt.close()
    return out_dir


def _tensor(ckpt, refs, pending, name, spec):
    if name.endswith(qckpt.SCALE_SUFFIX) and name in pending:
        return pending.pop(name)
    ref = refs.get(name)
    if ref is None or ref.quant is None:
        return ckpt.read(name, release=True)
    w = ckpt.read(name, release=True)
    pw = quantize(w, spec, name=name)
    del w
    pending[qckpt.scale_name(name)] = pw.scales
    return pw.data

"""write_quantized_checkpoint: a -PT checkpoint -> the quantized checkpoint format
(core/quant/checkpoint.py), streamed one tensor at a time and made visible all at once.

Each weight is streamed in blocks of whole rows (`block_bytes` of source, read with pread and its
pages dropped): a block is quantized and its integers written before the next is read, so memory
holds one float block, its packed form, and the weight's scales (written after its integers).
Scales are per row, so the blocks give bit for bit the result of quantizing the whole tensor.
Other tensors are copied in blocks of the same size. The result appears by rename from a
temporary sibling directory: an interrupted run leaves nothing half-written under the output name.
"""

from __future__ import annotations

import json
import os
import shutil

import torch

from ..atomic import write_json
from ..quant import checkpoint as qckpt
from ..quant.format import empty_packed
from ..quant.quantize import quantize_rows_into
from ..quant.scheme import QuantError, QuantSpec
from .checkpoint_reader import INDEX, SINGLE, Checkpoint
from .checkpoint_writer import DEFAULT_MAX_SHARD_BYTES, _move_into_place, _sibling, plan_shards, shard_header
from .graph import build

SKIP = {"config.json", INDEX}
BLOCK_BYTES = 32 << 20     # source bytes per read: large reads, a bounded float block in memory


def write_quantized_checkpoint(src: str, out_dir: str, spec: QuantSpec,
                               max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, progress=None,
                               overwrite: bool = False, block_bytes: int = BLOCK_BYTES) -> str:
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
                    written = 0
                    for t in _blocks(ckpt, refs, pending, name, spec, block_bytes):
                        assert t.dtype in (dtype, torch.uint8), (name, t.dtype, dtype)    # uint8: raw copy
                        f.write(t.contiguous().view(-1).view(torch.uint8).numpy())
                        written += t.numel() * t.element_size()
                    assert written == nbytes, (name, written, nbytes, shape)
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


def _blocks(ckpt, refs, pending, name, spec, block_bytes):
    """The bytes of output tensor `name`, as a sequence of tensors to write one after another."""
    if name.endswith(qckpt.SCALE_SUFFIX) and name in pending:
        yield pending.pop(name)
        return
    ref = refs.get(name)
    if ref is None or ref.quant is None:
        assert ref is None or ckpt.ref(name).dtype == ref.dtype, (name, ckpt.ref(name).dtype)
        yield from copy_blocks(ckpt, name, block_bytes)
        return
    scales = None
    for data, block_scales, start in quantized_blocks(ckpt, name, spec, block_bytes):
        if scales is None:
            rows = ckpt.ref(name).numel // ckpt.ref(name).shape[-1]
            scales = torch.empty((rows, block_scales.shape[-1]), dtype=block_scales.dtype)
        scales[start:start + block_scales.shape[0]].copy_(block_scales)
        yield data
    shape = qckpt.packed_shapes(spec, ckpt.ref(name).shape)[1][0]
    pending[qckpt.scale_name(name)] = scales.view(shape)


def copy_blocks(ckpt, name: str, block_bytes: int = BLOCK_BYTES):
    """Tensor `name` as it is stored, `block_bytes` at a time (one reused buffer)."""
    ref = ckpt.ref(name)
    buf = torch.empty(min(block_bytes, ref.nbytes), dtype=torch.uint8)
    for start in range(0, ref.nbytes, block_bytes):
        part = buf[:min(block_bytes, ref.nbytes - start)]
        yield ckpt.pread(name, part, start, release=True)


def quantized_blocks(ckpt, name: str, spec: QuantSpec, block_bytes: int = BLOCK_BYTES):
    """(packed integers, fp32 scales, first row) of float tensor `name`, flattened to rows
    [n, in], a block of whole rows (about `block_bytes` of source) at a time. The float and
    packed buffers are reused: consume each block before asking for the next."""
    ref = ckpt.ref(name)
    spec.check(name, tuple(ref.shape))
    cols = ref.shape[-1]
    rows = ref.numel // max(cols, 1)
    step = max(1, block_bytes // max(cols * ref.dtype.itemsize, 1))
    buf = torch.empty((min(step, rows), cols), dtype=ref.dtype)
    packed = empty_packed(spec, (min(step, rows), cols), torch.float32)
    for r in range(0, rows, step):
        n = min(step, rows - r)
        block = ckpt.pread(name, buf[:n], r * cols * ref.dtype.itemsize, release=True)
        out = packed.rows(0, n)
        quantize_rows_into(block, out)
        yield out.data, out.scales, r

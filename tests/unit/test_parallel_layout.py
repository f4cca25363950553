"""The tensor/expert-parallel layout (core/parallel/layout.py) and the slice reads it relies on
(Checkpoint.read_slice), in one process: which slice of every weight each rank holds, the
refusals, vocabulary padding, bytes per rank. The multi-process runs are in test_parallel.py."""

from __future__ import annotations

import struct

import pytest
import torch

from ernie_hal.core.model.checkpoint_reader import Checkpoint
from ernie_hal.core.model.checkpoint_writer import write_random_checkpoint
from ernie_hal.core.model.config import preset
from ernie_hal.core.model.graph import build
from ernie_hal.core.parallel.layout import LayoutError, all_layouts, describe, layout, local_config


def test_attention_and_mlp_split_by_heads_and_columns():
    g = build(preset("tiny"))                       # 4 heads, 2 KV heads, head_dim 32, I 128
    r0, r1 = all_layouts(g, 2)
    b = g.blocks[0]
    assert (r0.heads, r1.heads, r0.kv_heads, r1.kv_heads) == ((0, 2), (2, 4), (0, 1), (1, 2))
    q, o = r1.shard(b.q), r1.shard(b.o)
    assert (q.dim, q.start, q.stop, q.shape) == (0, 64, 128, (64, 64))       # rows = heads 2..3
    assert (o.dim, o.start, o.stop, o.shape) == (1, 64, 128, (64, 64))       # columns, row-parallel
    gate, down = r1.shard(b.mlp.gate), r1.shard(b.mlp.down)
    assert (gate.dim, gate.start, gate.stop) == (0, 64, 128)
    assert (down.dim, down.start, down.stop, down.shape) == (1, 64, 128, (64, 64))
    assert r0.shard(b.input_norm).dim is None                                 # norms replicated
    assert local_config(g, r0).num_attention_heads == 2 and local_config(g, r0).num_key_value_heads == 1


def test_kv_heads_are_replicated_when_ranks_outnumber_them():
    g = build(preset("tiny").replace(num_key_value_heads=1))
    lays = all_layouts(g, 4)
    assert [lay.kv_heads for lay in lays] == [(0, 1)] * 4
    assert [lay.heads for lay in lays] == [(0, 1), (1, 2), (2, 3), (3, 4)]
    g2 = build(preset("ernie-4.5-300b-a47b"))     # 8 KV heads on 16 ranks: each on 2 ranks
    assert [lay.kv_heads[0] for lay in all_layouts(g2, 16)] == [r // 2 for r in range(16)]


def test_refuses_when_neither_head_count_divides_the_other():
    g = build(preset("tiny").replace(num_attention_heads=12, num_key_value_heads=4, head_dim=16))
    with pytest.raises(LayoutError, match=r"num_key_value_heads 4 and tensor_parallel_size 6"):
        layout(g, 6, 0)
    with pytest.raises(LayoutError, match=r"num_attention_heads 4 is not divisible by tensor_parallel_size 3"):
        layout(build(preset("tiny")), 3, 0)
    with pytest.raises(LayoutError, match="moe_num_experts 8 is not divisible by tensor_parallel_size 3"):
        layout(build(preset("tiny-moe").replace(num_attention_heads=6, num_key_value_heads=3, intermediate_size=96,
                                                moe_num_shared_experts=0)), 3, 0,
               expert_parallel=True)


def test_vocabulary_is_padded_to_a_multiple_of_the_ranks():
    g = build(preset("tiny").replace(vocab_size=509, tie_word_embeddings=False))
    r0, r1 = all_layouts(g, 2)
    assert r0.vocab_per_rank == 255 and (r0.vocab, r1.vocab) == ((0, 255), (255, 509))
    head = r1.shard(g.head)
    assert head.shape == (255, 64) and (head.start, head.stop) == (255, 509)   # one zero row of padding


def test_routed_experts_sharded_or_partitioned():
    g = build(preset("tiny-moe"))                 # 8 experts of width 32, 2 shared (width 64)
    m = g.blocks[1].moe
    tp = all_layouts(g, 2)
    e = tp[1].shard(m.experts[5].gate)
    assert (e.dim, e.start, e.stop, e.shape) == (0, 16, 32, (16, 64)) and tp[1].experts == (0, 8)
    ep = all_layouts(g, 2, expert_parallel=True)
    assert ep[1].experts == (4, 8)
    assert m.experts[5].gate.name in ep[1].shards and m.experts[2].gate.name not in ep[1].shards
    assert ep[1].shard(m.experts[5].down).dim is None                 # whole experts
    assert ep[1].shard(m.shared.down).shape == (64, 32)                # shared: still column/row split
    assert ep[0].shard(m.router).dim is None and ep[0].shard(m.bias).dim is None   # replicated


@pytest.mark.parametrize("ep", [False, True])
def test_bytes_per_rank_are_about_one_nth(ep):
    g = build(preset("ernie-4.5-21b-a3b"))
    desc = describe(g, 2, ep, torch.bfloat16)
    whole = describe(g, 1, False, torch.bfloat16)["total_bytes"]
    for r in desc["ranks"]:
        # norms and the fp32 router are replicated: a little over half
        assert 0.5 * whole <= r["bytes"] < 0.51 * whole


def _write(path, tensors: dict, pad: int) -> None:
    """A one-file safetensors checkpoint whose data starts `pad` bytes off alignment."""
    import json
    header, off, blobs = {}, 0, []
    for name, t in tensors.items():
        raw = t.contiguous().view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": {torch.float32: "F32", torch.bfloat16: "BF16"}[t.dtype], "shape": list(t.shape),
                        "data_offsets": [off, off + len(raw)]}
        off += len(raw)
        blobs.append(raw)
    js = json.dumps(header).encode()
    js += b" " * ((-(8 + len(js))) % 8 + pad)      # data 8-byte aligned, then `pad` bytes off
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(js)) + js + b"".join(blobs))


@pytest.mark.parametrize("pad", [0, 1], ids=["aligned", "unaligned"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_read_slice_equals_slicing_the_whole_tensor(tmp_path, pad, dtype):
    cfg = preset("tiny")
    write_random_checkpoint(cfg, str(tmp_path / "m"), seed=1)
    t = torch.randn(6, 10).to(dtype)
    import shutil
    (tmp_path / "m" / "model.safetensors").unlink()
    _write(tmp_path / "m" / "model.safetensors", {"w": t}, pad=pad)
    ck = Checkpoint.open(str(tmp_path / "m"))
    assert (ck.ref("w").offset % 2 == 1) == bool(pad)
    for dim, a, b in ((0, 2, 5), (1, 3, 9), (1, 0, 10), (0, 4, 4)):
        shape = list(t.shape)
        shape[dim] = b - a
        out = torch.empty(shape, dtype=torch.float32)
        ck.read_slice("w", out, dim, a, b)
        assert torch.equal(out, t.narrow(dim, a, b - a).float())
    with pytest.raises(ValueError, match="outside shape"):
        ck.read_slice("w", torch.empty(1, 10), 0, 6, 7)
    ck.close()
    shutil.rmtree(tmp_path / "m")

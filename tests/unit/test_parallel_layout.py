"""The tensor/expert-parallel layout (core/parallel/layout.py) and the slice reads it relies on
(Checkpoint.read_slice), in one process: which slice of every weight each rank holds, the
refusals, vocabulary padding, bytes per rank. The multi-process runs are in test_parallel.py."""

from __future__ import annotations

import importlib
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


# ---- weight-only quantization per rank ---------------------------------------------------------

QCFG = dict(vocab_size=509, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=64, max_position_embeddings=64, moe_num_experts=4, moe_k=2,
            moe_intermediate_size=256, moe_num_shared_experts=2, moe_layer_start_index=1, tie_word_embeddings=False)


@pytest.mark.parametrize("scheme,group,ep", [("wint8", -1, False), ("wint4", 128, False), ("wint4", -1, True),
                                             ("wint8", 64, True)])
def test_packed_shards_are_the_slices_of_the_whole_packed_weight(tmp_path, monkeypatch, scheme, group, ep):
    """Every rank's packed slice (read from a quantized checkpoint, or quantized from the float
    slice in blocks of a few rows) dequantizes to exactly its rows/columns of the whole packed
    weight; vocabulary padding rows dequantize to 0. Per channel, a row-parallel slice quantized
    at load takes the whole row's max from `reduce_max` (across processes in test_parallel_quant;
    here the whole tensor's, which the all-reduce computes)."""
    from ernie_hal.core.model.config import ModelConfig
    from ernie_hal.core.model.quantized_writer import write_quantized_checkpoint
    quantize_mod = importlib.import_module("ernie_hal.core.quant.quantize")
    from ernie_hal.core.parallel.packed import alloc_packed, read_shard, rows
    from ernie_hal.core.quant import resolve
    from ernie_hal.core.quant.checkpoint import scale_name
    from ernie_hal.core.quant.quantize import group_amax
    from ernie_hal.kernels.reference.dequant import dequantize
    monkeypatch.setattr(quantize_mod, "BLOCK_VALUES", 1000)    # several blocks per tensor
    cfg, spec = ModelConfig(**QCFG), resolve(scheme, group)
    src = write_random_checkpoint(cfg, str(tmp_path / "src"), seed=2, dtype="bfloat16")
    packed = Checkpoint.open(write_quantized_checkpoint(src, str(tmp_path / "q"), spec))
    floats = Checkpoint.open(src)
    graph = build(cfg, untied_head=True, quant=spec)
    checked = set()
    for lay in all_layouts(graph, 2, expert_parallel=ep):
        for ref in graph.weights():
            s = lay.shards.get(ref.name)
            if ref.quant is None or s is None:
                continue
            whole = dequantize(packed.read(ref.name), packed.read(scale_name(ref.name)), spec.bits)
            want = whole if s.dim is None else whole.narrow(s.dim, s.start, s.stop - s.start)
            whole_amax = group_amax(floats.read(ref.name), spec)

            def reduce_max(t):
                assert s.dim == 1 and spec.group_size == -1       # only asked for per-channel columns
                return t.copy_(whole_amax)
            for stored in (True, False):
                out = alloc_packed(ref, s.shape, torch.float32, None, padded=True)
                part = rows(out, s.stop - s.start) if s.dim == 0 else out
                read_shard(packed if stored else floats, ref, s, stored, reduce_max, part)
                got = out.dequantize()
                assert torch.equal(got[:want.shape[0]], want), (ref.name, lay.rank, stored)
                assert not got[want.shape[0]:].any()
            checked.add((s.dim, ref.role))
    assert {(0, "embed"), (0, "head"), (1, "attn"), (1, "shared_expert")} <= checked
    assert ((1, "expert") in checked) != ep and ((None, "expert") in checked) == ep


def test_groups_across_ranks_are_refused_naming_tensor_sizes_ranks_and_group():
    from ernie_hal.core.model.config import ModelConfig
    from ernie_hal.core.parallel.layout import check
    from ernie_hal.core.quant import resolve
    g4 = build(ModelConfig(**QCFG), quant=resolve("wint4", 128))
    check(g4, 2, quant=resolve("wint4", 128))                       # 128 columns per rank: whole groups
    with pytest.raises(LayoutError, match=r"^model\.layers\.0\.self_attn\.o_proj\.weight: input dimension 256 split "
                                          r"over tensor_parallel_size 4 is 64 columns per rank, not a multiple of "
                                          r"group size 128; use a --group-size that divides 64"):
        check(g4, 4, quant=resolve("wint4", 128))
    check(g4, 4, quant=resolve("wint8", -1))                        # per channel: any split
    g300 = build(preset("ernie-4.5-300b-a47b"), quant=resolve("wint4", 128))
    with pytest.raises(LayoutError, match=r"experts\.0\.down_proj\.weight: input dimension 3584 split over "
                                          r"tensor_parallel_size 8 is 448 columns .*--expert-parallel"):
        check(g300, 8, quant=resolve("wint4", 128))
    check(g300, 8, expert_parallel=True, quant=resolve("wint4", 128))   # whole experts per rank


def test_bytes_per_rank_count_packed_integers_and_scales():
    """The plan at wint8/wint4 is the packed bytes: for 300B-A47B on 8 ranks about half (wint8) and
    a quarter-plus-scales (wint4) of bf16, and each rank's share sums to the packed model."""
    from ernie_hal.core.api import parallel_plan
    from ernie_hal.core.quant import resolve
    bf16 = parallel_plan("ernie-4.5-300b-a47b", 8)
    w8 = parallel_plan("ernie-4.5-300b-a47b", 8, quantization="wint8")
    w4 = parallel_plan("ernie-4.5-300b-a47b", 8, expert_parallel=True, quantization="wint4")
    assert bf16["quantization"] == "none" and w8["quantization"] == "wint8 per-channel"
    assert 0.5 < w8["ranks"][0]["bytes"] / bf16["ranks"][0]["bytes"] < 0.51
    assert 0.26 < w4["ranks"][0]["bytes"] / bf16["ranks"][0]["bytes"] < 0.28
    whole = build(preset("ernie-4.5-300b-a47b"), quant=resolve("wint8", -1)).total_bytes
    # norms, routers and the per-channel scales of row-parallel weights are on every rank
    assert whole <= w8["total_bytes"] < 1.01 * whole


def test_devices_show_plan_prints_packed_bytes_per_rank_and_refuses_in_one_line(capsys):
    import json
    from ernie_hal.cli.main import main
    assert main(["devices", "--show-plan", "--model", "ernie-4.5-300b-a47b", "--tp", "8",
                 "--quantization", "wint8", "--json"]) == 0
    desc = json.loads(capsys.readouterr().out)
    assert desc["quantization"] == "wint8 per-channel" and len(desc["ranks"]) == 8
    assert 34 * 2**30 < desc["ranks"][0]["bytes"] < 36 * 2**30
    assert main(["devices", "--show-plan", "--model", "ernie-4.5-300b-a47b", "--tp", "8",
                 "--quantization", "wint4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "448 columns per rank, not a multiple of group size 128" in err[0]
    assert main(["devices", "--show-plan", "--model", "ernie-4.5-300b-a47b", "--tp", "8", "--expert-parallel",
                 "--quantization", "wint4"]) == 0
    assert "wint4 g128 (packed integers + fp32 scales)" in capsys.readouterr().out

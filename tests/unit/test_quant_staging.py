"""Staging packed weights: a quantized model under budgets that do not hold it computes what the
same model resident computes (greedy ids, fp32 logits), dense and MoE, wint8 and wint4, from the
disk tier (a quantized checkpoint) and the pinned host tier (quantized at load); the expert cache
holds packed experts; a step reads fewer bytes by the packing ratio; streaming from an
unquantized checkpoint is refused with one line."""

import dataclasses

import pytest
import torch

import ernie_hal
from ernie_hal.cli.main import main
from ernie_hal.backends.cpu.backend import CpuBackend
from ernie_hal.core.memory.placement import DEVICE, DISK, HOST, BudgetError, aligned, plan, staged_nbytes
from ernie_hal.core.model.checkpoint_reader import Checkpoint
from ernie_hal.core.model.config import ModelConfig
from ernie_hal.core.model.defaults import make_random_model
from ernie_hal.core.model.graph import build
from ernie_hal.core.model.quantized_writer import write_quantized_checkpoint
from ernie_hal.core.quant import PackedWeight, resolve
from ernie_hal.core.quant import checkpoint as qckpt

from .test_placement import DiscreteFake

MiB = 2**20
DENSE = ModelConfig(vocab_size=512, hidden_size=256, intermediate_size=1024, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=256,
                    tie_word_embeddings=False)
MOE = ModelConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=256,
                  moe_num_experts=8, moe_k=2, moe_intermediate_size=256, moe_num_shared_experts=1,
                  moe_layer_start_index=1, tie_word_embeddings=True)
CONFIGS = {"dense": DENSE, "moe": MOE}
PROMPT = list(range(3, 19))
NEW = 6


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """{(kind, scheme or "bf16"): checkpoint dir}: the bf16 originals and their quantized copies."""
    root = tmp_path_factory.mktemp("quant-staging")
    out = {}
    for kind, cfg in CONFIGS.items():
        src = make_random_model(cfg, str(root / f"{kind}-bf16"), seed=2)
        out[(kind, "bf16")] = src
        for scheme in ("wint8", "wint4"):
            out[(kind, scheme)] = write_quantized_checkpoint(src, str(root / f"{kind}-{scheme}"), resolve(scheme))
    return out


def _run(m) -> tuple:
    ids = m.generate(PROMPT, max_new_tokens=NEW, temperature=0, ignore_eos=True).token_ids
    return ids, m.logits(PROMPT)


def _same(staged, resident) -> None:
    ids, logits = _run(staged)
    ref_ids, ref_logits = resident
    assert ids == ref_ids
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4 * ref_logits.abs().max().item())


def _half(path) -> int:
    return Checkpoint.open(path).total_bytes // 2


def _budget(kind, quantized_path) -> int:
    """A device budget the fp32 working set fits and the model does not (attention streamed in the
    MoE case too)."""
    return _half(quantized_path) * (2 if kind == "dense" else 1)


@pytest.mark.parametrize("scheme", ["wint8", "wint4"])
@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_disk_tier_from_a_quantized_checkpoint_equals_resident(sources, kind, scheme):
    path = sources[(kind, scheme)]
    resident = _run(ernie_hal.load(path, device="cpu", dtype="fp32"))
    m = ernie_hal.load(path, device="cpu", dtype="fp32", max_device_memory=_budget(kind, path))
    assert m.plan.tier_bytes(DISK) > 0 and m.plan.tier_bytes(DEVICE) > 0
    store = m.model.weights
    staged = [v for views in store._views.values() for v in views.values() if isinstance(v, PackedWeight)]
    assert staged and all(v.data.dtype == (torch.int8 if scheme == "wint8" else torch.uint8) for v in staged)
    if kind == "moe":
        assert all(isinstance(t, PackedWeight) for t in store.slots)
    _same(m, resident)
    assert m.offload_stats()["disk_read_bytes"] > 0
    m.close()


@pytest.mark.parametrize("scheme", ["wint8", "wint4"])
@pytest.mark.parametrize("kind", ["dense", "moe"])
@pytest.mark.parametrize("tier", ["host", "disk"])
def test_discrete_device_host_and_disk_tiers_equal_resident(sources, kind, scheme, tier):
    """A discrete device (pinned host tier, pinned read ring) simulated on the cpu. host: quantized
    at load from the bf16 checkpoint into pinned memory; disk: the quantized checkpoint streamed
    through the read ring with a small host budget."""
    path = sources[(kind, "bf16")] if tier == "host" else sources[(kind, scheme)]
    q = dict(quantization=scheme) if tier == "host" else {}
    resident = _run(ernie_hal.load(path, device=DiscreteFake(), dtype="fp32", **q))
    device = _budget(kind, sources[(kind, scheme)])
    host = "256MiB" if tier == "host" else "5MiB"
    m = ernie_hal.load(path, device=DiscreteFake(), dtype="fp32", max_device_memory=device, max_host_memory=host, **q)
    p = m.plan
    assert p.tier_bytes(DEVICE) > 0 and not p.fully_resident
    if tier == "host":
        assert p.tier_bytes(HOST) > 0 and p.tier_bytes(DISK) == 0
        packed = [w for ws in m.model.weights.host.values() for w in ws if isinstance(w, PackedWeight)]
        assert packed and all(w.data.dtype == (torch.int8 if scheme == "wint8" else torch.uint8) for w in packed)
    else:
        assert p.tier_bytes(DISK) > 0
    _same(m, resident)
    stats = m.offload_stats()
    assert stats["h2d_bytes"] > 0 and stats["pinned_host_bytes"] <= (256 if tier == "host" else 5) * MiB
    m.close()


def test_expert_cache_holds_packed_experts_more_of_them_in_one_budget(sources):
    budget = _half(sources[("moe", "bf16")]) // 2
    counts = {}
    for scheme in ("bf16", "wint4"):
        m = ernie_hal.load(sources[("moe", scheme)], device="cpu", max_device_memory=budget)
        p, store = m.plan, m.model.weights
        expert = m.model.graph.blocks[1].moe.experts[0]
        assert p.expert_bytes == sum(r.stored_nbytes(m.dtype) for r in expert.refs())
        if scheme == "wint4":
            assert all(isinstance(t, PackedWeight) and t.data.dtype == torch.uint8 for t in store.slots)
            slot_bytes = sum(t[0].nbytes for t in store.slots)
            assert slot_bytes == p.expert_bytes          # a slot holds one expert's packed bytes
        counts[scheme] = len(p.resident_experts) + p.expert_slots
        m.generate(PROMPT, max_new_tokens=2, temperature=0)
        assert m.offload_stats()["expert_cache"]["misses"] + m.offload_stats()["expert_cache"]["hits"] > 0
        m.close()
    assert counts["wint4"] > counts["bf16"]


def _unit(graph, dtype, head: bool = True) -> int:
    """Bytes of the largest staged unit (a layer's weights, or the head) in a ring slot."""
    units = [list(b.refs()) for b in graph.blocks] + ([[graph.final_norm, graph.head]] if head else [])
    return max(sum(staged_nbytes(r, dtype) for r in u) for u in units)


def _reserve(graph, dtype) -> int:
    return plan(graph, CpuBackend(), device_budget=1 << 40, dtype=dtype).reserve


def _all_streamed(path, dtype) -> int:
    """A budget that holds the two ring slots and the KV reserve only: every weight streams."""
    ckpt = Checkpoint.open(path)
    graph = build(ckpt.config, untied_head=True, quant=qckpt.stored_spec(ckpt.config))
    return 2 * _unit(graph, dtype) + _reserve(graph, dtype)


@pytest.mark.parametrize("scheme,ratio", [("wint8", 1.9), ("wint4", 3.5)])
def test_a_step_reads_fewer_bytes_by_the_packing_ratio(sources, scheme, ratio):
    read = {}
    for fmt in ("bf16", scheme):
        path = sources[("dense", fmt)]
        budget = _all_streamed(path, torch.bfloat16)
        m = ernie_hal.load(path, device="cpu", max_device_memory=budget, prefetch=False)
        p = m.plan
        assert p.tier_bytes(DEVICE) == 0 and p.ring_slots == 2
        store = m.model.weights
        m.generate(PROMPT[:4], max_new_tokens=1, temperature=0, ignore_eos=True)   # warm: steady cycle
        store.drain()
        before, steps = store.reader.bytes, store.stats_.steps
        m.generate(PROMPT[:4], max_new_tokens=4, temperature=0, ignore_eos=True)
        store.drain()
        n = store.stats_.steps - steps
        read[fmt] = (store.reader.bytes - before) / n
        # each step reads every streamed weight once (read ahead in cyclic order) plus its embedding rows
        streamed = p.tier_bytes(DISK) - m.model.graph.embed.nbytes
        assert abs(read[fmt] - streamed) < 0.05 * streamed
        m.close()
    assert read["bf16"] / read[scheme] > ratio


def test_streaming_from_an_unquantized_checkpoint_is_refused_with_one_line(sources, capsys):
    path = sources[("moe", "bf16")]
    with pytest.raises(BudgetError, match=r"ernie-hal quantize --model .* --quantization wint4` and load DST"):
        ernie_hal.load(path, device="cpu", quantization="wint4", max_device_memory="3MiB")
    capsys.readouterr()
    assert main(["generate", "hi", "--model", path, "--device", "cpu", "--quantization", "wint4",
                 "--max-device-memory", "3MiB"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ernie-hal quantize" in err[0]


def test_untied_embedding_rows_quantized_as_read_equal_resident(tmp_path):
    """Quantize at load with only the untied embedding left on the disk tier: its rows are read
    from the bf16 file and quantized per row, which is exactly the whole table's values."""
    cfg = dataclasses.replace(DENSE, vocab_size=8192)       # a table larger than two ring slots
    path = make_random_model(cfg, str(tmp_path / "big-vocab"), seed=3)
    spec, dt = resolve("wint4"), torch.float32
    resident = _run(ernie_hal.load(path, device="cpu", dtype="fp32", quantization="wint4"))
    graph = build(cfg, untied_head=True, quant=spec)
    weights = sum(w.stored_nbytes(dt) for w in graph.weights())
    budget = weights - graph.embed.stored_nbytes(dt) + 2 * _unit(graph, dt, head=False) + _reserve(graph, dt)
    m = ernie_hal.load(path, device="cpu", dtype="fp32", quantization="wint4", max_device_memory=budget)
    assert {n: t for n, t in m.plan.tiers.items() if t != DEVICE} == {graph.embed.name: DISK}
    ids, logits = _run(m)
    assert ids == resident[0] and torch.equal(logits, resident[1])
    assert m.offload_stats()["embed_rows_read"] > 0
    m.close()


def test_ring_slot_holds_packed_pieces_each_aligned():
    """Integers and scales are separate aligned pieces of a ring slot; the plan sizes for that."""
    graph = build(MOE, quant=resolve("wint4", 32))
    r = graph.blocks[0].q
    data, scales = r.numel // 2, 4 * r.numel // 32
    assert staged_nbytes(r, torch.bfloat16) == aligned(data) + aligned(scales)
    p = plan(graph, CpuBackend(), device_budget=MiB + MiB // 4, dtype=torch.bfloat16)
    assert p.ring_slots and p.ring_slot_bytes >= max(
        sum(staged_nbytes(w, torch.bfloat16) for w in b.refs() if w.role != "expert" and p.tier(w) != DEVICE)
        for b in graph.blocks)


@pytest.mark.parametrize("scheme", ["wint8", "wint4"])
def test_staged_without_the_native_library_reads_in_place(sources, scheme, monkeypatch):
    """Torch's fallback kernels: staged weights take the in-place path (int8 per channel through
    torch's int8 GEMM, others dequantized per call), never the int4pack conversion."""
    from ernie_hal.backends.cpu import quant_kernels
    monkeypatch.setattr(quant_kernels, "_library", lambda: None)
    path = sources[("moe", scheme)]
    resident = _run(ernie_hal.load(path, device="cpu", dtype="fp32"))
    m = ernie_hal.load(path, device="cpu", dtype="fp32", max_device_memory=_budget("moe", path))
    assert all(t.data.numel() for t in m.model.weights.slots)       # the packed integers kept, read in place
    _same(m, resident)
    m.close()

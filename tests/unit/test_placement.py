"""The memory planner: tiers, priorities, working memory, and early, clear budget errors."""

import json

import pytest
import torch

from ernie_hal.backends.cpu.backend import CpuBackend
from ernie_hal.core.plugins.backend import Backend, Capabilities, DeviceInfo
from ernie_hal.core.model.config import ModelConfig, preset
from ernie_hal.core.model.graph import build
from ernie_hal.core.memory.placement import DEVICE, DISK, HOST, BudgetError, device_nbytes, parse_budget, plan

MiB = 2**20

# untied head, 3 MoE layers of 16 experts (k=4) after one dense layer; ~12 MiB in bf16
SMALL_MOE = ModelConfig(
    vocab_size=2048, hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, head_dim=32, max_position_embeddings=1024, tie_word_embeddings=False,
    moe_num_experts=16, moe_k=4, moe_intermediate_size=256, moe_num_shared_experts=1,
    moe_layer_start_index=1, moe_layer_end_index=3)


class DiscreteFake(Backend):
    """A discrete device (own memory, pinned host tier) whose tensors happen to live on the cpu."""

    def __init__(self, budget=None):
        super().__init__(DeviceInfo("fake", 0, "fake discrete device", "fake", memory_total=64 * 2**30,
                                    memory_free=64 * 2**30, torch_device="cpu"),
                         Capabilities(unified_memory=False), budget)


@pytest.fixture(scope="module")
def graph():
    return build(SMALL_MOE, dtype=torch.bfloat16)


def _sizes(graph):
    return {w.name: device_nbytes(w, torch.bfloat16) for w in graph.weights()}


def test_everything_fits_is_fully_resident(graph):
    p = plan(graph, CpuBackend(), device_budget=1 << 30, mode="auto")
    assert p.fully_resident and p.ring_slots == 0 and p.expert_slots == 0
    assert p.tier_bytes(DEVICE) == sum(_sizes(graph).values())


def test_none_refuses_naming_need_and_budget(graph):
    with pytest.raises(BudgetError) as e:
        plan(graph, CpuBackend(), device_budget=4 * MiB, mode="none")
    msg = str(e.value)
    assert "offload='none' needs" in msg and "4.0 MiB" in msg and "--offload auto" in msg


def test_budget_below_one_steps_working_set_fails_early(graph):
    with pytest.raises(BudgetError) as e:
        plan(graph, CpuBackend(), device_budget=1 * MiB, mode="auto", reserve=0)
    msg = str(e.value)
    assert "smaller than one step's working set" in msg and "top_k=4 experts" in msg


@pytest.mark.parametrize("text", ["4GX", "-1GiB", "lots", "0", "1.5.2MiB"])
def test_malformed_sizes_fail_with_the_flag_named(text):
    with pytest.raises(BudgetError, match="max_host_memory.*bad size"):
        parse_budget(text, "max_host_memory")


@pytest.mark.parametrize("text,expected", [("16GiB", 16 * 2**30), ("512MiB", 512 * MiB), ("40GB", 40 * 10**9),
                                           ("1.5KiB", 1536), (4096, 4096), ("123B", 123)])
def test_sizes_parse(text, expected):
    assert parse_budget(text, "x") == expected


def test_load_rejects_bad_budgets_before_touching_the_checkpoint(tmp_path):
    from ernie_hal.core.api import load
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(BudgetError, match="bad size"):
        load(missing, device="cpu", max_device_memory="40 gigs")
    with pytest.raises(BudgetError, match="not a mode"):
        load(missing, device="cpu", offload="sometimes")


def test_priority_head_norms_attention_before_experts(graph):
    size = _sizes(graph)
    non_expert = sum(b for n, b in size.items() if ".experts." not in n)
    p = plan(graph, CpuBackend(), device_budget=non_expert + 6 * MiB, mode="auto", reserve=0)
    tiers = p.tiers
    assert tiers[graph.head.name] == DEVICE and tiers[graph.final_norm.name] == DEVICE
    for b in graph.blocks:
        assert all(tiers[r.name] == DEVICE for r in (b.input_norm, b.post_norm, b.q, b.k, b.v, b.o))
    # some experts resident, the rest streamed; an untied input embedding comes last
    experts = [r for r in graph.weights() if r.role == "expert"]
    assert any(tiers[r.name] == DISK for r in experts)
    assert tiers[graph.embed.name] == DISK and "row by row" in p.note
    assert p.device_total <= p.device_budget
    assert p.expert_slots >= SMALL_MOE.moe_k


def test_tiers_cover_every_weight_once_and_totals_add_up(graph):
    p = plan(graph, CpuBackend(), device_budget=2 * MiB, mode="auto", reserve=0)
    size = _sizes(graph)
    assert set(p.tiers) == set(size)
    assert sum(p.tier_bytes(t) for t in (DEVICE, HOST, DISK)) == sum(size.values())
    assert p.device_total <= 2 * MiB and p.ring_slots >= 1 and p.ring_slot_bytes > 0
    json.dumps(p.as_dict())                 # --json carries it


def test_uniform_expert_residency_spreads_over_layers(graph):
    size = _sizes(graph)
    non_expert = sum(b for n, b in size.items() if ".experts." not in n and n != graph.embed.name)
    eb = 3 * 256 * 128 * 2
    p = plan(graph, CpuBackend(), device_budget=non_expert + (2 * 4 + 3) * eb, mode="auto", reserve=0)
    assert p.resident_experts == ((1, 0), (2, 0), (3, 0))   # one per MoE layer, expert 0 first


def test_expert_stats_pick_the_hottest(graph):
    size = _sizes(graph)
    non_expert = sum(b for n, b in size.items() if ".experts." not in n and n != graph.embed.name)
    eb = 3 * 256 * 128 * 2
    stats = {(2, 9): 50, (3, 4): 40, (1, 1): 1}
    p = plan(graph, CpuBackend(), device_budget=non_expert + (2 * 4 + 2) * eb, mode="auto", reserve=0,
             expert_stats=stats)
    assert p.resident_experts == ((2, 9), (3, 4))


def test_layers_mode_stages_whole_layers(graph):
    p = plan(graph, CpuBackend(), device_budget=8 * MiB, mode="layers", reserve=0)
    for b in graph.blocks:
        assert len({p.tiers[r.name] for r in b.refs()}) == 1        # a layer is all or nothing
    assert p.expert_slots == 0 and p.ring_slots >= 1


def test_experts_mode_keeps_every_non_expert_weight_resident(graph):
    p = plan(graph, CpuBackend(), device_budget=6 * MiB, mode="experts", reserve=0)
    assert all(t == DEVICE for n, t in p.tiers.items() if ".experts." not in n)
    assert p.ring_slots == 0 and p.expert_slots >= 4
    with pytest.raises(BudgetError, match="offload='experts' keeps every non-expert weight"):
        plan(graph, CpuBackend(), device_budget=2 * MiB, mode="experts", reserve=0)


def test_unified_memory_caps_the_device_by_the_host_budget(graph):
    p = plan(graph, CpuBackend(), device_budget=1 << 30, host_budget=5 * MiB, mode="auto", reserve=0)
    assert p.unified and p.device_budget == 5 * MiB and p.tier_bytes(HOST) == 0 and p.pinned_chunks == 0


def test_discrete_device_gets_a_pinned_tier_and_read_ring(graph):
    p = plan(graph, DiscreteFake(), device_budget=4 * MiB, host_budget=8 * MiB, mode="auto", reserve=0)
    assert not p.unified and p.pinned_chunks == 4 and p.pinned_chunk_bytes >= MiB
    assert 0 < p.tier_bytes(HOST) and p.host_total <= 8 * MiB
    assert p.device_total <= 4 * MiB
    table = p.table()
    assert "pinned host" in table and "pinned read ring" in table


def test_plan_table_names_tiers_and_totals():
    g = build(preset("tiny-moe"))
    p = plan(g, CpuBackend(), device_budget=1000 * 1024, mode="auto")
    text = p.table()
    for word in ("offload plan (auto)", "device", "streamed", "expert cache", "KV reserve", "total"):
        assert word in text

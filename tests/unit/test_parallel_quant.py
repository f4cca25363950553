"""Weight-only quantization per rank, across real processes on CPU (gloo, 2 ranks): a split model at
--quantization wint8 (per channel) or wint4 (g128) gives the greedy ids and fp32 logits (1e-5
relative) of one process at the same quantization, dense (one KV head replicated) and MoE (0 and
2 shared experts, tied and untied heads, odd vocabularies), TP and EP; quantized at load and read
from a checkpoint `ernie-hal quantize` wrote. A group that would straddle two ranks is refused
with one line before any process starts. Every test has a timeout: a hang fails."""

from __future__ import annotations

import pytest
import torch

import ernie_hal
from ernie_hal.core.model.config import ModelConfig
from ernie_hal.core.model.defaults import make_random_model
from ernie_hal.core.model.quantized_writer import write_quantized_checkpoint
from ernie_hal.core.parallel.layout import LayoutError
from ernie_hal.core.quant import resolve

PROMPTS = [[3, 17, 101, 5, 250, 9, 77], [8, 2, 500, 64, 33]]

# widths that every row-parallel shard at N = 2 cuts on a 128-column group boundary
BASE = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4, head_dim=64,
            max_position_embeddings=256)
CONFIGS = {
    # one KV head on 2 ranks (replicated), vocabulary 509 (padded to 510), untied head
    "dense": ModelConfig(vocab_size=509, num_key_value_heads=1, tie_word_embeddings=False, **BASE),
    # 2 shared experts, untied head
    "moe-shared2": ModelConfig(vocab_size=509, num_key_value_heads=2, tie_word_embeddings=False, moe_num_experts=4,
                               moe_k=2, moe_intermediate_size=256, moe_num_shared_experts=2, moe_layer_start_index=1,
                               **BASE),
    # no shared experts, tied head (the packed table's first rows are the head), vocabulary 511
    "moe-shared0": ModelConfig(vocab_size=511, num_key_value_heads=2, tie_word_embeddings=True, moe_num_experts=4,
                               moe_k=2, moe_intermediate_size=256, moe_num_shared_experts=0, moe_layer_start_index=1,
                               **BASE),
}
SCHEMES = [("wint8", -1), ("wint4", 128)]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("tpq")
    return {name: make_random_model(cfg, str(root / name), seed=5, dtype="float32")
            for name, cfg in CONFIGS.items()}


def _run(model):
    return (model.logits(PROMPTS[0]),
            [c.token_ids for c in model.generate(PROMPTS, max_new_tokens=6, temperature=0, ignore_eos=True)])


def _assert_split_equals_one_process(path, ref_path, ep, scheme, group):
    want_logits, want_ids = _run(ernie_hal.load(ref_path, device="cpu", dtype="fp32", quantization=scheme,
                                                group_size=group))
    m = ernie_hal.load(path, device="cpu", dtype="fp32", tensor_parallel_size=2, expert_parallel=ep,
                       quantization=scheme, group_size=group)
    try:
        assert m.parallel["quantization"] == resolve(scheme, group).label
        assert m.quantization["scheme"] == scheme and m.kernels["linear"].endswith("quant_kernels")
        got_logits, got_ids = _run(m)
        assert got_logits.shape == want_logits.shape
        rel = ((got_logits - want_logits).abs().max() / want_logits.abs().max()).item()
        assert rel < 1e-5, rel
        assert got_ids == want_ids
    finally:
        m.close()
    assert all(p.poll() == 0 for p in m.group.procs.values())


@pytest.mark.timeout(240)
@pytest.mark.parametrize("scheme,group", SCHEMES, ids=["wint8-per-channel", "wint4-g128"])
@pytest.mark.parametrize("name,ep", [("dense", False), ("moe-shared2", False), ("moe-shared0", True)],
                         ids=["dense-tp", "moe-tp", "moe-ep"])
def test_quantized_split_equals_one_process_quantized(checkpoints, name, ep, scheme, group):
    """Quantized at load on each rank, from its own float slices: per channel the row-parallel
    weights' scales are the whole rows' (all-reduced max), so every rank's values are exactly
    the one-process ones."""
    _assert_split_equals_one_process(checkpoints[name], checkpoints[name], ep, scheme, group)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("name,scheme,group,ep", [("dense", "wint8", -1, False), ("moe-shared2", "wint4", 128, False),
                                                  ("moe-shared0", "wint4", 128, True)])
def test_quantized_checkpoint_slices_equal_one_process(checkpoints, tmp_path, name, scheme, group, ep):
    """Each rank reads its slices of the packed integers and scales `ernie-hal quantize` wrote
    (wint4 column slices of two-per-byte data; per-channel whole-row scales)."""
    out = str(tmp_path / "q")
    write_quantized_checkpoint(checkpoints[name], out, resolve(scheme, group))
    _assert_split_equals_one_process(out, checkpoints[name], ep, scheme, group)


@pytest.mark.timeout(60)
def test_a_group_across_two_ranks_is_refused_before_processes_start(checkpoints):
    # hidden 256 over 4 ranks: o_proj's 64 input columns per rank cannot hold groups of 128
    with pytest.raises(LayoutError, match=r"model\.layers\.0\.self_attn\.o_proj\.weight: input dimension 256 split "
                                          r"over tensor_parallel_size 4 is 64 columns per rank, not a multiple of "
                                          r"group size 128"):
        ernie_hal.load(checkpoints["dense"], device="cpu", tensor_parallel_size=4, quantization="wint4")


@pytest.mark.timeout(240)
def test_int8_activations_reach_every_rank(checkpoints):
    """--int8-activations under --tp: every rank binds the int8-activation decode kernels (row
    slices of o/down start on 32-column block boundaries, so the blocks are the one-process ones);
    one-row logits match one process with the option to fp32 summation order, greedy ids equal."""
    q = dict(quantization="wint4", group_size=128, int8_activations=True)
    one = ernie_hal.load(checkpoints["dense"], device="cpu", dtype="fp32", **q)
    want_row, want_ids = one.logits([7]), [c.token_ids for c in one.generate(PROMPTS, max_new_tokens=6,
                                                                            temperature=0, ignore_eos=True)]
    m = ernie_hal.load(checkpoints["dense"], device="cpu", dtype="fp32", tensor_parallel_size=2, **q)
    try:
        assert "int8 activations" in m.parallel["quantization"]
        row = m.logits([7])
        assert ((row - want_row).abs().max() / want_row.abs().max()).item() < 1e-5
        assert [c.token_ids for c in m.generate(PROMPTS, max_new_tokens=6, temperature=0, ignore_eos=True)] == want_ids
    finally:
        m.close()
    assert all(p.poll() == 0 for p in m.group.procs.values())

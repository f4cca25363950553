"""Memory budgets under tensor and expert parallel (CPU, gloo, 2 ranks): each rank plans its own
slices under the per-rank budget and stages them (layers streamed from the checkpoint, experts
through the cache, some weights resident), and the split model gives one process's greedy ids
and fp32 logits; a quantized checkpoint's packed slices stage the same way; a budget a rank
cannot meet is one line naming the rank's need, before any process starts (CLI: exit 2), and
--show-plan prints every rank's tiers. Every test has a timeout: a hang fails."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import ernie_hal
from ernie_hal.core.memory.placement import BudgetError
from ernie_hal.core.model.quantized_writer import write_quantized_checkpoint
from ernie_hal.core.quant import resolve

# the tensor-parallel suite's models (odd vocabularies, 0 and 2 shared experts, tied and untied heads)
from .test_parallel import PROMPTS, checkpoints  # noqa: F401 - checkpoints is a fixture


def _one_process(path):
    m = ernie_hal.load(path, device="cpu", dtype="fp32")
    return m.logits(PROMPTS[0]), [c.token_ids for c in m.generate(PROMPTS, max_new_tokens=6, temperature=0,
                                                                   ignore_eos=True)]


def _assert_split_equals_one_process(path, ep, budget, mode="auto"):
    want_logits, want_ids = _one_process(path)
    m = ernie_hal.load(path, device="cpu", dtype="fp32", tensor_parallel_size=2, expert_parallel=ep,
                       max_host_memory=budget, offload=mode)
    try:
        got = m.logits(PROMPTS[0])
        assert ((got - want_logits).abs().max() / want_logits.abs().max()).item() < 1e-5
        ids = [c.token_ids for c in m.generate(PROMPTS, max_new_tokens=6, temperature=0, ignore_eos=True)]
        assert ids == want_ids
        stats = m.offload_stats()
        plans = [r["plan"] for r in m.parallel["ranks"]]
        return m.plan, plans, stats
    finally:
        m.close()


# budgets (per rank) sized to these tiny models: the KV reserve (2048 tokens) plus a little
@pytest.mark.timeout(240)
@pytest.mark.parametrize("name,ep,budget,mode", [
    ("dense", False, "1250KiB", "auto"),           # everything but the norms streamed
    ("moe-shared2", False, "1100KiB", "auto"),     # attention resident, experts through the cache
    ("moe-shared2", True, "1100KiB", "auto"),      # EP: the rank's experts through its cache
    ("moe-shared0", True, "1000KiB", "auto"),      # EP, tied head, part of attention streamed
    ("moe-shared2", True, "1200KiB", "layers"),    # EP, whole layers (stacked experts) streamed
])
def test_staged_split_equals_one_process(checkpoints, name, ep, budget, mode):
    plan, plans, stats = _assert_split_equals_one_process(checkpoints[name], ep, budget, mode)
    assert len(plans) == 2 and all(p["disk_bytes"] > 0 and p["device_bytes"] > 0 for p in plans)
    assert plans[0]["device_budget_bytes"] == ernie_hal.core.sizes.parse_size(budget)   # per rank, not split
    assert plan.tier_bytes("disk") == plans[0]["disk_bytes"]
    assert stats["disk_read_bytes"] > 0 and stats["steps"] > 0     # rank 0 really streamed its slices


@pytest.mark.timeout(240)
def test_quantized_checkpoint_slices_stage_under_tp(checkpoints, tmp_path):
    """wint8 per channel: row-parallel (o, down) slices read the whole row's scales, packed
    integer columns strided; `ernie-hal quantize` wrote the checkpoint."""
    out = str(tmp_path / "q")
    write_quantized_checkpoint(checkpoints["moe-shared2"], out, resolve("wint8", -1))
    _, plans, _ = _assert_split_equals_one_process(out, False, "830KiB")
    assert all(p["disk_bytes"] > 0 for p in plans)


@pytest.mark.timeout(60)
def test_a_budget_a_rank_cannot_meet_is_refused_before_processes_start(checkpoints):
    with pytest.raises(BudgetError, match=r"^tensor-parallel rank 0 of 2 \(budgets are per rank; its slices "
                                          r"hold [\d.]+ KiB\): .*smaller than one step's working set") as e:
        ernie_hal.load(checkpoints["dense"], device="cpu", dtype="fp32", tensor_parallel_size=2,
                       max_host_memory="1MiB")
    assert "\n" not in str(e.value)
    with pytest.raises(BudgetError, match="would stream from an unquantized checkpoint"):
        ernie_hal.load(checkpoints["moe-shared2"], device="cpu", dtype="fp32", tensor_parallel_size=2,
                       max_host_memory="830KiB", quantization="wint8")


def _cli(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "ernie_hal", *args], capture_output=True, text=True,
                          timeout=150, env=env)


@pytest.mark.timeout(180)
def test_cli_refuses_with_exit_2_and_show_plan_prints_every_rank(checkpoints):
    path = checkpoints["dense"]
    bad = _cli("generate", "--model", path, "--device", "cpu", "--dtype", "fp32", "--tp", "2",
               "--max-host-memory", "1MiB", "hi")
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "tensor-parallel rank 0 of 2" in bad.stderr
    ok = _cli("generate", "--model", path, "--device", "cpu", "--dtype", "fp32", "--tp", "2",
              "--max-host-memory", "1250KiB", "--show-plan", "--max-new-tokens", "2", "--temperature", "0",
              "hi")
    assert ok.returncode == 0, ok.stderr
    for r in (0, 1):
        assert f"rank {r} offload plan (auto, memory budget 1.2 MiB (unified), per rank)" in ok.stderr

"""Memory budgets under tensor parallel: each rank plans placement for its own slices.

The budgets are per rank (--max-device-memory / --max-host-memory name what one rank may use);
the rank's graph (rank_graph.py) is planned by core/memory/placement.py as one process plans a
model, so a rank holds, streams and caches only its 1/N. Every rank's slices have the same
shapes, so the plans agree; rank 0 plans its own before any process starts and a plan that
cannot be met is refused there, one line naming the rank's need and the budget.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..memory.placement import MODES, OFFLOAD_ALIASES, BudgetError, parse_budget
from ..memory.placement import plan as plan_placement
from ..memory.requantize import refuse_streaming_requantized
from ..plugins.backend import format_bytes
from .rank_graph import rank_graph

@dataclass(frozen=True)
class RankBudgets:
    device: int | None = None        # bytes per rank
    host: int | None = None
    offload: str = "auto"
    expert_cache: str = "lru"
    prefetch: bool | None = None

    @classmethod
    def parse(cls, max_device_memory=None, max_host_memory=None, offload="auto", expert_cache="lru",
              prefetch=None) -> "RankBudgets | None":
        """None when nothing asks for a plan (no budget, offload auto/none): ranks hold their
        slices resident, as before."""
        mode = OFFLOAD_ALIASES.get(offload.lower() if isinstance(offload, str) else offload, offload)
        if mode not in MODES:
            raise BudgetError(f"offload={offload!r} is not a mode; choose one of {', '.join(MODES)}")
        device = parse_budget(max_device_memory, "max_device_memory (--max-device-memory)")
        host = parse_budget(max_host_memory, "max_host_memory (--max-host-memory)")
        if device is None and host is None and mode in ("auto", "none"):
            return None
        return cls(device, host, mode, expert_cache, prefetch)

    def as_json(self) -> dict:
        return asdict(self)


def plan_rank(graph, lay, backend, dtype, budgets: RankBudgets, path: str, stored_quant: bool):
    """(rank graph, its placement Plan) under the per-rank budgets; BudgetError naming the rank."""
    local = rank_graph(graph, lay)
    try:
        plan = plan_placement(local, backend, budgets.device, budgets.host, budgets.offload, dtype)
        if graph.quant is not None and not stored_quant:
            refuse_streaming_requantized(local, plan, path, graph.quant)
    except BudgetError as e:
        need = sum(w.stored_nbytes(dtype) for w in local.weights())
        raise BudgetError(f"tensor-parallel rank {lay.rank} of {lay.world_size} (budgets are per rank; its "
                          f"slices hold {format_bytes(need)}): {e}") from None
    return local, plan


def apply_budget(backend, plan, budgets: RankBudgets) -> None:
    """Cap the rank's device allocations (after planning: the planner reads what is free)."""
    if budgets.device is not None or budgets.host is not None:
        # on unified memory the host budget caps the device region too (plan.device_budget)
        backend.set_budget(plan.device_budget if backend.caps.unified_memory else budgets.device)

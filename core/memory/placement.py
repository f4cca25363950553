"""The memory planner: for every weight of the ModelGraph, where it lives while the model runs.

Three tiers: resident on the device, cached in pinned host memory, or streamed from the
checkpoint file each time it is used. The planner also sizes the working memory the staging
engine (core/memory/offload.py) needs: a ring of device buffers for a layer's staged weights, the
dynamic slots of the device-side expert cache, and a ring of pinned host chunks for the reads.

Priority (mode "auto"): the output head and final norm, norms, attention, dense MLPs, shared
experts, routers, then routed experts hottest first (uniform without statistics), then an
untied input embedding (only its rows are read per step, so holding it buys little). The
planner is greedy: a group that does not fit is skipped and smaller ones later may still fit.

Modes: "none" everything resident or a clear error; "layers" whole layers (experts included)
resident or staged, like accelerate's device_map; "experts" every non-expert weight resident,
routed experts through the cache; "auto" tensor by tensor as above.

On a unified-memory backend (cpu) the device is host memory: the host budget caps the device
region too, there is no pinned tier and no pinned ring (reads go straight into the device).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import psutil
import torch

from ..plugins.backend import Backend, format_bytes
from ..model.graph import ModelGraph, WeightRef
from ..sizes import parse_size

MODES = ("auto", "none", "layers", "experts")
OFFLOAD_ALIASES = {"on": "auto", "off": "none", True: "auto", False: "none"}
DEVICE, HOST, DISK = "device", "host", "disk"
ALIGN = 256                       # byte alignment of each tensor inside a staging buffer
KV_TOKENS = 2048                  # KV cache reserved on the device by default (tokens)
PINNED_CHUNKS = 4                 # pinned host ring for reads on discrete devices
PINNED_CHUNK_MAX = 64 * 2**20
ROLES = ("head", "embed", "norm", "attn", "mlp", "shared_expert", "router", "expert")


class BudgetError(ValueError):
    """A memory budget is malformed or too small for the model under the chosen offload mode."""


def parse_budget(value, flag: str) -> int | None:
    """Bytes from an int or "40GiB"-style string; None stays None; errors name the flag."""
    if value is None:
        return None
    try:
        return parse_size(value)
    except ValueError as e:
        raise BudgetError(f"{flag}: {e}") from None


def device_nbytes(ref: WeightRef, dtype: torch.dtype) -> int:
    """Bytes of `ref` on the device: routers stay fp32, quantized weights count their packed
    integers and fp32 scales, everything else the model dtype."""
    return ref.stored_nbytes(dtype)


def aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def stored_parts(ref: WeightRef, dtype: torch.dtype) -> tuple:
    """Bytes of each tensor `ref` is held in: (integers, fp32 scales) when packed, else one."""
    if ref.quant is None:
        return (device_nbytes(ref, dtype),)
    rows = ref.numel // ref.shape[-1]
    return rows * ref.shape[-1] * ref.quant.bits // 8, rows * ref.quant.groups(ref.shape[-1]) * 4


def staged_nbytes(ref: WeightRef, dtype: torch.dtype) -> int:
    """Bytes `ref` takes in a staging buffer: a packed weight's integers and its fp32 scales are
    two pieces, each aligned (core/memory/offload.py lays them out so)."""
    return sum(aligned(n) for n in stored_parts(ref, dtype))


@dataclass
class Plan:
    mode: str
    device: str                   # "cpu:0", "cuda:0"
    unified: bool                 # device memory is host memory
    device_budget: int            # bytes the plan may use on the device (weights, buffers, reserve)
    host_budget: int | None       # bytes for the pinned tier and ring (discrete devices)
    reserve: int                  # device bytes held back for the KV cache
    tiers: dict                   # weight name -> DEVICE | HOST | DISK
    ring_slots: int = 0           # device buffers for staged layer weights (2: read ahead)
    ring_slot_bytes: int = 0
    expert_slots: int = 0         # dynamic (evictable) expert-cache slots
    expert_bytes: int = 0         # one expert's gate+up+down on the device
    resident_experts: tuple = ()  # (layer, expert) pinned in the cache
    pinned_chunks: int = 0
    pinned_chunk_bytes: int = 0
    top_k: int = 0
    pinned_rounding: int = 0      # bytes the pinned allocator adds by rounding blocks up
    working_set: int = 0          # the least one step needs on the device
    note: str = ""
    summary: dict = field(default_factory=dict)   # role -> tier -> [tensors, bytes]

    # ---- derived ---------------------------------------------------------------------------
    def tier(self, ref: WeightRef) -> str:
        return self.tiers[ref.name]

    @property
    def fully_resident(self) -> bool:
        return all(t == DEVICE for t in self.tiers.values())

    def tier_bytes(self, tier: str) -> int:
        return sum(b for role in self.summary.values() for t, (_, b) in role.items() if t == tier)

    @property
    def buffer_bytes(self) -> int:
        """Device working memory: the layer ring plus the dynamic expert slots."""
        return self.ring_slots * self.ring_slot_bytes + self.expert_slots * self.expert_bytes

    @property
    def device_total(self) -> int:
        return self.tier_bytes(DEVICE) + self.buffer_bytes + self.reserve

    @property
    def host_total(self) -> int:
        """Pinned host memory really taken: tensors, read ring and the allocator's rounding."""
        return self.tier_bytes(HOST) + self.pinned_chunks * self.pinned_chunk_bytes + self.pinned_rounding

    def as_dict(self) -> dict:
        return {
            "mode": self.mode, "device": self.device, "unified_memory": self.unified,
            "device_budget_bytes": self.device_budget, "host_budget_bytes": self.host_budget,
            "device_total_bytes": self.device_total, "host_total_bytes": self.host_total,
            "resident_bytes": self.tier_bytes(DEVICE), "pinned_host_bytes": self.tier_bytes(HOST),
            "streamed_bytes": self.tier_bytes(DISK), "kv_reserve_bytes": self.reserve,
            "ring_slots": self.ring_slots, "ring_slot_bytes": self.ring_slot_bytes,
            "expert_cache_slots": self.expert_slots, "expert_bytes": self.expert_bytes,
            "resident_experts": len(self.resident_experts),
            "pinned_chunks": self.pinned_chunks, "pinned_chunk_bytes": self.pinned_chunk_bytes,
            "pinned_rounding_bytes": self.pinned_rounding, "working_set_bytes": self.working_set, "note": self.note,
            "roles": {role: {t: {"tensors": n, "bytes": b} for t, (n, b) in tiers.items()}
                      for role, tiers in self.summary.items()},
        }

    def table(self) -> str:
        f = format_bytes
        host = "host memory (unified)" if self.unified else (
            f"host budget {f(self.host_budget)}" if self.host_budget is not None else "host: unbounded")
        lines = [f"offload plan ({self.mode}) on {self.device}: device budget {f(self.device_budget)}, {host}",
                 f"  {'weights':<14}{'device':>16}{'pinned host':>16}{'streamed':>16}"]
        for role in ROLES:
            if role not in self.summary:
                continue
            cells = []
            for t in (DEVICE, HOST, DISK):
                n, b = self.summary[role].get(t, (0, 0))
                cells.append(f"{f(b)} ({n})" if n else "-")
            lines.append(f"  {role:<14}" + "".join(f"{c:>16}" for c in cells))
        total = [f(self.tier_bytes(t)) for t in (DEVICE, HOST, DISK)]
        lines.append(f"  {'total':<14}" + "".join(f"{c:>16}" for c in total))
        work = []
        if self.ring_slots:
            work.append(f"layer ring {self.ring_slots} x {f(self.ring_slot_bytes)}"
                        + (" (reads ahead)" if self.ring_slots > 1 else " (no read-ahead: budget)"))
        if self.expert_slots:
            work.append(f"expert cache {self.expert_slots} slots x {f(self.expert_bytes)}"
                        + (f" + {len(self.resident_experts)} resident" if self.resident_experts else ""))
        if self.pinned_chunks:
            work.append(f"pinned read ring {self.pinned_chunks} x {f(self.pinned_chunk_bytes)}")
        work.append(f"KV reserve {f(self.reserve)}")
        lines.append("  working memory: " + ", ".join(work))
        lines.append(f"  device use {f(self.device_total)} of {f(self.device_budget)}"
                     + ("" if self.unified else f"; pinned host use {f(self.host_total)}")
                     + f"; one step needs at least {f(self.working_set)}")
        if self.note:
            lines.append(f"  {self.note}")
        return "\n".join(lines)


# ---- planning ---------------------------------------------------------------------------------
def plan(graph: ModelGraph, backend: Backend, device_budget: int | None = None,
         host_budget: int | None = None, mode: str = "auto", dtype: torch.dtype | None = None,
         reserve: int | None = None, expert_stats: dict | None = None) -> Plan:
    """Decide every weight's tier. Budgets are bytes (None: what the device/host has free);
    `reserve` is device memory held back for the KV cache (default: KV_TOKENS tokens);
    `expert_stats` maps (layer, expert) -> use count and orders the routed experts."""
    if mode not in MODES:
        raise BudgetError(f"offload={mode!r} is not a mode; choose one of {', '.join(MODES)}")
    c = graph.config
    dtype = dtype or getattr(torch, c.dtype)
    unified = backend.caps.unified_memory
    if reserve is None:
        tokens = min(KV_TOKENS, c.max_position_embeddings)
        reserve = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * dtype.itemsize * tokens
    D = device_budget if device_budget is not None else int(backend.free_memory() * 0.9)
    if unified and host_budget is not None:
        D = min(D, host_budget)
    budget = (f"the memory budget {format_bytes(D)} (on {backend.info.label} device memory is host memory: "
              f"the smaller of --max-device-memory and --max-host-memory)" if unified
              else f"the device budget {format_bytes(D)}")
    H = host_budget
    if not unified and H is None:
        H = int(psutil.virtual_memory().available * 0.5)
    size = {w.name: device_nbytes(w, dtype) for w in graph.weights()}
    planner = _Planner(graph, size, mode, c.moe_k if c.is_moe else 0,
                       {w.name: staged_nbytes(w, dtype) for w in graph.weights()},
                       {w.name: stored_parts(w, dtype) for w in graph.weights()})
    base = dict(mode=mode, device=backend.info.label, unified=unified, device_budget=D,
                host_budget=host_budget if unified else H, reserve=reserve, top_k=planner.top_k)

    full = sum(size.values()) + reserve
    if full <= D:
        p = Plan(tiers={n: DEVICE for n in size}, working_set=full,
                 note="everything fits: fully resident" if mode != "none" else "", **base)
        return _summarize(p, graph, size)
    if mode == "none":
        raise BudgetError(
            f"offload='none' needs {format_bytes(full)} on {backend.info.label} (weights "
            f"{format_bytes(full - reserve)} + KV reserve {format_bytes(reserve)}), {budget} is too small; "
            f"use --offload auto (or raise --max-device-memory"
            f"{'/--max-host-memory' if unified else ''})")
    planner.footprint = backend.pinned_footprint
    return _summarize(planner.run(D, H, reserve, unified, expert_stats, base, budget), graph, size)


class _Planner:
    def __init__(self, graph: ModelGraph, size: dict, mode: str, top_k: int, staged: dict, parts: dict):
        self.g, self.size, self.mode, self.top_k = graph, size, mode, top_k
        self.staged = staged                  # name -> bytes in a staging buffer (aligned pieces)
        self.parts = parts                    # name -> bytes of each tensor it is held in
        self.footprint = lambda n: n          # host bytes one pinned tensor of n bytes takes
        moe = [b for b in graph.blocks if b.moe is not None]
        self.moe_blocks = moe
        self.num_experts = len(moe[0].moe.experts) if moe else 0
        self.expert_bytes = sum(size[r.name] for r in moe[0].moe.experts[0].refs()) if moe else 0
        self.cached_experts = mode in ("auto", "experts") and bool(moe)
        # staging units: what must be on the device together when one layer (or the head) runs
        self.units = []
        for b in graph.blocks:
            refs = [r for r in b.refs() if r.role != "expert" or not self.cached_experts]
            self.units.append((f"layer {b.index}", refs))
        self.units.append(("the output head", [graph.final_norm, graph.head]))

    def ring_need(self, resident: set) -> tuple:
        """(bytes of the largest staged unit, its label) given the resident names."""
        best = (0, "")
        for label, refs in self.units:
            n = sum(self.staged[r.name] for r in refs if r.name not in resident)
            best = max(best, (n, label))
        return best

    def groups(self, stats: dict | None) -> list:
        """Candidate groups (lists of refs) for residency, best first."""
        g, out = self.g, []
        out += [[g.final_norm], [g.head]]
        if self.mode == "layers":
            out += [list(b.refs()) for b in g.blocks]
        else:
            out += [[b.input_norm, b.post_norm] for b in g.blocks]
            out += [[b.q, b.k, b.v, b.o] for b in g.blocks]
            out += [list(b.mlp.refs()) for b in g.blocks if b.mlp is not None]
            out += [list(b.moe.shared.refs()) for b in self.moe_blocks if b.moe.shared is not None]
            out += [[b.moe.router, b.moe.bias] for b in self.moe_blocks]
            out += [list(b.moe.experts[e].refs()) for b, e in self.expert_order(stats)]
        if not g.tied:
            out.append([g.embed])
        return out

    def expert_order(self, stats: dict | None) -> list:
        pairs = [(b, e) for b in self.moe_blocks for e in range(self.num_experts)]
        if stats:
            return sorted(pairs, key=lambda p: (-stats.get((p[0].index, p[1]), 0), p[0].index, p[1]))
        return sorted(pairs, key=lambda p: (p[1], p[0].index))   # uniform: one per layer per round

    def run(self, D: int, H: int | None, reserve: int, unified: bool, stats, base: dict, budget: str) -> Plan:
        size, k, eb = self.size, self.top_k, self.expert_bytes
        resident: set = set()
        if self.mode == "experts":
            resident = {w.name for w in self.g.weights() if w.role != "expert"}
            need = sum(size[n] for n in resident) + k * eb + reserve
            if need > D:
                raise BudgetError(
                    f"offload='experts' keeps every non-expert weight on the device: "
                    f"{format_bytes(need)} with {k} expert slots and the KV reserve; {budget} is too small; "
                    f"use --offload auto or raise --max-device-memory")
        unit, label = self.ring_need(resident)
        working = unit + (k * eb if self.cached_experts else 0) + reserve
        if working > D:
            parts = f"{label}'s staged weights {format_bytes(unit)}"
            if self.cached_experts:
                parts += f" + top_k={k} experts x {format_bytes(eb)}"
            raise BudgetError(
                f"{budget} is smaller than one step's working set "
                f"{format_bytes(working)} ({parts} + KV reserve {format_bytes(reserve)}); "
                f"raise --max-device-memory{'/--max-host-memory' if unified else ''}")
        ring, slots = 1, k if self.cached_experts else 0
        for r, s in ((2, 2 * k), (2, k)):
            s = s if self.cached_experts else 0
            if r * unit + s * eb + reserve <= D:
                ring, slots = r, s
                break

        def used(res, pinned):
            return (sum(size[n] for n in res) + ring * self.ring_need(res)[0]
                    + (slots + pinned) * eb + reserve)

        pinned_experts = []       # cached experts held for good: one cache slot each, never evicted
        for group in self.groups(stats):
            names = {r.name for r in group} - resident
            if not names:
                continue
            if group[0].role == "expert" and self.cached_experts:
                if used(resident, len(pinned_experts) + 1) <= D:
                    pinned_experts.append((group[0].layer, group[0].expert))
            elif used(resident | names, len(pinned_experts)) <= D:
                resident |= names
        if self.cached_experts and len(pinned_experts) == len(self.moe_blocks) * self.num_experts:
            slots = 0             # every expert is resident: no dynamic slots needed
        pinned = set(pinned_experts)
        resident |= {r.name for b, e in self.expert_order(None) if (b.index, e) in pinned
                     for r in b.moe.experts[e].refs()}
        ring_bytes, _ = self.ring_need(resident)
        ring = ring if ring_bytes else 0
        spare = D - (sum(size[n] for n in resident) + ring * ring_bytes + slots * eb + reserve)
        if ring == 1 and ring_bytes <= spare:            # residency shrank the ring: read ahead after all
            ring, spare = 2, spare - ring_bytes
        if 0 < slots < 2 * k and (2 * k - slots) * eb <= spare:
            slots = 2 * k
        tiers = {w.name: DEVICE if w.name in resident else DISK for w in self.g.weights()}
        p = Plan(tiers=tiers, ring_slots=ring, ring_slot_bytes=ring_bytes, expert_slots=slots,
                 expert_bytes=eb if self.cached_experts else 0, resident_experts=tuple(sorted(pinned_experts)),
                 working_set=working, **base)
        if not unified:
            self.plan_host(p, H, stats)
        if not self.g.tied and tiers[self.g.embed.name] != DEVICE:
            p.note = "the input embedding is read row by row: only the rows of the step's tokens move"
        return p

    def plan_host(self, p: Plan, H: int, stats) -> None:
        """Pinned host tier (discrete devices): a small ring for reads, then the same priority.
        Each pinned tensor (one per weight) is counted as the allocator really takes it (PyTorch's
        pinned allocator rounds blocks up to a power of two), so --max-host-memory holds."""
        fp = self.footprint
        chunk = max(2**20, min(PINNED_CHUNK_MAX, H // (4 * PINNED_CHUNKS)))
        chunk = 1 << (chunk.bit_length() - 1)       # a power of two: nothing lost to rounding
        if PINNED_CHUNKS * fp(chunk) > H:
            raise BudgetError(f"the host budget {format_bytes(H)} is smaller than the pinned read ring "
                              f"({PINNED_CHUNKS} x {format_bytes(chunk)}); raise --max-host-memory")
        p.pinned_chunks, p.pinned_chunk_bytes = PINNED_CHUNKS, chunk
        left = H - PINNED_CHUNKS * fp(chunk)
        rounding = PINNED_CHUNKS * (fp(chunk) - chunk)
        for group in self.groups(stats):
            names = [r.name for r in group if p.tiers[r.name] == DISK]
            n = sum(fp(b) for x in names for b in self.parts[x])   # one pinned tensor per part
            if names and n <= left:
                for x in names:
                    p.tiers[x] = HOST
                left -= n
                rounding += n - sum(self.size[x] for x in names)
        p.pinned_rounding = rounding


def _summarize(p: Plan, graph: ModelGraph, size: dict) -> Plan:
    roles: dict = {}
    for w in graph.weights():
        role = "head" if (w is graph.head and graph.tied) else w.role
        cell = roles.setdefault(role, {}).setdefault(p.tiers[w.name], [0, 0])
        cell[0] += 1
        cell[1] += size[w.name]
    if not graph.tied:
        roles.setdefault("head", {})
    p.summary = {r: {t: tuple(v) for t, v in tiers.items()} for r, tiers in roles.items() if tiers}
    return p

"""Which routed expert sits in which device slot: the bookkeeping of the expert cache.

Pure Python, no tensors: core/memory/offload.py moves the bytes. A key is (layer, expert). Resident
experts are pinned in their slots for good; the other slots are dynamic and, on a miss, the
victim is the least recently used ("lru") or the least used so far ("lfu", ties by recency).
Hits and misses are counted per demanded key; prefetched keys count as hits when demanded.
"""

from __future__ import annotations

from collections import Counter

POLICIES = ("lru", "lfu")


class CacheFullError(RuntimeError):
    """More keys were asked for at once than the cache has dynamic slots."""


class ExpertCache:
    def __init__(self, num_slots: int, resident=(), policy: str = "lru"):
        if policy not in POLICIES:
            raise ValueError(f"expert cache policy {policy!r}: choose one of {', '.join(POLICIES)}")
        resident = list(resident)
        if len(resident) > num_slots:
            raise ValueError(f"{len(resident)} resident experts do not fit {num_slots} slots")
        self.policy = policy
        self.key_of: list = [None] * num_slots
        self.slot_of: dict = {}
        self.last = [0] * num_slots           # clock of the last demand (or prefetch) per slot
        self.uses: Counter = Counter()        # demand uses per key, kept across evictions
        self.prefetched: set = set()          # loaded ahead, not demanded yet
        self.clock = 0
        self.hits = self.misses = self.evictions = 0
        self.prefetch_issued = self.prefetch_used = self.prefetch_wasted = 0
        for slot, key in enumerate(resident):
            self.key_of[slot] = key
            self.slot_of[key] = slot
        self.num_pinned = len(resident)

    @property
    def num_slots(self) -> int:
        return len(self.key_of)

    @property
    def num_dynamic(self) -> int:
        return self.num_slots - self.num_pinned

    def is_pinned(self, key) -> bool:
        slot = self.slot_of.get(key)
        return slot is not None and slot < self.num_pinned

    def __contains__(self, key) -> bool:
        return key in self.slot_of

    def request(self, keys, busy=()) -> tuple:
        """Slots for distinct `keys`, all held at once. Returns (slots, misses) where misses
        is [(key, slot)] to load; a victim is never a slot in `busy` or asked for in this call."""
        self.clock += 1
        taken = set(busy) | {self.slot_of[k] for k in keys if k in self.slot_of}
        slots, misses = [], []
        for key in keys:
            self.uses[key] += 1
            slot = self.slot_of.get(key)
            if slot is not None:
                self.hits += 1
                if key in self.prefetched:
                    self.prefetched.discard(key)
                    self.prefetch_used += 1
            else:
                self.misses += 1
                slot = self._victim(taken)
                if slot is None:
                    raise CacheFullError(f"{len(keys)} experts asked for at once, the cache has "
                                         f"{self.num_dynamic} dynamic slots")
                self._assign(key, slot)
                misses.append((key, slot))
            taken.add(slot)
            self.last[slot] = self.clock
            slots.append(slot)
        return slots, misses

    def prefetch(self, keys, busy=()) -> list:
        """Slots for keys likely needed soon (not counted as demand); [(key, slot)] to load.
        Stops early when every free slot is busy or was asked for in this call."""
        taken = set(busy) | {self.slot_of[k] for k in keys if k in self.slot_of}
        out = []
        for key in keys:
            if key in self.slot_of:
                continue
            slot = self._victim(taken)
            if slot is None:
                break
            self._assign(key, slot)
            self.prefetched.add(key)
            self.prefetch_issued += 1
            self.last[slot] = self.clock
            taken.add(slot)
            out.append((key, slot))
        return out

    def capacity(self, keys) -> int:
        """How many of `keys` (in order) can be held at once: pinned ones are free."""
        free, n = self.num_dynamic, 0
        for key in keys:
            if not self.is_pinned(key):
                if free == 0:
                    break
                free -= 1
            n += 1
        return n

    def _victim(self, taken):
        best, best_rank = None, None
        for slot in range(self.num_pinned, self.num_slots):
            if slot in taken:
                continue
            key = self.key_of[slot]
            if key is None:
                return slot
            rank = (self.last[slot],) if self.policy == "lru" else (self.uses[key], self.last[slot])
            if best_rank is None or rank < best_rank:
                best, best_rank = slot, rank
        return best

    def _assign(self, key, slot) -> None:
        old = self.key_of[slot]
        if old is not None:
            del self.slot_of[old]
            self.evictions += 1
            if old in self.prefetched:
                self.prefetched.discard(old)
                self.prefetch_wasted += 1
        self.key_of[slot] = key
        self.slot_of[key] = slot

    def stats(self) -> dict:
        asked = self.hits + self.misses
        return {"expert_slots": self.num_slots, "resident_experts": self.num_pinned,
                "hits": self.hits, "misses": self.misses, "hit_rate": self.hits / asked if asked else 0.0,
                "evictions": self.evictions, "prefetch_issued": self.prefetch_issued,
                "prefetch_used": self.prefetch_used, "prefetch_wasted": self.prefetch_wasted,
                "policy": self.policy}

"""Block-based (paged) KV cache: device-neutral bookkeeping plus the per-layer tensors.

Each layer holds k[layer], v[layer] of shape [num_blocks, block_size, nkv, head_dim]. A
sequence holds a list of blocks (its leading full blocks possibly shared with other sequences
of the same prefix: core/runtime/prefix_cache.py); token p of a sequence lives at flat slot
blocks[p // block_size] * block_size + p % block_size. `prepare` reserves room for one step
of a batch and returns the AttentionMetadata the attention ops take.

Host work per step does not grow with the context: every sequence owns a row of a host mirror
of the block table, written only when it gains a block; a step gathers its rows at once, and
with an `uploader` (discrete devices: core/runtime/step_inputs.py) the step's inputs reach the
device in one non-blocking copy from pinned memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .prefix_cache import BlockPool, KVCacheFullError  # noqa: F401 - KVCacheFullError is public here


@dataclass
class AttentionMetadata:
    """One step of a batch, on the cache's device, in the form gqa_attention takes."""
    slot_mapping: torch.Tensor      # [T] int64 flat cache slot of each new token
    block_tables: torch.Tensor      # [B, max_blocks] int32, padded with 0
    context_lens: torch.Tensor      # [B] int32 tokens cached after this step's write
    query_start_loc: torch.Tensor   # [B+1] int32 cumulative new-token counts
    positions: torch.Tensor         # [T] int64 absolute position of each new token

    @property
    def num_seqs(self) -> int:
        return self.block_tables.shape[0]


class KVCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device, alloc=None, prefix_caching: bool = False,
                 uploader=None):
        self.num_layers, self.num_blocks, self.block_size = num_layers, num_blocks, block_size
        self.num_kv_heads, self.head_dim, self.dtype = num_kv_heads, head_dim, dtype
        self.device = torch.device(device)
        shape = (num_blocks, block_size, num_kv_heads, head_dim)

        def make():
            if alloc is None:
                return torch.zeros(shape, dtype=dtype, device=self.device)
            # Zero it: padded block-table entries are read (then masked), and 0 * NaN = NaN.
            return alloc(shape, dtype).zero_()

        self.k = [make() for _ in range(num_layers)]
        self.v = [make() for _ in range(num_layers)]
        self.nbytes = num_blocks * self.bytes_per_block(num_layers, block_size, num_kv_heads,
                                                        head_dim, dtype)
        self.allocator = BlockPool(num_blocks, caching=prefix_caching)
        self._blocks: dict[int, list[int]] = {}
        self._lens: dict[int, int] = {}
        self._named: dict[int, tuple] = {}     # seq -> (full blocks named so far, last block's hash)
        self.uploader = uploader
        # host mirror of the block table, one row per sequence (numpy: cheap small writes, and no
        # inference-mode tensor that a later write outside inference mode would trip over)
        self._table = np.zeros((8, 8), dtype=np.int32)
        self._row: dict[int, int] = {}
        self._free_rows: list[int] = list(range(8))

    # ---- sizing --------------------------------------------------------------------------
    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                        dtype: torch.dtype) -> int:
        """K and V of every layer for one block."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * block_size * num_kv_heads * head_dim * itemsize

    @staticmethod
    def blocks_for_bytes(budget_bytes: int, num_layers: int, block_size: int, num_kv_heads: int,
                         head_dim: int, dtype: torch.dtype) -> int:
        per = KVCache.bytes_per_block(num_layers, block_size, num_kv_heads, head_dim, dtype)
        return max(0, int(budget_bytes) // per)

    # ---- sequences -----------------------------------------------------------------------
    def add_sequence(self, seq_id: int, tokens=None) -> int:
        """Register a sequence. With prefix caching and its `tokens`, the cached full blocks its
        tokens start with become its first blocks; returns how many tokens they hold (0 without)."""
        if seq_id in self._lens:
            raise ValueError(f"sequence {seq_id} already in the KV cache")
        blocks, parent = self.allocator.match(tokens, self.block_size) if tokens is not None else ([], None)
        self._blocks[seq_id], self._lens[seq_id] = blocks, len(blocks) * self.block_size
        self._named[seq_id] = (len(blocks), parent)
        if not self._free_rows:                       # twice the rows
            n = self._table.shape[0]
            self._table = np.concatenate([self._table, np.zeros_like(self._table)])
            self._free_rows = list(range(n, 2 * n))
        self._row[seq_id] = self._free_rows.pop()
        self._mirror(seq_id, 0)
        return self._lens[seq_id]

    def _mirror(self, seq_id: int, start: int) -> None:
        """Copy the sequence's blocks from index `start` on into its row of the host mirror."""
        blocks = self._blocks[seq_id]
        if len(blocks) > self._table.shape[1]:        # wider: twice the columns, or what is needed
            wide = np.zeros((self._table.shape[0], max(len(blocks), 2 * self._table.shape[1])), dtype=np.int32)
            wide[:, :self._table.shape[1]] = self._table
            self._table = wide
        if len(blocks) > start:
            self._table[self._row[seq_id], start:len(blocks)] = blocks[start:]

    def commit(self, seq_id: int, tokens) -> None:
        """Name the sequence's blocks that are full now (`tokens`: its ids, at least as many as
        are cached), so later sequences with the same prefix can share them."""
        if not self.allocator.caching:
            return
        done, parent = self._named[seq_id]
        full, bs = self._lens[seq_id] // self.block_size, self.block_size
        blocks = self._blocks[seq_id]
        for i in range(done, full):
            parent = self.allocator.name(blocks[i], parent, tokens[i * bs:(i + 1) * bs])
        self._named[seq_id] = (max(done, full), parent)

    def needs_commit(self, seq_id: int) -> bool:
        return self.allocator.caching and self._lens[seq_id] // self.block_size > self._named[seq_id][0]

    def free_sequence(self, seq_id: int) -> None:
        row = self._row.pop(seq_id)
        self._table[row, :len(self._blocks[seq_id])] = 0
        self._free_rows.append(row)
        self.allocator.free(self._blocks.pop(seq_id))
        del self._lens[seq_id]
        del self._named[seq_id]

    def __contains__(self, seq_id: int) -> bool:
        return seq_id in self._lens

    def context_len(self, seq_id: int) -> int:
        return self._lens[seq_id]

    def blocks(self, seq_id: int) -> list[int]:
        return list(self._blocks[seq_id])

    @property
    def num_free_blocks(self) -> int:
        return self.allocator.num_free

    def usage(self) -> float:
        """Fraction of blocks in use."""
        return 1.0 - self.allocator.num_free / self.num_blocks if self.num_blocks else 1.0

    def _blocks_needed(self, seq_id, num_new_tokens: int) -> int:
        length = self._lens[seq_id] if seq_id is not None else 0
        have = len(self._blocks[seq_id]) if seq_id is not None else 0
        return max(0, -(-(length + num_new_tokens) // self.block_size) - have)

    def can_reserve(self, seq_id, num_new_tokens: int) -> bool:
        """Would `num_new_tokens` more fit? seq_id None asks for a new, empty sequence."""
        return self._blocks_needed(seq_id, num_new_tokens) <= self.allocator.num_free

    def _reserve_slots(self, seq_id: int, n: int) -> list[int]:
        blocks = self._blocks[seq_id]
        need = self._blocks_needed(seq_id, n)
        if need:
            have = len(blocks)
            blocks.extend(self.allocator.allocate(need))
            self._mirror(seq_id, have)
        start, bs = self._lens[seq_id], self.block_size
        self._lens[seq_id] = start + n
        slots: list[int] = []
        p = start
        while p < start + n:                      # one extend per block, not per token
            off = p % bs
            take = min(bs - off, start + n - p)
            base = blocks[p // bs] * bs
            slots.extend(range(base + off, base + off + take))
            p += take
        return slots

    def reserve(self, seq_id: int, num_new_tokens: int) -> torch.Tensor:
        """Allocate room for the new tokens, advance the length, return their slots (int64)."""
        return torch.tensor(self._reserve_slots(seq_id, num_new_tokens), dtype=torch.int64,
                            device=self.device)

    def block_table(self, seq_ids) -> torch.Tensor:
        """[B, max_blocks] int32, rows padded with block 0 (always masked by context_lens)."""
        return self._host_table(list(seq_ids)).to(self.device)

    def _host_table(self, seq_ids: list) -> torch.Tensor:
        """The batch's rows of the host mirror, as wide as its longest sequence."""
        width = max((len(self._blocks[s]) for s in seq_ids), default=0)
        rows = [self._row[s] for s in seq_ids]
        return torch.from_numpy(self._table[rows, :width])

    # ---- the per-step entry --------------------------------------------------------------
    def prepare(self, seq_ids, num_new_tokens_list) -> AttentionMetadata:
        """Reserve one step for a batch, all or nothing: KVCacheFullError changes nothing."""
        seq_ids, counts = list(seq_ids), list(num_new_tokens_list)
        if len(seq_ids) != len(counts):
            raise ValueError(f"{len(seq_ids)} sequences but {len(counts)} token counts")
        if len(set(seq_ids)) != len(seq_ids):
            raise ValueError("a sequence appears twice in one step")
        if any(n < 1 for n in counts):
            raise ValueError("every sequence in a step needs at least one new token")
        need = sum(self._blocks_needed(s, n) for s, n in zip(seq_ids, counts))
        if need > self.allocator.num_free:
            raise KVCacheFullError(
                f"KV cache full: {need} blocks asked for {len(seq_ids)} sequences, "
                f"{self.allocator.num_free} free of {self.num_blocks}")
        slots: list[int] = []
        positions: list[int] = []
        starts = [0]
        for s, n in zip(seq_ids, counts):
            old = self._lens[s]
            slots += self._reserve_slots(s, n)
            positions += range(old, old + n)
            starts.append(starts[-1] + n)
        ctx = [self._lens[s] for s in seq_ids]
        host = [torch.tensor(slots, dtype=torch.int64), self._host_table(seq_ids),
                torch.tensor(ctx, dtype=torch.int32), torch.tensor(starts, dtype=torch.int32),
                torch.tensor(positions, dtype=torch.int64)]
        if self.uploader is not None:
            parts = self.uploader.upload(host)
        else:
            parts = [t.to(self.device) for t in host]
        return AttentionMetadata(*parts)

    def layer(self, i: int):
        """(k_cache, v_cache) of layer i."""
        return self.k[i], self.v[i]

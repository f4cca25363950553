"""KV blocks shared between sequences with the same prefix (automatic prefix caching).

A full block is named by a hash of every token from the sequence's start to the block's end
(its parent block's hash and its own tokens), so two prompts that agree on their first k full
blocks share those blocks' K/V: RoPE made them position-dependent, and equal prefixes have
equal positions. Only full blocks are shared, and a sequence writes only into blocks of its
own, so shared blocks are never written again (no copy-on-write).

Blocks are reference-counted. A block nobody holds any more keeps its contents and its name
in an LRU pool: it still counts as free, and the allocator takes plain free blocks first, then
evicts the least recently used named ones.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict


class KVCacheFullError(RuntimeError):
    """Not enough free blocks for a reservation."""


def block_hash(parent: bytes | None, tokens) -> bytes:
    h = hashlib.blake2b(parent or b"", digest_size=16)
    h.update(b"".join(int(t).to_bytes(4, "little") for t in tokens))
    return h.digest()


class BlockPool:
    """Free list, reference counts and the named (cached) blocks of one KV cache."""

    def __init__(self, num_blocks: int, caching: bool = False):
        self.num_blocks, self.caching = num_blocks, caching
        self._free = list(range(num_blocks - 1, -1, -1))   # pop() from the end -> 0, 1, 2, ...
        self._refs: dict[int, int] = {}                     # block -> holders (held blocks only)
        self._named: dict[bytes, int] = {}                  # hash -> block
        self._name_of: dict[int, bytes] = {}                # block -> hash
        self._idle: OrderedDict = OrderedDict()             # named blocks nobody holds, LRU first
        self.queries = self.hits = 0                        # prompt tokens looked up / found

    @property
    def num_free(self) -> int:
        return len(self._free) + len(self._idle)

    # ---- plain allocation ----------------------------------------------------------------------
    def allocate(self, n: int) -> list[int]:
        if n > self.num_free:
            raise KVCacheFullError(f"KV cache full: {n} blocks asked, {self.num_free} free of {self.num_blocks}")
        out = []
        for _ in range(n):
            if self._free:
                b = self._free.pop()
            else:                                   # evict the least recently used named block
                b, _ = self._idle.popitem(last=False)
                del self._named[self._name_of.pop(b)]
            self._refs[b] = 1
            out.append(b)
        return out

    def free(self, blocks) -> None:
        for b in blocks:
            refs = self._refs.get(b)
            if refs is None:
                raise ValueError(f"block {b} freed twice or never allocated")
            if refs > 1:
                self._refs[b] = refs - 1
                continue
            del self._refs[b]
            if b in self._name_of:
                self._idle[b] = None                # keeps its contents until evicted
            else:
                self._free.append(b)

    # ---- sharing ---------------------------------------------------------------------------------
    def match(self, tokens, block_size: int) -> tuple:
        """(blocks, last hash) of the longest run of named full blocks that starts `tokens`,
        leaving at least one token to compute (its logits are needed). Takes a reference on each."""
        blocks, parent = [], None
        if not self.caching:
            return blocks, parent
        usable = (len(tokens) - 1) // block_size
        self.queries += len(tokens)
        for i in range(usable):
            h = block_hash(parent, tokens[i * block_size:(i + 1) * block_size])
            b = self._named.get(h)
            if b is None:
                break
            if b in self._idle:
                del self._idle[b]
                self._refs[b] = 1
            else:
                self._refs[b] += 1
            blocks.append(b)
            parent = h
        self.hits += len(blocks) * block_size
        return blocks, parent

    def name(self, block: int, parent: bytes | None, tokens) -> bytes:
        """Name a block that has just been filled; returns its hash. A block with the same name
        already cached stays the shared one (this one is simply not shared)."""
        h = block_hash(parent, tokens)
        if self.caching and h not in self._named and block not in self._name_of:
            self._named[h], self._name_of[block] = block, h
        return h

    def stats(self) -> dict:
        return {"prefix_cache_queries": self.queries, "prefix_cache_hits": self.hits,
                "prefix_cache_blocks": len(self._named)}

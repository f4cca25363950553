"""core/kvcache: block bookkeeping, and attention through the cache equal to full recompute."""

import pytest
import torch

from ernie_hal.core.runtime.kvcache import AttentionMetadata, KVCache, KVCacheFullError
from ernie_hal.core.runtime.prefix_cache import BlockPool
from ernie_hal.kernels.reference import gqa_attention, kv_cache_write, rope

NH, NKV, D, THETA = 4, 2, 16, 10000.0


# ---- bookkeeping ----------------------------------------------------------------------------

def test_allocator_allocate_free_and_full():
    a = BlockPool(4)
    assert a.allocate(3) == [0, 1, 2] and a.num_free == 1
    with pytest.raises(KVCacheFullError, match="2 blocks asked, 1 free"):
        a.allocate(2)
    a.free([1])
    assert a.num_free == 2 and sorted(a.allocate(2)) == [1, 3]
    with pytest.raises(ValueError, match="freed twice"):
        a.free([1, 1])
    assert issubclass(KVCacheFullError, RuntimeError)


def test_prefix_blocks_are_shared_kept_when_idle_and_evicted_last():
    pool = BlockPool(4, caching=True)
    a = pool.allocate(2)
    parent = pool.name(a[0], None, [1, 2])
    pool.name(a[1], parent, [3, 4])
    blocks, _ = pool.match([1, 2, 3, 4, 5], 2)            # two full blocks of the five tokens
    assert blocks == a and pool.hits == 4
    assert pool.match([1, 2, 3, 4], 2)[0] == a[:1]           # one token must stay to compute
    pool.free(a + a + a[:1])                                 # every holder lets go
    assert pool.num_free == 4                                # idle named blocks count as free
    assert pool.match([9, 9, 9], 2)[0] == []                 # another prefix: nothing shared
    assert pool.match([1, 2, 7], 2)[0] == a[:1]              # idle blocks come back with their names
    pool.free(a[:1])
    fresh = pool.allocate(2)                                 # plain free blocks go first ...
    assert set(fresh).isdisjoint(a)
    assert pool.allocate(1) == [a[1]] and pool.match([1, 2, 3, 4, 5], 2)[0] == a[:1]   # ... then LRU
    off = BlockPool(2)
    off.name(off.allocate(1)[0], None, [1, 2])
    assert off.match([1, 2, 3], 2)[0] == [] and off.stats()["prefix_cache_blocks"] == 0


def test_cache_commit_names_full_blocks_for_the_next_sequence():
    kv = make_cache(num_blocks=8, block_size=4, prefix_caching=True)
    tokens = list(range(11))
    kv.add_sequence(1, tokens)
    kv.prepare([1], [11])
    assert kv.needs_commit(1)
    kv.commit(1, tokens)
    assert not kv.needs_commit(1)
    assert kv.add_sequence(2, tokens[:9] + [99, 98]) == 8 and kv.blocks(2) == kv.blocks(1)[:2]
    kv.free_sequence(1)
    kv.free_sequence(2)
    assert kv.num_free_blocks == 8


def make_cache(num_blocks=16, block_size=4, layers=1, **kw):
    return KVCache(layers, num_blocks, block_size, NKV, D, torch.float32, "cpu", **kw)


def test_reserve_slots_cross_blocks_and_block_table_padding():
    c = make_cache(num_blocks=8, block_size=4)
    c.add_sequence(7)
    c.add_sequence(9)
    assert c.reserve(7, 3).tolist() == [0, 1, 2]              # block 0
    assert c.reserve(9, 1).tolist() == [4]                    # block 1
    assert c.reserve(7, 6).tolist() == [3, 8, 9, 10, 11, 12]  # fills block 0, takes 2 and 3
    assert c.context_len(7) == 9 and c.context_len(9) == 1
    table = c.block_table([9, 7])
    assert table.dtype == torch.int32 and table.tolist() == [[1, 0, 0], [0, 2, 3]]
    assert c.num_free_blocks == 4 and c.usage() == pytest.approx(0.5)
    c.free_sequence(7)
    assert c.num_free_blocks == 7 and 7 not in c
    assert c.block_table([]).shape == (0, 0)


def test_can_reserve_and_prepare_is_all_or_nothing():
    c = make_cache(num_blocks=3, block_size=4)
    c.add_sequence(0)
    c.add_sequence(1)
    assert c.can_reserve(None, 12) and not c.can_reserve(None, 13)
    c.prepare([0], [5])                                        # 2 blocks
    assert c.can_reserve(0, 7) and not c.can_reserve(0, 8)         # 3 in block 1, 4 in block 2
    with pytest.raises(KVCacheFullError, match="2 blocks asked"):
        c.prepare([0, 1], [3, 5])                              # 0 + 2 needed, 1 free
    assert c.context_len(0) == 5 and c.context_len(1) == 0 and c.num_free_blocks == 1
    with pytest.raises(ValueError):
        c.prepare([0, 0], [1, 1])


def test_prepare_metadata():
    c = make_cache(num_blocks=8, block_size=4)
    for s in (3, 5):
        c.add_sequence(s)
    c.prepare([3], [6])
    m = c.prepare([5, 3], [2, 1])
    assert isinstance(m, AttentionMetadata) and m.num_seqs == 2
    assert m.slot_mapping.dtype == torch.int64 and m.positions.dtype == torch.int64
    assert m.positions.tolist() == [0, 1, 6]
    assert m.context_lens.tolist() == [2, 7]
    assert m.query_start_loc.tolist() == [0, 2, 3]
    assert m.block_tables.tolist() == [[2, 0], [0, 1]]
    assert m.slot_mapping.tolist() == [8, 9, 6]


def test_sizing_and_alloc_hook():
    per = KVCache.bytes_per_block(2, 16, 2, 128, torch.bfloat16)
    assert per == 2 * 2 * 16 * 2 * 128 * 2
    assert KVCache.blocks_for_bytes(10 * per + 1, 2, 16, 2, 128, torch.bfloat16) == 10
    asked = []

    def alloc(shape, dtype):  # a backend's accounting verb returns uninitialised memory
        asked.append((shape, dtype))
        return torch.full(shape, float("nan"), dtype=dtype)

    c = make_cache(num_blocks=2, block_size=4, layers=3, alloc=alloc)
    assert len(asked) == 6 and asked[0] == ((2, 4, NKV, D), torch.float32)
    assert c.nbytes == sum(t.numel() * t.element_size() for t in c.k + c.v)
    assert all(t.abs().sum() == 0 for t in c.k + c.v)         # zeroed: padded reads stay finite


# ---- attention through the cache ------------------------------------------------------------

def sequence(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, h, D, generator=g) for h in (NH, NKV, NKV)]   # q, k, v pre-RoPE


def step(cache, seq_ids, chunks):
    """Run one attention step: chunks[i] = (q, k, v) new tokens of seq_ids[i]."""
    m = cache.prepare(seq_ids, [c[0].shape[0] for c in chunks])
    q, k, v = (torch.cat([c[i] for c in chunks]) for i in range(3))
    q, k = rope(q, k, m.positions, THETA)
    kv_cache_write(k, v, cache.k[0], cache.v[0], m.slot_mapping)
    return gqa_attention(q, cache.k[0], cache.v[0], m.block_tables, m.context_lens,
                         m.query_start_loc, D ** -0.5)


def full(q, k, v, seq_id=0):
    c = make_cache(num_blocks=32)
    c.add_sequence(seq_id)
    return step(c, [seq_id], [(q, k, v)])


def test_decode_step_by_step_equals_full_recompute():
    q, k, v = sequence(11, 0)
    want = full(q, k, v)
    c = make_cache()
    c.add_sequence(0)
    got = [step(c, [0], [(q[:3], k[:3], v[:3])])]             # prefill 3, then 8 decodes
    got += [step(c, [0], [(q[i:i + 1], k[i:i + 1], v[i:i + 1])]) for i in range(3, 11)]
    torch.testing.assert_close(torch.cat(got), want, atol=1e-5, rtol=1e-5)


def test_chunked_prefill_equals_one_prefill():
    q, k, v = sequence(40, 1)
    want = full(q, k, v)
    c = make_cache()
    c.add_sequence(0)
    got, s = [], 0
    for n in (5, 7, 1, 19, 8):     # chunks above and below the explicit/SDPA switch
        got.append(step(c, [0], [(q[s:s + n], k[s:s + n], v[s:s + n])]))
        s += n
    torch.testing.assert_close(torch.cat(got), want, atol=1e-5, rtol=1e-5)


def test_ragged_batch_equals_one_by_one():
    lens = [(6, 1), (1, 3), (9, 2)]        # (prefill, then a second step) per sequence
    seqs = [sequence(a + b, 10 + i) for i, (a, b) in enumerate(lens)]
    want = [full(*s) for s in seqs]
    c = make_cache(num_blocks=16, block_size=4)
    for i in range(3):
        c.add_sequence(i)
    first = step(c, [0, 1, 2], [tuple(t[:a] for t in s) for s, (a, _) in zip(seqs, lens)])
    second = step(c, [2, 0, 1], [tuple(t[a:] for t in seqs[i]) for i, (a, _) in
                                 [(2, lens[2]), (0, lens[0]), (1, lens[1])]])
    o1 = first.split([a for a, _ in lens])
    o2 = second.split([lens[2][1], lens[0][1], lens[1][1]])
    for i, j in ((0, 1), (1, 2), (2, 0)):
        torch.testing.assert_close(torch.cat([o1[i], o2[j]]), want[i], atol=1e-5, rtol=1e-5)


def test_decode_batch_after_free_reuses_blocks():
    # Blocks freed by one sequence are reused by another: block tables become non-contiguous.
    c = make_cache(num_blocks=6, block_size=2)
    seqs = {i: sequence(7, 20 + i) for i in range(3)}
    for i in (0, 1):
        c.add_sequence(i)
    step(c, [0, 1], [tuple(t[:3] for t in seqs[0]), tuple(t[:3] for t in seqs[1])])
    c.free_sequence(0)
    c.add_sequence(2)
    outs = [step(c, [2], [tuple(t[:2] for t in seqs[2])])]
    outs += [step(c, [1, 2], [tuple(t[i:i + 1] for t in seqs[1]),
                              tuple(t[i - 1:i] for t in seqs[2])])[1:] for i in (3, 4, 5)]
    torch.testing.assert_close(torch.cat(outs), full(*(t[:5] for t in seqs[2])),
                               atol=1e-5, rtol=1e-5)
    assert c.context_len(1) == 6 and c.context_len(2) == 5


# ---- host work per step: the block-table mirror and one pinned upload ---------------------------

def test_block_table_mirror_matches_the_lists_through_growth_and_reuse():
    """Random adds, steps and frees (rows reused, table widened, more rows): every prepare's block
    table is the padded list of each sequence's blocks, as the per-step rebuild made it."""
    g = torch.Generator().manual_seed(0)
    kv = KVCache(1, 400, 4, NKV, D, torch.float32, "cpu")
    live, next_id = [], 0
    for step in range(120):
        r = int(torch.randint(0, 10, (1,), generator=g))
        if r < 3 or not live:
            kv.add_sequence(next_id)
            live.append(next_id)
            next_id += 1
        elif r < 4 and len(live) > 1:
            kv.free_sequence(live.pop(int(torch.randint(0, len(live), (1,), generator=g))))
        batch = live[-min(len(live), 12):]
        counts = [int(torch.randint(1, 6, (1,), generator=g)) for _ in batch]
        if not kv.can_reserve(None, sum(counts) + 4 * len(batch)):
            break
        meta = kv.prepare(batch, counts)
        width = max(len(kv.blocks(s)) for s in batch)
        want = [kv.blocks(s) + [0] * (width - len(kv.blocks(s))) for s in batch]
        assert meta.block_tables.tolist() == want and meta.block_tables.dtype == torch.int32
    assert next_id > 8 and kv._table.shape[0] > 8           # the mirror grew rows (and columns)


class _Uploads:
    """A discrete device's verbs on the cpu: counts host-to-device copies and events."""

    def __init__(self):
        self.device, self.copies, self.synced = torch.device("cpu"), 0, []

    def pinned_empty(self, shape, dtype):
        return torch.empty(shape, dtype=dtype)

    def copy_to_device(self, dst, src, stream=None):
        self.copies += 1
        dst.copy_(src)

    def record_event(self, stream=None):
        return object()

    def sync_event(self, event):
        self.synced.append(event)


def test_prepare_on_a_discrete_device_is_one_copy_with_the_same_metadata():
    from ernie_hal.core.runtime.step_inputs import PinnedUploader
    dev = _Uploads()
    plain = KVCache(1, 32, 4, NKV, D, torch.float32, "cpu")
    staged = KVCache(1, 32, 4, NKV, D, torch.float32, "cpu", uploader=PinnedUploader(dev))
    for kv in (plain, staged):
        kv.add_sequence(0)
        kv.add_sequence(1)
    for counts in ([5, 3], [1, 1], [9, 1], [1, 1]):
        a, b = plain.prepare([0, 1], counts), staged.prepare([0, 1], counts)
        for name in ("slot_mapping", "block_tables", "context_lens", "query_start_loc", "positions"):
            x, y = getattr(a, name), getattr(b, name)
            assert x.dtype == y.dtype and torch.equal(x, y), name
    assert dev.copies == 4
    # two pinned buffers in turn: the third upload waited for the first's copy event
    assert len(dev.synced) == 4 and dev.synced[0] is None and dev.synced[2] is not None

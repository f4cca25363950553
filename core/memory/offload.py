"""The staging engine: runs a model whose weights do not all fit on the device, or in host memory.

Placement (core/memory/placement.py) says where each weight lives; this module moves the bytes:
- `FileReader` reads a tensor with pread(2) straight from the checkpoint file into its
  destination (a device tensor on cpu, a pinned chunk otherwise), chunk by chunk, and drops each
  chunk's pages from the page cache (posix_fadvise DONTNEED) once consumed. Nothing is mmap'd,
  so no file page is ever counted in the process's memory.
- `Stager` is one background thread with a priority queue (demanded experts, then layer weights,
  then guessed experts) plus, on a discrete device, a ring of pinned host chunks and a copy
  stream: a chunk is read while the previous one is copied to the device; events order the copy
  stream after the compute that last read a buffer, and the compute stream after the copy.
- `OffloadedWeights` is the weight store the executor walks: while layer i computes, layer
  i+1's staged weights are being read into the next buffer of a device ring; for MoE layers the
  router runs first and only the experts it picked are fetched into the device-side expert cache
  (core/memory/expert_cache.py), with the next MoE layer's likely experts prefetched.
Every byte read from disk and copied to the device is counted, and the time spent reading,
copying, waiting for staged weights and computing is recorded.

Weight-only quantized models (graph.quant) stage their packed bytes: a packed weight is two
pieces of a ring slot or expert-cache slot, its integers (int8 / uint8) and its fp32 scales, each
read or copied straight in, so a step moves ~2x (wint8) / ~3.5x (wint4) fewer bytes than bf16.
Sources: a quantized checkpoint (`ernie-hal quantize`) for the disk tier, read as stored; host-tier
weights of a plain checkpoint are quantized once at load into pinned memory. A plain
checkpoint's weights cannot be streamed packed (core/api.py refuses that plan, except the input
embedding, whose few rows a step reads are quantized as they are read: its scales are per row).
Staged packed weights pass through the kernel table's prepare_weight once per buffer view with
staged=True (the kernels then read data and scales in place, whatever bytes the view holds now):
a layout conversion per load (CPU's int4pack costs ~7x the read of the bytes) would cost more than
the bytes it saves.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import queue
import threading
import time
import weakref
from collections import Counter
from dataclasses import dataclass

import torch

from ..plugins.backend import Backend
from .expert_cache import ExpertCache
from ..model.graph import ModelGraph
from ..runtime.executor import LayerWeights
from .placement import DEVICE, HOST, Plan, aligned
from ..model.checkpoint_reader import Checkpoint, CheckpointError, TensorRef
from ..model.pread import ShortReadError, pread_into
from ..quant.checkpoint import packed_shapes, quantize_from, scale_name
from ..quant.format import PackedWeight, empty_packed
from ..quant.quantize import quantize

CHUNK = 16 * 2**20            # bytes per pread (and per page-cache release) on the direct path
DEMAND, LAYER, PREFETCH = 0, 1, 2      # reader queue priorities
PREFETCH_WARMUP = 4                    # resolved guesses (x top_k) before judging them
PREFETCH_ACCURACY = 0.5                # share of guesses used that keeps prefetch on


class FileReader:
    """pread from the checkpoint's files into host memory, releasing the pages it consumed."""

    def __init__(self, ckpt: Checkpoint):
        self.ckpt = ckpt
        self._fds: dict = {}
        self._lock = threading.Lock()
        self.bytes = 0
        self.seconds = 0.0

    def _fd(self, path: str) -> int:
        with self._lock:
            fd = self._fds.get(path)
            if fd is None:
                fd = self._fds[path] = os.open(path, os.O_RDONLY)
            return fd

    def pread(self, path: str, offset: int, out: torch.Tensor) -> None:
        """Fill `out` (a contiguous uint8 CPU tensor) from `path` at `offset`, pages released."""
        if out.numel() == 0:
            return
        t0 = time.perf_counter()
        try:
            pread_into(self._fd(path), offset, out, path, release=True)
        except ShortReadError as e:
            raise CheckpointError(str(e)) from None
        dt = time.perf_counter() - t0
        with self._lock:
            self.bytes += out.numel()
            self.seconds += dt

    def read_into(self, ref: TensorRef, dst: torch.Tensor) -> None:
        """Tensor `ref` into `dst` (host memory, contiguous, same numel): straight in when the
        dtypes match, else a chunk at a time through a small scratch buffer and converted."""
        flat = dst.reshape(-1)
        if flat.numel() != ref.numel:
            raise ValueError(f"{ref.name}: destination has {flat.numel()} elements, the tensor {ref.numel}")
        if dst.dtype == ref.dtype:
            raw = flat.view(torch.uint8)
            for start in range(0, ref.nbytes, CHUNK):
                self.pread(ref.file, ref.offset + start, raw[start:start + CHUNK])
            return
        size = ref.dtype.itemsize
        per = CHUNK // size
        scratch = torch.empty(min(per, ref.numel) * size, dtype=torch.uint8)
        for first in range(0, ref.numel, per):
            n = min(per, ref.numel - first)
            self.pread(ref.file, ref.offset + first * size, scratch[:n * size])
            flat[first:first + n].copy_(scratch[:n * size].view(ref.dtype))

    def contiguous(self, ref: TensorRef) -> bool:
        """True when `ref`'s bytes are one span of its file (pread chunk by chunk); a reader of
        slices (core/parallel) says False for strided or padded ones, which read_into gathers."""
        return True

    def read_rows(self, ref: TensorRef, rows: list, dst: torch.Tensor) -> None:
        """Rows `rows` of a 2-D tensor into dst [len(rows), cols] (host memory)."""
        row_bytes = ref.nbytes // ref.shape[0]
        same = dst.dtype == ref.dtype
        scratch = None if same else torch.empty(row_bytes, dtype=torch.uint8)
        for j, r in enumerate(rows):
            buf = dst[j].view(torch.uint8) if same else scratch
            self.pread(ref.file, ref.offset + r * row_bytes, buf)
            if not same:
                dst[j].copy_(scratch.view(ref.dtype))

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


class Ticket:
    """Completion of one submitted job (several parts). `event` orders the compute stream after it."""

    def __init__(self, parts: int):
        self._left, self._running = parts, 0
        self._cond = threading.Condition()
        self._done = threading.Event()
        self.error: BaseException | None = None
        self.event = None
        self.cancelled = False
        if parts == 0:
            self._done.set()

    def start_part(self) -> bool:
        """A reader thread takes a part: False when the ticket was cancelled (skip it)."""
        with self._cond:
            if self.cancelled:
                return False
            self._running += 1
            return True

    def part_done(self, ran: bool, error: BaseException | None = None) -> bool:
        """True for the last part: the caller then records the event and calls finish()."""
        with self._cond:
            if error is not None and self.error is None:
                self.error = error
            if ran:
                self._running -= 1
            self._left -= 1
            self._cond.notify_all()
            return self._left == 0

    def finish(self, event=None) -> None:
        self.event = event
        self._done.set()

    def done(self) -> bool:
        return self._done.is_set()

    def wait(self) -> None:
        self._done.wait()
        if self.error is not None:
            raise self.error

    def settle(self) -> None:
        """Wait until nothing of it will write any more: all parts done, or for a cancelled
        ticket only the parts being run. Errors are dropped (the work was abandoned)."""
        if not self.cancelled:
            self._done.wait()
            return
        with self._cond:
            self._cond.wait_for(lambda: self._running == 0)

    def cancel(self) -> None:
        """Parts not started yet are skipped; parts being run finish."""
        with self._cond:
            self.cancelled = True


class Stager:
    """Reader threads on one priority queue, a pool of pinned chunks and the copy stream.

    Two readers by default: a virtio disk read 22-56 MiB pieces at 0.9-1.0 GB/s with one
    thread and 1.0-1.8 GB/s with two (measured here); more did not help."""

    def __init__(self, reader: FileReader, backend: Backend, pinned_chunks: int = 0, chunk_bytes: int = 0,
                 threads: int = 2):
        self.reader, self.backend = reader, backend
        self.direct = backend.caps.unified_memory     # the device is host memory: read straight in
        self.stream = backend.new_stream()
        self.chunks = [backend.pinned_empty((chunk_bytes,), torch.uint8) for _ in range(pinned_chunks)]
        self._free_chunks: queue.Queue = queue.Queue()
        for i in range(pinned_chunks):
            self._free_chunks.put((i, None))          # (chunk, event of the copy that last read it)
        self.h2d_bytes = 0
        self._copy_seconds = 0.0
        self._timings: list = []          # (start, end) device timing events not yet read
        self._count_lock = threading.Lock()
        self._queue: queue.PriorityQueue = queue.PriorityQueue()
        self._seq = itertools.count()
        self._threads = [threading.Thread(target=self._work, name=f"ernie-hal-reader-{i}", daemon=True)
                         for i in range(max(1, threads))]
        for t in self._threads:
            t.start()
        # Stop the readers before the interpreter tears down: a daemon thread frozen inside a
        # torch copy (a prefetch still running when the program ends) aborts the process with
        # "terminate called without an active exception". finalize also runs at exit.
        self._stop = weakref.finalize(self, _stop_threads, self._queue, self._threads)

    # ---- moving one tensor (any thread) ----------------------------------------------------
    def copy(self, src, dst: torch.Tensor) -> None:
        """src: a checkpoint TensorRef or a host tensor; dst: a tensor on the device."""
        if isinstance(src, TensorRef):
            if self.direct:
                self.reader.read_into(src, dst)
            elif self.reader.contiguous(src):
                self._file_to_device(src, dst)
            else:                 # strided or padded: gathered on the host, then one copy
                host = torch.empty(src.shape, dtype=dst.dtype)
                self.reader.read_into(src, host)
                self.count(host.numel() * host.element_size(), self._timed_copy(dst, host) or 0.0)
                self.backend.sync_event(self.backend.record_event(self.stream))   # host is freed next
            return
        self.count(src.numel() * src.element_size(), self._timed_copy(dst, src) or 0.0)

    def _timed_copy(self, dst: torch.Tensor, src: torch.Tensor) -> float | None:
        """Queue one copy on the copy stream. Host seconds where the backend has no timing
        events; else None, and the device time (events around the copy) is added when read:
        on a GPU the host only queues the copy, so host time would measure queueing."""
        start = self.backend.timing_event(self.stream)
        t0 = time.perf_counter()
        self.backend.copy_to_device(dst, src, self.stream)
        if start is None:
            return time.perf_counter() - t0
        end = self.backend.timing_event(self.stream)
        with self._count_lock:
            self._timings.append((start, end))
            resolve = len(self._timings) >= 256       # keep the list short on long runs
        if resolve:
            self._resolve_timings()
        return None

    def _resolve_timings(self) -> None:
        with self._count_lock:
            pending, self._timings = self._timings, []
        seconds = sum(self.backend.elapsed_seconds(a, b) for a, b in pending)
        with self._count_lock:
            self._copy_seconds += seconds

    @property
    def copy_seconds(self) -> float:
        """Seconds spent copying to the device (device time where the backend can time it)."""
        self._resolve_timings()
        return self._copy_seconds

    def count(self, nbytes: int, seconds: float) -> None:
        with self._count_lock:
            self.h2d_bytes += nbytes
            self._copy_seconds += seconds

    def _file_to_device(self, ref: TensorRef, dst: torch.Tensor) -> None:
        """File -> pinned chunk -> device, a chunk at a time: a chunk is read while the copy
        of the previous one runs on the copy stream."""
        if not self.chunks:
            raise RuntimeError("staging to a discrete device needs pinned chunks; the plan has none")
        flat, size = dst.reshape(-1), ref.dtype.itemsize
        step = self.chunks[0].numel() - self.chunks[0].numel() % size
        for start in range(0, ref.nbytes, step):
            n = min(step, ref.nbytes - start)
            i, event = self._free_chunks.get()
            t0 = time.perf_counter()
            self.backend.sync_event(event)            # the copy that last read this chunk is done
            waited = time.perf_counter() - t0
            buf = self.chunks[i][:n]
            try:
                self.reader.pread(ref.file, ref.offset + start, buf)
                seconds = self._timed_copy(flat[start // size:(start + n) // size], buf.view(ref.dtype))
                event = self.backend.record_event(self.stream)
            finally:
                self._free_chunks.put((i, event))
            # host time: the wait for the chunk plus the copy; device time: the copy alone
            self.count(n, 0.0 if seconds is None else waited + seconds)

    # ---- the background threads ------------------------------------------------------------
    def submit(self, parts: list, priority: int, after=None) -> Ticket:
        """Run callables `parts` in the reader threads; the copy stream first waits for `after`
        (an event recorded where the destination was last read)."""
        ticket = Ticket(len(parts))
        for fn in parts:
            self._queue.put((priority, next(self._seq), fn, ticket, after))
        return ticket

    def _work(self) -> None:
        self.backend.bind_thread()          # the current device is per thread (cuda:N, N != 0)
        with torch.inference_mode():
            while True:
                _, _, fn, ticket, after = self._queue.get()
                if fn is None:
                    return
                ran, error = ticket.start_part(), None
                if ran:
                    try:
                        self.backend.wait_event(after, self.stream)
                        fn()
                    except BaseException as e:  # handed to the waiting executor, which raises it
                        error = e
                if ticket.part_done(ran, error):
                    ticket.finish(self.backend.record_event(self.stream) if self.stream is not None else None)

    def close(self) -> None:
        self._stop()


def _stop_threads(work: queue.PriorityQueue, threads: list) -> None:
    """Queue one stop marker per thread ahead of any waiting work, then wait for the work in
    flight to finish."""
    for i, _ in enumerate(threads):
        work.put((-1, i, None, None, None))
    for t in threads:
        t.join(timeout=60)


@dataclass
class _Piece:
    """One weight in a staged unit; `refs` has E entries when experts are stacked [E, ...].
    Packed (quant set): its integers at `offset`, its fp32 scales at the next aligned byte."""
    key: str
    refs: tuple
    shape: tuple
    dtype: torch.dtype
    offset: int = 0
    quant: object = None            # QuantSpec of a packed weight

    @property
    def nbytes(self) -> int:
        if self.quant is None:
            return math.prod(self.shape) * self.dtype.itemsize
        (ds, dd), (ss, sd) = packed_shapes(self.quant, self.shape)
        return aligned(math.prod(ds) * dd.itemsize) + math.prod(ss) * sd.itemsize

    def view(self, buf: torch.Tensor, dtype: torch.dtype):
        """This piece inside byte buffer `buf`: a tensor, or a PackedWeight of two views."""
        if self.quant is None:
            return buf[self.offset:self.offset + self.nbytes].view(self.dtype).view(self.shape)
        (ds, dd), (ss, sd) = packed_shapes(self.quant, self.shape)
        n = math.prod(ds) * dd.itemsize
        at = self.offset + aligned(n)
        return PackedWeight(buf[self.offset:self.offset + n].view(dd).view(ds),
                            buf[at:at + math.prod(ss) * sd.itemsize].view(sd).view(ss), self.quant, self.shape, dtype)


def _tensors(w) -> tuple:
    """The plain tensors a weight is stored in: (data, scales) of a packed one, else itself."""
    return (w.data, w.scales) if isinstance(w, PackedWeight) else (w,)


@dataclass
class _Unit:
    key: tuple                      # ("layer", i) or ("head",)
    pieces: list
    nbytes: int = 0


@dataclass
class _InFlight:
    unit: _Unit
    slot: int
    ticket: Ticket
    views: dict
    acquired: bool = False


@dataclass
class OffloadStats:
    steps: int = 0
    step_seconds: float = 0.0
    stall_seconds: float = 0.0      # the executor waiting for staged weights
    load_bytes: int = 0
    load_seconds: float = 0.0
    embed_rows: int = 0


class OffloadedWeights:
    """The weight store for a plan with staged weights (see ResidentWeights for the interface)."""

    def __init__(self, graph: ModelGraph, ckpt: Checkpoint, backend: Backend, dtype: torch.dtype, plan: Plan,
                 progress=None, prefetch: bool | None = None, cache_policy: str = "lru", prepare=None,
                 stored_quant: bool = False, reader: FileReader | None = None):
        """prepare: the kernel table's prepare_weight (quantized models); stored_quant: the
        checkpoint holds the packed weights already (`ernie-hal quantize`); reader: how tensors
        are read (default FileReader(ckpt); a tensor-parallel rank reads its slices)."""
        self.graph, self.ckpt, self.backend, self.dtype, self.plan = graph, ckpt, backend, dtype, plan
        self.config = graph.config
        self.progress = progress
        self.prepare = prepare or (lambda w, role=None, staged=False: w)
        self.stored_quant = stored_quant
        self._views: dict = {}                       # (ring slot, unit key) -> {piece key: view}
        self._policy, self._prefetch, self._probes = cache_policy, prefetch, 0
        self.reader = reader if reader is not None else FileReader(ckpt)
        self.stager = Stager(self.reader, backend, plan.pinned_chunks, plan.pinned_chunk_bytes)
        self.stats_ = OffloadStats()
        self.cached = plan.expert_bytes > 0          # routed experts go through the expert cache
        self.resident: dict = {}                     # piece key -> device tensor
        self.host: dict = {}                         # piece key -> pinned host tensor
        self.host_bytes = 0
        t0 = time.perf_counter()
        units = []
        for b in graph.blocks:
            pieces = self._place(list(self._block_pieces(b)))
            units.append(_Unit(("layer", b.index), pieces))
        out = [self._piece(r) for r in (graph.final_norm, graph.head)]
        units.append(_Unit(("head",), self._place(out)))
        if not graph.tied:
            self._place([self._piece(graph.embed)])
        self.embed_key = graph.embed.name
        self.embed_rows = self.plan.tier(graph.embed) != DEVICE
        self._setup_experts()
        self.order = [u for u in units if u.pieces]
        self._staged = {u.key for u in self.order}
        for u in self.order:
            off = 0
            for p in u.pieces:
                p.offset, off = off, off + aligned(p.nbytes)
            u.nbytes = off
        need = max((u.nbytes for u in self.order), default=0)
        if need > plan.ring_slot_bytes:
            raise RuntimeError(f"plan's ring slot {plan.ring_slot_bytes} B is smaller than a staged unit ({need} B)")
        slots = min(plan.ring_slots, len(self.order))
        self.ring = [backend.alloc((plan.ring_slot_bytes,), torch.uint8) for _ in range(slots)]
        self.backend.synchronize()
        self.stats_.load_seconds = time.perf_counter() - t0
        self.stats_.load_bytes = self.reader.bytes
        self._inflight: list = []
        self._next = 0
        self._step_t0 = None
        self._rows = None
        self._prime(0)

    # ---- load time -----------------------------------------------------------------------------
    def _dtype(self, ref) -> torch.dtype:
        return torch.float32 if ref.role == "router" else self.dtype

    def _piece(self, r) -> _Piece:
        return _Piece(r.name, (r,), r.shape, self._dtype(r), quant=r.quant)

    def _block_pieces(self, b):
        for r in b.refs():
            if r.role != "expert":
                yield self._piece(r)
        if b.moe is not None and not self.cached:
            ex = b.moe.experts
            for part in ("gate", "up", "down"):
                refs = tuple(getattr(e, part) for e in ex)
                yield _Piece(f"{b.index}.experts.{part}", refs, (len(refs),) + refs[0].shape, self.dtype,
                             quant=refs[0].quant)

    def _empty(self, p: _Piece, alloc):
        """Storage for piece `p` from alloc(shape, dtype): a tensor or a PackedWeight."""
        if p.quant is not None:
            return empty_packed(p.quant, p.shape, self.dtype, alloc)
        return alloc(p.shape, p.dtype)

    def _sources(self, r) -> tuple:
        """The checkpoint tensors weight `r` is read from, in _tensors order."""
        if r.quant is not None:
            return self.ckpt.ref(r.name), self.ckpt.ref(scale_name(r.name))
        return (self.ckpt.ref(r.name),)

    def _place(self, pieces: list) -> list:
        """Load device- and host-tier pieces now; return the staged ones (host tier or disk)."""
        staged = []
        for p in pieces:
            tier = self.plan.tiers[p.refs[0].name]
            if tier == DEVICE:
                if p.key not in self.resident:       # a tied head is the embedding
                    w = self._load(p, self._empty(p, self.backend.alloc))
                    self.resident[p.key] = w if p.quant is None else self.prepare(w, p.refs[0].role)
            else:
                if tier == HOST:       # one pinned tensor per weight: what placement counted
                    self.host[p.key] = tuple(self._load(q, self._empty(q, self._pinned), host=True)
                                             for q in (self._piece(r) for r in p.refs))
                if p.key != self.graph.embed.name or self.graph.tied:
                    staged.append(p)
        return staged

    def _pinned(self, shape, dtype) -> torch.Tensor:
        """A pinned host tensor, counted as the pinned allocator really takes it (rounded up)."""
        self.host_bytes += self.backend.pinned_footprint(math.prod(shape) * dtype.itemsize)
        return self.backend.pinned_empty(shape, dtype)

    def _load(self, p: _Piece, dst, host: bool = False):
        for j, r in enumerate(p.refs):
            self._fill(r, dst[j] if len(p.refs) > 1 else dst, host)
        return dst

    def _fill(self, r, dst, host: bool = False) -> None:
        """Weight `r` into `dst` once, at load: read as stored, or quantized from a plain
        checkpoint a block of rows at a time (quantize_from: a few MiB of floats held at once)."""
        if r.quant is not None and not self.stored_quant:
            self._quantize_at_load(r, dst)
        else:
            copy = self.reader.read_into if host else self.stager.copy
            for src, d in zip(self._sources(r), _tensors(dst)):
                copy(src, d)
        if self.progress is not None:
            self.progress(r.nbytes)

    def _quantize_at_load(self, r, dst) -> None:
        quantize_from(self.ckpt, r, dst)

    def _setup_experts(self) -> None:
        c, plan = self.config, self.plan
        self.full_layers: dict = {}                  # layer -> first slot, all experts resident
        self.cache = None
        if not self.cached:
            return
        ex = next(b for b in self.graph.blocks if b.moe is not None).moe.experts[0]
        n = len(plan.resident_experts) + plan.expert_slots
        # packed experts: a slot holds one expert's packed bytes (placement's expert_bytes), and
        # the kernels read every slot in place, whichever expert it holds now
        self.slots = tuple(self.prepare(self._empty(_Piece(r.name, (r,), (n,) + r.shape, self.dtype, quant=r.quant),
                                                    self.backend.alloc), r.role, staged=True)
                           if r.quant is not None else self.backend.alloc((n,) + r.shape, self.dtype)
                           for r in ex.refs())
        self.cache = ExpertCache(n, resident=plan.resident_experts, policy=self._policy)
        self.slot_event = [None] * n
        self.slot_ticket: list = [None] * n
        self.host_experts: dict = {}
        for slot, (layer, e) in enumerate(plan.resident_experts):
            refs = self.graph.blocks[layer].moe.experts[e].refs()
            for r, dst in zip(refs, self.slots):
                self._fill(r, dst[slot])
        for layer, count in Counter(l for l, _ in plan.resident_experts).items():
            if count == c.moe_num_experts:
                self.full_layers[layer] = self.cache.slot_of[(layer, 0)]
        for b in self.graph.blocks:
            if b.moe is None:
                continue
            for e, mlp in enumerate(b.moe.experts):
                if plan.tier(mlp.gate) == HOST:
                    self.host_experts[(b.index, e)] = tuple(
                        self._load(q, self._empty(q, self._pinned), host=True)
                        for q in (self._piece(r) for r in mlp.refs()))
        moe_layers = [b.index for b in self.graph.blocks if b.moe is not None]
        self.next_moe = dict(zip(moe_layers, moe_layers[1:] + [None]))
        self.freq = {layer: Counter() for layer in moe_layers}

    # ---- the store interface -------------------------------------------------------------------
    def embedding(self, ids: torch.Tensor):
        """(table, ids into it): the resident table, or just this step's rows read from the file."""
        self._step_t0 = time.perf_counter()
        if self._rows is not None:                   # a step that never finished
            for t in _tensors(self._rows):
                self.backend.free(t)
            self._rows = None
        if not self.embed_rows:
            return self.resident[self.embed_key], ids
        uniq, inverse = torch.unique(ids, return_inverse=True)
        rows = uniq.tolist()
        e = self.graph.embed
        piece = _Piece(e.name, (e,), (len(rows), self.config.hidden_size), self.dtype, quant=e.quant)
        self._rows = self._empty(piece, self.backend.alloc)
        if self.embed_key in self.host:
            src = self.host[self.embed_key][0]
            host = (PackedWeight(src.data[uniq.cpu()], src.scales[uniq.cpu()], e.quant, piece.shape, self.dtype)
                    if e.quant is not None else src[uniq.cpu()])
        elif self.stager.direct:
            host = self._rows
            self._read_rows(rows, host)
        else:
            host = self._empty(piece, self.backend.pinned_empty)
            self._read_rows(rows, host)
        if host is not self._rows:
            t0 = time.perf_counter()
            for s, d in zip(_tensors(host), _tensors(self._rows)):
                self.backend.copy_to_device(d, s)
                self.stager.count(s.numel() * s.element_size(), 0.0)
            self.stager.count(0, time.perf_counter() - t0)
        self.stats_.embed_rows += len(rows)
        return self._rows, inverse

    def _read_rows(self, rows: list, dst) -> None:
        """The embedding's rows `rows` from the file into host memory `dst`. A plain checkpoint's
        rows of a quantized model are quantized as read: scales are per row, so a row quantizes
        alone to exactly what the whole table would."""
        e = self.graph.embed
        if e.quant is None or self.stored_quant:
            for src, d in zip(self._sources(e), _tensors(dst)):
                self.reader.read_rows(src, rows, d)
            return
        plain = torch.empty((len(rows), e.shape[1]), dtype=e.dtype)
        self.reader.read_rows(self.ckpt.ref(e.name), rows, plain)
        quantize(plain, e.quant, self.dtype, name=e.name, out=dst)

    def layer(self, i: int) -> LayerWeights:
        b = self.graph.blocks[i]
        views = self._acquire(("layer", i))

        def get(ref_or_key):
            key = ref_or_key if isinstance(ref_or_key, str) else ref_or_key.name
            return self.resident[key] if key in self.resident else views[key]

        lw = LayerWeights(input_norm=get(b.input_norm), q=get(b.q), k=get(b.k), v=get(b.v), o=get(b.o),
                          post_norm=get(b.post_norm))
        if b.mlp is not None:
            lw.mlp = tuple(get(r) for r in b.mlp.refs())
            return lw
        m = b.moe
        lw.router, lw.bias = get(m.router), get(m.bias).reshape(-1)
        if m.shared is not None:
            lw.shared = tuple(get(r) for r in m.shared.refs())
        if not self.cached:
            lw.experts = tuple(get(f"{i}.experts.{p}") for p in ("gate", "up", "down"))
        elif i in self.full_layers:
            s, E = self.full_layers[i], self.config.moe_num_experts
            lw.experts = tuple(t[s:s + E] for t in self.slots)
        return lw

    def output(self):
        views = self._acquire(("head",))
        get = lambda r: self.resident[r.name] if r.name in self.resident else views[r.name]  # noqa: E731
        return get(self.graph.final_norm), get(self.graph.head)

    def step_done(self) -> None:
        if self._rows is not None:
            for t in _tensors(self._rows):
                self.backend.free(t)
            self._rows = None
        if self._step_t0 is not None:
            self.stats_.step_seconds += time.perf_counter() - self._step_t0
            self.stats_.steps += 1
            self._step_t0 = None

    def routed_experts(self, i: int, h: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                       moe_experts) -> torch.Tensor:
        """The routed-expert sum for layer i with only the picked experts on the device.

        One `moe_experts` call over the cache slots (ids remapped) when the step's experts fit
        the cache at once and their slots rise with their ids, or the kernel declares itself
        order-free (`expert_order_free`): then its per-expert accumulation order is the
        resident run's. Otherwise one call per expert in id order, each accumulated into the
        output in turn: the reference's order and precision, so greedy ids stay identical."""
        k = ids.shape[1]
        flat = ids.reshape(-1)
        counts = torch.bincount(flat, minlength=self.config.moe_num_experts).tolist()   # one sync
        needed = [e for e, n in enumerate(counts) if n]
        self.freq[i].update(needed)
        keys = [(i, e) for e in needed]
        if self.cache.capacity(keys) == len(keys):
            slots = self._fetch(keys)
            if getattr(moe_experts, "expert_order_free", False) or all(a < b for a, b in zip(slots, slots[1:])):
                remap = torch.zeros(self.config.moe_num_experts, dtype=torch.long)
                remap[needed] = torch.tensor(slots, dtype=torch.long)
                out = moe_experts(h, weights, remap.to(ids.device)[ids], *self.slots)
                self._used(slots)
                self._prefetch_after(i, needed)
                return out
            batches = iter([(keys, slots)])
        else:
            batches = self._batches(keys)          # more experts than slots (a long prefill)
        order = torch.argsort(flat, stable=True)   # entries grouped by expert, as the reference does
        starts = dict(zip(needed, itertools.accumulate([counts[e] for e in needed], initial=0)))
        wflat = weights.reshape(-1)
        out = torch.zeros_like(h)
        for group, slots in batches:
            for (_, e), s in zip(group, slots):
                entries = order[starts[e]:starts[e] + counts[e]]
                tok = entries // k
                y = moe_experts(h[tok], wflat[entries][:, None], torch.zeros_like(entries)[:, None],
                                *(t[s:s + 1] for t in self.slots))
                out.index_add_(0, tok, y)
            self._used(slots)
        self._prefetch_after(i, needed)
        return out

    def _batches(self, keys: list):
        """(keys, slots) a cache-full at a time, each fetched when the previous one is done."""
        while keys:
            n = self.cache.capacity(keys)
            if n == 0:
                raise RuntimeError("the expert cache has no dynamic slot for a routed expert")
            group, keys = keys[:n], keys[n:]
            yield group, self._fetch(group)

    # ---- layer staging -------------------------------------------------------------------------
    def _prime(self, start: int, after=None) -> None:
        self._next = start
        for slot in range(len(self.ring)):
            self._submit_next(slot, after=after)

    def _submit_next(self, slot: int, after) -> None:
        unit = self.order[self._next % len(self.order)]
        self._next += 1
        views, parts = self._slot_views(slot, unit), []
        for p in unit.pieces:
            view = views[p.key]
            for j, r in enumerate(p.refs):
                dst = view[j] if len(p.refs) > 1 else view
                srcs = _tensors(self.host[p.key][j]) if p.key in self.host else self._sources(r)
                parts += [functools.partial(self.stager.copy, s, d) for s, d in zip(srcs, _tensors(dst))]
        ticket = self.stager.submit(parts, LAYER, after)
        self._inflight.append(_InFlight(unit, slot, ticket, views))

    def _slot_views(self, slot: int, unit: _Unit) -> dict:
        """The views of `unit`'s pieces in ring slot `slot`, made (and packed ones prepared) once."""
        views = self._views.get((slot, unit.key))
        if views is None:
            views = self._views[(slot, unit.key)] = {}
            for p in unit.pieces:
                v = p.view(self.ring[slot], self.dtype)
                views[p.key] = v if p.quant is None else self.prepare(v, p.refs[0].role, staged=True)
        return views

    def _acquire(self, key: tuple) -> dict:
        """The staged views of unit `key` ({} when it has nothing staged), once they are in place."""
        if not self.ring or key not in self._staged:
            return {}
        while self._inflight and self._inflight[0].acquired:     # the executor is done with it
            done = self._inflight.pop(0)
            self._submit_next(done.slot, after=self.backend.record_event())
        if not self._inflight or self._inflight[0].unit.key != key:
            self._restart(key)                                   # out of order (an aborted step)
        head = self._inflight[0]
        self._wait([head.ticket])
        head.acquired = True
        return head.views

    def _restart(self, key: tuple) -> None:
        for f in self._inflight:
            f.ticket.cancel()
        for f in self._inflight:
            f.ticket.settle()
        self._inflight.clear()
        # kernels of the aborted step may still be queued reading these slots: the refill's
        # copies wait for everything the compute stream has queued so far
        self._prime(next(j for j, u in enumerate(self.order) if u.key == key), after=self.backend.record_event())

    def _wait(self, tickets) -> None:
        t0 = time.perf_counter()
        for t in tickets:
            t.wait()
            self.backend.wait_event(t.event)
        self.stats_.stall_seconds += time.perf_counter() - t0

    # ---- expert cache ----------------------------------------------------------------------------
    def _fetch(self, keys: list) -> list:
        slots, misses = self.cache.request(keys)
        tickets = []
        for key, slot in misses:
            self._retire(slot)
            tickets.append(self._load_expert(key, slot, DEMAND))
        for slot in slots:   # hits on a prefetch: its ticket being done means "copy queued", not
            t = self.slot_ticket[slot]     # "landed", so compute always waits on the copy's event
            if t is not None and t not in tickets:
                tickets.append(t)
        self._wait(tickets)
        for slot in slots:                 # the compute stream is ordered after these copies now
            self.slot_ticket[slot] = None
        return slots

    def _retire(self, slot: int) -> None:
        """A slot is being reassigned: its pending prefetch is cancelled (or waited out)."""
        t = self.slot_ticket[slot]
        if t is not None and not t.done():
            t.cancel()
            t.settle()

    def _load_expert(self, key, slot: int, priority: int) -> Ticket:
        layer, e = key
        dsts = [d for t in self.slots for d in _tensors(t[slot])]
        if key in self.host_experts:
            srcs = [s for w in self.host_experts[key] for s in _tensors(w)]
        else:
            srcs = [s for r in self.graph.blocks[layer].moe.experts[e].refs() for s in self._sources(r)]
        t = self.stager.submit([functools.partial(self.stager.copy, s, d) for s, d in zip(srcs, dsts)],
                               priority, after=self.slot_event[slot])
        self.slot_ticket[slot] = t
        return t

    def _used(self, slots) -> None:
        event = self.backend.record_event()
        for s in slots:
            self.slot_event[s] = event

    def _prefetch_wanted(self) -> bool:
        """prefetch=None (auto): when the cache has room for a guess besides a step's experts, and
        while guesses mostly come true; a wasted guess costs a read the demand path waits behind.
        After PREFETCH_WARMUP resolved guesses below PREFETCH_ACCURACY, guess every 16th time only."""
        if self._prefetch is not None:
            return self._prefetch
        c, k = self.cache, self.config.moe_k
        if c is None or c.num_dynamic < 2 * k:
            return False
        resolved = c.prefetch_used + c.prefetch_wasted
        if resolved < PREFETCH_WARMUP * k or c.prefetch_used >= PREFETCH_ACCURACY * resolved:
            return True
        self._probes += 1
        return self._probes % 16 == 0

    def _prefetch_after(self, i: int, needed: list) -> None:
        """Guess the next MoE layer's experts (its most used so far, else this layer's ids)."""
        j = self.next_moe.get(i)
        if j is None or j in self.full_layers or not self._prefetch_wanted():
            return
        k = self.config.moe_k
        guess = [e for e, _ in self.freq[j].most_common(k)] or needed[:k]
        for key, slot in self.cache.prefetch([(j, e) for e in guess]):
            self._retire(slot)
            self._load_expert(key, slot, PREFETCH)

    def drain(self) -> None:
        """Wait until every read already queued has landed (benchmarks, exact byte counts)."""
        for f in self._inflight:
            f.ticket.settle()
        for t in self.slot_ticket if self.cache is not None else ():
            if t is not None:
                t.settle()

    # ---- reporting -------------------------------------------------------------------------------
    def stats(self) -> dict:
        s, r = self.stats_, self.reader
        out = {"steps": s.steps, "step_seconds": s.step_seconds, "stall_seconds": s.stall_seconds,
               "compute_seconds": max(0.0, s.step_seconds - s.stall_seconds),
               "load_bytes": s.load_bytes, "load_seconds": s.load_seconds,
               "disk_read_bytes": r.bytes - s.load_bytes, "disk_read_seconds": r.seconds,
               "h2d_bytes": self.stager.h2d_bytes, "copy_seconds": self.stager.copy_seconds,
               "embed_rows_read": s.embed_rows, "pinned_host_bytes": self.host_bytes,
               "compute_threads": torch.get_num_threads(),
               "device_peak_bytes": self.backend.memory.peak}
        if self.cache is not None:
            out["expert_cache"] = self.cache.stats()
        return out

    def expert_stats(self) -> dict:
        """(layer, expert) -> demand count so far: feed it to placement.plan(expert_stats=...)."""
        return dict(self.cache.uses) if self.cache is not None else {}

    def close(self) -> None:
        for f in self._inflight:
            f.ticket.cancel()
        self.stager.close()
        self.reader.close()

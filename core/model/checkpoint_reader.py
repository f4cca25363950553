"""Checkpoint: a -PT safetensors checkpoint read lazily through one mmap per file.

`open` parses only the config and the safetensors headers (8-byte little-endian length + JSON),
never tensor data. `read` copies one tensor from the mapped pages straight into its destination
(a new tensor, or `out=`: pinned, device, another dtype); `view` is the zero-copy exception.
`release` drops the pages behind a consumed tensor or file from this process and the page cache,
so streaming a checkpoint larger than RAM does not fill host memory with it.
"""

from __future__ import annotations

import math
import json
import mmap
import os
import struct
import threading
from dataclasses import dataclass

import torch

from . import names as N
from .config import ConfigError, ModelConfig
from .pread import ShortReadError, pread_into

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
MAX_HEADER = 100 * 2**20          # the safetensors library's own limit

SAFETENSORS_DTYPES = {"BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16,
                      "I32": torch.int32, "I64": torch.int64, "F16": torch.float16,
                      "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
for _st, _attr in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"),
                   ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):     # present only in newer torch builds
        SAFETENSORS_DTYPES[_st] = getattr(torch, _attr)
DTYPE_TO_SAFETENSORS = {v: k for k, v in SAFETENSORS_DTYPES.items()}


class CheckpointError(ValueError):
    """The checkpoint on disk is incomplete, damaged, or does not match its config.json."""


class PaddleFormatError(CheckpointError):
    """A -Paddle checkpoint (ernie. prefix, fused qkv_proj) was given to the -PT loader."""


@dataclass(frozen=True)
class TensorRef:
    name: str
    file: str                 # absolute path of the shard
    offset: int               # absolute byte offset of the data in the file
    nbytes: int
    shape: tuple
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_header(path: str) -> dict[str, TensorRef]:
    """The tensors one safetensors file declares, checked against the file's size."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: corrupt safetensors file: {size} bytes, shorter than the "
                                  f"8-byte header length; re-download this file")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > MAX_HEADER:
            raise CheckpointError(f"{path}: corrupt safetensors header: header length is {n} bytes, expected "
                                  f"at most {min(size - 8, MAX_HEADER)} (file is {size} bytes); the file is "
                                  f"damaged or not safetensors — re-download it")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header: expected JSON, found invalid data ({e}); "
                              f"re-download this file") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header: expected a JSON object, "
                              f"found {type(header).__name__}; re-download this file")
    meta = header.get("__metadata__")
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise CheckpointError(f"{path}: corrupt safetensors header: __metadata__ must map names to strings, "
                              f"found {str(meta)[:80]}; re-download this file")
    start = 8 + n
    refs = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        refs[name] = _parse_entry(path, size, start, name, info)
    _check_layout(path, size, start, refs)
    return refs


def _check_layout(path: str, size: int, start: int, refs: dict) -> None:
    """The format's rule: the tensors' byte ranges, sorted, tile the data buffer exactly (from 0,
    no gap, no overlap, up to the end of the file). Overlapping ranges would alias tensors."""
    at, before = 0, None
    for ref in sorted(refs.values(), key=lambda r: (r.offset, r.offset + r.nbytes)):
        begin = ref.offset - start
        if begin != at:
            what = (f"overlaps {before.name!r} (bytes {before.offset - start}..{at})" if begin < at
                    else f"leaves a gap of {begin - at} bytes after {before.name if before else 'the header'!r}")
            raise CheckpointError(f"{path}: corrupt safetensors header: tensor {ref.name!r} (bytes {begin}.."
                                  f"{begin + ref.nbytes}) {what}; the format requires contiguous, non-overlapping "
                                  f"ranges — re-download or re-export this file")
        at, before = begin + ref.nbytes, ref
    if start + at != size:
        raise CheckpointError(f"{path}: corrupt safetensors file: the tensors end at byte {start + at}, the file "
                              f"has {size} bytes; {size - start - at} trailing bytes belong to no tensor — "
                              f"re-download this file")


def _parse_entry(path, size, start, name, info) -> TensorRef:
    def bad(what):
        return CheckpointError(f"{path}: corrupt safetensors header: tensor {name!r} {what}; re-download this file")
    try:
        dtype_name, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
    except (TypeError, KeyError, ValueError):
        raise bad(f"entry is {info!r}, expected dtype, shape and data_offsets") from None
    dtype = SAFETENSORS_DTYPES.get(dtype_name)
    if dtype is None:
        raise bad(f"has dtype {dtype_name!r}, expected one of {sorted(SAFETENSORS_DTYPES)}")
    if not all(isinstance(s, int) and s >= 0 for s in shape) or not (
            isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end):
        raise bad(f"has shape {list(shape)} and data_offsets {[begin, end]}, expected non-negative integers")
    numel = 1
    for s in shape:
        numel *= s
    nbytes = numel * dtype.itemsize
    if end - begin != nbytes:
        raise bad(f"spans {end - begin} bytes, expected {nbytes} for shape {list(shape)} {dtype_name}")
    if start + end > size:
        raise CheckpointError(
            f"{path}: truncated file: tensor {name!r} needs bytes up to {start + end}, found a file of "
            f"{size} bytes; the download is incomplete — re-download this file")
    return TensorRef(name, path, start + begin, nbytes, shape, dtype)


class _Shard:
    """One file: its fd and mmap are opened on first use and kept until close()."""

    def __init__(self, path: str):
        self.path, self.fd, self.mm = path, None, None
        self.viewed = False       # a view() tensor may point into mm
        self.lock = threading.Lock()

    def descriptor(self) -> int:
        with self.lock:
            if self.fd is None:
                self.fd = os.open(self.path, os.O_RDONLY)
            return self.fd

    def map(self) -> mmap.mmap:
        fd = self.descriptor()
        with self.lock:
            if self.mm is None:
                # ACCESS_COPY (MAP_PRIVATE) gives a writable buffer, which torch.frombuffer needs
                # without a warning; pages stay shared with the page cache until written.
                self.mm = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)
            return self.mm

    def drop_pages(self, start: int, length: int) -> None:
        with self.lock:
            if self.mm is not None and hasattr(self.mm, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
                aligned = start - start % mmap.PAGESIZE       # madvise wants a page-aligned start
                length = min(length + start - aligned, len(self.mm) - aligned)
                if length > 0:
                    self.mm.madvise(mmap.MADV_DONTNEED, aligned, length)
            if hasattr(os, "posix_fadvise"):
                fd = self.fd if self.fd is not None else os.open(self.path, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, start, length, os.POSIX_FADV_DONTNEED)
                finally:
                    if fd != self.fd:
                        os.close(fd)

    def close(self) -> None:
        with self.lock:
            if self.mm is not None and not self.viewed:
                self.mm.close()
            # torch.frombuffer holds a reference to mm, not a buffer export, so closing it under a
            # live view() would leave a dangling tensor; dropping ours unmaps when the last view dies.
            self.mm = None
            if self.fd is not None:
                os.close(self.fd)
                self.fd = None


class Checkpoint:
    def __init__(self, path: str, config: ModelConfig, refs: dict[str, TensorRef], index: str | None = None):
        self.path, self.config, self.index = path, config, index
        order = {f: i for i, f in enumerate(dict.fromkeys(r.file for r in refs.values()))}
        self._refs = dict(sorted(refs.items(), key=lambda kv: (order[kv[1].file], kv[1].offset)))
        self._shards = {f: _Shard(f) for f in order}

    # ---- opening --------------------------------------------------------------------------
    @classmethod
    def open(cls, path) -> "Checkpoint":
        path = os.path.abspath(os.fspath(path))
        if not os.path.isdir(path):
            raise CheckpointError(f"{path}: not a checkpoint directory; expected a folder with config.json "
                                  f"and model.safetensors (or shards with {INDEX})")
        try:
            config, config_error = ModelConfig.from_file(path), None
        except ConfigError as e:
            config, config_error = None, e
        try:
            refs, index = _scan(path)
        except PaddleFormatError:
            raise
        except CheckpointError:
            if config_error is not None:   # a bad or missing config.json is the more basic problem
                raise config_error from None
            raise
        if config_error is not None:
            raise config_error
        return cls(path, config, refs, index)

    # ---- lookup ---------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self._refs)

    @property
    def files(self) -> list[str]:
        return list(self._shards)

    def has(self, name: str) -> bool:
        return name in self._refs

    __contains__ = has

    def ref(self, name: str) -> TensorRef:
        try:
            return self._refs[name]
        except KeyError:
            raise CheckpointError(f"{self._where()}: no tensor named {name!r} "
                                  f"({len(self._refs)} tensors in the checkpoint)") from None

    @property
    def total_bytes(self) -> int:
        return sum(r.nbytes for r in self._refs.values())

    @property
    def lm_head_name(self) -> str:
        """docs/model.md 1.2: use lm_head.weight only when present and the config says untied."""
        if self.has(N.LM_HEAD) and not self.config.tie_word_embeddings:
            return N.LM_HEAD
        return N.EMBED

    # ---- validation -----------------------------------------------------------------------
    def validate(self, expected: dict | None = None) -> list[str]:
        """Raise CheckpointError unless every expected tensor is present with its shape and dtype.
        `expected` is {name: (shape, dtype)}; default: names.expected_tensors for this config.
        Returns the checkpoint's unused names (MTP keys and a tied lm_head excluded)."""
        if expected is None:
            expected = N.expected_tensors(self.config, include_lm_head=self.lm_head_name == N.LM_HEAD)
        missing, wrong = [], []
        for name, (shape, dtype) in expected.items():
            dtype = N._torch_dtype(dtype)
            ref = self._refs.get(name)
            if ref is None:
                missing.append((name, tuple(shape), dtype))
            elif tuple(ref.shape) != tuple(shape) or ref.dtype != dtype:
                wrong.append((ref, tuple(shape), dtype))
        if missing:
            name, shape, dtype = missing[0]
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise CheckpointError(
                f"{self._where()}: tensor {name!r}{more} missing; expected shape {list(shape)} "
                f"{_dt(dtype)} from {self.path}/config.json, found no such tensor among "
                f"{len(self._refs)}. Check that config.json belongs to these weights "
                f"(num_hidden_layers, moe_* fields), or re-download the missing shard")
        if wrong:
            ref, shape, dtype = wrong[0]
            more = f" ({len(wrong) - 1} more tensors differ too)" if len(wrong) > 1 else ""
            if tuple(ref.shape) == shape:
                hint = ("the weights are stored in another dtype than config.json's torch_dtype says; "
                        "fix config.json or re-export the checkpoint")
            else:
                hint = ("config.json does not describe these weights (check hidden_size, intermediate_size, "
                        "head_dim, num_key_value_heads, moe_* fields) or the file belongs to another model")
            raise CheckpointError(
                f"{ref.file}: tensor {ref.name!r}: expected shape {list(shape)} {_dt(dtype)}, found "
                f"{list(ref.shape)} {_dt(ref.dtype)}{more}; {hint}")
        return [n for n in self._refs if n not in expected and not N.is_ignored(n) and n != N.LM_HEAD]

    # ---- reading --------------------------------------------------------------------------
    def read(self, name: str, out: torch.Tensor | None = None, device=None, dtype: torch.dtype | None = None,
             release: bool = False) -> torch.Tensor:
        """Tensor `name` copied out of the file (the result does not keep the mmap alive).
        `out`: copy into it (any device, dtype converted; same number of elements);
        otherwise a new tensor on `device` in `dtype`. `release`: drop its pages afterwards."""
        ref = self.ref(name)
        if out is None:
            out = torch.empty(ref.shape, dtype=dtype or ref.dtype, device=device or "cpu")
        else:
            if dtype is not None and out.dtype != dtype:
                raise ValueError(f"read({name!r}): out is {out.dtype} but dtype={dtype} was asked for")
            if out.numel() != ref.numel:
                raise ValueError(f"read({name!r}): out has shape {list(out.shape)}, the tensor has "
                                 f"{list(ref.shape)}; they need the same number of elements")
        src = self._source(ref)
        if src.shape != out.shape:
            src = src.view(out.shape)
        return self._land(name, src, out, release)

    def _land(self, name: str, src: torch.Tensor, out: torch.Tensor, release, span=None) -> torch.Tensor:
        """Copy `src` (over the mapping) into `out`, then release the tensor's pages if asked
        (only bytes [start, stop) of the tensor's data when `span` is given)."""
        if out.device.type != "cpu" and out.dtype != src.dtype:
            # torch would convert on the host into a full-size temporary; convert on the device instead
            out.copy_(src.to(out.device))
        else:
            out.copy_(src)
        del src
        if release and span is not None:
            ref = self._refs[name]
            self._shards[ref.file].drop_pages(ref.offset + span[0], span[1] - span[0])
        elif release:
            self.release(name)
        return out

    def read_slice(self, name: str, out: torch.Tensor, dim: int, start: int, stop: int,
                   release: bool = False) -> torch.Tensor:
        """Rows (dim 0) or columns (dim 1) [start, stop) of tensor `name` into `out` (shape of the
        slice; any device, dtype converted). Only the slice's bytes are read from the mapping:
        a row range is one contiguous span, a column range one span per row. `release` drops the
        pages of a row range alone (a tensor read block by block keeps the rest of its pages),
        and of the whole tensor for a column range (it touched every row)."""
        ref = self.ref(name)
        shape = list(ref.shape)
        if not (0 <= dim < len(shape) and 0 <= start <= stop <= shape[dim]):
            raise ValueError(f"read_slice({name!r}): [{start}, {stop}) on dim {dim} is outside shape {shape}")
        shape[dim] = stop - start
        if tuple(out.shape) != tuple(shape):
            raise ValueError(f"read_slice({name!r}): out has shape {list(out.shape)}, the slice is {shape}")
        if out.numel() == 0:
            return out
        mm = self._shards[ref.file].map()
        item = ref.dtype.itemsize
        if ref.offset % item == 0:   # a strided view over the mapping: copy_ touches only the slice
            src = torch.frombuffer(mm, dtype=ref.dtype, count=ref.numel, offset=ref.offset)
            src = src.view(ref.shape).narrow(dim, start, stop - start)
        else:                        # unaligned: gather the slice's bytes, then reinterpret
            raw = torch.frombuffer(mm, dtype=torch.uint8, count=ref.nbytes, offset=ref.offset)
            raw = raw.view(*ref.shape[:-1], ref.shape[-1] * item)
            last = dim == len(ref.shape) - 1
            src = raw.narrow(dim, start * item if last else start, (stop - start) * (item if last else 1))
            src = src.contiguous().view(ref.dtype)
        row_bytes = ref.nbytes // ref.shape[0]
        span = (start * row_bytes, stop * row_bytes) if dim == 0 else None
        return self._land(name, src.reshape(shape), out, release, span)

    def pread(self, name: str, out: torch.Tensor, start: int = 0, release: bool = False) -> torch.Tensor:
        """Bytes [start, start + out.nbytes) of tensor `name`'s data into `out` (contiguous CPU,
        its dtype taken as is) by pread, not through the mapping: one large read instead of a page
        fault per page, for streaming big tensors block by block. `release` drops those pages."""
        ref = self.ref(name)
        n = out.numel() * out.element_size()
        if not out.is_contiguous() or out.device.type != "cpu":
            raise ValueError(f"pread({name!r}): out must be a contiguous CPU tensor")
        if not 0 <= start <= start + n <= ref.nbytes:
            raise ValueError(f"pread({name!r}): bytes [{start}, {start + n}) are outside the tensor's {ref.nbytes}")
        try:
            return pread_into(self._shards[ref.file].descriptor(), ref.offset + start, out, ref.file, release)
        except ShortReadError as e:
            raise CheckpointError(str(e)) from None

    def view(self, name: str) -> torch.Tensor:
        """Zero-copy CPU tensor over the mapped file. It keeps the mapping alive (even past close())
        until it is freed; writes to it stay private to this process (copy-on-write), and a
        release() of its range discards such writes."""
        ref = self.ref(name)
        self._shards[ref.file].viewed = True
        return self._source(ref)

    def _source(self, ref: TensorRef) -> torch.Tensor:
        if ref.numel == 0:
            return torch.empty(ref.shape, dtype=ref.dtype)
        mm = self._shards[ref.file].map()
        if ref.offset % ref.dtype.itemsize == 0:
            t = torch.frombuffer(mm, dtype=ref.dtype, count=ref.numel, offset=ref.offset)
        else:
            # safetensors does not align data; kernels may assume aligned elements, so copy once
            t = torch.frombuffer(mm, dtype=torch.uint8, count=ref.nbytes, offset=ref.offset).clone().view(ref.dtype)
        return t.view(ref.shape)

    # ---- page cache -----------------------------------------------------------------------
    def release(self, name_or_file: str | None = None) -> None:
        """Drop the pages behind a tensor (by name), a shard (path or file name), or all files,
        from this mapping (madvise DONTNEED) and the page cache (posix_fadvise DONTNEED).
        Later reads still work: they fault the pages back in from disk."""
        if name_or_file is None:
            spans = [(f, 0, os.path.getsize(f)) for f in self._shards]
        elif name_or_file in self._refs:
            r = self._refs[name_or_file]
            spans = [(r.file, r.offset, r.nbytes)]
        else:
            f = self._file(name_or_file)
            spans = [(f, 0, os.path.getsize(f))]
        for f, start, length in spans:
            if length:
                self._shards[f].drop_pages(start, length)

    def _file(self, name: str) -> str:
        for f in self._shards:
            if name in (f, os.path.basename(f)):
                return f
        raise CheckpointError(f"{self._where()}: {name!r} is neither a tensor nor a file of this checkpoint")

    def close(self) -> None:
        for s in self._shards.values():
            s.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return (f"<Checkpoint {self.path}: {len(self._refs)} tensors in {len(self._shards)} files, "
                f"{self.total_bytes / 2**30:.2f} GiB>")

    def _where(self) -> str:
        if self.index:
            return self.index
        return self.files[0] if len(self._shards) == 1 else self.path


def _scan(path: str) -> tuple[dict[str, TensorRef], str | None]:
    """All tensor refs of the directory, from the index or the safetensors files it holds."""
    index = os.path.join(path, INDEX)
    if os.path.exists(index):
        refs = _scan_index(path, index)
    else:
        index = None
        files = ([SINGLE] if os.path.exists(os.path.join(path, SINGLE))
                 else sorted(f for f in os.listdir(path) if f.endswith(".safetensors")))
        if not files:
            raise CheckpointError(f"{path}: no {SINGLE}, {INDEX} or *.safetensors files; expected an "
                                  f"ERNIE-4.5 -PT checkpoint in Hugging Face safetensors format")
        refs = {}
        for fname in files:
            for name, ref in read_header(os.path.join(path, fname)).items():
                if name in refs:
                    raise CheckpointError(f"{path}: tensor {name!r} is in both {os.path.basename(refs[name].file)} "
                                          f"and {fname}; keep one set of shards or add an {INDEX}")
                refs[name] = ref
    paddle = next((n for n in refs if N.is_paddle_name(n)), None)
    if paddle is not None:
        raise PaddleFormatError(
            f"{path}: this is a Paddle-format ERNIE-4.5 checkpoint (tensor {paddle!r}; `ernie.` prefix, fused "
            f"qkv_proj/up_gate_proj). ernie-hal loads the Hugging Face -PT checkpoints: download the "
            f"baidu/ERNIE-4.5-...-PT repository instead of the -Paddle one")
    return refs, index


def _scan_index(path: str, index: str) -> dict[str, TensorRef]:
    try:
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f).get("weight_map")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise CheckpointError(f"{index}: expected a JSON object with a weight_map, found invalid data ({e}); "
                              f"re-download it") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index}: expected 'weight_map' to map tensor names to file names, "
                              f"found {type(weight_map).__name__}; re-download it")
    headers = {}
    for fname in dict.fromkeys(weight_map.values()):
        if not _plain_name(fname):
            name = next(n for n, f in weight_map.items() if f == fname)
            raise CheckpointError(f"{index}: weight_map puts tensor {name!r} in {fname!r}, expected a plain file "
                                  f"name inside {path} (no directories, no '..', not absolute); the index is "
                                  f"damaged or hostile — re-download it")
        fpath = os.path.join(path, fname)
        if not os.path.isfile(fpath):
            wanted = [n for n, f in weight_map.items() if f == fname]
            raise CheckpointError(
                f"{index}: weight_map puts {len(wanted)} tensors (e.g. {wanted[0]!r}) in {fname}, expected that "
                f"file in {path}, found none; the download is incomplete — fetch {fname} again")
        headers[fname] = read_header(fpath)
    refs = {}
    for name, fname in weight_map.items():
        ref = headers[fname].get(name)
        if ref is None:
            raise CheckpointError(
                f"{index}: weight_map says tensor {name!r} is in {fname}, expected it in that file's header, "
                f"found {len(headers[fname])} other tensors; the index and the shards come from "
                f"different downloads — re-download them together")
        refs[name] = ref
    return refs


def _plain_name(fname: str) -> bool:
    """A file name that stays inside the checkpoint directory when joined to it (symlinks inside,
    as the Hugging Face cache makes them, are fine: the name is what the index controls)."""
    return (bool(fname) and fname not in (".", "..") and "/" not in fname and "\\" not in fname
            and "\0" not in fname and os.path.basename(fname) == fname and not os.path.isabs(fname))


def _dt(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")

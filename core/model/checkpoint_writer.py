"""write_random_checkpoint: a random-weight -PT checkpoint that transformers can load too.

Streaming: every shard's header is written first (all shapes are known from the config), then
each tensor is generated chunk by chunk and appended, so a checkpoint larger than RAM can be
written. Values depend only on (seed, tensor name), never on the shard layout.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import uuid
import zlib

import torch

from . import names as N
from ..atomic import write_json
from .config import DTYPE_NAMES, ModelConfig
from .checkpoint_reader import DTYPE_TO_SAFETENSORS, INDEX, SINGLE

GiB = 2**30
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9   # Hugging Face's default "5GB"
CHUNK = 1 << 22                        # elements per generation step; fixed, it shapes the random stream


def init_params(name: str) -> tuple[float, float]:
    """(mean, std) of the normal each tensor is drawn from."""
    if name.endswith("layernorm.weight") or name == N.FINAL_NORM:
        return 1.0, 0.05        # ones with a little noise, so a wrong norm weight changes the output
    if name.endswith("e_score_correction_bias"):
        return 0.0, 0.01        # small: shifts expert selection a little, never dominates it
    return 0.0, 0.02            # linears, embedding, router (the HF initializer_range)


def tensor_seed(seed: int, name: str) -> int:
    # 32 bits: torch's CPU generator (mt19937) ignores the upper half of a 64-bit seed
    return zlib.crc32(f"{seed}/{name}".encode())


def _chunks(name: str, numel: int, dtype: torch.dtype, seed: int):
    """The tensor's values, CHUNK elements at a time, already cast to `dtype`."""
    g = torch.Generator().manual_seed(tensor_seed(seed, name))
    mean, std = init_params(name)
    buf = torch.empty(min(CHUNK, numel), dtype=torch.float32)
    for start in range(0, numel, CHUNK):
        part = buf[:min(CHUNK, numel - start)].normal_(mean, std, generator=g)
        yield part.to(dtype)


def random_tensor(name: str, shape, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """The exact tensor write_random_checkpoint stores under `name` (for tests and tools)."""
    numel = 1
    for s in shape:
        numel *= s
    parts = list(_chunks(name, numel, dtype, seed))
    return (torch.cat(parts) if parts else torch.empty(0, dtype=dtype)).view(tuple(shape))


def plan_shards(tensors: dict, max_shard_bytes: int) -> list[list[tuple]]:
    """Greedy split in model order into shards of at most max_shard_bytes (a bigger tensor gets its
    own shard). Each entry is (name, shape, dtype, nbytes)."""
    shards, size = [[]], 0
    for name, (shape, dtype) in tensors.items():
        nbytes = dtype.itemsize
        for s in shape:
            nbytes *= s
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, tuple(shape), dtype, nbytes))
        size += nbytes
    # widest dtype first within a shard, so every tensor starts aligned to its element size
    return [sorted(s, key=lambda e: -e[2].itemsize) for s in shards]


def shard_header(entries: list[tuple]) -> bytes:
    """8-byte length + JSON header of one shard, padded so the data starts 8-byte aligned."""
    header, off = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, dtype, nbytes in entries:
        header[name] = {"dtype": DTYPE_TO_SAFETENSORS[dtype], "shape": list(shape), "data_offsets": [off, off + nbytes]}
        off += nbytes
    js = json.dumps(header, separators=(",", ":")).encode()
    js += b" " * (-len(js) % 8)
    return struct.pack("<Q", len(js)) + js


def write_random_checkpoint(config: ModelConfig, out_dir: str, seed: int = 0, dtype="bfloat16",
                            max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, progress=None,
                            overwrite: bool = False) -> str:
    """Write config.json, generation_config.json and the safetensors (one model.safetensors, or
    shards plus model.safetensors.index.json) into `out_dir`, which appears all at once.
    `progress(nbytes)` is called as tensor bytes are written. Returns the absolute out_dir."""
    dtype_name = DTYPE_NAMES.get(str(dtype).replace("torch.", ""))
    if dtype_name is None:
        raise ValueError(f"dtype {dtype!r} is not supported; choose bfloat16, float16 or float32")
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, found {max_shard_bytes}")
    config = config.replace(dtype=dtype_name)
    out_dir = os.path.abspath(os.fspath(out_dir))
    check_replaceable(out_dir, overwrite)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    remove_stale_staging(parent)
    tensors = N.expected_tensors(config)
    shards = plan_shards(tensors, max_shard_bytes)
    total = sum(e[3] for s in shards for e in s)
    free = shutil.disk_usage(parent).free
    if total > free:
        raise OSError(f"{out_dir}: the checkpoint needs {total / GiB:.2f} GiB, {free / GiB:.2f} GiB free "
                      f"on that disk; choose another output directory")

    staging = _sibling(out_dir, "tmp")
    os.mkdir(staging)     # not mkdtemp: its 0700 mode would become the checkpoint's
    try:
        write_json(os.path.join(staging, "config.json"), config.to_hf_dict())
        write_json(os.path.join(staging, "generation_config.json"),
                    {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
                     "pad_token_id": config.pad_token_id})
        files = [SINGLE] if len(shards) == 1 else [
            f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        for fname, entries in zip(files, shards):
            _write_shard(os.path.join(staging, fname), entries, seed, progress)
        if len(shards) > 1:
            weight_map = {e[0]: f for f, s in zip(files, shards) for e in s}
            write_json(os.path.join(staging, INDEX), {
                "metadata": {"total_size": total},
                "weight_map": {n: weight_map[n] for n in tensors}})
        _move_into_place(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def _write_shard(path: str, entries: list[tuple], seed: int, progress) -> None:
    with open(path, "wb") as f:
        f.write(shard_header(entries))
        for name, shape, dtype, nbytes in entries:
            for part in _chunks(name, nbytes // dtype.itemsize, dtype, seed):
                f.write(part.view(torch.uint8).numpy())   # buffer protocol: no bytes() copy
                if progress is not None:
                    progress(part.numel() * dtype.itemsize)


def check_replaceable(out_dir: str, overwrite: bool) -> None:
    """Raise unless `out_dir` may become the checkpoint: absent, an empty directory, or (with
    overwrite) a directory that already holds a checkpoint. Anything else is someone's data."""
    if not os.path.lexists(out_dir):
        return
    if os.path.islink(out_dir) or not os.path.isdir(out_dir):
        raise FileExistsError(f"{out_dir} exists and is not a directory; choose another output directory")
    if not os.listdir(out_dir):
        return
    if not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty; choose another output directory "
                              f"or pass overwrite=True (--overwrite)")
    try:
        ModelConfig.from_file(os.path.join(out_dir, "config.json"))
    except ValueError as e:
        raise FileExistsError(f"{out_dir} does not hold an ERNIE-4.5 checkpoint ({e}); --overwrite replaces only "
                              f"a checkpoint directory, so nothing was deleted — choose another output "
                              f"directory") from None


# .NAME.tmp-PID-HEX (being written) and .NAME.old-PID-HEX (the replaced checkpoint, for an
# instant): the writer's pid in the name tells a later writer whether it is still alive
_STAGING = re.compile(r"^\.(.+)\.(tmp|old)-(\d+)-[0-9a-f]{12}$")


def remove_stale_staging(parent: str) -> list:
    """Delete the staging directories that killed writers left in `parent` (their pid is gone);
    a replaced checkpoint whose replacement never arrived is put back. Returns the paths handled."""
    done = []
    try:
        names = os.listdir(parent)
    except OSError:
        return done
    for name in names:
        m = _STAGING.match(name)
        path = os.path.join(parent, name)
        if not m or not os.path.isdir(path) or os.path.islink(path) or _alive(int(m.group(3))):
            continue
        target = os.path.join(parent, m.group(1))
        if m.group(2) == "old" and not os.path.lexists(target):
            os.rename(path, target)      # killed between the two renames: the old one is all there is
        else:
            shutil.rmtree(path, ignore_errors=True)
        done.append(path)
    return done


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True       # exists (another user's), or cannot tell: leave it alone
    return True


def _sibling(out_dir: str, tag: str) -> str:
    return os.path.join(os.path.dirname(out_dir),
                        f".{os.path.basename(out_dir)}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:12]}")


def _move_into_place(staging: str, out_dir: str) -> None:
    """Rename staging to out_dir; an existing out_dir (empty, or overwrite=True) is replaced."""
    if not os.path.exists(out_dir):
        os.rename(staging, out_dir)
        return
    old = _sibling(out_dir, "old")
    os.rename(out_dir, old)
    try:
        os.rename(staging, out_dir)
    except BaseException:
        os.rename(old, out_dir)
        raise
    if os.path.isdir(old):
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.remove(old)

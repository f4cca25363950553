"""Random-weight checkpoints made by ernie-hal itself: the embedded default model and presets.

They are written atomically (temp dir, then rename) into the user cache dir on first use,
with a byte-level tokenizer so `generate` works on them. Their text is noise: random weights.
"""

from __future__ import annotations

import os
import shutil

from .checkpoint_writer import (_move_into_place, _sibling, check_replaceable, remove_stale_staging,
                                write_random_checkpoint)
from .config import PRESETS, preset

DEFAULT_PRESET = "tiny-moe"
DEFAULT_SEED = 0
FORMAT_VERSION = 1   # bump when the writer's output changes, so stale caches are not reused


def cache_dir() -> str:
    root = os.environ.get("ERNIE_HAL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "ernie-hal")
    return root


def make_random_model(config, out_dir: str, seed: int = 0, dtype: str = "bfloat16",
                      overwrite: bool = False, progress=None, max_shard_bytes: int | None = None) -> str:
    """Checkpoint + byte tokenizer, appearing at `out_dir` all at once or not at all."""
    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    check_replaceable(out_dir, overwrite)      # before anything is written or deleted
    os.makedirs(parent, exist_ok=True)
    remove_stale_staging(parent)
    staging = _sibling(out_dir, "tmp")
    os.mkdir(staging)
    try:
        inner = os.path.join(staging, "model")
        kwargs = {} if max_shard_bytes is None else {"max_shard_bytes": max_shard_bytes}
        write_random_checkpoint(config, inner, seed=seed, dtype=dtype, progress=progress, **kwargs)
        from .tokenizer import write_byte_tokenizer
        write_byte_tokenizer(inner)
        _move_into_place(inner, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def random_model_path(name: str = DEFAULT_PRESET, seed: int = DEFAULT_SEED, progress=None) -> str:
    """The cached random-weight checkpoint of preset `name`, written on first use."""
    config = preset(name)
    path = os.path.join(cache_dir(), f"random-{name}-seed{seed}-v{FORMAT_VERSION}")
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    need = _approx_bytes(config)
    os.makedirs(cache_dir(), exist_ok=True)
    free = shutil.disk_usage(cache_dir()).free
    if need > free:
        raise OSError(f"preset {name!r} needs {need / 2**30:.1f} GiB on disk, {free / 2**30:.1f} GiB free "
                      f"under {cache_dir()}; set ERNIE_HAL_CACHE to a larger disk")
    return make_random_model(config, path, seed=seed, progress=progress)


def is_preset(name: str) -> bool:
    return name.lower() in PRESETS


def _approx_bytes(config) -> int:
    from .graph import build
    return build(config).total_bytes

"""pread_into: fill a host tensor from a file with os.preadv, optionally dropping the pages read.

Large reads into memory the caller owns: no page fault per 4 KiB page as with a mapping, and
`release` (posix_fadvise DONTNEED) keeps a checkpoint larger than RAM out of the page cache.
"""

from __future__ import annotations

import os

import torch


class ShortReadError(ValueError):
    """The file ended before the bytes asked for."""


def pread_into(fd: int, offset: int, out: torch.Tensor, path: str = "file", release: bool = False) -> torch.Tensor:
    """Bytes [offset, offset + out.nbytes) of `fd` into `out` (contiguous, CPU, any dtype)."""
    n = out.numel() * out.element_size()
    if n == 0:
        return out
    mv, pos = memoryview(out.reshape(-1).view(torch.uint8).numpy()), 0
    while pos < n:
        got = os.preadv(fd, [mv[pos:]], offset + pos)
        if got <= 0:
            raise ShortReadError(f"{path}: truncated file: expected {n} bytes at offset {offset}, the file ends "
                                 f"after {pos}; re-download it")
        pos += got
    if release and hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, offset, n, os.POSIX_FADV_DONTNEED)
    return out

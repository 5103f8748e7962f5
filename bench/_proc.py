"""This process's memory as Linux's /proc reports it, for the benches that
measure a peak: the current and peak resident set, and resetting the peak."""

from __future__ import annotations

from pathlib import Path


def status_kib(field: str) -> int | None:
    """``VmRSS`` (now) or ``VmHWM`` (peak since the last reset) in KiB; None
    where /proc/self/status lacks it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux >= 4.0); False if refused."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True

"""glibc's malloc told to keep freed memory, for processes that train.

By default glibc returns large freed blocks (``mmap``-ed ones, and the heap's
top above its trim threshold) to the kernel; a training step frees its
activations and the next step allocates them again, so every step faults
tens of thousands of pages back in. On this project's CPU benchmarks that
cost the CNN's plain step 0.088 s against 0.076 s, and up to 1 s of a 4.5 s
transformer step (docs/benchmarks.md, "the split rule's step gap was the
allocator"). Keeping freed blocks makes a step reuse its memory, as a caching
allocator does; the price is that the process's RSS stays at its peak.
``kronlink train`` then ran the CNN 19% faster and the transformer 5% faster
at the same peak memory (docs/benchmarks.md, "the allocator in training").

Only the worker and the training CLIs call this (``KRONLINK_KEEP_FREED_MEMORY``);
the API service does not, its memory should shrink back after a load spike.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging

__all__ = ["keep_freed_memory", "kept"]

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_DONE = False


def keep_freed_memory() -> bool:
    """``mallopt(M_MMAP_MAX, 0)`` (no ``mmap`` for large blocks) and
    ``mallopt(M_TRIM_THRESHOLD, 2³¹-1)`` (never trim the heap's top): True
    when glibc took both (once per process), False where there is no glibc
    (musl, macOS), which then keeps its own behaviour."""
    global _DONE
    if _DONE:
        return True
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        _DONE = bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
        )
    if _DONE:
        log.info("malloc keeps freed memory (no trimming, no mmap for large blocks)")
    return _DONE


def kept() -> bool:
    """Whether this process already keeps freed memory (a spawned child does
    not inherit ``mallopt``; the experiment runner passes this on)."""
    return _DONE

"""Helpers shared by the commands: seeded subsets, task splits, progress bars."""

from __future__ import annotations

import random
import sys


def subset(queries: list, limit: int | None, seed: int) -> list:
    """A deterministic subset: the order of the task file is shuffled with
    ``seed`` first, so a limit does not keep only the first codes of a chapter."""
    if limit is None or limit >= len(queries):
        return list(queries)
    picked = list(queries)
    random.Random(seed).shuffle(picked)
    return picked[:limit]


def progress_bar(total: int, desc: str, unit: str = "it"):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, leave=True)


def keep_freed_memory_if_set() -> None:
    """Training commands: glibc keeps freed memory unless
    ``KRONLINK_KEEP_FREED_MEMORY`` is false (kronlink/_malloc.py)."""
    from kronlink._malloc import keep_freed_memory
    from kronlink.settings import Settings

    if Settings().keep_freed_memory:
        keep_freed_memory()


def load_split(task_dir: str, split: str, limit: int | None, seed: int):
    """The task and a seeded subset of one of its splits."""
    from kronlink.data.io import load_task

    task = load_task(task_dir)
    return task, subset(task.split(split), limit, seed)


def port_number(text: str) -> int:
    """argparse type for a TCP port: 1 to 65535, said so when it is not."""
    import argparse

    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 1 to 65535, got {port}")
    return port

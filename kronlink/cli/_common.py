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


def load_split(task_dir: str, split: str, limit: int | None, seed: int):
    """The task and a seeded subset of one of its splits."""
    from kronlink.data.io import load_task

    task = load_task(task_dir)
    return task, subset(task.split(split), limit, seed)

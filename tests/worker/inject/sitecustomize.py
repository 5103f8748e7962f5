"""Fault injection for test_kill_phases.py, loaded only by worker processes the
test starts (this folder is put first on their PYTHONPATH).

With KRONLINK_TEST_PAUSE_AT=<phase> the worker, on reaching that phase, writes
KRONLINK_TEST_MARKER and sleeps, so the test can SIGKILL it at a known point.
The kill is real; only the pause is injected. Phases:

- train: inside run_update's training call
- curvature: inside the new task's curvature estimation
- write: after the model folder is stored, before the task state is
- commit: inside the commit transaction, after the version row is inserted
- delete: after the commit, before the staged data is deleted
"""

from __future__ import annotations

import os
import time
from pathlib import Path

_AT = os.environ.get("KRONLINK_TEST_PAUSE_AT")
_MARKER = os.environ.get("KRONLINK_TEST_MARKER")


def _pause() -> None:
    Path(_MARKER).write_text(str(os.getpid()))
    time.sleep(3600)


def _after(fn):
    def wrapped(*args, **kwargs):
        out = fn(*args, **kwargs)
        _pause()
        return out

    return wrapped


def _before(fn):
    def wrapped(*args, **kwargs):
        _pause()
        return fn(*args, **kwargs)

    return wrapped


def _install() -> None:
    if _AT == "train":
        import kronlink.update.job as upd

        upd.train = _before(upd.train)
    elif _AT == "curvature":
        import kronlink.update.job as upd

        upd.estimate_curvature = _before(upd.estimate_curvature)
    elif _AT == "write":
        from kronlink.registry import ArtifactStore

        ArtifactStore.put_dir = _after(ArtifactStore.put_dir)
    elif _AT == "commit":
        import worker.steps as steps

        steps.create_version = _after(steps.create_version)
    elif _AT == "delete":
        import worker.job as job

        job.delete_staged = _before(job.delete_staged)
    else:
        raise SystemExit(f"KRONLINK_TEST_PAUSE_AT: unknown phase {_AT!r}")


if _AT and _MARKER:
    _install()

"""A pause for the fault tests, loaded only by worker processes they start
(this folder first on their PYTHONPATH, KRONLINK_TEST_GATE set).

The first job to enter training writes ``<gate>.reached`` and waits until
``<gate>.release`` exists, so a test can stop Redis or PostgreSQL while the
worker is known to be busy training. Only the pause is injected; the faults
(servers stopped, restarted) are real. One-shot: later attempts and jobs run
through, so a retried job is not held again.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

_GATE = os.environ.get("KRONLINK_TEST_GATE")


def _install(gate: str) -> None:
    import kronlink.update.job as upd

    reached, release = Path(gate + ".reached"), Path(gate + ".release")
    train = upd.train

    def gated(*args, **kwargs):
        if not reached.exists():
            reached.write_text(str(os.getpid()))
            deadline = time.monotonic() + 300  # a test that died must not leave it forever
            while not release.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
        return train(*args, **kwargs)

    upd.train = gated


if _GATE:
    _install(_GATE)

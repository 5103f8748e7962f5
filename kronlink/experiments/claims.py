"""Claims on runs, so that processes sharing one results folder (runs side by
side, or two ``kronlink experiment`` invocations) never compute the same run
or curvature state at once.

A claim is an exclusive ``flock`` on ``<results>/claims/<name>.lock``. The
kernel drops the lock when its holder's file descriptor closes, including when
the process is killed, so a claim is never left behind by a dead run and
needs no pid check or staleness timeout. Lock files are kept, never deleted:
unlinking one while another process waits on it would let a third process
lock a fresh file of the same name, and two would hold "the same" claim.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from kronlink.errors import KronlinkError

__all__ = ["Busy", "Claims"]


class Busy(KronlinkError):
    """Another process holds the claim: it is computing that run now."""

    def __init__(self, name: str) -> None:
        super().__init__(f"{name} is being computed by another process")
        self.name = name


class Claims:
    """Exclusive, re-entrant (within a process) claims by name."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self._held: set[str] = set()

    def path(self, name: str) -> Path:
        return self.folder / f"{name}.lock"

    @contextmanager
    def hold(self, name: str, *, wait: bool = False) -> Iterator[None]:
        """Hold the claim ``name`` for the block. ``wait=False`` raises
        ``Busy`` at once if another process holds it; ``wait=True`` blocks."""
        if name in self._held:
            # flock conflicts between two descriptors of one process too: a
            # run that re-runs a pruned parent under its own claim must not
            # lock itself out.
            yield
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path(name), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                raise Busy(name) from None
            # For a person looking at the folder; the lock itself is the truth.
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            self._held.add(name)
            try:
                yield
            finally:
                self._held.discard(name)
        finally:
            os.close(fd)  # releases the lock

    def wait_free(self, name: str, deadline: float | None = None, poll: float = 0.1) -> bool:
        """Block until nobody holds ``name`` (True), or until ``deadline``
        (``time.monotonic()``) passes (False). Holds nothing afterwards."""
        while True:
            try:
                with self.hold(name):
                    return True
            except Busy:
                if deadline is not None and time.monotonic() >= deadline:
                    return False
                if deadline is None:
                    with self.hold(name, wait=True):
                        return True
                time.sleep(poll)

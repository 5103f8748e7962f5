"""One claimed job while it runs: its progress reports, its heartbeat, its ending."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kronlink.contract import UpdateJobSpec
from kronlink.registry import JobInfo, JobState, LeaseLostError, heartbeat, update_progress

if TYPE_CHECKING:
    from worker.job import JobContext

__all__ = ["Ending", "Run", "timed"]

log = logging.getLogger("worker.job")


class Ending(Exception):
    """Ends the job early with a state and an error message."""

    def __init__(self, state: JobState, error: str | None) -> None:
        super().__init__(error)
        self.state = state
        self.error = error


@dataclass
class Run:
    """One claimed job while it runs."""

    ctx: JobContext
    job: JobInfo
    spec: UpdateJobSpec
    staged: Path
    timings: dict[str, float] = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)
    cancel: threading.Event = field(default_factory=threading.Event)
    lost: threading.Event = field(default_factory=threading.Event)
    activated: int | None = None  # the version the commit activated, for the notice
    _last_progress: float = 0.0
    _phase: str | None = None

    # -- job-row reports ----------------------------------------------------
    def set_phase(self, phase: str) -> None:
        self._phase = phase
        self._write(phase=phase, progress={"message": f"{phase} started"})

    def on_progress(self, p: Any) -> None:
        """Throttled: at most one write per ``progress_interval_s``, and every phase change."""
        now = time.monotonic()
        changed = p.phase != self._phase
        if not changed and now - self._last_progress < self.ctx.settings.progress_interval_s:
            return
        self._phase = p.phase
        self._last_progress = now
        progress = {
            k: getattr(p, k)
            for k in ("epoch", "step", "total_steps", "loss", "penalty", "dev_accuracy", "message")
        }
        self._write(phase=p.phase, progress=progress)

    def _write(self, **kw: Any) -> None:
        try:
            with self.ctx.factory.begin() as s:
                update_progress(s, self.job.id, owner=self.ctx.owner, **kw)
        except LeaseLostError:
            self.lost.set()
            self.stop.set()
        except Exception as exc:
            # A database hiccup (PostgreSQL restarting) must not end a training
            # run that is fine: progress is a report, the commit is what counts,
            # and the heartbeat keeps the lease meanwhile (or loses it, above).
            log.warning(
                "job %s: progress not recorded (%s: %s)",
                self.job.id,
                type(exc).__name__,
                str(exc).splitlines()[0][:200],
            )

    def should_stop(self) -> bool:
        return self.stop.is_set()

    def check(self) -> None:
        """Between phases: end the job if it was cancelled or its lease was lost."""
        if self.lost.is_set():
            raise Ending(JobState.FAILED, "lease lost")
        if self.cancel.is_set():
            raise Ending(JobState.CANCELLED, "cancelled on request")

    # -- heartbeat thread ----------------------------------------------------
    def heartbeat_loop(self, done: threading.Event) -> None:
        """Extend the lease every ``lease_s / 4`` and pick up a cancel request."""
        while not done.wait(self.ctx.settings.heartbeat_s):
            self.beat()

    def beat(self) -> None:
        try:
            with self.ctx.factory.begin() as s:
                info = heartbeat(
                    s, self.job.id, owner=self.ctx.owner, lease_s=self.ctx.settings.lease_s
                )
        except LeaseLostError:
            self.lost.set()
            self.stop.set()
            return
        except Exception:  # a database hiccup: the next beat retries
            log.warning("job %s: heartbeat failed", self.job.id, exc_info=True)
            return
        if info.cancel_requested:
            self.cancel.set()
            self.stop.set()


@contextmanager
def timed(run: Run, phase: str) -> Iterator[None]:
    """One phase: checked for a cancel or a lost lease first, reported, timed."""
    run.check()
    run.set_phase(phase)
    t0 = time.perf_counter()
    try:
        yield
    finally:
        run.timings[phase] = round(time.perf_counter() - t0, 4)

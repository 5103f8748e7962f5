"""This replica's report to the registry, for the dashboard's serving panel.

Every ``replica_report_s`` the replica reads its own Prometheus metrics (the
ones ``/metrics`` exports), takes the difference from its reading about a
minute before (``WINDOW_S``), and upserts one row: the version it serves per
lineage, requests per second, the share that were errors (5xx) and refused
(4xx), and the latency quantiles of ``/v1/link`` over that window. A replica that stops removes its row; a
killed one ages out of the dashboard's list.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from kronlink.registry import forget_replica, report_replica

if TYPE_CHECKING:
    from service.state import ServiceState

__all__ = ["ReplicaReporter", "Totals", "quantile", "read_totals"]

log = logging.getLogger(__name__)

LINK_ROUTES = ("/v1/link", "/v1/link/batch")
WINDOW_S = 60.0  # the figures are over about this long


@dataclass
class Totals:
    """Cumulative counts read from the metrics at one moment."""

    requests: float = 0.0
    errors: float = 0.0  # 5xx
    refused: float = 0.0  # 4xx
    # /v1/link latency histogram: upper bound -> cumulative count
    link_buckets: dict[float, float] = field(default_factory=dict)


def read_totals(state: ServiceState) -> Totals:
    """The request counter and the link latency histogram, summed over labels."""
    t = Totals()
    for metric in state.metrics.requests.collect():
        for s in metric.samples:
            if not s.name.endswith("_total"):
                continue
            t.requests += s.value
            status = s.labels.get("status", "")
            if status.startswith("5"):
                t.errors += s.value
            elif status.startswith("4"):
                t.refused += s.value
    for metric in state.metrics.latency.collect():
        for s in metric.samples:
            if s.name.endswith("_bucket") and s.labels.get("route") in LINK_ROUTES:
                le = float(s.labels["le"])
                t.link_buckets[le] = t.link_buckets.get(le, 0.0) + s.value
    return t


def quantile(buckets: dict[float, float], q: float) -> float | None:
    """The ``q`` quantile of a cumulative histogram (Prometheus'
    ``histogram_quantile``: linear within the bucket); None when empty."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    rank = q * buckets[bounds[-1]]
    lower, below = 0.0, 0.0
    for upper in bounds:
        count = buckets[upper]
        if count >= rank:
            if upper == float("inf"):
                return lower  # beyond the last finite bound: report that bound
            inside = count - below
            return lower + (upper - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = upper, count
    return lower


class ReplicaReporter:
    def __init__(self, state: ServiceState, interval_s: float) -> None:
        self.state = state
        self.interval_s = interval_s
        self.id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.started_at = datetime.now(UTC)
        self._readings: deque[tuple[float, Totals]] = deque()

    def status(self, now: float) -> dict[str, Any]:
        """This interval's figures (rates over the time since the last call)."""
        totals = read_totals(self.state)
        serving = {}
        for lineage, h in self.state.holders.items():
            v = h.current.version if h.current is not None else None
            serving[lineage] = {"id": v.id, "number": v.number} if v is not None else None
        out: dict[str, Any] = {
            "serving": serving,
            "requests_total": int(totals.requests),
            "window_s": None,
            "requests_per_s": None,
            "error_rate": None,
            "refused_rate": None,
            "link_p50_ms": None,
            "link_p99_ms": None,
        }
        # the oldest reading within the window (at least one interval back)
        while len(self._readings) > 1 and now - self._readings[1][0] >= WINDOW_S:
            self._readings.popleft()
        if self._readings:
            then, before = self._readings[0]
            window = max(now - then, 1e-9)
            requests = totals.requests - before.requests
            out["window_s"] = round(window, 2)
            out["requests_per_s"] = round(requests / window, 3)
            if requests > 0:
                out["error_rate"] = round((totals.errors - before.errors) / requests, 4)
                out["refused_rate"] = round((totals.refused - before.refused) / requests, 4)
            delta = {
                le: c - before.link_buckets.get(le, 0.0) for le, c in totals.link_buckets.items()
            }
            for key, q in (("link_p50_ms", 0.5), ("link_p99_ms", 0.99)):
                value = quantile(delta, q)
                out[key] = round(value * 1000, 2) if value is not None else None
        self._readings.append((now, totals))
        return out

    def report(self, now: float) -> None:
        """Write this replica's row (blocking: call in a thread)."""
        status = self.status(now)
        with self.state.factory.begin() as s:
            report_replica(s, self.id, started_at=self.started_at, status=status)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                await asyncio.to_thread(self.report, loop.time())
            except Exception as exc:  # the database is down: linking goes on, so does this
                log.debug("replica report not written: %s", exc)
            await asyncio.sleep(self.interval_s)

    def forget(self) -> None:
        with contextlib.suppress(Exception), self.state.factory.begin() as s:
            forget_replica(s, self.id)

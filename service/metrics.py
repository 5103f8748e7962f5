"""Prometheus metrics of one app, in a registry of its own (several apps in
one process, as in the tests, do not collide).

``kronlink serve --workers N`` sets ``PROMETHEUS_MULTIPROC_DIR``: every
process then writes its values to files there, and :func:`exposition`
(``/metrics``) sums all processes' files, so a scrape counts every request
whichever process answers it. Gauges say how processes combine
(``multiprocess_mode``; ignored in one process).
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

__all__ = ["Metrics", "exposition", "forget_process"]

_LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
# Paths that label the in-progress gauge as they are; any other counts as "other"
# (a path is caller-chosen text: unbounded as a label).
IN_PROGRESS_PATHS = frozenset({"/v1/link", "/v1/link/batch", "/v1/jobs"})


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "kronlink_http_requests_total",
            "HTTP requests by route template, method and status",
            ["route", "method", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "kronlink_http_request_duration_seconds",
            "Time from request start to the response's last byte",
            ["route", "method", "status"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "kronlink_link_batch_size",
            "Queries per model call (dynamic batching)",
            ["lineage"],
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.batch_seconds = Histogram(
            "kronlink_link_batch_seconds",
            "Wall time of one model call (candidates, encode, forward)",
            ["lineage"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "kronlink_link_queue_queries",
            "Queries waiting for a model call",
            ["lineage"],
            multiprocess_mode="livesum",
            registry=r,
        )
        self.rejected = Counter(
            "kronlink_link_rejected_total",
            "Queries refused because the queue was full (429)",
            ["lineage"],
            registry=r,
        )
        self.active_version = Gauge(
            "kronlink_model_version",
            "Number of the version this replica serves (0: none loaded)",
            ["lineage"],
            multiprocess_mode="livemax",
            registry=r,
        )
        self.active_version_id = Gauge(
            "kronlink_model_version_id",
            "Registry id of the version this replica serves (0: none loaded)",
            ["lineage"],
            multiprocess_mode="livemax",
            registry=r,
        )
        self.swaps = Counter(
            "kronlink_model_swaps_total", "Model swaps completed", ["lineage"], registry=r
        )
        self.load_failures = Counter(
            "kronlink_model_load_failures_total",
            "Versions that failed to load (the previous model kept serving)",
            ["lineage"],
            registry=r,
        )
        self.load_seconds = Histogram(
            "kronlink_model_load_seconds",
            "Fetch (checksum verified), load and warm-up of a version",
            ["lineage"],
            registry=r,
        )
        self.jobs = Gauge(
            "kronlink_jobs",
            "Jobs in the registry by state (at scrape time)",
            ["state"],
            multiprocess_mode="mostrecent",
            registry=r,
        )
        self.in_progress = Gauge(
            "kronlink_http_requests_in_progress",
            "Requests received and not yet answered, by path (the API's own paths; others: other)",
            ["path"],
            multiprocess_mode="livesum",
            registry=r,
        )


def _multiprocess() -> bool:
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


def exposition(metrics: Metrics) -> bytes:
    """The Prometheus text for ``/metrics``: all server processes' sum when several."""
    if not _multiprocess():
        return generate_latest(metrics.registry)
    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    return generate_latest(registry)


def forget_process() -> None:
    """At shutdown: this process's live gauges leave the sums."""
    if _multiprocess():
        mark_process_dead(os.getpid())

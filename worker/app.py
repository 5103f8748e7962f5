"""The Celery app factory and the per-process job context.

    celery -A worker.app worker --pool solo --concurrency 1 -Q kronlink.updates
    kronlink worker            # the same, from settings

Nothing heavy happens at import: the app object holds configuration only
(it connects when the worker starts), torch is imported by the first job,
and CUDA is initialised only inside the job body of the one solo process.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from functools import lru_cache

from celery import Celery, bootsteps
from celery.signals import worker_ready

from kronlink.contract import SWEEP_TASK, UPDATE_TASK
from kronlink.settings import Settings, get_settings

__all__ = ["app", "create_app", "job_context"]

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> Celery:
    """A Celery app for ``settings`` (default: the environment's)."""
    settings = settings or get_settings()
    settings.data_path.mkdir(parents=True, exist_ok=True)
    app = Celery("kronlink", broker=settings.broker, backend=settings.backend, set_as_current=False)
    app.conf.update(
        include=["worker.tasks"],
        task_acks_late=True,  # ack after the job, so a lost worker's job is delivered again
        task_reject_on_worker_lost=True,  # ...bounded by the job row's attempts (max_attempts)
        worker_prefetch_multiplier=1,  # a long job must not hold back messages
        worker_concurrency=1,
        task_track_started=True,
        task_send_sent_event=True,
        worker_send_task_events=True,
        broker_transport_options=settings.transport_options(settings.broker),
        result_backend_transport_options=settings.transport_options(settings.backend),
        broker_connection_retry_on_startup=True,
        result_expires=7 * 24 * 3600,
        task_default_queue=settings.queue,
        task_routes={UPDATE_TASK: {"queue": settings.queue}, SWEEP_TASK: {"queue": settings.queue}},
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        worker_hijack_root_logger=True,
        broker_heartbeat=0,  # the job row has its own heartbeat
        # A broker restart must not cancel a training run (Celery 6 will by
        # default): the job row, not the message, owns the job, and the
        # reconnect sweep (_ResendAfterReconnect) re-sends what the broker lost.
        worker_cancel_long_running_tasks_on_connection_loss=False,
    )
    app.steps["consumer"].add(_ResendAfterReconnect)
    return app


@lru_cache(maxsize=1)
def job_context():
    """The process's database engine, artifact store and identity, built once."""
    from kronlink.registry import ArtifactStore, create_engine_from_url, make_session_factory
    from worker.job import JobContext

    settings = get_settings()
    engine = create_engine_from_url(settings.database)
    settings.staging_path.mkdir(parents=True, exist_ok=True)
    return JobContext(
        settings=settings,
        factory=make_session_factory(engine),
        store=ArtifactStore(settings.artifact_url),
        owner=f"{socket.gethostname()}:{os.getpid()}",
    )


def _sweep_and_resend(when: str) -> None:
    """Sweep, then send every queued job's message again: the broker may have
    lost them (Redis restarted without persistence). A message that survived
    becomes a duplicate, which the job row's claim turns into a no-op."""
    from worker.sweep import sweep

    try:
        report = sweep(job_context())
        log.info("%s sweep: %s", when, report)
        for job_id, lineage in report.queued:
            app.send_task(UPDATE_TASK, kwargs={"job_id": job_id, "lineage": lineage})
    except Exception:
        log.exception("%s sweep failed", when)


class _ResendAfterReconnect(bootsteps.StartStopStep):
    """Runs each time the consumer connects to the broker. The first time is
    the startup sweep's (``worker_ready``); every later one follows a lost
    connection, after which a broker without persistence holds none of the
    queued messages: without a re-send those jobs would stay queued until
    some worker restarted."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, parent: object, **kwargs: object) -> None:
        super().__init__(parent, **kwargs)
        self.connections = 0

    def start(self, parent: object) -> None:
        self.connections += 1
        if self.connections > 1:
            _sweep_and_resend("reconnect")


@worker_ready.connect
def _on_worker_ready(sender=None, **_: object) -> None:
    """At start: glibc keeps freed memory (the solo pool trains in this
    process; kronlink/_malloc.py), sweep stale staged data, recover lost jobs,
    re-send queued ones; then keep sweeping every ``sweep_interval_s`` beside
    the jobs."""
    if get_settings().keep_freed_memory:
        from kronlink._malloc import keep_freed_memory

        keep_freed_memory()
    _sweep_and_resend("startup")
    interval = get_settings().sweep_interval_s
    if interval > 0:
        threading.Thread(
            target=_sweep_forever, args=(interval,), name="kronlink-sweep", daemon=True
        ).start()


def _sweep_forever(interval: float) -> None:
    """Without it, staged data of a dead job and a lost lease wait for the next
    worker start or job. Queued jobs are not re-sent here: their messages are
    in the broker (a broker that lost them is the startup and reconnect
    sweeps' case, ``_sweep_and_resend``), and
    a re-send every interval would pile up duplicates behind a long job. A job
    this sweep requeued is re-sent once: its dead worker consumed its message."""
    from worker.sweep import sweep

    while True:
        time.sleep(interval)
        try:
            report = sweep(job_context())
            if report.staged_deleted or report.recovered or report.orphans_removed:
                log.info("periodic sweep: %s", report)
            for job_id, lineage in report.queued:
                if job_id in report.recovered:
                    app.send_task(UPDATE_TASK, kwargs={"job_id": job_id, "lineage": lineage})
        except Exception:
            log.exception("periodic sweep failed")


app = create_app()

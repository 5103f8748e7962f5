"""What one app instance holds while it runs: database, store, models, batchers.

Built by ``create_app`` (nothing at import time) and started by the app's
lifespan. Collaborators can be passed in (a session factory, an artifact
store, the function that sends broker messages), so tests swap any of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from kronlink.contract import UpdateMessage
from kronlink.notices import publishes
from kronlink.registry import ArtifactStore, create_engine_from_url, make_session_factory
from kronlink.settings import Settings
from service.batching import MicroBatcher
from service.holder import ModelHolder
from service.metrics import Metrics, forget_process
from service.ontologies import OntologyIndexes
from service.replicas import ReplicaReporter
from service.uploads import sweep_uploads

__all__ = ["ServiceState"]

log = logging.getLogger(__name__)


def _set_torch_threads(n: int | None) -> None:
    """Set where the model runs (the model thread), before its first call."""
    if n is not None:
        import torch

        torch.set_num_threads(n)


class ServiceState:
    def __init__(
        self,
        settings: Settings,
        *,
        factory: sessionmaker[Session] | None = None,
        store: ArtifactStore | None = None,
        enqueue: Callable[[UpdateMessage], None] | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self._given_factory = factory
        self._given_store = store
        self._given_enqueue = enqueue
        self.engine: Engine | None = None
        self.factory: sessionmaker[Session]
        self.store: ArtifactStore
        self.enqueue: Callable[[UpdateMessage], None]
        self.holders: dict[str, ModelHolder] = {}
        self.batchers: dict[str, MicroBatcher] = {}
        self.ontologies: OntologyIndexes
        self.executor: ThreadPoolExecutor | None = None
        self._producer: Any = None
        self._nudge = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.db_error: str | None = None
        self.reporter: ReplicaReporter | None = None
        self.started_at = datetime.now(UTC)
        self.loop: asyncio.AbstractEventLoop

    # -- lifecycle -------------------------------------------------------------
    async def start(self) -> None:
        s = self.settings
        self.loop = asyncio.get_running_loop()
        if self._given_factory is None:
            self.engine = create_engine_from_url(s.database)
            self.factory = make_session_factory(self.engine)
        else:
            self.factory = self._given_factory
        self.store = self._given_store or ArtifactStore(s.artifact_url)
        if self._given_enqueue is not None:
            self.enqueue = self._given_enqueue
        else:
            from service.queue import CeleryProducer

            self._producer = CeleryProducer(s)
            self.enqueue = self._producer.send
        s.staging_path.mkdir(parents=True, exist_ok=True)
        sweep_uploads(s.staging_path)
        # One thread runs every model call: the event loop only moves bytes.
        self.executor = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix="kronlink-model",
            initializer=_set_torch_threads,
            initargs=(s.torch_threads,),
        )
        self.ontologies = OntologyIndexes(
            self.factory, self.store, capacity=s.ontologies_cached, settings=s
        )
        for lineage in s.lineage_names:
            holder = ModelHolder(
                lineage,
                factory=self.factory,
                store=self.store,
                device=s.device,
                metrics=self.metrics,
                retry_s=s.model_retry_s,
            )
            self.holders[lineage] = holder
            batcher = MicroBatcher(
                holder,
                self.executor,
                self.metrics,
                max_size=s.batch_max_size,
                max_wait_s=s.batch_max_wait_ms / 1000,
                queue_max=s.batch_queue_max,
                queue_max_s=s.batch_queue_max_ms / 1000,
                exact_margin=s.exact_margin,
                no_match_below=s.no_match_below,
            )
            batcher.start()
            self.batchers[lineage] = batcher
        await self.refresh_models()  # serve at once when a version is active
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._watch(), name="kronlink-model-watcher"))
        if s.replica_report_s > 0:  # the dashboard's serving panel (service/replicas.py)
            self.reporter = ReplicaReporter(self, s.replica_report_s)
            self._tasks.append(loop.create_task(self.reporter.run(), name="kronlink-replica"))
        if publishes(s.broker):
            from service.notify import listen

            self._tasks.append(
                loop.create_task(listen(s.broker, self.nudge), name="kronlink-notifications")
            )

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self.reporter is not None:
            await asyncio.to_thread(self.reporter.forget)
        for b in self.batchers.values():
            await b.stop()
        if self.executor is not None:
            self.executor.shutdown(wait=True, cancel_futures=True)
        if self._producer is not None:
            self._producer.close()
        if self.engine is not None:
            self.engine.dispose()
        forget_process()

    # -- model watching --------------------------------------------------------
    def nudge(self) -> None:
        """Look for a new active version now (an activation, a notification)."""
        self._nudge.set()

    async def refresh_models(self) -> None:
        for holder in self.holders.values():
            try:
                await holder.refresh()
            except Exception as exc:
                msg = f"{type(exc).__name__}: {exc}"
                if msg != self.db_error:  # once per distinct error, not once a second
                    log.error("cannot read the active version of %s: %s", holder.lineage, msg)
                self.db_error = msg
            else:
                if self.db_error is not None:
                    log.info("database reachable again")
                self.db_error = None

    async def _watch(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._nudge.wait(), self.settings.model_poll_s)
            self._nudge.clear()
            await self.refresh_models()

    # -- health ----------------------------------------------------------------
    def ping_database(self) -> str | None:
        """None when the database answers, else the error (blocking: call in a thread)."""
        try:
            with self.factory() as s:
                s.execute(text("SELECT 1"))
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"
        return None

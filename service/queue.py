"""The service's broker producer: sends update messages by task name.

One Celery app for the process's life (its connection pool is reused across
submissions); it never imports ``worker/``, only the task name and message
type from ``kronlink.contract``.
"""

from __future__ import annotations

import threading
from typing import Any

from kronlink.contract import UPDATE_TASK, UpdateMessage
from kronlink.settings import Settings

__all__ = ["CeleryProducer"]


class CeleryProducer:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._app = None
        self._lock = threading.Lock()

    def _get(self):
        from celery import Celery

        with self._lock:  # routes run in a thread pool
            if self._app is None:
                s = self._settings
                app = Celery("kronlink-service", broker=s.broker, set_as_current=False)
                # A broker that is down must fail the request at once (503 with
                # Retry-After), not hold it for seconds of retries: the job row
                # is stored already and a worker's sweep re-sends it.
                timeout = s.broker_connect_timeout_s
                options: dict[str, Any] = dict(s.transport_options(s.broker))
                if s.broker.startswith(("redis://", "rediss://", "sentinel://")):
                    options |= {"socket_connect_timeout": timeout, "max_retries": 0}
                app.conf.broker_transport_options = options
                app.conf.broker_connection_retry_on_startup = True
                app.conf.broker_connection_timeout = timeout
                app.conf.broker_connection_max_retries = 0
                self._app = app
            return self._app

    def send(self, message: UpdateMessage) -> None:
        self._get().send_task(
            UPDATE_TASK, kwargs=message.model_dump(), queue=self._settings.queue, retry=False
        )

    def close(self) -> None:
        with self._lock:
            if self._app is not None:
                self._app.close()
                self._app = None

"""Activation notices over Redis pub/sub, shared by the service and the worker.

Whoever activates a version (an API replica, the worker at the end of a job)
publishes ``{"lineage", "version_id"}`` on :data:`CHANNEL` when the broker is
Redis; the replicas' listeners (``service/notify.py``) then look up the active
version at once instead of at their next registry poll. A notice is a hint:
the poll stays the source of truth, so a lost one costs one ``model_poll_s``.
"""

from __future__ import annotations

import json
import logging

__all__ = ["CHANNEL", "publish", "publishes"]

log = logging.getLogger(__name__)

CHANNEL = "kronlink:activations"


def publishes(url: str) -> bool:
    """Whether ``url`` is a broker that carries notices (Redis)."""
    return url.startswith(("redis://", "rediss://"))


def publish(url: str, lineage: str, version_id: int) -> None:
    """Blocking; errors are logged, never raised (the poll will catch up)."""
    import redis

    try:
        client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        try:
            client.publish(CHANNEL, json.dumps({"lineage": lineage, "version_id": version_id}))
        finally:
            client.close()
    except Exception as exc:
        log.warning("activation notice not published (%s); replicas poll instead", exc)

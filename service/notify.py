"""Activation notices over Redis pub/sub, when the broker is Redis.

An activation through any replica publishes ``{"lineage", "version_id"}`` on
:data:`CHANNEL`; every replica listening looks up the active version at once
instead of at its next poll. The poll stays the source of truth: a lost
notice (Redis restarting, a replica reconnecting) costs at most one
``model_poll_s``. Activations made by the worker are found by the poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable

__all__ = ["CHANNEL", "listen", "publish"]

log = logging.getLogger(__name__)

CHANNEL = "kronlink:activations"


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


async def listen(url: str, on_notice: Callable[[], None]) -> None:
    """Call ``on_notice`` for every notice; reconnects with a growing pause."""
    import redis.asyncio as aioredis

    pause = 1.0
    while True:
        client = aioredis.Redis.from_url(url)
        try:
            pubsub = client.pubsub()
            await pubsub.subscribe(CHANNEL)
            pause = 1.0
            async for message in pubsub.listen():
                if message.get("type") == "message":
                    on_notice()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("activation notices unavailable (%s); retrying in %.0f s", exc, pause)
        finally:
            with contextlib.suppress(Exception):
                await client.aclose()
        await asyncio.sleep(pause)
        pause = min(pause * 2, 60.0)

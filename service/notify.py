"""Activation notices over Redis pub/sub, when the broker is Redis.

An activation through any replica publishes ``{"lineage", "version_id"}`` on
:data:`CHANNEL`; every replica listening looks up the active version at once
instead of at its next poll. The poll stays the source of truth: a lost
notice (Redis restarting, a replica reconnecting) costs at most one
``model_poll_s``, and a listener that subscribes again looks at once.
The worker publishes too when a job activates its version
(``kronlink/notices.py``, shared by both).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from kronlink.notices import CHANNEL, publish

__all__ = ["CHANNEL", "listen", "publish"]

log = logging.getLogger(__name__)


async def listen(url: str, on_notice: Callable[[], None]) -> None:
    """Call ``on_notice`` for every notice; reconnects with a growing pause."""
    import redis.asyncio as aioredis

    pause = 1.0
    subscribed_before = False
    while True:
        client = aioredis.Redis.from_url(url)
        try:
            pubsub = client.pubsub()
            await pubsub.subscribe(CHANNEL)
            pause = 1.0
            if subscribed_before:  # notices sent while we were away are lost: look now
                on_notice()
            subscribed_before = True
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

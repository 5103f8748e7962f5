"""API replicas' reports: each replica upserts one row every few seconds with
what it serves and its request rate, error rate and latency over the last
interval; the dashboard lists the rows seen lately."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from kronlink.registry.models import Replica, utcnow

__all__ = ["ReplicaInfo", "forget_replica", "list_replicas", "report_replica"]


@dataclass(frozen=True)
class ReplicaInfo:
    id: str
    started_at: datetime
    seen_at: datetime
    status: dict[str, Any]


def report_replica(
    session: Session,
    replica_id: str,
    *,
    started_at: datetime,
    status: Mapping[str, Any],
    now: datetime | None = None,
) -> None:
    """Insert or refresh this replica's row."""
    now = now or utcnow()
    row = session.get(Replica, replica_id)
    if row is None:
        session.add(Replica(id=replica_id, started_at=started_at, seen_at=now, status=dict(status)))
    else:
        row.seen_at = now
        row.status = dict(status)
    session.flush()


def list_replicas(
    session: Session, *, seen_within_s: float, now: datetime | None = None
) -> list[ReplicaInfo]:
    """Replicas that reported within ``seen_within_s``, by id."""
    since = (now or utcnow()) - timedelta(seconds=seen_within_s)
    rows = session.scalars(select(Replica).where(Replica.seen_at >= since).order_by(Replica.id))
    return [ReplicaInfo(r.id, r.started_at, r.seen_at, dict(r.status)) for r in rows]


def forget_replica(session: Session, replica_id: str) -> None:
    """A replica that stops cleanly removes its row (a killed one just ages out)."""
    session.execute(delete(Replica).where(Replica.id == replica_id))

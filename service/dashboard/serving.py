"""The dashboard's serving panel: the API replicas that reported lately
(service/replicas.py writes their rows), what each serves and how it goes."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.orm import Session

from kronlink.registry import list_replicas
from service.dashboard.data import _number

__all__ = ["ReplicaRow", "serving_view"]


@dataclass(frozen=True)
class ReplicaRow:
    """An API replica's last report (service/replicas.py)."""

    id: str
    started_at: datetime
    seen_at: datetime
    serving: dict[str, int | None]  # lineage -> version number, None while none is loaded
    requests_per_s: float | None
    error_rate: float | None
    refused_rate: float | None
    link_p50_ms: float | None
    link_p99_ms: float | None
    requests_total: int | None


def serving_view(session: Session, *, seen_within_s: float) -> tuple[ReplicaRow, ...]:
    """The API replicas that reported lately, with what they serve."""
    rows = []
    for r in list_replicas(session, seen_within_s=seen_within_s):
        st = r.status
        serving = {}
        for lineage, v in (st.get("serving") or {}).items():
            serving[str(lineage)] = int(v["number"]) if isinstance(v, dict) else None
        total = _number(st.get("requests_total"))
        rows.append(
            ReplicaRow(
                id=r.id,
                started_at=r.started_at,
                seen_at=r.seen_at,
                serving=serving,
                requests_per_s=_number(st.get("requests_per_s")),
                error_rate=_number(st.get("error_rate")),
                refused_rate=_number(st.get("refused_rate")),
                link_p50_ms=_number(st.get("link_p50_ms")),
                link_p99_ms=_number(st.get("link_p99_ms")),
                requests_total=int(total) if total is not None else None,
            )
        )
    return tuple(rows)

"""Engines, sessions and the per-lineage lock, on SQLite and PostgreSQL.

Nothing here runs at import time: callers build an engine from a URL once per
process (:func:`create_engine_from_url`) and a session factory from it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Engine, create_engine, event, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import URL, make_url
from sqlalchemy.orm import Session, sessionmaker

from kronlink.errors import ConfigError
from kronlink.registry.errors import NotFoundError
from kronlink.registry.models import Lineage, utcnow

__all__ = [
    "create_engine_from_url",
    "default_database_url",
    "lineage_transaction",
    "lock_lineage",
    "make_session_factory",
]

log = logging.getLogger(__name__)

SQLITE_BUSY_TIMEOUT_S = 30.0
_BEGIN_OPTION = "kronlink_sqlite_begin"


def default_database_url(data_dir: str | Path) -> str:
    """The embedded default: ``sqlite:///<data_dir>/kronlink.db``."""
    return f"sqlite:///{Path(data_dir).resolve() / 'kronlink.db'}"


def _normalise(url: str | URL) -> URL:
    u = make_url(url)
    if u.drivername in ("postgresql", "postgres"):
        u = u.set(drivername="postgresql+psycopg")
    backend = u.get_backend_name()
    if backend not in ("sqlite", "postgresql"):
        raise ConfigError(f"database URL: expected sqlite:// or postgresql://, got {backend}://")
    return u


def create_engine_from_url(url: str | URL, **kwargs: Any) -> Engine:
    """An engine for ``url``; PostgreSQL goes through psycopg 3.

    SQLite connections get ``foreign_keys=ON``, WAL journaling and a busy
    timeout, and the driver's own transaction handling is switched off so
    that this module emits ``BEGIN`` itself: that makes SAVEPOINTs work and
    lets :func:`lineage_transaction` open ``BEGIN IMMEDIATE`` transactions.
    """
    u = _normalise(url)
    if u.get_backend_name() == "postgresql":
        return _postgres_engine(u, **kwargs)

    if u.database and u.database != ":memory:":
        Path(u.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(u, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S}, **kwargs)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # we emit BEGIN ourselves
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
        cursor.close()

    # IMMEDIATE by default: a DEFERRED transaction that reads and then writes
    # fails at once with "database is locked" (no busy wait) when another
    # connection wrote in between; the worker's heartbeat and progress
    # threads did exactly that (2,969 of 3,888 progress writes failed in a
    # 5 s race). Taking the write lock at BEGIN makes writers queue on the
    # busy timeout instead; the registry's transactions are all short.
    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        mode = conn.get_execution_options().get(_BEGIN_OPTION, "IMMEDIATE")
        conn.exec_driver_sql(f"BEGIN {mode}")

    return engine


def _postgres_engine(u: URL, **kwargs: Any) -> Engine:
    # Ask for UTF-8 on the wire whatever the server's encoding: on a database
    # created SQL_ASCII, psycopg otherwise hands back bytes for text and
    # SQLAlchemy's first query dies with an unrelated TypeError. With UTF-8 on
    # the wire the refusal below can name the real problem.
    connect_args = {"client_encoding": "utf8", **kwargs.pop("connect_args", {})}
    engine = create_engine(u, pool_pre_ping=True, connect_args=connect_args, **kwargs)

    @event.listens_for(engine, "connect")
    def _check_encoding(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("SHOW server_encoding")
        (encoding,) = cursor.fetchone()
        cursor.close()
        if str(encoding).upper() not in ("UTF8", "UTF-8"):
            # SQL_ASCII stores bytes unchecked: mentions and names with
            # non-ASCII letters would come back undecodable or mixed.
            raise ConfigError(
                f"database {u.database!r} on {u.host or 'localhost'} has encoding "
                f"{encoding}; kronlink needs UTF8. Create it with "
                f"`createdb -E UTF8 -T template0 {u.database}` (or CREATE DATABASE ... "
                "ENCODING 'UTF8' TEMPLATE template0) and point the URL at it"
            )

    return engine


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions that keep loaded attributes after commit (results outlive the transaction)."""
    return sessionmaker(engine, expire_on_commit=False)


def _ensure_lineage_row(session: Session, lineage: str) -> None:
    dialect = session.get_bind().dialect.name
    ins = pg_insert if dialect == "postgresql" else sqlite_insert
    stmt = ins(Lineage).values(name=lineage, created_at=utcnow())
    session.execute(stmt.on_conflict_do_nothing(index_elements=["name"]))


def lock_lineage(session: Session, lineage: str) -> None:
    """Take the lineage's lock for the rest of the session's transaction.

    PostgreSQL: ``SELECT ... FOR UPDATE`` on the lineage row; other lockers
    wait for this transaction to end. SQLite: an ``UPDATE`` of the lineage
    row, which takes the database's write lock; other writers wait (busy
    timeout). On SQLite call it first in a transaction, or use
    :func:`lineage_transaction`, which begins with ``BEGIN IMMEDIATE`` so
    that a stale read snapshot can never fail the upgrade to a write lock.
    The lineage row is created if it does not exist.
    """
    _ensure_lineage_row(session, lineage)
    if session.get_bind().dialect.name == "postgresql":
        session.execute(select(Lineage.name).where(Lineage.name == lineage).with_for_update())
    else:
        session.execute(update(Lineage).where(Lineage.name == lineage).values(locked_at=utcnow()))


@contextmanager
def lineage_transaction(factory: sessionmaker[Session], lineage: str) -> Iterator[Session]:
    """A session whose transaction holds ``lineage``'s lock; commits on success.

    Jobs of one lineage that do their bookkeeping inside this block run one
    at a time, in the order they got the lock. Keep the block short (claim a
    job, read the anchor, commit a version): the lock is held until it ends.
    """
    with factory() as session:
        if session.get_bind().dialect.name == "sqlite":
            session.connection(execution_options={_BEGIN_OPTION: "IMMEDIATE"})
        try:
            lock_lineage(session, lineage)
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise


_Row = TypeVar("_Row")


def row_by_id(
    session: Session, model: type[_Row], row_id: int, what: str, *, for_update: bool = False
) -> _Row:
    """The row of ``model`` with primary key ``row_id`` (locked with
    ``for_update``), or NotFoundError naming ``what``."""
    q = select(model).where(model.id == row_id)  # type: ignore[attr-defined]
    if for_update:
        q = q.with_for_update()
    row = session.scalar(q)
    if row is None:
        raise NotFoundError(f"{what} id {row_id} does not exist")
    return row

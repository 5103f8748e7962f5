"""Plain factories for the service tests: versions registered the way the
worker registers them, a live uvicorn server on a free port, tiny datasets."""

from __future__ import annotations

import json
import os
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
import uvicorn
from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session, sessionmaker

from kronlink.contract import UpdateMessage
from kronlink.data.io import write_ontology
from kronlink.data.schema import Concept
from kronlink.models import build_ranker
from kronlink.registry import (
    ArtifactStore,
    NotFoundError,
    VersionInfo,
    activate_version,
    active_version,
    create_engine_from_url,
    create_ontology,
    create_task,
    create_version,
    get_ontology,
    get_task,
    lineage_transaction,
    make_session_factory,
    upgrade,
)
from kronlink.settings import Settings
from service.server import protocol_for

ADMIN = "admin-token-0123456789abcdef"
READ = "read-token-0123456789abcdef"
TINY_CNN = {"tokenizer": None, "embedding_dim": 8, "channels": 8, "hidden_size": 8}
CONCEPTS = [
    Concept("D001", "type 2 diabetes mellitus", ("adult onset diabetes", "T2DM")),
    Concept("D002", "type 1 diabetes mellitus", ("juvenile diabetes",)),
    Concept("H001", "essential hypertension", ("high blood pressure",)),
    Concept("A001", "asthma", ("reactive airway disease",)),
    Concept("M001", "migraine", ("sick headache",)),
    Concept("F001", "fever", ("pyrexia",)),
]


def admin() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN}"}


def register_version(
    factory: sessionmaker[Session],
    store: ArtifactStore,
    *,
    seed: int,
    lineage: str = "main",
    task: str = "alpha",
    ontology: str = "toy",
    activate: bool = True,
    metrics: dict | None = None,
) -> VersionInfo:
    """A tiny CNN ranker as the worker registers one: an atomic artifact put,
    then the version (and its task and ontology, with the concepts file) in
    one transaction under the lineage lock, activated."""
    torch.manual_seed(seed)
    ranker = build_ranker("cnn", **TINY_CNN)
    with tempfile.TemporaryDirectory() as scratch:
        ranker.save(Path(scratch) / "model")
        write_ontology(Path(scratch) / "ontology.jsonl", CONCEPTS)
        art = store.put_dir(
            f"versions/{lineage}/t-{uuid.uuid4().hex[:12]}", Path(scratch) / "model"
        )
        onto_art = store.put_file(f"ontologies/{ontology}/t", Path(scratch) / "ontology.jsonl")
    with lineage_transaction(factory, lineage) as s:
        try:
            onto = get_ontology(s, ontology)
        except NotFoundError:
            onto = create_ontology(
                s, ontology, concept_count=len(CONCEPTS), source="test", artifact=onto_art
            )
        try:
            task_id = get_task(s, task).id
        except NotFoundError:
            task_id = create_task(s, task, ontology_id=onto.id, sizes={"concepts": 6}).id
        parent = active_version(s, lineage)
        v = create_version(
            s,
            lineage=lineage,
            method="none",
            artifact=art,
            parent_id=parent.id if parent else None,
            task_id=task_id,
            metrics=metrics if metrics is not None else {"test": {"accuracy": 0.5}},
            actor="test",
        )
        if activate:
            v = activate_version(s, v.id, actor="test", reason="test")
    return v


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class LiveServer:
    url: str
    app: object

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30, **kw)


@contextmanager
def live_server(app, *, timeout_s: float = 30) -> Iterator[LiveServer]:
    """uvicorn serving ``app`` on 127.0.0.1 in a thread; stopped on exit."""
    port = free_port()
    state = getattr(app.state, "kronlink", None)
    http = protocol_for(state.settings) if state is not None else "auto"
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", lifespan="on", http=http
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield LiveServer(f"http://127.0.0.1:{port}", app)
    finally:
        server.should_exit = True
        thread.join(timeout=15)


def wait_until(
    predicate: Callable[[], Any],
    timeout_s: float = 10,
    what: str = "condition",
    interval_s: float = 0.05,
) -> Any:
    """Poll ``predicate`` until it returns something true; that value."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s:g} s")
        time.sleep(interval_s)


def jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


@dataclass
class Registry:
    settings: Settings
    factory: sessionmaker[Session]
    store: ArtifactStore
    sent: list[UpdateMessage] = field(default_factory=list)  # what the app enqueued


def service_settings(tmp_path: Path, **overrides) -> Settings:
    values = {
        "data_dir": tmp_path / "data",
        "admin_token": ADMIN,
        "model_poll_s": 0.2,
        "log_format": "text",
        "torch_threads": 1,
        **overrides,
    }
    return Settings(**values)


def make_registry(settings: Settings) -> Registry:
    upgrade(settings.database)
    engine = create_engine_from_url(settings.database)
    return Registry(settings, make_session_factory(engine), ArtifactStore(settings.artifact_url))


PG_ADMIN_URL = os.environ.get(
    "KRONLINK_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


# -- a private PostgreSQL database --------------------------------------------
@contextmanager
def private_pg_database(prefix: str = "kronlink_test") -> Iterator[str]:
    """A fresh, migrated PostgreSQL database (dropped at the end). Unreachable
    PostgreSQL skips the test, or fails it under CI=true."""
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:
        msg = f"PostgreSQL at {PG_ADMIN_URL} is unreachable ({type(exc).__name__}: {exc})"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg + "; CI=true requires it", pytrace=False)
        pytest.skip(msg)
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        url = admin.url.set(database=name).render_as_string(hide_password=False)
        upgrade(url)
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

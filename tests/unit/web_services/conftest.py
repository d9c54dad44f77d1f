"""Fixtures of the Web Services unit tests: metadata documents, an open SQLite store, and ``mstore``:
an open store of every backend available (parametrised)."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from services.storage.disk import recording_key
from services.storage.metadata import format_time, validate_document
from services.web_services.store import MetadataStore, SqliteMetadataStore

DocFactory = Callable[..., dict[str, Any]]


def _make_doc(
    rid: str,
    tenant: str = "acme",
    start: datetime | None = None,
    seconds: float = 10.0,
    **fields: Any,
) -> dict[str, Any]:
    start = start or datetime(2024, 5, 1, 8, 0, tzinfo=UTC)
    doc = {
        "id": rid,
        "tenant": tenant,
        "session_id": f"s-{rid}",
        "part": 1,
        "call_id": f"call-{rid}@pbx",
        "from_uri": "sip:1001@acme.example",
        "from_display": "Alice",
        "to_uri": "sip:1002@acme.example",
        "to_display": "Bob",
        "caller": "1001",
        "callee": "1002",
        "direction": "internal",
        "start": format_time(start),
        "end": format_time(start + timedelta(seconds=seconds)),
        "codec": "PCMU",
        "format": "wav",
        "channels": 2,
        "sample_rate": 8000,
        "size": 44,
        "sha256": "0" * 64,
        "storage": {"kind": "disk", "key": recording_key(tenant, start, rid)},
        "mcp": "mcp1",
        "streams": [],
    }
    doc.update(fields)
    return validate_document(doc)


@pytest.fixture
def make_doc() -> DocFactory:
    return _make_doc


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteMetadataStore]:
    s = SqliteMetadataStore(tmp_path / "meta.sqlite3")
    await s.open()
    try:
        yield s
    finally:
        await s.close()


# ---------------------------------------------------------------- every metadata store backend
# SQLite always; Cassandra when CASSANDRA_CONTACT_POINTS is set (see test_store_contract.py). The
# parameter list is built from the environment so that absent backends are not even generated.
CASSANDRA = os.environ.get("CASSANDRA_CONTACT_POINTS", "")
BACKENDS = ["sqlite"] + (["cassandra"] if CASSANDRA else [])


async def _cassandra_store() -> tuple[MetadataStore, Callable[[], Any]]:
    from services.web_services.store_cassandra import CassandraMetadataStore

    keyspace = f"cv_test_{uuid.uuid4().hex[:12]}"
    store = CassandraMetadataStore(
        [c for c in CASSANDRA.split(",") if c.strip()],
        keyspace=keyspace,
        replication=os.environ.get("CASSANDRA_REPLICATION", "SimpleStrategy:1"),
        consistency=os.environ.get("CASSANDRA_CONSISTENCY", "LOCAL_QUORUM"),
    )
    await store.open()

    async def drop() -> None:
        await store._exec_raw(f"DROP KEYSPACE IF EXISTS {keyspace}")

    return store, drop


@pytest.fixture(params=BACKENDS)
async def mstore(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[MetadataStore]:
    if request.param == "sqlite":
        store: MetadataStore = SqliteMetadataStore(tmp_path / "meta.sqlite3")
        await store.open()
        try:
            yield store
        finally:
            await store.close()
        return
    store, drop = await _cassandra_store()
    try:
        yield store
    finally:
        try:
            await drop()
        finally:
            await store.close()

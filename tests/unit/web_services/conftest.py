"""Fixtures of the Web Services unit tests: metadata documents and an open SQLite store."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from services.storage.disk import recording_key
from services.storage.metadata import format_time, validate_document
from services.web_services.store import SqliteMetadataStore

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

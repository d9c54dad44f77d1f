"""A store that cannot serve (database locked, replicas down) makes the API answer 503, not 500."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from services import config as config_mod
from services.web_services.app import create_app
from services.web_services.store import SqliteMetadataStore, StoreUnavailable

DocFactory = Callable[..., dict[str, Any]]
KEY = "acme-api-key-0123456789"
TOKEN = "internal-token-0123456789"


async def test_locked_sqlite_is_a_503_with_retry_after(
    tmp_path: Path, make_doc: DocFactory, caplog: pytest.LogCaptureFixture
) -> None:
    config = config_mod.from_dict(
        {
            "web_services": {"database": "m.sqlite3", "internal_token": TOKEN},
            "tenants": [{"id": "acme", "api_key": KEY}],
        },
        base_dir=str(tmp_path),
        environ={},
    )
    store = SqliteMetadataStore(tmp_path / "m.sqlite3")
    await store.open()
    # another process holds the write lock past the busy timeout
    await store._call(lambda: store.conn.execute("PRAGMA busy_timeout = 50"))
    blocker = sqlite3.connect(tmp_path / "m.sqlite3", isolation_level=None, check_same_thread=False)
    blocker.execute("BEGIN EXCLUSIVE")
    client = TestClient(TestServer(create_app(config, store)))
    await client.start_server()
    try:
        with pytest.raises(StoreUnavailable, match="locked"):
            await store.put(make_doc("r1"))
        resp = await client.post(
            "/api/v1/internal/recordings", json=make_doc("r1"), headers={"Authorization": f"Bearer {TOKEN}"}
        )
        assert resp.status == 503 and resp.headers["Retry-After"] == "1"
        assert (await resp.json())["error"]["code"] == "store_unavailable"
        # WAL: searches are still served while the writer is stuck
        resp = await client.get("/api/v1/recordings", headers={"Authorization": f"Bearer {KEY}"})
        assert resp.status == 200
        assert any("metadata store unavailable" in r.getMessage() for r in caplog.records)
        blocker.execute("ROLLBACK")
        resp = await client.post(
            "/api/v1/internal/recordings", json=make_doc("r1"), headers={"Authorization": f"Bearer {TOKEN}"}
        )
        assert resp.status == 201
    finally:
        blocker.close()
        await client.close()
        await store.close()

"""SQLite store specifics; the behaviour every backend shares is in test_store_contract.py."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from services.web_services.store import (
    CursorError,
    SqliteMetadataStore,
    decode_cursor,
    encode_cursor,
)

DocFactory = Callable[..., dict[str, Any]]


def test_cursor_round_trip_and_garbage() -> None:
    for bad in ("!!!", "abc", encode_cursor("x", "y")[:-3], "W1sxXV0"):
        with pytest.raises(CursorError):
            decode_cursor(bad)
    assert decode_cursor(encode_cursor("2024-01-01T00:00:00.000000Z", "r1")) == (
        "2024-01-01T00:00:00.000000Z",
        "r1",
    )


async def test_persists_across_reopen(tmp_path: Path, make_doc: DocFactory) -> None:
    path = tmp_path / "db" / "meta.sqlite3"
    s = SqliteMetadataStore(path)
    await s.open()
    await s.put(make_doc("r1"))
    await s.close()
    s2 = SqliteMetadataStore(path)
    await s2.open()
    try:
        assert (await s2.get("acme", "r1")) is not None
        await s2.ping()
    finally:
        await s2.close()


async def test_closed_store_refuses(tmp_path: Path) -> None:
    s = SqliteMetadataStore(tmp_path / "x.sqlite3")
    with pytest.raises(RuntimeError):
        await s.ping()


async def test_two_stores_share_one_file(tmp_path: Path, make_doc: DocFactory) -> None:
    """Several Web Services processes may share the SQLite file (WAL): writes of one are seen by the other."""
    a, b = SqliteMetadataStore(tmp_path / "m.sqlite3"), SqliteMetadataStore(tmp_path / "m.sqlite3")
    await a.open()
    await b.open()
    try:
        await a.put(make_doc("r1"))
        assert await b.get("acme", "r1") is not None
        assert await a.acquire_lease("retention", "a", 30)
        assert not await b.acquire_lease("retention", "b", 30)
    finally:
        await a.close()
        await b.close()

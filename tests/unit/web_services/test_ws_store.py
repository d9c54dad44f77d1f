"""MetadataStore contract, run on the SQLite store (a Cassandra store must pass the same tests)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from services.web_services.store import (
    CursorError,
    PutResult,
    SearchFilters,
    SqliteMetadataStore,
    decode_cursor,
    encode_cursor,
)

DocFactory = Callable[..., dict[str, Any]]
T0 = datetime(2024, 5, 1, 8, 0, tzinfo=UTC)


async def test_put_is_idempotent(store: SqliteMetadataStore, make_doc: DocFactory) -> None:
    doc = make_doc("r1")
    assert await store.put(doc) is PutResult.CREATED
    assert await store.put(doc) is PutResult.EXISTS
    assert await store.put(make_doc("r1", seconds=99)) is PutResult.CONFLICT
    assert await store.get("acme", "r1") == doc
    page = await store.search("acme", SearchFilters())
    assert [d["id"] for d in page.items] == ["r1"]


async def test_concurrent_puts_create_once(store: SqliteMetadataStore, make_doc: DocFactory) -> None:
    doc = make_doc("r1")
    results = await asyncio.gather(*(store.put(doc) for _ in range(10)))
    assert results.count(PutResult.CREATED) == 1
    assert results.count(PutResult.EXISTS) == 9


async def test_tenant_isolation(store: SqliteMetadataStore, make_doc: DocFactory) -> None:
    await store.put(make_doc("a1", tenant="acme"))
    await store.put(make_doc("b1", tenant="globex"))
    assert await store.get("acme", "b1") is None
    assert await store.get("globex", "b1") is not None
    assert [d["id"] for d in (await store.search("acme", SearchFilters())).items] == ["a1"]
    assert await store.delete("acme", "b1") is None
    assert await store.get("globex", "b1") is not None


async def test_search_newest_first_with_cursor(store: SqliteMetadataStore, make_doc: DocFactory) -> None:
    for i in range(7):
        await store.put(make_doc(f"r{i}", start=T0 + timedelta(minutes=i)))
    await store.put(make_doc("r3b", start=T0 + timedelta(minutes=3)))  # same start as r3
    seen: list[str] = []
    cursor = None
    while True:
        page = await store.search("acme", SearchFilters(), limit=3, cursor=cursor)
        seen += [d["id"] for d in page.items]
        if page.next is None:
            break
        cursor = page.next
    assert seen == ["r6", "r5", "r4", "r3b", "r3", "r2", "r1", "r0"]


async def test_exact_page_has_no_next(store: SqliteMetadataStore, make_doc: DocFactory) -> None:
    for i in range(2):
        await store.put(make_doc(f"r{i}", start=T0 + timedelta(minutes=i)))
    page = await store.search("acme", SearchFilters(), limit=2)
    assert len(page.items) == 2 and page.next is None


async def test_filters(store: SqliteMetadataStore, make_doc: DocFactory) -> None:
    await store.put(make_doc("r1", start=T0, caller="1001", callee="1002", direction="internal"))
    await store.put(
        make_doc(
            "r2",
            start=T0 + timedelta(hours=1),
            caller="1003",
            callee="+4930123",
            from_uri="sip:1003@acme.example",
            to_uri="sip:+4930123@Carrier.example",
            direction="outbound",
            labels=["vip"],
        )
    )
    await store.put(make_doc("r3", start=T0 + timedelta(hours=2), call_id="shared@pbx", session_id="S"))
    await store.put(
        make_doc("r4", start=T0 + timedelta(hours=3), call_id="shared@pbx", session_id="S", part=2)
    )

    async def ids(**kw: object) -> list[str]:
        return [d["id"] for d in (await store.search("acme", SearchFilters(**kw))).items]  # type: ignore[arg-type]

    assert await ids(call_id="shared@pbx") == ["r4", "r3"]
    assert await ids(session_id="S") == ["r4", "r3"]
    assert await ids(direction="outbound") == ["r2"]
    assert await ids(party="1003") == ["r2"]
    assert await ids(party="+4930123") == ["r2"]
    assert await ids(party="carrier.EXAMPLE") == ["r2"]  # URI substring, case-insensitive
    assert await ids(party="999") == []
    assert await ids(label="vip") == ["r2"]
    assert await ids(start_after=T0 + timedelta(hours=1)) == ["r4", "r3", "r2"]  # inclusive
    assert await ids(start_before=T0 + timedelta(hours=1)) == ["r1"]  # exclusive
    assert await ids(
        start_after=T0 + timedelta(minutes=30), start_before=T0 + timedelta(hours=2, minutes=1)
    ) == [
        "r3",
        "r2",
    ]
    assert await ids(party="1002", direction="internal", call_id="call-r1@pbx") == ["r1"]


async def test_time_filter_with_offset(store: SqliteMetadataStore, make_doc: DocFactory) -> None:
    await store.put(make_doc("r1", start=T0))
    from datetime import timezone

    berlin = timezone(timedelta(hours=2))
    assert (await store.search("acme", SearchFilters(start_after=T0.astimezone(berlin)))).items
    assert not (await store.search("acme", SearchFilters(start_before=T0.astimezone(berlin)))).items


async def test_delete_tombstones(store: SqliteMetadataStore, make_doc: DocFactory) -> None:
    doc = make_doc("r1")
    await store.put(doc)
    deleted = await store.delete("acme", "r1")
    assert deleted == doc
    assert await store.get("acme", "r1") is None
    assert await store.delete("acme", "r1") is None
    assert await store.put(doc) is PutResult.DELETED  # a late duplicate does not resurrect it
    assert await store.get("acme", "r1") is None


async def test_bad_limit_and_cursor(store: SqliteMetadataStore) -> None:
    with pytest.raises(ValueError):
        await store.search("acme", SearchFilters(), limit=0)
    with pytest.raises(ValueError):
        await store.search("acme", SearchFilters(), limit=501)
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

"""The MetadataStore contract: one set of tests, run on every backend.

SQLite always. Cassandra whenever ``CASSANDRA_CONTACT_POINTS`` is set (``host[:port],...``; e.g. the
compose lab's ``127.0.0.1:9042``): each test then gets a fresh keyspace (replication
``CASSANDRA_REPLICATION``, default ``SimpleStrategy:1``; ``SimpleStrategy:3`` on the 3-node lab),
dropped afterwards. The parameter list is built from the environment (the ``mstore`` fixture in
conftest.py), so without a cluster the Cassandra cases do not exist rather than being skipped.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from services.web_services.store import (
    CursorError,
    MetadataStore,
    PutResult,
    SearchFilters,
    SqliteMetadataStore,
    encode_cursor,
)

DocFactory = Callable[..., dict[str, Any]]
T0 = datetime(2024, 5, 1, 8, 0, tzinfo=UTC)


async def ids(store: MetadataStore, tenant: str = "acme", **kw: Any) -> list[str]:
    return [d["id"] for d in (await store.search(tenant, SearchFilters(**kw), limit=500)).items]


async def all_pages(store: MetadataStore, limit: int, **kw: Any) -> list[str]:
    seen: list[str] = []
    cursor = None
    while True:
        page = await store.search("acme", SearchFilters(**kw), limit=limit, cursor=cursor)
        assert len(page.items) <= limit
        seen += [d["id"] for d in page.items]
        if page.next is None:
            return seen
        assert page.items, "a page with a next cursor must not be empty"
        cursor = page.next


async def test_put_is_idempotent(mstore: MetadataStore, make_doc: DocFactory) -> None:
    doc = make_doc("r1")
    assert await mstore.put(doc) is PutResult.CREATED
    assert await mstore.put(doc) is PutResult.EXISTS
    assert await mstore.put(make_doc("r1", seconds=99)) is PutResult.CONFLICT
    assert await mstore.get("acme", "r1") == doc
    assert await ids(mstore) == ["r1"]


async def test_concurrent_puts_create_once(mstore: MetadataStore, make_doc: DocFactory) -> None:
    doc = make_doc("r1")
    results = await asyncio.gather(*(mstore.put(doc) for _ in range(10)))
    assert results.count(PutResult.CREATED) == 1
    assert results.count(PutResult.EXISTS) == 9
    assert await ids(mstore) == ["r1"]


async def test_same_id_other_tenant_is_a_conflict(mstore: MetadataStore, make_doc: DocFactory) -> None:
    await mstore.put(make_doc("r1", tenant="acme"))
    assert await mstore.put(make_doc("r1", tenant="globex")) is PutResult.CONFLICT
    assert await mstore.get("globex", "r1") is None
    assert await ids(mstore, "globex") == []


async def test_tenant_isolation(mstore: MetadataStore, make_doc: DocFactory) -> None:
    await mstore.put(make_doc("a1", tenant="acme"))
    await mstore.put(make_doc("b1", tenant="globex"))
    assert await mstore.get("acme", "b1") is None
    assert await mstore.get("globex", "b1") is not None
    assert await ids(mstore) == ["a1"]
    assert await mstore.delete("acme", "b1") is None
    assert await mstore.get("globex", "b1") is not None


async def test_search_newest_first_with_cursor(mstore: MetadataStore, make_doc: DocFactory) -> None:
    for i in range(7):
        await mstore.put(make_doc(f"r{i}", start=T0 + timedelta(minutes=i)))
    await mstore.put(make_doc("r3b", start=T0 + timedelta(minutes=3)))  # same start as r3
    expected = ["r6", "r5", "r4", "r3b", "r3", "r2", "r1", "r0"]
    assert await all_pages(mstore, 3) == expected
    assert await all_pages(mstore, 1) == expected


async def test_search_across_days_and_months(mstore: MetadataStore, make_doc: DocFactory) -> None:
    """Keyset pages that span day partitions (and empty days between them), with time bounds."""
    starts = {
        "d0": T0 - timedelta(days=40),
        "d1": T0 - timedelta(days=3, hours=1),
        "d2": T0 - timedelta(days=3),
        "d3": T0 - timedelta(minutes=1),
        "d4": T0,
        "d5": T0 + timedelta(days=1, hours=15, minutes=59),  # 23:59 the next day
        "d6": T0 + timedelta(days=2),
    }
    for rid, start in starts.items():
        await mstore.put(make_doc(rid, start=start))
    newest_first = sorted(starts, key=lambda r: starts[r], reverse=True)
    for limit in (1, 2, 3, 7, 8):
        assert await all_pages(mstore, limit) == newest_first, limit
    assert await all_pages(mstore, 2, start_after=T0 - timedelta(days=3)) == ["d6", "d5", "d4", "d3", "d2"]
    assert await all_pages(mstore, 2, start_before=T0) == ["d3", "d2", "d1", "d0"]
    assert await all_pages(
        mstore, 1, start_after=T0 - timedelta(days=3, hours=1), start_before=T0 + timedelta(days=2)
    ) == ["d5", "d4", "d3", "d2", "d1"]
    assert await all_pages(mstore, 2, start_before=T0 - timedelta(days=50)) == []


async def test_exact_page_has_no_next(mstore: MetadataStore, make_doc: DocFactory) -> None:
    for i in range(2):
        await mstore.put(make_doc(f"r{i}", start=T0 + timedelta(minutes=i)))
    page = await mstore.search("acme", SearchFilters(), limit=2)
    assert len(page.items) == 2 and page.next is None


async def test_filters(mstore: MetadataStore, make_doc: DocFactory) -> None:
    await mstore.put(make_doc("r1", start=T0, caller="1001", callee="1002", direction="internal"))
    await mstore.put(
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
    await mstore.put(make_doc("r3", start=T0 + timedelta(hours=2), call_id="shared@pbx", session_id="S"))
    await mstore.put(
        make_doc("r4", start=T0 + timedelta(days=1), call_id="shared@pbx", session_id="S", part=2)
    )
    s = mstore
    assert await ids(s, call_id="shared@pbx") == ["r4", "r3"]
    assert await ids(s, call_id="shared@pbx", start_before=T0 + timedelta(days=1)) == ["r3"]
    assert await ids(s, call_id="nope@pbx") == []
    assert await ids(s, session_id="S") == ["r4", "r3"]
    assert await ids(s, direction="outbound") == ["r2"]
    assert await ids(s, party="1003") == ["r2"]
    assert await ids(s, party="+4930123") == ["r2"]
    assert await ids(s, party="carrier.EXAMPLE") == ["r2"]  # URI substring, case-insensitive
    assert await ids(s, party="999") == []
    assert await ids(s, label="vip") == ["r2"]
    assert await ids(s, label="vi") == []
    assert await ids(s, start_after=T0 + timedelta(hours=1)) == ["r4", "r3", "r2"]  # inclusive
    assert await ids(s, start_before=T0 + timedelta(hours=1)) == ["r1"]  # exclusive
    assert await ids(
        s, start_after=T0 + timedelta(minutes=30), start_before=T0 + timedelta(hours=2, minutes=1)
    ) == [
        "r3",
        "r2",
    ]
    assert await ids(s, party="1002", direction="internal", call_id="call-r1@pbx") == ["r1"]
    # a selective filter over many recordings still pages correctly
    for i in range(12):
        await s.put(
            make_doc(f"x{i:02}", start=T0 - timedelta(hours=i + 1), direction="inbound" if i % 4 else "x")
        )
    assert await all_pages(s, 2, direction="x") == ["x00", "x04", "x08"]


async def test_time_filter_with_offset(mstore: MetadataStore, make_doc: DocFactory) -> None:
    await mstore.put(make_doc("r1", start=T0))
    berlin = timezone(timedelta(hours=2))
    assert (await mstore.search("acme", SearchFilters(start_after=T0.astimezone(berlin)))).items
    assert not (await mstore.search("acme", SearchFilters(start_before=T0.astimezone(berlin)))).items


async def test_delete_tombstones(mstore: MetadataStore, make_doc: DocFactory) -> None:
    doc = make_doc("r1")
    other = make_doc("r2", start=T0 + timedelta(minutes=1), call_id=doc["call_id"])
    await mstore.put(doc)
    await mstore.put(other)
    assert await mstore.delete("acme", "r1") == doc
    assert await mstore.get("acme", "r1") is None
    assert await mstore.delete("acme", "r1") is None
    assert await mstore.put(doc) is PutResult.DELETED  # a late duplicate does not resurrect it
    assert await mstore.put(make_doc("r1", seconds=5)) is PutResult.DELETED
    assert await mstore.get("acme", "r1") is None
    assert await ids(mstore) == ["r2"]
    assert await ids(mstore, call_id=doc["call_id"]) == ["r2"]
    assert await mstore.delete("acme", "missing") is None


async def test_bad_limit_and_cursor(mstore: MetadataStore) -> None:
    for limit in (0, 501):
        with pytest.raises(ValueError):
            await mstore.search("acme", SearchFilters(), limit=limit)
    with pytest.raises(CursorError):
        await mstore.search("acme", SearchFilters(), cursor="!!!")
    # a well-formed cursor past everything gives an empty last page
    page = await mstore.search("acme", SearchFilters(), cursor=encode_cursor("0000", "a"))
    assert page.items == [] and page.next is None


async def test_lease_one_holder_at_a_time(mstore: MetadataStore) -> None:
    assert await mstore.acquire_lease("job", "a", 30)
    assert not await mstore.acquire_lease("job", "b", 30)
    assert await mstore.acquire_lease("job", "a", 30)  # renewal
    assert await mstore.acquire_lease("other", "b", 30)  # leases are independent
    await mstore.release_lease("job", "b")  # not b's: no effect
    assert not await mstore.acquire_lease("job", "b", 30)
    await mstore.release_lease("job", "a")
    assert await mstore.acquire_lease("job", "b", 30)
    results = await asyncio.gather(*(mstore.acquire_lease("race", f"h{i}", 30) for i in range(6)))
    assert results.count(True) == 1


async def test_lease_expires(mstore: MetadataStore) -> None:
    assert await mstore.acquire_lease("job", "a", 1)
    # Cassandra's TTLs count whole seconds from the write's second
    await asyncio.sleep(1.3 if isinstance(mstore, SqliteMetadataStore) else 2.2)
    assert await mstore.acquire_lease("job", "b", 30)


async def test_audit_trail(mstore: MetadataStore) -> None:
    for i in range(3):
        await mstore.add_audit("acme", {"action": "x", "n": i})
    await mstore.add_audit("globex", {"action": "y"})
    assert [e["n"] for e in await mstore.audit_entries("acme")] == [2, 1, 0]
    assert [e["n"] for e in await mstore.audit_entries("acme", limit=2)] == [2, 1]
    assert await mstore.audit_entries("globex") == [{"action": "y"}]
    assert await mstore.audit_entries("initech") == []


async def test_ping(mstore: MetadataStore) -> None:
    await mstore.ping()

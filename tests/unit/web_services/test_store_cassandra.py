"""The Cassandra store at its seam: a fake driver session.

``FakeSession`` stands in for ``cassandra.cluster.Session``: it prepares the store's statements
(refusing any CQL it does not know, so a typo in a statement fails here), and answers
``execute_async`` with ResponseFuture-like objects whose callbacks fire on another thread (or at
once, as the driver does when the answer is already in), from small in-memory tables with
Cassandra's semantics for what the store relies on: lightweight transactions answering
``[applied]`` plus the existing row, clustering order and keyset slices, ``LIMIT``, ``USING
TIMESTAMP`` (a delete shadows older writes) and TTLs. The backend's real proof is the contract suite
(test_store_contract.py) run against a cluster with ``CASSANDRA_CONTACT_POINTS`` set.
"""

from __future__ import annotations

import asyncio
import random
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cassandra import ConsistencyLevel, Unavailable

from services import config as config_mod
from services.web_services.store import PutResult, SearchFilters, StoreUnavailable, create_store
from services.web_services.store_cassandra import (
    CassandraConfigError,
    CassandraMetadataStore,
    bridge,
    parse_contact_point,
    parse_replication,
    schema,
    statements,
)

DocFactory = Callable[..., dict[str, Any]]
T0 = datetime(2024, 5, 1, 8, 0, tzinfo=UTC)
KS = "cv_unit"


class FakeResponseFuture:
    """Completes on a timer thread; add_callbacks after completion calls back at once (as the driver)."""

    def __init__(self, compute: Callable[[], list[dict[str, Any]]], delay: float) -> None:
        self._lock = threading.Lock()
        self._callbacks: list[tuple[Callable[[Any], None], Callable[[BaseException], None]]] = []
        self._outcome: tuple[bool, Any] | None = None
        self.compute = compute
        if delay <= 0:
            self._complete()
        else:
            threading.Timer(delay, self._complete).start()

    def _complete(self) -> None:
        try:
            outcome: tuple[bool, Any] = (True, self.compute())
        except Exception as exc:
            outcome = (False, exc)
        with self._lock:
            self._outcome = outcome
            callbacks = list(self._callbacks)
        for ok, err in callbacks:
            (ok if outcome[0] else err)(outcome[1])

    def add_callbacks(
        self, callback: Callable[[Any], None], errback: Callable[[BaseException], None]
    ) -> None:
        with self._lock:
            outcome = self._outcome
            if outcome is None:
                self._callbacks.append((callback, errback))
                return
        (callback if outcome[0] else errback)(outcome[1])


class Prepared:
    def __init__(self, name: str, cql: str) -> None:
        self.name = name
        self.cql = cql
        self.consistency_level: int | None = None
        self.serial_consistency_level: int | None = None
        self.is_idempotent = False


class FakeSession:
    """In-memory tables behind the store's prepared statements (see the module docstring)."""

    def __init__(self, keyspace: str = KS) -> None:
        self.by_cql = {cql: name for name, cql in statements(keyspace).items()}
        self.ddl: list[str] = []
        self.prepared: list[Prepared] = []
        self.executed: list[tuple[str, tuple[Any, ...]]] = []
        self.fail: dict[str, BaseException] = {}  # statement name -> error raised once
        self.lock = threading.Lock()
        self.by_id: dict[str, dict[str, Any]] = {}
        # (table, partition) -> {(start, id): (doc, write ts)}; deletions: (table, partition, key) -> ts
        self.rows: dict[tuple[str, tuple[str, str]], dict[tuple[str, str], tuple[str, int]]] = {}
        self.deleted: dict[tuple[str, tuple[str, str], tuple[str, str]], int] = {}
        self.days: dict[str, set[str]] = {}
        self.leases: dict[str, tuple[str, float]] = {}
        self.audit: dict[str, list[tuple[float, str]]] = {}

    def prepare(self, cql: str) -> Prepared:
        if cql not in self.by_cql:
            raise AssertionError(f"unexpected CQL: {cql}")
        p = Prepared(self.by_cql[cql], cql)
        self.prepared.append(p)
        return p

    def execute_async(self, stmt: Any, params: tuple[Any, ...] = ()) -> FakeResponseFuture:
        delay = random.choice((0.0, 0.0005, 0.002))
        if isinstance(stmt, str):
            self.ddl.append(stmt)
            return FakeResponseFuture(list, delay)
        name = stmt.name
        self.executed.append((name, tuple(params)))
        err = self.fail.pop(name, None)

        def compute() -> list[dict[str, Any]]:
            if err is not None:
                raise err
            with self.lock:
                return getattr(self, f"_{name}")(*params)

        return FakeResponseFuture(compute, delay)

    # the statements
    def _put(
        self, rid: str, tenant: str, start: str, call_id: str, doc: str, created: int
    ) -> list[dict[str, Any]]:
        if rid in self.by_id:
            return [{"[applied]": False, "id": rid, **self.by_id[rid]}]
        self.by_id[rid] = {
            "tenant": tenant,
            "start": start,
            "call_id": call_id,
            "doc": doc,
            "created": created,
            "deleted": None,
        }
        return [{"[applied]": True}]

    def _get(self, rid: str) -> list[dict[str, Any]]:
        return [dict(self.by_id[rid])] if rid in self.by_id else []

    def _write(self, table: str, part: tuple[str, str], key: tuple[str, str], doc: str, ts: int) -> list[Any]:
        if self.deleted.get((table, part, key), -1) >= ts:
            return []  # shadowed by a later delete
        rows = self.rows.setdefault((table, part), {})
        if key not in rows or rows[key][1] <= ts:
            rows[key] = (doc, ts)
        return []

    def _delete(self, table: str, part: tuple[str, str], key: tuple[str, str], ts: int) -> list[Any]:
        self.deleted[(table, part, key)] = max(ts, self.deleted.get((table, part, key), -1))
        rows = self.rows.get((table, part), {})
        if key in rows and rows[key][1] <= ts:
            del rows[key]
        return []

    def _index_day(self, tenant: str, day: str, start: str, rid: str, doc: str, ts: int) -> list[Any]:
        return self._write("day", (tenant, day), (start, rid), doc, ts)

    def _index_call(self, tenant: str, call_id: str, start: str, rid: str, doc: str, ts: int) -> list[Any]:
        return self._write("call", (tenant, call_id), (start, rid), doc, ts)

    def _index_days(self, tenant: str, day: str) -> list[Any]:
        self.days.setdefault(tenant, set()).add(day)
        return []

    def _unindex_day(self, ts: int, tenant: str, day: str, start: str, rid: str) -> list[Any]:
        return self._delete("day", (tenant, day), (start, rid), ts)

    def _unindex_call(self, ts: int, tenant: str, call_id: str, start: str, rid: str) -> list[Any]:
        return self._delete("call", (tenant, call_id), (start, rid), ts)

    def _tombstone(self, deleted: str, rid: str) -> list[dict[str, Any]]:
        row = self.by_id.get(rid)
        if row is None or row["deleted"] is not None:
            return [{"[applied]": False, "deleted": row and row["deleted"]}]
        row.update(deleted=deleted, doc=None)
        return [{"[applied]": True}]

    def _days(self, tenant: str, top: str, low: str, limit: int) -> list[dict[str, Any]]:
        days = sorted((d for d in self.days.get(tenant, ()) if low <= d <= top), reverse=True)
        return [{"day": d} for d in days[:limit]]

    def _days_below(self, tenant: str, top: str, low: str, limit: int) -> list[dict[str, Any]]:
        days = sorted((d for d in self.days.get(tenant, ()) if low <= d < top), reverse=True)
        return [{"day": d} for d in days[:limit]]

    def _slice(
        self, table: str, part: tuple[str, str], start: str, rid: str, limit: int
    ) -> list[dict[str, Any]]:
        rows = self.rows.get((table, part), {})
        keys = sorted((k for k in rows if k < (start, rid)), reverse=True)[:limit]
        return [{"start": k[0], "id": k[1], "doc": rows[k][0]} for k in keys]

    def _search_day(self, tenant: str, day: str, start: str, rid: str, limit: int) -> list[dict[str, Any]]:
        return self._slice("day", (tenant, day), start, rid, limit)

    def _search_call(
        self, tenant: str, call_id: str, start: str, rid: str, limit: int
    ) -> list[dict[str, Any]]:
        return self._slice("call", (tenant, call_id), start, rid, limit)

    def _live_lease(self, name: str) -> str | None:
        lease = self.leases.get(name)
        return lease[0] if lease and lease[1] > time.monotonic() else None

    def _lease_take(self, name: str, holder: str, ttl: int) -> list[dict[str, Any]]:
        current = self._live_lease(name)
        if current is not None:
            return [{"[applied]": False, "name": name, "holder": current}]
        self.leases[name] = (holder, time.monotonic() + ttl)
        return [{"[applied]": True}]

    def _lease_renew(self, ttl: int, holder: str, name: str, expected: str) -> list[dict[str, Any]]:
        current = self._live_lease(name)
        if current != expected:
            return [{"[applied]": False, "holder": current}]
        self.leases[name] = (holder, time.monotonic() + ttl)
        return [{"[applied]": True}]

    def _lease_release(self, name: str, holder: str) -> list[dict[str, Any]]:
        if self._live_lease(name) == holder:
            del self.leases[name]
            return [{"[applied]": True}]
        return [{"[applied]": False}]

    def _audit_add(self, tenant: str, ts: uuid.UUID, entry: str) -> list[Any]:
        assert ts.version == 1  # a timeuuid
        self.audit.setdefault(tenant, []).append((ts.time, entry))
        return []

    def _audit_list(self, tenant: str, limit: int) -> list[dict[str, Any]]:
        return [{"entry": e} for _, e in sorted(self.audit.get(tenant, []), reverse=True)[:limit]]

    def _ping(self) -> list[dict[str, Any]]:
        return [{"release_version": "4.1.0"}]


@pytest.fixture
async def fake() -> AsyncIterator[tuple[CassandraMetadataStore, FakeSession]]:
    session = FakeSession()
    store = CassandraMetadataStore(
        keyspace=KS, session=session, consistency="QUORUM", serial_consistency="SERIAL"
    )
    await store.open()
    try:
        yield store, session
    finally:
        await store.close()


async def test_schema_and_prepared_statements(fake: tuple[CassandraMetadataStore, FakeSession]) -> None:
    _, session = fake
    assert session.ddl == schema(KS, parse_replication("SimpleStrategy:3"))
    assert session.ddl[0] == (
        "CREATE KEYSPACE IF NOT EXISTS cv_unit WITH replication = {'class': 'SimpleStrategy', 'replication_factor': 3}"
    )
    assert "PRIMARY KEY ((tenant, day), start, id)" in session.ddl[2]
    assert "CLUSTERING ORDER BY (start DESC, id DESC)" in session.ddl[2]
    # each statement prepared once, with the configured consistency levels
    assert sorted(p.name for p in session.prepared) == sorted(statements(KS))
    for p in session.prepared:
        assert p.consistency_level == ConsistencyLevel.QUORUM
        assert p.serial_consistency_level == ConsistencyLevel.SERIAL
        lwt = "IF " in p.cql
        assert p.is_idempotent is not lwt, p.name
    assert statements(KS)["put"].endswith("IF NOT EXISTS")


async def test_put_get_search_delete_through_the_driver_seam(
    fake: tuple[CassandraMetadataStore, FakeSession], make_doc: DocFactory
) -> None:
    store, session = fake
    docs = [make_doc(f"r{i}", start=T0 + timedelta(hours=7 * i)) for i in range(10)]  # ~3 days
    assert await asyncio.gather(*(store.put(d) for d in docs)) == [PutResult.CREATED] * 10
    assert await store.put(docs[0]) is PutResult.EXISTS
    assert await store.put(make_doc("r0", seconds=1)) is PutResult.CONFLICT
    assert await store.get("acme", "r3") == docs[3]
    assert await store.get("globex", "r3") is None
    seen, cursor = [], None
    while True:
        page = await store.search("acme", SearchFilters(), limit=3, cursor=cursor)
        seen += [d["id"] for d in page.items]
        if page.next is None:
            break
        cursor = page.next
    assert seen == [f"r{i}" for i in reversed(range(10))]
    assert sorted(session.days["acme"]) == ["2024-05-01", "2024-05-02", "2024-05-03"]
    assert await store.delete("acme", "r9") == docs[9]
    assert await store.put(docs[9]) is PutResult.DELETED
    assert [d["id"] for d in (await store.search("acme", SearchFilters(), limit=2)).items] == ["r8", "r7"]
    # the search bound is the cursor or start_before, whichever is lower; day partitions outside are not read
    session.executed.clear()
    await store.search("acme", SearchFilters(start_before=T0 + timedelta(hours=8)), limit=5)
    days = [p for n, p in session.executed if n == "days"]
    assert days == [("acme", "2024-05-01", "", 100)]
    slices = [p for n, p in session.executed if n == "search_day"]
    assert slices[0] == ("acme", "2024-05-01", "2024-05-01T16:00:00.000000Z", "", 100)


async def test_interrupted_put_is_repaired_by_the_retry(
    fake: tuple[CassandraMetadataStore, FakeSession], make_doc: DocFactory
) -> None:
    """Web Services dies (here: the driver fails) between the LWT and the index writes: the
    Recording Processor's retry (EXISTS) writes the index rows, so the recording is searchable."""
    store, session = fake
    doc = make_doc("r1")
    session.fail["index_day"] = Unavailable(
        "not enough replicas", consistency=4, required_replicas=2, alive_replicas=1
    )
    with pytest.raises(StoreUnavailable, match="Unavailable"):
        await store.put(doc)
    assert (await store.search("acme", SearchFilters())).items == []
    assert await store.put(doc) is PutResult.EXISTS
    assert [d["id"] for d in (await store.search("acme", SearchFilters())).items] == ["r1"]


async def test_late_repair_cannot_resurrect_a_deleted_recording(
    fake: tuple[CassandraMetadataStore, FakeSession], make_doc: DocFactory
) -> None:
    store, session = fake
    doc = make_doc("r1")
    await store.put(doc)
    created = session.by_id["r1"]["created"]
    await store.delete("acme", "r1")
    # a put that read EXISTS before the delete re-writes the index with the creation timestamp
    await store._index("acme", doc["start"], "r1", doc["call_id"], "{}", created)
    assert (await store.search("acme", SearchFilters())).items == []
    assert (await store.search("acme", SearchFilters(call_id=doc["call_id"]))).items == []


async def test_bridge_delivers_results_and_errors_across_threads() -> None:
    loop = asyncio.get_running_loop()
    threads: list[int] = []

    def compute() -> list[dict[str, Any]]:
        threads.append(threading.get_ident())
        return [{"x": 1}]

    assert await bridge(FakeResponseFuture(compute, 0.01)) == [{"x": 1}]
    assert threads[0] != threading.get_ident()  # completed on another thread
    assert await bridge(FakeResponseFuture(compute, 0)) == [{"x": 1}]  # already done: called back at once

    def boom() -> list[dict[str, Any]]:
        raise Unavailable("down", consistency=4, required_replicas=2, alive_replicas=0)

    with pytest.raises(Unavailable):
        await bridge(FakeResponseFuture(boom, 0.005))
    # a cancelled wait drops the late answer quietly (warnings are errors in this suite)
    fut = bridge(FakeResponseFuture(compute, 0.05))
    fut.cancel()
    await asyncio.sleep(0.1)
    assert fut.cancelled() and loop.is_running()
    # many at once, all delivered
    results = await asyncio.gather(*(bridge(FakeResponseFuture(lambda i=i: [i], 0.001)) for i in range(200)))
    assert results == [[i] for i in range(200)]


async def test_the_loop_is_not_blocked_while_the_driver_works() -> None:
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.005)
            ticks += 1

    t = asyncio.create_task(ticker())
    await bridge(FakeResponseFuture(lambda: time.sleep(0.2) or [], 0.001))  # type: ignore[func-returns-value]
    t.cancel()
    await asyncio.gather(t, return_exceptions=True)
    assert ticks >= 10


async def test_leases_and_audit(fake: tuple[CassandraMetadataStore, FakeSession]) -> None:
    store, session = fake
    assert await store.acquire_lease("retention", "a", 30)
    assert not await store.acquire_lease("retention", "b", 30)
    assert await store.acquire_lease("retention", "a", 30)
    assert ("lease_renew", (30, "a", "retention", "a")) in session.executed
    await store.release_lease("retention", "a")
    assert await store.acquire_lease("retention", "b", 0.2)  # TTL at least 1 s
    assert session.executed[-1] == ("lease_take", ("retention", "b", 1))
    await store.add_audit("acme", {"n": 1})
    await store.add_audit("acme", {"n": 2})
    assert await store.audit_entries("acme") == [{"n": 2}, {"n": 1}]
    await store.ping()


def test_settings_are_validated() -> None:
    assert parse_replication("NetworkTopologyStrategy:dc1=3,dc2=2") == {
        "class": "NetworkTopologyStrategy",
        "dc1": 3,
        "dc2": 2,
    }
    for bad in ("SimpleStrategy", "SimpleStrategy:0", "Simple:3", "NetworkTopologyStrategy:dc1", "x'; DROP"):
        with pytest.raises(CassandraConfigError):
            parse_replication(bad)
    assert parse_contact_point("10.0.0.1") == ("10.0.0.1", 9042)
    assert parse_contact_point("cass-1:9043") == ("cass-1", 9043)
    assert parse_contact_point("[::1]:9044") == ("::1", 9044)
    with pytest.raises(CassandraConfigError):
        parse_contact_point("a:b:c")
    with pytest.raises(CassandraConfigError):
        CassandraMetadataStore(["h"], consistency="MOST")
    with pytest.raises(CassandraConfigError):
        CassandraMetadataStore(["h"], keyspace="Bad-Name")
    with pytest.raises(CassandraConfigError):
        CassandraMetadataStore([])


def test_config_selects_the_backend() -> None:
    def cfg(ws: dict[str, Any], environ: dict[str, str] | None = None) -> config_mod.ClusterConfig:
        return config_mod.from_dict({"web_services": ws}, environ=environ or {})

    c = cfg(
        {},
        {
            "CALLVAULT_WEB_SERVICES_BACKEND": "cassandra",
            "CALLVAULT_WEB_SERVICES_CASSANDRA_CONTACT_POINTS": "c1:9042, c2",
        },
    )
    assert c.web_services.cassandra_contact_points == ["c1:9042", "c2"]
    store = create_store(c)
    assert isinstance(store, CassandraMetadataStore)
    assert store.contact_points == [("c1", 9042), ("c2", 9042)]
    # every contact point keeps its port (the compose lab publishes its nodes on 9042-9044)
    assert CassandraMetadataStore(["127.0.0.1:9043", "[::1]"]).contact_points == [
        ("127.0.0.1", 9043),
        ("::1", 9042),
    ]
    assert store.consistency == "LOCAL_QUORUM" and store.replication["replication_factor"] == 3
    for ws, field in [
        ({"backend": "mongo"}, "web_services.backend"),
        ({"backend": "cassandra"}, "web_services.cassandra_contact_points"),
        (
            {"backend": "cassandra", "cassandra_contact_points": ["h"], "cassandra_consistency": "MOST"},
            "cassandra_consistency",
        ),
        (
            {"backend": "cassandra", "cassandra_contact_points": ["h"], "cassandra_replication": "x"},
            "cassandra_replication",
        ),
        (
            {"backend": "cassandra", "cassandra_contact_points": ["h"], "cassandra_keyspace": "1x"},
            "cassandra_keyspace",
        ),
        ({"backend": "cassandra", "cassandra_contact_points": ["h:99999"]}, "cassandra_contact_points[0]"),
        ({"retention_interval": -1}, "retention_interval"),
    ]:
        with pytest.raises(config_mod.ConfigError, match=field.replace("[", r"\[").replace("]", r"\]")):
            cfg(ws)


async def test_unreachable_cluster_is_a_clear_error(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here
    store = CassandraMetadataStore([f"127.0.0.1:{port}"], connect_timeout=2)
    try:
        with pytest.raises(StoreUnavailable, match=f"Cassandra at 127.0.0.1:{port}, keyspace callvault"):
            await store.open()
    finally:
        await store.close()
    assert any("cannot open keyspace callvault" in r.getMessage() for r in caplog.records)
    # a session that fails on the schema is reported the same way
    session = FakeSession()

    def refuse_ddl(stmt: Any, params: tuple[Any, ...] = ()) -> FakeResponseFuture:
        def fail() -> list[dict[str, Any]]:
            raise Unavailable("schema refused: not enough replicas")

        return FakeResponseFuture(fail, 0.001)

    session.execute_async = refuse_ddl  # type: ignore[method-assign]
    with pytest.raises(StoreUnavailable, match="schema refused"):
        await CassandraMetadataStore(session=session).open()

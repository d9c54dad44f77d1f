"""The Cassandra metadata store (cassandra-driver), with the semantics of the SQLite store.

Schema (keyspace ``web_services.cassandra_keyspace``, created with the configured replication)::

    recordings_by_id         ((id))                  tenant, start, call_id, doc, created, deleted
    recordings_by_tenant_day ((tenant, day), start DESC, id DESC)   doc
    recordings_by_call       ((tenant, call_id), start DESC, id DESC) doc
    tenant_days              ((tenant), day DESC)    the days a tenant has recordings on
    leases                   ((name))                holder (row TTL = lease time)
    audit_by_tenant          ((tenant), ts DESC)     entry

* ``put`` is a lightweight transaction on ``recordings_by_id`` (``INSERT ... IF NOT EXISTS``): the row
  that is already there says whether the id is new, the same document, a different one or a
  tombstone. The index rows are then written ``USING TIMESTAMP <created>`` (the creation time kept
  in ``recordings_by_id``), also for a duplicate: a put that died between the two steps is repaired
  by the retry, and a late repair can never resurrect index rows deleted later (the deletes carry a
  larger timestamp).
* ``delete`` removes the index rows, then marks the by-id row deleted (``IF deleted = null``) and
  drops its document: the id stays, so a late duplicate is refused (``PutResult.DELETED``).
* ``search`` walks the tenant's day partitions newest first (``tenant_days``) or, with a call id, the
  call's partition, with the keyset ``(start, id) < cursor`` as a clustering slice; the remaining
  filters (party, direction, session, label) are applied to the documents read.
* Every statement is prepared once; reads and writes use ``cassandra_consistency``, the
  transactions ``cassandra_serial_consistency``.
* The driver's ResponseFutures complete on its I/O thread; :func:`bridge` hands their results to
  the event loop with ``loop.call_soon_threadsafe``, so nothing blocks the loop. Connecting and
  preparing (blocking in the driver) run in a worker thread.

The unit tests drive this module through a fake session (query building, the future bridge, the
interpretation of LWT answers); the backend's real proof is the contract suite
(tests/unit/web_services/test_store_contract.py) run against a Cassandra cluster with
``CASSANDRA_CONTACT_POINTS`` set.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from services.storage.metadata import format_time
from services.web_services.store import (
    MAX_LIMIT,
    MetadataStore,
    Page,
    PutResult,
    SearchFilters,
    StoreUnavailable,
    canonical,
    decode_cursor,
    encode_cursor,
)

log = logging.getLogger("callvault.web_services.cassandra")

CONSISTENCY_LEVELS = (
    "ANY",
    "ONE",
    "TWO",
    "THREE",
    "QUORUM",
    "ALL",
    "LOCAL_QUORUM",
    "EACH_QUORUM",
    "LOCAL_ONE",
)
SERIAL_CONSISTENCY_LEVELS = ("SERIAL", "LOCAL_SERIAL")
#: Above every start time (format_time gives digits; '~' sorts after them).
TOP = "~"
LAST_DAY = "9999-12-31"
DAY_PAGE = 100
_IDENT_RE = re.compile(r"[a-z][a-z0-9_]{0,47}")
_DC_RE = re.compile(r"[A-Za-z0-9_\-.]+")


class CassandraConfigError(ValueError):
    """A Cassandra setting (replication, consistency, keyspace) is malformed."""


def parse_replication(value: str) -> dict[str, Any]:
    """``SimpleStrategy:3`` or ``NetworkTopologyStrategy:dc1=3,dc2=2`` -> the CQL replication map."""
    strategy, sep, rest = value.partition(":")
    if strategy == "SimpleStrategy" and sep and rest.isdigit() and int(rest) >= 1:
        return {"class": "SimpleStrategy", "replication_factor": int(rest)}
    if strategy == "NetworkTopologyStrategy" and sep and rest:
        out: dict[str, Any] = {"class": "NetworkTopologyStrategy"}
        for item in rest.split(","):
            dc, eq, factor = item.strip().partition("=")
            if not eq or not _DC_RE.fullmatch(dc) or not factor.isdigit() or int(factor) < 1:
                break
            out[dc] = int(factor)
        else:
            return out
    raise CassandraConfigError(
        f"replication must be 'SimpleStrategy:<factor>' or "
        f"'NetworkTopologyStrategy:<dc>=<factor>[,<dc>=<factor>...]', not {value!r}"
    )


def check_keyspace(name: str) -> str:
    if not _IDENT_RE.fullmatch(name):
        raise CassandraConfigError(
            f"keyspace {name!r} must be lower-case letters, digits and '_', starting with a letter"
        )
    return name


def parse_contact_point(value: str) -> tuple[str, int]:
    """``host`` or ``host:port`` (``[v6]:port``); the port defaults to 9042."""
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\](?::(\d+))?|([^:\[\]\s]+)(?::(\d+))?", value.strip())
    if not m:
        raise CassandraConfigError(f"contact point must be host or host:port, not {value!r}")
    host = m.group(1) or m.group(3)
    port = int(m.group(2) or m.group(4) or 9042)
    if not 0 < port < 65536:
        raise CassandraConfigError(f"contact point {value!r}: port out of range")
    return host, port


def bridge(response_future: Any) -> asyncio.Future[Any]:
    """An asyncio future completed with a driver ResponseFuture's rows (or its error).

    The driver calls back on its own I/O thread; the result crosses to the event loop with
    ``call_soon_threadsafe``. Cancelling the asyncio future just drops the late result.
    """
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[Any] = loop.create_future()

    def _set(result: Any) -> None:
        if not fut.done():
            fut.set_result(result)

    def _fail(exc: BaseException) -> None:
        if not fut.done():
            fut.set_exception(exc)

    def on_ok(rows: Any) -> None:
        loop.call_soon_threadsafe(_set, rows)

    def on_err(exc: BaseException) -> None:
        loop.call_soon_threadsafe(_fail, exc)

    response_future.add_callbacks(on_ok, on_err)
    return fut


def matches(doc: dict[str, Any], f: SearchFilters) -> bool:
    """The filters not served by the partition layout, with the SQLite store's meaning."""
    if f.call_id is not None and doc.get("call_id") != f.call_id:
        return False
    if f.session_id is not None and doc.get("session_id", "") != f.session_id:
        return False
    if f.direction is not None and doc.get("direction", "") != f.direction:
        return False
    if f.party is not None:
        p = f.party
        lp = p.lower()
        if not (
            doc.get("caller", "") == p
            or doc.get("callee", "") == p
            or lp in doc.get("from_uri", "").lower()
            or lp in doc.get("to_uri", "").lower()
        ):
            return False
    if f.label is not None:
        labels = doc.get("labels") or []
        if not isinstance(labels, list) or f.label not in labels:
            return False
    return True


def upper_bound(filters: SearchFilters, after: tuple[str, str] | None) -> tuple[str, str]:
    """The exclusive keyset bound ``(start, id)`` of a search: the cursor and/or ``start_before``."""
    bound = (TOP, "")
    if filters.start_before is not None:
        bound = (format_time(filters.start_before), "")  # (s, id) < (before, "") <=> s < before
    if after is not None and after < bound:
        bound = after
    return bound


def schema(keyspace: str, replication: dict[str, Any]) -> list[str]:
    """The CQL statements creating the keyspace and its tables (idempotent)."""
    ks = check_keyspace(keyspace)
    rep = json.dumps(replication).replace('"', "'")
    return [
        f"CREATE KEYSPACE IF NOT EXISTS {ks} WITH replication = {rep}",
        f"CREATE TABLE IF NOT EXISTS {ks}.recordings_by_id (id text PRIMARY KEY, tenant text, start text,"
        " call_id text, doc text, created bigint, deleted text)",
        f"CREATE TABLE IF NOT EXISTS {ks}.recordings_by_tenant_day (tenant text, day text, start text,"
        " id text, doc text, PRIMARY KEY ((tenant, day), start, id))"
        " WITH CLUSTERING ORDER BY (start DESC, id DESC)",
        f"CREATE TABLE IF NOT EXISTS {ks}.recordings_by_call (tenant text, call_id text, start text,"
        " id text, doc text, PRIMARY KEY ((tenant, call_id), start, id))"
        " WITH CLUSTERING ORDER BY (start DESC, id DESC)",
        f"CREATE TABLE IF NOT EXISTS {ks}.tenant_days (tenant text, day text, PRIMARY KEY ((tenant), day))"
        " WITH CLUSTERING ORDER BY (day DESC)",
        f"CREATE TABLE IF NOT EXISTS {ks}.leases (name text PRIMARY KEY, holder text)",
        f"CREATE TABLE IF NOT EXISTS {ks}.audit_by_tenant (tenant text, ts timeuuid, entry text,"
        " PRIMARY KEY ((tenant), ts)) WITH CLUSTERING ORDER BY (ts DESC)",
    ]


def statements(keyspace: str) -> dict[str, str]:
    """Every CQL statement the store prepares, by name."""
    ks = check_keyspace(keyspace)
    return {
        "put": f"INSERT INTO {ks}.recordings_by_id (id, tenant, start, call_id, doc, created)"
        " VALUES (?, ?, ?, ?, ?, ?) IF NOT EXISTS",
        "get": f"SELECT tenant, start, call_id, doc, created, deleted FROM {ks}.recordings_by_id WHERE id = ?",
        "index_day": f"INSERT INTO {ks}.recordings_by_tenant_day (tenant, day, start, id, doc)"
        " VALUES (?, ?, ?, ?, ?) USING TIMESTAMP ?",
        "index_call": f"INSERT INTO {ks}.recordings_by_call (tenant, call_id, start, id, doc)"
        " VALUES (?, ?, ?, ?, ?) USING TIMESTAMP ?",
        "index_days": f"INSERT INTO {ks}.tenant_days (tenant, day) VALUES (?, ?)",
        "unindex_day": f"DELETE FROM {ks}.recordings_by_tenant_day USING TIMESTAMP ?"
        " WHERE tenant = ? AND day = ? AND start = ? AND id = ?",
        "unindex_call": f"DELETE FROM {ks}.recordings_by_call USING TIMESTAMP ?"
        " WHERE tenant = ? AND call_id = ? AND start = ? AND id = ?",
        "tombstone": f"UPDATE {ks}.recordings_by_id SET deleted = ?, doc = null WHERE id = ? IF deleted = null",
        "days": f"SELECT day FROM {ks}.tenant_days WHERE tenant = ? AND day <= ? AND day >= ? LIMIT ?",
        "days_below": f"SELECT day FROM {ks}.tenant_days WHERE tenant = ? AND day < ? AND day >= ? LIMIT ?",
        "search_day": f"SELECT start, id, doc FROM {ks}.recordings_by_tenant_day"
        " WHERE tenant = ? AND day = ? AND (start, id) < (?, ?) LIMIT ?",
        "search_call": f"SELECT start, id, doc FROM {ks}.recordings_by_call"
        " WHERE tenant = ? AND call_id = ? AND (start, id) < (?, ?) LIMIT ?",
        "lease_take": f"INSERT INTO {ks}.leases (name, holder) VALUES (?, ?) IF NOT EXISTS USING TTL ?",
        "lease_renew": f"UPDATE {ks}.leases USING TTL ? SET holder = ? WHERE name = ? IF holder = ?",
        "lease_release": f"DELETE FROM {ks}.leases WHERE name = ? IF holder = ?",
        "audit_add": f"INSERT INTO {ks}.audit_by_tenant (tenant, ts, entry) VALUES (?, ?, ?)",
        "audit_list": f"SELECT entry FROM {ks}.audit_by_tenant WHERE tenant = ? LIMIT ?",
        "ping": "SELECT release_version FROM system.local",
    }


def _now_us() -> int:
    return time.time_ns() // 1000


def _applied(rows: Sequence[dict[str, Any]]) -> tuple[bool, dict[str, Any]]:
    """The ``[applied]`` flag and the existing row of a lightweight transaction's answer."""
    row = dict(rows[0]) if rows else {}
    return bool(row.pop("[applied]", False)), row


class CassandraMetadataStore(MetadataStore):
    """Recording metadata in a Cassandra keyspace (see the module docstring for the schema)."""

    def __init__(
        self,
        contact_points: Sequence[str] = (),
        *,
        keyspace: str = "callvault",
        consistency: str = "LOCAL_QUORUM",
        serial_consistency: str = "LOCAL_SERIAL",
        replication: str = "SimpleStrategy:3",
        local_dc: str = "",
        connect_timeout: float = 10.0,
        request_timeout: float = 10.0,
        session: Any = None,
    ) -> None:
        if consistency not in CONSISTENCY_LEVELS:
            raise CassandraConfigError(
                f"consistency must be one of {', '.join(CONSISTENCY_LEVELS)}, not {consistency!r}"
            )
        if serial_consistency not in SERIAL_CONSISTENCY_LEVELS:
            raise CassandraConfigError(
                f"serial consistency must be SERIAL or LOCAL_SERIAL, not {serial_consistency!r}"
            )
        self.contact_points = [parse_contact_point(c) for c in contact_points]
        if session is None and not self.contact_points:
            raise CassandraConfigError("at least one contact point is needed")
        self.keyspace = check_keyspace(keyspace)
        self.replication = parse_replication(replication)
        self.consistency = consistency
        self.serial_consistency = serial_consistency
        self.local_dc = local_dc
        self.connect_timeout = connect_timeout
        self.request_timeout = request_timeout
        self.session: Any = session
        self._own_cluster: Any = None
        self._prepared: dict[str, Any] = {}

    # ------------------------------------------------------------------ lifecycle
    async def open(self) -> None:
        try:
            if self.session is None:
                self.session = await asyncio.to_thread(self._connect_sync)
            for cql in schema(self.keyspace, self.replication):
                await self._exec_raw(cql)
            self._prepared = await asyncio.to_thread(self._prepare_sync)
        except Exception as exc:
            where = ", ".join(f"{h}:{p}" for h, p in self.contact_points) or "the given session"
            log.error("Cassandra store: cannot open keyspace %s at %s: %s", self.keyspace, where, exc)
            raise StoreUnavailable(f"Cassandra at {where}, keyspace {self.keyspace}: {exc}") from exc
        log.info(
            "Cassandra store: keyspace %s, consistency %s/%s",
            self.keyspace,
            self.consistency,
            self.serial_consistency,
        )

    def _connect_sync(self) -> Any:
        from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile
        from cassandra.policies import DCAwareRoundRobinPolicy, TokenAwarePolicy
        from cassandra.query import dict_factory

        profile = ExecutionProfile(
            load_balancing_policy=TokenAwarePolicy(DCAwareRoundRobinPolicy(local_dc=self.local_dc)),
            row_factory=dict_factory,
            request_timeout=self.request_timeout,
        )
        cluster = Cluster(
            contact_points=list(self.contact_points),  # (host, port): nodes may listen on different ports
            execution_profiles={EXEC_PROFILE_DEFAULT: profile},
            connect_timeout=self.connect_timeout,
            protocol_version=4,
        )
        self._own_cluster = cluster
        return cluster.connect()

    def _prepare_sync(self) -> dict[str, Any]:
        from cassandra import ConsistencyLevel

        cl = ConsistencyLevel.name_to_value[self.consistency]
        serial = ConsistencyLevel.name_to_value[self.serial_consistency]
        prepared = {}
        for name, cql in statements(self.keyspace).items():
            stmt = self.session.prepare(cql)
            stmt.consistency_level = cl
            stmt.serial_consistency_level = serial
            stmt.is_idempotent = name not in (
                "put",
                "tombstone",
                "lease_take",
                "lease_renew",
                "lease_release",
            )
            prepared[name] = stmt
        return prepared

    async def close(self) -> None:
        cluster, self._own_cluster = self._own_cluster, None
        if cluster is not None:
            await asyncio.to_thread(cluster.shutdown)
            self.session = None
        self._prepared = {}

    # ------------------------------------------------------------------ execution
    async def _exec_raw(self, cql: str) -> list[dict[str, Any]]:
        if self.session is None:
            raise RuntimeError("the store is not open")
        return list(await bridge(self.session.execute_async(cql)))

    async def _exec(self, name: str, *params: Any) -> list[dict[str, Any]]:
        stmt = self._prepared.get(name)
        if stmt is None or self.session is None:
            raise RuntimeError("the store is not open")
        from cassandra import OperationTimedOut, RequestExecutionException
        from cassandra.cluster import NoHostAvailable

        try:
            return list(await bridge(self.session.execute_async(stmt, params)))
        except (RequestExecutionException, OperationTimedOut, NoHostAvailable) as exc:
            # replicas down, timeouts, no connection: the request may be retried
            raise StoreUnavailable(f"Cassandra {name}: {type(exc).__name__}: {exc}") from exc

    # ------------------------------------------------------------------ writes
    async def put(self, doc: dict[str, Any]) -> PutResult:
        text = canonical(doc)
        rid, tenant, start, call_id = doc["id"], doc["tenant"], doc["start"], doc["call_id"]
        created = _now_us()
        applied, row = _applied(await self._exec("put", rid, tenant, start, call_id, text, created))
        if applied:
            result = PutResult.CREATED
        elif row.get("deleted") is not None:
            return PutResult.DELETED
        elif row.get("doc") == text:
            result = PutResult.EXISTS
            created = int(row.get("created") or created)
        else:
            return PutResult.CONFLICT
        await self._index(tenant, start, rid, call_id, text, created)
        return result

    async def _index(self, tenant: str, start: str, rid: str, call_id: str, text: str, ts: int) -> None:
        day = start[:10]
        await asyncio.gather(
            self._exec("index_day", tenant, day, start, rid, text, ts),
            self._exec("index_call", tenant, call_id, start, rid, text, ts),
            self._exec("index_days", tenant, day),
        )

    async def delete(self, tenant: str, recording_id: str) -> dict[str, Any] | None:
        rows = await self._exec("get", recording_id)
        if not rows:
            return None
        row = rows[0]
        if row.get("tenant") != tenant or row.get("deleted") is not None or row.get("doc") is None:
            return None
        doc = dict(json.loads(row["doc"]))
        ts = max(_now_us(), int(row.get("created") or 0) + 1)
        start = row["start"]
        await asyncio.gather(
            self._exec("unindex_day", ts, tenant, start[:10], start, recording_id),
            self._exec("unindex_call", ts, tenant, row["call_id"], start, recording_id),
        )
        applied, _ = _applied(await self._exec("tombstone", format_time_now(), recording_id))
        return doc if applied else None

    # ------------------------------------------------------------------ reads
    async def get(self, tenant: str, recording_id: str) -> dict[str, Any] | None:
        rows = await self._exec("get", recording_id)
        if not rows:
            return None
        row = rows[0]
        if row.get("tenant") != tenant or row.get("deleted") is not None or row.get("doc") is None:
            return None
        return dict(json.loads(row["doc"]))

    async def search(
        self, tenant: str, filters: SearchFilters, limit: int = 50, cursor: str | None = None
    ) -> Page:
        if not 1 <= limit <= MAX_LIMIT:
            raise ValueError(f"limit must be between 1 and {MAX_LIMIT}")
        after = decode_cursor(cursor) if cursor else None
        bound = upper_bound(filters, after)
        lower = format_time(filters.start_after) if filters.start_after is not None else None
        want = limit + 1
        chunk = max(want, 100)
        found: list[tuple[str, str, dict[str, Any]]] = []

        async def scan(name: str, key: str) -> bool:
            """Read one partition below ``bound``; True once the search is complete."""
            upper = bound
            while True:
                rows = await self._exec(name, tenant, key, upper[0], upper[1], chunk)
                for r in rows:
                    if lower is not None and r["start"] < lower:
                        return True
                    doc = dict(json.loads(r["doc"]))
                    if matches(doc, filters):
                        found.append((r["start"], r["id"], doc))
                        if len(found) >= want:
                            return True
                if len(rows) < chunk:
                    return False
                upper = (rows[-1]["start"], rows[-1]["id"])

        if filters.call_id is not None:
            await scan("search_call", filters.call_id)
        else:
            top_day = LAST_DAY if bound[0] == TOP else bound[0][:10]
            low_day = lower[:10] if lower is not None else ""
            stmt, day = "days", top_day
            done = False
            while not done:
                days = [r["day"] for r in await self._exec(stmt, tenant, day, low_day, DAY_PAGE)]
                for d in days:
                    if await scan("search_day", d):
                        done = True
                        break
                if len(days) < DAY_PAGE:
                    break
                stmt, day = "days_below", days[-1]
        items = [doc for _, _, doc in found[:limit]]
        nxt = encode_cursor(found[limit - 1][0], found[limit - 1][1]) if len(found) > limit else None
        return Page(items, nxt)

    async def ping(self) -> None:
        await self._exec("ping")

    # ------------------------------------------------------------------ leases, audit
    async def acquire_lease(self, name: str, holder: str, ttl: float) -> bool:
        seconds = max(1, int(ttl))
        applied, row = _applied(await self._exec("lease_take", name, holder, seconds))
        if applied:
            return True
        if row.get("holder") != holder:
            return False
        applied, _ = _applied(await self._exec("lease_renew", seconds, holder, name, holder))
        return applied

    async def release_lease(self, name: str, holder: str) -> None:
        await self._exec("lease_release", name, holder)

    async def add_audit(self, tenant: str, entry: dict[str, Any]) -> None:
        await self._exec("audit_add", tenant, uuid.uuid1(), canonical(entry))

    async def audit_entries(self, tenant: str, limit: int = 100) -> list[dict[str, Any]]:
        return [dict(json.loads(r["entry"])) for r in await self._exec("audit_list", tenant, limit)]


def format_time_now() -> str:
    return format_time(datetime.now(UTC))


def from_config(ws: Any) -> CassandraMetadataStore:
    """The store described by a WebServicesConfig's ``cassandra_*`` settings."""
    return CassandraMetadataStore(
        ws.cassandra_contact_points,
        keyspace=ws.cassandra_keyspace,
        consistency=ws.cassandra_consistency,
        serial_consistency=ws.cassandra_serial_consistency,
        replication=ws.cassandra_replication,
        local_dc=ws.cassandra_local_dc,
    )

"""The metadata store: an async interface and its embedded SQLite implementation.

:class:`MetadataStore` is what the REST API and the retention job need, with the same semantics on
every backend (tests/unit/web_services/test_store_contract.py; the Cassandra one is in
store_cassandra.py):

* every read is scoped by tenant (the partition key's first part);
* search returns newest first with a *keyset* cursor ``(start, id)`` rather than an offset, which
  Cassandra serves by walking a tenant's day partitions backwards;
* ``put`` is an idempotent insert returning whether it created the record, found the identical one,
  found a different one, or found a tombstone of a deleted one (so a late duplicate event cannot
  resurrect a deleted recording);
* leases let one of several instances run a periodic job; the audit trail records purges.

The SQLite store keeps one connection in one dedicated worker thread: every call is a job on that
thread, which serialises them without a lock and keeps the event loop free. WAL mode lets several
Web Services processes share the file.
"""

from __future__ import annotations

import abc
import asyncio
import base64
import binascii
import concurrent.futures
import contextlib
import enum
import json
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from services.storage.metadata import format_time

T = TypeVar("T")

MAX_LIMIT = 500


class CursorError(ValueError):
    """A pagination cursor is malformed (not one this service issued)."""


class StoreUnavailable(RuntimeError):
    """The store cannot serve now (database locked or unreachable, replicas down, timeouts).

    The API answers 503 with Retry-After: the request may be retried, here or on another instance.
    """


class PutResult(enum.Enum):
    """Outcome of an idempotent insert."""

    CREATED = "created"
    EXISTS = "exists"  # the same document is already stored
    CONFLICT = "conflict"  # a different document with this id is stored
    DELETED = "deleted"  # this id was deleted; it stays deleted


@dataclass(frozen=True)
class SearchFilters:
    """Search criteria; None means "any". Times: ``start_after <= start < start_before``."""

    call_id: str | None = None
    session_id: str | None = None
    party: str | None = None
    direction: str | None = None
    label: str | None = None
    start_after: datetime | None = None
    start_before: datetime | None = None


@dataclass(frozen=True)
class Page:
    """One page of search results and the cursor of the next one (None on the last page)."""

    items: list[dict[str, Any]]
    next: str | None


def encode_cursor(start: str, rid: str) -> str:
    raw = json.dumps([start, rid], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[str, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        start, rid = json.loads(raw)
    except (binascii.Error, ValueError, TypeError):
        raise CursorError("cursor is not valid (use the 'next' value of a previous page)") from None
    if not isinstance(start, str) or not isinstance(rid, str):
        raise CursorError("cursor is not valid (use the 'next' value of a previous page)")
    return start, rid


def canonical(doc: dict[str, Any]) -> str:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


class MetadataStore(abc.ABC):
    """Recording metadata documents (already validated: see services.storage.metadata)."""

    async def open(self) -> None:  # noqa: B027 - optional hook
        """Connect / create the schema."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""

    @abc.abstractmethod
    async def put(self, doc: dict[str, Any]) -> PutResult:
        """Insert ``doc`` unless a record with its id exists (idempotent)."""

    @abc.abstractmethod
    async def get(self, tenant: str, recording_id: str) -> dict[str, Any] | None:
        """The document of ``recording_id`` if it belongs to ``tenant``."""

    @abc.abstractmethod
    async def search(
        self, tenant: str, filters: SearchFilters, limit: int = 50, cursor: str | None = None
    ) -> Page:
        """A tenant's recordings matching ``filters``, newest first (start, then id, descending)."""

    @abc.abstractmethod
    async def delete(self, tenant: str, recording_id: str) -> dict[str, Any] | None:
        """Delete and tombstone a tenant's recording; returns the deleted document or None."""

    @abc.abstractmethod
    async def ping(self) -> None:
        """Raise if the store cannot serve requests (health check)."""

    @abc.abstractmethod
    async def acquire_lease(self, name: str, holder: str, ttl: float) -> bool:
        """Take or renew the lease ``name`` for ``ttl`` seconds; False while another holder has it.

        Lets one of several Web Services instances run a periodic job (retention) at a time: a
        holder that dies loses the lease when it expires.
        """

    @abc.abstractmethod
    async def release_lease(self, name: str, holder: str) -> None:
        """Give the lease up (only if ``holder`` still holds it)."""

    @abc.abstractmethod
    async def add_audit(self, tenant: str, entry: dict[str, Any]) -> None:
        """Append an audit record (JSON object) to ``tenant``'s audit trail."""

    @abc.abstractmethod
    async def audit_entries(self, tenant: str, limit: int = 100) -> list[dict[str, Any]]:
        """``tenant``'s audit records, newest first."""


_SCHEMA = """
CREATE TABLE IF NOT EXISTS recordings (
    id          TEXT PRIMARY KEY,
    tenant      TEXT NOT NULL,
    start       TEXT NOT NULL,
    call_id     TEXT NOT NULL,
    session_id  TEXT NOT NULL,
    caller      TEXT NOT NULL,
    callee      TEXT NOT NULL,
    from_uri    TEXT NOT NULL,
    to_uri      TEXT NOT NULL,
    direction   TEXT NOT NULL,
    doc         TEXT NOT NULL,
    created     TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS recordings_tenant_start ON recordings (tenant, start, id);
CREATE INDEX IF NOT EXISTS recordings_tenant_call ON recordings (tenant, call_id);
CREATE TABLE IF NOT EXISTS tombstones (
    id          TEXT PRIMARY KEY,
    tenant      TEXT NOT NULL,
    deleted     TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS leases (
    name        TEXT PRIMARY KEY,
    holder      TEXT NOT NULL,
    expires     REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS audit (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant      TEXT NOT NULL,
    entry       TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_tenant ON audit (tenant, seq);
PRAGMA user_version = 2;
"""


@contextlib.contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """A write transaction taken up front (BEGIN IMMEDIATE), rolled back on any error."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


class SqliteMetadataStore(MetadataStore):
    """The embedded default store: one SQLite file, one connection on one dedicated thread."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path) if str(path) != ":memory:" else path
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        if self._executor is None:
            raise RuntimeError("the store is not open")
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        except sqlite3.OperationalError as exc:  # locked past busy_timeout, I/O error, disk full
            raise StoreUnavailable(f"SQLite {self.path}: {exc}") from exc

    async def open(self) -> None:
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite")
        await self._call(self._open_sync)

    def _open_sync(self) -> None:
        if isinstance(self.path, Path):
            self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(str(self.path), isolation_level=None, timeout=10.0)
        conn.execute("PRAGMA busy_timeout = 10000")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.executescript(_SCHEMA)
        self._conn = conn

    async def close(self) -> None:
        if self._executor is None:
            return
        try:
            await self._call(self._close_sync)
        finally:
            self._executor.shutdown(wait=False)
            self._executor = None

    def _close_sync(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError("the store is not open")
        return self._conn

    # -------------------------------------------------------------------------------- writes
    async def put(self, doc: dict[str, Any]) -> PutResult:
        return await self._call(self._put_sync, doc)

    def _put_sync(self, doc: dict[str, Any]) -> PutResult:
        conn = self.conn
        text = canonical(doc)
        with _transaction(conn):
            if conn.execute("SELECT 1 FROM tombstones WHERE id = ?", (doc["id"],)).fetchone():
                return PutResult.DELETED
            cur = conn.execute(
                "INSERT INTO recordings (id, tenant, start, call_id, session_id, caller, callee, from_uri,"
                " to_uri, direction, doc, created) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)"
                " ON CONFLICT (id) DO NOTHING",
                (
                    doc["id"],
                    doc["tenant"],
                    doc["start"],
                    doc["call_id"],
                    doc.get("session_id", ""),
                    doc.get("caller", ""),
                    doc.get("callee", ""),
                    doc.get("from_uri", ""),
                    doc.get("to_uri", ""),
                    doc.get("direction", ""),
                    text,
                    format_time(datetime.now().astimezone()),
                ),
            )
            if cur.rowcount == 1:
                return PutResult.CREATED
            row = conn.execute("SELECT doc FROM recordings WHERE id = ?", (doc["id"],)).fetchone()
            return PutResult.EXISTS if row and row[0] == text else PutResult.CONFLICT

    async def delete(self, tenant: str, recording_id: str) -> dict[str, Any] | None:
        return await self._call(self._delete_sync, tenant, recording_id)

    def _delete_sync(self, tenant: str, recording_id: str) -> dict[str, Any] | None:
        conn = self.conn
        with _transaction(conn):
            row = conn.execute(
                "SELECT doc FROM recordings WHERE id = ? AND tenant = ?", (recording_id, tenant)
            ).fetchone()
            if row is None:
                return None
            conn.execute("DELETE FROM recordings WHERE id = ?", (recording_id,))
            conn.execute(
                "INSERT OR REPLACE INTO tombstones (id, tenant, deleted) VALUES (?,?,?)",
                (recording_id, tenant, format_time(datetime.now().astimezone())),
            )
            return dict(json.loads(row[0]))

    # -------------------------------------------------------------------------------- reads
    async def get(self, tenant: str, recording_id: str) -> dict[str, Any] | None:
        return await self._call(self._get_sync, tenant, recording_id)

    def _get_sync(self, tenant: str, recording_id: str) -> dict[str, Any] | None:
        row = self.conn.execute(
            "SELECT doc FROM recordings WHERE id = ? AND tenant = ?", (recording_id, tenant)
        ).fetchone()
        return dict(json.loads(row[0])) if row else None

    async def search(
        self, tenant: str, filters: SearchFilters, limit: int = 50, cursor: str | None = None
    ) -> Page:
        if not 1 <= limit <= MAX_LIMIT:
            raise ValueError(f"limit must be between 1 and {MAX_LIMIT}")
        after = decode_cursor(cursor) if cursor else None
        return await self._call(self._search_sync, tenant, filters, limit, after)

    def _search_sync(self, tenant: str, f: SearchFilters, limit: int, after: tuple[str, str] | None) -> Page:
        where = ["tenant = ?"]
        args: list[Any] = [tenant]
        if f.call_id is not None:
            where.append("call_id = ?")
            args.append(f.call_id)
        if f.session_id is not None:
            where.append("session_id = ?")
            args.append(f.session_id)
        if f.direction is not None:
            where.append("direction = ?")
            args.append(f.direction)
        if f.start_after is not None:
            where.append("start >= ?")
            args.append(format_time(f.start_after))
        if f.start_before is not None:
            where.append("start < ?")
            args.append(format_time(f.start_before))
        if f.party is not None:
            # user part exactly, or a case-insensitive substring of either URI
            where.append(
                "(caller = ? OR callee = ? OR instr(lower(from_uri), lower(?)) > 0"
                " OR instr(lower(to_uri), lower(?)) > 0)"
            )
            args += [f.party] * 4
        if f.label is not None:
            where.append("EXISTS (SELECT 1 FROM json_each(doc, '$.labels') WHERE value = ?)")
            args.append(f.label)
        if after is not None:
            where.append("(start < ? OR (start = ? AND id < ?))")
            args += [after[0], after[0], after[1]]
        sql = (
            f"SELECT start, id, doc FROM recordings WHERE {' AND '.join(where)}"
            " ORDER BY start DESC, id DESC LIMIT ?"
        )
        rows = self.conn.execute(sql, [*args, limit + 1]).fetchall()
        more = len(rows) > limit
        rows = rows[:limit]
        items = [dict(json.loads(doc)) for _, _, doc in rows]
        nxt = encode_cursor(rows[-1][0], rows[-1][1]) if more else None
        return Page(items, nxt)

    async def ping(self) -> None:
        await self._call(lambda: self.conn.execute("SELECT 1").fetchone())

    # -------------------------------------------------------------------------------- leases, audit
    async def acquire_lease(self, name: str, holder: str, ttl: float) -> bool:
        return await self._call(self._acquire_sync, name, holder, ttl)

    def _acquire_sync(self, name: str, holder: str, ttl: float) -> bool:
        conn = self.conn
        now = time.time()
        with _transaction(conn):
            row = conn.execute("SELECT holder, expires FROM leases WHERE name = ?", (name,)).fetchone()
            if row is not None and row[0] != holder and row[1] > now:
                return False
            conn.execute(
                "INSERT OR REPLACE INTO leases (name, holder, expires) VALUES (?,?,?)",
                (name, holder, now + ttl),
            )
            return True

    async def release_lease(self, name: str, holder: str) -> None:
        def _release() -> None:
            with _transaction(self.conn):
                self.conn.execute("DELETE FROM leases WHERE name = ? AND holder = ?", (name, holder))

        await self._call(_release)

    async def add_audit(self, tenant: str, entry: dict[str, Any]) -> None:
        def _add() -> None:
            with _transaction(self.conn):
                self.conn.execute(
                    "INSERT INTO audit (tenant, entry) VALUES (?, ?)", (tenant, canonical(entry))
                )

        await self._call(_add)

    async def audit_entries(self, tenant: str, limit: int = 100) -> list[dict[str, Any]]:
        def _list() -> list[dict[str, Any]]:
            rows = self.conn.execute(
                "SELECT entry FROM audit WHERE tenant = ? ORDER BY seq DESC LIMIT ?", (tenant, limit)
            ).fetchall()
            return [dict(json.loads(r[0])) for r in rows]

        return await self._call(_list)


def create_store(config: Any) -> MetadataStore:
    """The metadata store a ClusterConfig's ``web_services.backend`` names (not opened yet)."""
    ws = config.web_services
    if ws.backend == "cassandra":
        from services.web_services.store_cassandra import from_config

        return from_config(ws)
    return SqliteMetadataStore(config.path(ws.database))

"""Recording-session affinity: which MCP holds each recording session and its dialogs.

The RM places the first dialog (part) of a recording session (``X-CV-Session``) on an MCP and sends
every later part of the same session to the same MCP while that MCP is healthy. In-dialog requests
need no look-up (they are loose-routed to the MCP's Contact, RFC 3261 16.12), so the store matters for
new parts, for the load count of each MCP, and for telling which sessions an MCP failure affects.

Issue 5 makes the RM active/active with this state shared between instances. The store is therefore
an interface (:class:`AffinityStore`) whose records are plain data (:meth:`AffinityEntry.to_dict`),
every method takes ``now`` (epoch seconds, comparable between hosts) instead of reading a clock, and
every change is reported to listeners as a plain-data operation that a replicating implementation can
ship to its peer. :class:`InMemoryAffinityStore` is the single-instance implementation.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("callvault.rm.affinity")


@dataclass
class DialogRef:
    """One dialog (part) of a recording session, as the proxy sees it."""

    call_id: str
    from_tag: str
    mcp: str
    to_tag: str = ""
    confirmed: bool = False  # a 2xx was relayed
    #: The UAC's (SIP Server's) Contact URI and transport: where the RM sends the BYE that ends
    #: this dialog when its MCP dies (issue 5, MCP failure).
    contact: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "call_id": self.call_id,
            "from_tag": self.from_tag,
            "to_tag": self.to_tag,
            "mcp": self.mcp,
            "confirmed": self.confirmed,
            "contact": self.contact,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DialogRef:
        return cls(
            call_id=str(d["call_id"]),
            from_tag=str(d.get("from_tag", "")),
            mcp=str(d["mcp"]),
            to_tag=str(d.get("to_tag", "")),
            confirmed=bool(d.get("confirmed", False)),
            contact=str(d.get("contact", "")),
        )


@dataclass
class AffinityEntry:
    """A recording session: the MCP its parts go to and its live dialogs."""

    session_id: str
    mcp: str
    tenant: str = ""
    dialogs: list[DialogRef] = field(default_factory=list)
    created: float = 0.0
    updated: float = 0.0  # last activity; the TTL counts from here

    def to_dict(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id,
            "mcp": self.mcp,
            "tenant": self.tenant,
            "dialogs": [d.to_dict() for d in self.dialogs],
            "created": self.created,
            "updated": self.updated,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AffinityEntry:
        return cls(
            session_id=str(d["session_id"]),
            mcp=str(d["mcp"]),
            tenant=str(d.get("tenant", "")),
            dialogs=[DialogRef.from_dict(x) for x in d.get("dialogs", [])],
            created=float(d.get("created", 0.0)),
            updated=float(d.get("updated", 0.0)),
        )

    def dialog(self, call_id: str) -> DialogRef | None:
        return next((d for d in self.dialogs if d.call_id == call_id), None)


#: A change, as plain data: ("put", entry dict) or ("remove", {"session_id": ...}).
Change = tuple[str, dict[str, Any]]


class AffinityStore(abc.ABC):
    """Session -> MCP affinity with the dialogs of each session.

    Implementations return copies: mutating a returned entry never changes the store.
    """

    def __init__(self) -> None:
        self.listeners: list[Callable[[Change], None]] = []

    def _notify(self, change: Change) -> None:
        for listener in list(self.listeners):
            try:
                listener(change)
            except Exception:  # a replication hiccup must not break call routing
                log.exception("affinity listener failed on %s", change[0])

    @abc.abstractmethod
    def get(self, session_id: str) -> AffinityEntry | None:
        """The session's entry, or None."""

    @abc.abstractmethod
    def by_call_id(self, call_id: str) -> AffinityEntry | None:
        """The entry of the session that owns dialog ``call_id``, or None."""

    @abc.abstractmethod
    def place(self, session_id: str, dialog: DialogRef, *, tenant: str, now: float) -> AffinityEntry:
        """Record that ``dialog`` of ``session_id`` goes to ``dialog.mcp`` (which becomes the
        session's MCP for later parts). Creates the entry when needed."""

    @abc.abstractmethod
    def confirm(self, call_id: str, to_tag: str, now: float) -> None:
        """The dialog's INVITE got a 2xx: the dialog is established."""

    @abc.abstractmethod
    def touch(self, call_id: str, now: float) -> None:
        """An in-dialog request passed: keep the session alive (TTL)."""

    @abc.abstractmethod
    def end(self, call_id: str, now: float) -> AffinityEntry | None:
        """The dialog ended (BYE answered 2xx, or its INVITE failed). The session is removed with its
        last dialog. Returns the session's entry as it is now (or was, when removed), None if unknown."""

    @abc.abstractmethod
    def entries(self) -> list[AffinityEntry]:
        """Every session."""

    @abc.abstractmethod
    def remove(self, session_id: str) -> AffinityEntry | None:
        """Drop a session regardless of its dialogs."""

    # -- derived queries (work on any implementation) -------------------------------------------
    def active_dialogs(self) -> dict[str, int]:
        """MCP name -> number of live dialogs placed on it (the RM's own view of each MCP's load)."""
        counts: dict[str, int] = {}
        for entry in self.entries():
            for d in entry.dialogs:
                counts[d.mcp] = counts.get(d.mcp, 0) + 1
        return counts

    def sessions_on(self, mcp: str) -> list[AffinityEntry]:
        """Sessions with at least one dialog on ``mcp``."""
        return [e for e in self.entries() if any(d.mcp == mcp for d in e.dialogs)]

    def expire(self, now: float, ttl: float) -> list[AffinityEntry]:
        """Remove sessions idle for longer than ``ttl`` seconds; returns them."""
        expired = [e for e in self.entries() if now - e.updated > ttl]
        for e in expired:
            self.remove(e.session_id)
        return expired

    def snapshot(self) -> list[dict[str, Any]]:
        """The whole state as plain data (for a peer RM resynchronising)."""
        return [e.to_dict() for e in self.entries()]

    @abc.abstractmethod
    def restore(self, snapshot: list[dict[str, Any]]) -> None:
        """Replace the state with a :meth:`snapshot`."""

    def apply(self, change: Change) -> None:
        """Apply a change reported by a peer's store (without re-reporting it)."""
        kind, data = change
        listeners, self.listeners = self.listeners, []
        try:
            if kind == "put":
                self._put(AffinityEntry.from_dict(data))
            elif kind == "remove":
                self.remove(str(data["session_id"]))
            else:
                raise ValueError(f"unknown affinity change {kind!r}")
        finally:
            self.listeners = listeners

    @abc.abstractmethod
    def _put(self, entry: AffinityEntry) -> None:
        """Store ``entry`` as is (replacing any entry of the same session)."""


class InMemoryAffinityStore(AffinityStore):
    """The single-instance store: dicts of plain data in this process."""

    def __init__(self) -> None:
        super().__init__()
        self._sessions: dict[str, dict[str, Any]] = {}
        self._calls: dict[str, str] = {}  # call_id -> session_id

    def __len__(self) -> int:
        return len(self._sessions)

    def get(self, session_id: str) -> AffinityEntry | None:
        d = self._sessions.get(session_id)
        return AffinityEntry.from_dict(d) if d is not None else None

    def by_call_id(self, call_id: str) -> AffinityEntry | None:
        sid = self._calls.get(call_id)
        return self.get(sid) if sid is not None else None

    def entries(self) -> list[AffinityEntry]:
        return [AffinityEntry.from_dict(d) for d in self._sessions.values()]

    def _put(self, entry: AffinityEntry) -> None:
        old = self._sessions.get(entry.session_id)
        if old is not None:
            for d in old["dialogs"]:
                self._calls.pop(d["call_id"], None)
        self._sessions[entry.session_id] = entry.to_dict()
        for d in entry.dialogs:
            self._calls[d.call_id] = entry.session_id
        self._notify(("put", entry.to_dict()))

    def place(self, session_id: str, dialog: DialogRef, *, tenant: str, now: float) -> AffinityEntry:
        entry = self.get(session_id) or AffinityEntry(session_id, dialog.mcp, tenant, [], now, now)
        previous = self.by_call_id(dialog.call_id)
        if previous is not None and previous.session_id != session_id:
            self._drop_dialog(previous, dialog.call_id, now)
        entry.dialogs = [d for d in entry.dialogs if d.call_id != dialog.call_id] + [dialog]
        entry.mcp = dialog.mcp
        entry.tenant = tenant or entry.tenant
        entry.updated = now
        self._put(entry)
        return entry

    def confirm(self, call_id: str, to_tag: str, now: float) -> None:
        entry = self.by_call_id(call_id)
        if entry is None:
            return
        d = entry.dialog(call_id)
        if d is not None:
            d.to_tag = to_tag
            d.confirmed = True
        entry.updated = now
        self._put(entry)

    def touch(self, call_id: str, now: float) -> None:
        entry = self.by_call_id(call_id)
        if entry is not None:
            entry.updated = now
            self._put(entry)

    def end(self, call_id: str, now: float) -> AffinityEntry | None:
        entry = self.by_call_id(call_id)
        if entry is None:
            return None
        return self._drop_dialog(entry, call_id, now)

    def _drop_dialog(self, entry: AffinityEntry, call_id: str, now: float) -> AffinityEntry:
        entry.dialogs = [d for d in entry.dialogs if d.call_id != call_id]
        entry.updated = now
        if entry.dialogs:
            self._put(entry)
        else:
            self.remove(entry.session_id)
        return entry

    def remove(self, session_id: str) -> AffinityEntry | None:
        d = self._sessions.pop(session_id, None)
        if d is None:
            return None
        for dialog in d["dialogs"]:
            if self._calls.get(dialog["call_id"]) == session_id:
                del self._calls[dialog["call_id"]]
        self._notify(("remove", {"session_id": session_id}))
        return AffinityEntry.from_dict(d)

    def restore(self, snapshot: list[dict[str, Any]]) -> None:
        self._sessions.clear()
        self._calls.clear()
        for d in snapshot:
            self._put(AffinityEntry.from_dict(d))

"""Affinity replication between the RMs of an active/active pair (or more): one TCP link per pair.

Every RM of ``[[resource_manager.instances]]`` listens on its ``replication_port``; of two RMs, the
one whose name sorts first connects to the other (and retries every ``RECONNECT`` seconds while the
peer is away), so that each pair has exactly one link and the changes of each side arrive in order.
The link is symmetric: as soon as it is up, each side sends a snapshot of its
:class:`~services.resource_manager.affinity.AffinityStore`, then every change its store reports.

Wire format: one JSON object per line (UTF-8), at most ``MAX_LINE`` bytes::

    {"t": "hello", "name": "rm1"}                    first line on each side
    {"t": "snapshot", "entries": [entry dict, ...]}  the sender's whole state
    {"t": "put", "entry": {...}} / {"t": "remove", "session_id": "..."}   one change
    {"t": "mcp_down", "mcp": "mcp1"}                 the sender found this MCP dead

:class:`LinkCodec` is the sans-I/O part (encode, decode, apply to a store); :class:`Replicator`
moves lines over asyncio streams. A snapshot is merged, not substituted: an entry of the peer
replaces ours only when it is at least as recent (``updated``); sessions we have and the peer does
not are kept (they may have been placed here while the link was down; the TTL sweeps leftovers).
A peer that sends garbage is logged and disconnected; the link is then re-established.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .affinity import AffinityEntry, AffinityStore, Change

log = logging.getLogger("callvault.rm.replication")

MAX_LINE = 4 * 1024 * 1024  # a snapshot of ~10000 sessions
RECONNECT = 0.2  # seconds between connection attempts to an absent peer
#: Changes queued for a slow peer before the link is dropped and resynchronised by snapshot.
MAX_BACKLOG = 100_000


class ReplicationError(ValueError):
    """A line from the peer that is not a valid replication message."""


@dataclass
class Peer:
    """Another RM: its name and replication address."""

    name: str
    host: str
    port: int


class LinkCodec:
    """Sans-I/O: messages to lines and back, and their effect on a store."""

    @staticmethod
    def hello(name: str) -> bytes:
        return _line({"t": "hello", "name": name})

    @staticmethod
    def snapshot(store: AffinityStore) -> bytes:
        return _line({"t": "snapshot", "entries": store.snapshot()})

    @staticmethod
    def change(change: Change) -> bytes:
        kind, data = change
        if kind == "put":
            return _line({"t": "put", "entry": data})
        if kind == "remove":
            return _line({"t": "remove", "session_id": data["session_id"]})
        raise ReplicationError(f"unknown affinity change {kind!r}")

    @staticmethod
    def decode(line: bytes) -> dict[str, Any]:
        try:
            msg = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ReplicationError(f"not JSON: {exc}") from None
        if not isinstance(msg, dict) or msg.get("t") not in (
            "hello",
            "snapshot",
            "put",
            "remove",
            "mcp_down",
        ):
            raise ReplicationError(f"unknown message {str(msg)[:80]!r}")
        return msg

    @staticmethod
    def apply(store: AffinityStore, msg: dict[str, Any]) -> int:
        """Apply a decoded message; returns the number of sessions it touched."""
        try:
            kind = msg["t"]
            if kind == "put":
                store.apply(("put", AffinityEntry.from_dict(msg["entry"]).to_dict()))
                return 1
            if kind == "remove":
                store.apply(("remove", {"session_id": str(msg["session_id"])}))
                return 1
            if kind == "snapshot":
                entries = [AffinityEntry.from_dict(d) for d in msg["entries"]]
                touched = 0
                for entry in entries:
                    ours = store.get(entry.session_id)
                    if ours is None or entry.updated >= ours.updated:
                        store.apply(("put", entry.to_dict()))
                        touched += 1
                return touched
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ReplicationError(f"bad {msg.get('t')} message: {exc!r}") from None
        return 0


async def _reachable(peer: Peer, timeout: float) -> bool:
    """Whether the peer's replication port accepts connections (the peer runs)."""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(peer.host, peer.port), min(1.0, timeout))
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(Exception):
        await writer.wait_closed()
    return True


def _line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


class Replicator:
    """The links of one RM to its peers (asyncio)."""

    def __init__(
        self,
        name: str,
        store: AffinityStore,
        *,
        host: str,
        port: int,
        peers: list[Peer],
        on_sync: Callable[[str], None] | None = None,
        on_mcp_down: Callable[[str, str], None] | None = None,
    ) -> None:
        self.name = name
        self.store = store
        self.host = host
        self.port = port
        self.peers = peers
        self.on_sync = on_sync
        #: (mcp, peer name) when a peer reports an MCP dead
        self.on_mcp_down = on_mcp_down
        self.synced: dict[str, asyncio.Event] = {p.name: asyncio.Event() for p in peers}
        self._queues: dict[str, asyncio.Queue[bytes]] = {}
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        store.listeners.append(self._on_change)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accepted, self.host, self.port, limit=MAX_LINE)
        self.port = self._server.sockets[0].getsockname()[1]
        for peer in self.peers:
            if self.name < peer.name:
                self._spawn(self._connect_loop(peer))
        log.info(
            "affinity replication on %s:%d with %s", self.host, self.port,
            ", ".join(f"{p.name} ({p.host}:{p.port})" for p in self.peers) or "no peer",
        )  # fmt: skip

    async def wait_synced(self, timeout: float) -> list[str]:
        """Wait until the snapshot of every peer that is up arrived (a peer whose replication port
        refuses connections is not waited for), at most ``timeout``; returns the peers synced."""

        async def one(peer: Peer) -> None:
            if not self.synced[peer.name].is_set() and await _reachable(peer, timeout):
                await self.synced[peer.name].wait()

        if self.peers:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*(one(p) for p in self.peers)), timeout)
        return [name for name, e in self.synced.items() if e.is_set()]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=2.0)
        with contextlib.suppress(ValueError):
            self.store.listeners.remove(self._on_change)

    # -- internals ---------------------------------------------------------------------------------
    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def mcp_down(self, mcp: str) -> None:
        """Tell every peer that this RM found ``mcp`` dead (after the affinity changes it made)."""
        self._broadcast(_line({"t": "mcp_down", "mcp": mcp}))

    def _on_change(self, change: Change) -> None:
        self._broadcast(LinkCodec.change(change))

    def _broadcast(self, line: bytes) -> None:
        for peer, queue in list(self._queues.items()):
            if queue.qsize() >= MAX_BACKLOG:
                log.error("replication to %s is %d changes behind; resynchronising", peer, queue.qsize())
                queue.put_nowait(b"")  # tells the writer to drop the link
            else:
                queue.put_nowait(line)

    async def _connect_loop(self, peer: Peer) -> None:
        warned = False
        while True:
            try:
                reader, writer = await asyncio.open_connection(peer.host, peer.port, limit=MAX_LINE)
            except OSError as exc:
                if not warned:
                    log.warning(
                        "replication peer %s (%s:%d) unreachable: %s", peer.name, peer.host, peer.port, exc
                    )
                    warned = True
                await asyncio.sleep(RECONNECT)
                continue
            warned = False
            await self._run_link(reader, writer, expect=peer.name)
            await asyncio.sleep(RECONNECT)

    async def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            await self._run_link(reader, writer, expect=None)
        finally:
            if task is not None:
                self._tasks.discard(task)

    async def _run_link(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, expect: str | None
    ) -> None:
        peer_addr = writer.get_extra_info("peername")
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        name = expect or f"{peer_addr}"
        sender: asyncio.Task[None] | None = None
        try:
            writer.write(LinkCodec.hello(self.name))
            first = await asyncio.wait_for(reader.readline(), 5.0)
            if not first:
                log.debug("replication connection from %s closed before its hello (a probe)", peer_addr)
                return
            hello = LinkCodec.decode(first)
            if hello.get("t") != "hello" or not isinstance(hello.get("name"), str):
                raise ReplicationError("the first line is not a hello")
            name = hello["name"]
            if expect is not None and name != expect:
                raise ReplicationError(f"expected peer {expect!r}, got {name!r}")
            if name not in self.synced:
                raise ReplicationError(f"peer {name!r} is not configured")
            # Register the queue before the snapshot: no change falls between the two.
            old = self._queues.get(name)
            if old is not None:
                old.put_nowait(b"")  # an older link of the same peer: let it go
            self._queues[name] = queue
            writer.write(LinkCodec.snapshot(self.store))
            sender = asyncio.ensure_future(self._send(queue, writer))
            log.info("replication link with %s up", name)
            while True:
                line = await reader.readline()
                if not line:
                    break
                if not line.endswith(b"\n"):
                    raise ReplicationError("line too long or cut short")
                msg = LinkCodec.decode(line)
                if msg["t"] == "mcp_down":
                    if self.on_mcp_down is not None and isinstance(msg.get("mcp"), str):
                        self.on_mcp_down(msg["mcp"], name)
                    continue
                touched = LinkCodec.apply(self.store, msg)
                if msg["t"] == "snapshot":
                    log.info("snapshot from %s: %d session(s) merged", name, touched)
                    self.synced[name].set()
                    if self.on_sync is not None:
                        self.on_sync(name)
                if sender.done():
                    break
        except (ReplicationError, TimeoutError, asyncio.LimitOverrunError, ValueError) as exc:
            log.warning("replication link with %s dropped: %s", name, exc)
        except (ConnectionError, OSError) as exc:
            log.info("replication link with %s lost: %s", name, exc)
        finally:
            if self._queues.get(name) is queue:
                del self._queues[name]
            if sender is not None:
                sender.cancel()
            writer.close()  # not awaited: a cancelled link must not wait on its peer
            log.info("replication link with %s down", name)

    @staticmethod
    async def _send(queue: asyncio.Queue[bytes], writer: asyncio.StreamWriter) -> None:
        while True:
            line = await queue.get()
            if not line:
                writer.close()  # the reading side sees the end of the link too
                return
            writer.write(line)
            if queue.empty():
                await writer.drain()

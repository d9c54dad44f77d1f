"""Affinity replication between the RMs of an active/active pair (or more): one TCP link per pair.

Every RM of ``[[resource_manager.instances]]`` listens on its ``replication_port``; of two RMs, the
one whose name sorts first connects to the other (and retries every ``RECONNECT`` seconds while the
peer is away), so that each pair has exactly one link and the changes of each side arrive in order.
The link is symmetric: as soon as it is up, each side sends a snapshot of its
:class:`~services.resource_manager.affinity.AffinityStore`, then every change its store reports.

Wire format: one JSON object per line (UTF-8), at most ``MAX_LINE`` bytes::

    {"t": "hello", "name": "rm1", "nonce": "..."}    first line on each side
    {"t": "auth", "mac": "..."}                      second line on each side
    {"t": "snapshot", "entries": [entry dict, ...]}  the sender's whole state
    {"t": "put", "entry": {...}} / {"t": "remove", "session_id": "..."}   one change
    {"t": "mcp_down", "mcp": "mcp1"}                 the sender found this MCP dead

The link is authenticated with the pair's shared secret (``resource_manager.replication_secret``)
by :mod:`services.ha_auth`, as the SIP Servers' link is: each side answers the other's hello nonce
with an HMAC over that nonce, its name and its role on the connection (``dial`` / ``accept``, so
that an RM cannot be used to answer a challenge on a stranger's behalf), and nothing is sent nor
applied before the peer's answer verified. Every later line carries an HMAC under a key of this
connection with an implicit sequence number (:class:`~services.ha_auth.Sealer`), so a line that is
injected, altered or replayed is refused. A connection or line that fails is dropped, counted
(:attr:`Replicator.auth_failures`) and logged at WARNING with the peer's address.

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

from services import ha_auth

from .affinity import AffinityEntry, AffinityStore, Change

log = logging.getLogger("callvault.rm.replication")

MAX_LINE = 4 * 1024 * 1024  # a snapshot of ~10000 sessions
RECONNECT = 0.2  # seconds between connection attempts to an absent peer
#: Changes queued for a slow peer before the link is dropped and resynchronised by snapshot.
MAX_BACKLOG = 100_000
#: Label of the RM link's HMACs (distinct from the SIP Server pair's).
AUTH_CONTEXT = "callvault-rm"
#: Seconds a connection has for its hello, then for its auth.
HANDSHAKE_TIMEOUT = 5.0
MESSAGE_TYPES = ("hello", "auth", "snapshot", "put", "remove", "mcp_down")


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
    def hello(name: str, nonce: str = "") -> bytes:
        return _line({"t": "hello", "name": name, "nonce": nonce})

    @staticmethod
    def auth(secret: bytes, peer_nonce: str, name: str, role: str) -> bytes:
        """Our answer to the peer's challenge: we are ``name`` and ``role`` ('dial' or 'accept')."""
        return _line({"t": "auth", "mac": ha_auth.mac(secret, peer_nonce, f"{name}\n{role}", AUTH_CONTEXT)})

    @staticmethod
    def verify_auth(secret: bytes, my_nonce: str, peer: str, peer_role: str, msg: dict[str, Any]) -> None:
        """Raises :class:`~services.ha_auth.AuthError` unless ``msg`` is ``peer``'s valid answer,
        in ``peer_role``, to our challenge ``my_nonce``."""
        if msg.get("t") != "auth":
            raise ha_auth.AuthError(f"{str(msg.get('t'))[:20]!r} message instead of auth")
        if "mac" not in msg:
            raise ha_auth.AuthError("auth without a MAC")
        if not ha_auth.verify(secret, my_nonce, f"{peer}\n{peer_role}", msg["mac"], AUTH_CONTEXT):
            raise ha_auth.AuthError(f"bad MAC in the auth of {peer!r} (not the pair's secret, or replayed)")

    @staticmethod
    def session(
        secret: bytes, me: str, peer: str, *, dialled: bool, my_nonce: str, peer_nonce: str
    ) -> tuple[ha_auth.Sealer, ha_auth.Opener]:
        """What seals our lines and opens the peer's on one authenticated connection."""
        dialler, acceptor = (my_nonce, peer_nonce) if dialled else (peer_nonce, my_nonce)
        key = ha_auth.session_key(secret, AUTH_CONTEXT, dialler, acceptor)
        return ha_auth.Sealer(key, me), ha_auth.Opener(key, peer)

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
        if not isinstance(msg, dict) or msg.get("t") not in MESSAGE_TYPES:
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
        secret: bytes,
        on_sync: Callable[[str], None] | None = None,
        on_mcp_down: Callable[[str, str], None] | None = None,
    ) -> None:
        if not secret:
            raise ValueError("affinity replication needs the pair's shared secret")
        self.name = name
        self.store = store
        self._secret = secret
        #: Connections and lines refused because they did not prove the secret (see the module doc).
        self.auth_failures = 0
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
        dialled = expect is not None
        nonce = ha_auth.new_nonce()
        authenticated = False
        try:
            writer.write(LinkCodec.hello(self.name, nonce))
            first = await asyncio.wait_for(reader.readline(), HANDSHAKE_TIMEOUT)
            if not first:
                log.debug("replication connection from %s closed before its hello (a probe)", peer_addr)
                return
            hello = LinkCodec.decode(first)
            if hello.get("t") != "hello" or not isinstance(hello.get("name"), str):
                raise ha_auth.AuthError(f"the first line is a {str(hello.get('t'))[:20]!r}, not a hello")
            claimed, peer_nonce = hello["name"], hello.get("nonce")
            if not isinstance(peer_nonce, str) or len(peer_nonce) < 2 * ha_auth.NONCE_BYTES:
                raise ha_auth.AuthError("hello without a nonce")
            if expect is not None and claimed != expect:
                raise ReplicationError(f"expected peer {expect!r}, got {claimed!r}")
            if claimed not in self.synced:
                raise ha_auth.AuthError(f"peer {claimed[:40]!r} is not configured")
            role, peer_role = ("dial", "accept") if dialled else ("accept", "dial")
            writer.write(LinkCodec.auth(self._secret, peer_nonce, self.name, role))
            answer = await asyncio.wait_for(reader.readline(), HANDSHAKE_TIMEOUT)
            if not answer:
                log.info("replication connection from %s (%s) closed before its auth", peer_addr, claimed)
                return
            LinkCodec.verify_auth(self._secret, nonce, claimed, peer_role, LinkCodec.decode(answer))
            name, authenticated = claimed, True
            sealer, opener = LinkCodec.session(
                self._secret, self.name, name, dialled=dialled, my_nonce=nonce, peer_nonce=peer_nonce
            )
            # Register the queue before the snapshot: no change falls between the two.
            old = self._queues.get(name)
            if old is not None:
                old.put_nowait(b"")  # an older link of the same peer: let it go
            self._queues[name] = queue
            writer.write(sealer.seal(LinkCodec.snapshot(self.store)))
            sender = asyncio.ensure_future(self._send(queue, writer, sealer))
            log.info("replication link with %s (%s) up, authenticated", name, peer_addr)
            while True:
                line = await reader.readline()
                if not line:
                    break
                if not line.endswith(b"\n"):
                    raise ReplicationError("line too long or cut short")
                msg = LinkCodec.decode(opener.open(line))
                if msg["t"] in ("hello", "auth"):
                    raise ReplicationError(f"{msg['t']} message on an established link")
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
        except (ha_auth.AuthError, ReplicationError, TimeoutError, ValueError) as exc:
            if not isinstance(exc, ha_auth.AuthError) and authenticated:
                log.warning("replication link with %s (%s) dropped: %s", name, peer_addr, exc)
                return
            # Anything but a valid answer first, or a line whose MAC fails: nothing of it was applied;
            # a real peer's link is re-established by its dialler and resynchronised by snapshot.
            self.auth_failures += 1
            log.warning(
                "replication: message from %s (%s) refused, connection dropped: %s "
                "(%d authentication failure(s) so far)", peer_addr, name, exc, self.auth_failures,
            )  # fmt: skip
        except (ConnectionError, OSError) as exc:
            log.info("replication link with %s lost: %s", name, exc)
        finally:
            if self._queues.get(name) is queue:
                del self._queues[name]
            if sender is not None:
                sender.cancel()
            writer.close()  # not awaited: a cancelled link must not wait on its peer
            if sender is not None:
                log.info("replication link with %s down", name)

    @staticmethod
    async def _send(
        queue: asyncio.Queue[bytes], writer: asyncio.StreamWriter, sealer: ha_auth.Sealer
    ) -> None:
        while True:
            line = await queue.get()
            if not line:
                writer.close()  # the reading side sees the end of the link too
                return
            writer.write(sealer.seal(line))
            if queue.empty():
                await writer.drain()

"""Active / hot-standby SIP Server pair: the asyncio glue around :mod:`.replication` (issue 5).

A :class:`HaNode` is one SIP Server of the pair. Both listen for their peer's replication
connection on ``sip_server.replication_port``; the one whose replication address is lower dials the
other (so there is one connection at most). After the hellos, the active one sends its whole state
(a snapshot) and then every change; heartbeats flow both ways every ``heartbeat_interval``.

- A standby that hears nothing for ``heartbeat_interval * heartbeat_misses`` with the connection
  gone declares the active dead and takes over: it runs ``takeover_command`` (if any), builds a
  :class:`~services.sip_server.daemon.SipServer` from its replica (calls, bindings, recently ended
  dialogs) and binds the SIP address, retrying for ``bind_timeout`` while the dead peer's sockets
  are freed. If it cannot bind (the peer still holds the address), it stays standby.
- A node that starts finds its peer (or waits a window for it): an active peer makes it a standby
  (a restarted old primary rejoins so), no peer or a standby peer makes it active; two actives that
  meet (after a partition) keep the one :func:`~.replication.preferred` by a deterministic rule and
  the other yields (logged): it drops its calls, runs ``release_command`` and resynchronises.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any

from services.config import ClusterConfig, parse_hostport
from services.sip_server import replication as rp
from services.sip_server.call import CallPhase, CallState
from services.sip_server.registrar import BindingStore
from services.sip_server.replication import NodeInfo, NodeState, PeerLiveness

log = logging.getLogger(__name__)

#: Call phases worth replicating: a call still being set up cannot be taken over (its INVITE
#: transaction dies with the process; the caller's retransmission or retry starts it afresh).
REPLICATED_PHASES = (CallPhase.ANSWERED, CallPhase.CONFIRMED, CallPhase.ENDING)
#: Calls (and AORs) per piece of a snapshot.
SNAPSHOT_CHUNK = 200
#: A standby too slow to read the stream is cut off beyond this much unsent data (it resyncs).
MAX_BACKLOG = 32 * 1024 * 1024


class _Peer:
    """The replication connection to the peer: framing on top of an asyncio stream pair."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, dialled: bool) -> None:
        self.reader = reader
        self.writer = writer
        self.dialled = dialled
        self.decoder = rp.FrameDecoder()
        self.info: NodeInfo | None = None  # the peer's last hello, once it authenticated
        self.pending: NodeInfo | None = None  # its hello before that
        self.nonce = secrets.token_hex(16)  # what the peer must answer (auth)
        self.authenticated = False
        self.closed = False

    def send(self, message: dict[str, Any]) -> None:
        if self.closed:
            return
        if self.writer.transport.get_write_buffer_size() > MAX_BACKLOG:
            log.error("HA: the peer does not keep up with replication; closing the connection")
            self.close()
            return
        self.writer.write(rp.encode(message))

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.writer.close()


class HaNode:
    """One SIP Server of an active / hot-standby pair."""

    def __init__(
        self,
        config: ClusterConfig,
        *,
        ready: Callable[[], None] | None = None,
        server_factory: Callable[[ClusterConfig], Any] | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        sip = config.sip_server
        self.config = config
        self.sip = sip
        self._ready = ready
        self._factory = server_factory
        self.clock = clock
        self.monotonic = monotonic
        self.node = sip.node_name or f"{sip.replication_host}:{sip.replication_port}"
        secret = sip.replication_secret or sip.nonce_secret
        if not secret:
            log.warning(
                "HA: no replication_secret nor nonce_secret: the replication link is not authenticated"
            )
        self.secret = secret.encode("utf-8")
        self.priority = rp.PRIORITY[sip.role]
        self.peer_addr = parse_hostport(sip.peer, "sip_server.peer")
        self.dialler = (sip.replication_host, sip.replication_port) < self.peer_addr
        self.state = NodeState.STANDBY
        self.epoch = 0
        self.replica = rp.Replica()
        self.server: Any = None  # the SipServer while active
        self.monitor = rp.HeartbeatMonitor(sip.heartbeat_interval, sip.heartbeat_misses, monotonic())
        self.peer: _Peer | None = None
        self.activations = 0
        self._listener: asyncio.Server | None = None
        self._busy = False  # a takeover or a yield is under way
        self._published: set[str] = set()
        self._dirty: dict[str, CallState] = {}
        self._dirty_aors: set[tuple[str, str]] = set()
        self._flush_scheduled = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._readied = False
        self.changed = asyncio.Event()  # set on every state change (tests)

    # ------------------------------------------------------------------ lifecycle
    def info(self) -> NodeInfo:
        return NodeInfo(self.node, self.state, self.epoch, self.priority)

    async def run(self) -> None:
        """Listen, find the peer, serve or stand by, until cancelled."""
        self._listener = await asyncio.start_server(
            self._accepted, self.sip.replication_host, self.sip.replication_port, reuse_address=True
        )
        log.info(
            "HA: node %s (%s) replication on %s:%d, peer %s:%d, heartbeat %.0f ms x %d",
            self.node,
            self.sip.role,
            self.sip.replication_host,
            self.sip.replication_port,
            *self.peer_addr,
            self.sip.heartbeat_interval * 1000,
            self.sip.heartbeat_misses,
        )
        tick = min(0.05, self.sip.heartbeat_interval / 4)
        last_beat = 0.0
        next_dial = 0.0
        try:
            while True:
                now = self.monotonic()
                if self.peer is not None and now - last_beat >= self.sip.heartbeat_interval:
                    last_beat = now
                    self.peer.send(rp.heartbeat(self.clock()))
                liveness = self.monitor.state(now)
                if liveness == PeerLiveness.SILENT and self.peer is not None:
                    log.warning(
                        "HA: peer silent for %.0f ms; closing the connection", self.monitor.window * 1000
                    )
                    self.peer.close()
                if self.peer is None and self.dialler and now >= next_dial:
                    next_dial = now + self.sip.heartbeat_interval
                    self._spawn(self._dial())
                if self.state == NodeState.STANDBY and not self._busy and liveness == PeerLiveness.DEAD:
                    why = "no peer found" if not self.monitor.heard_ever else "the active peer is dead"
                    self._spawn(self.activate(why))
                delay = tick
                if liveness in (PeerLiveness.LOST, PeerLiveness.UNKNOWN) and self.state == NodeState.STANDBY:
                    # wake up right at the end of the window, not up to a tick later
                    delay = max(0.002, min(tick, self.monitor.deadline() - self.monotonic()))
                await asyncio.sleep(delay)
        finally:
            await self.close()

    async def close(self) -> None:
        """Stop. An active node with a synchronised standby hands over: it sends every pending
        change, releases the SIP address without ending any call and tells the standby to take
        over at once (a planned switch-over, e.g. for an upgrade). Without a standby it shuts its
        SIP Server down gracefully (calls ended by BYE)."""
        if self._listener is not None:
            self._listener.close()
        peer = self.peer
        if (
            self.state == NodeState.ACTIVE
            and self.server is not None
            and peer is not None
            and peer.info is not None
            and peer.info.state == NodeState.STANDBY
            and not peer.closed
        ):
            server, self.server = self.server, None
            self._flush()
            await server.abandon()
            if self.sip.release_command:
                await _run_command("release", self.sip.release_command)
            peer.send({"type": rp.HANDOVER, "epoch": self.epoch})
            with contextlib.suppress(Exception):
                await asyncio.wait_for(peer.writer.drain(), 2.0)
            log.warning(
                "HA: stopping: handed the SIP address and %d call(s) over to the standby",
                len(self._published),
            )
        if self.peer is not None:
            self.peer.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.server is not None:
            server, self.server = self.server, None
            await server.stop()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("HA task failed", exc_info=task.exception())

    def _mark_ready(self) -> None:
        if not self._readied and self._ready is not None:
            self._readied = True
            self._ready()

    # ------------------------------------------------------------------ the connection
    async def _dial(self) -> None:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(*self.peer_addr), self.sip.heartbeat_interval * 2
            )
        except (OSError, TimeoutError):
            return
        if self.peer is not None:
            writer.close()
            return
        await self._session(_Peer(reader, writer, dialled=True))

    async def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.peer is not None:
            log.warning(
                "HA: a second replication connection from %s refused", writer.get_extra_info("peername")
            )
            writer.close()
            return
        await self._session(_Peer(reader, writer, dialled=False))

    async def _session(self, peer: _Peer) -> None:
        self.peer = peer
        self.monitor.on_connected(self.monotonic())
        log.info("HA: connected to the peer (%s)", "dialled" if peer.dialled else "accepted")
        peer.send(rp.hello(self.node, self.state, self.epoch, self.priority, peer.nonce))
        try:
            while not peer.closed:
                data = await peer.reader.read(262144)
                if not data:
                    break
                for message in peer.decoder.feed(data):
                    self.monitor.on_message(self.monotonic())
                    await self._on_message(peer, message)
        except rp.ReplicationError as exc:
            log.error("HA: bad replication stream from the peer: %s; closing", exc)
        except (ConnectionError, OSError) as exc:
            log.info("HA: replication connection error: %s", exc)
        finally:
            peer.close()
            if self.peer is peer:
                self.peer = None
                self.monitor.on_disconnected(self.monotonic())
                log.warning(
                    "HA: replication connection to the peer %s is gone (%s)",
                    peer.info.node if peer.info else "?",
                    self.state.value,
                )

    async def _on_message(self, peer: _Peer, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == rp.HEARTBEAT:
            return
        if kind == rp.HELLO:
            info = NodeInfo.from_hello(message)
            if info.node == self.node:
                raise rp.ReplicationError(f"the peer claims our own node name {info.node!r}")
            if not peer.authenticated:
                if peer.pending is None:
                    peer.send(rp.auth_message(self.secret, str(message.get("nonce", "")), self.node))
                peer.pending = info
                return
            peer.info = info
            await self._on_hello(peer, info)
            return
        if kind == rp.AUTH:
            if peer.authenticated:
                return
            if peer.pending is None or not rp.verify_auth(
                self.secret, peer.nonce, peer.pending.node, message
            ):
                raise rp.ReplicationError("the peer failed to authenticate (not our pair's secret)")
            peer.authenticated = True
            peer.info = peer.pending
            await self._on_hello(peer, peer.info)
            return
        if not peer.authenticated:
            raise rp.ReplicationError(f"{kind} message before authentication")
        if self.state != NodeState.STANDBY or peer.info is None or peer.info.state != NodeState.ACTIVE:
            log.warning("HA: %s message ignored (we are %s)", kind, self.state.value)
            return
        if kind == rp.HANDOVER:
            await self.activate(f"the active peer {peer.info.node} handed over (it is stopping)")
            return
        self.replica.apply(message, self.clock())
        if kind == rp.SNAPSHOT:
            self.epoch = max(self.epoch, self.replica.epoch)
            log.info(
                "HA: standby synchronised: %d call(s), %d binding(s), epoch %d",
                len(self.replica.calls),
                self.replica.bindings.count(),
                self.replica.epoch,
            )
            self._mark_ready()

    async def _on_hello(self, peer: _Peer, info: NodeInfo) -> None:
        me = self.info()
        log.info(
            "HA: peer %s is %s (epoch %d, priority %d); we are %s (epoch %d)",
            info.node,
            info.state.value,
            info.epoch,
            info.priority,
            me.state.value,
            me.epoch,
        )
        if self._busy:
            return
        decision = rp.decide(me, info)
        if decision == NodeState.STANDBY:
            log.warning(
                "HA: split brain: both %s and %s are active; %s yields (epoch %d vs %d, priority %d vs %d)",
                me.node,
                info.node,
                me.node,
                me.epoch,
                info.epoch,
                me.priority,
                info.priority,
            )
            await self.yield_to_peer()
            return
        if decision == NodeState.ACTIVE:
            await self.activate(f"the peer {info.node} is a standby too")
            return
        if self.state == NodeState.ACTIVE and info.state == NodeState.STANDBY:
            await self._send_snapshot(peer)

    async def _send_snapshot(self, peer: _Peer) -> None:
        """The whole state, in pieces of SNAPSHOT_CHUNK calls and AORs: the snapshot message with
        the first piece, then ``call`` / ``aor`` messages, yielding to the event loop in between
        (a big state neither blocks the loop nor makes one huge message). Each piece is taken as it
        is when sent; changes in between are published as usual, so the standby ends up with the
        latest of everything (a call ended meanwhile is skipped, its call_end already went)."""
        server = self.server
        if server is None:
            return
        calls = [c for c in server.b2bua.calls.values() if c.state.phase in REPLICATED_PHASES]
        store = server.registrar.store
        aors = list(store.bindings)
        n = SNAPSHOT_CHUNK
        first = BindingStore({key: store.bindings[key] for key in aors[:n]})
        peer.send(
            rp.snapshot_message(
                self.epoch, [c.state.to_dict() for c in calls[:n]], first, server.b2bua.ended_dialogs
            )
        )
        for i in range(n, max(len(calls), len(aors)), n):
            await asyncio.sleep(0)
            if peer.closed or self.server is not server:
                return
            for c in calls[i : i + n]:
                if c.state.phase in REPLICATED_PHASES:
                    peer.send(rp.call_message(c.state.to_dict()))
            now = self.clock()
            for tenant, extension in aors[i : i + n]:
                contacts = store.bindings.get((tenant, extension), [])
                peer.send(rp.aor_message(tenant, extension, [b for b in contacts if b.expires_at > now]))
        log.info("HA: snapshot sent to the standby: %d call(s), %d binding(s)", len(calls), store.count())

    def _hello_all(self) -> None:
        if self.peer is not None:
            self.peer.send(rp.hello(self.node, self.state, self.epoch, self.priority, self.peer.nonce))
        self.changed.set()

    # ------------------------------------------------------------------ takeover / yield
    async def activate(self, reason: str) -> bool:
        """Become the active node: takeover command, SIP Server from the replica, bind (retried)."""
        if self.state == NodeState.ACTIVE or self._busy:
            return False
        self._busy = True
        t0 = self.monotonic()
        try:
            log.warning("HA: taking over (%s)", reason)
            if self.sip.takeover_command:
                await _run_command("takeover", self.sip.takeover_command)
            server = self._build_server()
            deadline = self.monotonic() + self.sip.bind_timeout
            attempts = 0
            while True:
                attempts += 1
                try:
                    await server.start()
                    break
                except OSError as exc:
                    if self.monotonic() >= deadline:
                        log.error(
                            "HA: cannot bind the SIP address %s:%d (%s) after %d attempts; staying standby",
                            self.sip.host,
                            self.sip.port,
                            exc,
                            attempts,
                        )
                        self.monitor.on_connected(self.monotonic())  # a fresh window before retrying
                        self.monitor.on_disconnected(self.monotonic())
                        return False
                    await asyncio.sleep(0.02)
            self.server = server
            self.epoch = (
                max(
                    self.epoch,
                    self.replica.epoch,
                    self.peer.info.epoch if self.peer and self.peer.info else 0,
                )
                + 1
            )
            self.state = NodeState.ACTIVE
            self.activations += 1
            self.replica = rp.Replica()
            log.warning(
                "HA: ACTIVE at %.3f (epoch %d): serving %d call(s) and %d binding(s) from the replica, "
                "%.0f ms after deciding, %d bind attempt(s)",
                self.clock(),
                self.epoch,
                len(server.b2bua.calls),
                server.registrar.store.count(),
                (self.monotonic() - t0) * 1000,
                attempts,
            )
            self._hello_all()
            peer = self.peer
            if peer is not None and peer.info is not None and peer.info.state == NodeState.STANDBY:
                await self._send_snapshot(peer)  # a standby already connected (both were standby)
            self._mark_ready()
            return True
        finally:
            self._busy = False

    def _build_server(self) -> Any:
        from services.sip_server.daemon import SipServer

        server = self._factory(self.config) if self._factory is not None else SipServer(self.config)
        server.registrar.store = self.replica.bindings
        server.b2bua.ended_dialogs = dict(self.replica.ended)
        adopted = 0
        for data in self.replica.calls.values():
            try:
                server.b2bua.adopt(CallState.from_dict(data))
                adopted += 1
            except (KeyError, TypeError, ValueError) as exc:
                log.error("HA: replicated call %s cannot be adopted: %r", str(data.get("id"))[:8], exc)
        self._published = set(server.b2bua.calls)
        server.b2bua.on_change = self._call_changed
        server.registrar.on_change = self._aor_changed
        return server

    async def yield_to_peer(self) -> None:
        """Stop serving without ending calls (the peer holds them now), become its standby."""
        if self.state != NodeState.ACTIVE or self._busy:
            return
        self._busy = True
        try:
            server, self.server = self.server, None
            if server is not None:
                await server.abandon()
            if self.sip.release_command:
                await _run_command("release", self.sip.release_command)
            self.state = NodeState.STANDBY
            self.replica = rp.Replica()
            self._dirty.clear()
            self._dirty_aors.clear()
            log.warning("HA: STANDBY now (yielded to the peer)")
            self._hello_all()
        finally:
            self._busy = False

    # ------------------------------------------------------------------ publishing changes
    def _call_changed(self, state: CallState) -> None:
        self._dirty[state.id] = state
        self._schedule_flush()

    def _aor_changed(self, tenant: str, extension: str) -> None:
        self._dirty_aors.add((tenant, extension))
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        """Send the latest state of everything changed since the last flush (coalesced)."""
        self._flush_scheduled = False
        dirty, self._dirty = self._dirty, {}
        aors, self._dirty_aors = self._dirty_aors, set()
        peer = self.peer
        send = peer is not None and peer.info is not None and peer.info.state == NodeState.STANDBY
        for call_id, state in dirty.items():
            if state.phase == CallPhase.ENDED:
                if call_id in self._published:
                    self._published.discard(call_id)
                    if send:
                        keys = [
                            (leg.dialog.call_id, leg.dialog.local_tag) for leg in state.legs() if leg.dialog
                        ]
                        assert peer is not None
                        peer.send(rp.call_end_message(call_id, keys, self.clock() + rp.ENDED_TTL))
            elif state.phase in REPLICATED_PHASES:
                self._published.add(call_id)
                if send:
                    assert peer is not None
                    peer.send(rp.call_message(state.to_dict()))
        if send and self.server is not None:
            assert peer is not None
            now = self.clock()
            for tenant, extension in aors:
                contacts = list(self.server.registrar.store.bindings.get((tenant, extension), []))
                peer.send(rp.aor_message(tenant, extension, [b for b in contacts if b.expires_at > now]))


async def _run_command(what: str, command: str, timeout: float = 10.0) -> None:
    """Run a takeover/release shell command; failures are logged, not fatal."""
    t0 = time.monotonic()
    try:
        proc = await asyncio.create_subprocess_shell(
            command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        log.error("HA: %s command did not finish within %.0f s: %s", what, timeout, command)
        return
    except OSError as exc:
        log.error("HA: %s command could not run (%s): %s", what, exc, command)
        return
    text = out.decode("utf-8", "replace").strip()[-500:]
    if proc.returncode != 0:
        log.error(
            "HA: %s command exited %s: %s%s", what, proc.returncode, command, f" ({text})" if text else ""
        )
    else:
        log.info("HA: %s command ran in %.0f ms: %s", what, (time.monotonic() - t0) * 1000, command)

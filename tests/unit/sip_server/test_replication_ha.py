"""Two HA nodes in one process on loopback (issue 5): takeover after a crash serves the replicated
calls consistently (a re-sent re-INVITE or BYE the dead active already handled), and two actives
that meet after a partition keep exactly one."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from services.config import ClusterConfig, ConfigError
from services.sip.dialog import Dialog
from services.sip.message import Request, Response
from services.sip_server import ha
from services.sip_server import replication as rp
from services.sip_server.daemon import SipServer
from services.sip_server.ha import HaNode
from services.sip_server.registrar import BindingStore
from services.sip_server.replication import NodeState
from tests.helpers.sipp import free_tcp_port as free_port  # UDP+TCP, below the ephemeral range
from tests.integration.sip_ua import FAST, Phone, phone_sdp
from tests.integration.test_sip_server import PASSWORDS, FakeBridge, make_config, wait_for

HB = {"heartbeat_interval": 0.05, "heartbeat_misses": 3}


@contextlib.contextmanager
def unreachable_port() -> Iterator[int]:
    """A TCP port bound but not listening for as long as it is needed: connections are refused and
    nobody else can take it (a peer that is down)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def node_config(rm_port: int, sip_port: int, me: int, peer: int, name: str, role: str) -> ClusterConfig:
    cfg = make_config(rm_port, **HB)
    s = cfg.sip_server
    s.port, s.replication_port, s.peer, s.node_name, s.role = sip_port, me, f"127.0.0.1:{peer}", name, role
    return cfg


class Node:
    """An HaNode run as a task, which a test can crash (no BYEs, sockets gone) like kill -9."""

    def __init__(self, cfg: ClusterConfig) -> None:
        self.ha = HaNode(cfg, server_factory=lambda c: SipServer(c, timers=FAST))
        self.task = asyncio.ensure_future(self.ha.run())

    async def crash(self) -> None:
        server, self.ha.server = self.ha.server, None
        if server is not None:
            await server.abandon()
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task

    async def stop(self) -> None:
        if not self.task.done():
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task


@contextlib.asynccontextmanager
async def pair() -> AsyncIterator[tuple[Node, Node, FakeBridge, int]]:
    bridge = FakeBridge()
    await bridge.ep.start()
    sip, ra, rb = free_port(), free_port(), free_port()
    a = Node(node_config(bridge.ep.port, sip, ra, rb, "node-a", "primary"))
    nodes = [a]
    try:
        await wait_for(lambda: a.ha.state == NodeState.ACTIVE)
        b = Node(node_config(bridge.ep.port, sip, rb, ra, "node-b", "standby"))
        nodes.append(b)
        await wait_for(lambda: b.ha.replica.synced)
        yield a, b, bridge, sip
    finally:
        for n in nodes:
            await n.stop()
        await bridge.ep.close()


async def phone(user: str, sip: int) -> Phone:
    domain = "rec.test" if user.startswith("2") else "lab.test"
    p = await Phone(user, PASSWORDS[user], ("127.0.0.1", sip), domain).start()
    assert (await p.register()).status == 200
    return p


async def send(p: Phone, req: Request) -> Response:
    """Send an in-dialog request (a copy: the caller may send the same one again), ACK a 2xx INVITE."""
    out = req.copy()
    resp = await p.ep.request(out, p.server)
    if req.method == "INVITE" and 200 <= resp.status < 300:
        dialog = p.dialogs[(req.call_id, req.from_.tag or "")]
        p.ep.send_ack(dialog.create_ack(req), p.server)
    return resp


def in_dialog(p: Phone, dialog: Dialog, method: str, body: bytes = b"") -> Request:
    req = dialog.create_request(method, body=body, content_type="application/sdp" if body else None)
    if method == "INVITE":
        req.headers.add("Contact", f"<{p.contact}>")
    return req


async def call(caller: Phone, callee: Phone) -> tuple[Dialog, Dialog]:
    out = await caller.call(callee.user)
    inc = await callee.next_call()
    assert await inc.answer() is not None
    assert (await out.final()).status == 200
    assert out.dialog is not None and inc.dialog is not None
    return out.dialog, inc.dialog


async def test_takeover_serves_replicated_calls_consistently(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    async with pair() as (a, b, bridge, sip):
        p2001, p2002, p1001, p1002 = [await phone(u, sip) for u in ("2001", "2002", "1001", "1002")]
        rec_a, rec_b = await call(p2001, p2002)  # recorded: three dialogs
        plain_a, _ = await call(p1001, p1002)  # not recorded
        assert len(bridge.invites) >= 2  # bridge INVITE and its re-INVITE with B's media
        # hold from 2001, then 1001 hangs up: both handled by the active, replicated
        hold = in_dialog(p2001, rec_a, "INVITE", phone_sdp(p2001.rtp_port, version=2, direction="sendonly"))
        first = await send(p2001, hold)
        assert first.status == 200
        bye = in_dialog(p1001, plain_a, "BYE")
        assert (await send(p1001, bye)).status == 200
        await p1002.next_request()  # the BYE relayed to 1002
        await wait_for(lambda: len(b.ha.replica.calls) == 1 and len(b.ha.replica.ended) >= 2)
        assert b.ha.replica.bindings.count() == 4

        await a.crash()
        await wait_for(lambda: b.ha.state == NodeState.ACTIVE, 3.0)
        assert "HA: taking over (the active peer is dead)" in caplog.text
        server = b.ha.server
        assert server is not None and len(server.b2bua.calls) == 1

        # the re-INVITE sent again with the CSeq the replica saw: the same answer, not 500
        again = await send(p2001, hold)
        assert again.status == 200 and again.body == first.body
        # the BYE sent again for the call the old active ended: 200, not 481
        assert (await send(p1001, bye)).status == 200
        # a 2xx to a re-INVITE the dead active sent to 2002 and never ACKed: the new active ACKs it
        acks: list[Request] = []
        p2002.ep.ack_handler = lambda ack, source, transport: acks.append(ack)
        gone = Response(200)
        for name, value in [
            ("Via", f"SIP/2.0/UDP 127.0.0.1:{sip};branch=z9hG4bKdeadactive;rport"),
            ("From", f"<sip:2001@rec.test>;tag={rec_b.remote_tag}"),
            ("To", f"<sip:2002@rec.test>;tag={rec_b.local_tag}"),
            ("Call-ID", rec_b.call_id),
            ("CSeq", "7 INVITE"),
            ("Contact", f"<{p2002.contact}>"),
        ]:
            gone.headers.add(name, value)
        p2002.ep.send_stateless(gone, ("127.0.0.1", sip))
        await wait_for(lambda: bool(acks))
        assert acks[0].cseq.seq == 7 and acks[0].call_id == rec_b.call_id
        assert "ACK for a 2xx on leg b that no transaction awaited" in caplog.text
        # the MCP re-INVITEs the bridge: answered from the replica with what was last offered it
        assert bridge.dialog is not None
        mcp_reinvite = bridge.dialog.create_request("INVITE")
        host, port, transport = bridge.dialog.next_hop()
        mcp_answer = await bridge.ep.request(mcp_reinvite.copy(), (host, port), transport)
        assert mcp_answer.status == 200 and b"a=label:caller" in mcp_answer.body
        bridge.ep.send_ack(bridge.dialog.create_ack(mcp_reinvite), (host, port), transport)
        # a session refresh the new active owes 2001 (its replicated timer is due) goes out
        [adopted] = server.b2bua.calls.values()
        adopted.state.a.timer.refresher, adopted.state.a.timer.deadline = "local", 1.0
        refresh_out = await p2001.next_request()
        assert refresh_out.method in ("UPDATE", "INVITE") and refresh_out.cseq.seq > 100, refresh_out
        # session refresh from the callee, then its BYE: ends every leg, the bridge's too
        refresh = in_dialog(p2002, rec_b, "UPDATE")
        assert (await send(p2002, refresh)).status == 200
        assert (await send(p2002, in_dialog(p2002, rec_b, "BYE"))).status == 200
        got = await p2001.next_request()
        while got.method != "BYE":
            got = await p2001.next_request()
        mcp_bye = await asyncio.wait_for(bridge.byes.get(), 5.0)
        # our CSeq on the bridge leg jumped past anything the dead active may have sent
        assert mcp_bye.cseq.seq > 100
        await wait_for(lambda: not server.b2bua.calls)
        # new calls work through the new active
        new_a, _ = await call(p1001, p1002)
        assert (await send(p1001, in_dialog(p1001, new_a, "BYE"))).status == 200
        for p in (p2001, p2002, p1001, p1002):
            await p.close()


async def test_restarted_primary_joins_the_new_active_as_standby(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ha, "SNAPSHOT_CHUNK", 1)  # the snapshot in pieces: 1 call + 1 AOR, then 1 AOR
    async with pair() as (a, b, _bridge, sip):
        p1001, p1002 = await phone("1001", sip), await phone("1002", sip)
        dialog, _ = await call(p1001, p1002)
        await a.crash()
        await wait_for(lambda: b.ha.state == NodeState.ACTIVE, 3.0)
        cfg = a.ha.config
        again = Node(cfg)
        try:
            await wait_for(lambda: again.ha.replica.synced, 3.0)
            assert again.ha.state == NodeState.STANDBY and b.ha.state == NodeState.ACTIVE
            assert len(again.ha.replica.calls) == 1 and again.ha.replica.epoch == b.ha.epoch == 2
            await wait_for(lambda: again.ha.replica.bindings.count() == 2)
            assert (await send(p1001, in_dialog(p1001, dialog, "BYE"))).status == 200
            await wait_for(lambda: not again.ha.replica.calls)  # the end replicated too
        finally:
            await again.stop()
            await p1001.close()
            await p1002.close()


async def test_a_stopping_active_hands_over_without_ending_calls(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    async with pair() as (a, b, _bridge, sip):
        p1001, p1002 = await phone("1001", sip), await phone("1002", sip)
        dialog, _ = await call(p1001, p1002)
        await wait_for(lambda: len(b.ha.replica.calls) == 1)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await a.stop()  # SIGTERM: graceful stop of the active
        await wait_for(lambda: b.ha.state == NodeState.ACTIVE, 3.0)
        handover = loop.time() - t0
        assert handover < 0.1, f"handover took {handover * 1000:.0f} ms (the dead-peer window is 150 ms)"
        assert "handed over (it is stopping)" in caplog.text
        assert p1001.received.empty() and p1002.received.empty()  # nobody got a BYE
        assert (await send(p1001, in_dialog(p1001, dialog, "BYE"))).status == 200
        assert (await p1002.next_request()).method == "BYE"
        await p1001.close()
        await p1002.close()


async def test_two_actives_after_a_partition_keep_one(caplog: pytest.LogCaptureFixture) -> None:
    """Each node alone (peer unreachable) becomes active on its own SIP address; once they can reach
    each other, exactly one stays active and the other yields, resynchronised from the winner."""
    bridge = FakeBridge()
    await bridge.ep.start()
    ra, rb = free_port(), free_port()
    down = contextlib.ExitStack()
    nowhere = down.enter_context(unreachable_port())
    a = Node(node_config(bridge.ep.port, free_port(), ra, nowhere, "node-a", "standby"))
    b = Node(node_config(bridge.ep.port, free_port(), rb, nowhere, "node-b", "primary"))
    try:
        await wait_for(lambda: a.ha.state == b.ha.state == NodeState.ACTIVE, 3.0)
        assert a.ha.server is not None and b.ha.server is not None
        p1001 = await phone("1001", b.ha.server.port)
        # the partition heals: each can now reach the other
        for node, peer in ((a, rb), (b, ra)):
            node.ha.peer_addr = ("127.0.0.1", peer)
            node.ha.dialler = (node.ha.sip.replication_host, node.ha.sip.replication_port) < node.ha.peer_addr
        await wait_for(lambda: NodeState.STANDBY in (a.ha.state, b.ha.state), 3.0)
        await wait_for(lambda: a.ha.replica.synced, 3.0)
        # same epoch: the primary (higher priority) stays, the standby-by-configuration yields
        assert b.ha.state == NodeState.ACTIVE and a.ha.state == NodeState.STANDBY
        assert a.ha.server is None
        assert "split brain" in caplog.text and "node-a yields" in caplog.text
        assert a.ha.replica.bindings.count() == 1
        await asyncio.sleep(0.3)  # and it stays so
        assert (a.ha.state, b.ha.state) == (NodeState.STANDBY, NodeState.ACTIVE)
        await p1001.close()
    finally:
        await a.stop()
        await b.stop()
        await bridge.ep.close()
        down.close()


async def test_started_together_the_primary_serves_and_the_standby_syncs() -> None:
    """Both nodes start at once (as compose starts them): they meet as standbys within the start-up
    window, the primary takes over at once and the standby gets its snapshot."""
    bridge = FakeBridge()
    await bridge.ep.start()
    sip, ra, rb = free_port(), free_port(), free_port()
    b = Node(node_config(bridge.ep.port, sip, rb, ra, "node-b", "standby"))
    a = Node(node_config(bridge.ep.port, sip, ra, rb, "node-a", "primary"))
    try:
        await wait_for(lambda: a.ha.state == NodeState.ACTIVE and b.ha.replica.synced, 3.0)
        assert b.ha.state == NodeState.STANDBY and b.ha.activations == 0
        p1001 = await phone("1001", sip)
        await wait_for(lambda: b.ha.replica.bindings.count() == 1)
        await p1001.close()
    finally:
        await b.stop()
        await a.stop()
        await bridge.ep.close()


async def test_a_stranger_on_the_replication_port_gets_nothing(caplog: pytest.LogCaptureFixture) -> None:
    """Without the pair's secret: no snapshot, no yield, the connection closed with an error logged."""
    bridge = FakeBridge()
    await bridge.ep.start()
    ra = free_port()
    down = contextlib.ExitStack()
    nowhere = down.enter_context(unreachable_port())
    a = Node(node_config(bridge.ep.port, free_port(), ra, nowhere, "node-a", "standby"))
    try:
        await wait_for(lambda: a.ha.state == NodeState.ACTIVE, 3.0)
        attempts: list[list[dict[str, Any]]] = [
            # a wrong secret, claiming to be an active of a higher epoch
            [
                rp.hello("intruder", NodeState.ACTIVE, 99, 2, "x"),
                rp.auth_message(b"guessed", "whatever", "intruder"),
            ],
            # no auth at all, pushing a snapshot
            [
                rp.hello("intruder", NodeState.ACTIVE, 99, 2, "x"),
                rp.snapshot_message(99, [], BindingStore(), {}),
            ],
        ]
        for messages in attempts:
            reader, writer = await asyncio.open_connection("127.0.0.1", ra)
            decoder = rp.FrameDecoder()
            got: list[dict[str, Any]] = []
            for m in messages:
                writer.write(rp.encode(m))
            while data := await asyncio.wait_for(reader.read(65536), 3.0):
                got += decoder.feed(data)
            writer.close()
            assert [m["type"] for m in got] in (["hello"], ["hello", "auth"]), got
            assert a.ha.state == NodeState.ACTIVE and a.ha.epoch == 1
        assert "the peer failed to authenticate" in caplog.text
        assert "snapshot message before authentication" in caplog.text
    finally:
        await a.stop()
        await bridge.ep.close()
        down.close()


def test_node_needs_consistent_config() -> None:
    cfg: Any = make_config(5070, **HB)
    with pytest.raises(ConfigError, match=r"sip_server\.peer"):
        HaNode(cfg)


class _Client:
    def __init__(self, request: Request) -> None:
        self.request = request

    async def final(self) -> Response:
        return Response(200)

    def cancel(self) -> None:
        pass


class _Endpoint:
    """Just enough of SipEndpoint for the B2BUA to send requests; records them."""

    host, port, advertised_host = "127.0.0.1", 5060, "127.0.0.1"

    def __init__(self) -> None:
        self.sent: list[tuple[Request, tuple[str, int]]] = []

    def start_request(
        self, request: Request, dest: tuple[str, int], transport: str = "udp", **_: Any
    ) -> _Client:
        self.sent.append((request, dest))
        return _Client(request)

    def send_ack(self, ack: Request, dest: tuple[str, int], transport: str = "udp") -> None:
        self.sent.append((ack, dest))

    def contact_uri(self, user: str | None = None, transport: str = "udp") -> Any:
        from services.sip.uri import SipUri

        return SipUri.parse("sip:127.0.0.1:5060")


async def test_a_call_adopted_while_ending_is_ended_on_every_leg() -> None:
    """The active died while BYEs were going out: which ones left is unknown, so the new active
    sends BYE on every leg that has a dialog and forgets the call."""
    from services.sip.auth import DigestChallenger
    from services.sip_server.b2bua import B2BUA
    from services.sip_server.call import CallPhase
    from services.sip_server.registrar import Registrar
    from tests.unit.sip_server.test_replication import invite, make_call

    cfg = make_config(5070)
    challenger = DigestChallenger("callvault", b"secret")
    endpoint = _Endpoint()
    b2bua = B2BUA(cfg, endpoint, Registrar(cfg, challenger), challenger)
    state = make_call(1)
    state.b.dialog = Dialog.from_uas(invite(2), "btag")
    state.b.dest = ("127.0.0.1", 5072, "udp")
    state.phase = CallPhase.ENDING
    state.a.confirmed = state.b.confirmed = False  # as _bye leaves them before its BYE is out
    call = b2bua.adopt(state)
    await asyncio.wait_for(call.ended.wait(), 2.0)
    byes = [req for req, _ in endpoint.sent if req.method == "BYE"]
    assert sorted(r.call_id for r in byes) == ["call-1@10.0.0.1", "call-2@10.0.0.1"]
    assert all(r.cseq.seq > 100 for r in byes)
    assert not b2bua.calls and ("call-1@10.0.0.1", "our1") in b2bua.ended_dialogs

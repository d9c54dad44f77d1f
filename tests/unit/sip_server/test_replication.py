"""The hot-standby replication core (issue 5): stream codec, replica, heartbeat monitor, role rules."""

from __future__ import annotations

import json
import struct
from typing import Any

import pytest

from services.sip.dialog import Dialog
from services.sip.message import Request, parse_message
from services.sip_server import replication as rp
from services.sip_server.call import CallPhase, CallState, Leg, SessionTimer
from services.sip_server.registrar import Binding, BindingStore
from services.sip_server.replication import (
    FrameDecoder,
    HeartbeatMonitor,
    NodeInfo,
    NodeState,
    PeerLiveness,
    Replica,
    ReplicationError,
)


def invite(n: int) -> Request:
    msg = parse_message(
        (
            f"INVITE sip:1002@lab.test SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bK{n}\r\n"
            f"From: <sip:1001@lab.test>;tag=a{n}\r\nTo: <sip:1002@lab.test>\r\n"
            f"Call-ID: call-{n}@10.0.0.1\r\nCSeq: 1 INVITE\r\n"
            f"Contact: <sip:1001@10.0.0.1:5060>\r\nContent-Length: 0\r\n\r\n"
        ).encode()
    )
    assert isinstance(msg, Request)
    return msg


def make_call(n: int) -> CallState:
    state = CallState(tenant="default", caller="1001", callee="1002", a_call_id=f"call-{n}@10.0.0.1")
    state.phase = CallPhase.CONFIRMED
    state.a = Leg(
        "a",
        dialog=Dialog.from_uas(invite(n), f"our{n}"),
        dest=("10.0.0.1", 5060, "udp"),
        local_sdp=b"v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\n",
        remote_sdp=b"v=0\r\n",
        timer=SessionTimer(1800, "local", 1000.0 + n),
        confirmed=True,
    )
    state.record = state.recording = True
    state.mcp = {"caller": ("127.0.0.1", 20000 + 4 * n), "callee": ("127.0.0.1", 20002 + 4 * n)}
    return state


def binding(contact: str, expires_at: float = 5000.0) -> Binding:
    return Binding(contact=contact, expires_at=expires_at, call_id="reg-1", cseq=2, source_host="127.0.0.1")


# --------------------------------------------------------------------------- codec
MESSAGES: list[dict[str, Any]] = [
    rp.hello("sip-server-a", NodeState.ACTIVE, 3, 2),
    rp.heartbeat(1234.5),
    rp.call_message(make_call(1).to_dict()),
    rp.call_end_message("abc", [("call-1@10.0.0.1", "our1")], 99.0),
    rp.aor_message("default", "1002", [binding("sip:1002@127.0.0.1:5072")]),
]
STREAM = b"".join(rp.encode(m) for m in MESSAGES)


def test_codec_whole_stream() -> None:
    assert FrameDecoder().feed(STREAM) == MESSAGES


def test_codec_byte_by_byte() -> None:
    decoder = FrameDecoder()
    out: list[dict[str, Any]] = []
    for i in range(len(STREAM)):
        out += decoder.feed(STREAM[i : i + 1])
    assert out == MESSAGES
    assert decoder.buffered == 0


def test_codec_with_trailing_partial_message() -> None:
    decoder = FrameDecoder()
    extra = rp.encode(rp.heartbeat(1.0))
    assert decoder.feed(STREAM + extra[:7]) == MESSAGES
    assert decoder.buffered == 7
    assert decoder.feed(extra[7:]) == [rp.heartbeat(1.0)]


def frame(body: bytes) -> bytes:
    return struct.pack("!I", len(body)) + body


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (struct.pack("!I", 2**31) + b"x", "exceeds"),
        (frame(b"{not json"), "not JSON"),
        (frame(b"\xff\xfe"), "not JSON"),
        (frame(b"[1, 2]"), "not an object"),
        (frame(b'{"type": "bogus"}'), "unknown message type"),
        (frame(b'{"no": "type"}'), "unknown message type"),
    ],
)
def test_codec_errors_are_named_and_sticky(data: bytes, error: str) -> None:
    decoder = FrameDecoder(max_message=1024 * 1024)
    with pytest.raises(ReplicationError, match=error):
        decoder.feed(data)
    with pytest.raises(ReplicationError, match=error):
        decoder.feed(rp.encode(rp.heartbeat(1.0)))


def test_encode_refuses_an_oversize_message() -> None:
    with pytest.raises(ReplicationError, match="exceeds"):
        rp.encode({"type": "snapshot", "blob": "x" * (rp.MAX_MESSAGE + 1)})


# --------------------------------------------------------------------------- replica
class ActiveModel:
    """What an active holds, changed the way the B2BUA and the registrar change it."""

    def __init__(self) -> None:
        self.calls: dict[str, CallState] = {}
        self.store = BindingStore()
        self.ended: dict[tuple[str, str], float] = {}
        self.epoch = 4

    def snapshot(self) -> dict[str, Any]:
        return rp.snapshot_message(
            self.epoch, [c.to_dict() for c in self.calls.values()], self.store, self.ended
        )


def replay(messages: list[dict[str, Any]], now: float, piecewise: bool) -> Replica:
    """Send the messages through the codec (in one piece or byte by byte) into a replica."""
    data = b"".join(rp.encode(m) for m in messages)
    decoder = FrameDecoder()
    replica = Replica()
    chunks = [data[i : i + 1] for i in range(len(data))] if piecewise else [data]
    for chunk in chunks:
        for message in decoder.feed(chunk):
            replica.apply(message, now)
    return replica


@pytest.mark.parametrize("piecewise", [False, True])
def test_snapshot_then_updates_rebuild_identical_state(piecewise: bool) -> None:
    now = 100.0
    active = ActiveModel()
    for n in (1, 2, 3):
        call = make_call(n)
        active.calls[call.id] = call
    active.store.bindings[("default", "1002")] = [binding("sip:1002@127.0.0.1:5072")]
    active.ended[("old@x", "t")] = now + 10
    messages = [active.snapshot()]

    # updates, as the active publishes them
    c4 = make_call(4)
    active.calls[c4.id] = c4
    messages.append(rp.call_message(c4.to_dict()))
    c1 = next(iter(active.calls.values()))
    c1.a.dialog.remote_cseq = 7  # type: ignore[union-attr]
    c1.a.timer.deadline = 4242.0
    c1.a.remote_sdp = b"v=0\r\no=- 1 2 IN IP4 10.0.0.1\r\n"
    messages.append(rp.call_message(c1.to_dict()))
    c2 = list(active.calls.values())[1]
    del active.calls[c2.id]
    keys = rp.dialog_keys(c2.to_dict())
    for key in keys:
        active.ended[key] = now + rp.ENDED_TTL
    messages.append(rp.call_end_message(c2.id, keys, now + rp.ENDED_TTL))
    active.store.bindings[("default", "1003")] = [binding("sip:1003@127.0.0.1:5074", 6000.0)]
    messages.append(rp.aor_message("default", "1003", active.store.bindings[("default", "1003")]))
    del active.store.bindings[("default", "1002")]
    messages.append(rp.aor_message("default", "1002", []))
    messages += [rp.heartbeat(now)]

    replica = replay(messages, now, piecewise)
    assert replica.synced and replica.epoch == 4
    assert replica.calls == {cid: c.to_dict() for cid, c in active.calls.items()}
    assert replica.bindings.to_dict() == active.store.to_dict()
    assert replica.ended == active.ended
    # a standby's snapshot of its replica is the active's own snapshot (what a third node would get)
    mine, theirs = replica.snapshot(), active.snapshot()
    assert {c["id"]: c for c in mine["calls"]} == {c["id"]: c for c in theirs["calls"]}
    assert mine["bindings"] == theirs["bindings"] and sorted(mine["ended"]) == sorted(theirs["ended"])
    # and every replicated call comes back as the same CallState
    for cid, data in replica.calls.items():
        assert CallState.from_dict(json.loads(json.dumps(data))).to_dict() == active.calls[cid].to_dict()


def test_a_new_snapshot_replaces_the_replica_and_ended_dialogs_expire() -> None:
    replica = Replica()
    replica.apply(rp.call_message(make_call(1).to_dict()), 0.0)
    replica.apply(rp.call_end_message("x", [("c1", "t1")], 10.0), 0.0)
    replica.apply(rp.call_end_message("y", [("c2", "t2")], 20.0), 0.0)
    assert set(replica.ended) == {("c1", "t1"), ("c2", "t2")}
    replica.apply(rp.heartbeat(15.0), 15.0)
    assert set(replica.ended) == {("c2", "t2")}
    replica.apply(rp.snapshot_message(9, [], BindingStore(), {}), 16.0)
    assert replica.calls == {} and replica.ended == {} and replica.epoch == 9


@pytest.mark.parametrize(
    "message",
    [
        {"type": "call", "call": "nope"},
        {"type": "call", "call": {"no": "id"}},
        {"type": "call_end", "id": "x"},
        {"type": "aor", "tenant": "t", "extension": "e", "contacts": [{"bogus": 1}]},
        {"type": "snapshot", "epoch": "x", "calls": [], "bindings": {}},
    ],
)
def test_malformed_updates_are_replication_errors(message: dict[str, Any]) -> None:
    with pytest.raises(ReplicationError):
        Replica().apply(message, 0.0)


# --------------------------------------------------------------------------- heartbeats
class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


def test_heartbeat_monitor_declares_death_only_without_connection_and_heartbeats() -> None:
    clock = FakeClock()
    mon = HeartbeatMonitor(0.2, 3, clock.now)
    assert mon.state(clock.now) == PeerLiveness.UNKNOWN
    mon.on_connected(clock.now)
    for _ in range(20):  # heartbeats every 200 ms: alive
        mon.on_message(clock.advance(0.2))
        assert mon.state(clock.now) == PeerLiveness.ALIVE
    # heartbeats stop but the connection stays: silent (the glue closes it), never dead
    clock.advance(0.59)
    assert mon.state(clock.now) == PeerLiveness.ALIVE
    clock.advance(0.02)
    assert mon.state(clock.now) == PeerLiveness.SILENT
    mon.on_message(clock.now)
    # the connection goes (the process was killed): lost until the window since the last one passes
    clock.advance(0.1)
    mon.on_disconnected(clock.now)
    assert mon.state(clock.now) == PeerLiveness.LOST
    assert mon.deadline() == pytest.approx(clock.now - 0.1 + 0.6)
    clock.advance(0.49)
    assert mon.state(clock.now) == PeerLiveness.LOST
    clock.advance(0.02)
    assert mon.state(clock.now) == PeerLiveness.DEAD
    # a reconnection revives it
    mon.on_connected(clock.advance(1.0))
    assert mon.state(clock.now) == PeerLiveness.ALIVE


def test_heartbeat_monitor_without_any_peer_is_dead_after_one_window_from_start() -> None:
    clock = FakeClock()
    mon = HeartbeatMonitor(0.2, 3, clock.now)
    clock.advance(0.59)
    assert mon.state(clock.now) == PeerLiveness.UNKNOWN
    clock.advance(0.02)
    assert mon.state(clock.now) == PeerLiveness.DEAD
    assert not mon.heard_ever


def test_heartbeat_monitor_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        HeartbeatMonitor(0.0, 3, 0.0)
    with pytest.raises(ValueError):
        HeartbeatMonitor(0.2, 0, 0.0)


# --------------------------------------------------------------------------- role rules
A, S = NodeState.ACTIVE, NodeState.STANDBY


def node(name: str, state: NodeState, epoch: int = 1, priority: int = 0) -> NodeInfo:
    return NodeInfo(name, state, epoch, priority)


def test_two_actives_keep_exactly_one_deterministically() -> None:
    cases = [
        (node("a", A, 2), node("b", A, 3)),  # the most recent takeover wins
        (node("b", A, 3, 0), node("a", A, 3, 2)),  # then priority
        (node("a", A, 3, 1), node("b", A, 3, 1)),  # then the lower name
    ]
    for x, y in cases:
        results = {x.node: rp.decide(x, y), y.node: rp.decide(y, x)}
        assert sorted(results.values(), key=str) == sorted([None, S], key=str), results
    assert rp.decide(node("a", A, 2), node("b", A, 3)) == S
    assert rp.decide(node("b", A, 3, 0), node("a", A, 3, 2)) == S
    assert rp.decide(node("a", A, 3, 2), node("b", A, 3, 0)) is None
    assert rp.decide(node("b", A, 3, 1), node("a", A, 3, 1)) == S


def test_two_standbys_elect_exactly_one() -> None:
    primary, standby = node("b", S, 0, rp.PRIORITY["primary"]), node("a", S, 0, rp.PRIORITY["standby"])
    assert rp.decide(primary, standby) == A and rp.decide(standby, primary) is None
    x, y = node("x", S, 5, 1), node("y", S, 0, 1)
    assert rp.decide(x, y) == A and rp.decide(y, x) is None


def test_an_active_and_a_standby_stay_as_they_are() -> None:
    assert rp.decide(node("a", A), node("b", S)) is None
    assert rp.decide(node("b", S), node("a", A)) is None


def test_hello_is_validated() -> None:
    info = NodeInfo.from_hello(rp.hello("n", A, 2, 1))
    assert info == NodeInfo("n", A, 2, 1)
    with pytest.raises(ReplicationError):
        NodeInfo.from_hello({"type": "hello", "node": "n", "state": "leader", "epoch": 1, "priority": 0})


# --------------------------------------------------------------------------- authentication
def test_auth_answers_the_nonce_with_the_shared_secret() -> None:
    secret = b"pair-secret"
    good = rp.auth_message(secret, "n0nce", "node-b")
    assert rp.verify_auth(secret, "n0nce", "node-b", good)
    assert not rp.verify_auth(b"other-secret", "n0nce", "node-b", good)
    assert not rp.verify_auth(secret, "another-nonce", "node-b", good)  # a replayed answer
    assert not rp.verify_auth(secret, "n0nce", "node-a", good)  # reflected back at its sender
    assert not rp.verify_auth(secret, "n0nce", "node-b", {"type": "auth"})
    assert not rp.verify_auth(secret, "n0nce", "node-b", {"type": "auth", "mac": 42})
    assert FrameDecoder().feed(rp.encode(good)) == [good]

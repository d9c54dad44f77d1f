"""The MCP daemon's SIP behaviour over real loopback sockets, with a fake media engine.

The fake engine stands in for rtp_core (same facade: open_session/add_leg/set_remote/
set_payload_types/close_session/fileno/poll_events) so these tests cover the SIP side, finalisation,
engine events, shutdown and spool recovery without the C extension.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import struct
import time
import wave
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from services.config import ClusterConfig, IvrProfile, McpConfig, StorageConfig, Tenant
from services.mcp import daemon as mcp_daemon
from services.mcp import server as mcp_server
from services.mcp.session import PART_SUFFIX, write_sidecar
from services.mcp.xcv import BridgeRequest, CallInfo, encode_profile
from services.sdp import SessionDescription
from services.sip.aio import IncomingRequest, SipEndpoint
from services.sip.dialog import Dialog
from services.sip.message import Request, Response, new_call_id, new_tag


class FakeEngine:
    """rtp_core's facade, recording what the MCP asks of it."""

    def __init__(self) -> None:
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        self.sessions: dict[int, dict[str, Any]] = {}
        self._events: list[tuple[str, int, int, object]] = []
        self._next = 1
        self._port = 30000
        self.fail_open = False
        self.closed = False
        self.packets = 25  # RTP packets per leg that close_session reports
        self.invalid = 0  # invalid datagrams on the caller leg that close_session reports

    def fileno(self) -> int:
        return self._r

    def poll_events(self) -> list[tuple[str, int, int, object]]:
        with contextlib.suppress(BlockingIOError):
            os.read(self._r, 4096)
        events, self._events = self._events, []
        return events

    def emit(self, kind: str, session: int, leg: int, payload: object) -> None:
        self._events.append((kind, session, leg, payload))
        os.write(self._w, b"!")

    def open_session(
        self, *, output_path: str | None, channels: int, mode: str, reorder_ms: int, timeout_s: float
    ) -> int:
        if self.fail_open:
            raise OSError("no ports")
        sid = self._next
        self._next += 1
        self.sessions[sid] = {
            "output_path": output_path, "channels": channels, "mode": mode, "reorder_ms": reorder_ms,
            "timeout_s": timeout_s, "legs": {}, "remotes": {}, "pts": {}, "closed": False,
        }  # fmt: skip
        assert output_path is not None
        Path(output_path).write_bytes(b"")
        return sid

    def add_leg(self, session: int, leg: int) -> int:
        self._port += 2
        self.sessions[session]["legs"][leg] = self._port
        return self._port

    def set_remote(self, session: int, leg: int, ip: str, port: int) -> None:
        self.sessions[session]["remotes"][leg] = (ip, port)

    def set_payload_types(self, session: int, leg: int, mapping: dict[int, str]) -> None:
        self.sessions[session]["pts"][leg] = dict(mapping)

    def close_session(self, session: int) -> dict[str, Any]:
        s = self.sessions[session]
        assert not s["closed"], "closed twice"
        s["closed"] = True
        with wave.open(s["output_path"], "wb") as w:
            w.setnchannels(s["channels"])
            w.setsampwidth(2)
            w.setframerate(8000)
            w.writeframes(b"\x00\x00" * s["channels"] * 4000)
        leg = {"ssrc": 42, "packets": self.packets, "bytes": 160 * self.packets, "lost": 0, "late": 0, "duplicates": 0, "reordered": 0,
               "jitter_ms": 0.5, "gap_total_ms": 0.0, "longest_gap_ms": 0.0, "invalid": 0, "codec": "PCMU", "dtmf": ""}  # fmt: skip
        return {
            "duration": 0.5,
            "samples": 4000,
            "channels": s["channels"],
            "legs": [dict(leg, invalid=self.invalid), dict(leg, ssrc=43)],
        }

    def close(self) -> None:
        self.closed = True
        os.close(self._r)
        os.close(self._w)


OFFER = (
    "v=0\r\no=sipserver 1 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n"
    "m=audio {caller} RTP/AVP 0 101\r\nc=IN IP4 127.0.0.1\r\na=rtpmap:0 PCMU/8000\r\n"
    "a=rtpmap:101 telephone-event/8000\r\na=label:caller\r\n"
    "m=audio {callee} RTP/AVP 0 101\r\nc=IN IP4 {callee_ip}\r\na=rtpmap:0 PCMU/8000\r\n"
    "a=rtpmap:101 telephone-event/8000\r\na={direction}\r\na=label:callee\r\n"
)


def offer(
    caller: int = 4000, callee: int = 9, callee_ip: str = "0.0.0.0", direction: str = "sendrecv"
) -> bytes:
    return OFFER.format(caller=caller, callee=callee, callee_ip=callee_ip, direction=direction).encode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


BRIDGE = BridgeRequest(
    "acme", "5e55" * 8, 1, CallInfo("a-leg-1", "sip:1001@acme", "Alice", "sip:1002@acme", "Bob", "inbound", "1001", "1002"),
    IvrProfile(channels=1, reorder_ms=80),
)  # fmt: skip


@dataclass
class Client:
    ep: SipEndpoint
    mcp: tuple[str, int]
    requests: list[Request] = field(default_factory=list)
    bye_delay: float = 0.0

    async def on_request(self, inc: IncomingRequest) -> None:
        self.requests.append(inc.request)
        if self.bye_delay:
            await asyncio.sleep(self.bye_delay)
        inc.respond(200)

    def invite_request(self, body: bytes = b"", headers: list[tuple[str, str]] | None = None) -> Request:
        return Request(
            "INVITE",
            f"sip:record@{self.mcp[0]}:{self.mcp[1]}",
            [
                ("From", f"<sip:sipserver@127.0.0.1>;tag={new_tag()}"),
                ("To", "<sip:record@127.0.0.1>"),
                ("Call-ID", new_call_id("t")),
                ("CSeq", "1 INVITE"),
                ("Contact", f"<{self.ep.contact_uri('ss')}>"),
                ("Content-Type", "application/sdp"),
                *(BRIDGE.headers() if headers is None else headers),
            ],
            body or offer(),
        )

    async def invite(
        self, request: Request | None = None, *, ack: bool = True
    ) -> tuple[Response, Dialog | None, Request]:
        client = self.ep.start_request(request or self.invite_request(), self.mcp)
        response = await asyncio.wait_for(client.final(), 10)
        dialog = None
        if response.status == 200:
            dialog = Dialog.from_uac(client.request, response)
            if ack:
                self.ep.send_ack(dialog.create_ack(client.request), self.mcp)
        return response, dialog, client.request

    async def in_dialog(self, dialog: Dialog, method: str, body: bytes = b"") -> Response:
        req = dialog.create_request(method, body=body, content_type="application/sdp" if body else None)
        client = self.ep.start_request(req, self.mcp)
        response = await asyncio.wait_for(client.final(), 10)
        if method == "INVITE" and response.status == 200:
            self.ep.send_ack(dialog.create_ack(client.request), self.mcp)
        return response


@dataclass
class Node:
    config: ClusterConfig
    engine: FakeEngine
    client: Client
    task: asyncio.Task[None] | None
    root: Path

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(p.read_text()) for p in sorted((self.root / "queue").glob("*.json"))]

    async def wait_events(self, n: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.events()) >= n:
                return self.events()
            await asyncio.sleep(0.02)
        raise AssertionError(f"expected {n} events, got {len(self.events())}")

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
            self.task = None


async def start_node(tmp_path: Path, engine: FakeEngine, **mcp_kw: Any) -> Node:
    config = ClusterConfig(
        mcp=[McpConfig(name="mcp1", port=free_port(), spool_dir="spool", shutdown_timeout=3.0, **mcp_kw)],
        storage=StorageConfig(disk_root="storage", queue_dir="queue"),
        tenants=[Tenant(id="acme", api_key="k" * 16)],
        base_dir=str(tmp_path),
    )
    ready = asyncio.Event()
    task = asyncio.create_task(
        mcp_daemon.run(config, name="mcp1", ready=ready.set, engine_factory=lambda m: engine)
    )
    await asyncio.wait_for(ready.wait(), 5)
    ep = SipEndpoint(host="127.0.0.1", port=0, name="ss")
    client = Client(ep, ("127.0.0.1", config.mcp[0].port))
    ep.request_handler = client.on_request
    await ep.start()
    return Node(config, engine, client, task, tmp_path)


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    engine = FakeEngine()
    n = await start_node(tmp_path, engine)
    try:
        yield n
    finally:
        await n.stop()
        await n.client.ep.close()


async def test_invite_reinvite_bye_produces_one_event(node: Node) -> None:
    response, dialog, _ = await node.client.invite()
    assert response.status == 200 and dialog is not None
    assert response.headers.get("Content-Type") == "application/sdp"
    answer = SessionDescription.parse(response.body)
    (sid, s), = node.engine.sessions.items()  # fmt: skip
    assert (s["mode"], s["channels"], s["reorder_ms"]) == ("bridge", 1, 80)
    assert s["output_path"].endswith(PART_SUFFIX) and Path(s["output_path"]).parent == node.root / "spool"
    assert [m.port for m in answer.media] == [s["legs"][0], s["legs"][1]]
    assert answer.connection == "127.0.0.1"
    assert s["remotes"] == {0: ("127.0.0.1", 4000)}  # the callee placeholder is not a remote
    assert s["pts"][0] == {0: "PCMU", 101: "telephone-event"}

    # Re-INVITE with the callee's address (put on hold: sendonly) -> same ports, recvonly answered.
    re = await node.client.in_dialog(
        dialog, "INVITE", offer(callee=5000, callee_ip="127.0.0.1", direction="sendonly")
    )
    assert re.status == 200
    again = SessionDescription.parse(re.body)
    assert [m.port for m in again.media] == [m.port for m in answer.media]
    assert again.media[1].direction == "recvonly" and again.origin.version == answer.origin.version + 1
    assert s["remotes"][1] == ("127.0.0.1", 5000)

    # Engine events: media start and DTMF digits collected per leg.
    node.engine.emit("started", sid, 0, ("127.0.0.1", 4000, 42))
    node.engine.emit("dtmf", sid, 1, ("5", 100))
    node.engine.emit("dtmf", sid, 1, ("#", 100))
    node.engine.emit("ssrc_change", sid, 0, 99)
    node.engine.emit("started", 999, 0, None)  # unknown session: ignored
    await asyncio.sleep(0.1)

    bye = await node.client.in_dialog(dialog, "BYE")
    assert bye.status == 200
    (event,) = await node.wait_events(1)
    assert s["closed"]
    assert event["tenant"] == "acme" and event["call_id"] == "a-leg-1" and event["direction"] == "inbound"
    assert event["duration"] == 0.5 and event["channels"] == 1 and event["mcp"] == "mcp1"
    assert [st["dtmf"] for st in event["streams"]] == ["", "5#"]
    stored = node.root / "storage" / event["storage"]["key"]
    assert stored.exists() and stored.stat().st_size == event["size"]
    assert list((node.root / "spool").iterdir()) == []  # file and sidecar gone from the spool
    # A late BYE for the finished dialog is 481.
    assert (await node.client.in_dialog(dialog, "BYE")).status == 481


@pytest.mark.parametrize(
    ("mutate", "status", "reason"),
    [
        (lambda r: r.headers.remove("X-CV-Tenant"), 400, "X-CV-Tenant header is missing"),
        (lambda r: r.headers.set("X-CV-Part", "x"), 400, "X-CV-Part"),
        (
            lambda r: r.headers.set("X-CV-Profile", encode_profile(IvrProfile(channels=2))[:-3] + "$$$"),
            400,
            "X-CV-Profile",
        ),
        (lambda r: setattr(r, "body", b"v=0\r\ngarbage\r\n"), 400, "Malformed SDP"),
        (lambda r: setattr(r, "body", b""), 400, "SDP offer is missing"),
        (lambda r: r.headers.set("Content-Type", "application/json"), 415, "application/sdp"),
        (lambda r: setattr(r, "body", offer().replace(b"a=label:callee\r\n", b"")), 488, "caller and callee"),
        (
            lambda r: setattr(r, "body", offer().replace(b"RTP/AVP 0 101", b"RTP/AVP 18")),
            488,
            "No common codec",
        ),
    ],
)
async def test_bad_invites_get_a_reason_and_open_nothing(
    node: Node, mutate: Any, status: int, reason: str
) -> None:
    request = node.client.invite_request()
    mutate(request)
    response, _, _ = await node.client.invite(request)
    assert response.status == status and reason in response.reason, response
    assert node.engine.sessions == {}
    # The MCP is still fine.
    ok, dialog, _ = await node.client.invite()
    assert ok.status == 200 and dialog is not None
    assert (await node.client.in_dialog(dialog, "BYE")).status == 200


async def test_options_reports_load_and_engine_failure_is_503(node: Node) -> None:
    async def options() -> Response:
        req = Request(
            "OPTIONS", f"sip:record@127.0.0.1:{node.client.mcp[1]}",
            [("From", f"<sip:rm@127.0.0.1>;tag={new_tag()}"), ("To", "<sip:record@127.0.0.1>"),
             ("Call-ID", new_call_id("o")), ("CSeq", "1 OPTIONS")],
        )  # fmt: skip
        return await node.client.ep.request(req, node.client.mcp)

    assert (await options()).headers.get("X-CV-Load") == "0"
    _, d1, _ = await node.client.invite()
    _, d2, _ = await node.client.invite()
    assert (await options()).headers.get("X-CV-Load") == "2"
    node.engine.fail_open = True
    failed, _, _ = await node.client.invite()
    assert failed.status == 503 and failed.headers.get("Retry-After")
    assert d1 is not None and d2 is not None
    await node.client.in_dialog(d1, "BYE")
    assert (await options()).headers.get("X-CV-Load") == "1"


async def test_missing_ack_finalises_the_session(node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mcp_server, "ACK_TIMEOUT", 0.3)
    response, _, _ = await node.client.invite(ack=False)
    assert response.status == 200
    (event,) = await node.wait_events(1)
    assert event["session_id"] == BRIDGE.session_id
    # The MCP ended the dialog it could not confirm (RFC 3261 13.3.1.4).
    deadline = time.monotonic() + 5
    while not node.client.requests and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert [r.method for r in node.client.requests] == ["BYE"]


async def test_media_timeout_sends_bye_and_finalises(node: Node) -> None:
    response, dialog, _ = await node.client.invite()
    assert response.status == 200 and dialog is not None
    (sid,) = node.engine.sessions
    node.engine.emit("timeout", sid, -1, None)
    (event,) = await node.wait_events(1)
    assert event["id"]
    deadline = time.monotonic() + 5
    while not node.client.requests and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    (bye,) = node.client.requests
    assert bye.method == "BYE" and bye.call_id == dialog.call_id
    assert "media timeout" in (bye.headers.get("Reason") or "")
    # The UAC's own BYE afterwards finds nothing.
    assert (await node.client.in_dialog(dialog, "BYE")).status == 481


async def test_shutdown_ends_sessions_and_refuses_new_ones(node: Node) -> None:
    for _ in range(3):
        response, _, _ = await node.client.invite()
        assert response.status == 200
    await node.stop()
    events = node.events()
    assert len(events) == 3
    assert [r.method for r in node.client.requests] == ["BYE"] * 3
    assert node.engine.closed
    assert all(s["closed"] for s in node.engine.sessions.values())


async def test_draining_mcp_answers_503(node: Node) -> None:
    response, _, _ = await node.client.invite()
    assert response.status == 200
    node.client.bye_delay = 1.0  # keeps the MCP draining while it waits for the answer to its BYE
    task = asyncio.ensure_future(node.stop())
    while not node.client.requests:
        await asyncio.sleep(0.01)
    refused, _, _ = await node.client.invite()
    assert refused.status == 503 and refused.headers.get("Retry-After")
    await task
    assert len(node.events()) == 1


async def test_recordings_left_in_the_spool_are_recovered_at_start(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    rid = "0f" * 16
    opened = datetime(2024, 2, 3, 4, 5, 6, tzinfo=UTC)
    write_sidecar(
        spool,
        rid,
        {"id": rid, "mcp": "mcp1", "opened": opened.isoformat(), "tenant": "acme", "session_id": BRIDGE.session_id,
         "part": 1, "call": BRIDGE.call.to_dict(), "profile": encode_profile(BRIDGE.profile), "codec": "PCMA"},
    )  # fmt: skip
    part = spool / f"{rid}{PART_SUFFIX}"
    with wave.open(str(part), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(b"\x00" * 4 * 8000 * 2)
    data = bytearray(part.read_bytes())
    data[4:8] = data[40:44] = struct.pack("<I", 0)  # a header the dead writer never finalised
    part.write_bytes(bytes(data))

    engine = FakeEngine()
    node = await start_node(tmp_path, engine)
    try:
        (event,) = node.events()
        assert event["id"] == rid and event["codec"] == "PCMA" and event["duration"] == 2.0
        assert (
            event["start"] == "2024-02-03T04:05:06.000000Z" and event["end"] == "2024-02-03T04:05:08.000000Z"
        )
        assert event["storage"]["key"] == f"acme/2024/02/03/{rid}.wav"
        with wave.open(str(tmp_path / "storage" / event["storage"]["key"])) as w:
            assert w.getnframes() == 16000
        assert list(spool.iterdir()) == []
    finally:
        await node.stop()
        await node.client.ep.close()


async def test_bad_messages_mid_call_do_not_lose_the_recording(node: Node) -> None:
    response, dialog, _ = await node.client.invite()
    assert response.status == 200 and dialog is not None
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol, remote_addr=node.client.mcp)
    try:
        for junk in (b"\xff" * 300, b"BYE sip:x SIP/2.0\r\nVia: nonsense\r\n\r\n", b"SIP/2.0 999\r\n\r\n"):
            transport.sendto(junk)
    finally:
        transport.close()
    # A broken re-offer is refused; the session keeps its media.
    bad = await node.client.in_dialog(dialog, "INVITE", b"v=0\r\nm=broken\r\n")
    assert bad.status == 400
    unlabelled = await node.client.in_dialog(dialog, "INVITE", offer().replace(b"a=label:caller\r\n", b""))
    assert unlabelled.status == 488
    (s,) = node.engine.sessions.values()
    assert s["remotes"] == {0: ("127.0.0.1", 4000)} and not s["closed"]
    # Offerless re-INVITE: our current SDP comes back as the offer.
    again = await node.client.in_dialog(dialog, "INVITE")
    assert again.status == 200 and SessionDescription.parse(again.body).media[0].port == s["legs"][0]
    # INFO / UPDATE without SDP are fine, unknown out-of-dialog methods are not.
    assert (await node.client.in_dialog(dialog, "INFO")).status == 200
    assert (await node.client.in_dialog(dialog, "BYE")).status == 200
    (event,) = await node.wait_events(1)
    assert event["duration"] == 0.5


async def test_invalid_datagrams_are_logged_and_the_recording_filed(
    node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    node.engine.invalid = 7  # junk that rtp_core counted and dropped on the caller leg
    response, dialog, _ = await node.client.invite()
    assert response.status == 200 and dialog is not None
    assert (await node.client.in_dialog(dialog, "BYE")).status == 200
    (event,) = await node.wait_events(1)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    expected = f"recording {event['id']}: 7 invalid datagram(s) on the caller leg"
    assert any(expected in w for w in warnings), warnings
    assert not any("callee leg" in w for w in warnings)
    assert [s["packets"] for s in event["streams"]] == [25, 25]


@pytest.mark.parametrize(
    ("cause", "packets", "filed"),
    [
        (487, 0, False),  # never answered, no early media: nothing to keep
        (487, 30, True),  # never answered, but early media was recorded
        (200, 0, True),  # answered but silent: filed, its zero packet counts tell the operator
        (None, 0, True),  # a BYE without Reason is an ordinary end
    ],
)
async def test_unanswered_bridge_without_media_is_not_filed(
    node: Node, cause: int | None, packets: int, filed: bool
) -> None:
    node.engine.packets = packets
    response, dialog, _ = await node.client.invite()
    assert response.status == 200 and dialog is not None
    headers = [("Reason", f'SIP;cause={cause};text="setup ended"')] if cause else []
    bye = dialog.create_request("BYE", headers=headers)
    answer = await asyncio.wait_for(node.client.ep.start_request(bye, node.client.mcp).final(), 10)
    assert answer.status == 200
    if filed:
        (event,) = await node.wait_events(1)
        assert [s["packets"] for s in event["streams"]] == [packets, packets]
    deadline = time.monotonic() + 5
    while [p for p in (node.root / "spool").iterdir() if p.is_file()] and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert not [p for p in (node.root / "spool").iterdir() if p.is_file()]  # nothing left behind
    if not filed:
        assert node.events() == []
        assert not list((node.root / "storage").rglob("*.wav"))

"""Resource Manager + MCPs, real daemons on 127.0.0.1: a recording bridge end to end.

A test UAC plays the SIP Server: it sends the two-m-line INVITE (X-CV-* headers, callee placeholder)
to the RM, ACKs, re-INVITEs with the callee's address, and two UDP sockets play the phones exchanging
G.711 tones through the MCP's ports. After BYE the WAV in the disk root must hold both parties at the
right duration and the queue one event with the call's metadata. The RM's choices (least loaded,
session affinity, failover around a stopped MCP, 503 when none is left) are checked through the MCP
that answers (its Contact).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import random
import struct
import time
import wave
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import rtp_core._core  # noqa: F401 - the C engine must be built (make test builds it)
from services.config import ClusterConfig, IvrProfile, McpConfig, ResourceManagerConfig, StorageConfig, Tenant
from services.lab import free_port
from services.mcp import daemon as mcp_daemon
from services.mcp.xcv import BridgeRequest, CallInfo
from services.resource_manager import daemon as rm_daemon
from services.sdp import SessionDescription
from services.sip.aio import IncomingRequest, SipEndpoint
from services.sip.dialog import Dialog
from services.sip.message import Request, Response, new_call_id, new_tag

RATE = 8000
PTIME = 0.02
SAMPLES = 160


# -- G.711 and RTP for the two parties ------------------------------------------------------------


def ulaw_encode(pcm: np.ndarray) -> bytes:
    """ITU-T G.711 mu-law of 16-bit samples."""
    x = pcm.astype(np.int32)
    sign = np.where(x < 0, 0x80, 0)
    mag = np.minimum(np.abs(x), 32635) + 0x84
    exponent = np.floor(np.log2(mag)).astype(np.int32) - 7
    mantissa = (mag >> (exponent + 3)) & 0x0F
    return (~(sign | (exponent << 4) | mantissa) & 0xFF).astype(np.uint8).tobytes()


def tone_packets(freq: float, count: int, ssrc: int) -> list[bytes]:
    n = np.arange(count * SAMPLES)
    pcm = (8000 * np.sin(2 * np.pi * freq * n / RATE)).astype(np.int16)
    payload = ulaw_encode(pcm)
    return [
        struct.pack("!BBHII", 0x80, 0, i & 0xFFFF, i * SAMPLES, ssrc)
        + payload[i * SAMPLES : (i + 1) * SAMPLES]
        for i in range(count)
    ]


class Party(asyncio.DatagramProtocol):
    """A phone's RTP socket: counts what it receives."""

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.received.append(data)

    @property
    def port(self) -> int:
        assert self.transport is not None
        return int(self.transport.get_extra_info("sockname")[1])

    def ssrcs(self) -> set[int]:
        return {struct.unpack_from("!I", p, 8)[0] for p in self.received if len(p) >= 12}


async def open_party() -> Party:
    loop = asyncio.get_running_loop()
    _, party = await loop.create_datagram_endpoint(Party, local_addr=("127.0.0.1", 0))
    return party


async def play(party: Party, dest: tuple[str, int], packets: list[bytes]) -> None:
    """Send one packet every 20 ms on an absolute schedule (no drift)."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    assert party.transport is not None
    for i, packet in enumerate(packets):
        delay = start + i * PTIME - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        party.transport.sendto(packet, dest)


def dominant_frequency(samples: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(samples.astype(np.float64)))
    spectrum[0] = 0
    return float(np.argmax(spectrum) * RATE / len(samples))


# -- the recording client (plays the SIP Server) -----------------------------------------------------


def bridge_offer(caller: tuple[str, int], callee: tuple[str, int] | None, version: int = 1) -> bytes:
    callee_ip, callee_port = callee or ("0.0.0.0", 9)
    lines = [
        "v=0", f"o=sipserver 77 {version} IN IP4 127.0.0.1", "s=-", "t=0 0",
        f"m=audio {caller[1]} RTP/AVP 0 8 101", f"c=IN IP4 {caller[0]}",
        "a=rtpmap:0 PCMU/8000", "a=rtpmap:8 PCMA/8000", "a=rtpmap:101 telephone-event/8000",
        "a=fmtp:101 0-16", "a=ptime:20", "a=label:caller",
        f"m=audio {callee_port} RTP/AVP 0 8 101", f"c=IN IP4 {callee_ip}",
        "a=rtpmap:0 PCMU/8000", "a=rtpmap:8 PCMA/8000", "a=rtpmap:101 telephone-event/8000",
        "a=fmtp:101 0-16", "a=ptime:20", "a=label:callee",
    ]  # fmt: skip
    return ("\r\n".join(lines) + "\r\n").encode()


@dataclass
class Bridge:
    """One recording dialog as the UAC sees it."""

    invite: Request
    response: Response
    dialog: Dialog | None = None

    @property
    def answer(self) -> SessionDescription:
        return SessionDescription.parse(self.response.body)

    @property
    def mcp_port(self) -> int:
        """The SIP port of the MCP that answered (its Contact)."""
        port = self.response.contacts[0].uri.port
        assert port is not None
        return port

    def leg_address(self, label: str) -> tuple[str, int]:
        sdp = self.answer
        index = sdp.find_media(label=label)
        assert index is not None
        return sdp.media_address(index)


@dataclass
class Uac:
    ep: SipEndpoint
    rm: tuple[str, int]
    byes: list[Request] = field(default_factory=list)

    async def on_request(self, inc: IncomingRequest) -> None:
        if inc.request.method == "BYE":
            self.byes.append(inc.request)
        inc.respond(200)

    async def invite(
        self,
        session_id: str,
        caller: tuple[str, int],
        *,
        part: int = 1,
        tenant: str | None = "acme",
        extra: list[tuple[str, str]] | None = None,
    ) -> Bridge:
        call = CallInfo(
            new_call_id("a-leg"),
            "sip:1001@acme.test",
            "Alice",
            "sip:1002@acme.test",
            "Bob",
            "internal",
            "1001",
            "1002",
        )
        headers = [
            (n, v)
            for n, v in BridgeRequest(tenant or "x", session_id, part, call).headers()
            if n != "X-CV-Profile"
        ]
        if tenant is None:
            headers = [(n, v) for n, v in headers if n != "X-CV-Tenant"]
        replaced = {n.lower() for n, _ in extra or []}
        headers = [(n, v) for n, v in headers if n.lower() not in replaced]
        req = Request(
            "INVITE",
            f"sip:record@{self.rm[0]}:{self.rm[1]}",
            [
                ("From", f"<sip:sipserver@127.0.0.1>;tag={new_tag()}"),
                ("To", f"<sip:record@{self.rm[0]}:{self.rm[1]}>"),
                ("Call-ID", new_call_id("bridge")),
                ("CSeq", "1 INVITE"),
                ("Contact", f"<{self.ep.contact_uri('sipserver')}>"),
                ("Content-Type", "application/sdp"),
                *headers,
                *(extra or []),
            ],
            bridge_offer(caller, None),
        )
        client = self.ep.start_request(req, self.rm)
        response = await asyncio.wait_for(client.final(), 15)
        bridge = Bridge(client.request, response)
        if 200 <= response.status < 300:
            bridge.dialog = Dialog.from_uac(client.request, response)
            self.ep.send_ack(bridge.dialog.create_ack(client.request), bridge.dialog.next_hop()[:2])
        return bridge

    async def reinvite(self, bridge: Bridge, caller: tuple[str, int], callee: tuple[str, int]) -> Response:
        assert bridge.dialog is not None
        req = bridge.dialog.create_request(
            "INVITE", body=bridge_offer(caller, callee, version=2), content_type="application/sdp"
        )
        client = self.ep.start_request(req, bridge.dialog.next_hop()[:2])
        response = await asyncio.wait_for(client.final(), 10)
        if 200 <= response.status < 300:
            self.ep.send_ack(bridge.dialog.create_ack(client.request), bridge.dialog.next_hop()[:2])
        return response

    async def bye(self, bridge: Bridge) -> Response:
        assert bridge.dialog is not None
        return await asyncio.wait_for(
            self.ep.request(bridge.dialog.create_request("BYE"), bridge.dialog.next_hop()[:2]), 10
        )


# -- the lab --------------------------------------------------------------------------------------------


@dataclass
class Lab:
    config: ClusterConfig
    root: Path
    uac: Uac
    tasks: dict[str, asyncio.Task[None]]

    @property
    def queue_dir(self) -> Path:
        return self.root / "queue"

    def mcp_port(self, name: str) -> int:
        return self.config.mcp_named(name).port

    async def stop(self, name: str) -> None:
        task = self.tasks.pop(name)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(p.read_text()) for p in sorted(self.queue_dir.glob("*.json"))]

    async def wait_events(self, count: int, timeout: float = 15.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            events = self.events()
            if len(events) >= count:
                return events
            await asyncio.sleep(0.05)
        raise AssertionError(f"expected {count} event(s), found {len(self.events())}")


async def start(name: str, coro_factory: Any, timeout: float = 10.0) -> asyncio.Task[None]:
    ready = asyncio.Event()
    task = asyncio.create_task(coro_factory(ready.set), name=name)
    waiter = asyncio.ensure_future(ready.wait())
    done, _ = await asyncio.wait({task, waiter}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    if waiter not in done:
        waiter.cancel()
        if task.done():
            task.result()  # raise the daemon's error
        # never leave a half-started daemon (and its rtp_core engine) running past the test
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        raise AssertionError(f"{name} did not become ready within {timeout} s")
    return task


@contextlib.asynccontextmanager
async def make_lab(tmp_path: Path, *, media_timeout: float = 30.0) -> AsyncIterator[Lab]:
    base = random.randrange(32000, 60000, 200)
    mcps = [
        McpConfig(
            name=f"mcp{i + 1}",
            port=free_port(),
            rtp_port_min=base + 100 * i,
            rtp_port_max=base + 100 * i + 98,
            spool_dir=f"spool{i + 1}",
            media_timeout=media_timeout,
            shutdown_timeout=5.0,
        )
        for i in range(2)
    ]
    config = ClusterConfig(
        resource_manager=ResourceManagerConfig(
            port=free_port(), options_interval=0.2, failures_before_down=2, failover_timeout=0.5
        ),
        mcp=mcps,
        storage=StorageConfig(disk_root="storage", queue_dir="queue"),
        tenants=[
            Tenant(id="acme", api_key="acme-key-0123456789", domains=["acme.test"], profile=IvrProfile())
        ],
        base_dir=str(tmp_path),
    )
    tasks: dict[str, asyncio.Task[None]] = {}
    ep = SipEndpoint(host="127.0.0.1", port=0, name="uac")
    uac = Uac(ep, ("127.0.0.1", config.resource_manager.port))
    ep.request_handler = uac.on_request
    lab = Lab(config, tmp_path, uac, tasks)
    try:
        for m in mcps:
            tasks[m.name] = await start(
                m.name, lambda ready, n=m.name: mcp_daemon.run(config, name=n, ready=ready)
            )
        tasks["rm"] = await start("rm", lambda ready: rm_daemon.run(config, ready=ready))
        await ep.start()
        yield lab
    finally:
        for name in list(lab.tasks):
            await lab.stop(name)
        await ep.close()


@pytest.fixture
async def lab(tmp_path: Path) -> AsyncIterator[Lab]:
    async with make_lab(tmp_path) as lab:
        yield lab


# -- tests ----------------------------------------------------------------------------------------------


async def test_recorded_bridge_end_to_end(lab: Lab) -> None:
    a, b = await open_party(), await open_party()
    try:
        bridge = await lab.uac.invite("a" * 32, ("127.0.0.1", a.port))
        assert bridge.response.status == 200, bridge.response
        answer = bridge.answer
        assert [m.label for m in answer.media] == ["caller", "callee"]
        assert [m.formats for m in answer.media] == [[0, 101], [0, 101]]
        caller_addr, callee_addr = bridge.leg_address("caller"), bridge.leg_address("callee")
        assert caller_addr[0] == "127.0.0.1" and caller_addr[1] != callee_addr[1]
        # The dialog's requests come back through the RM (Record-Route).
        assert bridge.dialog is not None
        assert bridge.dialog.route_set == [f"<sip:127.0.0.1:{lab.config.resource_manager.port};lr>"]

        reinvite = await lab.uac.reinvite(bridge, ("127.0.0.1", a.port), ("127.0.0.1", b.port))
        assert reinvite.status == 200
        again = SessionDescription.parse(reinvite.body)
        assert [m.port for m in again.media] == [caller_addr[1], callee_addr[1]]  # same ports
        assert again.origin.version == answer.origin.version + 1

        count = 100  # 2 s
        await asyncio.gather(
            play(a, caller_addr, tone_packets(440.0, count, 0x1111)),
            play(b, callee_addr, tone_packets(1000.0, count, 0x2222)),
        )
        await asyncio.sleep(0.3)  # the last packets and the reorder buffer
        bye = await lab.uac.bye(bridge)
        assert bye.status == 200

        # Each party heard the other, unchanged.
        assert len(a.received) >= count * 0.95 and a.ssrcs() == {0x2222}
        assert len(b.received) >= count * 0.95 and b.ssrcs() == {0x1111}

        (event,) = await lab.wait_events(1)
    finally:
        a.transport.close()  # type: ignore[union-attr]
        b.transport.close()  # type: ignore[union-attr]

    assert event["tenant"] == "acme" and event["session_id"] == "a" * 32 and event["part"] == 1
    assert (event["caller"], event["callee"], event["from_display"], event["to_uri"]) == (
        "1001", "1002", "Alice", "sip:1002@acme.test",
    )  # fmt: skip
    assert event["mcp"] == "mcp1" and event["codec"] == "PCMU" and event["format"] == "wav"
    assert event["channels"] == 2 and event["sample_rate"] == 8000
    assert 1.7 <= event["duration"] <= 2.6, event["duration"]
    streams = {s["label"]: s for s in event["streams"]}
    assert streams["caller"]["ssrc"] == 0x1111 and streams["callee"]["ssrc"] == 0x2222
    assert streams["caller"]["packets"] >= count * 0.95 and streams["callee"]["packets"] >= count * 0.95

    path = lab.root / "storage" / event["storage"]["key"]
    data = path.read_bytes()
    assert event["size"] == len(data) and event["sha256"] == hashlib.sha256(data).hexdigest()
    with wave.open(str(path)) as w:
        assert (w.getnchannels(), w.getframerate(), w.getsampwidth()) == (2, 8000, 2)
        frames = w.getnframes()
        pcm = np.frombuffer(w.readframes(frames), dtype="<i2").reshape(-1, 2)
    assert abs(frames / RATE - event["duration"]) < 0.05
    assert 1.7 <= frames / RATE <= 2.6
    left, right = pcm[:, 0], pcm[:, 1]
    assert abs(dominant_frequency(left) - 440.0) < 10  # caller on the left
    assert abs(dominant_frequency(right) - 1000.0) < 10  # callee on the right
    assert not list((lab.root / "spool1").iterdir())  # nothing left behind in the spool


async def test_least_loaded_affinity_failover_and_503(lab: Lab) -> None:
    a = await open_party()
    try:
        mcp1, mcp2 = lab.mcp_port("mcp1"), lab.mcp_port("mcp2")
        first = await lab.uac.invite("1" * 32, ("127.0.0.1", a.port))
        assert first.response.status == 200 and first.mcp_port == mcp1
        # mcp1 now carries a session: a new session goes to the less loaded mcp2 ...
        other = await lab.uac.invite("2" * 32, ("127.0.0.1", a.port))
        assert other.response.status == 200 and other.mcp_port == mcp2
        third = await lab.uac.invite("3" * 32, ("127.0.0.1", a.port))
        assert third.response.status == 200
        # ... while a second part of the first session stays on mcp1 whatever the load.
        loaded = third.mcp_port
        second_part = await lab.uac.invite("1" * 32, ("127.0.0.1", a.port), part=2)
        assert second_part.response.status == 200 and second_part.mcp_port == mcp1
        assert loaded in (mcp1, mcp2)

        # Stop mcp2: its sessions end with BYE (through the RM) and are finalised.
        await lab.stop("mcp2")
        assert len(lab.uac.byes) >= 1
        # New sessions are routed around it, whether or not the RM noticed yet.
        moved = await lab.uac.invite("4" * 32, ("127.0.0.1", a.port))
        assert moved.response.status == 200 and moved.mcp_port == mcp1
        await asyncio.sleep(1.0)  # > failures_before_down * options_interval
        again = await lab.uac.invite("2" * 32, ("127.0.0.1", a.port), part=2)
        assert again.response.status == 200 and again.mcp_port == mcp1  # affinity MCP is gone

        for bridge in (first, second_part, moved, again) + ((third,) if third.mcp_port == mcp1 else ()):
            assert (await lab.uac.bye(bridge)).status == 200
        await lab.stop("mcp1")
        await asyncio.sleep(1.0)
        none_left = await lab.uac.invite("5" * 32, ("127.0.0.1", a.port))
        assert none_left.response.status == 503
        assert none_left.response.headers.get("Retry-After") == "5"
    finally:
        a.transport.close()  # type: ignore[union-attr]
    events = lab.events()
    assert sorted(e["mcp"] for e in events).count("mcp1") >= 5
    assert {(e["session_id"], e["part"]) for e in events} >= {("1" * 32, 1), ("1" * 32, 2), ("2" * 32, 1)}


async def test_bad_requests_are_answered_with_a_reason(lab: Lab) -> None:
    unknown = await lab.uac.invite("6" * 32, ("127.0.0.1", 4000), tenant="initech")
    assert unknown.response.status == 403 and "initech" in unknown.response.reason
    bad_call = await lab.uac.invite("7" * 32, ("127.0.0.1", 4000), extra=[("X-CV-Call", "!!!")])
    assert bad_call.response.status == 400 and "X-CV-Call" in bad_call.response.reason
    missing = await lab.uac.invite("not a session id", ("127.0.0.1", 4000))
    assert missing.response.status == 400 and "X-CV-Session" in missing.response.reason
    # By domain: no X-CV-Tenant, the To/Request-URI domain decides (here: the only tenant).
    by_domain = await lab.uac.invite("8" * 32, ("127.0.0.1", 4000), tenant=None)
    assert by_domain.response.status == 200
    assert (await lab.uac.bye(by_domain)).status == 200
    # OPTIONS to the RM itself.
    rm = lab.uac.rm
    options = Request(
        "OPTIONS",
        f"sip:{rm[0]}:{rm[1]}",
        [("From", f"<sip:probe@127.0.0.1>;tag={new_tag()}"), ("To", f"<sip:{rm[0]}:{rm[1]}>"),
         ("Call-ID", new_call_id("probe")), ("CSeq", "1 OPTIONS")],
    )  # fmt: skip
    response = await lab.uac.ep.request(options, rm)
    assert response.status == 200 and response.headers.get("X-CV-Healthy-MCPs") == "2"
    assert len(await lab.wait_events(1)) == 1  # only the by-domain session was recorded


def dtmf_packets(digit: int, seq0: int, ts: int, ssrc: int) -> list[bytes]:
    """RFC 4733 telephone-event packets for one 100 ms digit: updates then three end packets."""
    out = []
    for i, duration in enumerate((160, 320, 480, 640, 800, 800, 800)):
        end = 0x80 if duration == 800 else 0
        marker = 0x80 if i == 0 else 0
        payload = struct.pack("!BBH", digit, end | 10, duration)
        out.append(struct.pack("!BBHII", 0x80, marker | 101, (seq0 + i) & 0xFFFF, ts, ssrc) + payload)
    return out


async def test_dtmf_and_media_timeout_end_the_part(tmp_path: Path) -> None:
    async with make_lab(tmp_path, media_timeout=1.0) as lab:
        a, b = await open_party(), await open_party()
        try:
            bridge = await lab.uac.invite("d" * 32, ("127.0.0.1", a.port))
            assert bridge.response.status == 200
            assert (
                await lab.uac.reinvite(bridge, ("127.0.0.1", a.port), ("127.0.0.1", b.port))
            ).status == 200
            caller_addr, callee_addr = bridge.leg_address("caller"), bridge.leg_address("callee")
            tones = tone_packets(440.0, 25, 0x3333)
            await asyncio.gather(
                play(a, caller_addr, tones), play(b, callee_addr, tone_packets(880.0, 25, 0x4444))
            )
            await play(a, caller_addr, dtmf_packets(7, 25, 25 * SAMPLES, 0x3333))
            # Then silence from both: the MCP's media timeout ends the part with a BYE to the SIP Server.
            deadline = time.monotonic() + 10
            while not lab.uac.byes and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            (bye,) = lab.uac.byes
            assert bye.call_id == bridge.invite.call_id
            (event,) = await lab.wait_events(1)
        finally:
            a.transport.close()  # type: ignore[union-attr]
            b.transport.close()  # type: ignore[union-attr]
    streams = {s["label"]: s for s in event["streams"]}
    assert streams["caller"]["dtmf"] == "7" and streams["callee"]["dtmf"] == ""
    assert any(p[1] & 0x7F == 101 for p in b.received)  # the digit was relayed to the callee unchanged


async def test_many_concurrent_sessions_are_spread_and_all_recorded(lab: Lab) -> None:
    n = 30
    bridges = await asyncio.gather(
        *(lab.uac.invite(f"{i:032x}", ("127.0.0.1", 4000 + 2 * i)) for i in range(n))
    )
    assert [b.response.status for b in bridges] == [200] * n
    per_mcp = {
        port: sum(1 for b in bridges if b.mcp_port == port)
        for port in (lab.mcp_port("mcp1"), lab.mcp_port("mcp2"))
    }
    assert all(count >= n // 4 for count in per_mcp.values()), per_mcp  # both MCPs took a share
    byes = await asyncio.gather(*(lab.uac.bye(b) for b in bridges))
    assert [r.status for r in byes] == [200] * n
    events = await lab.wait_events(n)
    assert len({e["id"] for e in events}) == n
    assert {e["session_id"] for e in events} == {f"{i:032x}" for i in range(n)}

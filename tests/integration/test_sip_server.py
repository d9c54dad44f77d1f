"""The SIP Server (registrar + B2BUA) on 127.0.0.1 with real SipEndpoint phones.

Recorded calls are tested against a fake recording bridge (a SipEndpoint answering the two-m-line
SDP like an MCP behind the RM), and, when the RM and MCP daemons exist, against the real ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest

from services import config as config_mod
from services.sdp import SessionDescription
from services.sip.aio import IncomingRequest, SipEndpoint
from services.sip.dialog import Dialog
from services.sip.message import Request
from services.sip_server.daemon import SipServer
from services.sip_server.policy import unb64json
from services.sip_server.registrar import BAD_CREDENTIALS
from tests.integration.sip_ua import FAST, Phone, answer_for, phone_sdp

PASSWORDS = {"1001": "pw-1001", "1002": "pw-1002", "1003": "pw-1003", "2001": "pw-2001", "2002": "pw-2002"}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_config(rm_port: int, **sip: Any) -> config_mod.ClusterConfig:
    return config_mod.from_dict(
        {
            "sip_server": {
                "host": "127.0.0.1",
                "port": 0,
                "realm": "callvault",
                "nonce_secret": "0123456789abcdef",
                "resource_manager": f"127.0.0.1:{rm_port}",
                "min_expires": 60,
                "no_answer_timeout": 3.0,
                "recording_timeout": 1.0,
                "shutdown_timeout": 1.0,
                # the phones answer the first challenge: SHA-256 end to end (the daemon test uses MD5)
                "digest_algorithms": ["SHA-256", "MD5"],
                **sip,
            },
            "tenants": [
                {
                    "id": "lab",
                    "api_key": "lab-key-0123456789",
                    "domains": ["lab.test"],
                    "users": [{"extension": e, "password": PASSWORDS[e]} for e in ("1001", "1002", "1003")],
                    "policy": {"mode": "none"},
                },
                {
                    "id": "rec",
                    "api_key": "rec-key-0123456789",
                    "domains": ["rec.test"],
                    "users": [{"extension": e, "password": PASSWORDS[e]} for e in ("2001", "2002")],
                    "policy": {"mode": "all"},
                },
            ],
        },
        environ={},
    )


class FakeBridge:
    """Stands in for RM + MCP: answers the bridge INVITE with two ports, records what it got."""

    def __init__(self, *, answer: bool = True, status: int = 200) -> None:
        self.ep = SipEndpoint(host="127.0.0.1", port=0, name="fake-mcp", timers=FAST)
        self.ep.request_handler = self._on_request
        self.answer = answer
        self.status = status
        self.requests: list[Request] = []
        self.byes: asyncio.Queue[Request] = asyncio.Queue()
        self.tag = "mcptag"
        self.dialog: Dialog | None = None

    async def _on_request(self, inc: IncomingRequest) -> None:
        req = inc.request
        self.requests.append(req)
        if req.method == "BYE":
            inc.respond(200)
            await self.byes.put(req)
            return
        if req.method != "INVITE":
            inc.respond(200)
            return
        if not self.answer:
            return  # never answers (times out on the SIP Server's side)
        if self.status != 200:
            inc.respond(self.status, to_tag=self.tag)
            return
        offer = SessionDescription.parse(req.body)
        assert [m.label for m in offer.media] == ["caller", "callee"]
        body = (
            b"v=0\r\no=mcp 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
            b"m=audio 31000 RTP/AVP 0 8 101\r\na=label:caller\r\na=sendrecv\r\n"
            b"m=audio 31002 RTP/AVP 0 8 101\r\na=label:callee\r\na=sendrecv\r\n"
        )
        if self.dialog is None:
            self.dialog = Dialog.from_uas(req, self.tag, local_target=self.ep.contact_uri("mcp"))
        else:
            self.dialog.receive_request(req)
        inc.respond(
            200,
            to_tag=self.tag,
            body=body,
            content_type="application/sdp",
            headers=[("Contact", f"<{self.ep.contact_uri('mcp')}>")],
        )
        await inc.wait_ack(5.0)

    async def bye(self) -> int:
        """End the recording session from the MCP side."""
        assert self.dialog is not None
        host, port, transport = self.dialog.next_hop()
        resp = await self.ep.request(self.dialog.create_request("BYE"), (host, port), transport)
        return resp.status

    @property
    def invites(self) -> list[Request]:
        return [r for r in self.requests if r.method == "INVITE"]


class Lab:
    def __init__(self, server: SipServer, bridge: FakeBridge) -> None:
        self.server, self.bridge = server, bridge
        self.phones: list[Phone] = []

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.server.port)

    async def phone(self, user: str, *, register: bool = True, transport: str = "udp") -> Phone:
        domain = "rec.test" if user.startswith("2") else "lab.test"
        phone = await Phone(user, PASSWORDS.get(user, "x"), self.address, domain, transport).start()
        self.phones.append(phone)
        if register:
            resp = await phone.register()
            assert resp.status == 200, resp
        return phone


@contextlib.asynccontextmanager
async def running_lab(bridge: FakeBridge | None = None, **sip: Any) -> AsyncIterator[Lab]:
    bridge = bridge or FakeBridge()
    await bridge.ep.start()
    server = SipServer(make_config(bridge.ep.port, **sip), timers=FAST)
    await server.start()
    lab = Lab(server, bridge)
    try:
        yield lab
    finally:
        await server.stop(0.5)
        for p in lab.phones:
            await p.close()
        await bridge.ep.close()


@pytest.fixture
async def lab() -> AsyncIterator[Lab]:
    async with running_lab() as lab:
        yield lab


async def established(lab: Lab, caller: str = "1001", callee: str = "1002") -> tuple[Phone, Phone, Any, Any]:
    a = await lab.phone(caller)
    b = await lab.phone(callee)
    out = await a.call(callee)
    inc = await b.next_call()
    assert await inc.answer() is not None
    resp = await out.final()
    assert resp.status == 200
    return a, b, out, inc


async def wait_for(predicate: Any, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.02)


# --------------------------------------------------------------------------------- registrar
async def test_register_ok_and_wrong_password(lab: Lab) -> None:
    phone = await lab.phone("1001", register=False)
    ok = await phone.register()
    assert ok.status == 200
    assert any("expires=3600" in c for c in ok.headers.get_all("Contact"))
    bad = await phone.register(password="wrong")
    assert bad.status == 403


async def test_register_unknown_user_is_refused_like_a_wrong_password(
    lab: Lab, caplog: pytest.LogCaptureFixture
) -> None:
    """401 first, then the very 403 a wrong password gets: extensions cannot be enumerated."""
    wrong = await (await lab.phone("1001", register=False)).register(password="wrong")
    stranger = await lab.phone("1999", register=False)
    unknown = await stranger.register()
    assert (unknown.status, unknown.reason) == (wrong.status, wrong.reason) == (403, BAD_CREDENTIALS)
    assert any(
        "REGISTER from 1999 refused" in r.getMessage()
        and f"unknown user (source 127.0.0.1:{stranger.ep.port})" in r.getMessage()
        for r in caplog.records
    ), caplog.text


async def test_register_tcp(lab: Lab) -> None:
    phone = await lab.phone("1001", register=False, transport="tcp")
    assert (await phone.register()).status == 200
    [binding] = lab.server.registrar.store.lookup("lab", "1001", lab.server.clock())
    assert binding.transport == "tcp"


async def test_options_out_of_dialog(lab: Lab) -> None:
    phone = await lab.phone("1001", register=False)
    req = Request("OPTIONS", "sip:lab.test", phone._headers("OPTIONS", "1001", "opt-1", "t1", 1))
    resp = await phone.ep.request(req, lab.address)
    assert resp.status == 200
    assert "INVITE" in (resp.headers.get("Allow") or "")


# --------------------------------------------------------------------------------- call setup
async def test_call_without_credentials_is_challenged(lab: Lab) -> None:
    a = await lab.phone("1001")
    req = Request("INVITE", "sip:1002@lab.test", a._headers("INVITE", "1002", "c-407", "t", 1))
    req.headers.add("Content-Type", "application/sdp")
    req.body = phone_sdp(4000)
    resp = await a.ep.request(req, lab.address)
    assert resp.status == 407
    assert len(resp.headers.get_all("Proxy-Authenticate")) == 2


async def test_call_with_wrong_password_is_403(lab: Lab) -> None:
    a = await lab.phone("1001")
    out = await a.call("1002", password="wrong")
    assert (await out.final()).status == 403


async def test_call_from_unknown_user_is_challenged_then_403(
    lab: Lab, caplog: pytest.LogCaptureFixture
) -> None:
    """An unknown caller gets 407 and then the same 403 as a wrong password."""
    wrong = await (await (await lab.phone("1001")).call("1002", password="wrong")).final()
    stranger = await lab.phone("1999", register=False)
    out = await stranger.call("1002")
    assert "Proxy-Authorization" in out.request.headers  # the first answer was a 407
    unknown = await out.final()
    assert (unknown.status, unknown.reason) == (wrong.status, wrong.reason) == (403, BAD_CREDENTIALS)
    assert any(
        "INVITE from 1999 refused" in r.getMessage() and "unknown user" in r.getMessage()
        for r in caplog.records
    ), caplog.text


async def test_call_unknown_user_404(lab: Lab) -> None:
    a = await lab.phone("1001")
    out = await a.call("1999")
    assert (await out.final()).status == 404


async def test_call_unregistered_480(lab: Lab) -> None:
    a = await lab.phone("1001")
    out = await a.call("1003")
    assert (await out.final()).status == 480


async def test_malformed_sdp_488(lab: Lab) -> None:
    a = await lab.phone("1001")
    await lab.phone("1002")
    out = await a.call("1002", sdp=b"v=0\r\nthis is not sdp\r\n")
    resp = await out.final()
    assert resp.status == 488
    assert "399" in (resp.headers.get("Warning") or "")


async def test_unrecorded_call_and_bye_from_callee(lab: Lab) -> None:
    a, b, out, inc = await established(lab)
    # plain B2BUA: B saw A's SDP, A saw B's SDP, each with its own dialog
    assert inc.request.body == phone_sdp(a.rtp_port)
    assert SessionDescription.parse(out.response.body).media_address(0) == ("127.0.0.1", b.rtp_port)
    assert inc.request.call_id != out.request.call_id
    assert not lab.bridge.invites  # policy none: no recording bridge
    resp = await inc.request_in_dialog("BYE")
    assert resp.status == 200
    bye = await a.next_request()
    assert bye.method == "BYE"
    await wait_for(lambda: not lab.server.b2bua.calls)


async def test_bye_from_caller(lab: Lab) -> None:
    _a, b, out, _inc = await established(lab)
    assert (await out.send("BYE")).status == 200
    assert (await b.next_request()).method == "BYE"
    await wait_for(lambda: not lab.server.b2bua.calls)


async def test_ringing_relayed_then_busy_486(lab: Lab) -> None:
    a = await lab.phone("1001")
    b = await lab.phone("1002")
    out = await a.call("1002")
    inc = await b.next_call()
    inc.ring()
    await wait_for(lambda: any(r.status == 180 for r in out.provisional))
    inc.reject(486)
    assert (await out.final()).status == 486
    await wait_for(lambda: not lab.server.b2bua.calls)


async def test_cancel_from_caller_487(lab: Lab) -> None:
    a = await lab.phone("1001")
    b = await lab.phone("1002")
    out = await a.call("1002")
    inc = await b.next_call()
    inc.ring()
    await wait_for(lambda: any(r.status == 180 for r in out.provisional))
    out.cancel()
    await asyncio.wait_for(inc.inc.cancelled.wait(), 5)  # B got a CANCEL
    inc.reject(487)
    assert (await out.final()).status == 487
    await wait_for(lambda: not lab.server.b2bua.calls)


async def test_no_answer_timeout_cancels_b_and_480() -> None:
    async with running_lab(no_answer_timeout=0.5) as lab:
        a = await lab.phone("1001")
        b = await lab.phone("1002")
        out = await a.call("1002")
        inc = await b.next_call()
        inc.ring()
        resp = await out.final()
        assert resp.status == 480
        await asyncio.wait_for(inc.inc.cancelled.wait(), 5)
        inc.reject(487)


async def test_hold_and_resume_passed_through(lab: Lab) -> None:
    a, b, out, inc = await established(lab)
    held = await out.send("INVITE", phone_sdp(a.rtp_port, version=2, direction="sendonly"))
    assert held.status == 200
    reinvite = await b.next_request()
    assert reinvite.method == "INVITE"
    assert SessionDescription.parse(reinvite.body).media_direction(0) == "sendonly"
    assert SessionDescription.parse(held.body).media_direction(0) == "recvonly"
    resumed = await out.send("INVITE", phone_sdp(a.rtp_port, version=3))
    assert resumed.status == 200
    assert SessionDescription.parse((await b.next_request()).body).media_direction(0) == "sendrecv"
    assert SessionDescription.parse(resumed.body).media_direction(0) == "sendrecv"
    # hold from the callee side too
    held_b = await inc.request_in_dialog(
        "INVITE", answer_for(phone_sdp(b.rtp_port), b.rtp_port, 5).replace(b"sendrecv", b"sendonly")
    )
    assert held_b.status == 200
    assert SessionDescription.parse((await a.next_request()).body).media_direction(0) == "sendonly"


async def test_reinvite_refused_by_other_side_is_passed_back(lab: Lab) -> None:
    a, b, out, _inc = await established(lab)
    b.reject_reinvite = 488
    resp = await out.send("INVITE", phone_sdp(a.rtp_port, version=2, direction="sendonly"))
    assert resp.status == 488
    # the call is still up
    assert (await out.send("BYE")).status == 200


async def test_info_relayed_in_dialog(lab: Lab) -> None:
    _a, b, out, _inc = await established(lab)
    resp = await out.send("INFO", headers=[("Content-Type", "application/dtmf-relay")])
    assert resp.status == 200
    assert (await b.next_request()).method == "INFO"


async def test_unknown_dialog_481(lab: Lab) -> None:
    a = await lab.phone("1001")
    req = Request("BYE", "sip:1002@lab.test", a._headers("BYE", "1002", "nope", "t", 2))
    req.headers.set("To", "<sip:1002@lab.test>;tag=unknown")
    assert (await a.ep.request(req, lab.address)).status == 481


async def test_session_interval_too_small_422(lab: Lab) -> None:
    a = await lab.phone("1001")
    await lab.phone("1002")
    out = await a.call("1002", headers=[("Supported", "timer"), ("Session-Expires", "30")])
    resp = await out.final()
    assert resp.status == 422
    assert resp.headers.get("Min-SE") == "90"


async def test_session_timer_refreshes_both_legs() -> None:
    async with running_lab(session_expires=2, min_se=1) as lab:
        a, b, out, inc = await established(lab)
        assert "refresher=uas" in (out.response.headers.get("Session-Expires") or "")
        seen_a = await a.next_request(4)
        seen_b = await b.next_request(4)
        # A allowed UPDATE; B did not say, so it gets a re-INVITE repeating the same SDP
        assert seen_a.method == "UPDATE"
        assert len(seen_a.headers.get_all("Contact")) == 1
        assert seen_a.headers.get("Session-Expires") == "2;refresher=uac"
        assert seen_b.method == "INVITE"
        assert seen_b.body == inc.request.body
        assert lab.server.b2bua.calls  # still up


async def test_failed_refresh_tears_the_call_down() -> None:
    async with running_lab(session_expires=2, min_se=1) as lab:
        a, b, _out, _inc = await established(lab)
        await b.close()  # B vanishes: its refresh gets no answer
        bye = await a.next_request(10)
        while bye.method != "BYE":
            bye = await a.next_request(10)
        await wait_for(lambda: not lab.server.b2bua.calls)


# --------------------------------------------------------------------------------- recording
async def test_recorded_call_anchored_on_the_bridge(lab: Lab) -> None:
    a, b, out, inc = await established(lab, "2001", "2002")
    bridge = lab.bridge
    first = bridge.invites[0]
    assert first.headers.get("X-CV-Tenant") == "rec"
    assert first.headers.get("X-CV-Part") == "1"
    assert len(first.headers.get("X-CV-Session") or "") == 32
    info = unb64json(first.headers.get("X-CV-Call") or "")
    assert info["caller"] == "2001" and info["callee"] == "2002" and info["call_id"] == out.request.call_id
    offer = SessionDescription.parse(first.body)
    assert offer.media_address(0) == ("127.0.0.1", a.rtp_port)
    assert offer.media_address(1) == ("0.0.0.0", 9)
    # B was offered the MCP's callee port with A's codecs (telephone-event included)
    b_offer = SessionDescription.parse(inc.request.body)
    assert b_offer.media_address(0) == ("127.0.0.1", 31002)
    assert b_offer.media[0].formats == [0, 8, 101]
    assert b_offer.origin.username == "callvault"
    # A's answer points at the MCP's caller port with B's codec
    a_answer = SessionDescription.parse(out.response.body)
    assert a_answer.media_address(0) == ("127.0.0.1", 31000)
    assert a_answer.media[0].formats == [0, 101]
    # the MCP was re-INVITEd with B's media on the callee line
    await wait_for(lambda: len(bridge.invites) == 2)
    update = SessionDescription.parse(bridge.invites[1].body)
    assert update.media_address(1) == ("127.0.0.1", b.rtp_port)
    assert update.media_address(0) == ("127.0.0.1", a.rtp_port)
    # BYE from A ends B and the recording
    assert (await out.send("BYE")).status == 200
    assert (await b.next_request()).method == "BYE"
    await asyncio.wait_for(bridge.byes.get(), 5)


async def test_recorded_hold_rewritten_to_bridge_ports(lab: Lab) -> None:
    a, b, out, _inc = await established(lab, "2001", "2002")
    held = await out.send("INVITE", phone_sdp(a.rtp_port, version=2, direction="sendonly"))
    assert held.status == 200
    reinvite = await b.next_request()
    sdp_b = SessionDescription.parse(reinvite.body)
    assert sdp_b.media_address(0) == ("127.0.0.1", 31002)
    assert sdp_b.media_direction(0) == "sendonly"
    answer = SessionDescription.parse(held.body)
    assert answer.media_address(0) == ("127.0.0.1", 31000)
    assert answer.media_direction(0) == "recvonly"


async def test_recorded_early_media_anchored(lab: Lab) -> None:
    a = await lab.phone("2001")
    b = await lab.phone("2002")
    out = await a.call("2002")
    inc = await b.next_call()
    inc.ring(answer_for(inc.request.body, b.rtp_port))
    await wait_for(lambda: any(r.status == 183 for r in out.provisional))
    early = next(r for r in out.provisional if r.status == 183)
    assert SessionDescription.parse(early.body).media_address(0) == ("127.0.0.1", 31000)
    await inc.answer(answer_for(inc.request.body, b.rtp_port))
    assert (await out.final()).status == 200


async def test_bridge_timeout_call_goes_on_unrecorded() -> None:
    async with running_lab(FakeBridge(answer=False)) as lab:
        a, _b, out, inc = await established(lab, "2001", "2002")
        assert inc.request.body == phone_sdp(a.rtp_port)  # not anchored
        assert (await out.send("BYE")).status == 200


async def test_bridge_failure_call_goes_on_unrecorded() -> None:
    async with running_lab(FakeBridge(status=503)) as lab:
        _a, b, out, _inc = await established(lab, "2001", "2002")
        assert SessionDescription.parse(out.response.body).media_address(0) == ("127.0.0.1", b.rtp_port)


async def test_recorded_cancel_ends_the_bridge(lab: Lab) -> None:
    a = await lab.phone("2001")
    b = await lab.phone("2002")
    out = await a.call("2002")
    inc = await b.next_call()
    inc.ring()
    await wait_for(lambda: any(r.status == 180 for r in out.provisional))
    out.cancel()
    await asyncio.wait_for(inc.inc.cancelled.wait(), 5)
    inc.reject(487)
    assert (await out.final()).status == 487
    await asyncio.wait_for(lab.bridge.byes.get(), 5)
    await wait_for(lambda: not lab.server.b2bua.calls)


async def test_bridge_bye_rejoins_the_parties(lab: Lab) -> None:
    a, b, out, _inc = await established(lab, "2001", "2002")
    assert await lab.bridge.bye() == 200
    to_b = await b.next_request()
    assert to_b.method == "INVITE"
    assert SessionDescription.parse(to_b.body).media_address(0) == ("127.0.0.1", a.rtp_port)
    to_a = await a.next_request()
    assert to_a.method == "INVITE"
    assert SessionDescription.parse(to_a.body).media_address(0) == ("127.0.0.1", b.rtp_port)
    # the call goes on: BYE still reaches the other side
    assert (await out.send("BYE")).status == 200
    assert (await b.next_request()).method == "BYE"


async def test_callee_over_tcp(lab: Lab) -> None:
    a = await lab.phone("1001")
    b = await lab.phone("1002", transport="tcp")
    out = await a.call("1002")
    inc = await b.next_call()
    assert inc.inc.transport == "tcp"
    await inc.answer()
    assert (await out.final()).status == 200
    assert (await inc.request_in_dialog("BYE")).status == 200
    assert (await a.next_request()).method == "BYE"


async def test_overlapping_offers_get_491(lab: Lab) -> None:
    a, b, out, inc = await established(lab)
    b.reinvite_delay = 0.5
    first = asyncio.ensure_future(out.send("INVITE", phone_sdp(a.rtp_port, version=2, direction="sendonly")))
    await asyncio.sleep(0.1)  # the SIP Server is now waiting for B's answer
    a.reinvite_delay = 0.0
    crossing = await inc.request_in_dialog("INVITE", answer_for(phone_sdp(b.rtp_port), b.rtp_port, 7))
    assert crossing.status == 491
    assert (await first).status == 200


async def test_caller_as_refresher_that_stops_refreshing_is_hung_up() -> None:
    async with running_lab(session_expires=30, min_se=1) as lab:
        a = await lab.phone("1001")
        b = await lab.phone("1002")
        out = await a.call("1002", headers=[("Supported", "timer"), ("Session-Expires", "2;refresher=uac")])
        inc = await b.next_call()
        await inc.answer()
        resp = await out.final()
        assert resp.status == 200
        assert resp.headers.get("Session-Expires") == "2;refresher=uac"
        assert resp.headers.get("Require") == "timer"
        # A never refreshes: after 2 - 2/3 s the SIP Server ends the call on both sides
        assert (await a.next_request(5)).method == "BYE"
        await wait_for(lambda: not lab.server.b2bua.calls)


# --------------------------------------------------------------------------------- lifecycle
async def test_shutdown_refuses_new_calls_and_ends_established_ones() -> None:
    bridge = FakeBridge()
    await bridge.ep.start()
    server = SipServer(make_config(bridge.ep.port), timers=FAST)
    await server.start()
    lab = Lab(server, bridge)
    try:
        a, _b, _out, _inc = await established(lab)
        c = await lab.phone("1003")
        stopping = asyncio.ensure_future(server.stop(0.5))
        await wait_for(lambda: not server.b2bua.accepting)
        refused = await c.call("1002")
        assert (await refused.final()).status == 503
        bye = await a.next_request(5)
        assert bye.method == "BYE"
        await stopping
    finally:
        for p in lab.phones:
            await p.close()
        await bridge.ep.close()


async def test_daemon_run_serves_and_stops() -> None:
    from services.sip_server.daemon import run

    port = free_port()
    config = make_config(free_port())
    config.sip_server.port = port
    config.sip_server.digest_algorithms = ["MD5"]  # the default
    ready = asyncio.Event()
    task = asyncio.ensure_future(run(config, ready=ready.set))
    await asyncio.wait_for(ready.wait(), 5)
    phone = await Phone("1001", PASSWORDS["1001"], ("127.0.0.1", port)).start()
    try:
        assert (await phone.register()).status == 200
    finally:
        await phone.close()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# --------------------------------------------------------------------------------- with the real RM + MCP
class RtpParty(asyncio.DatagramProtocol):
    """A phone's RTP socket: remembers what it receives."""

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


def rtp_packet(seq: int, ssrc: int) -> bytes:
    import struct

    return struct.pack("!BBHII", 0x80, 0, seq, seq * 160, ssrc) + b"\xff" * 160


async def start_daemon(name: str, factory: Any, timeout: float = 10.0) -> asyncio.Task[None]:
    ready = asyncio.Event()
    task = asyncio.ensure_future(factory(ready.set))
    waiter = asyncio.ensure_future(ready.wait())
    done, _ = await asyncio.wait({task, waiter}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    if waiter not in done:
        waiter.cancel()
        if task.done():
            task.result()
        # never leave a half-started daemon (and its rtp_core engine) running past the test
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        raise AssertionError(f"{name} did not become ready within {timeout} s")
    return task


async def test_recorded_call_through_real_rm_and_mcp(tmp_path: Any) -> None:
    import json
    import random

    from services.mcp import daemon as mcp_daemon
    from services.resource_manager import daemon as rm_daemon

    rm_port, mcp_port = free_port(), free_port()
    base = random.randrange(32000, 60000, 200)
    data = {
        "sip_server": {
            "host": "127.0.0.1",
            "port": 0,
            "realm": "callvault",
            "nonce_secret": "0123456789abcdef",
            "resource_manager": f"127.0.0.1:{rm_port}",
            "recording_timeout": 5.0,
        },
        "resource_manager": {"host": "127.0.0.1", "port": rm_port, "options_interval": 0.2},
        "mcp": [
            {
                "name": "mcp1",
                "port": mcp_port,
                "rtp_port_min": base,
                "rtp_port_max": base + 98,
                "spool_dir": "spool1",
                "shutdown_timeout": 5.0,
            }
        ],
        "storage": {"disk_root": "storage", "queue_dir": "queue"},
        "tenants": [
            {
                "id": "rec",
                "api_key": "rec-key-0123456789",
                "domains": ["rec.test"],
                "users": [{"extension": e, "password": PASSWORDS[e]} for e in ("2001", "2002")],
                "policy": {"mode": "all"},
            }
        ],
    }
    config = config_mod.from_dict(data, base_dir=str(tmp_path), environ={})
    tasks = [
        await start_daemon("mcp1", lambda ready: mcp_daemon.run(config, name="mcp1", ready=ready)),
        await start_daemon("rm", lambda ready: rm_daemon.run(config, ready=ready)),
    ]
    server = SipServer(config)
    await server.start()
    lab = Lab(server, FakeBridge())
    loop = asyncio.get_running_loop()
    _, party_a = await loop.create_datagram_endpoint(RtpParty, local_addr=("127.0.0.1", 0))
    _, party_b = await loop.create_datagram_endpoint(RtpParty, local_addr=("127.0.0.1", 0))
    try:
        a = await lab.phone("2001")
        b = await lab.phone("2002")
        out = await a.call("2002", sdp=phone_sdp(party_a.port))
        inc = await b.next_call(10)
        b_offer = SessionDescription.parse(inc.request.body)
        mcp_callee = b_offer.media_address(0)
        assert mcp_callee[0] == "127.0.0.1" and base <= mcp_callee[1] <= base + 98
        assert b_offer.media[0].formats == [0, 8, 101]  # A's codecs, telephone-event untouched
        await inc.answer(answer_for(inc.request.body, party_b.port))
        resp = await out.final(15)
        assert resp.status == 200
        a_answer = SessionDescription.parse(resp.body)
        mcp_caller = a_answer.media_address(0)
        assert base <= mcp_caller[1] <= base + 98 and mcp_caller != mcp_callee
        assert a_answer.media[0].formats == [0, 101]

        # media flows A -> MCP -> B and B -> MCP -> A
        assert party_a.transport is not None and party_b.transport is not None
        for i in range(25):
            party_a.transport.sendto(rtp_packet(i, 0xA), mcp_caller)
            party_b.transport.sendto(rtp_packet(i, 0xB), mcp_callee)
            await asyncio.sleep(0.02)
        await wait_for(lambda: len(party_b.received) >= 20 and len(party_a.received) >= 20)

        assert (await inc.request_in_dialog("BYE")).status == 200
        assert (await a.next_request()).method == "BYE"
        queue = tmp_path / "queue"
        await wait_for(lambda: any(queue.glob("*.json")), timeout=15)
        event = json.loads(next(queue.glob("*.json")).read_text())
        assert (event["tenant"], event["caller"], event["callee"]) == ("rec", "2001", "2002")
        assert event["call_id"] == out.request.call_id
    finally:
        for party in (party_a, party_b):
            if party.transport is not None:
                party.transport.close()
        await server.stop(1.0)
        for p in lab.phones:
            await p.close()
        for task in reversed(tasks):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

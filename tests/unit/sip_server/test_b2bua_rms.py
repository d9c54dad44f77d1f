"""The SIP Server with two RMs (active/active, docs/HA.md): new bridges in turn, a failed RM tried
last, a recording dialog's route moved off an RM that stopped answering (also after it took a
re-INVITE), and the Reason that tells "MCP lost" from any other end of the bridge."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest

from services.config import ClusterConfig, SipServerConfig
from services.sip.dialog import Dialog
from services.sip.message import Request, Response
from services.sip.uri import SipUri
from services.sip_server import legs
from services.sip_server.b2bua import B2BUA, mcp_lost
from services.sip_server.call import Leg

RM1, RM2 = ("127.0.0.1", 5070), ("127.0.0.1", 5072)


def b2bua(rms: list[str]) -> B2BUA:
    config = ClusterConfig(sip_server=SipServerConfig(resource_managers=rms))
    endpoint: Any = SimpleNamespace(host="127.0.0.1", port=5060)
    return B2BUA(config, endpoint, registrar=None, challenger=None)  # type: ignore[arg-type]


def test_one_rm_by_default_and_the_list_when_given() -> None:
    assert b2bua([]).rms == [RM1]
    assert b2bua(["127.0.0.1:5070", "127.0.0.1:5072"]).rms == [RM1, RM2]


def test_rms_in_turn_and_a_failed_one_last() -> None:
    b = b2bua(["127.0.0.1:5070", "127.0.0.1:5072"])
    firsts = [b._rm_order()[0] for _ in range(4)]
    assert sorted(firsts) == [RM1, RM1, RM2, RM2]
    b._rm_failed_until[RM1] = float("inf")
    assert [b._rm_order() for _ in range(2)] == [[RM2, RM1], [RM2, RM1]]


def test_route_moves_off_a_dead_rm_only() -> None:
    b = b2bua(["127.0.0.1:5070", "127.0.0.1:5072"])
    dialog: Any = SimpleNamespace(route_set=["<sip:127.0.0.1:5070;lr>"], call_id="c1")
    leg = Leg("rec", dialog=dialog)
    assert not b._reroute(leg, ("127.0.0.1", 9999))  # not an RM of ours
    assert not b._reroute(leg, RM2)  # not this dialog's first hop
    assert b._reroute(leg, RM1)
    assert dialog.route_set == ["<sip:127.0.0.1:5072;lr>"]
    assert b._rm_failed_until[RM1] > 0
    lone = b2bua([])
    assert not lone._reroute(
        Leg("rec", dialog=SimpleNamespace(route_set=["<sip:127.0.0.1:5070;lr>"], call_id="c")), RM1
    )  # type: ignore[arg-type]


def test_mcp_lost_reason() -> None:
    assert mcp_lost(Request("BYE", "sip:x@h", [("Reason", 'SIP;cause=503;text="MCP down"')]))
    assert not mcp_lost(Request("BYE", "sip:x@h", [("Reason", 'SIP;cause=200;text="no ACK"')]))


class _Client:
    """A client transaction of :class:`_Endpoint`: its final answer is whatever the test sets."""

    def __init__(self, request: Request) -> None:
        self.request = request
        self.answer: asyncio.Future[Response] = asyncio.get_running_loop().create_future()
        self.cancelled = False

    async def final(self) -> Response:
        return await asyncio.shield(self.answer)

    def cancel(self) -> None:
        self.cancelled = True


class _Endpoint:
    """Two RMs in front of an MCP, scripted: rm1 takes a re-INVITE (100 Trying), forwards it, and
    dies before the MCP's 200 comes back through it, so it answers nothing more (not even OPTIONS);
    rm2 relays everything. The MCP refuses a re-INVITE while its last 2xx waits for an ACK (491),
    as services/mcp/server.py does."""

    host, port = "127.0.0.1", 5060

    def __init__(self) -> None:
        self.sent: list[tuple[str, tuple[str, int], Request]] = []
        self.mcp_waits_ack: int | None = None

    def contact_uri(self, user: str | None = None, transport: str = "udp") -> SipUri:
        return SipUri("sip", user, None, self.host, self.port)

    def start_request(self, request: Request, dest: tuple[str, int], transport: str = "udp", *,
                      on_provisional: Callable[[Response], None] | None = None) -> _Client:  # fmt: skip
        self.sent.append((request.method, dest, request))
        client = _Client(request)
        if request.method == "INVITE" and dest == RM1:
            assert on_provisional is not None
            asyncio.get_running_loop().call_soon(on_provisional, Response(100))
            self.mcp_waits_ack = request.cseq.seq  # the MCP answered 200 into the dead rm1
        elif request.method == "INVITE" and dest == RM2:
            refused = self.mcp_waits_ack is not None
            client.answer.set_result(Response(491 if refused else 200, headers=[("To", "<sip:r@x>;tag=m")]))
        elif request.method == "OPTIONS" and dest == RM1:
            client.answer.set_result(Response(503, "Service Unavailable (port unreachable)"))
        return client

    def send_ack(self, ack: Request, dest: tuple[str, int], transport: str = "udp") -> None:
        self.sent.append(("ACK", dest, ack))
        if dest == RM2 and ack.cseq.seq == self.mcp_waits_ack:
            self.mcp_waits_ack = None


def _rec_leg() -> Leg:
    invite = Request("INVITE", "sip:record@127.0.0.1:5070")
    for name, value in [
        ("From", "<sip:sip-server@127.0.0.1:5060>;tag=s"),
        ("To", "<sip:record@127.0.0.1:5070>"),
        ("Call-ID", "bridge-1"),
        ("CSeq", "1 INVITE"),
        ("Via", "SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bK-1"),
        ("Contact", "<sip:sip-server@127.0.0.1:5060>"),
    ]:
        invite.headers.add(name, value)
    ok = Response(200, headers=[
        ("To", "<sip:record@127.0.0.1:5070>;tag=m"), ("Contact", "<sip:mcp@127.0.0.1:5080>"),
        ("Record-Route", "<sip:127.0.0.1:5070;lr>"),
    ])  # fmt: skip
    return Leg("rec", dialog=Dialog.from_uac(invite, ok), confirmed=True)


async def test_reinvite_taken_by_an_rm_that_dies_takes_the_other_rm(monkeypatch: pytest.MonkeyPatch) -> None:
    """The bridge re-INVITE of a call being answered reached rm1 (100 Trying) just before rm1 was
    SIGKILLed: the MCP's 200 died with rm1. Before the fix the SIP Server waited for that 200 for
    ever (no Timer B past 100 Trying), so the caller never got its 200. Now rm1's silence to
    OPTIONS moves the dialog to rm2, the lost 200 is ACKed there and the re-INVITE sent again."""
    monkeypatch.setattr(legs, "RM_ANSWER_TIMEOUT", 0.05)
    ep = _Endpoint()
    b = b2bua(["127.0.0.1:5070", "127.0.0.1:5072"])
    b.ep = ep  # type: ignore[assignment]
    leg = _rec_leg()
    assert leg.dialog is not None
    resp = await asyncio.wait_for(b._reinvite(None, leg, b"v=0\r\n"), 5)  # type: ignore[arg-type]
    assert resp is not None and resp.status == 200
    assert [(method, dest) for method, dest, _ in ep.sent] == [
        ("INVITE", RM1), ("OPTIONS", RM1),  # taken, then rm1 found dead
        ("ACK", RM2), ("INVITE", RM2),  # the 200 lost with rm1 ACKed, the re-INVITE again
        ("ACK", RM2),  # the ACK of the new 200
    ]  # fmt: skip
    first, again = ep.sent[0][2], ep.sent[3][2]
    assert again.cseq == first.cseq and ep.sent[2][2].cseq.seq == first.cseq.seq
    assert again.headers.get_all("Route") == ["<sip:127.0.0.1:5072;lr>"]
    assert leg.dialog.route_set == ["<sip:127.0.0.1:5072;lr>"]


async def test_reinvite_taken_by_a_live_rm_waits_for_its_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    """An RM that took a re-INVITE and still answers OPTIONS keeps it: no second route, no ACK."""
    monkeypatch.setattr(legs, "RM_ANSWER_TIMEOUT", 0.05)
    ep = _Endpoint()
    b = b2bua(["127.0.0.1:5070", "127.0.0.1:5072"])
    b.ep = ep  # type: ignore[assignment]
    leg = _rec_leg()
    real_start = ep.start_request
    clients: list[_Client] = []

    def start_request(request: Request, dest: tuple[str, int], transport: str = "udp", **kw: Any) -> _Client:
        client = real_start(request, dest, transport, **kw)
        clients.append(client)
        if request.method == "OPTIONS":  # rm1 is alive: it answers, and the MCP's 200 follows
            client.answer = asyncio.get_running_loop().create_future()
            client.answer.set_result(Response(200))
            if sum(1 for c in clients if c.request.method == "OPTIONS") == 2:
                clients[0].answer.set_result(Response(200, headers=[("To", "<sip:r@x>;tag=m")]))
        return client

    ep.start_request = start_request  # type: ignore[method-assign]
    resp = await asyncio.wait_for(b._reinvite(None, leg, b"v=0\r\n"), 5)  # type: ignore[arg-type]
    assert resp is not None and resp.status == 200
    assert [(method, dest) for method, dest, _ in ep.sent] == [
        ("INVITE", RM1), ("OPTIONS", RM1), ("OPTIONS", RM1), ("ACK", RM1),
    ]  # fmt: skip
    assert not clients[0].cancelled

"""Transactions (RFC 3261 17, RFC 6026): a UAC layer and a UAS layer wired together in memory.

Every message crosses the "network" as bytes (serialised and re-parsed), with a fake clock and a
drop function to lose chosen messages, so the retransmission and timeout timers are exercised
exactly as the RFC describes them.
"""

from __future__ import annotations

import ast
import pathlib
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.sip import auth, dialog, timers, transaction
from services.sip.errors import InvalidStateError
from services.sip.message import Request, Response, make_response, new_call_id, new_tag, parse_message
from services.sip.timers import DEFAULT_TIMERS, TimerConfig
from services.sip.transaction import (
    AckReceived,
    AckTimeout,
    CancelReceived,
    InviteClientTransaction,
    InviteServerTransaction,
    NonInviteClientTransaction,
    RequestReceived,
    ResponseReceived,
    Send,
    ServerTransaction,
    StrayResponse,
    TransactionLayer,
    TransactionState,
    TransactionTerminated,
    apply_received,
    prepend_via,
    response_destination,
)

S = TransactionState
UAC_ADDR = ("10.0.0.1", 5060)
UAS_ADDR = ("10.0.0.2", 5060)


@dataclass
class Wire:
    """One message seen on the network."""

    time: float
    sender: str
    text: str
    message: Request | Response
    dropped: bool

    @property
    def what(self) -> str:
        m = self.message
        return m.method if isinstance(m, Request) else str(m.status)


@dataclass
class Net:
    """Two transaction layers and a lossy in-memory network with a fake clock.

    ``drop(wire)`` decides per message whether it is lost. ``uac_source`` lets the UAC appear
    behind a NAT (its packets arrive from another address than its Via says).
    """

    transport: str = "udp"
    timers: TimerConfig = DEFAULT_TIMERS
    uac_source: tuple[str, int] = UAC_ADDR
    drop: Callable[[Wire], bool] = lambda wire: False
    now: float = 0.0
    wire: list[Wire] = field(default_factory=list)
    uac_events: list[object] = field(default_factory=list)
    uas_events: list[object] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.uac = TransactionLayer(self.timers)
        self.uas = TransactionLayer(self.timers)

    # -- plumbing ------------------------------------------------------------------------------
    def _name(self, layer: TransactionLayer) -> str:
        return "uac" if layer is self.uac else "uas"

    def deliver(self, sender: TransactionLayer, sends: list[Send]) -> None:
        for send in sends:
            data = send.message.to_bytes()
            message = parse_message(data)
            wire = Wire(self.now, self._name(sender), data.decode(), message, False)
            wire.dropped = self.drop(wire)
            self.wire.append(wire)
            if wire.dropped:
                continue
            if sender is self.uac:
                assert send.dest == UAS_ADDR
                receiver, source = self.uas, self.uac_source
            else:
                assert send.dest == self.uac_source
                receiver, source = self.uac, UAS_ADDR
            more = receiver.receive(message, source, send.transport, self.now)
            self.collect()
            self.deliver(receiver, more)
        self.collect()

    def collect(self) -> None:
        self.uac_events += self.uac.drain_events()
        self.uas_events += self.uas.drain_events()

    def advance(self, until: float) -> None:
        """Run both layers' timers in time order up to ``until``."""
        while True:
            deadlines = [
                (t, layer) for layer in (self.uac, self.uas) if (t := layer.next_timer()) is not None
            ]
            due = [d for d in deadlines if d[0] <= until]
            if not due:
                break
            when, layer = min(due, key=lambda d: d[0])
            self.now = max(self.now, when)
            self.deliver(layer, layer.handle_timers(self.now))
        self.now = max(self.now, until)

    # -- TU helpers ----------------------------------------------------------------------------
    def invite(self, method: str = "INVITE") -> InviteClientTransaction | NonInviteClientTransaction:
        request = make_request(method, self.transport)
        txn, sends = self.uac.send_request(request, UAS_ADDR, self.transport, self.now)
        self.deliver(self.uac, sends)
        return txn  # type: ignore[return-value]

    def server_txn(self, index: int = 0) -> ServerTransaction:
        requests = [e for e in self.uas_events if isinstance(e, RequestReceived)]
        return requests[index].transaction

    def respond(self, status: int, txn: ServerTransaction | None = None, to_tag: str = "uas-tag") -> Response:
        txn = txn or self.server_txn()
        response = make_response(txn.request, status, to_tag=to_tag)
        self.deliver(self.uas, self.uas.respond(txn, response, self.now))
        return response

    def uac_responses(self) -> list[int]:
        return [e.response.status for e in self.uac_events if isinstance(e, ResponseReceived)]

    def sent(self, sender: str, what: str) -> list[Wire]:
        return [w for w in self.wire if w.sender == sender and w.what == what]

    def times(self, sender: str, what: str) -> list[float]:
        return [round(w.time, 6) for w in self.sent(sender, what)]


def make_request(method: str, transport: str = "udp") -> Request:
    request = Request(
        method,
        "sip:bob@10.0.0.2",
        [
            ("Max-Forwards", "70"),
            ("From", f"<sip:alice@example.com>;tag={new_tag()}"),
            ("To", "<sip:bob@example.com>"),
            ("Call-ID", new_call_id("10.0.0.1")),
            ("CSeq", f"1 {method}"),
            ("Contact", "<sip:alice@10.0.0.1>"),
        ],
    )
    prepend_via(request, UAC_ADDR[0], UAC_ADDR[1], transport)
    return request


def drop_first(what: str, sender: str, count: int = 1) -> Callable[[Wire], bool]:
    """Lose the first ``count`` messages ``what`` (method or status) sent by ``sender``."""
    seen = {"n": 0}

    def drop(wire: Wire) -> bool:
        if wire.sender == sender and wire.what == what and seen["n"] < count:
            seen["n"] += 1
            return True
        return False

    return drop


def drop_all(what: str, sender: str) -> Callable[[Wire], bool]:
    return lambda wire: wire.sender == sender and wire.what == what


# ------------------------------------------------------------------------------------------
# INVITE client + server
# ------------------------------------------------------------------------------------------
def test_invite_answered_and_acked() -> None:
    net = Net()
    ict = net.invite()
    assert isinstance(ict, InviteClientTransaction)
    ist = net.server_txn()
    assert isinstance(ist, InviteServerTransaction) and ist.state is S.PROCEEDING
    assert net.uac_responses() == [100]  # 100 Trying at once (17.2.1)
    assert ict.state is S.PROCEEDING
    net.respond(180)
    ok = net.respond(200)
    assert net.uac_responses() == [100, 180, 200]
    assert ict.state is S.ACCEPTED and ist.state is S.ACCEPTED

    # The TU's ACK (new branch) stops the UAS's 2xx retransmissions.
    ack = Request("ACK", "sip:bob@10.0.0.2", [(n, v) for n, v in ict.request.headers.items() if n != "Via"])
    ack.headers.set("CSeq", "1 ACK")
    ack.headers.set("To", ok.headers.get("To") or "")
    prepend_via(ack, *UAC_ADDR, "udp")
    net.deliver(net.uac, net.uac.send_ack(ack, UAS_ADDR, "udp", net.now))
    acks = [e for e in net.uas_events if isinstance(e, AckReceived)]
    assert len(acks) == 1 and acks[0].transaction is ist and ist.acked
    net.advance(31.9)
    assert net.sent("uas", "200") and len(net.sent("uas", "200")) == 1  # never retransmitted
    # Timers L and M (64*T1) end both transactions.
    net.advance(32.0)
    assert ict.state is S.TERMINATED and ist.state is S.TERMINATED
    assert not net.uac.clients and not net.uas.servers
    assert not [e for e in net.uas_events if isinstance(e, AckTimeout)]
    assert net.uac.next_timer() is None and net.uas.next_timer() is None


def test_timer_a_doubles_until_answered() -> None:
    net = Net(drop=drop_first("INVITE", "uac", 3))
    ict = net.invite()
    assert ict.state is S.CALLING
    net.advance(10)
    # 17.1.1.2: A = T1, 2*T1, 4*T1 ...: sent at 0, 0.5, 1.5, 3.5; the 4th copy gets through.
    assert net.times("uac", "INVITE") == [0.0, 0.5, 1.5, 3.5]
    assert ict.state is S.PROCEEDING
    assert len([e for e in net.uas_events if isinstance(e, RequestReceived)]) == 1


def test_timer_b_gives_a_synthetic_408() -> None:
    net = Net(drop=drop_all("INVITE", "uac"))
    ict = net.invite()
    net.advance(31.99)
    assert ict.state is S.CALLING
    net.advance(32.0)
    assert ict.state is S.TERMINATED
    assert net.times("uac", "INVITE") == [0.0, 0.5, 1.5, 3.5, 7.5, 15.5, 31.5]
    events = [e for e in net.uac_events if isinstance(e, ResponseReceived)]
    assert [(e.response.status, e.synthetic) for e in events] == [(408, True)]
    assert events[0].response.call_id == ict.request.call_id
    # The TU hears the 408 before the transaction leaves.
    kinds = [type(e) for e in net.uac_events]
    assert kinds.index(ResponseReceived) < kinds.index(TransactionTerminated)


def test_timer_b_stops_once_a_provisional_arrived() -> None:
    net = Net()
    ict = net.invite()
    net.advance(100)
    assert ict.state is S.PROCEEDING  # 17.1.1.2: only Calling times out with B


def test_non2xx_final_is_acked_by_the_transaction() -> None:
    net = Net()
    ict = net.invite()
    ist = net.server_txn()
    net.respond(486)
    assert ict.state is S.COMPLETED and ist.state is S.CONFIRMED
    [ack] = net.sent("uac", "ACK")
    # 17.1.1.3: same branch as the INVITE, To with the response's tag, CSeq number of the INVITE.
    assert ack.message.branch == ict.request.branch
    assert ack.message.to.tag == "uas-tag"
    assert str(ack.message.cseq) == "1 ACK"
    assert ack.message.uri == ict.request.uri
    assert not [e for e in net.uas_events if isinstance(e, AckReceived)]  # absorbed (17.2.1)
    net.advance(4.99)
    assert ist.state is S.CONFIRMED
    net.advance(5.0)  # timer I = T4
    assert ist.state is S.TERMINATED
    net.advance(31.99)
    assert ict.state is S.COMPLETED
    net.advance(32.0)  # timer D
    assert ict.state is S.TERMINATED
    assert net.uac_responses() == [100, 486]


def test_lost_final_response_retransmitted_by_timer_g() -> None:
    net = Net(drop=drop_first("486", "uas", 2))
    ict = net.invite()
    net.respond(486)
    assert ict.state is S.PROCEEDING
    net.advance(10)
    assert net.times("uas", "486") == [0.0, 0.5, 1.5]  # G = T1, 2*T1 ...
    assert ict.state is S.COMPLETED
    assert net.uac_responses() == [100, 486]


def test_lost_ack_makes_the_uac_resend_it_without_telling_the_tu() -> None:
    net = Net(drop=drop_first("ACK", "uac", 1))
    ict = net.invite()
    ist = net.server_txn()
    net.respond(503)
    assert ist.state is S.COMPLETED
    net.advance(1)
    assert ist.state is S.CONFIRMED
    assert len(net.sent("uac", "ACK")) == 2
    assert net.uac_responses() == [100, 503]  # the retransmitted 503 is absorbed
    assert ict.state is S.COMPLETED


def test_timer_g_caps_at_t2_and_timer_h_reports_missing_ack() -> None:
    net = Net(drop=drop_all("ACK", "uac"))
    net.invite()
    ist = net.server_txn()
    net.respond(404)
    net.advance(40)
    # G: 0.5, 1, 2, 4, 4, 4 ... (capped at T2) until H = 32 s.
    assert net.times("uas", "404") == [0.0, 0.5, 1.5, 3.5, 7.5, 11.5, 15.5, 19.5, 23.5, 27.5, 31.5]
    assert ist.state is S.TERMINATED
    [timeout] = [e for e in net.uas_events if isinstance(e, AckTimeout)]
    assert timeout.transaction is ist and timeout.response.status == 404


def test_uas_retransmits_2xx_until_acked_and_uac_resends_its_ack() -> None:
    net = Net(drop=drop_first("200", "uas", 1))
    ict = net.invite()
    ist = net.server_txn()
    ok = net.respond(200)
    assert ict.state is S.PROCEEDING  # first 200 lost
    net.advance(0.5)  # 13.3.1.4: first retransmission after T1
    assert net.uac_responses() == [100, 200] and ict.state is S.ACCEPTED
    net.advance(1.5)  # 2*T1 later: again, the TU does not see it twice
    assert net.times("uas", "200") == [0.0, 0.5, 1.5]
    assert net.uac_responses() == [100, 200]
    assert not ist.acked
    # Now the TU ACKs; the ACK is lost, so the next 2xx retransmission triggers a resend.
    net.drop = drop_first("ACK", "uac", 1)
    ack = build_2xx_ack(ict.request, ok)
    net.deliver(net.uac, net.uac.send_ack(ack, UAS_ADDR, "udp", net.now))
    assert not ist.acked
    net.advance(3.5)
    assert ist.acked
    assert len(net.sent("uac", "ACK")) == 2
    assert net.sent("uac", "ACK")[1].message.branch == ack.branch  # the same ACK
    net.advance(40)
    assert len(net.sent("uas", "200")) == 4  # no more after the ACK
    assert ist.state is S.TERMINATED and ict.state is S.TERMINATED


def build_2xx_ack(invite: Request, ok: Response) -> Request:
    ack = Request("ACK", invite.uri.copy())
    ack.headers.add("Max-Forwards", "70")
    for name in ("From", "Call-ID"):
        ack.headers.add(name, invite.headers.get(name) or "")
    ack.headers.add("To", ok.headers.get("To") or "")
    ack.headers.add("CSeq", f"{invite.cseq.seq} ACK")
    prepend_via(ack, *UAC_ADDR, "udp")
    return ack


def test_unacked_2xx_gives_up_after_64_t1() -> None:
    net = Net()
    net.invite()
    ist = net.server_txn()
    net.respond(200)
    net.advance(40)
    # T1 doubling, capped at T2: 0, .5, 1.5, 3.5, 7.5, 11.5 ... 31.5; then timer L at 32.
    assert net.times("uas", "200") == [0.0, 0.5, 1.5, 3.5, 7.5, 11.5, 15.5, 19.5, 23.5, 27.5, 31.5]
    [timeout] = [e for e in net.uas_events if isinstance(e, AckTimeout)]
    assert timeout.transaction is ist and ist.state is S.TERMINATED
    assert net.uac_responses() == [100, 200]  # retransmissions absorbed by the UAC layer


def test_2xx_from_another_fork_is_delivered() -> None:
    net = Net()
    net.invite()
    ist = net.server_txn()
    net.respond(200, to_tag="fork-1")
    # A second UAS (a fork behind a proxy) answers with another To tag: a second dialog.
    net.deliver(net.uas, [Send(make_response(ist.request, 200, to_tag="fork-2"), UAC_ADDR, "udp")])
    net.deliver(net.uas, [Send(make_response(ist.request, 200, to_tag="fork-2"), UAC_ADDR, "udp")])
    tags = [e.response.to.tag for e in net.uac_events if isinstance(e, ResponseReceived)]
    assert tags == [None, "fork-1", "fork-2"]


def test_retransmitted_invite_gets_the_last_provisional_again() -> None:
    net = Net(drop=drop_first("100", "uas", 1))
    ict = net.invite()
    ist = net.server_txn()
    net.respond(180)
    assert ict.state is S.PROCEEDING
    # 100 lost and 180 arrived; no more INVITE retransmissions in Proceeding.
    net.advance(5)
    assert len(net.sent("uac", "INVITE")) == 1
    # A duplicate INVITE (e.g. from the network) is answered with the last provisional.
    net.deliver(net.uac, [Send(ict.request, UAS_ADDR, "udp")])
    assert [w.what for w in net.wire if w.sender == "uas"] == ["100", "180", "180"]
    assert len([e for e in net.uas_events if isinstance(e, RequestReceived)]) == 1
    assert ist.state is S.PROCEEDING


# ------------------------------------------------------------------------------------------
# Non-INVITE
# ------------------------------------------------------------------------------------------
def test_non_invite_timer_e_doubles_to_t2_and_timer_f_times_out() -> None:
    net = Net(drop=drop_all("OPTIONS", "uac"))
    nict = net.invite("OPTIONS")
    assert isinstance(nict, NonInviteClientTransaction) and nict.state is S.TRYING
    net.advance(40)
    # 17.1.2.2: E = 0.5, 1, 2, 4, 4, ... until F = 64*T1.
    assert net.times("uac", "OPTIONS") == [0.0, 0.5, 1.5, 3.5, 7.5, 11.5, 15.5, 19.5, 23.5, 27.5, 31.5]
    assert nict.state is S.TERMINATED
    events = [e for e in net.uac_events if isinstance(e, ResponseReceived)]
    assert [(e.response.status, e.synthetic) for e in events] == [(408, True)]


def test_non_invite_proceeding_retransmits_every_t2() -> None:
    net = Net()
    nict = net.invite("REGISTER")
    nist = net.server_txn()
    net.respond(100, nist)
    assert nict.state is S.PROCEEDING and nist.state is S.PROCEEDING
    net.drop = drop_all("REGISTER", "uac")  # keep the retransmissions off the server
    net.advance(12)
    # 17.1.2.2: in Proceeding, timer E fires and is reset to T2.
    assert net.times("uac", "REGISTER") == [0.0, 0.5, 4.5, 8.5]


def test_non_invite_final_retransmitted_for_request_retransmissions_then_timer_j() -> None:
    net = Net(drop=drop_first("200", "uas", 1))
    nict = net.invite("OPTIONS")
    nist = net.server_txn()
    net.respond(200, nist)
    assert nist.state is S.COMPLETED and nict.state is S.TRYING
    net.advance(0.5)  # timer E retransmits; the server answers from Completed
    assert nict.state is S.COMPLETED
    assert net.uac_responses() == [200]
    assert len([e for e in net.uas_events if isinstance(e, RequestReceived)]) == 1
    net.advance(5.5)  # timer K = T4 after 0.5
    assert nict.state is S.TERMINATED
    net.advance(31.99)
    assert nist.state is S.COMPLETED
    net.advance(32.0)  # timer J = 64*T1
    assert nist.state is S.TERMINATED


def test_non_invite_trying_absorbs_retransmissions() -> None:
    net = Net()
    net.invite("OPTIONS")
    nist = net.server_txn()
    net.advance(2)
    assert len(net.sent("uac", "OPTIONS")) == 3
    assert not net.sent("uas", "100")  # nothing to resend yet in Trying
    assert nist.state is S.TRYING


# ------------------------------------------------------------------------------------------
# Reliable transport
# ------------------------------------------------------------------------------------------
def test_tcp_has_no_retransmissions_and_zero_wait_timers() -> None:
    net = Net(transport="tcp")
    ict = net.invite()
    ist = net.server_txn()
    net.respond(486)
    # D and I are zero on TCP: both ends terminate as soon as the ACK went by.
    assert ict.state is S.TERMINATED and ist.state is S.TERMINATED
    nict = net.invite("OPTIONS")
    nist = net.server_txn(1)
    net.respond(200, nist)
    assert nict.state is S.TERMINATED and nist.state is S.TERMINATED  # J and K are zero
    assert net.uac.next_timer() is None and net.uas.next_timer() is None


def test_tcp_timeouts_still_fire_without_retransmissions() -> None:
    net = Net(transport="tcp", drop=lambda wire: True)
    ict = net.invite()
    nict = net.invite("OPTIONS")
    net.advance(40)
    assert len(net.sent("uac", "INVITE")) == 1 and len(net.sent("uac", "OPTIONS")) == 1
    assert ict.state is S.TERMINATED and nict.state is S.TERMINATED
    assert net.uac_responses() == [408, 408]


def test_tcp_2xx_is_still_retransmitted_until_ack() -> None:
    # 13.3.1.4 does not depend on the transport: a downstream hop may be UDP.
    net = Net(transport="tcp", drop=drop_first("200", "uas", 1))
    ict = net.invite()
    net.respond(200)
    net.advance(0.5)
    assert ict.state is S.ACCEPTED


# ------------------------------------------------------------------------------------------
# CANCEL
# ------------------------------------------------------------------------------------------
def test_cancel_after_provisional() -> None:
    net = Net()
    ict = net.invite()
    ist = net.server_txn()
    net.respond(180)
    net.deliver(net.uac, net.uac.cancel(ict, net.now))
    [cancel] = net.sent("uac", "CANCEL")
    # 9.1: same branch, Request-URI, Call-ID, CSeq number; method CANCEL.
    assert cancel.message.branch == ict.request.branch
    assert str(cancel.message.cseq) == "1 CANCEL"
    [ok] = net.sent("uas", "200")
    assert ok.message.cseq.method == "CANCEL" and ok.message.to.tag == "uas-tag"
    [event] = [e for e in net.uas_events if isinstance(e, CancelReceived)]
    assert event.transaction is ist and ist.cancelled
    net.respond(487)
    assert net.uac_responses() == [100, 180, 200, 487]  # 200 is the CANCEL's own response
    assert ict.state is S.COMPLETED and ist.state is S.CONFIRMED
    # The CANCEL's 200 came through a separate (non-INVITE) client transaction.
    statuses = [
        (e.transaction.request.method, e.response.status)
        for e in net.uac_events
        if isinstance(e, ResponseReceived)
    ]
    assert ("CANCEL", 200) in statuses and ("INVITE", 487) in statuses


def test_cancel_is_deferred_until_a_provisional_arrives() -> None:
    net = Net(drop=drop_first("100", "uas", 1))
    net.uas.send_trying = False
    ict = net.invite()
    assert net.uac.cancel(ict, net.now) == []  # 9.1: not before a provisional response
    assert not net.sent("uac", "CANCEL")
    net.respond(183)
    assert len(net.sent("uac", "CANCEL")) == 1
    assert [e for e in net.uas_events if isinstance(e, CancelReceived)]
    assert net.uac.cancel(ict, net.now) == []  # once only


def test_cancel_after_final_does_nothing() -> None:
    net = Net()
    ict = net.invite()
    net.respond(200)
    assert net.uac.cancel(ict, net.now) == []
    assert not net.sent("uac", "CANCEL")


def test_cancel_without_matching_invite_gets_481() -> None:
    net = Net()
    net.invite("CANCEL")
    [reply] = net.sent("uas", "481")
    assert reply.message.cseq.method == "CANCEL"
    assert not [e for e in net.uas_events if isinstance(e, (CancelReceived, RequestReceived))]


def test_cancel_after_final_response_is_200_without_event() -> None:
    net = Net()
    ict = net.invite()
    net.respond(486)
    cancel = transaction.build_cancel(ict.request)
    _, sends = net.uac.send_request(cancel, UAS_ADDR, "udp", net.now)
    net.deliver(net.uac, sends)
    assert net.sent("uas", "200")
    assert not [e for e in net.uas_events if isinstance(e, CancelReceived)]


def test_cancelled_invite_without_final_times_out_after_64_t1() -> None:
    net = Net()
    ict = net.invite()
    net.respond(180)
    net.deliver(net.uac, net.uac.cancel(ict, net.now))
    net.advance(31.99)
    assert ict.state is S.PROCEEDING
    net.advance(32.0)
    assert ict.state is S.TERMINATED
    assert net.uac_responses()[-1] == 408


def test_cancel_of_non_invite_is_local_misuse() -> None:
    net = Net()
    nict = net.invite("OPTIONS")
    with pytest.raises(InvalidStateError):
        net.uac.cancel(nict, net.now)


# ------------------------------------------------------------------------------------------
# Illegal events, transport errors, matching
# ------------------------------------------------------------------------------------------
def test_illegal_tu_events_raise_naming_state_and_event() -> None:
    net = Net()
    net.invite()
    ist = net.server_txn()
    net.respond(486)
    with pytest.raises(InvalidStateError, match=r"Confirmed.*300-699 from TU"):
        net.respond(500)
    with pytest.raises(InvalidStateError, match=r"Confirmed.*1xx from TU"):
        net.uas.respond(ist, make_response(ist.request, 180), net.now)
    net.invite()
    ist2 = net.server_txn(1)
    net.respond(200, ist2)
    with pytest.raises(InvalidStateError, match=r"Accepted.*1xx from TU"):
        net.respond(180, ist2)
    net.respond(200, ist2)  # RFC 6026 7.1: more 2xx are allowed in Accepted


def test_illegal_remote_events_are_dropped_not_raised() -> None:
    net = Net()
    ict = net.invite()
    net.respond(486)
    # A 2xx after a 486 for the same transaction is nonsense from the peer: dropped, logged.
    net.deliver(net.uas, [Send(make_response(ict.request, 200, to_tag="x"), UAC_ADDR, "udp")])
    assert net.uac_responses() == [100, 486]


def test_client_send_request_misuse() -> None:
    layer = TransactionLayer()
    with pytest.raises(InvalidStateError):
        layer.send_request(make_request("ACK"), UAS_ADDR, "udp", 0.0)
    request = make_request("OPTIONS")
    layer.send_request(request, UAS_ADDR, "udp", 0.0)
    with pytest.raises(InvalidStateError, match="already exists"):
        layer.send_request(request, UAS_ADDR, "udp", 0.0)


def test_transport_error_gives_503_to_the_client_tu() -> None:
    net = Net(transport="tcp")
    ict = net.invite()
    nict = net.invite("OPTIONS")
    net.uac.transport_error(ict, net.now)
    net.uac.transport_error(nict, net.now)
    net.collect()
    events = [e for e in net.uac_events if isinstance(e, ResponseReceived) and e.synthetic]
    assert [e.response.status for e in events] == [503, 503]
    assert ict.state is S.TERMINATED and nict.state is S.TERMINATED
    assert net.uac.transport_error(ict, net.now) == []  # already gone


def test_transport_error_terminates_server_transactions() -> None:
    net = Net()
    net.invite("OPTIONS")
    nist = net.server_txn()
    net.uas.transport_error(nist, net.now)
    net.collect()
    assert nist.state is S.TERMINATED
    assert [e for e in net.uas_events if isinstance(e, TransactionTerminated)]


def test_stray_response_is_reported_and_dropped() -> None:
    net = Net()
    request = make_request("OPTIONS")
    net.deliver(net.uas, [Send(make_response(request, 200), UAC_ADDR, "udp")])
    assert [type(e) for e in net.uac_events] == [StrayResponse]


def test_server_matching_uses_branch_sent_by_and_method() -> None:
    layer = TransactionLayer()
    request = make_request("OPTIONS")
    layer.receive(request.copy(), UAC_ADDR, "udp", 0.0)
    layer.receive(request.copy(), UAC_ADDR, "udp", 0.1)  # retransmission
    # Same branch from another sent-by: another transaction (17.2.3).
    other = request.copy()
    other.headers.set("Via", str(request.top_via).replace("10.0.0.1", "10.0.0.9"))
    layer.receive(other, ("10.0.0.9", 5060), "udp", 0.2)
    # Same branch, another method: another transaction.
    info = request.copy()
    info.method = "INFO"
    info.headers.set("CSeq", "1 INFO")
    layer.receive(info, UAC_ADDR, "udp", 0.3)
    assert [type(e) for e in layer.drain_events()] == [RequestReceived] * 3
    assert len(layer.servers) == 3


def test_rfc2543_requests_without_magic_cookie_still_match() -> None:
    layer = TransactionLayer()
    request = make_request("OPTIONS")
    request.headers.set("Via", "SIP/2.0/UDP 10.0.0.1:5060")
    layer.receive(request.copy(), UAC_ADDR, "udp", 0.0)
    layer.receive(request.copy(), UAC_ADDR, "udp", 0.1)
    assert len([e for e in layer.drain_events() if isinstance(e, RequestReceived)]) == 1


def test_late_ack_without_transaction_goes_to_the_tu() -> None:
    layer = TransactionLayer()
    ack = make_request("ACK")
    layer.receive(ack, UAC_ADDR, "udp", 0.0)
    [event] = layer.drain_events()
    assert isinstance(event, AckReceived) and event.transaction is None


# ------------------------------------------------------------------------------------------
# rport / received (RFC 3581, RFC 3261 18.2)
# ------------------------------------------------------------------------------------------
def test_rport_routes_responses_to_the_nat_source() -> None:
    nat = ("203.0.113.7", 40001)
    seen: list[tuple[str, int]] = []
    net = Net(uac_source=nat)
    real_deliver = net.deliver

    def deliver(sender: TransactionLayer, sends: list[Send]) -> None:
        seen.extend(s.dest for s in sends if sender is net.uas)
        real_deliver(sender, sends)

    net.deliver = deliver  # type: ignore[method-assign]
    net.invite()
    ist = net.server_txn()
    via = ist.request.top_via
    assert via.received == "203.0.113.7" and via.rport == 40001
    net.respond(200)
    assert seen and set(seen) == {nat}
    assert net.uac_responses() == [100, 200]


def test_apply_received_rules() -> None:
    request = make_request("OPTIONS")
    request.headers.set("Via", "SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bKa")
    apply_received(request, ("10.0.0.1", 5060))
    assert request.top_via.params == {"branch": "z9hG4bKa"}  # same host, no rport: untouched
    apply_received(request, ("10.9.9.9", 5060))
    assert request.top_via.received == "10.9.9.9" and request.top_via.rport is None
    request.headers.set("Via", "SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bKa;rport")
    request.headers.add("Via", "SIP/2.0/UDP 10.0.0.7;branch=z9hG4bKb")
    apply_received(request, ("10.0.0.1", 6000))
    vias = request.vias
    assert vias[0].received == "10.0.0.1" and vias[0].rport == 6000
    assert vias[1].branch == "z9hG4bKb" and len(vias) == 2  # only the top Via changes


@pytest.mark.parametrize(
    ("via", "transport", "expected"),
    [
        ("SIP/2.0/UDP a.example;received=10.0.0.5", "udp", ("10.0.0.5", 5060)),
        ("SIP/2.0/UDP a.example:5070;received=10.0.0.5", "udp", ("10.0.0.5", 5070)),
        ("SIP/2.0/UDP a.example:5070;received=10.0.0.5;rport=6000", "udp", ("10.0.0.5", 6000)),
        ("SIP/2.0/UDP 10.0.0.5:5070", "udp", ("10.0.0.5", 5070)),
        ("SIP/2.0/UDP 10.0.0.5;maddr=239.1.1.1", "udp", ("239.1.1.1", 5060)),
        ("SIP/2.0/TCP 10.0.0.5:5070", "tcp", ("10.0.0.9", 40000)),
    ],
)
def test_response_destination(via: str, transport: str, expected: tuple[str, int]) -> None:
    from services.sip.headers import Via

    assert response_destination(Via.parse(via), ("10.0.0.9", 40000), transport) == expected


# ------------------------------------------------------------------------------------------
# Timers and tables
# ------------------------------------------------------------------------------------------
def test_timer_values() -> None:
    t = DEFAULT_TIMERS
    assert (t.t1, t.t2, t.t4) == (0.5, 4.0, 5.0)
    assert t.a("udp") == 0.5 and t.a("tcp") is None
    assert t.b() == t.f() == t.h() == t.l() == t.m() == 32.0
    assert t.d("udp") == 32.0 and t.d("tcp") == 0.0
    assert t.e("udp") == 0.5 and t.e("TCP") is None
    assert t.g("udp") == 0.5 and t.g("tcp") is None
    assert t.i("udp") == 5.0 and t.i("tcp") == 0.0
    assert t.j("udp") == 32.0 and t.j("tcp") == 0.0
    assert t.k("udp") == 5.0 and t.k("tcp") == 0.0
    assert [t.backoff(x) for x in (0.5, 1.0, 2.0, 4.0)] == [1.0, 2.0, 4.0, 4.0]
    assert timers.TIMER_B == 32.0 and timers.TIMER_D == 32.0 and timers.TIMER_K == 5.0
    with pytest.raises(ValueError):
        TimerConfig(t1=5.0, t2=4.0)


def test_scaled_timers() -> None:
    net = Net(timers=TimerConfig(t1=0.01, t2=0.08, t4=0.1), drop=drop_all("OPTIONS", "uac"))
    nict = net.invite("OPTIONS")
    net.advance(0.64)
    assert nict.state is S.TERMINATED
    assert net.uac_responses() == [408]


def test_tables_only_name_existing_actions_and_states() -> None:
    for cls in (
        transaction.InviteClientTransaction,
        transaction.NonInviteClientTransaction,
        transaction.InviteServerTransaction,
        transaction.NonInviteServerTransaction,
    ):
        for (state, _event), (new_state, action) in cls.TABLE.items():
            assert isinstance(state, TransactionState) and isinstance(new_state, TransactionState)
            assert action is None or callable(getattr(cls, action))
        assert not [key for key in cls.TABLE if key[0] is S.TERMINATED]  # nothing leaves Terminated


@pytest.mark.parametrize("module", [timers, transaction, dialog, auth])
def test_core_modules_do_not_import_io(module: object) -> None:
    tree = ast.parse(pathlib.Path(module.__file__).read_text())  # type: ignore[attr-defined]
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not names & {"asyncio", "socket", "time", "selectors", "threading"}


# ------------------------------------------------------------------------------------------
# Property: whatever is lost, each side's TU sees a consistent story
# ------------------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1), loss=st.floats(0.0, 0.6), method=st.sampled_from(["INVITE", "OPTIONS"])
)
def test_lossy_network_invariants(seed: int, loss: float, method: str) -> None:
    rng = random.Random(seed)
    net = Net(drop=lambda wire: rng.random() < loss)
    client = net.invite(method)
    responded = False
    final_status = 486 if method == "INVITE" else 200
    t = 0.0
    while t < 80:
        t += 0.25
        net.advance(t)
        if not responded and [e for e in net.uas_events if isinstance(e, RequestReceived)]:
            net.respond(final_status)
            responded = True
    # The UAS TU saw the request at most once; the UAC TU got exactly one final response,
    # either the real one or a synthetic 408; everything ended and no timer is left.
    assert len([e for e in net.uas_events if isinstance(e, RequestReceived)]) <= 1
    finals = [s for s in net.uac_responses() if s >= 200]
    assert len(finals) == 1 and finals[0] in (final_status, 408)
    if not responded:
        assert finals == [408]
    assert client.state is S.TERMINATED
    assert not net.uac.clients and not net.uas.servers
    assert net.uac.next_timer() is None and net.uas.next_timer() is None


def test_every_state_change_is_logged_old_to_new(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG", logger="services.sip.transaction")
    net = Net(transport="tcp")
    net.invite()
    net.respond(486)
    lines = [r.getMessage() for r in caplog.records if "->" in r.getMessage()]
    assert any("ICT INVITE" in line and "Calling -> Proceeding" in line for line in lines)
    assert any("ICT INVITE" in line and "Proceeding -> Completed" in line for line in lines)
    assert any("ICT INVITE" in line and "Completed -> Terminated (timer D)" in line for line in lines)
    assert any("IST INVITE" in line and "Proceeding -> Completed" in line for line in lines)
    assert any("IST INVITE" in line and "Completed -> Confirmed (ACK)" in line for line in lines)

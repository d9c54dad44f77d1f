"""Dialogs (RFC 3261 12): creation on both sides, routing, CSeq order, target refresh, replication."""

from __future__ import annotations

import json

import pytest

from services.sip.dialog import Dialog, destination, uac_dialog_id, uas_dialog_id
from services.sip.errors import InvalidStateError, SipParseError
from services.sip.message import Request, Response, make_response, parse_message
from services.sip.transaction import RequestReceived, ResponseReceived, TransactionLayer, prepend_via
from services.sip.uri import NameAddr, SipUri

ALICE = ("10.0.0.1", 5060)
BOB = ("10.0.0.2", 5060)


def invite(record_route: list[str] | None = None) -> Request:
    request = Request(
        "INVITE",
        "sip:bob@example.com",
        [
            ("Max-Forwards", "70"),
            ("From", '"Alice" <sip:alice@example.com>;tag=a1'),
            ("To", "<sip:bob@example.com>"),
            ("Call-ID", "call-1@10.0.0.1"),
            ("CSeq", "314 INVITE"),
            ("Contact", "<sip:alice@10.0.0.1:5060>"),
            ("Authorization", 'Digest username="alice", response="x"'),
        ],
    )
    for value in record_route or []:
        request.headers.add("Record-Route", value)
    prepend_via(request, *ALICE, "udp")
    return request


RR = ["<sip:p2.example.com;lr>", "<sip:p1.example.com;lr>"]  # as seen by the UAS: nearest last


def answer(
    request: Request, status: int = 200, contact: str = "<sip:bob@10.0.0.2:5080;transport=tcp>"
) -> Response:
    return make_response(request, status, to_tag="b1", headers=[("Contact", contact)])


def uac_dialog(record_route: list[str] | None = None) -> tuple[Request, Dialog]:
    request = invite(record_route)
    return request, Dialog.from_uac(request, answer(request))


def test_from_uac() -> None:
    request, dialog = uac_dialog(RR)
    assert dialog.id == ("call-1@10.0.0.1", "a1", "b1")
    assert dialog.local_uri.tag is None and dialog.local_uri.display == "Alice"
    assert str(dialog.remote_uri.uri) == "sip:bob@example.com"
    assert str(dialog.remote_target) == "sip:bob@10.0.0.2:5080;transport=tcp"
    # 12.1.2: the route set is the Record-Route of the response in reverse order.
    assert dialog.route_set == ["<sip:p1.example.com;lr>", "<sip:p2.example.com;lr>"]
    assert dialog.local_cseq == 314 and dialog.remote_cseq is None
    assert dialog.transport == "udp" and not dialog.early
    assert str(dialog.local_target) == "sip:alice@10.0.0.1:5060"
    assert uac_dialog_id(answer(request)) == dialog.id


def test_from_uac_early_and_misuse() -> None:
    request = invite()
    early = Dialog.from_uac(request, answer(request, 180))
    assert early.early
    with pytest.raises(InvalidStateError):
        Dialog.from_uac(request, answer(request, 486))
    no_contact = make_response(request, 200, to_tag="b1")
    with pytest.raises(SipParseError, match="Contact"):
        Dialog.from_uac(request, no_contact)


def test_from_uas() -> None:
    request = invite(RR)
    dialog = Dialog.from_uas(request, "b1", local_target=SipUri.parse("sip:bob@10.0.0.2"))
    assert dialog.id == ("call-1@10.0.0.1", "b1", "a1")
    assert uas_dialog_id(request) == ("call-1@10.0.0.1", "", "a1")  # the request has no To tag yet
    assert dialog.route_set == RR  # 12.1.1: in order
    assert dialog.remote_cseq == 314 and dialog.local_cseq == 0
    assert str(dialog.remote_target) == "sip:alice@10.0.0.1:5060"
    assert dialog.remote_uri.display == "Alice" and dialog.remote_uri.tag is None
    bye = dialog.create_request("BYE")
    assert str(bye.cseq) == "1 BYE"
    assert bye.from_.tag == "b1" and bye.to.tag == "a1"
    assert bye.headers.get_all("Route") == RR
    assert "Contact" not in bye.headers


def test_create_request_without_route_set() -> None:
    _, dialog = uac_dialog()
    bye = dialog.create_request("BYE")
    assert str(bye.uri) == "sip:bob@10.0.0.2:5080;transport=tcp"
    assert "Route" not in bye.headers and "Via" not in bye.headers
    assert str(bye.cseq) == "315 BYE" and bye.call_id == "call-1@10.0.0.1"
    assert bye.from_.tag == "a1" and bye.to.tag == "b1"
    assert bye.max_forwards == 70
    info = dialog.create_request(
        "info", body=b"Signal=1\r\n", content_type="application/dtmf-relay", headers=[("X-CV-Test", "1")]
    )
    assert str(info.cseq) == "316 INFO" and info.body == b"Signal=1\r\n"
    assert info.content_type == "application/dtmf-relay" and info.headers.get("X-CV-Test") == "1"
    # Round trip through bytes (with a Via, as the endpoint would add).
    prepend_via(info, *ALICE, "udp")
    parsed = parse_message(info.to_bytes())
    assert isinstance(parsed, Request) and parsed.method == "INFO"


def test_loose_routing() -> None:
    _, dialog = uac_dialog(RR)
    bye = dialog.create_request("BYE")
    # 12.2.1.1: first route has ;lr -> Request-URI is the remote target, Route is the route set.
    assert str(bye.uri) == "sip:bob@10.0.0.2:5080;transport=tcp"
    assert bye.headers.get_all("Route") == ["<sip:p1.example.com;lr>", "<sip:p2.example.com;lr>"]
    assert dialog.next_hop() == ("p1.example.com", 5060, "udp")


def test_strict_routing() -> None:
    _, dialog = uac_dialog(["<sip:p2.example.com;lr>", "<sip:p1.example.com:5070>"])
    bye = dialog.create_request("BYE")
    # 12.2.1.1: a strict router gets the Request-URI; the remote target goes last in Route.
    assert str(bye.uri) == "sip:p1.example.com:5070"
    assert bye.headers.get_all("Route") == [
        "<sip:p2.example.com;lr>",
        "<sip:bob@10.0.0.2:5080;transport=tcp>",
    ]
    assert dialog.next_hop() == ("p1.example.com", 5070, "udp")


def test_reinvite_carries_contact_and_create_ack() -> None:
    request, dialog = uac_dialog()
    reinvite = dialog.create_request("INVITE", body=b"v=0\r\n", content_type="application/sdp")
    assert [str(c.uri) for c in reinvite.contacts] == ["sip:alice@10.0.0.1:5060"]
    ack = dialog.create_ack(reinvite)
    assert str(ack.cseq) == f"{reinvite.cseq.seq} ACK"
    first_ack = dialog.create_ack(request)
    assert str(first_ack.cseq) == "314 ACK"
    assert first_ack.headers.get("Authorization") == 'Digest username="alice", response="x"'  # 13.2.2.4
    assert dialog.local_cseq == reinvite.cseq.seq  # ACK does not use a new CSeq
    with pytest.raises(InvalidStateError):
        dialog.create_request("ACK")
    with pytest.raises(InvalidStateError):
        dialog.create_request("CANCEL")


def in_dialog(dialog_of_peer: Dialog, method: str, seq: int, contact: str | None = None) -> Request:
    """A request the peer sends in the dialog (the peer's view is the mirror of ours)."""
    request = dialog_of_peer.create_request(method)
    request.headers.set("CSeq", f"{seq} {method}")
    if contact:
        request.headers.set("Contact", contact)
    return request


def test_receive_request_cseq_order_and_target_refresh() -> None:
    request = invite()
    uas = Dialog.from_uas(request, "b1")
    uac = Dialog.from_uac(request, answer(request))
    reinvite = in_dialog(uac, "INVITE", 400, "<sip:alice@10.0.0.99:5060>")
    uas.receive_request(reinvite)
    assert uas.remote_cseq == 400
    assert str(uas.remote_target) == "sip:alice@10.0.0.99:5060"  # target refresh (12.2.2)
    with pytest.raises(SipParseError) as excinfo:
        uas.receive_request(in_dialog(uac, "BYE", 399))
    assert excinfo.value.status == 500
    uas.receive_request(in_dialog(uac, "INFO", 400))  # equal is not lower (12.2.2)
    ack = uac.create_ack(reinvite)
    uas.receive_request(ack)  # ACK is not checked
    # A non-refresh request does not change the target.
    uas.receive_request(in_dialog(uac, "INFO", 401, "<sip:elsewhere@10.9.9.9>"))
    assert str(uas.remote_target) == "sip:alice@10.0.0.99:5060"
    other = in_dialog(uac, "BYE", 500)
    other.headers.set("Call-ID", "another")
    with pytest.raises(SipParseError) as excinfo:
        uas.receive_request(other)
    assert excinfo.value.status == 481


def test_first_request_from_peer_sets_remote_cseq() -> None:
    request, uac = uac_dialog()
    uas = Dialog.from_uas(request, "b1", local_target=SipUri.parse("sip:bob@10.0.0.2"))
    bye = uas.create_request("BYE")
    uac.receive_request(bye)
    assert uac.remote_cseq == 1


def test_receive_response_confirms_early_dialog_and_refreshes_target() -> None:
    request = invite(RR)
    ringing = answer(request, 183)
    dialog = Dialog.from_uac(request, ringing)
    assert dialog.early
    ok = make_response(
        request,
        200,
        to_tag="b1",
        headers=[("Contact", "<sip:bob@10.0.0.3>"), ("Record-Route", "<sip:p3.example.com;lr>")],
    )
    dialog.receive_response(request, ok)
    assert not dialog.early and dialog.route_set == ["<sip:p3.example.com;lr>"]
    assert str(dialog.remote_target) == "sip:bob@10.0.0.3"
    dialog.receive_response(request, answer(request, 486, "<sip:nobody@10.0.0.4>"))
    assert str(dialog.remote_target) == "sip:bob@10.0.0.3"  # only 2xx count


def test_to_dict_from_dict_roundtrip() -> None:
    _, dialog = uac_dialog(RR)
    dialog.remote_cseq = 7
    data = json.loads(json.dumps(dialog.to_dict()))
    copy = Dialog.from_dict(data)
    assert copy == dialog
    # The standby continues the CSeq space where the primary left it.
    assert copy.create_request("BYE").to_bytes() == dialog.create_request("BYE").to_bytes()


def test_to_dict_is_plain_json() -> None:
    request = invite()
    dialog = Dialog.from_uas(request, "b1")
    data = dialog.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["local_target"] is None and Dialog.from_dict(data) == dialog


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("sip:a@10.0.0.1", ("10.0.0.1", 5060, "udp")),
        ("sip:a@10.0.0.1:5070;transport=TCP", ("10.0.0.1", 5070, "tcp")),
        ("sips:a@example.com", ("example.com", 5061, "tls")),
        ("sip:a@example.com;maddr=10.1.1.1", ("10.1.1.1", 5060, "udp")),
        ("sip:[2001:db8::1]:5080", ("2001:db8::1", 5080, "udp")),
    ],
)
def test_destination(uri: str, expected: tuple[str, int, str]) -> None:
    assert destination(SipUri.parse(uri)) == expected


def test_next_hop_uses_dialog_transport_without_uri_param() -> None:
    request = invite()
    request.headers.set("Via", str(request.top_via).replace("/UDP", "/TCP"))
    dialog = Dialog.from_uac(request, answer(request, contact="<sip:bob@10.0.0.2:5080>"))
    assert dialog.transport == "tcp"
    assert dialog.next_hop() == ("10.0.0.2", 5080, "tcp")


def test_dialogs_over_transaction_layers() -> None:
    """A full INVITE / 200 / ACK / BYE through two transaction layers, dialogs on both ends."""
    uac_layer, uas_layer = TransactionLayer(), TransactionLayer()

    def carry(sends: list, src: tuple[str, int], dst_layer: TransactionLayer, now: float) -> list:
        out = []
        for send in sends:
            out += dst_layer.receive(parse_message(send.message.to_bytes()), src, "udp", now)
        return out

    request = invite(None)
    request.headers.remove("Authorization")
    ict, sends = uac_layer.send_request(request, BOB, "udp", 0.0)
    carry(carry(sends, ALICE, uas_layer, 0.0), BOB, uac_layer, 0.0)
    [received] = [e for e in uas_layer.drain_events() if isinstance(e, RequestReceived)]
    uas = Dialog.from_uas(received.request, "b1", local_target=SipUri.parse("sip:bob@10.0.0.2"))
    ok = make_response(received.request, 200, to_tag="b1", headers=[("Contact", "<sip:bob@10.0.0.2>")])
    carry(uas_layer.respond(received.transaction, ok, 0.1), BOB, uac_layer, 0.1)
    [final] = [
        e.response
        for e in uac_layer.drain_events()
        if isinstance(e, ResponseReceived) and e.response.status == 200
    ]
    uac = Dialog.from_uac(ict.request, final)
    assert uac.id == (uas.id[0], uas.id[2], uas.id[1])
    ack = uac.create_ack(ict.request)
    prepend_via(ack, *ALICE, "udp")
    carry(uac_layer.send_ack(ack, uac.next_hop()[:2], "udp", 0.2), ALICE, uas_layer, 0.2)
    # The UAS hangs up.
    bye = uas.create_request("BYE")
    prepend_via(bye, *BOB, "udp")
    _, sends = uas_layer.send_request(bye, uas.next_hop()[:2], "udp", 0.3)
    assert sends[0].dest == ALICE
    carry(sends, BOB, uac_layer, 0.3)
    [bye_event] = [e for e in uac_layer.drain_events() if isinstance(e, RequestReceived)]
    uac.receive_request(bye_event.request)
    assert uac.remote_cseq == 1
    assert NameAddr.parse(bye_event.request.headers.get("To") or "").tag == "a1"

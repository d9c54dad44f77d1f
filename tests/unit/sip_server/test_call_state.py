"""The call state is plain data: it round-trips through JSON for a hot standby (issue 5)."""

from __future__ import annotations

import json

from services.sip.dialog import Dialog
from services.sip.message import Request, parse_message
from services.sip_server.call import CallPhase, CallState, Leg, SessionTimer
from services.sip_server.media import SdpOwner

INVITE = (
    b"INVITE sip:1002@lab.test SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bKabc\r\n"
    b"From: <sip:1001@lab.test>;tag=atag\r\n"
    b"To: <sip:1002@lab.test>\r\n"
    b"Call-ID: call-1@10.0.0.1\r\n"
    b"CSeq: 1 INVITE\r\n"
    b"Contact: <sip:1001@10.0.0.1:5060>\r\n"
    b"Content-Length: 0\r\n\r\n"
)


def test_round_trip_through_json() -> None:
    request = parse_message(INVITE)
    assert isinstance(request, Request)
    state = CallState(tenant="lab", caller="1001", callee="1002", a_call_id="call-1@10.0.0.1", created=1.5)
    state.phase = CallPhase.CONFIRMED
    state.a = Leg(
        "a",
        dialog=Dialog.from_uas(request, "ourtag"),
        dest=("10.0.0.1", 5060, "udp"),
        local_sdp=b"v=0\r\n",
        remote_sdp=b"v=0\r\nx\r\n",
        owner=SdpOwner("192.0.2.1"),
        timer=SessionTimer(1800, "local", 2000.0),
        allow_update=True,
        confirmed=True,
    )
    state.rec = Leg("rec")
    state.record = state.recording = True
    state.session_id = "f" * 32
    state.mcp = {"caller": ("127.0.0.1", 20000), "callee": ("127.0.0.1", 20002)}
    state.info = {"call_id": "call-1@10.0.0.1", "caller": "1001"}
    copy = CallState.from_dict(json.loads(json.dumps(state.to_dict())))
    assert copy.to_dict() == state.to_dict()
    assert copy.a.dialog is not None and copy.a.dialog.id == ("call-1@10.0.0.1", "ourtag", "atag")
    assert copy.a.destination() == ("10.0.0.1", 5060, "udp")
    assert copy.phase is CallPhase.CONFIRMED
    assert copy.leg("rec") is copy.rec
    assert CallState.other("a") == "b"

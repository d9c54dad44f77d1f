"""The bridge's SDP: finding the caller/callee legs in an offer and building the answer."""

from __future__ import annotations

import pytest

from services.mcp.bridge import OfferError, build_answer, parse_bridge_offer, parse_sdp
from services.sdp import SessionDescription

OFFER = (
    "v=0\r\no=sipserver 1 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n"
    "m=audio 40000 RTP/AVP 8 0 101\r\nc=IN IP4 192.0.2.10\r\n"
    "a=rtpmap:8 PCMA/8000\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:101 telephone-event/8000\r\n"
    "a=fmtp:101 0-16\r\na=ptime:20\r\na=label:caller\r\n"
    "m=audio 9 RTP/AVP 8 0 101\r\nc=IN IP4 0.0.0.0\r\n"
    "a=rtpmap:8 PCMA/8000\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:101 telephone-event/8000\r\n"
    "a=fmtp:101 0-16\r\na=label:callee\r\n"
)


def offer(text: str = OFFER):
    return parse_bridge_offer(parse_sdp(text.encode(), "application/sdp"))


def test_legs_addresses_and_codecs() -> None:
    o = offer()
    caller, callee = o.legs
    assert (caller.label, caller.index, caller.address) == ("caller", 0, ("192.0.2.10", 40000))
    assert callee.address is None  # placeholder: 0.0.0.0, port 9
    assert caller.formats == [8, 101] and caller.codec == "PCMA"
    assert caller.payload_types == {8: "PCMA", 0: "PCMU", 101: "telephone-event"}


def test_legs_are_found_by_label_not_position() -> None:
    swapped = (
        OFFER.replace("a=label:caller", "a=label:X")
        .replace("a=label:callee", "a=label:caller")
        .replace("a=label:X", "a=label:callee")
    )
    caller, callee = offer(swapped).legs
    assert caller.index == 1 and callee.index == 0
    assert callee.address == ("192.0.2.10", 40000)


def test_two_unlabelled_audio_lines_are_taken_in_order() -> None:
    o = offer(OFFER.replace("a=label:caller\r\n", "").replace("a=label:callee\r\n", ""))
    assert [leg.index for leg in o.legs] == [0, 1]
    answer = build_answer(o, "127.0.0.1", (20000, 20002))
    assert [m.label for m in answer.media] == ["caller", "callee"]


def test_answer_points_both_lines_at_the_mcp() -> None:
    o = offer()
    answer = build_answer(o, "127.0.0.1", (20000, 20002))
    again = SessionDescription.parse(answer.to_bytes())
    assert again.connection == "127.0.0.1"
    assert [m.port for m in again.media] == [20000, 20002]
    assert [m.label for m in again.media] == ["caller", "callee"]
    assert [m.formats for m in again.media] == [[8, 101], [8, 101]]
    assert again.media[0].fmtp == {101: "0-16"}
    assert [m.direction for m in again.media] == ["sendrecv", "sendrecv"]


def test_reanswer_keeps_origin_and_bumps_version_and_answers_direction() -> None:
    first = build_answer(offer(), "127.0.0.1", (20000, 20002))
    hold = OFFER.replace("a=label:caller", "a=sendonly\r\na=label:caller")
    second = build_answer(
        offer(hold),
        "127.0.0.1",
        (20000, 20002),
        session_id=first.origin.session_id,
        version=first.origin.version + 1,
    )
    assert second.origin.session_id == first.origin.session_id
    assert second.origin.version == first.origin.version + 1
    assert second.media[0].direction == "recvonly"
    assert second.media[1].direction == "sendrecv"


def test_extra_m_lines_are_rejected_in_the_answer() -> None:
    video = OFFER + "m=video 50000 RTP/AVP 96\r\nc=IN IP4 192.0.2.10\r\na=rtpmap:96 H264/90000\r\n"
    answer = build_answer(offer(video), "127.0.0.1", (20000, 20002))
    assert [m.port for m in answer.media] == [20000, 20002, 0]


@pytest.mark.parametrize(
    ("body", "ctype", "status", "reason"),
    [
        (b"", "application/sdp", 400, "SDP offer is missing"),
        (b"v=0\r\nbogus", "application/sdp", 400, "Malformed SDP"),
        (OFFER.encode(), "text/plain", 415, "Unsupported body type"),
    ],
)
def test_bad_bodies(body: bytes, ctype: str, status: int, reason: str) -> None:
    with pytest.raises(OfferError) as err:
        parse_sdp(body, ctype)
    assert (err.value.status, reason in err.value.reason) == (status, True)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (OFFER.split("m=audio 9")[0], "Expected two audio streams"),
        (
            OFFER.replace("RTP/AVP 8 0 101", "RTP/AVP 18").replace(
                "a=rtpmap:8 PCMA/8000\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-16\r\n",
                "",
            ),
            "No common codec",
        ),
        (OFFER.replace("m=audio 40000", "m=audio 0"), "disabled"),
        (OFFER.replace("a=label:callee", "a=label:other"), "Expected two audio streams"),
    ],
)
def test_offers_that_are_not_a_bridge_are_488(text: str, reason: str) -> None:
    with pytest.raises(OfferError) as err:
        offer(text)
    assert err.value.status == 488 and reason in err.value.reason

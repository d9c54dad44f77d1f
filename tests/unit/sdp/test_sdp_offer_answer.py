"""Offer/answer helpers (RFC 3264): directions, codec choice, hold, whole answers."""

from __future__ import annotations

import pytest
from sdp_examples import BARESIP_OFFER, BRIDGE_OFFER, RFC3264_OFFER, SIPP_OFFER

from services.sdp import (
    Media,
    SessionDescription,
    answer_direction,
    audio_media,
    create_answer,
    hold_state,
    negotiate_formats,
    new_session,
)


def one_media(text: str) -> tuple[Media, SessionDescription]:
    sdp = SessionDescription.parse("v=0\no=- 1 1 IN IP4 h\ns=-\nc=IN IP4 192.0.2.1\nt=0 0\n" + text)
    return sdp.media[0], sdp


@pytest.mark.parametrize(
    ("offered", "answered"),
    [("sendrecv", "sendrecv"), ("sendonly", "recvonly"), ("recvonly", "sendonly"), ("inactive", "inactive")],
)
def test_answer_direction(offered: str, answered: str) -> None:
    assert answer_direction(offered) == answered


def test_answer_direction_rejects_unknown() -> None:
    with pytest.raises(ValueError, match="unknown direction"):
        answer_direction("hold")


def test_negotiate_sipp_offer() -> None:
    m = SessionDescription.parse(SIPP_OFFER).media[0]
    assert negotiate_formats(m) == [8, 101]
    assert negotiate_formats(m, telephone_event=False) == [8]
    assert negotiate_formats(m, ["PCMU"]) == []


def test_negotiate_keeps_offerer_preference_and_order() -> None:
    m = SessionDescription.parse(BARESIP_OFFER).media[0]
    assert negotiate_formats(m) == [0, 101]
    assert negotiate_formats(m, ["PCMA"]) == []
    m, _ = one_media("m=audio 5 RTP/AVP 0 8 101\na=rtpmap:101 telephone-event/8000\n")
    assert negotiate_formats(m, ["PCMA", "PCMU"]) == [0, 101]  # offerer's first supported wins
    assert negotiate_formats(m, ["pcma"]) == [8, 101]  # case-insensitive


def test_negotiate_event_listed_before_codec_stays_in_offer_order() -> None:
    m, _ = one_media("m=audio 5 RTP/AVP 101 9 8\na=rtpmap:101 telephone-event/8000\n")
    assert negotiate_formats(m) == [101, 8]


def test_negotiate_prefers_event_with_matching_clock_rate() -> None:
    m, _ = one_media(
        "m=audio 5 RTP/AVP 111 0 110 126\na=rtpmap:111 opus/48000/2\n"
        "a=rtpmap:110 telephone-event/48000\na=rtpmap:126 telephone-event/8000\n"
    )
    assert negotiate_formats(m) == [0, 126]


def test_negotiate_event_only_or_unsupported_gives_nothing() -> None:
    m, _ = one_media("m=audio 5 RTP/AVP 18 101\na=rtpmap:101 telephone-event/8000\n")
    assert negotiate_formats(m) == []
    video = SessionDescription.parse(RFC3264_OFFER).media[1]
    assert negotiate_formats(video, ["H261"]) == []  # not audio


def test_negotiate_static_types_without_rtpmap() -> None:
    m, _ = one_media("m=audio 5 RTP/AVP 9 8 0\n")
    assert negotiate_formats(m) == [8]
    assert negotiate_formats(m, ["G722", "PCMU"]) == [9]


def test_negotiate_does_not_pick_comfort_noise_as_codec() -> None:
    m, _ = one_media("m=audio 5 RTP/AVP 13 0\n")
    assert negotiate_formats(m, ["CN", "PCMU"]) == [0]


def test_hold_sendonly_and_inactive() -> None:
    for direction, held in [("sendonly", True), ("inactive", True), ("recvonly", False), ("sendrecv", False)]:
        m, sdp = one_media(f"m=audio 5 RTP/AVP 0\na={direction}\n")
        assert hold_state(m, sdp) is held, direction


def test_hold_rfc2543_zero_address_session_or_media_level() -> None:
    sdp = SessionDescription.parse(
        "v=0\no=- 1 2 IN IP4 h\ns=-\nc=IN IP4 0.0.0.0\nt=0 0\nm=audio 5 RTP/AVP 0\n"
    )
    assert hold_state(sdp.media[0], sdp)
    bridge = SessionDescription.parse(BRIDGE_OFFER)
    assert not hold_state(bridge.media[0], bridge)
    assert hold_state(bridge.media[1], bridge)  # the placeholder callee line


def test_hold_honours_session_level_direction() -> None:
    sdp = SessionDescription.parse(
        "v=0\no=- 1 2 IN IP4 h\ns=-\nc=IN IP4 h\nt=0 0\na=sendonly\nm=audio 5 RTP/AVP 0\nm=audio 6 RTP/AVP 0\na=sendrecv\n"
    )
    assert hold_state(sdp.media[0], sdp)
    assert not hold_state(sdp.media[1], sdp)


def test_rfc4317_style_hold_and_resume() -> None:
    """Hold and unhold in the manner of RFC 4317 section 3.1: version bump + sendonly, then sendrecv."""
    offer = SessionDescription.parse(
        "v=0\r\no=alice 2890844526 2890844527 IN IP4 host.atlanta.example.com\r\ns=\r\n"
        "c=IN IP4 host.atlanta.example.com\r\nt=0 0\r\nm=audio 49170 RTP/AVP 0 97\r\n"
        "a=rtpmap:0 PCMU/8000\r\na=rtpmap:97 iLBC/8000\r\na=sendonly\r\n"
    )
    assert hold_state(offer.media[0], offer)
    answer = create_answer(offer, "host.biloxi.example.com", [49172], session_id="2808844564")
    assert answer.media[0].direction == "recvonly"
    assert answer.media[0].formats == [0]
    offer.media[0].set_direction("sendrecv")
    offer.bump_version()
    assert not hold_state(offer.media[0], offer)
    assert create_answer(offer, "h", [49172]).media[0].direction == "sendrecv"


def test_create_answer_rfc3264_offer_accepts_audio_rejects_video() -> None:
    offer = SessionDescription.parse(RFC3264_OFFER)
    answer = create_answer(offer, "192.0.2.7", [30000, 30002], session_id="7")
    data = answer.to_bytes()
    assert data == (
        b"v=0\r\no=callvault 7 7 IN IP4 192.0.2.7\r\ns=-\r\nc=IN IP4 192.0.2.7\r\nt=0 0\r\n"
        b"m=audio 30000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\na=sendrecv\r\n"
        b"m=video 0 RTP/AVP 31\r\n"
    )
    assert SessionDescription.parse(data) == answer


def test_create_answer_bridge_offer_keeps_labels_and_events() -> None:
    offer = SessionDescription.parse(BRIDGE_OFFER)
    answer = create_answer(offer, "127.0.0.1", [40010, 40012])
    assert [m.label for m in answer.media] == ["caller", "callee"]
    assert [answer.media_address(i) for i in range(2)] == [("127.0.0.1", 40010), ("127.0.0.1", 40012)]
    assert answer.media[0].formats == [0, 101]
    assert answer.media[0].rtpmap == {0: "PCMU", 101: "telephone-event"}


def test_create_answer_rejections() -> None:
    offer = new_session("h")
    offer.media.append(audio_media(0, [0]))  # rejected by the offerer
    offer.media.append(audio_media(5000, [18]))  # nothing we support
    offer.media.append(audio_media(5002, [0]))  # no port given for it
    offer.media.append(Media("image", 5004, "udptl", [], format_names=["t38"]))
    answer = create_answer(offer, "h", [1000, 1002])
    assert [m.port for m in answer.media] == [0, 0, 0, 0]
    assert [m.formats for m in answer.media[:3]] == [[0], [18], [0]]
    assert answer.media[3].format_names == ["t38"]
    SessionDescription.parse(answer.to_bytes())


def test_create_answer_copies_fmtp_ptime_and_forced_direction() -> None:
    offer = SessionDescription.parse(SIPP_OFFER.replace(b"a=fmtp", b"a=ptime:30\r\na=fmtp"))
    answer = create_answer(offer, "127.0.0.1", [41000], direction="inactive")
    m = answer.media[0]
    assert m.fmtp == {101: "0-11,16"}
    assert m.ptime == 30
    assert m.direction == "inactive"

"""SDP rewriting for the recording bridge (services/sip_server/media.py)."""

from __future__ import annotations

import pytest

from services.sdp import SessionDescription
from services.sip_server import media
from services.sip_server.media import MediaError, SdpOwner

A_OFFER = (
    b"v=0\r\n"
    b"o=alice 2890844526 2890844526 IN IP4 10.0.0.1\r\n"
    b"s=-\r\n"
    b"c=IN IP4 10.0.0.1\r\n"
    b"t=0 0\r\n"
    b"a=ice-lite\r\n"
    b"a=tool:phone\r\n"
    b"m=audio 4000 RTP/AVP 0 8 101\r\n"
    b"a=rtpmap:101 telephone-event/8000\r\n"
    b"a=fmtp:101 0-16\r\n"
    b"a=rtcp:4001\r\n"
    b"a=candidate:1 1 UDP 1 10.0.0.1 4000 typ host\r\n"
    b"a=ptime:20\r\n"
    b"a=sendrecv\r\n"
)
B_ANSWER = (
    b"v=0\r\n"
    b"o=bob 1 1 IN IP4 10.0.0.2\r\n"
    b"s=-\r\n"
    b"c=IN IP4 10.0.0.2\r\n"
    b"t=0 0\r\n"
    b"m=audio 5000 RTP/AVP 8 101\r\n"
    b"a=rtpmap:8 PCMA/8000\r\n"
    b"a=rtpmap:101 telephone-event/8000\r\n"
    b"a=fmtp:101 0-15\r\n"
    b"a=sendrecv\r\n"
)
MCP_ANSWER = (
    b"v=0\r\n"
    b"o=mcp 5 5 IN IP4 127.0.0.1\r\n"
    b"s=-\r\n"
    b"c=IN IP4 127.0.0.1\r\n"
    b"t=0 0\r\n"
    b"m=audio 20000 RTP/AVP 0 8 101\r\n"
    b"a=label:caller\r\n"
    b"m=audio 20002 RTP/AVP 0 8 101\r\n"
    b"a=label:callee\r\n"
)


def sdp(data: bytes) -> SessionDescription:
    return SessionDescription.parse(data)


def test_bridge_offer_has_caller_and_placeholder_callee() -> None:
    out = media.bridge_offer(sdp(A_OFFER), SdpOwner("192.0.2.1"))
    again = sdp(out.to_bytes())
    assert [m.label for m in again.media] == ["caller", "callee"]
    assert again.media_address(0) == ("10.0.0.1", 4000)
    assert again.media_address(1) == ("0.0.0.0", 9)
    for m in again.media:
        assert m.formats == [0, 8, 101]
        assert m.rtpmap == {0: "PCMU", 8: "PCMA", 101: "telephone-event"}
        assert m.fmtp == {101: "0-16"}
        assert m.attribute("rtcp") is None and m.attribute("candidate") is None
    assert again.origin.username == "callvault"
    assert again.origin.address == "192.0.2.1"


def test_bridge_update_carries_b_media_and_chosen_codecs() -> None:
    owner = SdpOwner("192.0.2.1")
    first = media.bridge_offer(sdp(A_OFFER), owner)
    update = sdp(media.bridge_update(sdp(A_OFFER), sdp(B_ANSWER), owner).to_bytes())
    assert update.origin.session_id == first.origin.session_id
    assert update.origin.version == first.origin.version + 1
    assert update.media_address(0) == ("10.0.0.1", 4000)
    assert update.media_address(1) == ("10.0.0.2", 5000)
    assert update.media[0].formats == [8, 101]
    assert update.media[1].formats == [8, 101]
    assert update.media[1].fmtp == {101: "0-15"}


def test_mcp_ports_by_label() -> None:
    assert media.mcp_ports(sdp(MCP_ANSWER)) == {
        "caller": ("127.0.0.1", 20000),
        "callee": ("127.0.0.1", 20002),
    }


def test_mcp_ports_rejected_line() -> None:
    with pytest.raises(MediaError):
        media.mcp_ports(sdp(MCP_ANSWER.replace(b"20002", b"0")))


def test_anchor_offer_towards_b_keeps_codecs_and_dtmf() -> None:
    owner = SdpOwner("192.0.2.1")
    out = sdp(media.anchor(sdp(A_OFFER), "127.0.0.1", 20002, owner).to_bytes())
    assert out.media_address(0) == ("127.0.0.1", 20002)
    audio = out.media[0]
    assert audio.formats == [0, 8, 101]
    assert audio.rtpmap[101] == "telephone-event" and audio.fmtp[101] == "0-16"
    assert audio.ptime == 20 and audio.direction == "sendrecv"
    assert audio.attribute("rtcp") is None and not audio.has_attribute("candidate")
    assert out.attribute("ice-lite") is None and out.attribute("tool") == "phone"
    assert out.origin.username == "callvault" and out.origin.session_id == owner.session_id


def test_owner_version_changes_only_with_content() -> None:
    owner = SdpOwner("192.0.2.1")
    first = media.anchor(sdp(A_OFFER), "127.0.0.1", 20002, owner)
    same = media.anchor(sdp(A_OFFER), "127.0.0.1", 20002, owner)
    assert same.origin.version == first.origin.version
    held = media.anchor(media.with_direction(sdp(A_OFFER), "sendonly"), "127.0.0.1", 20002, owner)
    assert held.origin.version == first.origin.version + 1
    assert SdpOwner.from_dict(owner.to_dict()) == owner


def test_anchor_keeps_session_c_for_unanchored_video() -> None:
    offer = A_OFFER + b"m=video 6000 RTP/AVP 96\r\na=rtpmap:96 H264/90000\r\n"
    out = sdp(media.anchor(sdp(offer), "127.0.0.1", 20002).to_bytes())
    assert out.media_address(0) == ("127.0.0.1", 20002)
    assert out.media_address(1) == ("10.0.0.1", 6000)


def test_no_audio_is_media_error() -> None:
    video_only = (
        b"v=0\r\no=a 1 1 IN IP4 10.0.0.1\r\ns=-\r\nc=IN IP4 10.0.0.1\r\nt=0 0\r\nm=video 6000 RTP/AVP 96\r\n"
    )
    with pytest.raises(MediaError):
        media.bridge_offer(sdp(video_only), SdpOwner("192.0.2.1"))


def test_same_session_version() -> None:
    held = A_OFFER.replace(b"2890844526 2890844526", b"2890844526 2890844527")
    assert media.same_session_version(A_OFFER, A_OFFER)
    assert not media.same_session_version(A_OFFER, held)
    assert not media.same_session_version(A_OFFER, b"garbage")

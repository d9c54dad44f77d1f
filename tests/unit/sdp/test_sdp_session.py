"""SessionDescription parse/serialize (RFC 4566) on real and RFC examples, and malformed input."""

from __future__ import annotations

import pytest
from sdp_examples import BARESIP_OFFER, BRIDGE_OFFER, EXAMPLES, RFC3264_OFFER, SIPP_OFFER, crlf

from services.sdp import (
    Media,
    Origin,
    SdpParseError,
    SessionDescription,
    TimeDescription,
    audio_media,
    new_session,
)


@pytest.mark.parametrize("data", EXAMPLES)
def test_examples_round_trip_byte_exact(data: bytes) -> None:
    sdp = SessionDescription.parse(data)
    assert sdp.to_bytes() == data
    assert SessionDescription.parse(sdp.to_bytes()) == sdp


@pytest.mark.parametrize("data", EXAMPLES)
def test_lf_only_and_str_input_parse_the_same(data: bytes) -> None:
    expected = SessionDescription.parse(data)
    assert SessionDescription.parse(data.replace(b"\r\n", b"\n")) == expected
    assert SessionDescription.parse(data.decode()) == expected
    assert SessionDescription.parse(data + b"\r\n\r\n") == expected


def test_sipp_offer_fields() -> None:
    sdp = SessionDescription.parse(SIPP_OFFER)
    assert sdp.origin == Origin("user1", "53655765", 2353687637, "IN", "IP4", "127.0.0.1")
    assert sdp.name == "-"
    assert sdp.connection == "127.0.0.1"
    assert sdp.times == [TimeDescription(0, 0)]
    (m,) = sdp.media
    assert (m.media, m.port, m.proto, m.formats) == ("audio", 6000, "RTP/AVP", [8, 101])
    assert m.connection is None
    assert m.rtpmap == {8: "PCMA", 101: "telephone-event"}
    assert m.fmtp == {101: "0-11,16"}
    assert m.direction == "sendrecv"
    assert m.explicit_direction is None
    assert sdp.media_address(0) == ("127.0.0.1", 6000)
    assert m.attributes[0] == ("rtpmap", "8 PCMA/8000")


def test_baresip_offer_fields() -> None:
    sdp = SessionDescription.parse(BARESIP_OFFER)
    assert sdp.attributes == [("tool", "baresip 1.0.0")]
    m = sdp.media[0]
    assert m.formats == [0, 101]
    assert m.direction == "sendrecv"
    assert m.label == "1"
    assert m.ptime == 20
    assert m.attribute("minptime") == "20"
    assert m.attribute("rtcp-rsize") is None and m.has_attribute("rtcp-rsize")
    assert m.attribute("ssrc") == "2932507996 cname:sip:1001@127.0.0.1:58663"
    assert m.clock_rate(101) == 8000
    assert m.fmtp == {101: "0-15"}


def test_rfc3264_offer_two_media() -> None:
    sdp = SessionDescription.parse(RFC3264_OFFER)
    assert sdp.name == ""
    assert [m.media for m in sdp.media] == ["audio", "video"]
    assert sdp.media[0].rtpmap == {0: "PCMU", 8: "PCMA", 97: "iLBC"}
    assert sdp.media[1].clock_rate(31) == 90000
    assert sdp.media_address(1) == ("host.atlanta.example.com", 51372)


def test_bridge_offer_media_level_connections_and_labels() -> None:
    sdp = SessionDescription.parse(BRIDGE_OFFER)
    assert sdp.connection is None
    assert sdp.media_address(0) == ("192.0.2.10", 40000)
    assert sdp.media_address(1) == ("0.0.0.0", 9)
    assert [m.label for m in sdp.media] == ["caller", "callee"]
    assert sdp.find_media(label="callee") == 1
    assert sdp.find_media(label="nobody") is None


def test_static_payload_types_filled_in_without_rtpmap() -> None:
    sdp = SessionDescription.parse(
        b"v=0\r\no=- 1 1 IN IP4 h\r\ns=-\r\nc=IN IP4 h\r\nt=0 0\r\nm=audio 5 RTP/AVP 0 8 9 13 18 96\r\n"
    )
    m = sdp.media[0]
    assert m.rtpmap == {0: "PCMU", 8: "PCMA", 9: "G722", 13: "CN", 18: "G729"}
    assert m.clock_rate(9) == 8000
    assert m.clock_rate(96) is None
    assert m.rtpmap_value(0) == "PCMU/8000"


def test_rtpmap_line_overrides_static_and_channels() -> None:
    sdp = SessionDescription.parse(
        "v=0\no=- 1 1 IN IP4 h\ns=-\nc=IN IP4 h\nt=0 0\nm=audio 5 RTP/AVP 0 111\n"
        "a=rtpmap:0 pcmu/8000\na=rtpmap:111 opus/48000/2\n"
    )
    m = sdp.media[0]
    assert m.rtpmap == {0: "pcmu", 111: "opus"}
    assert m.channels(111) == 2
    assert m.rtpmap_value(111) == "opus/48000/2"


def test_session_level_direction_applies_to_media_without_one() -> None:
    sdp = SessionDescription.parse(
        "v=0\no=- 1 1 IN IP4 h\ns=-\nc=IN IP4 h\nt=0 0\na=sendonly\n"
        "m=audio 5 RTP/AVP 0\nm=audio 7 RTP/AVP 0\na=inactive\n"
    )
    assert sdp.direction == "sendonly"
    assert sdp.media_direction(0) == "sendonly"
    assert sdp.media_direction(1) == "inactive"
    assert sdp.media[0].direction == "sendrecv"  # the m-line alone says nothing


def test_set_direction_replaces_in_place() -> None:
    m = SessionDescription.parse(BARESIP_OFFER).media[0]
    position = m.attributes.index(("sendrecv", None))
    m.set_direction("sendonly")
    assert m.direction == "sendonly"
    assert m.attributes[position] == ("sendonly", None)
    assert sum(1 for n, _ in m.attributes if n in ("sendrecv", "sendonly")) == 1
    m2 = Media("audio", 1, "RTP/AVP", [0])
    m2.set_direction("inactive")
    assert m2.attributes == [("inactive", None)]
    with pytest.raises(ValueError, match="unknown direction"):
        m2.set_direction("hold")


def test_set_and_remove_attribute() -> None:
    m = Media("audio", 1, "RTP/AVP", [0], attributes=[("ptime", "20"), ("label", "a"), ("label", "b")])
    m.set_attribute("label", "caller")
    assert m.attributes == [("ptime", "20"), ("label", "caller")]
    assert m.attribute_values("label") == ["caller"]
    m.remove_attribute("ptime")
    assert m.attributes == [("label", "caller")]


def test_attribute_with_empty_value_differs_from_flag() -> None:
    sdp = SessionDescription.parse("v=0\no=- 1 1 IN IP4 h\ns=-\nc=IN IP4 h\nt=0 0\na=tool:\na=flag\n")
    assert sdp.attributes == [("tool", ""), ("flag", None)]
    assert b"a=tool:\r\na=flag\r\n" in sdp.to_bytes()


def test_everything_round_trips() -> None:
    data = crlf(
        """
v=0
o=jdoe 2890844526 2890842807 IN IP4 10.47.16.5
s=SDP Seminar
i=A Seminar on the session description protocol
u=http://www.example.com/seminars/sdp.pdf
e=j.doe@example.com (Jane Doe)
p=+1 617 555-6011
c=IN IP4 224.2.17.12/127
b=CT:128
t=2873397496 2873404696
r=7d 1h 0 25h
t=0 0
z=2882844526 -1h 2898848070 0
k=prompt
a=recvonly
m=audio 49170/2 RTP/AVP 0
i=speech
c=IN IP6 ff15::101/3
b=AS:64
k=clear:key
a=rtpmap:0 PCMU/8000
m=image 9 udptl t38
a=T38FaxVersion:0
m=application 9 TCP/MRCPv2 1
a=resource:speechsynth
"""
    )
    sdp = SessionDescription.parse(data)
    assert sdp.to_bytes() == data
    assert sdp.media_address(0) == ("ff15::101", 49170)
    assert sdp.media[0].port_count == 2
    assert sdp.times[0].repeats == ["7d 1h 0 25h"]
    assert sdp.media[1].format_names == ["t38"] and sdp.media[1].formats == []
    assert sdp.media[2].formats == [1]


def test_new_session_and_audio_media_build_a_valid_offer() -> None:
    sdp = new_session("127.0.0.1", session_id="1234")
    assert sdp.origin == Origin("callvault", "1234", 1234, "IN", "IP4", "127.0.0.1")
    sdp.media.append(
        audio_media(
            40000,
            [0, 8, 101],
            rtpmap={101: "telephone-event/8000"},
            fmtp={101: "0-16"},
            direction="sendrecv",
            label="caller",
            ptime=20,
        )
    )
    sdp.media.append(audio_media(9, [0], connection="0.0.0.0", label="callee"))
    data = sdp.to_bytes()
    assert data.startswith(
        b"v=0\r\no=callvault 1234 1234 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
    )
    assert b"m=audio 40000 RTP/AVP 0 8 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:8 PCMA/8000\r\n" in data
    assert (
        b"a=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-16\r\na=ptime:20\r\na=label:caller\r\na=sendrecv\r\n"
        in data
    )
    assert b"m=audio 9 RTP/AVP 0\r\nc=IN IP4 0.0.0.0\r\n" in data
    again = SessionDescription.parse(data)
    assert again == sdp
    assert again.media_address(1) == ("0.0.0.0", 9)
    sdp.bump_version()
    assert sdp.origin.version == 1235
    with pytest.raises(ValueError, match="dynamic"):
        audio_media(1, [96])


def test_new_session_random_ids_and_ipv6() -> None:
    a, b = new_session("::1"), new_session("::1")
    assert a.origin.session_id != b.origin.session_id
    assert a.origin.addrtype == "IP6"
    assert b"c=IN IP6 ::1\r\n" in a.to_bytes()


def test_media_address_without_connection_is_local_misuse() -> None:
    sdp = SessionDescription(origin=Origin("-", "1", 1), media=[Media("audio", 5, "RTP/AVP", [0])])
    with pytest.raises(ValueError, match="no connection address"):
        sdp.media_address(0)


BASE = "v=0\r\no=- 1 1 IN IP4 h\r\ns=-\r\nc=IN IP4 h\r\nt=0 0\r\n"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ("", "empty"),
        ("\r\n", "empty"),
        ("o=- 1 1 IN IP4 h\r\nv=0\r\n", "does not start with a v= line"),
        ("v=1\r\n", "unsupported SDP version"),
        ("v=0\r\ns=-\r\n", "o= line is missing"),
        ("v=0\r\no=- 1 1 IN IP4 h\r\n", "s= line is missing"),
        ("v=0\r\no=- 1 IN IP4 h\r\ns=-\r\n", "o= line must have 6 fields"),
        ("v=0\r\no=- x 1 IN IP4 h\r\ns=-\r\n", "session id is not numeric"),
        ("v=0\r\no=- 1 y IN IP4 h\r\ns=-\r\n", "session version is not a number"),
        (BASE + "o=- 1 1 IN IP4 h\r\n", "more than one o= line"),
        (BASE + "v=0\r\n", "more than one v= line"),
        (BASE + "x=foo\r\n", "unknown SDP line type 'x'"),
        (BASE + "m=audio\r\n", "m= line has no port"),
        (BASE + "m=audio 5\r\n", "no transport protocol"),
        (BASE + "m=audio 5 RTP/AVP\r\n", "m= line has no formats"),
        (BASE + "m=audio 70000 RTP/AVP 0\r\n", "m= port 70000 is out of range"),
        (BASE + "m=audio -1 RTP/AVP 0\r\n", "m= port is not a number"),
        (BASE + "m=audio 5/0 RTP/AVP 0\r\n", "port count is 0"),
        (BASE + "m=audio 5 RTP/AVP 128\r\n", "RTP payload type 128 is out of range"),
        (BASE + "m=audio 5 RTP/AVP PCMU\r\n", "RTP payload type is not a number"),
        (BASE + "m=audio 5 RTP/AVP 0  8\r\n", "empty format"),
        (BASE + "m=audio 5 RTP/AVP 0\r\nt=0 0\r\n", "t= line inside a media section"),
        (BASE + "m=audio 5 RTP/AVP 0\r\nc=IN IP4 a\r\nc=IN IP4 b\r\n", "more than one c= line"),
        ("v=0\r\no=- 1 1 IN IP4 h\r\ns=-\r\nt=0 0\r\nm=audio 5 RTP/AVP 0\r\n", "m-line 0 has no c= line"),
        (BASE + "c=IN IP4 h\r\n", "more than one c= line"),
        ("v=0\r\no=- 1 1 IN IP4 h\r\ns=-\r\nc=IN IP4\r\n", "c= line is not"),
        ("v=0\r\no=- 1 1 IN IP4 h\r\ns=-\r\nc=ATM NSAP x\r\n", "network type"),
        ("v=0\r\no=- 1 1 IN IP4 h\r\ns=-\r\nc=IN IPX x\r\n", "address type"),
        ("v=0\r\no=- 1 1 IN IP4 h\r\ns=-\r\nc=IN IP4 ::1\r\n", "does not match address type"),
        ("v=0\r\no=- 1 1 IN IP4 h\r\ns=-\r\nc=IN IP4 224.0.0.1/x\r\n", "c= address is malformed"),
        (BASE + "b=AS\r\n", "b= line is not"),
        (BASE + "b=AS:fast\r\n", "b= bandwidth is not a number"),
        ("v=0\r\no=- 1 1 IN IP4 h\r\ns=-\r\nt=0\r\n", "t= line is not"),
        ("v=0\r\no=- 1 1 IN IP4 h\r\ns=-\r\nr=1d 1h 0\r\n", "r= line before any t= line"),
        (BASE + "a=rtpmap:0\r\n", "a=rtpmap:0 is not"),
        (BASE + "a=rtpmap:x PCMU/8000\r\n", "a=rtpmap payload type is not a number"),
        (BASE + "a=rtpmap:200 PCMU/8000\r\n", "a=rtpmap payload type 200 is out of range"),
        (BASE + "a=rtpmap:0 PCMU/fast\r\n", "clock rate is not a number"),
        (BASE + "a=fmtp: 0-15\r\n", "a=fmtp has an invalid format"),
        (BASE + "a=sendrecv:yes\r\n", "a=sendrecv takes no value"),
        (BASE + "a=\r\n", "attribute name is malformed"),
        (BASE + "a foo\r\n", "is not '<type>=<value>'"),
        (BASE + "a=foo\rbar\r\n", "CR or NUL"),
        (BASE + "a=foo\0\r\n", "CR or NUL"),
        ("v=0\r\no=- 1 " + "9" * 30 + " IN IP4 h\r\ns=-\r\n", "session version is not a number"),
        (b"v=0\r\no=- 1 1 IN IP4 h\r\ns=\xff\r\n", "not valid UTF-8"),
    ],
)
def test_malformed_sdp_names_the_defect(data: str | bytes, message: str) -> None:
    with pytest.raises(SdpParseError, match=message.replace("(", r"\(").replace("?", r"\?")):
        SessionDescription.parse(data)


def test_sdp_parse_error_is_a_value_error() -> None:
    assert issubclass(SdpParseError, ValueError)


def test_missing_t_line_is_tolerated_and_written_back() -> None:
    sdp = SessionDescription.parse("v=0\no=- 1 1 IN IP4 h\ns= \nc=IN IP4 h\nm=audio 5 RTP/AVP 0\n")
    assert sdp.name == " "
    assert sdp.times == [TimeDescription(0, 0)]
    assert b"\r\nt=0 0\r\n" in sdp.to_bytes()


def test_rejected_stream_with_port_zero_and_no_formats_is_accepted() -> None:
    sdp = SessionDescription.parse(BASE + "m=audio 0 RTP/AVP\r\n")
    assert sdp.media[0].port == 0 and sdp.media[0].formats == []


def test_parse_rejects_non_text() -> None:
    with pytest.raises(TypeError):
        SessionDescription.parse(42)  # type: ignore[arg-type]

"""Property tests: garbage only ever raises SdpParseError; generated descriptions round-trip."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from sdp_examples import BARESIP_OFFER, BRIDGE_OFFER, RFC3264_OFFER, SIPP_OFFER

from services.sdp import Media, Origin, SdpParseError, SessionDescription, TimeDescription


def parse_or_sdp_error(data: bytes | str) -> SessionDescription | None:
    try:
        sdp = SessionDescription.parse(data)
    except SdpParseError:
        return None
    # whatever parses must serialize to something that parses to the same thing
    assert SessionDescription.parse(sdp.to_bytes()) == sdp
    for index, m in enumerate(sdp.media):
        sdp.media_address(index)
        sdp.media_direction(index)
        m.rtpmap, m.fmtp, m.ptime, m.label  # noqa: B018 - the accessors must not raise either
    return sdp


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_only_raise_sdp_parse_error(data: bytes) -> None:
    parse_or_sdp_error(data)


LINE_ALPHABET = st.sampled_from(list("vosicbtrzkam=\r\n :/0123456789 IP4IP6RTP/AVPaudio-.x\0\xe9"))


@settings(max_examples=300, deadline=None)
@given(st.text(LINE_ALPHABET, max_size=200))
def test_random_sdp_like_text_only_raises_sdp_parse_error(text: str) -> None:
    parse_or_sdp_error("v=0\r\no=- 1 1 IN IP4 h\r\ns=-\r\n" + text)


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from([SIPP_OFFER, BARESIP_OFFER, RFC3264_OFFER, BRIDGE_OFFER]),
    st.data(),
)
def test_mutated_real_sdp_only_raises_sdp_parse_error(base: bytes, data: st.DataObject) -> None:
    buf = bytearray(base)
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(buf) - 1))
        action = data.draw(st.sampled_from(["flip", "delete", "insert"]))
        if action == "flip":
            buf[pos] = data.draw(st.integers(0, 255))
        elif action == "delete":
            del buf[pos : pos + data.draw(st.integers(1, 10))]
        else:
            buf[pos:pos] = data.draw(
                st.sampled_from([b" ", b"\r\n", b"=", b":", b"/", b"999999", b"a=x", b"m="])
            )
    parse_or_sdp_error(bytes(buf))


token = st.text(st.sampled_from("abcdefghijklmnopqrstuvwxyz0123456789-."), min_size=1, max_size=8)
value_text = st.text(st.characters(blacklist_characters="\r\n\0", blacklist_categories=("Cs",)), max_size=12)
attribute = st.tuples(token, st.one_of(st.none(), value_text)).filter(
    lambda a: (
        not (a[0] in ("rtpmap", "fmtp", "sendrecv", "sendonly", "recvonly", "inactive") and a[1] is not None)
    )
)
address = st.sampled_from(["127.0.0.1", "192.0.2.1", "0.0.0.0", "::1", "host.example.com", "224.2.1.1/127"])
media = st.builds(
    Media,
    media=st.sampled_from(["audio", "video"]),
    port=st.integers(1, 65535),
    proto=st.just("RTP/AVP"),
    formats=st.lists(st.integers(0, 127), min_size=1, max_size=5),
    connection=st.one_of(st.none(), address),
    attributes=st.lists(attribute, max_size=5),
    bandwidth=st.lists(st.tuples(st.sampled_from(["AS", "CT", "TIAS"]), st.integers(0, 10**6)), max_size=2),
)


@settings(max_examples=200, deadline=None)
@given(
    st.builds(
        SessionDescription,
        origin=st.builds(
            Origin,
            username=token,
            session_id=st.integers(0, 2**63).map(str),
            version=st.integers(0, 2**63),
            nettype=st.just("IN"),
            addrtype=st.just("IP4"),
            address=token,
        ),
        name=st.text(st.characters(blacklist_characters="\r\n\0", blacklist_categories=("Cs",)), max_size=10),
        connection=address,
        attributes=st.lists(attribute, max_size=4),
        media=st.lists(media, max_size=3),
        times=st.lists(
            st.builds(TimeDescription, st.integers(0, 2**32), st.integers(0, 2**32)), min_size=1, max_size=2
        ),
    )
)
def test_generated_descriptions_round_trip(sdp: SessionDescription) -> None:
    assert SessionDescription.parse(sdp.to_bytes()) == sdp

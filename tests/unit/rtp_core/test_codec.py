"""G.711 tables and the RTP parser of rtp_core._core against the pure-Python reference."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from rtp_core import _core

from . import reference as ref


def test_ulaw_table_matches_reference() -> None:
    data = bytes(range(256))
    assert _core.ulaw_decode(data) == ref.ulaw_decode(data)


def test_alaw_table_matches_reference() -> None:
    data = bytes(range(256))
    assert _core.alaw_decode(data) == ref.alaw_decode(data)


def test_g711_known_values() -> None:
    # G.711: u-law 0xff and A-law 0xd5 are the zero codes; u-law 0x00 is the most negative value
    assert struct.unpack("<h", _core.ulaw_decode(b"\xff"))[0] == 0
    assert struct.unpack("<h", _core.ulaw_decode(b"\x00"))[0] == -32124
    assert struct.unpack("<h", _core.alaw_decode(b"\xd5"))[0] == 8
    assert struct.unpack("<h", _core.alaw_decode(b"\x2a"))[0] == -32256


def test_encoders_round_trip_through_the_c_decoder() -> None:
    for s in range(-32768, 32768, 97):
        u = struct.unpack("<h", _core.ulaw_decode(bytes([ref.ulaw_encode(s)])))[0]
        a = struct.unpack("<h", _core.alaw_decode(bytes([ref.alaw_encode(s)])))[0]
        assert abs(u - s) <= max(4, abs(s) // 16)
        assert abs(a - s) <= max(16, abs(s) // 16)


def test_parse_minimal_packet() -> None:
    pkt = ref.build_rtp(0, 65535, 0xFFFFFFFF, 0xDEADBEEF, b"abc", marker=1)
    assert _core.parse_rtp(pkt) == (1, 0, 65535, 0xFFFFFFFF, 0xDEADBEEF, b"abc")


def test_parse_csrc_extension_padding() -> None:
    hdr = bytes([0x80 | 0x20 | 0x10 | 2, 8]) + struct.pack("!HII", 7, 160, 1)
    csrc = b"\x00\x00\x00\x02\x00\x00\x00\x03"
    ext = b"\xbe\xde\x00\x01" + b"\x11\x22\x33\x44"
    pkt = hdr + csrc + ext + b"payload" + b"\x00\x00\x03"
    assert _core.parse_rtp(pkt) == (0, 8, 7, 160, 1, b"payload")
    assert ref.parse_rtp(pkt) == _core.parse_rtp(pkt)


def test_parse_rejects_defects() -> None:
    good = ref.build_rtp(0, 1, 2, 3, b"x" * 10)
    cases = {
        "short": good[:11],
        "version 1": bytes([0x40]) + good[1:],
        "csrc count beyond length": bytes([0x8F]) + good[1:],
        "padding beyond length": bytes([0xA0]) + good[1:-1] + b"\xff",
        "zero padding": bytes([0xA0]) + good[1:-1] + b"\x00",
        "extension header beyond length": bytes([0x90]) + good[1:12] + b"\xbe",
        "extension beyond length": bytes([0x90]) + good[1:12] + b"\xbe\xde\x00\x09" + b"x" * 8,
        "rtcp on the rtp port": bytes([0x80, 200]) + good[2:],
    }
    for name, pkt in cases.items():
        assert _core.parse_rtp(pkt) is None, name
        assert ref.parse_rtp(pkt) is None, name


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=80))
def test_fuzz_parser_matches_reference(data: bytes) -> None:
    assert _core.parse_rtp(data) == ref.parse_rtp(data)


@settings(max_examples=1000, deadline=None)
@given(
    st.integers(0, 255),
    st.integers(0, 255),
    st.binary(max_size=10),
    st.binary(max_size=60),
)
def test_fuzz_parser_rtp_like_headers(b0: int, b1: int, mid: bytes, tail: bytes) -> None:
    data = bytes([b0 | 0x80 if b0 & 1 else b0, b1]) + mid + tail
    assert _core.parse_rtp(data) == ref.parse_rtp(data)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=200), max_size=30))
def test_fuzz_recorder_only_counts_and_drops(datagrams: list[bytes]) -> None:
    rec = _core.Recorder()
    for i, d in enumerate(datagrams):
        ok = rec.feed(i % 2, i * 1_000_000, d)
        assert ok == (ref.parse_rtp(d) is not None)
        rec.tick(i * 1_000_000)
    rec.flush(len(datagrams) * 1_000_000)
    stats = rec.stats()
    invalid = sum(1 for d in datagrams if ref.parse_rtp(d) is None)
    assert stats["legs"][0]["invalid"] + stats["legs"][1]["invalid"] == invalid

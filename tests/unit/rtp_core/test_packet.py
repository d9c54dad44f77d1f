"""The packet ring (Engine(io="packet")): its IPv4 / UDP check against the reference, and on a real
ring, datagrams the kernel's UDP layer would refuse are refused by the engine too."""

from __future__ import annotations

import socket
import struct
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import rtp_core
from rtp_core import _core

from . import reference as ref
from .streams import stream
from .test_engine import _socket_loops

addr = st.tuples(st.integers(1, 223), st.integers(0, 255), st.integers(0, 255), st.integers(1, 254)).map(
    lambda t: ".".join(map(str, t))
)
endpoint = st.tuples(addr, st.integers(1, 65535))
options = st.integers(0, 10).map(lambda n: b"\x01" * (4 * n))  # NOP options, whole words


@settings(max_examples=300, deadline=None)
@given(endpoint, endpoint, st.binary(max_size=300), options, st.booleans())
def test_valid_datagrams_are_found(src, dst, payload: bytes, opts: bytes, udp_csum: bool) -> None:
    pkt = ref.build_ipv4_udp(src, dst, payload, options=opts, udp_csum=udp_csum)
    assert ref.parse_ipv4_udp(pkt) == (20 + len(opts), 8 + len(payload))
    assert _core.parse_ipv4_udp(pkt) == (20 + len(opts), 8 + len(payload))
    # trailing bytes (Ethernet padding) are not part of the datagram
    assert _core.parse_ipv4_udp(pkt + b"\x00" * 18) == (20 + len(opts), 8 + len(payload))


@settings(max_examples=1000, deadline=None)
@given(endpoint, endpoint, st.binary(max_size=64), st.data(), st.booleans())
def test_damaged_datagrams_agree_with_the_reference(src, dst, payload: bytes, data, csum_known: bool) -> None:
    pkt = bytearray(ref.build_ipv4_udp(src, dst, payload))
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(pkt) - 1))
        pkt[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(pkt)))
    for p in (bytes(pkt), bytes(pkt[:cut])):
        assert _core.parse_ipv4_udp(p, csum_known=csum_known) == ref.parse_ipv4_udp(p, csum_known)


def test_what_the_ring_refuses() -> None:
    good = ref.build_ipv4_udp(("10.0.0.1", 4000), ("10.0.0.2", 20000), b"\x80" + b"\x00" * 171)
    assert _core.parse_ipv4_udp(good) == (20, 180)
    bad_udp = good[:-1] + bytes([good[-1] ^ 1])
    assert _core.parse_ipv4_udp(bad_udp) == "udp checksum"
    assert _core.parse_ipv4_udp(bad_udp, csum_known=True) == (20, 180)  # the kernel vouched for it
    frag = good[:6] + b"\x20\x00" + good[8:]  # more fragments follow
    assert _core.parse_ipv4_udp(frag) == "invalid"
    tcp = good[:9] + b"\x06" + good[10:]
    assert _core.parse_ipv4_udp(tcp) == "invalid"
    assert _core.parse_ipv4_udp(good[:-1]) == "invalid"  # captured short of its total length
    v6 = b"\x60" + good[1:]
    assert _core.parse_ipv4_udp(v6) == "invalid"
    assert _core.parse_ipv4_udp(b"") == "invalid"


def test_the_ring_refuses_what_the_udp_layer_would(tmp_path: Path) -> None:
    """Datagrams written with a raw socket (no kernel checksum, so the engine must check): one with
    a wrong UDP checksum is counted as rejected and neither recorded nor relayed; with a correct
    checksum, or none (RFC 768), they are recorded and relayed. Without the packet ring (no
    CAP_NET_RAW), Engine(io="packet") refuses with OSError and "auto" runs another receive path."""
    if "packet" not in _socket_loops():
        with pytest.raises(OSError, match="packet"):
            rtp_core.Engine(io="packet")
        with rtp_core.Engine() as e:
            assert e.io in ("io_uring", "epoll")
        return
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.bind(("127.0.0.1", 0))
    peer.setblocking(False)
    raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    with rtp_core.Engine(bind_ip="127.0.0.1", port_min=31000, port_max=31999, io="packet") as e, peer, raw:
        assert e.io == "packet"
        sid = e.open_session(output_path=str(tmp_path / "r.wav"))
        pa, pb = e.add_leg(sid, 0), e.add_leg(sid, 1)
        e.set_remote(sid, 1, *peer.getsockname())
        pkts = [d for _, d in stream(440, 6)]
        rejected0 = e.loop_stats()[0]["ring_rejected"]
        sends = [
            ref.build_ipv4_udp(("127.0.0.1", 40000), ("127.0.0.1", pa), pkts[0]),
            ref.build_ipv4_udp(("127.0.0.1", 40000), ("127.0.0.1", pa), pkts[1], udp_csum=False),
        ]
        broken = bytearray(ref.build_ipv4_udp(("127.0.0.1", 40000), ("127.0.0.1", pa), pkts[2]))
        broken[26] ^= 0xFF  # the UDP checksum
        sends.append(bytes(broken))
        for d in sends:
            raw.sendto(d, ("127.0.0.1", 0))
            time.sleep(0.01)
        time.sleep(0.1)
        got, sources = [], set()
        while True:
            try:
                d, src = peer.recvfrom(2048)
            except BlockingIOError:
                break
            got.append(d)
            sources.add(src)
        stats = e.close_session(sid)
        assert got == pkts[:2]
        assert sources == {("127.0.0.1", pb)}  # symmetric RTP: relayed from the port the peer sends to
        assert stats["legs"][0]["packets"] == 2
        assert e.loop_stats()[0]["ring_rejected"] - rejected0 == 1
        assert stats["legs"][0]["remote"] == ("127.0.0.1", 40000)  # latched to the source the ring saw


def test_threads_take_their_own_share_of_the_ports() -> None:
    """Each engine thread allocates from its own part of the range (a packet ring's filter takes
    exactly its thread's ports); sessions alternate between the threads."""
    with rtp_core.Engine(bind_ip="127.0.0.1", port_min=31000, port_max=31099, threads=2) as e:
        ports = {}
        for _ in range(4):
            sid = e.open_session(output_path=None)
            ports[sid] = e.add_leg(sid, 0)
        for sid, port in ports.items():
            half = 0 if port < 31050 else 1
            assert half == sid % 2, (sid, port)
    with pytest.raises(ValueError, match="fewer port pairs"):
        rtp_core.Engine(port_min=31000, port_max=31003, threads=3)


def test_packet_socket_filter_program_is_not_fooled_by_ports_outside_the_range(tmp_path: Path) -> None:
    """A datagram to a port of the range that no leg holds, and one just outside the range, are not
    counted for any leg (the socket layer answers the first as unreachable, as without the ring)."""
    with rtp_core.Engine(bind_ip="127.0.0.1", port_min=31000, port_max=31009) as e:
        sid = e.open_session(output_path=None)
        port = e.add_leg(sid, 0)
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with s:
            for p in (31008, 31010, port):
                s.sendto(struct.pack("!BBHII", 0x80, 0, 1, 160, 7) + b"\xff" * 160, ("127.0.0.1", p))
            time.sleep(0.1)
        stats = e.close_session(sid)
        assert stats["legs"][0]["packets"] == 1
        assert sum(x["datagrams"] for x in e.loop_stats()) == 1


@pytest.mark.parametrize("bind_ip", ["127.0.0.1", "0.0.0.0"])
def test_relays_leave_from_the_legs_port(bind_ip: str) -> None:
    """Relayed packets come from the port the far end sends to, whether the packet ring's raw
    socket writes them (an engine with an address) or the leg's own socket sends them (0.0.0.0).
    On a machine without the packet ring, the same holds for the receive path it runs."""
    a, b = (socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2))
    with a, b, rtp_core.Engine(bind_ip=bind_ip, port_min=31000, port_max=31999) as e:
        for s in (a, b):
            s.bind(("127.0.0.1", 0))
            s.settimeout(2)
        sid = e.open_session(output_path=None)
        pa, pb = e.add_leg(sid, 0), e.add_leg(sid, 1)
        e.set_remote(sid, 0, *a.getsockname())
        e.set_remote(sid, 1, *b.getsockname())
        pkts = [d for _, d in stream(440, 3)]
        for d in pkts:
            a.sendto(d, ("127.0.0.1", pa))
        got = [b.recvfrom(2048) for _ in pkts]
        b.sendto(pkts[0], ("127.0.0.1", pb))
        back = a.recvfrom(2048)
        e.close_session(sid)
    assert [d for d, _ in got] == pkts
    assert {src for _, src in got} == {("127.0.0.1", pb)}
    assert back == (pkts[0], ("127.0.0.1", pa))

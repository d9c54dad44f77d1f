"""rtp_core.Engine on real sockets: two UDP "phones" on 127.0.0.1 talk through a bridge session."""

from __future__ import annotations

import os
import select
import socket
import struct
import time
import wave
from pathlib import Path

import numpy as np
import pytest

import rtp_core

from . import reference as ref
from .streams import stream

_open: list[socket.socket] = []


@pytest.fixture(autouse=True)
def _close_phones():
    yield
    while _open:
        _open.pop().close()


def phone() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    _open.append(s)
    s.bind(("127.0.0.1", 0))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    s.setblocking(False)
    return s


def drain(s: socket.socket) -> list[bytes]:
    out = []
    while True:
        try:
            out.append(s.recv(4096))
        except BlockingIOError:
            return out


def wait_events(engine: rtp_core.Engine, kinds: set[str], timeout: float = 3.0) -> list[rtp_core.Event]:
    got: list[rtp_core.Event] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not kinds <= {e[0] for e in got}:
        select.select([engine.fileno()], [], [], 0.05)
        got += engine.poll_events()
    return got


def dominant_hz(x: np.ndarray) -> float:
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.argmax(spec) * ref.RATE / len(x))


def _socket_loops() -> list[str]:
    """epoll always; io_uring where the kernel (and any seccomp filter) allows it; the packet ring
    where, besides, the process may open packet sockets (CAP_NET_RAW). The engine's own self-tests
    decide, as Engine(io="auto") does; a machine without them runs the engine on what it has, so
    that is what its tests exercise there."""
    try:
        rtp_core.Engine(io="io_uring").close()
    except OSError:
        return ["epoll"]
    loops = ["epoll", "io_uring"]
    try:
        rtp_core.Engine(io="packet").close()
    except OSError:
        return loops
    return [*loops, "packet"]


@pytest.fixture(params=_socket_loops())
def io(request: pytest.FixtureRequest) -> str:
    """Every engine test runs on every socket loop this machine has."""
    return str(request.param)


@pytest.fixture
def engine(io: str):
    with rtp_core.Engine(bind_ip="127.0.0.1", port_min=31000, port_max=31999, io=io) as e:
        assert e.io == io
        yield e


def test_bridge_relays_and_records_stereo(engine: rtp_core.Engine, tmp_path: Path) -> None:
    a, b = phone(), phone()
    out = tmp_path / "call.wav"
    sid = engine.open_session(output_path=str(out), channels=2, reorder_ms=100)
    pa, pb = engine.add_leg(sid, 0), engine.add_leg(sid, 1)
    assert pa % 2 == 0 and pb % 2 == 0 and pa != pb
    engine.set_remote(sid, 0, *a.getsockname())
    engine.set_remote(sid, 1, "0.0.0.0", 9)  # SDP placeholder until the callee answers: latching
    engine.set_payload_types(sid, 0, {0: "PCMU", 101: "telephone-event"})

    sa = stream(440, 150, ssrc=0xA)  # 3 s of caller audio
    sb = stream(1000, 125, ssrc=0xB, seq0=9000, ts0=123_456)  # callee answers 0.5 s later
    sched = sorted(
        [(t, a, pa, d) for t, d in sa] + [(t + 500_000_000, b, pb, d) for t, d in sb], key=lambda x: x[0]
    )
    got_a: list[bytes] = []
    got_b: list[bytes] = []
    start = time.monotonic_ns()
    for t, sock, port, d in sched:
        delay = (start + t - time.monotonic_ns()) / 1e9
        if delay > 0:
            time.sleep(delay)
        sock.sendto(d, ("127.0.0.1", port))
        got_a += drain(a)
        got_b += drain(b)
    time.sleep(0.05)
    got_a += drain(a)
    got_b += drain(b)
    events = wait_events(engine, {"started"})
    stats = engine.close_session(sid)

    # relay: each phone receives the other's packets unchanged (the caller only after the callee latched)
    assert got_b == [d for _, d in sa[25:]] or got_b[-100:] == [d for _, d in sa[-100:]]
    assert got_a == [d for _, d in sb]
    started = {e[2]: e[3] for e in events if e[0] == "started"}
    assert started[0] == (*a.getsockname(), 0xA) and started[1] == (*b.getsockname(), 0xB)

    with wave.open(str(out)) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (2, 2, 8000)
        frames = w.getnframes()
        x = np.frombuffer(w.readframes(frames), dtype="<i2").reshape(-1, 2).astype(float)
    assert abs(frames / 8000 - 3.0) <= 0.06, frames
    assert stats["samples"] == frames and abs(stats["duration"] - 3.0) <= 0.06
    left, right = x[:, 0], x[:, 1]
    assert dominant_hz(left[4000:20000]) == pytest.approx(440, abs=5)
    assert dominant_hz(right[8000:20000]) == pytest.approx(1000, abs=5)
    # the callee's first packet is 500 ms in; alignment within one packet (20 ms)
    first_b = int(np.argmax(np.abs(right) > 100))
    assert abs(first_b - 4000) <= 160, first_b
    assert np.abs(right[:first_b]).max() == 0
    l0, l1 = stats["legs"]
    assert (l0["packets"], l0["lost"], l0["ssrc"], l0["codec"]) == (150, 0, 0xA, "PCMU")
    assert (l1["packets"], l1["lost"], l1["ssrc"]) == (125, 0, 0xB)
    assert l1["remote"] == b.getsockname() and l0["remote"] == a.getsockname()
    assert l0["relayed"] == len(got_a) and l1["relayed"] == len(got_b)
    assert l0["jitter_ms"] < 10 and l0["gap_total_ms"] == 0
    assert os.path.getsize(out) == 44 + frames * 4


def test_rtcp_relayed_between_plus_one_ports(engine: rtp_core.Engine) -> None:
    a, b = phone(), phone()
    sid = engine.open_session(output_path=None)
    pa, _pb = engine.add_leg(sid, 0), engine.add_leg(sid, 1)
    ha, hb = a.getsockname(), b.getsockname()
    engine.set_remote(sid, 0, ha[0], ha[1] - 1)  # RTCP goes to port + 1 = a's port
    engine.set_remote(sid, 1, hb[0], hb[1] - 1)
    sr = bytes([0x80, 200, 0, 6]) + b"\x00" * 24
    a.sendto(sr, ("127.0.0.1", pa + 1))
    time.sleep(0.05)
    assert drain(b) == [sr]
    st = engine.close_session(sid)
    assert st["legs"][0]["rtcp_packets"] == 1 and st["legs"][1]["rtcp_relayed"] == 1


def test_invalid_datagrams_counted_and_dropped(engine: rtp_core.Engine, tmp_path: Path) -> None:
    a, b = phone(), phone()
    sid = engine.open_session(output_path=str(tmp_path / "x.wav"))
    pa, _ = engine.add_leg(sid, 0), engine.add_leg(sid, 1)
    engine.set_remote(sid, 1, *b.getsockname())
    rnd = np.random.default_rng(1)
    bad = [b"", b"\x80", bytes([0x40]) + b"\x00" * 20, bytes([0x8F]) + b"\x00" * 15]
    bad += [
        bytes([0x40 | (int(rnd.integers(64)))]) + rnd.bytes(int(rnd.integers(0, 300))) for _ in range(200)
    ]
    for d in bad:
        a.sendto(d, ("127.0.0.1", pa))
    time.sleep(0.1)
    st = engine.close_session(sid)
    assert st["legs"][0]["invalid"] == len(bad)
    assert st["legs"][0]["packets"] == 0 and drain(b) == []


def test_oversized_datagrams_are_invalid_on_every_receive_path(engine: rtp_core.Engine) -> None:
    """A datagram larger than the engine's 2 KiB packet buffers is counted invalid, even with a
    valid RTP (or RTCP) header: the socket loops see it truncated, the packet ring whole, and all
    of them must treat it alike."""
    a, b = phone(), phone()
    sid = engine.open_session(output_path=None)
    pa, pb = engine.add_leg(sid, 0), engine.add_leg(sid, 1)
    engine.set_remote(sid, 1, *b.getsockname())
    a.sendto(struct.pack("!BBHII", 0x80, 8, 1, 160, 7) + b"\xd5" * 3000, ("127.0.0.1", pa))
    a.sendto(b"\x81\xc8" + b"\x00" * 3000, ("127.0.0.1", pa + 1))
    a.sendto(struct.pack("!BBHII", 0x80, 8, 2, 320, 7) + b"\xd5" * 160, ("127.0.0.1", pa))
    time.sleep(0.1)
    st = engine.close_session(sid)
    assert st["legs"][0]["invalid"] == 2
    assert st["legs"][0]["packets"] == 1 and st["legs"][0]["rtcp_packets"] == 0
    assert len(drain(b)) == 1


def test_timeout_event(engine: rtp_core.Engine) -> None:
    sid = engine.open_session(output_path=None, timeout_s=0.2)
    engine.add_leg(sid, 0)
    ev = wait_events(engine, {"timeout"}, timeout=2)
    assert ("timeout", sid, -1, None) in ev
    engine.close_session(sid)


def test_record_mode_does_not_relay(engine: rtp_core.Engine, tmp_path: Path) -> None:
    a, b = phone(), phone()
    sid = engine.open_session(output_path=str(tmp_path / "r.wav"), mode="record", channels=1)
    pa, _pb = engine.add_leg(sid, 0), engine.add_leg(sid, 1)
    engine.set_remote(sid, 0, *a.getsockname())
    engine.set_remote(sid, 1, *b.getsockname())
    for _, d in stream(440, 5):
        a.sendto(d, ("127.0.0.1", pa))
    time.sleep(0.1)
    st = engine.close_session(sid)
    assert drain(b) == [] and st["legs"][0]["packets"] == 5 and st["channels"] == 1
    with wave.open(str(tmp_path / "r.wav")) as w:
        assert w.getnchannels() == 1 and w.getnframes() == st["samples"] >= 800


def test_errors(engine: rtp_core.Engine, tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        engine.open_session(output_path=None, channels=3)
    with pytest.raises(ValueError):
        engine.open_session(output_path=None, mode="mix")
    with pytest.raises(OSError):
        engine.open_session(output_path=str(tmp_path / "missing" / "x.wav"))
    with pytest.raises(ValueError):
        engine.add_leg(12345, 0)
    sid = engine.open_session(output_path=None)
    with pytest.raises(ValueError):
        engine.add_leg(sid, 2)
    engine.add_leg(sid, 0)
    with pytest.raises(ValueError):
        engine.add_leg(sid, 0)
    with pytest.raises(ValueError):
        engine.set_remote(sid, 0, "not an ip", 1)
    with pytest.raises(ValueError):
        engine.set_payload_types(sid, 0, {200: "PCMU"})
    engine.close_session(sid)
    with pytest.raises(ValueError):
        engine.close_session(sid)


def free_port_block(n: int) -> int:
    """An even port p with p .. p + n - 1 free on 127.0.0.1 (below the ephemeral range)."""
    rnd = np.random.default_rng()
    while True:
        p = int(rnd.integers(6000, 15000)) * 2
        socks = []
        try:
            for q in range(p, p + n):
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                socks.append(s)
                s.bind(("127.0.0.1", q))
            return p
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()


def test_port_exhaustion_is_oserror(io: str) -> None:
    p = free_port_block(4)
    with rtp_core.Engine(port_min=p, port_max=p + 3, io=io) as e:
        sid = e.open_session(output_path=None)
        e.add_leg(sid, 0)
        e.add_leg(sid, 1)
        sid2 = e.open_session(output_path=None)
        with pytest.raises(OSError):
            e.add_leg(sid2, 0)


def test_close_finalises_open_sessions(tmp_path: Path, io: str) -> None:
    e = rtp_core.Engine(port_min=32100, port_max=32199, threads=2, io=io)
    a = phone()
    paths = []
    for i in range(4):
        p = tmp_path / f"{i}.wav"
        sid = e.open_session(output_path=str(p))
        port = e.add_leg(sid, 0)
        for _, d in stream(440, 10):
            a.sendto(d, ("127.0.0.1", port))
        paths.append(p)
    time.sleep(0.1)
    e.close()
    assert e.closed
    for p in paths:
        with wave.open(str(p)) as w:
            assert w.getnframes() >= 1600
    with pytest.raises(ValueError):
        e.open_session(output_path=None)


def test_fileno_works_with_asyncio_add_reader(engine: rtp_core.Engine) -> None:
    import asyncio

    async def main() -> list[rtp_core.Event]:
        loop = asyncio.get_running_loop()
        got: asyncio.Queue[list[rtp_core.Event]] = asyncio.Queue()
        loop.add_reader(engine.fileno(), lambda: got.put_nowait(engine.poll_events()))
        try:
            sid = engine.open_session(output_path=None)
            port = engine.add_leg(sid, 0)
            s = phone()
            s.sendto(stream(440, 1)[0][1], ("127.0.0.1", port))
            ev = await asyncio.wait_for(got.get(), 2)
            engine.close_session(sid)
            return ev
        finally:
            loop.remove_reader(engine.fileno())

    ev = asyncio.run(main())
    assert ev[0][0] == "started" and struct.calcsize("!I") == 4


def test_dtmf_and_ssrc_change_events(engine: rtp_core.Engine, tmp_path: Path) -> None:
    a = phone()
    sid = engine.open_session(output_path=str(tmp_path / "d.wav"))
    pa = engine.add_leg(sid, 0)
    engine.set_payload_types(sid, 0, {0: "PCMU", 96: "telephone-event"})
    pkts = [d for _, d in stream(440, 5, ssrc=7)]
    for i in range(4):  # digit '#' (11), end packet three times
        end = 0x80 if i >= 1 else 0
        pkts.append(ref.build_rtp(96, 1005 + i, 50_000 + 800, 7, bytes([11, end, 3, 32])))
    pkts += [d for _, d in stream(440, 5, ssrc=8, seq0=1, ts0=1)]
    for d in pkts:
        a.sendto(d, ("127.0.0.1", pa))
        time.sleep(0.002)
    ev = wait_events(engine, {"started", "dtmf", "ssrc_change"})
    st = engine.close_session(sid)
    assert ("dtmf", sid, 0, ("#", 100)) in ev
    assert ("ssrc_change", sid, 0, 8) in ev
    assert st["legs"][0]["dtmf"] == "#" and st["legs"][0]["ssrc"] == 8


def test_many_sessions_on_two_threads_open_and_close_under_traffic(tmp_path: Path, io: str) -> None:
    with rtp_core.Engine(port_min=33000, port_max=33999, threads=2, io=io) as e:
        assert e.threads == 2
        a = phone()
        live: dict[int, int] = {}
        pkts = [d for _, d in stream(440, 30)]
        for round_ in range(30):
            sid = e.open_session(output_path=str(tmp_path / f"{round_}.wav"), channels=1 + round_ % 2)
            live[sid] = e.add_leg(sid, round_ % 2)
            for port in live.values():
                a.sendto(pkts[round_], ("127.0.0.1", port))
            if round_ % 3 == 2:
                victim = next(iter(live))
                st = e.close_session(victim)
                assert st["legs"][0]["packets"] + st["legs"][1]["packets"] <= 30
                del live[victim]
            e.poll_events()
        for sid in list(live):
            e.session_stats(sid)
        assert len(e.loop_stats()) == 2


def test_io_argument() -> None:
    with pytest.raises(ValueError):
        rtp_core.Engine(io="select")
    with rtp_core.Engine() as e:
        assert e.io == _socket_loops()[-1]  # auto: the best receive path this machine has


def test_icmp_errors_from_a_vanished_peer_do_not_stall_a_leg(engine: rtp_core.Engine) -> None:
    a, b, gone = phone(), phone(), phone()
    sid = engine.open_session(output_path=None)
    pa, pb = engine.add_leg(sid, 0), engine.add_leg(sid, 1)
    engine.set_remote(sid, 1, *gone.getsockname())
    gone.close()  # the callee's port is closed: relays to it come back as ICMP port unreachable
    for _, d in stream(440, 10):
        a.sendto(d, ("127.0.0.1", pa))
        time.sleep(0.002)
    time.sleep(0.05)
    for _, d in stream(1000, 10, ssrc=9):
        b.sendto(d, ("127.0.0.1", pb))
        time.sleep(0.002)
    time.sleep(0.1)
    st = engine.close_session(sid)
    assert st["legs"][0]["packets"] == 10
    assert st["legs"][1]["packets"] == 10  # the errors reported on leg 1's socket lost none of its input


def test_strict_source_drops_foreign_rtp_and_relatches_after_silence(
    engine: rtp_core.Engine, tmp_path: Path
) -> None:
    a, b, intruder, moved = phone(), phone(), phone(), phone()
    sid = engine.open_session(output_path=str(tmp_path / "s.wav"))
    pa, _pb = engine.add_leg(sid, 0), engine.add_leg(sid, 1)
    engine.set_remote(sid, 0, *a.getsockname())
    engine.set_remote(sid, 1, *b.getsockname())
    pkts = [d for _, d in stream(440, 40, ssrc=0xA)]
    evil = [d for _, d in stream(1000, 40, ssrc=0xE, seq0=5000)]
    for i in range(10):  # a latches leg 0; an intruder injects between its packets
        a.sendto(pkts[i], ("127.0.0.1", pa))
        intruder.sendto(evil[i], ("127.0.0.1", pa))
        time.sleep(0.002)
    time.sleep(0.05)
    assert drain(b) == pkts[:10]  # only a's packets were relayed
    st = engine.session_stats(sid)["legs"][0]
    assert st["foreign"] == 10 and st["packets"] == 10 and st["remote"] == a.getsockname()
    # RTCP latches on its own; from another host it is foreign (127.0.0.2 is another loopback
    # address); another port of the RTP source's host is taken (RTCP is too sparse to judge silence)
    far = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    _open.append(far)
    far.bind(("127.0.0.2", 0))
    sr = bytes([0x80, 200, 0, 1]) + b"\x00" * 4
    a.sendto(sr, ("127.0.0.1", pa + 1))
    far.sendto(sr, ("127.0.0.1", pa + 1))
    intruder.sendto(sr, ("127.0.0.1", pa + 1))
    time.sleep(0.05)
    # the phone moves to another port (NAT rebinding): accepted once a has been silent for 1 s
    moved.sendto(pkts[10], ("127.0.0.1", pa))
    time.sleep(1.05)
    for i in range(11, 20):
        moved.sendto(pkts[i], ("127.0.0.1", pa))
        time.sleep(0.002)
    time.sleep(0.05)
    a.sendto(pkts[20], ("127.0.0.1", pa))  # the old source is now the foreign one
    time.sleep(0.05)
    assert drain(b) == pkts[11:20]
    # and a re-INVITE (set_remote) re-arms latching at once: the next packet's source is taken
    engine.set_remote(sid, 0, *a.getsockname())
    for i in range(21, 25):
        a.sendto(pkts[i], ("127.0.0.1", pa))
        time.sleep(0.002)
    time.sleep(0.05)
    assert drain(b) == pkts[21:25]
    st = engine.close_session(sid)["legs"][0]
    # foreign: 10 injected, 1 RTCP, pkts[10] (a still live), pkts[20] (moved still live)
    assert st["foreign"] == 13 and st["relatches"] == 1
    assert st["packets"] == 10 + 9 + 4 and st["rtcp_packets"] == 2
    assert st["remote"] == a.getsockname()
    with wave.open(str(tmp_path / "s.wav")) as w:
        left = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")[0::2].astype(float)
    assert abs(dominant_hz(left[left != 0]) - 440) < 20  # no 1 kHz injected into the recording


def test_strict_source_off_keeps_the_permissive_latching(engine: rtp_core.Engine) -> None:
    a, b, other = phone(), phone(), phone()
    sid = engine.open_session(output_path=None, strict_source=False)
    pa, _pb = engine.add_leg(sid, 0), engine.add_leg(sid, 1)
    engine.set_remote(sid, 1, *b.getsockname())
    pkts = [d for _, d in stream(440, 4)]
    a.sendto(pkts[0], ("127.0.0.1", pa))
    time.sleep(0.02)
    for d in pkts[1:]:
        other.sendto(d, ("127.0.0.1", pa))
    time.sleep(0.05)
    assert drain(b) == pkts
    st = engine.close_session(sid)["legs"][0]
    assert st["foreign"] == 0 and st["packets"] == 4 and st["remote"] == a.getsockname()

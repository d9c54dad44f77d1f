"""The C recorder (rtp_core._core.Recorder) against the Python reference, and its promised behaviour:
reorder within the window, loss and late packets, duplicates, sequence and timestamp wrap, SSRC
change, timestamp jumps, DTMF, stereo alignment and mono mix."""

from __future__ import annotations

import random
from array import array

from hypothesis import given, settings
from hypothesis import strategies as st

from rtp_core import _core

from . import reference as ref
from .streams import MS, run, stream, tone

SR = ref.RATE


def both(channels: int = 2, reorder_ms: int = 100) -> tuple[_core.Recorder, ref.Recorder]:
    return _core.Recorder(channels=channels, reorder_ms=reorder_ms), ref.Recorder(
        channels=channels, reorder_ms=reorder_ms
    )


def pcm(b: bytes) -> array:
    return array("h", b)


def channel(b: bytes, ch: int) -> list[int]:
    return list(pcm(b)[ch::2])


def decoded(datagrams: list[bytes]) -> list[int]:
    out: list[int] = []
    for d in datagrams:
        p = ref.parse_rtp(d)
        assert p is not None
        out += [ref.ULAW[b] for b in p[5]]
    return out


# ---- identical to the reference -----------------------------------------------------------------


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[list[tuple[int, int, bytes]], int, int, int, int]:
    rnd = random.Random(draw(st.integers(0, 2**32 - 1)))
    channels = draw(st.sampled_from([1, 2]))
    reorder_ms = draw(st.sampled_from([0, 20, 60, 100, 200]))
    arrivals: list[tuple[int, int, bytes]] = []
    for leg in (0, 1):
        count = draw(st.integers(0, 60))
        seq = draw(st.sampled_from([0, 65530, rnd.randrange(65536)]))
        ts = draw(st.sampled_from([0, 2**32 - 800, rnd.randrange(2**32)]))
        ssrc = rnd.randrange(2**32)
        t = draw(st.integers(0, 500)) * MS
        jitter = draw(st.sampled_from([0, 10, 50, 150, 400]))
        loss = draw(st.sampled_from([0.0, 0.05, 0.3]))
        for _ in range(count):
            r = rnd.random()
            if r < 0.03:
                ssrc = rnd.randrange(2**32)
            elif r < 0.06:
                ts += rnd.choice([-1, 1]) * rnd.randrange(160, 80_000)
            elif r < 0.08:
                seq += rnd.randrange(3000, 30000)
            elif r < 0.12:
                t += rnd.randrange(100, 900) * MS  # silence suppression / hold
                ts += (t // MS) % 7 * 160
            pt = rnd.choices([0, 8, 13, 101, 96], [60, 20, 5, 10, 5])[0]
            if pt == 101:
                payload = bytes([rnd.randrange(18), rnd.choice([0, 0x80]), 0, rnd.randrange(256)])
            elif pt == 13:
                payload = b"\x40"
            else:
                payload = bytes(rnd.randrange(256) for _ in range(rnd.choice([160, 160, 80, 240])))
            pkt = ref.build_rtp(pt, seq, ts, ssrc, payload, marker=int(rnd.random() < 0.05))
            if rnd.random() >= loss:
                arrivals.append((t + rnd.randrange(jitter + 1) * MS, leg, pkt))
                if rnd.random() < 0.05:
                    arrivals.append((t + rnd.randrange(jitter + 1) * MS, leg, pkt))
            if rnd.random() < 0.03:
                arrivals.append((t, leg, bytes(rnd.randrange(256) for _ in range(rnd.randrange(20)))))
            seq = (seq + 1) & 0xFFFF
            ts = (ts + 160) & 0xFFFFFFFF
            t += 20 * MS
    end = max((a[0] for a in arrivals), default=0) + draw(st.integers(0, 300)) * MS
    tick0 = draw(st.integers(0, 19)) * MS
    return arrivals, end, channels, reorder_ms, tick0


@settings(max_examples=150, deadline=None)
@given(scenarios())
def test_recorder_matches_reference(sc: tuple[list[tuple[int, int, bytes]], int, int, int, int]) -> None:
    arrivals, end, channels, reorder_ms, tick0 = sc
    c, p = both(channels, reorder_ms)
    out_c = run(c, arrivals, end, tick0=tick0)
    out_p = run(p, arrivals, end, tick0=tick0)
    assert c.stats() == p.stats()
    assert c.events() == p.events()
    assert out_c == out_p


# ---- behaviour ----------------------------------------------------------------------------------


def test_in_order_stream_is_reproduced_exactly() -> None:
    pkts = stream(440, 50)
    c = _core.Recorder(channels=2)
    out = run(c, [(t, 0, d) for t, d in pkts], end_ns=pkts[-1][0] + 20 * MS)
    assert channel(out, 0)[: 50 * 160] == decoded([d for _, d in pkts])
    assert set(channel(out, 1)) == {0}
    leg = c.stats()["legs"][0]
    assert (leg["packets"], leg["lost"], leg["late"], leg["reordered"], leg["gap_total_ms"]) == (
        50,
        0,
        0,
        0,
        0,
    )
    assert leg["codec"] == "PCMU" and leg["jitter_ms"] == 0.0


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(0, 65535), st.integers(0, 2**32 - 1))
def test_reorder_within_window_gives_same_audio(seed: int, seq0: int, ts0: int) -> None:
    rnd = random.Random(seed)
    pkts = stream(440, 40, seq0=seq0, ts0=ts0)
    # each packet delayed by 0-60 ms: arrives out of order, but inside the 100 ms window
    arrivals = [(t + rnd.randrange(61) * MS, 0, d) for t, d in pkts]
    arrivals[0] = (pkts[0][0], 0, pkts[0][1])  # the first packet anchors the timeline
    c = _core.Recorder(channels=2, reorder_ms=100)
    out = run(c, arrivals, end_ns=pkts[-1][0] + 200 * MS)
    assert channel(out, 0)[: 40 * 160] == decoded([d for _, d in pkts])
    leg = c.stats()["legs"][0]
    assert leg["late"] == 0 and leg["lost"] == 0 and leg["gap_total_ms"] == 0


def test_loss_is_silence_and_counted() -> None:
    pkts = stream(440, 30)
    kept = [p for i, p in enumerate(pkts) if i not in (5, 6, 20)]
    c = _core.Recorder(channels=2)
    out = run(c, [(t, 0, d) for t, d in kept], end_ns=pkts[-1][0] + 20 * MS)
    left = channel(out, 0)
    assert left[5 * 160 : 7 * 160] == [0] * 320
    assert left[7 * 160 : 8 * 160] == decoded([pkts[7][1]])
    leg = c.stats()["legs"][0]
    assert leg["lost"] == 3 and leg["gap_total_ms"] == 60.0 and leg["longest_gap_ms"] == 40.0


def test_late_packet_dropped_and_duplicates_counted() -> None:
    pkts = stream(440, 20)
    arrivals = [(t, 0, d) for t, d in pkts if t != pkts[3][0]]
    arrivals.append((pkts[3][0] + 300 * MS, 0, pkts[3][1]))  # 300 ms late: window is 100 ms
    arrivals.append((pkts[8][0] + 5 * MS, 0, pkts[8][1]))  # duplicate
    c = _core.Recorder(channels=2, reorder_ms=100)
    out = run(c, arrivals, end_ns=pkts[-1][0] + 400 * MS)
    assert channel(out, 0)[3 * 160 : 4 * 160] == [0] * 160
    leg = c.stats()["legs"][0]
    assert leg["late"] == 1 and leg["duplicates"] == 1 and leg["lost"] == 0


def test_sequence_and_timestamp_wrap() -> None:
    pkts = stream(300, 30, seq0=65520, ts0=2**32 - 1600)
    c = _core.Recorder(channels=2)
    out = run(c, [(t, 0, d) for t, d in pkts], end_ns=pkts[-1][0] + 20 * MS)
    assert channel(out, 0)[: 30 * 160] == decoded([d for _, d in pkts])
    leg = c.stats()["legs"][0]
    assert leg["lost"] == 0 and leg["reanchors"] == 0


def test_two_legs_are_aligned_to_wall_clock() -> None:
    # the callee starts 500 ms after the caller, with unrelated sequence numbers and timestamps
    a = stream(440, 100, ssrc=1, seq0=10, ts0=1000)
    b = stream(1000, 75, ssrc=2, seq0=40000, ts0=3_000_000_000, t0_ns=500 * MS)
    arrivals = [(t, 0, d) for t, d in a] + [(t, 1, d) for t, d in b]
    c = _core.Recorder(channels=2)
    out = run(c, arrivals, end_ns=2000 * MS)
    left, right = channel(out, 0), channel(out, 1)
    assert len(left) == 2 * SR
    assert right[:4000] == [0] * 4000
    assert right[4000 : 4000 + 75 * 160] == decoded([d for _, d in b])
    assert left[: 100 * 160] == decoded([d for _, d in a])


def test_silence_suppression_keeps_alignment() -> None:
    a = stream(440, 25) + stream(440, 25, seq0=1025, ts0=50_000 + 25 * 160 + 8000, t0_ns=1500 * MS)
    c = _core.Recorder(channels=2)
    out = run(c, [(t, 0, d) for t, d in a], end_ns=2100 * MS)
    left = channel(out, 0)
    assert left[4000:12000] == [0] * 8000
    assert left[12000 : 12000 + 25 * 160] == decoded([d for _, d in a[25:]])
    leg = c.stats()["legs"][0]
    assert leg["gap_total_ms"] == 1000.0 and leg["reanchors"] == 0 and leg["lost"] == 0


def test_timestamp_jump_reanchors() -> None:
    # same SSRC, timestamps jump forward by 10 s while packets keep coming every 20 ms
    a = stream(440, 25) + stream(440, 25, seq0=1025, ts0=50_000 + 80_000 + 25 * 160, t0_ns=500 * MS)
    c = _core.Recorder(channels=2)
    out = run(c, [(t, 0, d) for t, d in a], end_ns=1100 * MS)
    left = channel(out, 0)
    assert len(left) == 1100 * 8
    assert left[: 50 * 160] == decoded([d for _, d in a])
    assert c.stats()["legs"][0]["reanchors"] == 1


def test_backward_timestamp_jump_reanchors_after_hold() -> None:
    a = stream(440, 25) + stream(440, 50, seq0=1025, ts0=50_000 - 80_000, t0_ns=500 * MS)
    c = _core.Recorder(channels=2)
    out = run(c, [(t, 0, d) for t, d in a], end_ns=1600 * MS)
    assert len(channel(out, 0)) == 1600 * 8
    leg = c.stats()["legs"][0]
    assert leg["reanchors"] == 1 and leg["late"] <= 11


def test_ssrc_change_starts_a_new_timeline() -> None:
    a = stream(440, 25, ssrc=1) + stream(440, 25, ssrc=2, seq0=7, ts0=99, t0_ns=500 * MS)
    c = _core.Recorder(channels=2)
    out = run(c, [(t, 0, d) for t, d in a], end_ns=1000 * MS)
    assert channel(out, 0)[: 50 * 160] == decoded([d for _, d in a])
    ev = c.events()
    assert ("ssrc_change", 0, 0, 2) in ev
    assert c.stats()["legs"][0]["ssrc"] == 2


def test_dtmf_reported_once_and_not_written() -> None:
    a = stream(440, 10)
    t, seq, ts = 200 * MS, 1010, 50_000 + 1600
    for i in range(5):  # digit '5', 100 ms, end packet sent three times (RFC 4733 section 2.5.1.4)
        end = i >= 3
        payload = bytes([5, 0x80 if end else 0]) + (min(i + 1, 4) * 160).to_bytes(2, "big")
        a.append((t + i * 20 * MS, ref.build_rtp(101, seq + i, ts, 0x1234, payload)))
    a.append((t + 100 * MS, ref.build_rtp(101, seq + 5, ts, 0x1234, bytes([5, 0x80, 2, 128]))))
    c = _core.Recorder(channels=2)
    out = run(c, [(t, 0, d) for t, d in a], end_ns=400 * MS)
    assert [e for e in c.events() if e[0] == "dtmf"] == [("dtmf", 0, 0, ("5", 80))]
    assert c.stats()["legs"][0]["dtmf"] == "5"
    assert set(channel(out, 0)[1600:]) == {0}


def test_mono_mix_saturates() -> None:
    loud = bytes([0x00]) * 160  # u-law 0x00 = -32124
    a = [(i * 20 * MS, ref.build_rtp(0, i, i * 160, 1, loud)) for i in range(5)]
    b = [(i * 20 * MS, ref.build_rtp(0, i, i * 160, 2, loud)) for i in range(5)]
    c = _core.Recorder(channels=1)
    out = pcm(run(c, [(t, 0, d) for t, d in a] + [(t, 1, d) for t, d in b], end_ns=100 * MS))
    assert len(out) == 800 and set(out) == {-32768}


def test_pause_is_silence() -> None:
    a = stream(440, 50)
    c = _core.Recorder(channels=2, reorder_ms=60)
    out = bytearray()
    for t, d in a:
        if t == 400 * MS:
            c.set_recording(False, t)
        if t == 600 * MS:
            c.set_recording(True, t)
        c.feed(0, t, d)
        out += c.tick(t)
    out += c.flush(1000 * MS)
    left = channel(bytes(out), 0)
    assert set(left[3200:4800]) == {0}
    assert left[4800:8000] == decoded([d for _, d in a])[4800:8000]


def test_tone_frequencies_survive() -> None:
    a = stream(440, 50)
    c = _core.Recorder(channels=2)
    out = channel(run(c, [(t, 0, d) for t, d in a], end_ns=1000 * MS), 0)
    want = tone(440, 8000)
    assert max(abs(x - y) for x, y in zip(out, want, strict=True)) < 300


def test_sequence_restart_after_silence_is_a_new_segment() -> None:
    # A sender that resumes after a hold by replaying from its first sequence number and timestamp
    # (SIPp's play_pcap_audio does exactly this): not duplicates, but audio placed where it arrives.
    first = stream(440, 25)
    again = stream(440, 25, t0_ns=2500 * MS)  # same SSRC, seq and timestamps as `first`
    for rec in both():
        out = run(rec, [(t, 0, d) for t, d in first + again], end_ns=3100 * MS)
        left = channel(out, 0)
        assert left[: 25 * 160] == decoded([d for _, d in first])
        assert left[25 * 160 : 20000] == [0] * (20000 - 25 * 160)  # the hold: silence
        assert left[20000 : 20000 + 25 * 160] == decoded([d for _, d in again])  # at 2.5 s
        leg = rec.stats()["legs"][0]
        assert leg["duplicates"] == 0 and leg["late"] == 0 and leg["lost"] == 0, leg
        assert leg["gap_total_ms"] == 2000.0 and leg["longest_gap_ms"] == 2000.0, leg


def test_duplicates_soon_after_are_still_duplicates() -> None:
    a = stream(440, 25)
    dup = [(t + 300 * MS, d) for t, d in a[10:15]]  # the same packets again 0.3 s later
    for rec in both():
        out = run(rec, [(t, 0, d) for t, d in a + dup], end_ns=1000 * MS)
        assert channel(out, 0)[: 25 * 160] == decoded([d for _, d in a])
        assert rec.stats()["legs"][0]["duplicates"] == 5

"""Test helpers: G.711 RTP streams with send times, and feeding them to recorders."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Protocol

from . import reference as ref

MS = 1_000_000  # ns


def tone(freq: float, n: int, start: int = 0, amp: float = 8000.0) -> list[int]:
    return [int(amp * math.sin(2 * math.pi * freq * (start + i) / ref.RATE)) for i in range(n)]


def ulaw(samples: Iterable[int]) -> bytes:
    return bytes(ref.ulaw_encode(s) for s in samples)


def stream(
    freq: float,
    count: int,
    *,
    ssrc: int = 0x1234,
    seq0: int = 1000,
    ts0: int = 50_000,
    t0_ns: int = 0,
    pt: int = 0,
    ptime_ms: int = 20,
) -> list[tuple[int, bytes]]:
    """(send time ns, datagram) for count packets of a tone."""
    n = 8 * ptime_ms
    out = []
    for i in range(count):
        pcm = tone(freq, n, i * n)
        payload = ulaw(pcm) if pt == 0 else bytes(ref.alaw_encode(s) for s in pcm)
        out.append((t0_ns + i * ptime_ms * MS, ref.build_rtp(pt, seq0 + i, ts0 + i * n, ssrc, payload)))
    return out


class RecorderLike(Protocol):
    def feed(self, leg: int, now: int, data: bytes, /) -> bool: ...
    def tick(self, now: int, /) -> bytes: ...
    def flush(self, now: int, /) -> bytes: ...
    def stats(self) -> dict[str, Any]: ...


def run(
    rec: RecorderLike,
    arrivals: list[tuple[int, int, bytes]],
    end_ns: int,
    tick_ns: int = 20 * MS,
    tick0: int = 0,
) -> bytes:
    """Feed (arrival ns, leg, datagram) in arrival order with ticks every tick_ns; flush at end_ns."""
    out = bytearray()
    arrivals = sorted(arrivals, key=lambda a: a[0])
    next_tick = tick0
    for t, leg, data in arrivals:
        while next_tick <= t:
            out += rec.tick(next_tick)
            next_tick += tick_ns
        rec.feed(leg, t, data)
    while next_tick <= end_ns:
        out += rec.tick(next_tick)
        next_tick += tick_ns
    out += rec.flush(end_ns)
    return bytes(out)

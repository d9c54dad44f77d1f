"""A small pure-Python reference of rtp_core's C code, for the tests to compare against.

It mirrors rtp_core/codec.c (RTP parsing, G.711 decode) and rtp_core/recorder.c (sequence tracking,
timeline placement, gap fill, mix, statistics) rule for rule, trading speed for obviousness: the ring
of samples is a dict keyed by timeline position, the output a list.  A test feeds the same datagrams
with the same arrival times to both and expects identical bytes, events and statistics.
"""

from __future__ import annotations

import struct
from array import array
from dataclasses import dataclass, field
from typing import Any

RATE = 8000
NS_PER_SAMPLE = 1_000_000_000 // RATE
SEQWIN = 512
MAX_DROPOUT = 3000
JUMP = 480  # 60 ms
HOLD = 1600  # 200 ms
FAR = 2400  # 300 ms
RESTART_IDLE = 8000  # 1 s: a backward/far sequence jump after this much silence is a restart
CHUNK = 1024

PCMU, PCMA, CN, TE, OTHER = 1, 2, 3, 4, 5
CODEC_NAMES = {PCMU: "PCMU", PCMA: "PCMA", CN: "CN", TE: "telephone-event"}
DTMF_CHARS = "0123456789*#ABCD!"


# ---- G.711 (ITU-T G.711) ------------------------------------------------------------------------


def ulaw_to_linear(u: int) -> int:
    u = ~u & 0xFF
    t = ((u & 0x0F) << 3) + 0x84
    t <<= (u & 0x70) >> 4
    return 0x84 - t if u & 0x80 else t - 0x84


def alaw_to_linear(a: int) -> int:
    a ^= 0x55
    t = (a & 0x0F) << 4
    seg = (a & 0x70) >> 4
    if seg == 0:
        t += 8
    elif seg == 1:
        t += 0x108
    else:
        t = (t + 0x108) << (seg - 1)
    return t if a & 0x80 else -t


ULAW = [ulaw_to_linear(i) for i in range(256)]
ALAW = [alaw_to_linear(i) for i in range(256)]


def ulaw_decode(data: bytes) -> bytes:
    return array("h", (ULAW[b] for b in data)).tobytes()


def alaw_decode(data: bytes) -> bytes:
    return array("h", (ALAW[b] for b in data)).tobytes()


def ulaw_encode(sample: int) -> int:
    """Linear s16 -> u-law (the usual G.711 encoder; only the tests need it)."""
    bias, clip = 0x84, 32635
    sign = 0x80 if sample < 0 else 0
    if sample < 0:
        sample = -sample
    sample = min(sample, clip) + bias
    exponent = 7
    mask = 0x4000
    while exponent > 0 and not sample & mask:
        exponent -= 1
        mask >>= 1
    mantissa = (sample >> (exponent + 3)) & 0x0F
    return ~(sign | (exponent << 4) | mantissa) & 0xFF


def alaw_encode(sample: int) -> int:
    sign = 0x80 if sample >= 0 else 0
    if sample < 0:
        sample = -sample - 1
    sample = min(sample, 32767) >> 3
    if sample < 32:
        code = sample >> 1
    else:
        seg = 1
        while sample >= 64 and seg < 7:
            sample >>= 1
            seg += 1
        code = (seg << 4) | ((sample >> 1) & 0x0F)
    return (sign | code) ^ 0x55


# ---- RTP (RFC 3550 section 5.1) -----------------------------------------------------------------


def parse_rtp(data: bytes) -> tuple[int, int, int, int, int, bytes] | None:
    """(marker, pt, seq, ts, ssrc, payload), or None when the datagram is not valid RTP."""
    n = len(data)
    if n < 12 or data[0] >> 6 != 2:
        return None
    padding, extension, cc = (data[0] >> 5) & 1, (data[0] >> 4) & 1, data[0] & 0x0F
    marker, pt = data[1] >> 7, data[1] & 0x7F
    if 72 <= pt <= 76:  # RTCP multiplexed on the RTP port (RFC 5761 section 4)
        return None
    seq, ts, ssrc = struct.unpack_from("!HII", data, 2)
    hdr = 12 + 4 * cc
    if hdr > n:
        return None
    if extension:
        if hdr + 4 > n:
            return None
        hdr += 4 + 4 * int.from_bytes(data[hdr + 2 : hdr + 4], "big")
        if hdr > n:
            return None
    pad = 0
    if padding:
        pad = data[-1]
        if pad == 0 or hdr + pad > n:
            return None
    return marker, pt, seq, ts, ssrc, bytes(data[hdr : n - pad])


def build_rtp(pt: int, seq: int, ts: int, ssrc: int, payload: bytes, marker: int = 0) -> bytes:
    return struct.pack("!BBHII", 0x80, (marker << 7) | pt, seq & 0xFFFF, ts & 0xFFFFFFFF, ssrc) + payload


def s32(x: int) -> int:
    x &= 0xFFFFFFFF
    return x - (1 << 32) if x & 0x80000000 else x


def s16(x: int) -> int:
    x &= 0xFFFF
    return x - (1 << 16) if x & 0x8000 else x


# ---- recorder -----------------------------------------------------------------------------------


def default_ptmap() -> dict[int, int]:
    return {0: PCMU, 8: PCMA, 13: CN, 101: TE}


def codec_kind(name: str) -> int:
    for kind, n in CODEC_NAMES.items():
        if n.lower() == name.lower():
            return kind
    return OTHER


@dataclass
class Leg:
    started: bool = False
    stream: bool = False
    ssrc: int = 0
    ext_max: int = 0
    base_ext: int = 0
    max_seq: int = 0
    bad_seq: int = -1
    seg_received: int = 0
    seen: list[bool] = field(default_factory=lambda: [False] * SEQWIN)
    ts_last: int = 0
    last_arr: int = 0
    ts_ext_last: int = 0
    anchored: bool = False
    anchor_pos: int = 0
    anchor_ts: int = 0
    drift: int = 0
    drift_since: int = 0
    jit_init: bool = False
    last_transit: int = 0
    jitter: float = 0.0
    ev_active: bool = False
    ev_done: bool = False
    ev_code: int = 0
    ev_dur: int = 0
    ev_ts: int = 0
    dtmf: str = ""
    ring: dict[int, int] = field(default_factory=dict)
    max_end: int = 0
    audio_seen: bool = False
    gap_start: int = -1
    packets: int = 0
    bytes: int = 0
    lost_acc: int = 0
    late: int = 0
    duplicates: int = 0
    reordered: int = 0
    invalid: int = 0
    undecoded: int = 0
    reanchors: int = 0
    gap_total: int = 0
    gap_longest: int = 0
    codec: int = 0
    ptmap: dict[int, int] = field(default_factory=default_ptmap)

    def seg_lost(self) -> int:
        if not self.stream or self.seg_received == 0:
            return 0
        return max(0, self.ext_max - self.base_ext + 1 - self.seg_received)


class Recorder:
    """Mirror of rc_rec_t: Recorder(channels=2, reorder_ms=100, audio=True)."""

    def __init__(self, *, channels: int = 2, reorder_ms: int = 100, audio: bool = True) -> None:
        self.channels = channels
        self.audio = audio
        self.reorder = reorder_ms * RATE // 1000
        self.ring_size = 64
        while self.ring_size < self.reorder + 4096:
            self.ring_size <<= 1
        self.started = False
        self.t0 = 0
        self.emitted = 0
        self.paused = False
        self.pause_from = 0
        self.pause_to = 0
        self.legs = [Leg(), Leg()]
        self._events: list[tuple[str, int, int, object]] = []
        self._out: list[int] = []

    # -- control

    def set_payload_types(self, leg: int, mapping: dict[int, str]) -> None:
        m = default_ptmap()
        m.update({pt: codec_kind(name) for pt, name in mapping.items()})
        self.legs[leg].ptmap = m

    def set_recording(self, enabled: bool, now: int) -> None:
        p = max(self._pos(now), 0) if self.started else 0
        if not enabled and not self.paused:
            self.paused = True
            if not (self.pause_to > self.emitted and self.pause_to > self.pause_from):
                self.pause_from = p
        elif enabled and self.paused:
            self.paused = False
            self.pause_to = p

    def events(self) -> list[tuple[str, int, int, object]]:
        ev, self._events = self._events, []
        return ev

    def _pos(self, now: int) -> int:
        return (now - self.t0) // NS_PER_SAMPLE

    # -- packets

    def feed(self, li: int, now: int, data: bytes) -> bool:
        p = parse_rtp(data)
        L = self.legs[li]
        if p is None:
            L.invalid += 1
            return False
        _marker, pt, seq, ts, ssrc, payload = p
        kind = L.ptmap.get(pt, 0)
        L.packets += 1
        L.bytes += len(payload)
        if not self.started:
            self.started = True
            self.t0 = now
        arr = self._pos(now)
        if not L.started:
            L.started = True
            self._events.append(("started", 0, li, ("0.0.0.0", 0, ssrc)))
        if not L.stream:
            self._new_stream(li, seq, ts, ssrc)
        elif ssrc != L.ssrc:
            self._new_stream(li, seq, ts, ssrc)
            self._events.append(("ssrc_change", 0, li, ssrc))

        newest = restart = False
        if L.seg_received == 0:
            ext = L.ext_max
            newest = True
        else:
            delta = s16(seq - L.max_seq)
            idle = arr - L.last_arr > RESTART_IDLE
            if 0 < delta < MAX_DROPOUT:
                ext = L.ext_max + delta
                if delta >= SEQWIN:
                    L.seen = [False] * SEQWIN
                else:
                    for e in range(L.ext_max + 1, ext):
                        L.seen[e % SEQWIN] = False
                newest = True
            elif idle:  # a sender that restarted its sequence after a silence
                L.lost_acc += L.seg_lost()
                L.ext_max = L.base_ext = seq
                L.max_seq = seq
                L.seg_received = 0
                L.bad_seq = -1
                L.seen = [False] * SEQWIN
                ext = L.ext_max
                newest = restart = True
            elif -SEQWIN < delta <= 0:
                ext = L.ext_max + delta
                if L.seen[ext % SEQWIN]:
                    L.duplicates += 1
                    return True
            elif seq == L.bad_seq:
                L.lost_acc += L.seg_lost()
                L.ext_max = L.base_ext = seq
                L.max_seq = seq
                L.seg_received = 0
                L.bad_seq = -1
                L.seen = [False] * SEQWIN
                ext = L.ext_max
                newest = True
            else:
                L.bad_seq = (seq + 1) & 0xFFFF
                L.late += 1
                return True
        ts_ext = L.ts_ext_last + s32(ts - L.ts_last)
        L.seen[ext % SEQWIN] = True
        L.last_arr = max(L.last_arr, arr)
        L.seg_received += 1
        L.base_ext = min(L.base_ext, ext)
        if newest:
            L.ext_max, L.max_seq, L.bad_seq = ext, seq, -1
            L.ts_last, L.ts_ext_last = ts, ts_ext

        if kind == TE:
            self._dtmf_packet(li, ts, payload)
            if not newest:
                L.reordered += 1
            return True
        if kind in (PCMU, PCMA, CN):
            transit = arr - ts_ext
            if L.jit_init:
                d = abs(transit - L.last_transit)
                L.jitter += (float(d) - L.jitter) / 16.0
            L.last_transit = transit
            L.jit_init = True
            if not L.anchored or restart:
                L.anchored, L.anchor_pos, L.anchor_ts, L.drift = True, arr, ts_ext, 0
            elif newest:
                d = arr - (L.anchor_pos + (ts_ext - L.anchor_ts))
                direction = -1 if d < -JUMP else 1 if d > JUMP else 0
                re = False
                if d < -FAR:
                    re = True
                elif direction == 0:
                    L.drift = 0
                elif L.drift != direction:
                    L.drift, L.drift_since = direction, arr
                elif arr - L.drift_since >= HOLD:
                    re = True
                if re:
                    L.anchor_pos, L.anchor_ts, L.drift = arr, ts_ext, 0
                    L.reanchors += 1
        if kind in (PCMU, PCMA):
            L.codec = kind
            if self.audio:
                pos = L.anchor_pos + (ts_ext - L.anchor_ts)
                if not self._place(L, kind, pos, payload):
                    return True
        elif kind != CN:
            L.undecoded += 1
        if not newest:
            L.reordered += 1
        return True

    def _new_stream(self, li: int, seq: int, ts: int, ssrc: int) -> None:
        L = self.legs[li]
        if L.stream:
            if L.ev_active and not L.ev_done:
                self._dtmf_report(li)
            L.lost_acc += L.seg_lost()
        L.stream, L.ssrc, L.seg_received = True, ssrc, 0
        L.ext_max = L.base_ext = seq
        L.max_seq, L.bad_seq = seq, -1
        L.seen = [False] * SEQWIN
        L.ts_last, L.ts_ext_last = ts, ts
        L.anchored = L.jit_init = L.ev_active = False
        L.drift = 0

    def _place(self, L: Leg, kind: int, pos: int, payload: bytes) -> bool:
        table = ULAW if kind == PCMU else ALAW
        start, end, off = pos, pos + len(payload), 0
        if start < self.emitted:
            off = self.emitted - start
            start = self.emitted
        end = min(end, self.emitted + self.ring_size)
        if end <= start:
            L.late += 1
            return False
        for q in range(start, end):
            L.ring[q] = table[payload[off + q - start]]
        L.max_end = max(L.max_end, end)
        return True

    def _dtmf_report(self, li: int) -> None:
        L = self.legs[li]
        L.ev_done = True
        if not 0 <= L.ev_code <= 16:
            return
        digit = DTMF_CHARS[L.ev_code]
        if len(L.dtmf) < 255:
            L.dtmf += digit
        self._events.append(("dtmf", 0, li, (digit, L.ev_dur // 8)))

    def _dtmf_packet(self, li: int, ts: int, payload: bytes) -> None:
        L = self.legs[li]
        if len(payload) < 4:
            L.undecoded += 1
            return
        code, end, dur = payload[0], payload[1] >> 7, (payload[2] << 8) | payload[3]
        if L.ev_active and ts == L.ev_ts:
            if not L.ev_done:
                L.ev_dur = max(L.ev_dur, dur)
                if end:
                    self._dtmf_report(li)
            return
        if L.ev_active and s32(ts - L.ev_ts) < 0:
            return
        if L.ev_active and not L.ev_done:
            self._dtmf_report(li)
        L.ev_active, L.ev_done, L.ev_ts, L.ev_code, L.ev_dur = True, False, ts, code, dur
        if end:
            self._dtmf_report(li)

    # -- output

    def _emit(self, upto: int) -> None:
        end_pause = (1 << 62) if self.paused else self.pause_to
        out = self._out
        for pos in range(self.emitted, max(upto, self.emitted)):
            vals = []
            for L in self.legs:
                present = pos in L.ring
                if present:
                    if L.gap_start >= 0:
                        g = pos - L.gap_start
                        L.gap_total += g
                        L.gap_longest = max(L.gap_longest, g)
                        L.gap_start = -1
                    L.audio_seen = True
                elif L.audio_seen and L.gap_start < 0:
                    L.gap_start = pos
                vals.append(L.ring.pop(pos, 0))
            if self.pause_from <= pos < end_pause:
                vals = [0, 0]
            if self.channels == 2:
                out.extend(vals)
            else:
                out.append(max(-32768, min(32767, vals[0] + vals[1])))
        self.emitted = max(self.emitted, upto)

    def _take(self) -> bytes:
        b = array("h", self._out).tobytes()
        self._out = []
        return b

    def tick(self, now: int) -> bytes:
        if self.started and self.audio:
            self._emit(self._pos(now) - self.reorder)
        return self._take()

    def flush(self, now: int) -> bytes:
        for li, L in enumerate(self.legs):
            if L.ev_active and not L.ev_done:
                self._dtmf_report(li)
        if self.started and self.audio:
            self._emit(max(self._pos(now), *(L.max_end for L in self.legs)))
        return self._take()

    # -- statistics

    def stats(self) -> dict[str, Any]:
        legs = []
        for L in self.legs:
            legs.append(
                {
                    "ssrc": L.ssrc if L.stream else None,
                    "packets": L.packets,
                    "bytes": L.bytes,
                    "lost": L.lost_acc + L.seg_lost(),
                    "late": L.late,
                    "duplicates": L.duplicates,
                    "reordered": L.reordered,
                    "jitter_ms": L.jitter / 8.0,
                    "gap_total_ms": L.gap_total / 8.0,
                    "longest_gap_ms": L.gap_longest / 8.0,
                    "invalid": L.invalid,
                    "codec": CODEC_NAMES.get(L.codec) if L.codec else None,
                    "dtmf": L.dtmf,
                    "undecoded": L.undecoded,
                    "reanchors": L.reanchors,
                }
            )
        return {
            "duration": self.emitted / RATE,
            "samples": self.emitted,
            "channels": self.channels,
            "legs": legs,
        }


# ---- the packet ring's IPv4 / UDP check (rtp_core/packet.c) ----------------------------------------


def ones_complement_sum(data: bytes) -> int:
    """RFC 1071: the 16-bit one's complement sum (0xFFFF for a valid checksummed block)."""
    if len(data) % 2:
        data += b"\x00"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def parse_ipv4_udp(pkt: bytes, csum_known: bool = False) -> tuple[int, int] | str:
    """(UDP offset, UDP length) of a whole, valid unfragmented IPv4 UDP datagram; else why not."""
    if len(pkt) < 28 or pkt[0] >> 4 != 4:
        return "invalid"
    ihl = (pkt[0] & 0x0F) * 4
    total = int.from_bytes(pkt[2:4], "big")
    frag = int.from_bytes(pkt[6:8], "big") & 0x3FFF
    if ihl < 20 or total < ihl + 8 or total > len(pkt) or pkt[9] != 17 or frag:
        return "invalid"
    if ones_complement_sum(pkt[:ihl]) != 0xFFFF:
        return "invalid"
    ulen = int.from_bytes(pkt[ihl + 4 : ihl + 6], "big")
    if ulen < 8 or ulen > total - ihl:
        return "invalid"
    udp = pkt[ihl : ihl + ulen]
    if not csum_known and udp[6:8] != b"\x00\x00":
        pseudo = pkt[12:20] + bytes([0, 17]) + ulen.to_bytes(2, "big")
        if ones_complement_sum(pseudo + udp) != 0xFFFF:
            return "udp checksum"
    return ihl, ulen


def build_ipv4_udp(
    src: tuple[str, int], dst: tuple[str, int], payload: bytes, *, options: bytes = b"", udp_csum: bool = True
) -> bytes:
    """An IPv4 UDP datagram with correct header and (optionally) UDP checksums."""
    import socket

    ihl = 20 + len(options)
    ulen = 8 + len(payload)
    s_ip, d_ip = socket.inet_aton(src[0]), socket.inet_aton(dst[0])
    udp = struct.pack("!HHHH", src[1], dst[1], ulen, 0) + payload
    if udp_csum:
        c = 0xFFFF - ones_complement_sum(s_ip + d_ip + bytes([0, 17]) + ulen.to_bytes(2, "big") + udp)
        udp = udp[:6] + (c or 0xFFFF).to_bytes(2, "big") + udp[8:]
    hdr = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl // 4, 0, ihl + ulen, 0x1234, 0x4000, 64, 17, 0, s_ip, d_ip)
    hdr += options
    c = 0xFFFF - ones_complement_sum(hdr)
    return hdr[:10] + c.to_bytes(2, "big") + hdr[12:] + udp

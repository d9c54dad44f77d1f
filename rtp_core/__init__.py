"""rtp_core: the C media engine of the MCP, behind a typed facade.

The engine owns the RTP/RTCP sockets of every session in native threads (epoll + recvmmsg/sendmmsg,
GIL released), relays packets between the two legs of a bridge and records both directions into a
WAV file (reorder buffer, G.711 decode, gap fill to wall-clock time, stereo or mono mix).  Python
opens and closes sessions and reads events; no Python code runs per packet.  See docs/RTP_CORE.md.

    engine = Engine(bind_ip="127.0.0.1", port_min=20000, port_max=29999)
    loop.add_reader(engine.fileno(), on_events)       # on_events calls engine.poll_events()
    sid = engine.open_session(output_path="/spool/x.wav.part", channels=2, reorder_ms=100)
    caller_port = engine.add_leg(sid, 0)
    callee_port = engine.add_leg(sid, 1)
    engine.set_remote(sid, 0, "192.0.2.10", 4000)
    ...
    stats = engine.close_session(sid)
"""

from __future__ import annotations

from typing import Literal, TypeAlias

from rtp_core._core import Engine, Recorder, alaw_decode, parse_rtp, ulaw_decode

__all__ = [
    "CALLEE",
    "CALLER",
    "RATE",
    "Engine",
    "Event",
    "EventKind",
    "Recorder",
    "alaw_decode",
    "parse_rtp",
    "ulaw_decode",
]

#: leg numbers: the caller is the left channel, the callee the right one
CALLER = 0
CALLEE = 1
#: sample rate of every recording
RATE = 8000

EventKind: TypeAlias = Literal["started", "ssrc_change", "dtmf", "timeout"]
#: (kind, session, leg, payload):
#:   "started"     payload (ip, port, ssrc): first RTP packet on a leg
#:   "ssrc_change" payload ssrc: a new RTP stream on a leg
#:   "dtmf"        payload (digit, duration_ms): an RFC 4733 event ended
#:   "timeout"     payload None, leg -1: no RTP on any leg for timeout_s
Event: TypeAlias = tuple[str, int, int, object]

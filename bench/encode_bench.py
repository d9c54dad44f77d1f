"""Encode throughput per core, in x realtime, of every recording format.

- wav: rtp_core's own path from packets to file: two legs of G.711 (PCMU, 20 ms packets) fed to the
  recorder (sequence tracking, placement, decode, gap scan, stereo interleave or mono mix) and the
  PCM written to a file, i.e. everything the engine does per recorded call except the sockets;
- mp3, opus, flac: services/mcp/transcode.py encoding that WAV (what the MCP does once per
  recording, in a worker thread, when the IVR Profile asks for the format).

x realtime = seconds of audio / CPU seconds of the encoding thread (time.thread_time), so "300x"
means one core keeps up with 300 calls being recorded in that format. Medians of --repeat runs.
The audio is synthetic speech-like (harmonics of a wandering pitch under a syllable envelope, with
pauses), the same for every format.

    .venv/bin/python bench/encode_bench.py [--seconds 60] [--repeat 3] [--cpu 0]

Ends with one `name: value` line per figure (encode_<format>_<stereo|mono>_x_realtime).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import struct
import sys
import tempfile
import time
import wave
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchlib import machine  # noqa: E402

import rtp_core  # noqa: E402
from services.mcp.transcode import transcode  # noqa: E402

RATE = 8000
PTIME = 160  # samples per 20 ms packet


def speechlike(seconds: float, f0: float) -> list[int]:
    out = []
    phase = 0.0
    for i in range(int(seconds * RATE)):
        t = i / RATE
        phase += 2 * math.pi * f0 * (1 + 0.1 * math.sin(2 * math.pi * 0.5 * t)) / RATE
        env = max(0.0, math.sin(2 * math.pi * 3.1 * t)) * (math.sin(2 * math.pi * 0.3 * t) > -0.5)
        out.append(int(5000 * env * sum(math.sin(k * phase) / k for k in range(1, 8))))
    return out


def ulaw(sample: int) -> int:
    sign = 0x80 if sample < 0 else 0
    s = min(abs(sample), 32635) + 0x84
    exp = 7
    mask = 0x4000
    while exp > 0 and not s & mask:
        exp -= 1
        mask >>= 1
    return ~(sign | (exp << 4) | ((s >> (exp + 3)) & 0x0F)) & 0xFF


def packets(samples: list[int], ssrc: int) -> list[bytes]:
    table = bytes(ulaw(s) for s in samples)
    return [
        struct.pack("!BBHII", 0x80, 0, (1000 + i) & 0xFFFF, (i * PTIME) & 0xFFFFFFFF, ssrc)
        + table[i * PTIME : (i + 1) * PTIME]
        for i in range(len(samples) // PTIME)
    ]


def wav_run(legs: list[list[bytes]], channels: int, out: Path) -> float:
    """CPU seconds for rtp_core's recorder to turn both legs' packets into a WAV file."""
    rec = rtp_core.Recorder(channels=channels, reorder_ms=100)
    t0 = time.thread_time()
    with open(out, "wb") as f:
        f.write(b"\0" * 44)
        now = 0
        for i in range(len(legs[0])):
            now = i * 20_000_000
            rec.feed(0, now, legs[0][i])
            rec.feed(1, now + 7_000_000, legs[1][i])
            f.write(rec.tick(now + 19_000_000))
        f.write(rec.flush(now + 20_000_000))
    return time.thread_time() - t0


def write_wav(path: Path, channels: list[list[int]]) -> None:
    frames = bytearray()
    for pair in zip(*channels, strict=True):
        for s in pair:
            frames += struct.pack("<h", s)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(len(channels))
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes(bytes(frames))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=60.0, help="audio per run")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--cpu", type=int, default=None, help="pin to this CPU")
    args = p.parse_args()
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    import av

    print(f"machine: {machine()}; PyAV {av.__version__}")
    left, right = speechlike(args.seconds, 140), speechlike(args.seconds, 220)
    legs = [packets(left, 1), packets(right, 2)]
    seconds = len(legs[0]) * PTIME / RATE
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        for channels, label in ((2, "stereo"), (1, "mono")):
            src = d / f"{label}.wav"
            runs = [seconds / wav_run(legs, channels, src) for _ in range(args.repeat)]
            results[f"wav_{label}"] = statistics.median(runs)
            print(
                f"wav  {label:6} {seconds:.0f} s: {statistics.median(runs):8.0f}x  (runs {', '.join(f'{r:.0f}' for r in runs)})"
            )
            if channels == 2:
                write_wav(src, [left[: int(seconds * RATE)], right[: int(seconds * RATE)]])
            else:
                write_wav(
                    src, [[(a + b) // 2 for a, b in zip(left, right, strict=False)][: int(seconds * RATE)]]
                )
            for fmt in ("mp3", "opus", "flac"):
                runs = []
                size = 0
                for _ in range(args.repeat):
                    t0 = time.thread_time()
                    out = transcode(src, fmt, channels)
                    runs.append(seconds / (time.thread_time() - t0))
                    size = out.stat().st_size
                med = statistics.median(runs)
                results[f"{fmt}_{label}"] = med
                print(
                    f"{fmt:4} {label:6} {seconds:.0f} s: {med:8.0f}x  (runs {', '.join(f'{r:.0f}' for r in runs)}),"
                    f" {size * 8 / seconds / 1000:.1f} kbit/s"
                )
    for name, value in results.items():
        fmt, label = name.split("_")
        print(f"encode_{fmt}_{label}_x_realtime: {value:.0f}")


if __name__ == "__main__":
    main()

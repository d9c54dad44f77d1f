"""Compressed recording formats: MP3, Opus (in Ogg) and FLAC from rtp_core's WAV, through PyAV.

rtp_core writes every recording as a 16-bit PCM WAV (8 kHz, the profile's channels). When an IVR
Profile asks for another format, the MCP encodes the finished WAV once, before storing it, with
FFmpeg's encoders (libmp3lame, libopus, flac) as PyAV binds them. The PCM is fed in batches of a
few seconds (:data:`BATCH_SECONDS`), never as 20 ms frames, so the work stays in C (PyAV releases
the GIL while encoding); the functions here block, so the MCP runs them in a worker thread
(``asyncio.to_thread``) and the event loop never waits for an encoder.

    out = transcode(Path("call.wav"), "mp3", 2)          # -> call.mp3 beside the WAV
    transcode_part(spool / "<id>.wav.part", "opus", 2)  # the spool's crash-safe in-place step
"""

from __future__ import annotations

import contextlib
import logging
import os
import wave
from dataclasses import dataclass, field
from pathlib import Path

import av

log = logging.getLogger(__name__)

#: every format an IVR Profile may ask for ("wav" is rtp_core's own output, no encoding)
FORMATS = ("wav", "mp3", "opus", "flac")
#: seconds of PCM per encode call
BATCH_SECONDS = 4


@dataclass(frozen=True)
class _Spec:
    container: str
    codec: str
    bit_rate_per_channel: int | None
    options: dict[str, str] = field(default_factory=dict)


_SPECS = {
    # LAME quality 7 ("-q 7"): about twice as fast as the default 3, no audible loss for 8 kHz speech
    "mp3": _Spec("mp3", "libmp3lame", 16_000, {"compression_level": "7"}),
    "opus": _Spec("ogg", "libopus", 16_000),
    "flac": _Spec("flac", "flac", None),
}


class TranscodeError(ValueError):
    """The input is not a WAV this module can encode, or the format is unknown."""


def transcode(wav_path: Path, fmt: str, channels: int | None = None, *, out_path: Path | None = None) -> Path:
    """Encode the 16-bit PCM WAV ``wav_path`` as ``fmt`` ("mp3", "opus" or "flac"); blocking.

    ``channels`` (1 or 2) is the output's channel count; None keeps the WAV's (2 -> 1 mixes down).
    The output goes to ``out_path`` (default: ``wav_path`` with the format as its suffix) through a
    temporary file that replaces it only when complete. Returns the output path.
    """
    spec = _SPECS.get(fmt)
    if spec is None:
        raise TranscodeError(f"format must be one of {', '.join(_SPECS)}, not {fmt!r}")
    if channels not in (None, 1, 2):
        raise TranscodeError(f"channels must be 1 or 2, not {channels!r}")
    wav_path = Path(wav_path)
    out = Path(out_path) if out_path is not None else wav_path.with_suffix(f".{fmt}")
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        with wave.open(str(wav_path), "rb") as w:
            if w.getsampwidth() != 2 or w.getnchannels() not in (1, 2):
                raise TranscodeError(
                    f"{wav_path}: not 16-bit mono/stereo PCM "
                    f"({w.getsampwidth() * 8} bits, {w.getnchannels()} channels)"
                )
            _encode(w, spec, channels or w.getnchannels(), tmp)
        with open(tmp, "rb") as f:  # complete on disk before it replaces anything
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except (wave.Error, EOFError) as exc:
        raise TranscodeError(f"{wav_path}: not a readable WAV file: {exc}") from exc
    except av.FFmpegError as exc:
        raise TranscodeError(f"{wav_path}: {fmt} encoding failed: {exc}") from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return out


def _encode(w: wave.Wave_read, spec: _Spec, channels: int, dest: Path) -> None:
    rate, in_channels = w.getframerate(), w.getnchannels()
    in_layout = "stereo" if in_channels == 2 else "mono"
    layout = "stereo" if channels == 2 else "mono"
    batch = rate * BATCH_SECONDS
    with av.open(str(dest), "w", format=spec.container) as container:
        stream = container.add_stream(spec.codec, rate=rate, layout=layout)
        assert isinstance(stream, av.audio.stream.AudioStream)
        ctx = stream.codec_context
        if spec.bit_rate_per_channel:
            ctx.bit_rate = spec.bit_rate_per_channel * channels
        if spec.options:
            ctx.options = dict(spec.options)
        # the encoder's own sample format and frame size (planar s32 for LAME, 960 for Opus ...)
        formats = ctx.codec.audio_formats
        if not formats:
            raise TranscodeError(f"{spec.codec} names no sample format")
        resampler = av.AudioResampler(format=formats[0].name, layout=layout, rate=rate)
        pts = 0
        while data := w.readframes(batch):
            n = len(data) // (2 * in_channels)
            frame = av.AudioFrame(format="s16", layout=in_layout, samples=n)
            frame.planes[0].update(data[: n * 2 * in_channels])
            frame.sample_rate = rate
            frame.pts = pts
            pts += n
            for converted in resampler.resample(frame):
                container.mux(stream.encode(converted))
        for converted in resampler.resample(None):
            container.mux(stream.encode(converted))
        container.mux(stream.encode(None))


def transcode_part(part_path: Path, fmt: str, channels: int) -> Path:
    """The spool's in-place step (blocking): encode the WAV ``part_path`` as ``fmt`` and replace it.

    Crash-safe: until the atomic replace the part is the intact WAV (a restarted MCP encodes it
    again), afterwards it is the finished compressed file; a part that is no longer a RIFF WAV was
    encoded already and is left as it is. "wav" leaves the part unchanged. Returns ``part_path``.
    """
    part_path = Path(part_path)
    if fmt == "wav":
        return part_path
    with open(part_path, "rb") as f:
        head = f.read(12)
    if head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        log.info("%s is %s already", part_path.name, fmt)
        return part_path
    tmp = part_path.with_name(f".{part_path.name}.{fmt}")
    transcode(part_path, fmt, channels, out_path=tmp)
    try:
        os.replace(tmp, part_path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return part_path

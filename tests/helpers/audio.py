"""Test audio: speech WAVs (espeak-ng + sox), WAV reading, G.711 and pcap RTP decoding, alignment.

``best_lag(reference, recorded, rate, max_lag_s)`` finds where a reference (what a phone played)
appears in a recording and how well it matches: a normalised cross-correlation peak near 1 means the
same audio (G.711 coding noise keeps raw-sample peaks around 0.95-0.99), unrelated speech stays
well under 0.5. ``mode="envelope"`` compares 1 ms amplitude envelopes instead of samples, which
survives clock drift, packet-loss concealment and mixing better, at 1 ms resolution.

Traps: espeak-ng writes 22.05 kHz WAVs, so ``speech_wav`` resamples with sox; baresip's aufile source
hangs up the call at the end of the file, so pad the file with enough silence for the call to last.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import tempfile
import wave
from pathlib import Path

import numpy as np

__all__ = [
    "alaw_decode",
    "best_lag",
    "mono",
    "pcap_rtp_audio",
    "read_wav",
    "rms_dbfs",
    "silence_wav",
    "speech_wav",
    "tone_wav",
    "ulaw_decode",
    "write_wav",
]

PathLike = str | os.PathLike[str]


# -- making test audio ---------------------------------------------------------------------------


def speech_wav(
    path: PathLike,
    text: str,
    *,
    pad_s: float = 0.5,
    lead_s: float = 0.0,
    rate: int = 8000,
    voice: str | None = None,
    words_per_minute: int | None = None,
) -> Path:
    """Synthesise ``text`` to a mono 16-bit WAV at ``rate`` Hz, ``lead_s``/``pad_s`` of silence around it.

    espeak-ng renders at 22.05 kHz; sox converts (``-r 8000 -c 1 -b 16``) and pads (``pad LEAD PAD``);
    ``-D`` turns off sox's dither so the padding is digital silence.
    """
    for tool in ("espeak-ng", "sox"):
        if shutil.which(tool) is None:
            raise FileNotFoundError(f"{tool} is not installed (Debian packages espeak-ng and sox)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="speech-") as tmp:
        raw = Path(tmp) / "raw.wav"
        cmd = ["espeak-ng", "-w", str(raw)]
        if voice:
            cmd += ["-v", voice]
        if words_per_minute:
            cmd += ["-s", str(words_per_minute)]
        subprocess.run([*cmd, text], check=True, capture_output=True, timeout=30)
        subprocess.run(
            [
                "sox",
                "-D",
                str(raw),
                "-r",
                str(rate),
                "-c",
                "1",
                "-b",
                "16",
                str(path),
                "pad",
                f"{lead_s}",
                f"{pad_s}",
            ],
            check=True,
            capture_output=True,
            timeout=30,
        )
    return path


def write_wav(path: PathLike, rate: int, samples: np.ndarray) -> Path:
    """Write int16 samples, shaped (n,) or (n, channels), as a PCM WAV."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.asarray(samples)
    if data.dtype != np.int16:
        data = np.clip(np.round(data), -32768, 32767).astype(np.int16)
    channels = 1 if data.ndim == 1 else data.shape[1]
    with wave.open(str(path), "wb") as out:
        out.setnchannels(channels)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(data.astype("<i2").tobytes())
    return path


def silence_wav(path: PathLike, seconds: float, *, rate: int = 8000) -> Path:
    """A WAV of digital silence (e.g. to keep a baresip callee's aufile source from ending the call)."""
    return write_wav(path, rate, np.zeros(round(seconds * rate), dtype=np.int16))


def tone_wav(
    path: PathLike, seconds: float, freq: float = 440.0, *, rate: int = 8000, dbfs: float = -12.0
) -> Path:
    """A sine tone at ``dbfs`` peak level."""
    t = np.arange(round(seconds * rate)) / rate
    amplitude = 32767 * 10 ** (dbfs / 20)
    return write_wav(path, rate, amplitude * np.sin(2 * np.pi * freq * t))


# -- reading -------------------------------------------------------------------------------------

_PCM, _FLOAT, _ALAW, _ULAW, _EXTENSIBLE = 1, 3, 6, 7, 0xFFFE


def read_wav(path: PathLike) -> tuple[int, np.ndarray]:
    """``(rate, int16 array shaped (n, channels))`` from a WAV file.

    Reads PCM 8/16/24/32-bit, float, A-law and mu-law (G.711 WAVs), WAVE_FORMAT_EXTENSIBLE. A file
    whose header was never finalised (data size 0 or past the end: the writer is still running or
    was killed) is read up to its end.
    """
    data = Path(path).read_bytes()
    if len(data) < 12 or data[:4] not in (b"RIFF", b"RF64") or data[8:12] != b"WAVE":
        raise ValueError(f"{path} is not a RIFF/WAVE file")
    pos = 12
    fmt: tuple[int, int, int, int] | None = None
    payload: bytes | None = None
    while pos + 8 <= len(data):
        chunk_id = data[pos : pos + 4]
        size = struct.unpack_from("<I", data, pos + 4)[0]
        body_start = pos + 8
        if chunk_id == b"data":
            end = body_start + size
            if size == 0 or size == 0xFFFFFFFF or end > len(data):
                end = len(data)
            payload = data[body_start:end]
            break
        if chunk_id == b"fmt ":
            tag, channels, rate = struct.unpack_from("<HHI", data, body_start)
            bits = struct.unpack_from("<H", data, body_start + 14)[0]
            if tag == _EXTENSIBLE and size >= 26:
                tag = struct.unpack_from("<H", data, body_start + 24)[0]
            fmt = (tag, channels, rate, bits)
        pos = body_start + size + (size & 1)
    if fmt is None or payload is None:
        raise ValueError(f"{path} has no fmt or data chunk")
    tag, channels, rate, bits = fmt
    width = max(bits // 8, 1)
    frame = width * channels
    payload = payload[: len(payload) - len(payload) % frame]
    if tag == _PCM and bits == 16:
        samples = np.frombuffer(payload, dtype="<i2").astype(np.int16)
    elif tag == _PCM and bits == 8:
        samples = ((np.frombuffer(payload, dtype=np.uint8).astype(np.int16) - 128) << 8).astype(np.int16)
    elif tag == _PCM and bits == 24:
        raw = np.frombuffer(payload, dtype=np.uint8).reshape(-1, 3)
        samples = (raw[:, 1].astype(np.int16) | (raw[:, 2].astype(np.int16) << 8)).astype(np.int16)
    elif tag == _PCM and bits == 32:
        samples = (np.frombuffer(payload, dtype="<i4") >> 16).astype(np.int16)
    elif tag == _FLOAT and bits in (32, 64):
        floats = np.frombuffer(payload, dtype="<f4" if bits == 32 else "<f8")
        samples = np.clip(np.round(floats * 32768), -32768, 32767).astype(np.int16)
    elif tag == _ALAW:
        samples = alaw_decode(payload)
    elif tag == _ULAW:
        samples = ulaw_decode(payload)
    else:
        raise ValueError(f"{path}: unsupported WAV format tag {tag} with {bits} bits")
    return rate, samples.reshape(-1, channels)


def ulaw_decode(data: bytes | np.ndarray) -> np.ndarray:
    """G.711 mu-law bytes -> int16 samples (ITU-T G.711, as in RFC 3551 PCMU)."""
    u = ~np.frombuffer(bytes(data), dtype=np.uint8).astype(np.int32) & 0xFF
    exponent = (u >> 4) & 0x07
    magnitude = ((((u & 0x0F) << 3) + 0x84) << exponent) - 0x84
    return np.where(u & 0x80, -magnitude, magnitude).astype(np.int16)


def alaw_decode(data: bytes | np.ndarray) -> np.ndarray:
    """G.711 A-law bytes -> int16 samples (RFC 3551 PCMA)."""
    a = np.frombuffer(bytes(data), dtype=np.uint8).astype(np.int32) ^ 0x55
    exponent = (a >> 4) & 0x07
    mantissa = a & 0x0F
    magnitude = np.where(
        exponent == 0, (mantissa << 4) + 8, ((mantissa << 4) + 0x108) << np.maximum(exponent - 1, 0)
    )
    return np.where(a & 0x80, magnitude, -magnitude).astype(np.int16)


def pcap_rtp_audio(path: PathLike) -> tuple[int, np.ndarray]:
    """Decode the G.711 RTP in a pcap (e.g. SIPp's ``g711a.pcap``) to ``(8000, int16 samples)``.

    Takes UDP packets whose RTP payload type is 0 (PCMU) or 8 (PCMA), in file order; skips others
    (telephone-event). Handles classic little/big-endian pcap with Ethernet, Linux SLL or raw IP links.
    """
    data = Path(path).read_bytes()
    magic = data[:4]
    if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1"):
        endian = "<"
    elif magic in (b"\xa1\xb2\xc3\xd4", b"\xa1\xb2\x3c\x4d"):
        endian = ">"
    else:
        raise ValueError(f"{path} is not a classic pcap file")
    linktype = struct.unpack_from(endian + "I", data, 20)[0]
    link_header = {1: 14, 113: 16, 101: 0, 228: 0}.get(linktype)
    if link_header is None:
        raise ValueError(f"{path}: unsupported pcap link type {linktype}")
    pos = 24
    chunks: list[np.ndarray] = []
    while pos + 16 <= len(data):
        caplen = struct.unpack_from(endian + "I", data, pos + 8)[0]
        packet = data[pos + 16 : pos + 16 + caplen]
        pos += 16 + caplen
        ip = packet[link_header:]
        if len(ip) < 20 or ip[0] >> 4 != 4 or ip[9] != 17:
            continue
        udp = ip[(ip[0] & 0x0F) * 4 :]
        rtp = udp[8:]
        if len(rtp) < 12 or rtp[0] >> 6 != 2:
            continue
        header = 12 + 4 * (rtp[0] & 0x0F)
        if rtp[0] & 0x10 and len(rtp) >= header + 4:  # RFC 3550 5.3.1 header extension
            header += 4 + 4 * struct.unpack_from(">H", rtp, header + 2)[0]
        payload = rtp[header:]
        if rtp[0] & 0x20 and payload:  # padding
            payload = payload[: -payload[-1]]
        pt = rtp[1] & 0x7F
        if pt == 0:
            chunks.append(ulaw_decode(payload))
        elif pt == 8:
            chunks.append(alaw_decode(payload))
    if not chunks:
        raise ValueError(f"{path} has no PCMU/PCMA RTP packets")
    return 8000, np.concatenate(chunks)


# -- analysis ------------------------------------------------------------------------------------


def mono(samples: np.ndarray, channel: int | None = None) -> np.ndarray:
    """Float64 mono: one ``channel`` of an (n, channels) array, or the mean of all channels."""
    data = np.asarray(samples, dtype=np.float64)
    if data.ndim == 1:
        return data
    if channel is not None:
        return data[:, channel]
    return data.mean(axis=1)


def rms_dbfs(samples: np.ndarray) -> float:
    """RMS level relative to int16 full scale; ``-inf`` for silence or no samples."""
    data = mono(samples)
    if data.size == 0:
        return float("-inf")
    rms = float(np.sqrt(np.mean(data * data)))
    return 20 * np.log10(rms / 32768) if rms > 0 else float("-inf")


def _envelope(x: np.ndarray, rate: int) -> tuple[np.ndarray, int]:
    step = max(rate // 1000, 1)  # 1 ms
    window = max(rate // 100, 1)  # 10 ms moving average of |x|
    smooth = np.convolve(np.abs(x), np.ones(window) / window, mode="same")
    return smooth[::step], step


def best_lag(
    reference: np.ndarray,
    signal: np.ndarray,
    rate: int,
    max_lag_s: float,
    *,
    mode: str = "raw",
) -> tuple[float, float]:
    """Where ``reference`` occurs in ``signal``: ``(lag_seconds, normalised correlation peak)``.

    ``signal[t + lag] ~ reference[t]``: a positive lag means the signal carries the reference that
    many seconds later; lags from ``-max_lag_s`` to ``+max_lag_s`` are searched. The peak is the
    Pearson-style correlation of the reference with the signal window it overlaps (mean removed,
    FFT cross-correlation), 1.0 for identical audio, about 0 for unrelated audio. Both inputs may be
    (n,) or (n, channels) (channels are averaged); they must share ``rate``.
    ``mode``: ``"raw"`` (samples) or ``"envelope"`` (1 ms amplitude envelopes; 1 ms resolution).
    """
    ref = mono(reference)
    sig = mono(signal)
    if ref.size == 0 or sig.size == 0:
        return 0.0, 0.0
    step = 1
    if mode == "envelope":
        ref, step = _envelope(ref, rate)
        sig, _ = _envelope(sig, rate)
    elif mode != "raw":
        raise ValueError(f"mode must be 'raw' or 'envelope', not {mode!r}")
    ref = ref - ref.mean()
    sig = sig - sig.mean()
    n_ref, n_sig = ref.size, sig.size
    size = 1 << int(np.ceil(np.log2(n_ref + n_sig)))
    corr = np.fft.irfft(np.fft.rfft(sig, size) * np.conj(np.fft.rfft(ref, size)), size)
    max_lag = round(max_lag_s * rate / step)
    lags = np.arange(-min(max_lag, n_ref - 1), min(max_lag, n_sig - 1) + 1)
    values = corr[lags % size]
    # energy of the signal window [lag, lag + n_ref) clipped to the signal, from a cumulative sum
    cumulative = np.concatenate(([0.0], np.cumsum(sig * sig)))
    lo = np.clip(lags, 0, n_sig)
    hi = np.clip(lags + n_ref, 0, n_sig)
    window_energy = cumulative[hi] - cumulative[lo]
    ref_energy = float(np.dot(ref, ref))
    denominator = np.sqrt(np.maximum(window_energy, 0.0) * ref_energy)
    with np.errstate(divide="ignore", invalid="ignore"):
        normalised = np.where(denominator > 0, values / denominator, 0.0)
    best = int(np.argmax(normalised))
    return float(lags[best] * step / rate), float(normalised[best])

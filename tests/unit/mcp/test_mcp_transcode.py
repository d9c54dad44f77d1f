"""services/mcp/transcode.py: each compressed format decodes back (PyAV) to the source's duration
and correlates with it channel by channel; bad input is a TranscodeError; the spool step is atomic and
idempotent; encoding in a worker thread leaves the event loop free."""

from __future__ import annotations

import asyncio
import time
import wave
from pathlib import Path

import av
import numpy as np
import pytest

from services.mcp.transcode import FORMATS, TranscodeError, transcode, transcode_part

RATE = 8000


def speechlike(seconds: float, f0: float, seed: int) -> np.ndarray:
    """Harmonics of a wandering pitch under a syllable-rate envelope, with pauses: like a voice."""
    rnd = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    pitch = f0 * (1 + 0.1 * np.sin(2 * np.pi * 0.5 * t + rnd.uniform(0, 6)))
    phase = 2 * np.pi * np.cumsum(pitch) / RATE
    x = sum(np.sin(k * phase) / k for k in range(1, 12))
    envelope = np.clip(np.sin(2 * np.pi * 3.1 * t + rnd.uniform(0, 6)), 0, None) * (
        np.sin(2 * np.pi * 0.3 * t) > -0.5
    )
    return (5000 * x * envelope).astype("<i2")


def write_wav(path: Path, channels: list[np.ndarray]) -> Path:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(len(channels))
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes(np.stack(channels, axis=1).astype("<i2").tobytes())
    return path


def decode(path: Path, channels: int) -> tuple[np.ndarray, str, str]:
    """The decoded audio at 8 kHz s16, shape (samples, channels), the container and codec names."""
    layout = "stereo" if channels == 2 else "mono"
    with av.open(str(path)) as c:
        stream = c.streams.audio[0]
        assert stream.channels == channels
        resampler = av.AudioResampler(format="s16", layout=layout, rate=RATE)
        parts = []
        for frame in c.decode(stream):
            parts += [f.to_ndarray() for f in resampler.resample(frame)]
        parts += [f.to_ndarray() for f in resampler.resample(None)]
        return np.concatenate(parts, axis=1).reshape(-1, channels), c.format.name, stream.codec_context.name


def best_correlation(a: np.ndarray, b: np.ndarray, max_lag: int = 800) -> float:
    """Pearson correlation of a and b at the best lag within +-max_lag samples (codec delay)."""
    a = a.astype(float)
    b = b.astype(float)
    best = -1.0
    for lag in range(-max_lag, max_lag + 1, 1):
        x, y = (a[lag:], b[: len(b) - lag]) if lag >= 0 else (a[: len(a) + lag], b[-lag:])
        n = min(len(x), len(y))
        if n > RATE:
            best = max(best, float(np.corrcoef(x[:n], y[:n])[0, 1]))
    return best


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, np.ndarray]:
    left, right = speechlike(6.0, 140, 1), speechlike(6.0, 220, 2)
    return write_wav(tmp_path_factory.mktemp("src") / "call.wav", [left, right]), left, right


@pytest.mark.parametrize(
    ("fmt", "container", "codec"),
    [("mp3", "mp3", "mp3"), ("opus", "ogg", "opus"), ("flac", "flac", "flac")],
)
def test_stereo_decodes_back_to_the_source(
    source: tuple[Path, np.ndarray, np.ndarray], tmp_path: Path, fmt: str, container: str, codec: str
) -> None:
    wav, left, right = source
    out = transcode(wav, fmt, 2, out_path=tmp_path / f"call.{fmt}")
    assert out == tmp_path / f"call.{fmt}" and out.stat().st_size > 0
    pcm, got_container, got_codec = decode(out, 2)
    assert got_container == container and got_codec.startswith(codec)
    assert abs(len(pcm) / RATE - len(left) / RATE) < 0.03  # the encoders' delay and padding are trimmed
    if fmt == "flac":
        assert np.array_equal(pcm[:, 0], left) and np.array_equal(pcm[:, 1], right)  # lossless
        return
    # lossy: each channel follows its own source, not the other one (caller left, callee right)
    assert best_correlation(pcm[:, 0], left) > 0.9
    assert best_correlation(pcm[:, 1], right) > 0.9
    assert best_correlation(pcm[:, 0], right, max_lag=40) < 0.5


@pytest.mark.parametrize("fmt", ["mp3", "opus", "flac"])
def test_mono_and_mixdown(tmp_path: Path, fmt: str) -> None:
    voice = speechlike(3.0, 180, 3)
    mono = transcode(write_wav(tmp_path / "m.wav", [voice]), fmt, 1)
    assert mono == tmp_path / f"m.{fmt}"
    pcm, _, _ = decode(mono, 1)
    assert abs(len(pcm) / RATE - 3.0) < 0.03
    assert best_correlation(pcm[:, 0], voice) > (0.999 if fmt == "flac" else 0.9)
    # a stereo WAV asked for as mono is mixed down
    silent = np.zeros_like(voice)
    mixed, _, _ = decode(transcode(write_wav(tmp_path / "s.wav", [voice, silent]), fmt, 1), 1)
    assert best_correlation(mixed[:, 0], voice) > 0.9


def test_bad_input_is_a_clear_error(tmp_path: Path) -> None:
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk" + bytes(100))
    with pytest.raises(TranscodeError, match="not a readable WAV"):
        transcode(junk, "mp3", 2)
    wav8 = tmp_path / "u8.wav"
    with wave.open(str(wav8), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(1)
        w.setframerate(RATE)
        w.writeframes(bytes(800))
    with pytest.raises(TranscodeError, match="16-bit"):
        transcode(wav8, "flac", 1)
    ok = write_wav(tmp_path / "ok.wav", [speechlike(0.5, 150, 4)])
    with pytest.raises(TranscodeError, match="format must be one of"):
        transcode(ok, "aac", 1)
    with pytest.raises(TranscodeError, match="channels"):
        transcode(ok, "mp3", 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.wav", "ok.wav", "u8.wav"]  # no leftovers
    assert FORMATS == ("wav", "mp3", "opus", "flac")


def test_spool_step_replaces_the_part_once(tmp_path: Path) -> None:
    voice = speechlike(2.0, 150, 5)
    part = write_wav(tmp_path / "rec.wav.part", [voice, voice])
    assert transcode_part(part, "wav", 2) == part and part.read_bytes()[:4] == b"RIFF"
    assert transcode_part(part, "flac", 2) == part
    encoded = part.read_bytes()
    assert encoded[:4] == b"fLaC"
    # a second run (an MCP restarted after the replace) leaves the finished file alone
    assert transcode_part(part, "flac", 2) == part and part.read_bytes() == encoded
    assert [p.name for p in tmp_path.iterdir()] == ["rec.wav.part"]
    pcm, _, _ = decode(part, 2)
    assert np.array_equal(pcm[:, 0], voice)


async def test_encoding_in_a_thread_leaves_the_loop_free(tmp_path: Path) -> None:
    wav = write_wav(tmp_path / "long.wav", [speechlike(20.0, 150, 6), speechlike(20.0, 200, 7)])
    lags: list[float] = []
    done = False

    async def ticker() -> None:
        while not done:
            t0 = time.monotonic()
            await asyncio.sleep(0.005)
            lags.append(time.monotonic() - t0 - 0.005)

    tick = asyncio.create_task(ticker())
    t0 = time.monotonic()
    out = await asyncio.to_thread(transcode, wav, "mp3", 2)
    elapsed = time.monotonic() - t0
    done = True
    await tick
    assert out.stat().st_size > 0
    # the loop kept ticking while LAME ran: PyAV encodes without holding the GIL for long
    assert len(lags) >= elapsed / 0.05
    assert max(lags) < 0.25, max(lags)


async def test_mcp_stores_the_profiles_format(tmp_path: Path) -> None:
    """A recording the MCP stores (here one it recovers from its spool at start) is encoded in the
    IVR Profile's format before it goes to storage, under the format's extension."""
    from test_mcp_server import BRIDGE, FakeEngine, start_node  # the MCP unit tests' harness

    from services.config import IvrProfile
    from services.mcp.session import PART_SUFFIX, write_sidecar
    from services.mcp.xcv import encode_profile

    spool = tmp_path / "spool"
    spool.mkdir()
    rid = "0e" * 16
    profile = IvrProfile(format="flac", channels=2)
    write_sidecar(
        spool,
        rid,
        {"id": rid, "mcp": "mcp1", "opened": "2024-02-03T04:05:06+00:00", "tenant": "acme",
         "session_id": BRIDGE.session_id, "part": 1, "call": BRIDGE.call.to_dict(),
         "profile": encode_profile(profile), "codec": "PCMU"},
    )  # fmt: skip
    voice = speechlike(2.0, 150, 8)
    write_wav(spool / f"{rid}{PART_SUFFIX}", [voice, voice // 2])
    node = await start_node(tmp_path, FakeEngine())
    try:
        (event,) = node.events()
        assert event["format"] == "flac" and event["storage"]["key"] == f"acme/2024/02/03/{rid}.flac"
        stored = tmp_path / "storage" / event["storage"]["key"]
        assert stored.read_bytes()[:4] == b"fLaC" and event["size"] == stored.stat().st_size
        pcm, _, _ = decode(stored, 2)
        assert np.array_equal(pcm[:, 0], voice) and np.array_equal(pcm[:, 1], voice // 2)
        assert list(spool.iterdir()) == []
    finally:
        await node.stop()
        await node.client.ep.close()

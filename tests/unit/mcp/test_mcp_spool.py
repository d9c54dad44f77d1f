"""The spool footprint of a session: sidecar, WAV header repair, leftovers found at start-up."""

from __future__ import annotations

import struct
import wave
from datetime import UTC, datetime
from pathlib import Path

from services.config import IvrProfile
from services.mcp.session import (
    PART_SUFFIX,
    bridge_from_sidecar,
    find_leftovers,
    remove_sidecar,
    repair_wav,
    sidecar_path,
    write_sidecar,
)
from services.mcp.xcv import BridgeRequest, CallInfo, encode_profile

BRIDGE = BridgeRequest("acme", "s" * 32, 1, CallInfo("c1", caller="1001"), IvrProfile(channels=1))


def write_wav(path: Path, channels: int, frames: int) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(b"\x01\x00" * channels * frames)


def break_header(path: Path) -> None:
    """What a writer that died before finalising leaves: sizes 0 in the header."""
    data = bytearray(path.read_bytes())
    data[4:8] = struct.pack("<I", 0)
    data[40:44] = struct.pack("<I", 0)
    path.write_bytes(bytes(data))


def test_repair_wav_fixes_sizes(tmp_path: Path) -> None:
    p = tmp_path / "x.wav"
    write_wav(p, 2, 8000)
    break_header(p)
    with open(p, "ab") as f:
        f.write(b"\x00")  # half a frame written at the moment of the crash
    info = repair_wav(p)
    assert info is not None and (info.channels, info.sample_rate) == (2, 8000)
    assert info.data_bytes == 8000 * 4 and info.duration == 1.0
    with wave.open(str(p)) as w:
        assert (w.getnchannels(), w.getnframes()) == (2, 8000)


def test_repair_wav_leaves_non_wav_alone(tmp_path: Path) -> None:
    p = tmp_path / "x.wav"
    p.write_bytes(b"not a wav at all")
    assert repair_wav(p) is None
    assert p.read_bytes() == b"not a wav at all"


def test_sidecar_round_trip_and_leftovers(tmp_path: Path) -> None:
    opened = datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)
    data = {
        "id": "r1", "mcp": "mcp1", "opened": opened.isoformat(), "tenant": "acme", "session_id": "s" * 32,
        "part": 1, "call": BRIDGE.call.to_dict(), "profile": encode_profile(BRIDGE.profile), "codec": "PCMU",
    }  # fmt: skip
    write_sidecar(tmp_path, "r1", data)
    assert bridge_from_sidecar(data) == BRIDGE
    write_wav(tmp_path / f"r1{PART_SUFFIX}", 1, 4000)
    break_header(tmp_path / f"r1{PART_SUFFIX}")
    (tmp_path / "junk.json").write_text("{not json")
    (left,) = find_leftovers(tmp_path)
    assert (
        left.recording_id == "r1" and left.bridge == BRIDGE and left.opened == opened and left.mcp == "mcp1"
    )
    assert left.wav is not None and left.wav.duration == 0.5
    assert (left.end - left.opened).total_seconds() == 0.5
    remove_sidecar(tmp_path, "r1")
    remove_sidecar(tmp_path, "r1")  # idempotent
    assert not sidecar_path(tmp_path, "r1").exists()
    assert find_leftovers(tmp_path / "missing") == []

"""A recording-bridge session on an MCP, and its crash-safe footprint in the spool.

One :class:`RecordingSession` per SIP dialog (one recording part): the ``X-CV-*`` data, the rtp_core
session and its two leg ports, the SDP ``o=`` line of our answers, DTMF digits seen per leg and the
state (``early`` until the ACK, ``confirmed``, ``ending`` once BYE/timeout/shutdown started the end,
``done`` once stored and queued).

While a session records, ``<spool>/<id>.json`` (the *sidecar*) holds what is needed to finish it
without the process: if the MCP dies, :func:`recover_spool` at the next start repairs the WAV header
of ``<id>.wav.part``, stores it and queues its event, so a crash loses at most the audio after the
last write, never the recording.
"""

from __future__ import annotations

import enum
import json
import logging
import os
import struct
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from services.storage.disk import fsync_dir

from .xcv import BridgeRequest, CallInfo, decode_profile, encode_profile

if TYPE_CHECKING:
    from services.sip.dialog import Dialog

log = logging.getLogger("callvault.mcp.session")

PART_SUFFIX = ".wav.part"
SIDECAR_SUFFIX = ".json"
ENCRYPTED_SUFFIX = ".wav.enc"  # the encrypted copy of a finished recording, waiting for upload
BAD_DIR = "bad"  # corrupt spool entries, set aside for an operator with a <name>.reason file


class State(enum.Enum):
    EARLY = "early"  # 200 sent, ACK not yet received
    CONFIRMED = "confirmed"
    ENDING = "ending"  # BYE received or sent, media timeout, no ACK or shutdown: being finalised
    DONE = "done"  # recording stored and its event queued (or handed to recovery)


@dataclass
class RecordingSession:
    """One recording part: a dialog, an rtp_core session and a file in the spool."""

    recording_id: str
    bridge: BridgeRequest
    engine_id: int
    ports: tuple[int, int]
    spool_path: Path
    opened: datetime
    call_id: str
    local_tag: str
    dialog: Dialog | None = None
    state: State = State.EARLY
    media_started: datetime | None = None
    codec: str = ""
    sdp_session_id: str = ""
    sdp_version: int = 0
    last_answer: bytes = b""
    dtmf: tuple[list[str], list[str]] = field(default_factory=lambda: ([], []))
    remotes: list[tuple[str, int] | None] = field(default_factory=lambda: [None, None])
    invite_pending: bool = False
    end_reason: str = ""
    #: The SIP Server ended the bridge of a call that was never answered (BYE with Reason cause != 200).
    unanswered: bool = False

    @property
    def start(self) -> datetime:
        """When the recording's audio starts: the first RTP packet, else the answer."""
        return self.media_started or self.opened

    @property
    def active(self) -> bool:
        return self.state in (State.EARLY, State.CONFIRMED)

    def dtmf_text(self) -> tuple[str, str]:
        return "".join(self.dtmf[0]), "".join(self.dtmf[1])

    def sidecar(self, mcp: str) -> dict[str, Any]:
        b = self.bridge
        return {
            "id": self.recording_id,
            "mcp": mcp,
            "opened": self.opened.isoformat(),
            "tenant": b.tenant,
            "session_id": b.session_id,
            "part": b.part,
            "call": b.call.to_dict(),
            "profile": encode_profile(b.profile),
            "codec": self.codec,
        }


def sidecar_path(spool: Path, recording_id: str) -> Path:
    return spool / f"{recording_id}{SIDECAR_SUFFIX}"


def write_sidecar(spool: Path, recording_id: str, data: dict[str, Any]) -> None:
    """Write the sidecar atomically and durably (blocking: run it in a thread)."""
    spool.mkdir(parents=True, exist_ok=True)
    final = sidecar_path(spool, recording_id)
    tmp = final.with_name(f".{final.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, separators=(",", ":"))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    fsync_dir(spool)


def remove_sidecar(spool: Path, recording_id: str) -> None:
    try:
        sidecar_path(spool, recording_id).unlink()
    except FileNotFoundError:
        pass


def bridge_from_sidecar(data: dict[str, Any]) -> BridgeRequest:
    return BridgeRequest(
        tenant=str(data["tenant"]),
        session_id=str(data["session_id"]),
        part=int(data.get("part", 1)),
        call=CallInfo.from_dict(data.get("call") or {}),
        profile=decode_profile(str(data["profile"])),
    )


# -- WAV repair (for recordings whose writer died before finalising the header) -------------------


@dataclass
class WavInfo:
    channels: int
    sample_rate: int
    byte_rate: int
    data_bytes: int

    @property
    def duration(self) -> float:
        return self.data_bytes / self.byte_rate if self.byte_rate else 0.0


def repair_wav(path: Path) -> WavInfo | None:
    """Make the RIFF and ``data`` chunk sizes match the file's length (blocking).

    Returns the format and data size, or None when the file is not a RIFF/WAVE file with a ``fmt``
    chunk before its ``data`` chunk (it is then stored as it is).
    """
    size = path.stat().st_size
    with open(path, "r+b") as f:
        head = f.read(4096)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return None
        offset = 12
        fmt: tuple[int, int, int] | None = None
        while offset + 8 <= len(head):
            chunk_id = head[offset : offset + 4]
            (chunk_size,) = struct.unpack_from("<I", head, offset + 4)
            if chunk_id == b"fmt " and offset + 24 <= len(head):
                _, channels, rate, byte_rate = struct.unpack_from("<HHII", head, offset + 8)
                fmt = (channels, rate, byte_rate)
            elif chunk_id == b"data":
                if fmt is None:
                    return None
                data_start = offset + 8
                block = max(1, fmt[0] * 2)
                data_bytes = max(0, size - data_start)
                data_bytes -= data_bytes % block
                if data_bytes != chunk_size or size - 8 != struct.unpack_from("<I", head, 4)[0]:
                    f.seek(4)
                    f.write(struct.pack("<I", data_start + data_bytes - 8))
                    f.seek(offset + 4)
                    f.write(struct.pack("<I", data_bytes))
                    f.truncate(data_start + data_bytes)
                    f.flush()
                    os.fsync(f.fileno())
                return WavInfo(fmt[0], fmt[1], fmt[2], data_bytes)
            offset += 8 + chunk_size + (chunk_size & 1)
    return None


@dataclass
class Leftover:
    """A recording found in the spool at start-up, with what its sidecar says."""

    recording_id: str
    part_path: Path
    bridge: BridgeRequest
    opened: datetime
    codec: str
    mcp: str
    wav: WavInfo | None
    #: The whole sidecar: a finished recording's carries "state": "pending" with its end, engine
    #: stats, DTMF and (when encrypted) the envelope's metadata (server.py, ``_store``).
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def end(self) -> datetime:
        return self.opened + timedelta(seconds=self.wav.duration if self.wav else 0.0)


def set_aside(spool: Path, names: list[str], reason: str) -> Path:
    """Move the spool files ``names`` (those that exist) to ``<spool>/bad/`` with a ``.reason``
    file beside the first one, and log it (blocking). A corrupt entry never blocks the others."""
    bad = spool / BAD_DIR
    bad.mkdir(exist_ok=True)
    moved: list[str] = []
    for name in names:
        try:
            os.replace(spool / name, bad / name)
        except FileNotFoundError:
            continue
        moved.append(name)
    first = names[0] if names else "entry"
    (bad / f"{first}.reason").write_text(reason + "\n", encoding="utf-8")
    fsync_dir(bad)
    fsync_dir(spool)
    log.error("spool: %s set aside in %s: %s", ", ".join(moved) or first, bad, reason)
    return bad


def find_leftovers(spool: Path) -> list[Leftover]:
    """Recordings left in the spool by a previous run (blocking).

    Corrupt entries are set aside in ``<spool>/bad/`` with the reason (:func:`set_aside`): an
    unreadable sidecar, a recording still in progress whose audio is missing or not a WAV file, and
    audio files without a sidecar.
    """
    out: list[Leftover] = []
    if not spool.is_dir():
        return out
    claimed: set[str] = set()
    for side in sorted(spool.glob(f"*{SIDECAR_SUFFIX}")):
        if side.name.startswith("."):
            continue
        rid = side.name[: -len(SIDECAR_SUFFIX)]
        part = spool / f"{rid}{PART_SUFFIX}"
        files = [side.name, part.name, f"{rid}{ENCRYPTED_SUFFIX}"]
        claimed.update(files)
        try:
            data = json.loads(side.read_text(encoding="utf-8"))
            if not isinstance(data, dict):
                raise TypeError(f"not a JSON object but {type(data).__name__}")
            bridge = bridge_from_sidecar(data)
            opened = datetime.fromisoformat(str(data["opened"]))
            if opened.tzinfo is None:
                opened = opened.replace(tzinfo=UTC)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            set_aside(spool, files, f"sidecar {side.name} is unreadable: {exc}")
            continue
        pending = data.get("state") == "pending"
        wav = None
        if part.exists() and not pending:  # a pending part is finished (and may be MP3, Opus, FLAC)
            try:
                wav = repair_wav(part)
            except OSError as exc:
                log.error("spool: could not repair %s: %s", part, exc)
            if wav is None:
                set_aside(spool, files, f"{part.name} is not a WAV file (truncated or corrupt header)")
                continue
        elif not pending:
            set_aside(spool, files, f"{part.name} is missing: the recording's audio is lost")
            continue
        out.append(
            Leftover(
                rid, part, bridge, opened, str(data.get("codec", "")), str(data.get("mcp", "")), wav, data
            )
        )
    for entry in sorted(spool.iterdir()):
        name = entry.name
        if name in claimed or not entry.is_file() or name.startswith("."):
            continue
        if name.endswith((PART_SUFFIX, ENCRYPTED_SUFFIX)):
            set_aside(spool, [name], f"{name} has no sidecar: its recording cannot be identified")
    return out

"""The recording event (= metadata document, docs/ARCHITECTURE.md) an MCP queues for a finished part."""

from __future__ import annotations

import logging
import math
from datetime import UTC, datetime
from typing import Any

from services.storage.metadata import DocumentError, format_time, validate_document

from .xcv import BridgeRequest

log = logging.getLogger("callvault.mcp.events")

# "invalid": datagrams on the leg's RTP/RTCP ports that were neither (junk rtp_core ignored).
STREAM_INTS = ("ssrc", "packets", "bytes", "lost", "late", "duplicates", "reordered", "invalid")
STREAM_FLOATS = ("jitter_ms", "gap_total_ms", "longest_gap_ms")
SAMPLE_RATE = 8000


def _int(value: Any) -> int | None:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return int(value)
    return None


def _float(value: Any) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return round(max(0.0, float(value)), 3)
    return 0.0


def stream_entry(label: str, stats: dict[str, Any] | None, dtmf: str = "") -> dict[str, Any]:
    """One ``streams`` element from the engine's leg stats (docs/RTP_CORE.md)."""
    stats = stats or {}
    out: dict[str, Any] = {"label": label}
    for name in STREAM_INTS:
        value = _int(stats.get(name))
        if name == "ssrc":
            out[name] = value if value is not None and value >= 0 else None
        elif name == "lost":
            out[name] = value if value is not None else 0
        else:
            out[name] = max(0, value) if value is not None else 0
    for name in STREAM_FLOATS:
        out[name] = _float(stats.get(name))
    engine_dtmf = stats.get("dtmf")
    out["dtmf"] = dtmf or (engine_dtmf if isinstance(engine_dtmf, str) else "")
    return out


def build_event(
    *,
    recording_id: str,
    bridge: BridgeRequest,
    start: datetime,
    end: datetime,
    close_stats: dict[str, Any] | None,
    stored: dict[str, Any],
    mcp: str,
    codec: str = "",
    dtmf: tuple[str, str] = ("", ""),
) -> dict[str, Any]:
    """The event of a stored recording.

    ``close_stats`` is what ``Engine.close_session`` returned (duration, channels, per-leg stats);
    ``stored`` is the storage writer's ``{"kind", "key", "size", "sha256"}``. When the engine gave no
    duration (it failed), the wall-clock time between start and end is used. ``codec`` (negotiated)
    is used when the engine reports none for either leg.
    """
    close_stats = close_stats or {}
    start = start.astimezone(UTC) if start.tzinfo else start.replace(tzinfo=UTC)
    end = end.astimezone(UTC) if end.tzinfo else end.replace(tzinfo=UTC)
    end = max(end, start)
    duration = close_stats.get("duration")
    if not isinstance(duration, (int, float)) or isinstance(duration, bool) or not math.isfinite(duration):
        duration = (end - start).total_seconds()
    channels = close_stats.get("channels")
    if channels not in (1, 2):
        channels = bridge.profile.channels
    legs = close_stats.get("legs") or []
    legs = list(legs) + [None] * (2 - len(legs))
    # What the engine saw on the wire wins over what was negotiated.
    codec = next((str(s.get("codec")) for s in legs if isinstance(s, dict) and s.get("codec")), "") or codec
    call = bridge.call
    return {
        "id": recording_id,
        "tenant": bridge.tenant,
        "session_id": bridge.session_id,
        "part": bridge.part,
        "call_id": call.call_id,
        "from_uri": call.from_uri,
        "from_display": call.from_display,
        "to_uri": call.to_uri,
        "to_display": call.to_display,
        "caller": call.caller,
        "callee": call.callee,
        "direction": call.direction,
        "start": format_time(start),
        "end": format_time(end),
        "duration": round(max(0.0, float(duration)), 3),
        "codec": codec,
        "format": bridge.profile.format,
        "channels": channels,
        "sample_rate": SAMPLE_RATE,
        "size": int(stored.get("size", 0)),
        "sha256": str(stored.get("sha256", "")),
        "storage": {"kind": str(stored.get("kind", "disk")), "key": str(stored["key"])},
        "mcp": mcp,
        "streams": [
            stream_entry(label, legs[i] if isinstance(legs[i], dict) else None, dtmf[i])
            for i, label in enumerate(("caller", "callee"))
        ],
    }


def check_event(event: dict[str, Any]) -> str | None:
    """The metadata defect of ``event``, logged, or None. The event is queued either way: a
    recording is never dropped for its metadata (the consumer parks a bad event for an operator)."""
    try:
        validate_document(event)
    except DocumentError as exc:
        log.error("recording %s: metadata defect: %s", event.get("id"), exc)
        return str(exc)
    return None

"""The recording metadata document (docs/ARCHITECTURE.md): validation and normalisation.

The same document travels MCP -> queue event -> Recording Processor -> Web Services. Both the
Recording Processor (before posting) and Web Services (on insert) call :func:`validate_document`, so
a defect is reported once, naming the field, and never reaches the store.

Normal form: timestamps are UTC ``YYYY-MM-DDTHH:MM:SS.ffffffZ`` (fixed width, so they sort as
strings), optional fields are filled with their defaults, ``duration`` is computed from start/end
when absent. Unknown top-level fields are an error; :func:`split_unknown` lets a producer-side
caller move them into ``extra`` first so that nothing it sent is dropped.
"""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime
from typing import Any

from services.storage.disk import StorageKeyError, validate_key

_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-]{0,127}")
_TENANT_RE = re.compile(r"[a-z0-9][a-z0-9_\-]{0,62}")
_SHA_RE = re.compile(r"[0-9a-f]{64}")
_DIRECTION_RE = re.compile(r"[a-z][a-z_\-]{0,31}")
MAX_STRING = 2048

STORAGE_KINDS = ("disk", "s3")

# field -> (type, default); "required" fields have no default.
_REQUIRED = ("id", "tenant", "call_id", "start", "end", "storage")
_STRINGS = {
    "session_id": "",
    "from_uri": "",
    "from_display": "",
    "to_uri": "",
    "to_display": "",
    "caller": "",
    "callee": "",
    "direction": "",
    "codec": "",
    "format": "wav",
    "mcp": "",
}
_INTS = {"part": 1, "channels": 2, "sample_rate": 8000, "size": 0}
FIELDS = frozenset(
    {*_REQUIRED, *_STRINGS, *_INTS, "duration", "sha256", "streams", "labels", "extra", "encryption"}
)

# Every stream field is optional (older events lack "invalid", rtp_core's junk-datagram count).
_STREAM_INTS = ("ssrc", "packets", "bytes", "lost", "late", "duplicates", "reordered", "invalid")
_STREAM_FLOATS = ("jitter_ms", "gap_total_ms", "longest_gap_ms")


class DocumentError(ValueError):
    """The metadata document is invalid; the message names the field."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


def parse_time(value: Any, field: str) -> datetime:
    """An ISO 8601 timestamp as an aware UTC datetime; naive values are taken as UTC."""
    if not isinstance(value, str) or not value.strip():
        raise DocumentError(field, "must be an ISO 8601 timestamp string")
    text = value.strip()
    if " " in text and "T" in text:  # '+' of an offset decoded as ' ' in a query string
        text = text.replace(" ", "+")
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        raise DocumentError(field, f"{value!r} is not an ISO 8601 timestamp") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    try:
        return dt.astimezone(UTC)
    except OverflowError:
        raise DocumentError(field, f"{value!r} is out of range") from None


def format_time(dt: datetime) -> str:
    """The normal form of a timestamp: UTC, microseconds, ``Z``."""
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _string(doc: dict[str, Any], field: str, default: str) -> str:
    value = doc.get(field, default)
    if value is None:
        value = default
    if not isinstance(value, str):
        raise DocumentError(field, f"must be a string, not {type(value).__name__}")
    if len(value) > MAX_STRING:
        raise DocumentError(field, f"is longer than {MAX_STRING} characters")
    return value


def _int(value: Any, field: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise DocumentError(field, f"must be an integer, not {type(value).__name__}")
    if value < minimum:
        raise DocumentError(field, f"must be >= {minimum}, not {value}")
    return value


def _number(value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DocumentError(field, "must be a finite number")
    if value < 0:
        raise DocumentError(field, f"must be >= 0, not {value}")
    return float(value)


def split_unknown(doc: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split ``doc`` into (known fields, unknown fields)."""
    known = {k: v for k, v in doc.items() if k in FIELDS}
    unknown = {k: v for k, v in doc.items() if k not in FIELDS}
    return known, unknown


def validate_document(doc: Any) -> dict[str, Any]:
    """Validate a metadata document and return it in normal form; raise DocumentError naming the field."""
    if not isinstance(doc, dict):
        raise DocumentError("document", "must be a JSON object")
    unknown = sorted(set(doc) - FIELDS)
    if unknown:
        raise DocumentError(unknown[0], "is not a known field")
    for name in _REQUIRED:
        if name not in doc or doc[name] is None:
            raise DocumentError(name, "is required")
    out: dict[str, Any] = {}
    rid = doc["id"]
    if not isinstance(rid, str) or not _ID_RE.fullmatch(rid):
        raise DocumentError("id", "must be 1-128 letters, digits, '-' or '_'")
    out["id"] = rid
    tenant = doc["tenant"]
    if not isinstance(tenant, str) or not _TENANT_RE.fullmatch(tenant):
        raise DocumentError("tenant", "must be a tenant id (lower-case letters, digits, '-', '_')")
    out["tenant"] = tenant
    out["call_id"] = _string(doc, "call_id", "")
    for name, text in _STRINGS.items():
        out[name] = _string(doc, name, text)
    if out["direction"] and not _DIRECTION_RE.fullmatch(out["direction"]):
        raise DocumentError("direction", "must be lower-case letters, '-' or '_' (up to 32)")
    for name, number in _INTS.items():
        out[name] = _int(doc.get(name, number), name)
    if out["part"] < 1:
        raise DocumentError("part", "must be >= 1")
    if out["channels"] not in (1, 2):
        raise DocumentError("channels", f"must be 1 or 2, not {out['channels']}")
    if out["sample_rate"] < 1:
        raise DocumentError("sample_rate", "must be >= 1")
    start = parse_time(doc["start"], "start")
    end = parse_time(doc["end"], "end")
    if end < start:
        raise DocumentError("end", "is before start")
    out["start"] = format_time(start)
    out["end"] = format_time(end)
    duration = doc.get("duration")
    out["duration"] = (end - start).total_seconds() if duration is None else _number(duration, "duration")
    sha = doc.get("sha256", "")
    if sha is None:
        sha = ""
    if not isinstance(sha, str) or (sha and not _SHA_RE.fullmatch(sha)):
        raise DocumentError("sha256", "must be 64 lower-case hex digits")
    out["sha256"] = sha
    out["storage"] = _storage(doc["storage"])
    out["streams"] = _streams(doc.get("streams") or [])
    labels = doc.get("labels") or []
    if not isinstance(labels, list) or not all(isinstance(x, str) and 0 < len(x) <= 64 for x in labels):
        raise DocumentError("labels", "must be a list of strings of 1-64 characters")
    out["labels"] = sorted(set(labels))
    for name in ("extra", "encryption"):
        value = doc.get(name)
        if value is not None and not isinstance(value, dict):
            raise DocumentError(name, "must be a JSON object or null")
        out[name] = value if name == "encryption" else (value or {})
    if out["encryption"] is not None:
        _encryption(out["encryption"])
    return out


def _encryption(value: dict[str, Any]) -> None:
    """An encrypted recording's envelope metadata (services/storage/envelope.py): what playback needs
    must be there and well-formed; never a key."""
    if not isinstance(value.get("algorithm"), str) or not value["algorithm"]:
        raise DocumentError("encryption.algorithm", "must be a non-empty string")
    key_ids = value.get("key_ids")
    if (
        not isinstance(key_ids, list)
        or not key_ids
        or not all(isinstance(k, str) and _SHA_RE.fullmatch(k) for k in key_ids)
    ):
        raise DocumentError("encryption.key_ids", "must be a non-empty list of 64-hex-digit key ids")
    _int(value.get("chunk_size"), "encryption.chunk_size", 1)
    _int(value.get("plaintext_size"), "encryption.plaintext_size")
    sha = value.get("plaintext_sha256")
    if not isinstance(sha, str) or not _SHA_RE.fullmatch(sha):
        raise DocumentError("encryption.plaintext_sha256", "must be 64 lower-case hex digits")
    for name in value:
        if "key" in name.lower() and name != "key_ids":
            raise DocumentError(f"encryption.{name}", "is not allowed: a document never carries a key")


def _storage(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise DocumentError("storage", "must be an object {kind, key}")
    kind = value.get("kind")
    if kind not in STORAGE_KINDS:
        raise DocumentError("storage.kind", f"must be one of {', '.join(STORAGE_KINDS)}, not {kind!r}")
    key = value.get("key")
    try:
        validate_key(key)  # type: ignore[arg-type]
    except StorageKeyError as exc:
        raise DocumentError("storage.key", str(exc)) from None
    out = dict(value)
    for name, v in value.items():
        if name not in ("kind", "key") and not isinstance(v, (str, int, float, bool, type(None))):
            raise DocumentError(f"storage.{name}", "must be a scalar")
    return out


def _streams(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or len(value) > 16:
        raise DocumentError("streams", "must be a list of at most 16 objects")
    out = []
    for i, stream in enumerate(value):
        where = f"streams[{i}]"
        if not isinstance(stream, dict):
            raise DocumentError(where, "must be an object")
        s = dict(stream)
        label = s.get("label", "")
        if not isinstance(label, str) or len(label) > 64:
            raise DocumentError(f"{where}.label", "must be a string")
        for name in _STREAM_INTS:
            if name in s and s[name] is not None:
                # RTP cumulative loss can go negative with duplicates (RFC 3550 A.3)
                _int(s[name], f"{where}.{name}", minimum=-(2**31) if name == "lost" else 0)
        for name in _STREAM_FLOATS:
            if name in s and s[name] is not None:
                _number(s[name], f"{where}.{name}")
        if "dtmf" in s and s["dtmf"] is not None and not isinstance(s["dtmf"], str):
            raise DocumentError(f"{where}.dtmf", "must be a string")
        out.append(s)
    return out

"""The ``X-CV-*`` headers of the recording bridge (docs/ARCHITECTURE.md, "SIP Server -> RM -> MCP").

Sans-I/O: turns header values into a typed :class:`BridgeRequest` and back. Structured values are
base64url (RFC 4648 section 5) of compact JSON; they are written without ``=`` padding and read with
or without it. Every defect raises :class:`XcvError`, a ``ValueError`` that carries the SIP status to
answer with (400) and a reason naming the header.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from services.config import ConfigError, IvrProfile

TENANT = "X-CV-Tenant"
SESSION = "X-CV-Session"
PART = "X-CV-Part"
CALL = "X-CV-Call"
PROFILE = "X-CV-Profile"
LOAD = "X-CV-Load"

#: The fields of ``X-CV-Call`` (all strings).
CALL_FIELDS = ("call_id", "from_uri", "from_display", "to_uri", "to_display", "direction", "caller", "callee")

_TENANT_RE = re.compile(r"[a-z0-9][a-z0-9_\-]{0,62}")
# The SIP Server uses uuid4 hex; accept any safe token so that other recording clients can join.
_SESSION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")
_MAX_ENCODED = 8192


class XcvError(ValueError):
    """A missing or malformed ``X-CV-*`` header; ``status`` and ``reason`` are the SIP answer."""

    def __init__(self, reason: str, status: int = 400) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def b64json_encode(value: Any) -> str:
    """base64url (no padding) of the compact JSON of ``value``."""
    data = json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64json_decode(text: str, header: str) -> Any:
    """Inverse of :func:`b64json_encode`; XcvError naming ``header`` for anything malformed."""
    text = text.strip()
    if len(text) > _MAX_ENCODED:
        raise XcvError(f"{header} is longer than {_MAX_ENCODED} characters")
    if not re.fullmatch(r"[A-Za-z0-9_\-]*={0,2}", text):
        raise XcvError(f"{header} is not base64url")
    try:
        data = base64.urlsafe_b64decode(text.rstrip("=") + "=" * (-len(text.rstrip("=")) % 4))
        return json.loads(data.decode("utf-8"))
    except (binascii.Error, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise XcvError(f"{header} is not base64url of JSON ({exc})") from None


def encode_profile(profile: IvrProfile) -> str:
    """The ``X-CV-Profile`` value of an IVR Profile."""
    return b64json_encode(profile.to_dict())


def decode_profile(text: str) -> IvrProfile:
    """Parse and validate an ``X-CV-Profile`` value."""
    data = b64json_decode(text, PROFILE)
    if not isinstance(data, dict):
        raise XcvError(f"{PROFILE} must be a JSON object")
    known = {"name", "format", "channels", "storage", "reorder_ms"}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in known:
            continue  # a newer RM may add parameters: ignore what this MCP does not know
        if key in ("channels", "reorder_ms"):
            if not isinstance(value, int) or isinstance(value, bool):
                raise XcvError(f"{PROFILE}: {key} must be an integer")
        elif not isinstance(value, str):
            raise XcvError(f"{PROFILE}: {key} must be a string")
        kwargs[key] = value
    profile = IvrProfile(**kwargs)
    try:
        profile.validate(PROFILE)
    except ConfigError as exc:
        raise XcvError(str(exc)) from None
    return profile


@dataclass
class CallInfo:
    """The parties and call of a recording (``X-CV-Call``)."""

    call_id: str
    from_uri: str = ""
    from_display: str = ""
    to_uri: str = ""
    to_display: str = ""
    direction: str = ""
    caller: str = ""
    callee: str = ""

    def to_dict(self) -> dict[str, str]:
        return {name: getattr(self, name) for name in CALL_FIELDS}

    @classmethod
    def from_dict(cls, data: Any) -> CallInfo:
        if not isinstance(data, dict):
            raise XcvError(f"{CALL} must be a JSON object")
        values: dict[str, str] = {}
        for name in CALL_FIELDS:
            value = data.get(name)
            if value is None:
                value = ""
            if not isinstance(value, str):
                raise XcvError(f"{CALL}: {name} must be a string")
            if len(value) > 1024:
                raise XcvError(f"{CALL}: {name} is longer than 1024 characters")
            values[name] = value
        if not values["call_id"]:
            raise XcvError(f"{CALL}: call_id is missing")
        return cls(**values)


@dataclass
class BridgeRequest:
    """Everything the ``X-CV-*`` headers of an initial INVITE tell the MCP."""

    tenant: str
    session_id: str
    part: int
    call: CallInfo
    profile: IvrProfile = field(default_factory=IvrProfile)

    def headers(self) -> list[tuple[str, str]]:
        """The headers carrying this request (for tests and recording clients)."""
        return [
            (TENANT, self.tenant),
            (SESSION, self.session_id),
            (PART, str(self.part)),
            (CALL, b64json_encode(self.call.to_dict())),
            (PROFILE, encode_profile(self.profile)),
        ]


def parse_bridge_headers(get: Callable[[str], str | None]) -> BridgeRequest:
    """Parse the ``X-CV-*`` headers through ``get`` (e.g. ``request.headers.get``)."""

    def required(name: str) -> str:
        value = get(name)
        if value is None or not value.strip():
            raise XcvError(f"{name} header is missing")
        return value.strip()

    tenant = required(TENANT)
    if not _TENANT_RE.fullmatch(tenant):
        raise XcvError(f"{TENANT} {tenant[:64]!r} is not a valid tenant id")
    session_id = required(SESSION)
    if not _SESSION_RE.fullmatch(session_id):
        raise XcvError(f"{SESSION} is not a valid session id")
    part_text = required(PART)
    if not part_text.isdigit() or len(part_text) > 6 or int(part_text) < 1:
        raise XcvError(f"{PART} must be a positive integer")
    call = CallInfo.from_dict(b64json_decode(required(CALL), CALL))
    profile = decode_profile(required(PROFILE))
    return BridgeRequest(tenant, session_id, int(part_text), call, profile)


def parse_load(value: str | None) -> int | None:
    """The ``X-CV-Load`` of an OPTIONS answer; None when absent or malformed."""
    if value is None:
        return None
    value = value.strip()
    if not value.isdigit() or len(value) > 9:
        return None
    return int(value)

"""Per-tenant recording decisions and the recording-bridge headers (docs/ARCHITECTURE.md).

Pure functions over the config and a few strings; the B2BUA calls :func:`decide` once per call and
:func:`bridge_headers` to build the ``X-CV-*`` headers of the INVITE towards the Resource Manager.
"""

from __future__ import annotations

import base64
import json
import logging
from dataclasses import dataclass

from services.config import Tenant

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RecordingDecision:
    """Whether a call is recorded, and why (for the log line of the call)."""

    record: bool
    reason: str


def decide(tenant: Tenant, caller: str, callee: str) -> RecordingDecision:
    """Apply the tenant's :class:`~services.config.RecordingPolicy` to a call ``caller -> callee``.

    A broken policy (it cannot be, config validation compiles every pattern, but a replica could
    carry an old one) fails towards recording: a missed recording is worse than an extra one.
    """
    policy = tenant.policy
    try:
        record = policy.should_record(caller, callee)
    except Exception as exc:  # a bad pattern must not lose the call
        log.error("tenant %s: recording policy failed (%s); recording the call", tenant.id, exc)
        return RecordingDecision(True, f"policy error: {exc}")
    if policy.mode == "pattern":
        reason = "number matches a pattern" if record else "no pattern matches"
    else:
        reason = f"policy {policy.mode}"
    return RecordingDecision(record, reason)


def b64json(value: object) -> str:
    """base64url (unpadded) of compact JSON, the encoding of ``X-CV-Call`` / ``X-CV-Profile``."""
    raw = json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def unb64json(text: str) -> object:
    """Inverse of :func:`b64json` (accepts padded or unpadded input)."""
    text = text.strip()
    return json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))


@dataclass(frozen=True)
class CallInfo:
    """The call metadata the SIP Server hands to the recording bridge (``X-CV-Call``)."""

    call_id: str
    from_uri: str
    from_display: str
    to_uri: str
    to_display: str
    caller: str
    callee: str
    direction: str = "internal"

    def to_dict(self) -> dict[str, str]:
        return {
            "call_id": self.call_id,
            "from_uri": self.from_uri,
            "from_display": self.from_display,
            "to_uri": self.to_uri,
            "to_display": self.to_display,
            "direction": self.direction,
            "caller": self.caller,
            "callee": self.callee,
        }


def bridge_headers(tenant: str, session_id: str, part: int, info: CallInfo) -> list[tuple[str, str]]:
    """The ``X-CV-*`` headers of a recording-bridge INVITE, in the contract's order."""
    return [
        ("X-CV-Tenant", tenant),
        ("X-CV-Session", session_id),
        ("X-CV-Part", str(part)),
        ("X-CV-Call", b64json(info.to_dict())),
    ]

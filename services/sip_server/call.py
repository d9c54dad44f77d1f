"""The state of a B2BUA call as plain, replicable data.

A call has up to three dialogs: the A leg (caller <-> SIP Server, we are UAS), the B leg (SIP Server
<-> callee, we are UAC) and, when recorded, the recording leg (SIP Server -> RM -> MCP). Everything a
hot standby needs to take over an established call (issue 5) lives here: the dialogs, where each
leg's requests go, the SDP last sent and received on each leg, the ``o=`` lines we own, the MCP's
ports and the session-timer deadlines. :meth:`CallState.to_dict` / :meth:`CallState.from_dict`
round-trip it through JSON-compatible values. Coroutines hold only transient things (the pending
INVITE transaction of a call being set up).
"""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass, field
from typing import Any

from services.sip.dialog import Dialog
from services.sip_server.media import SdpOwner


class CallPhase(enum.StrEnum):
    """Where a call is in its life."""

    SETUP = "setup"  # A's INVITE accepted for processing; recording bridge / B being called
    EARLY = "early"  # B sent a provisional response (ringing, early media)
    ANSWERED = "answered"  # B answered, A was sent 200 and its ACK is awaited
    CONFIRMED = "confirmed"  # both legs established
    ENDING = "ending"  # BYEs under way
    ENDED = "ended"


@dataclass
class SessionTimer:
    """RFC 4028 state of one leg: the interval and who refreshes.

    ``refresher`` is ``"local"`` (the SIP Server sends refreshes at half the interval) or
    ``"remote"`` (the peer refreshes; without a refresh by ``deadline`` the leg is torn down,
    RFC 4028 10). ``deadline`` is wall-clock seconds: the next refresh to send, or the expiry.
    """

    interval: int = 0  # 0: no session timer on this leg
    refresher: str = ""
    deadline: float = 0.0

    def start(self, now: float) -> None:
        """(Re)arm after a successful refresh or the initial transaction."""
        if not self.interval:
            self.deadline = 0.0
        elif self.refresher == "local":
            self.deadline = now + self.interval / 2
        else:
            # RFC 4028 10: the side not refreshing sends BYE "slightly before the session
            # expiration", recommended: the minimum of 32 seconds and one third of the interval.
            self.deadline = now + self.interval - min(32.0, self.interval / 3)

    def to_dict(self) -> dict[str, Any]:
        return {"interval": self.interval, "refresher": self.refresher, "deadline": self.deadline}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SessionTimer:
        return cls(int(d["interval"]), str(d["refresher"]), float(d["deadline"]))


@dataclass
class Leg:
    """One dialog of a call, with everything needed to send requests on it."""

    name: str  # "a", "b" or "rec"
    dialog: Dialog | None = None
    #: Where requests on this leg go: (host, port, transport). For phones that is the source of
    #: their INVITE or REGISTER (NAT friendly, RFC 3581); None = the dialog's next hop.
    dest: tuple[str, int, str] | None = None
    local_sdp: bytes = b""  # the SDP we last sent on this leg (offer or answer)
    remote_sdp: bytes = b""  # the SDP we last received on this leg
    owner: SdpOwner | None = None  # our o= line when we rewrite SDP on this leg (recorded calls)
    timer: SessionTimer = field(default_factory=SessionTimer)
    allow_update: bool = False  # the peer listed UPDATE in Allow (refresh with UPDATE then)
    confirmed: bool = False  # the dialog is established and not yet ended (a BYE is due at the end)

    def destination(self) -> tuple[str, int, str]:
        if self.dest is not None:
            return self.dest
        if self.dialog is None:
            raise LookupError(f"leg {self.name} has no dialog yet")
        return self.dialog.next_hop()

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dialog": self.dialog.to_dict() if self.dialog is not None else None,
            "dest": list(self.dest) if self.dest is not None else None,
            "local_sdp": self.local_sdp.decode("utf-8", "replace"),
            "remote_sdp": self.remote_sdp.decode("utf-8", "replace"),
            "owner": self.owner.to_dict() if self.owner is not None else None,
            "timer": self.timer.to_dict(),
            "allow_update": self.allow_update,
            "confirmed": self.confirmed,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Leg:
        dest = d.get("dest")
        return cls(
            name=d["name"],
            dialog=Dialog.from_dict(d["dialog"]) if d.get("dialog") else None,
            dest=(str(dest[0]), int(dest[1]), str(dest[2])) if dest else None,
            local_sdp=d.get("local_sdp", "").encode("utf-8"),
            remote_sdp=d.get("remote_sdp", "").encode("utf-8"),
            owner=SdpOwner.from_dict(d["owner"]) if d.get("owner") else None,
            timer=SessionTimer.from_dict(d["timer"]) if d.get("timer") else SessionTimer(),
            allow_update=bool(d.get("allow_update", False)),
            confirmed=bool(d.get("confirmed", False)),
        )


@dataclass
class CallState:
    """A B2BUA call: its parties, phase, legs and recording."""

    tenant: str
    caller: str
    callee: str
    a_call_id: str
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    phase: CallPhase = CallPhase.SETUP
    created: float = 0.0
    answered: float = 0.0
    a: Leg = field(default_factory=lambda: Leg("a"))
    b: Leg = field(default_factory=lambda: Leg("b"))
    rec: Leg | None = None
    #: Recording: the decision, the session id (uuid4 hex, the RM's affinity key) and part number.
    record: bool = False
    recording: bool = False  # the bridge is up (the MCP answered)
    session_id: str = ""
    part: int = 1
    mcp: dict[str, tuple[str, int]] = field(default_factory=dict)  # label -> MCP (ip, port)
    info: dict[str, str] = field(default_factory=dict)  # the X-CV-Call values
    end_reason: str = ""

    def leg(self, name: str) -> Leg:
        if name == "a":
            return self.a
        if name == "b":
            return self.b
        if name == "rec" and self.rec is not None:
            return self.rec
        raise KeyError(f"call {self.id} has no leg {name!r}")

    def legs(self) -> list[Leg]:
        return [leg for leg in (self.a, self.b, self.rec) if leg is not None]

    @staticmethod
    def other(name: str) -> str:
        return {"a": "b", "b": "a"}[name]

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "tenant": self.tenant,
            "caller": self.caller,
            "callee": self.callee,
            "a_call_id": self.a_call_id,
            "phase": self.phase.value,
            "created": self.created,
            "answered": self.answered,
            "a": self.a.to_dict(),
            "b": self.b.to_dict(),
            "rec": self.rec.to_dict() if self.rec is not None else None,
            "record": self.record,
            "recording": self.recording,
            "session_id": self.session_id,
            "part": self.part,
            "mcp": {k: list(v) for k, v in self.mcp.items()},
            "info": dict(self.info),
            "end_reason": self.end_reason,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CallState:
        return cls(
            id=d["id"],
            tenant=d["tenant"],
            caller=d["caller"],
            callee=d["callee"],
            a_call_id=d["a_call_id"],
            phase=CallPhase(d["phase"]),
            created=float(d.get("created", 0.0)),
            answered=float(d.get("answered", 0.0)),
            a=Leg.from_dict(d["a"]),
            b=Leg.from_dict(d["b"]),
            rec=Leg.from_dict(d["rec"]) if d.get("rec") else None,
            record=bool(d.get("record", False)),
            recording=bool(d.get("recording", False)),
            session_id=d.get("session_id", ""),
            part=int(d.get("part", 1)),
            mcp={k: (str(v[0]), int(v[1])) for k, v in d.get("mcp", {}).items()},
            info=dict(d.get("info", {})),
            end_reason=d.get("end_reason", ""),
        )

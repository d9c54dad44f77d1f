"""SIP Server hot-standby replication, sans-I/O (issue 5): the stream codec, the replica, the
heartbeat monitor and the role rules.

Two SIP Servers (an active one and a hot standby) keep one TCP connection between them. Each message
is a JSON object framed by a 4-byte big-endian length (:func:`encode`, :class:`FrameDecoder`):

==============  ================================================================================
``hello``       ``{"node", "state": "active"|"standby", "epoch", "priority", "nonce"}``: sent first
                by both sides and again whenever the sender's state changes
``auth``        ``{"mac"}``: HMAC-SHA256 with the pair's shared secret over the peer's nonce and the
                sender's node name; nothing but hello, auth and heartbeat is accepted before a
                valid one (a stranger cannot pull the registrations nor make the active yield)
``snapshot``    ``{"epoch", "calls": [CallState dicts], "bindings": BindingStore dict,
                "ended": [[call_id, tag, expires_at], ...]}``: the active's whole state, sent to a
                standby after its hello; replaces whatever the standby held
``call``        ``{"call": CallState dict}``: a call was created or changed
``call_end``    ``{"id", "dialogs": [[call_id, tag], ...], "expires_at"}``: a call ended; its dialogs
                are remembered until ``expires_at`` so that a retransmitted BYE is answered 200
``aor``         ``{"tenant", "extension", "contacts": [Binding dicts]}``: an AOR's bindings changed
``heartbeat``   ``{"t"}``: sent by both sides every ``heartbeat_interval``
``handover``    ``{"epoch"}``: the active is stopping (SIGTERM) and has released the SIP address
                without ending any call: the standby takes over at once
==============  ================================================================================

Nothing here touches sockets or clocks: :mod:`services.sip_server.ha` is the asyncio glue.
"""

from __future__ import annotations

import enum
import json
import logging
import struct
from dataclasses import dataclass, field
from typing import Any

from services import ha_auth
from services.sip_server.registrar import Binding, BindingStore

log = logging.getLogger(__name__)

#: Largest message accepted (a snapshot of many calls is the big one).
MAX_MESSAGE = 64 * 1024 * 1024
_LEN = struct.Struct("!I")

HELLO = "hello"
SNAPSHOT = "snapshot"
CALL = "call"
CALL_END = "call_end"
AOR = "aor"
HEARTBEAT = "heartbeat"
AUTH = "auth"
HANDOVER = "handover"
MESSAGE_TYPES = frozenset({HELLO, AUTH, SNAPSHOT, CALL, CALL_END, AOR, HEARTBEAT, HANDOVER})

#: How long an ended call's dialogs are remembered (64*T1, the life of a non-INVITE transaction).
ENDED_TTL = 32.0

#: The role setting's weight in the rules below: a "primary" wins over "auto" over "standby".
PRIORITY = {"primary": 2, "auto": 1, "standby": 0}


class ReplicationError(ValueError):
    """A malformed replication stream (the connection is closed and logged)."""


class NodeState(enum.StrEnum):
    ACTIVE = "active"  # holds the service address and serves SIP
    STANDBY = "standby"  # holds a replica, serves nothing


def encode(message: dict[str, Any]) -> bytes:
    """One framed message: 4-byte big-endian length, then compact UTF-8 JSON."""
    body = json.dumps(message, separators=(",", ":")).encode("utf-8")
    if len(body) > MAX_MESSAGE:
        raise ReplicationError(f"{message.get('type')} message of {len(body)} bytes exceeds {MAX_MESSAGE}")
    return _LEN.pack(len(body)) + body


class FrameDecoder:
    """Reassembles messages from stream data fed in any pieces.

    :meth:`feed` returns every complete message; a defect (over-size length, invalid JSON, not an
    object, unknown ``type``) raises :class:`ReplicationError`, again on every later call.
    """

    def __init__(self, max_message: int = MAX_MESSAGE) -> None:
        self.max_message = max_message
        self._buf = bytearray()
        self._error: ReplicationError | None = None

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        if self._error is not None:
            raise self._error
        self._buf += data
        out: list[dict[str, Any]] = []
        try:
            while len(self._buf) >= _LEN.size:
                (length,) = _LEN.unpack_from(self._buf)
                if length > self.max_message:
                    raise ReplicationError(f"message length {length} exceeds {self.max_message}")
                if len(self._buf) < _LEN.size + length:
                    break
                body = bytes(self._buf[_LEN.size : _LEN.size + length])
                del self._buf[: _LEN.size + length]
                out.append(_decode(body))
        except ReplicationError as exc:
            self._error = exc
            raise
        return out

    @property
    def buffered(self) -> int:
        return len(self._buf)


def _decode(body: bytes) -> dict[str, Any]:
    try:
        message = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ReplicationError(f"message is not JSON: {exc}") from None
    if not isinstance(message, dict):
        raise ReplicationError(f"message is a {type(message).__name__}, not an object")
    kind = message.get("type")
    if kind not in MESSAGE_TYPES:
        raise ReplicationError(f"unknown message type {str(kind)[:40]!r}")
    return message


# --------------------------------------------------------------------------- messages
def hello(node: str, state: NodeState, epoch: int, priority: int, nonce: str = "") -> dict[str, Any]:
    return {
        "type": HELLO,
        "node": node,
        "state": state.value,
        "epoch": epoch,
        "priority": priority,
        "nonce": nonce,
    }


def auth_message(secret: bytes, peer_nonce: str, node: str) -> dict[str, Any]:
    """Proof that ``node`` (us) holds the pair's secret, over the nonce the peer sent."""
    return {"type": AUTH, "mac": ha_auth.mac(secret, peer_nonce, node)}


def verify_auth(secret: bytes, my_nonce: str, peer_node: str, message: dict[str, Any]) -> bool:
    """Whether the peer's auth message answers our nonce with the pair's secret."""
    return ha_auth.verify(secret, my_nonce, peer_node, message.get("mac"))


def heartbeat(now: float) -> dict[str, Any]:
    return {"type": HEARTBEAT, "t": now}


def call_message(call: dict[str, Any]) -> dict[str, Any]:
    return {"type": CALL, "call": call}


def call_end_message(call_id: str, dialogs: list[tuple[str, str]], expires_at: float) -> dict[str, Any]:
    return {"type": CALL_END, "id": call_id, "dialogs": [list(d) for d in dialogs], "expires_at": expires_at}


def aor_message(tenant: str, extension: str, contacts: list[Binding]) -> dict[str, Any]:
    return {
        "type": AOR,
        "tenant": tenant,
        "extension": extension,
        "contacts": [b.to_dict() for b in contacts],
    }


def dialog_keys(call: dict[str, Any]) -> list[tuple[str, str]]:
    """(Call-ID, our tag) of every dialog of a call dict: the keys in-dialog requests are found by."""
    keys = []
    for name in ("a", "b", "rec"):
        leg = call.get(name)
        if leg and leg.get("dialog"):
            keys.append((leg["dialog"]["call_id"], leg["dialog"]["local_tag"]))
    return keys


# --------------------------------------------------------------------------- the replica
@dataclass
class Replica:
    """What a standby holds: every call (as CallState dicts), every binding, recently ended dialogs.

    :meth:`apply` takes the active's messages; :meth:`snapshot` is what an active sends a new
    standby (so an active's own state, exported the same way, and the replica built from its
    snapshot plus updates compare equal).
    """

    calls: dict[str, dict[str, Any]] = field(default_factory=dict)
    bindings: BindingStore = field(default_factory=BindingStore)
    ended: dict[tuple[str, str], float] = field(default_factory=dict)
    epoch: int = 0
    synced: bool = False  # a snapshot arrived

    def apply(self, message: dict[str, Any], now: float) -> None:
        """Apply one message of the active; raises ReplicationError for a malformed one."""
        try:
            self._apply(message, now)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            if isinstance(exc, ReplicationError):
                raise
            raise ReplicationError(f"malformed {message.get('type')} message: {exc!r}") from None

    def _apply(self, message: dict[str, Any], now: float) -> None:
        kind = message["type"]
        if kind == SNAPSHOT:
            self.calls = {c["id"]: c for c in message["calls"]}
            self.bindings = BindingStore.from_dict(message["bindings"])
            self.ended = {(str(c), str(t)): float(e) for c, t, e in message.get("ended", [])}
            self.epoch = int(message["epoch"])
            self.synced = True
        elif kind == CALL:
            call = message["call"]
            if not isinstance(call, dict) or not isinstance(call.get("id"), str):
                raise ReplicationError("call message without a call id")
            self.calls[call["id"]] = call
        elif kind == CALL_END:
            self.calls.pop(str(message["id"]), None)
            expires = float(message["expires_at"])
            for call_id, tag in message["dialogs"]:
                self.ended[(str(call_id), str(tag))] = expires
        elif kind == AOR:
            key = (str(message["tenant"]), str(message["extension"]))
            contacts = [Binding.from_dict(b) for b in message["contacts"]]
            if contacts:
                self.bindings.bindings[key] = contacts
            else:
                self.bindings.bindings.pop(key, None)
        self.expire(now)

    def expire(self, now: float) -> None:
        """Forget ended dialogs whose time is over; entries arrive roughly in expiry order, so
        this pops from the front and stops at the first live one (cheap on every message)."""
        while self.ended:
            key, until = next(iter(self.ended.items()))
            if until > now:
                break
            del self.ended[key]

    def snapshot(self) -> dict[str, Any]:
        return snapshot_message(self.epoch, list(self.calls.values()), self.bindings, self.ended)


def snapshot_message(
    epoch: int,
    calls: list[dict[str, Any]],
    bindings: BindingStore,
    ended: dict[tuple[str, str], float],
) -> dict[str, Any]:
    return {
        "type": SNAPSHOT,
        "epoch": epoch,
        "calls": calls,
        "bindings": bindings.to_dict(),
        "ended": [[c, t, e] for (c, t), e in ended.items()],
    }


# --------------------------------------------------------------------------- liveness
class PeerLiveness(enum.StrEnum):
    UNKNOWN = "unknown"  # never heard from since start
    ALIVE = "alive"  # connected and heard within the window
    SILENT = "silent"  # connected, but nothing heard for the whole window: close the connection
    LOST = "lost"  # no connection, but heard within the window (a restart may be under way)
    DEAD = "dead"  # no connection and nothing heard for the whole window


class HeartbeatMonitor:
    """The peer's liveness from what was heard and whether the connection is up.

    ``interval`` is the heartbeat period and ``misses`` how many may be missed: the peer is
    :attr:`PeerLiveness.DEAD` once ``interval * misses`` passed without hearing from it AND the
    replication connection is gone (a connected peer that falls silent is first reported
    :attr:`PeerLiveness.SILENT`, for the glue to close the connection). Times are the caller's
    monotonic ``now``; :meth:`deadline` says when :meth:`state` may change next.
    """

    def __init__(self, interval: float, misses: int, now: float) -> None:
        if interval <= 0 or misses < 1:
            raise ValueError("heartbeat interval must be positive and misses at least 1")
        self.interval = interval
        self.misses = misses
        self.window = interval * misses
        self.connected = False
        self.heard_ever = False
        self.last_heard = now  # start-up counts as "heard": a node waits a window for its peer

    def on_connected(self, now: float) -> None:
        self.connected = True
        self.last_heard = now

    def on_message(self, now: float) -> None:
        self.heard_ever = True
        self.last_heard = now

    def on_disconnected(self, now: float) -> None:
        self.connected = False

    def state(self, now: float) -> PeerLiveness:
        quiet = now - self.last_heard >= self.window
        if self.connected:
            return PeerLiveness.SILENT if quiet else PeerLiveness.ALIVE
        if quiet:
            return PeerLiveness.DEAD
        return PeerLiveness.LOST if self.heard_ever else PeerLiveness.UNKNOWN

    def deadline(self) -> float:
        return self.last_heard + self.window


# --------------------------------------------------------------------------- role rules
@dataclass(frozen=True)
class NodeInfo:
    """What a hello says about a node."""

    node: str
    state: NodeState
    epoch: int
    priority: int

    @classmethod
    def from_hello(cls, message: dict[str, Any]) -> NodeInfo:
        try:
            return cls(
                str(message["node"]),
                NodeState(message["state"]),
                int(message["epoch"]),
                int(message["priority"]),
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise ReplicationError(f"malformed hello: {exc!r}") from None


def preferred(me: NodeInfo, peer: NodeInfo) -> bool:
    """Whether ``me`` should be the active one of the pair (deterministic, the same answer on both
    sides): the higher epoch (the most recent takeover) wins, then the higher priority (primary >
    auto > standby), then the lower node name."""
    if me.epoch != peer.epoch:
        return me.epoch > peer.epoch
    if me.priority != peer.priority:
        return me.priority > peer.priority
    return me.node < peer.node


def decide(me: NodeInfo, peer: NodeInfo) -> NodeState | None:
    """What ``me`` should become on hearing ``peer``'s hello; None = stay as it is.

    - both active (split brain after a partition): the one not :func:`preferred` yields;
    - both standby (nobody serves): the preferred one takes over at once;
    - otherwise the pair is already right.
    """
    if me.state == peer.state:
        if me.state == NodeState.ACTIVE:
            return None if preferred(me, peer) else NodeState.STANDBY
        # both standby: choose by priority and name only (a fresh node has no epoch to show)
        if (me.priority, peer.node) > (peer.priority, me.node):
            return NodeState.ACTIVE
        return None
    return None

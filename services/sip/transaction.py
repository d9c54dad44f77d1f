"""SIP transactions (RFC 3261 section 17, with RFC 6026's Accepted state) and the transaction layer.

Sans-I/O: every entry point takes ``now`` (seconds, any monotonic origin) and returns the list of
:class:`Send` instructions for the transport; events for the Transaction User (TU) queue up in the
layer and are collected with :meth:`TransactionLayer.drain_events`. The caller (``aio.py`` or a
test with a fake clock) re-arms one timer at :meth:`TransactionLayer.next_timer` and calls
:meth:`TransactionLayer.handle_timers` when it expires.

The four state machines are tables: ``(state, event) -> (new state, action)``. Anything not in a
table raises :class:`InvalidStateError` naming the state and the event. For events caused by the
TU that is a bug in the caller; for events caused by the network (a response in a state that does
not expect one) the layer catches it, logs and drops the message.

What the layer does on its own, so a TU never sees it:
  * retransmissions of requests and responses (timers A, E, G and the UAS 2xx, 13.3.1.4),
  * absorbing retransmitted requests and responses (17.1.3, 17.2.3 matching),
  * the ACK of a non-2xx final response, both building it (UAC, 17.1.1.3) and absorbing it (UAS),
  * answering CANCEL: 200 when an INVITE server transaction matches, 481 otherwise (9.2),
  * re-sending the TU's ACK when a 2xx is retransmitted (13.2.2.4),
  * ``received``/``rport`` on incoming requests and routing responses per 18.2.2 / RFC 3581,
  * 100 Trying for INVITE (17.2.1), synthetic 408 on timer B/F and 503 on transport error (8.1.3.1).
"""

from __future__ import annotations

import enum
import heapq
import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, TypeAlias

from .errors import InvalidStateError
from .headers import Via
from .message import Request, Response, make_response, new_branch
from .timers import DEFAULT_TIMERS, Timer, TimerConfig, is_reliable

__all__ = [
    "MAGIC_COOKIE",
    "AckReceived",
    "AckTimeout",
    "CancelReceived",
    "ClientTransaction",
    "InviteClientTransaction",
    "InviteServerTransaction",
    "NonInviteClientTransaction",
    "NonInviteServerTransaction",
    "RequestReceived",
    "ResponseReceived",
    "Send",
    "ServerTransaction",
    "StrayResponse",
    "Transaction",
    "TransactionEvent",
    "TransactionLayer",
    "TransactionState",
    "TransactionTerminated",
    "TxnEvent",
    "apply_received",
    "build_cancel",
    "build_non2xx_ack",
    "prepend_via",
    "response_destination",
]

log = logging.getLogger(__name__)

#: RFC 3261 8.1.1.7: branches of RFC 3261 clients start with this.
MAGIC_COOKIE = "z9hG4bK"

Address: TypeAlias = tuple[str, int]


class TransactionState(enum.Enum):
    """Transaction states, named after RFC 3261 17 figures 5-8 and RFC 6026 (Accepted)."""

    CALLING = "Calling"
    TRYING = "Trying"
    PROCEEDING = "Proceeding"
    COMPLETED = "Completed"
    CONFIRMED = "Confirmed"
    ACCEPTED = "Accepted"
    TERMINATED = "Terminated"


class TxnEvent(enum.Enum):
    """Inputs of the state machines."""

    # from the network
    REQUEST = "request retransmission"
    ACK = "ACK"
    PROVISIONAL = "1xx response"
    FINAL_2XX = "2xx response"
    FINAL_NON2XX = "300-699 response"
    TRANSPORT_ERROR = "transport error"
    # from the TU
    TU_PROVISIONAL = "1xx from TU"
    TU_2XX = "2xx from TU"
    TU_NON2XX = "300-699 from TU"
    # timers
    TIMER_A = "timer A"
    TIMER_B = "timer B"
    TIMER_D = "timer D"
    TIMER_E = "timer E"
    TIMER_F = "timer F"
    TIMER_G = "timer G"
    TIMER_H = "timer H"
    TIMER_I = "timer I"
    TIMER_J = "timer J"
    TIMER_K = "timer K"
    TIMER_L = "timer L"
    TIMER_M = "timer M"
    TIMER_2XX = "2xx retransmit timer"
    TIMER_CANCEL = "CANCEL wait timer"


_TIMER_EVENT = {
    Timer.A: TxnEvent.TIMER_A,
    Timer.B: TxnEvent.TIMER_B,
    Timer.D: TxnEvent.TIMER_D,
    Timer.E: TxnEvent.TIMER_E,
    Timer.F: TxnEvent.TIMER_F,
    Timer.G: TxnEvent.TIMER_G,
    Timer.H: TxnEvent.TIMER_H,
    Timer.I: TxnEvent.TIMER_I,
    Timer.J: TxnEvent.TIMER_J,
    Timer.K: TxnEvent.TIMER_K,
    Timer.L: TxnEvent.TIMER_L,
    Timer.M: TxnEvent.TIMER_M,
    Timer.RETRANSMIT_2XX: TxnEvent.TIMER_2XX,
    Timer.CANCEL: TxnEvent.TIMER_CANCEL,
}


# ------------------------------------------------------------------------------------------
# Output: messages to send and events for the TU
# ------------------------------------------------------------------------------------------
@dataclass(eq=False, slots=True)
class Send:
    """Send ``message`` to ``dest`` over ``transport`` ('udp' / 'tcp').

    ``transaction`` is the transaction that asked for it, so a transport failure can be reported
    back with :meth:`TransactionLayer.transport_error`. For TCP, ``dest`` is the remote address of
    the connection (for a response: the connection the request came in on).
    """

    message: Request | Response
    dest: Address
    transport: str
    transaction: Transaction | None = None


@dataclass(eq=False, slots=True)
class RequestReceived:
    """A new request (not a retransmission, not CANCEL, not an ACK): answer it via ``transaction``."""

    request: Request
    source: Address
    transport: str
    transaction: ServerTransaction


@dataclass(eq=False, slots=True)
class AckReceived:
    """An ACK that is not part of a non-2xx transaction: the ACK of a 2xx (13.3.1.4).

    ``transaction`` is the INVITE server transaction whose 2xx it acknowledges, or None when none
    matched (a proxy forwards it; a late ACK after timer L).
    """

    ack: Request
    source: Address
    transport: str
    transaction: InviteServerTransaction | None


@dataclass(eq=False, slots=True)
class CancelReceived:
    """A CANCEL matched a pending INVITE server transaction (9.2); the layer answered it 200.

    The TU should answer the INVITE with 487 Request Terminated.
    """

    cancel: Request
    source: Address
    transport: str
    transaction: InviteServerTransaction


@dataclass(eq=False, slots=True)
class ResponseReceived:
    """A response for a client transaction: every provisional, every final one once.

    For INVITE, each 2xx of a new dialog (a new To tag) is delivered, retransmissions are not.
    ``synthetic`` responses were made up by the layer: 408 on timer B/F (or the 64*T1 wait after
    CANCEL), 503 on a transport error (RFC 3261 8.1.3.1).
    """

    response: Response
    transaction: ClientTransaction
    synthetic: bool = False


@dataclass(eq=False, slots=True)
class StrayResponse:
    """A response that matched no client transaction and no ACK we sent (17.1.3: discard it)."""

    response: Response
    source: Address
    transport: str


@dataclass(eq=False, slots=True)
class AckTimeout:
    """An INVITE server transaction never got its ACK: timer H (non-2xx) or 64*T1 after a 2xx
    (13.3.1.4: the TU should end the dialog with BYE)."""

    transaction: InviteServerTransaction
    response: Response


@dataclass(eq=False, slots=True)
class TransactionTerminated:
    """A transaction reached Terminated and left the layer; ``reason`` is for logs."""

    transaction: Transaction
    reason: str


TransactionEvent: TypeAlias = (
    RequestReceived
    | AckReceived
    | CancelReceived
    | ResponseReceived
    | StrayResponse
    | AckTimeout
    | TransactionTerminated
)


# ------------------------------------------------------------------------------------------
# Message helpers
# ------------------------------------------------------------------------------------------
def prepend_via(
    request: Request,
    host: str,
    port: int | None,
    transport: str,
    *,
    branch: str | None = None,
    rport: bool = True,
) -> str:
    """Add this hop's Via on top of ``request`` (RFC 3261 8.1.1.7, 16.6 step 8) and return its branch.

    ``rport`` adds an empty ``;rport`` (RFC 3581 3) so responses come back to the source port.
    """
    branch = branch or new_branch()
    params: dict[str, str | None] = {"branch": branch}
    if rport:
        params["rport"] = None
    request.headers.add("Via", str(Via(transport.upper(), host, port, params)), first=True)
    return branch


def _replace_top_via(message: Request | Response, via: Via) -> None:
    vias = message.headers.get_all("Via")
    vias[0] = str(via)
    message.headers.remove("Via")
    for value in reversed(vias):
        message.headers.add("Via", value, first=True)


def apply_received(request: Request, source: Address) -> None:
    """RFC 3261 18.2.1 and RFC 3581 4: note the source address in the top Via.

    ``received`` is added when the sent-by host differs from the source address, and always when
    the client asked for ``rport`` (whose value becomes the source port).
    """
    via = request.top_via
    wants_rport = via.rport == ""
    if via.host == source[0] and not wants_rport:
        return
    via = via.copy()
    via.params["received"] = source[0]
    if wants_rport:
        via.params["rport"] = str(source[1])
    _replace_top_via(request, via)


def response_destination(via: Via, source: Address, transport: str) -> Address:
    """Where to send responses for a request whose (received/rport-stamped) top Via is ``via``.

    RFC 3261 18.2.2: over a reliable transport, the connection the request came on (its remote
    address is ``source``); otherwise ``received`` (or the sent-by host) at the ``rport`` (RFC 3581 4)
    or the sent-by port (default 5060).
    """
    if is_reliable(transport):
        return source
    maddr = via.params.get("maddr")
    if maddr:
        return maddr, via.port or 5060
    host = via.received or via.host
    rport = via.rport
    if isinstance(rport, int):
        return host, rport
    return host, via.port or 5060


def _same_hop_request(method: str, request: Request, to: str) -> Request:
    """A request that travels the hop of ``request`` again: same Request-URI, Call-ID, From and CSeq
    number, the single top Via (same branch) and the Route headers (RFC 3261 9.1, 17.1.1.3)."""
    out = Request(method, request.uri.copy())
    headers = out.headers
    headers.add("Via", request.headers.get_all("Via")[0])
    for route in request.headers.get_all("Route"):
        headers.add("Route", route)
    headers.add("Max-Forwards", "70")
    headers.add("From", request.headers.get("From") or "")
    headers.add("To", to)
    headers.add("Call-ID", request.call_id)
    headers.add("CSeq", f"{request.cseq.seq} {method}")
    return out


def build_non2xx_ack(request: Request, response: Response) -> Request:
    """The ACK for a 300-699 response to ``request`` (RFC 3261 17.1.1.3): as the INVITE, with the
    To of the response (and its tag)."""
    return _same_hop_request("ACK", request, response.headers.get("To") or "")


def build_cancel(request: Request) -> Request:
    """A CANCEL for ``request`` (RFC 3261 9.1): as the request being cancelled, To included."""
    return _same_hop_request("CANCEL", request, request.headers.get("To") or "")


def _status_event(status: int, *, tu: bool) -> TxnEvent:
    if status < 200:
        return TxnEvent.TU_PROVISIONAL if tu else TxnEvent.PROVISIONAL
    if status < 300:
        return TxnEvent.TU_2XX if tu else TxnEvent.FINAL_2XX
    return TxnEvent.TU_NON2XX if tu else TxnEvent.FINAL_NON2XX


def _server_key(request: Request) -> tuple[object, ...]:
    """RFC 3261 17.2.3: branch + sent-by + method (ACK matches its INVITE).

    Requests from RFC 2543 clients (no magic cookie) fall back to matching on the dialog and
    transaction identifiers plus the top Via.
    """
    via = request.top_via
    method = "INVITE" if request.method == "ACK" else request.method
    branch = via.branch
    if branch and branch.startswith(MAGIC_COOKIE):
        return (branch, via.host.lower(), via.port, method)
    return (
        "rfc2543",
        str(request.uri),
        request.from_.tag,
        request.call_id,
        request.cseq.seq,
        via.host.lower(),
        via.port,
        method,
    )


def _client_key(branch: str | None, method: str) -> tuple[str | None, str]:
    """RFC 3261 17.1.3: top Via branch + CSeq method."""
    return (branch, method)


def _dialog_ack_key(message: Request | Response) -> tuple[str, int, str | None]:
    """Matches a 2xx to INVITE with the ACK that acknowledges it (new branch, same CSeq number)."""
    return (message.call_id, message.cseq.seq, message.from_.tag)


# ------------------------------------------------------------------------------------------
# Transactions
# ------------------------------------------------------------------------------------------
S = TransactionState
E = TxnEvent
_Table: TypeAlias = dict[tuple[TransactionState, TxnEvent], tuple[TransactionState, str | None]]


def _table(
    *rows: tuple[tuple[TransactionState, ...], tuple[TxnEvent, ...], TransactionState, str | None],
) -> _Table:
    table: _Table = {}
    for states, events, new_state, action in rows:
        for state in states:
            for event in events:
                table[(state, event)] = (new_state, action)
    return table


class Transaction:
    """Common machinery: the transition table, ``_set_state`` and timers.

    Subclasses define ``TABLE``, ``INITIAL`` and the action methods the table names. Actions
    take ``(now, message)`` and return the messages to send.
    """

    TABLE: ClassVar[_Table]
    INITIAL: ClassVar[TransactionState]
    KIND: ClassVar[str]

    def __init__(
        self, layer: TransactionLayer, request: Request, transport: str, key: tuple[object, ...]
    ) -> None:
        self.layer = layer
        self.request = request
        self.transport = transport.lower()
        self.key = key
        self.state = self.INITIAL
        self.timers: dict[Timer, float] = {}
        self._intervals: dict[Timer, float] = {}
        self.last_response: Response | None = None
        self._terminating: str | None = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.request.method} {self.key[0]} {self.state.value}>"

    @property
    def id(self) -> str:
        """A short name for logs: kind, method and branch."""
        return f"{self.KIND} {self.request.method} {self.key[0]}"

    # -- state machine ---------------------------------------------------------------------
    def fire(self, event: TxnEvent, now: float, message: Request | Response | None = None) -> list[Send]:
        """Apply ``event``; raises InvalidStateError when the table has no such transition."""
        try:
            new_state, action = self.TABLE[(self.state, event)]
        except KeyError:
            raise InvalidStateError(
                f"{self.KIND} transaction in state {self.state.value} cannot handle event '{event.value}'"
            ) from None
        if new_state is not self.state:
            self._set_state(new_state, event)
        sends: list[Send] = []
        if action is not None:
            handler: Callable[[float, Request | Response | None], list[Send]] = getattr(self, action)
            sends = handler(now, message)
        if self._terminating is not None:
            # After the action, so the TU hears e.g. the synthetic 408 before the termination.
            reason, self._terminating = self._terminating, None
            self.layer._terminated(self, reason)
        return sends

    def _set_state(self, new_state: TransactionState, event: TxnEvent | str) -> None:
        """The one place a state changes: logs ``old -> new``; Terminated leaves the layer."""
        old = self.state
        self.state = new_state
        cause = event.value if isinstance(event, TxnEvent) else event
        log.debug("%s: %s -> %s (%s)", self.id, old.value, new_state.value, cause)
        if new_state is S.TERMINATED:
            self.timers.clear()
            self._terminating = cause

    # -- timers ----------------------------------------------------------------------------
    def _start_timer(self, timer: Timer, delay: float | None, now: float) -> list[Send]:
        """Arm ``timer`` ``delay`` seconds from ``now``; None disables it (reliable transport).

        A zero delay (timers D, I, J, K on reliable transports) fires at once.
        """
        if delay is None:
            return []
        self._intervals[timer] = delay
        if delay <= 0:
            self.timers.pop(timer, None)
            return self.fire(_TIMER_EVENT[timer], now)
        when = now + delay
        self.timers[timer] = when
        self.layer._schedule(self, timer, when)
        return []

    def _stop_timers(self, *timers: Timer) -> None:
        for timer in timers:
            self.timers.pop(timer, None)

    def timer_expired(self, timer: Timer, now: float) -> list[Send]:
        """Called by the layer when an armed timer is due."""
        self.timers.pop(timer, None)
        return self.fire(_TIMER_EVENT[timer], now)

    def transport_error(self, now: float) -> list[Send]:
        """The transport could not send a message of this transaction (17.1.4, 17.2.4)."""
        return self.fire(E.TRANSPORT_ERROR, now)


class ClientTransaction(Transaction):
    """Base of the client transactions: the request goes to ``dest`` over ``transport``."""

    def __init__(
        self,
        layer: TransactionLayer,
        request: Request,
        dest: Address,
        transport: str,
        key: tuple[object, ...],
    ) -> None:
        super().__init__(layer, request, transport, key)
        self.dest = dest

    def _send_request(self) -> Send:
        return Send(self.request, self.dest, self.transport, self)

    def receive_response(self, response: Response, now: float) -> list[Send]:
        """Feed a response matched to this transaction (17.1.3)."""
        return self.fire(_status_event(response.status, tu=False), now, response)

    def _deliver(self, response: Response, *, synthetic: bool = False) -> None:
        self.last_response = response
        self.layer._emit(ResponseReceived(response, self, synthetic))

    def _deliver_provisional(self, now: float, response: Request | Response | None) -> list[Send]:
        assert isinstance(response, Response)
        self._deliver(response)
        return []

    def _synthetic(self, status: int, reason: str) -> None:
        # RFC 3261 8.1.3.1: a timeout or transport error is reported to the TU as 408 / 503.
        self._deliver(make_response(self.request, status, reason), synthetic=True)

    def _timeout(self, now: float, message: Request | Response | None) -> list[Send]:
        self._synthetic(408, "Request Timeout")
        return []

    def _transport_failed(self, now: float, message: Request | Response | None) -> list[Send]:
        self._synthetic(503, "Service Unavailable")
        return []


class InviteClientTransaction(ClientTransaction):
    """RFC 3261 17.1.1 (figure 5) with RFC 6026's Accepted state for 2xx responses."""

    KIND = "ICT"
    INITIAL = S.CALLING
    TABLE = _table(
        ((S.CALLING,), (E.TIMER_A,), S.CALLING, "_retransmit"),
        ((S.CALLING,), (E.TIMER_B,), S.TERMINATED, "_timeout"),
        ((S.CALLING, S.PROCEEDING), (E.PROVISIONAL,), S.PROCEEDING, "_on_provisional"),
        ((S.CALLING, S.PROCEEDING), (E.FINAL_2XX,), S.ACCEPTED, "_on_2xx"),
        ((S.CALLING, S.PROCEEDING), (E.FINAL_NON2XX,), S.COMPLETED, "_on_final"),
        ((S.CALLING, S.PROCEEDING), (E.TRANSPORT_ERROR,), S.TERMINATED, "_transport_failed"),
        ((S.PROCEEDING,), (E.TIMER_CANCEL,), S.TERMINATED, "_timeout"),
        # 17.1.1.2: a retransmitted final response gets the ACK again, and is not passed up.
        ((S.COMPLETED,), (E.FINAL_NON2XX,), S.COMPLETED, "_resend_ack"),
        ((S.COMPLETED,), (E.PROVISIONAL,), S.COMPLETED, None),
        ((S.COMPLETED,), (E.TIMER_D,), S.TERMINATED, None),
        ((S.COMPLETED,), (E.TRANSPORT_ERROR,), S.TERMINATED, None),
        # RFC 6026 8.4: 2xx in Accepted go to the TU (here: only new dialogs; see _on_2xx_again).
        ((S.ACCEPTED,), (E.FINAL_2XX,), S.ACCEPTED, "_on_2xx_again"),
        ((S.ACCEPTED,), (E.PROVISIONAL,), S.ACCEPTED, None),
        ((S.ACCEPTED,), (E.TIMER_M,), S.TERMINATED, None),
        ((S.ACCEPTED,), (E.TRANSPORT_ERROR,), S.ACCEPTED, None),
    )

    def __init__(
        self,
        layer: TransactionLayer,
        request: Request,
        dest: Address,
        transport: str,
        key: tuple[object, ...],
    ) -> None:
        super().__init__(layer, request, dest, transport, key)
        self.ack: Request | None = None  # the ACK of a non-2xx final, once built
        self.cancel_requested = False
        self.cancel_sent = False
        self._dialogs_2xx: set[str | None] = set()

    def start(self, now: float) -> list[Send]:
        """17.1.1.2: send the INVITE, arm timer A (unreliable only) and timer B."""
        self._start_timer(Timer.A, self.layer.timers.a(self.transport), now)
        self._start_timer(Timer.B, self.layer.timers.b(), now)
        return [self._send_request()]

    def _retransmit(self, now: float, message: Request | Response | None) -> list[Send]:
        # Timer A doubles without a cap for INVITE (17.1.1.2); timer B bounds it.
        self._start_timer(Timer.A, 2 * self._intervals[Timer.A], now)
        return [self._send_request()]

    def _on_provisional(self, now: float, response: Request | Response | None) -> list[Send]:
        self._stop_timers(Timer.A, Timer.B)
        assert isinstance(response, Response)
        self._deliver(response)
        if self.cancel_requested and not self.cancel_sent:
            return self.layer._send_cancel(self, now)
        return []

    def _on_2xx(self, now: float, response: Request | Response | None) -> list[Send]:
        assert isinstance(response, Response)
        self._stop_timers(Timer.A, Timer.B, Timer.CANCEL)
        self._dialogs_2xx.add(response.to.tag)
        self._deliver(response)
        self._start_timer(Timer.M, self.layer.timers.m(), now)
        return []

    def _on_2xx_again(self, now: float, response: Request | Response | None) -> list[Send]:
        assert isinstance(response, Response)
        resend = self.layer._cached_ack(response)
        if resend is not None:
            return [resend]  # 13.2.2.4: the TU's ACK goes out again for a retransmitted 2xx
        if response.to.tag in self._dialogs_2xx:
            return []  # retransmission before the TU sent its ACK: the TU already has it
        self._dialogs_2xx.add(response.to.tag)  # a 2xx from another fork: a new dialog
        self._deliver(response)
        return []

    def _on_final(self, now: float, response: Request | Response | None) -> list[Send]:
        assert isinstance(response, Response)
        self._stop_timers(Timer.A, Timer.B, Timer.CANCEL)
        self.ack = build_non2xx_ack(self.request, response)
        self._deliver(response)
        sends = [Send(self.ack, self.dest, self.transport, self)]
        return sends + self._start_timer(Timer.D, self.layer.timers.d(self.transport), now)

    def _resend_ack(self, now: float, response: Request | Response | None) -> list[Send]:
        assert self.ack is not None
        return [Send(self.ack, self.dest, self.transport, self)]


class NonInviteClientTransaction(ClientTransaction):
    """RFC 3261 17.1.2 (figure 6)."""

    KIND = "NICT"
    INITIAL = S.TRYING
    TABLE = _table(
        ((S.TRYING,), (E.TIMER_E,), S.TRYING, "_retransmit"),
        ((S.PROCEEDING,), (E.TIMER_E,), S.PROCEEDING, "_retransmit"),
        ((S.TRYING, S.PROCEEDING), (E.TIMER_F,), S.TERMINATED, "_timeout"),
        ((S.TRYING, S.PROCEEDING), (E.PROVISIONAL,), S.PROCEEDING, "_deliver_provisional"),
        ((S.TRYING, S.PROCEEDING), (E.FINAL_2XX, E.FINAL_NON2XX), S.COMPLETED, "_on_final"),
        ((S.TRYING, S.PROCEEDING), (E.TRANSPORT_ERROR,), S.TERMINATED, "_transport_failed"),
        # 17.1.2.2: retransmitted responses in Completed are absorbed.
        ((S.COMPLETED,), (E.PROVISIONAL, E.FINAL_2XX, E.FINAL_NON2XX), S.COMPLETED, None),
        ((S.COMPLETED,), (E.TIMER_K,), S.TERMINATED, None),
    )

    def start(self, now: float) -> list[Send]:
        """17.1.2.2: send the request, arm timer E (unreliable only) and timer F."""
        self._start_timer(Timer.E, self.layer.timers.e(self.transport), now)
        self._start_timer(Timer.F, self.layer.timers.f(), now)
        return [self._send_request()]

    def _retransmit(self, now: float, message: Request | Response | None) -> list[Send]:
        # Trying: E doubles up to T2; Proceeding: E is reset to T2 (17.1.2.2).
        if self.state is S.PROCEEDING:
            interval = self.layer.timers.t2
        else:
            interval = self.layer.timers.backoff(self._intervals[Timer.E])
        self._start_timer(Timer.E, interval, now)
        return [self._send_request()]

    def _on_final(self, now: float, response: Request | Response | None) -> list[Send]:
        assert isinstance(response, Response)
        self._stop_timers(Timer.E, Timer.F)
        self._deliver(response)
        return self._start_timer(Timer.K, self.layer.timers.k(self.transport), now)


class ServerTransaction(Transaction):
    """Base of the server transactions: responses go to ``response_dest`` (18.2.2, RFC 3581)."""

    def __init__(
        self,
        layer: TransactionLayer,
        request: Request,
        source: Address,
        transport: str,
        key: tuple[object, ...],
    ) -> None:
        super().__init__(layer, request, transport, key)
        self.source = source
        self.response_dest = response_destination(request.top_via, source, transport)
        self.final_response: Response | None = None

    def respond(self, response: Response, now: float) -> list[Send]:
        """Send a response from the TU (17.2.1, 17.2.2); illegal ones raise InvalidStateError."""
        return self.fire(_status_event(response.status, tu=True), now, response)

    def receive_request(self, request: Request, now: float) -> list[Send]:
        """A retransmission of the request (or the ACK, for INVITE) matched this transaction."""
        return self.fire(E.ACK if request.method == "ACK" else E.REQUEST, now, request)

    def _send_response(self, now: float, response: Request | Response | None) -> list[Send]:
        assert isinstance(response, Response)
        self.last_response = response
        if response.status >= 200:
            self.final_response = response
        return [Send(response, self.response_dest, self.transport, self)]

    def _resend_last(self, now: float, message: Request | Response | None) -> list[Send]:
        if self.last_response is None:
            return []
        return [Send(self.last_response, self.response_dest, self.transport, self)]

    def _transport_failed(self, now: float, message: Request | Response | None) -> list[Send]:
        return []


class InviteServerTransaction(ServerTransaction):
    """RFC 3261 17.2.1 (figure 7) with RFC 6026's Accepted state; the UAS core's 2xx
    retransmission (13.3.1.4) runs here too, in Accepted, until the ACK or timer L."""

    KIND = "IST"
    INITIAL = S.PROCEEDING
    TABLE = _table(
        ((S.PROCEEDING,), (E.REQUEST,), S.PROCEEDING, "_resend_last"),
        ((S.PROCEEDING,), (E.TU_PROVISIONAL,), S.PROCEEDING, "_send_response"),
        ((S.PROCEEDING,), (E.TU_2XX,), S.ACCEPTED, "_on_tu_2xx"),
        ((S.PROCEEDING,), (E.TU_NON2XX,), S.COMPLETED, "_on_tu_final"),
        ((S.PROCEEDING, S.COMPLETED, S.CONFIRMED), (E.TRANSPORT_ERROR,), S.TERMINATED, "_transport_failed"),
        # RFC 6026 7.1: in Accepted, INVITE retransmissions are absorbed, more 2xx are sent.
        ((S.ACCEPTED,), (E.REQUEST,), S.ACCEPTED, None),
        ((S.ACCEPTED,), (E.TU_2XX,), S.ACCEPTED, "_send_response"),
        ((S.ACCEPTED,), (E.ACK,), S.ACCEPTED, "_on_2xx_ack"),
        ((S.ACCEPTED,), (E.TIMER_2XX,), S.ACCEPTED, "_retransmit_2xx"),
        ((S.ACCEPTED,), (E.TIMER_L,), S.TERMINATED, "_on_timer_l"),
        ((S.ACCEPTED,), (E.TRANSPORT_ERROR,), S.ACCEPTED, None),
        # 17.2.1: Completed retransmits the final response until the ACK (timer G) or timer H.
        ((S.COMPLETED,), (E.REQUEST,), S.COMPLETED, "_resend_last"),
        ((S.COMPLETED,), (E.TIMER_G,), S.COMPLETED, "_retransmit_final"),
        ((S.COMPLETED,), (E.ACK,), S.CONFIRMED, "_on_ack"),
        ((S.COMPLETED,), (E.TIMER_H,), S.TERMINATED, "_on_timer_h"),
        ((S.CONFIRMED,), (E.REQUEST, E.ACK), S.CONFIRMED, None),
        ((S.CONFIRMED,), (E.TIMER_I,), S.TERMINATED, None),
    )

    def __init__(
        self,
        layer: TransactionLayer,
        request: Request,
        source: Address,
        transport: str,
        key: tuple[object, ...],
    ) -> None:
        super().__init__(layer, request, source, transport, key)
        self.acked = False
        self.cancelled = False

    def _on_tu_2xx(self, now: float, response: Request | Response | None) -> list[Send]:
        sends = self._send_response(now, response)
        self.layer._expect_ack(self)
        # 13.3.1.4: retransmit the 2xx from T1 doubling to T2 until the ACK; give up at 64*T1
        # (which is timer L, RFC 6026).
        timers = self.layer.timers
        self._start_timer(Timer.RETRANSMIT_2XX, timers.first_2xx_retransmit(), now)
        self._start_timer(Timer.L, timers.l(), now)
        return sends

    def _retransmit_2xx(self, now: float, message: Request | Response | None) -> list[Send]:
        self._start_timer(
            Timer.RETRANSMIT_2XX, self.layer.timers.backoff(self._intervals[Timer.RETRANSMIT_2XX]), now
        )
        assert self.final_response is not None
        return [Send(self.final_response, self.response_dest, self.transport, self)]

    def _on_2xx_ack(self, now: float, ack: Request | Response | None) -> list[Send]:
        self._stop_timers(Timer.RETRANSMIT_2XX)
        self.acked = True
        return []

    def _on_timer_l(self, now: float, message: Request | Response | None) -> list[Send]:
        if not self.acked:
            assert self.final_response is not None
            self.layer._emit(AckTimeout(self, self.final_response))
        return []

    def _on_tu_final(self, now: float, response: Request | Response | None) -> list[Send]:
        sends = self._send_response(now, response)
        self._start_timer(Timer.G, self.layer.timers.g(self.transport), now)
        self._start_timer(Timer.H, self.layer.timers.h(), now)
        return sends

    def _retransmit_final(self, now: float, message: Request | Response | None) -> list[Send]:
        self._start_timer(Timer.G, self.layer.timers.backoff(self._intervals[Timer.G]), now)
        return self._resend_last(now, message)

    def _on_ack(self, now: float, ack: Request | Response | None) -> list[Send]:
        self._stop_timers(Timer.G, Timer.H)
        self.acked = True
        return self._start_timer(Timer.I, self.layer.timers.i(self.transport), now)

    def _on_timer_h(self, now: float, message: Request | Response | None) -> list[Send]:
        assert self.final_response is not None
        self.layer._emit(AckTimeout(self, self.final_response))
        return []


class NonInviteServerTransaction(ServerTransaction):
    """RFC 3261 17.2.2 (figure 8)."""

    KIND = "NIST"
    INITIAL = S.TRYING
    TABLE = _table(
        ((S.TRYING,), (E.REQUEST,), S.TRYING, None),
        ((S.TRYING, S.PROCEEDING), (E.TU_PROVISIONAL,), S.PROCEEDING, "_send_response"),
        ((S.PROCEEDING,), (E.REQUEST,), S.PROCEEDING, "_resend_last"),
        ((S.TRYING, S.PROCEEDING), (E.TU_2XX, E.TU_NON2XX), S.COMPLETED, "_on_tu_final"),
        ((S.COMPLETED,), (E.REQUEST,), S.COMPLETED, "_resend_last"),
        ((S.COMPLETED,), (E.TIMER_J,), S.TERMINATED, None),
        ((S.TRYING, S.PROCEEDING, S.COMPLETED), (E.TRANSPORT_ERROR,), S.TERMINATED, "_transport_failed"),
    )

    def _on_tu_final(self, now: float, response: Request | Response | None) -> list[Send]:
        sends = self._send_response(now, response)
        return sends + self._start_timer(Timer.J, self.layer.timers.j(self.transport), now)


# ------------------------------------------------------------------------------------------
# The layer
# ------------------------------------------------------------------------------------------
@dataclass(order=True)
class _TimerEntry:
    when: float
    seq: int
    transaction: Transaction = field(compare=False)
    timer: Timer = field(compare=False)


class TransactionLayer:
    """Matches messages to transactions and drives them; the TU sees only :data:`TransactionEvent`.

    ``send_trying``: answer every new INVITE with 100 Trying at once (17.2.1 requires it within
    200 ms unless the TU answers sooner; doing it at once is simplest and stops the UAC's timer A).
    """

    def __init__(self, timers: TimerConfig = DEFAULT_TIMERS, *, send_trying: bool = True) -> None:
        self.timers = timers
        self.send_trying = send_trying
        self.clients: dict[tuple[object, ...], ClientTransaction] = {}
        self.servers: dict[tuple[object, ...], ServerTransaction] = {}
        self._events: list[TransactionEvent] = []
        self._heap: list[_TimerEntry] = []
        self._seq = itertools.count()
        # UAS: INVITE server transactions whose 2xx awaits its ACK, by (Call-ID, CSeq, From tag).
        self._awaiting_ack: dict[tuple[str, int, str | None], InviteServerTransaction] = {}
        # UAC: ACKs for 2xx sent by the TU, re-sent on 2xx retransmissions (13.2.2.4), with expiry.
        self._acks: dict[tuple[str, int, str | None, str | None], tuple[Send, float]] = {}

    # -- TU and transport entry points ---------------------------------------------------------
    def receive(self, message: Request | Response, source: Address, transport: str, now: float) -> list[Send]:
        """Feed a parsed message from the network. Raises SipParseError only for a message the
        layer cannot even match (the transport answers it like a parse error)."""
        transport = transport.lower()
        if isinstance(message, Request):
            return self._receive_request(message, source, transport, now)
        return self._receive_response(message, source, transport, now)

    def send_request(
        self, request: Request, dest: Address, transport: str, now: float
    ) -> tuple[ClientTransaction, list[Send]]:
        """Start a client transaction for ``request`` (which already carries this hop's Via with a
        fresh branch, see :func:`prepend_via`). ACK is not sent this way (see :meth:`send_ack`)."""
        if request.method == "ACK":
            raise InvalidStateError("ACK is not sent in a client transaction: use send_ack()")
        transport = transport.lower()
        key = _client_key(request.branch, request.method)
        if key in self.clients:
            raise InvalidStateError(f"a client transaction with branch {key[0]} already exists")
        txn: ClientTransaction
        if request.method == "INVITE":
            txn = InviteClientTransaction(self, request, dest, transport, key)
        else:
            txn = NonInviteClientTransaction(self, request, dest, transport, key)
        self.clients[key] = txn
        log.debug("%s: started to %s:%s/%s", txn.id, dest[0], dest[1], transport)
        return txn, txn.start(now)

    def respond(self, transaction: ServerTransaction, response: Response, now: float) -> list[Send]:
        """Send the TU's response through its server transaction."""
        return transaction.respond(response, now)

    def send_ack(self, ack: Request, dest: Address, transport: str, now: float) -> list[Send]:
        """Send the TU's ACK for a 2xx (13.2.2.4; carries its own Via with a new branch) and keep it
        for 64*T1 to answer retransmissions of that 2xx."""
        send = Send(ack, dest, transport.lower())
        key = (ack.call_id, ack.cseq.seq, ack.from_.tag, ack.to.tag)
        self._acks.pop(key, None)
        self._acks[key] = (send, now + self.timers.m())
        return [send]

    def cancel(self, transaction: ClientTransaction, now: float) -> list[Send]:
        """Cancel a pending INVITE (9.1). Deferred until a provisional response arrived; a no-op once
        a final response did. The CANCEL's own response arrives as a ResponseReceived event."""
        if not isinstance(transaction, InviteClientTransaction):
            raise InvalidStateError(f"{transaction.id}: only an INVITE can be cancelled")
        if transaction.cancel_requested:
            return []
        transaction.cancel_requested = True
        if transaction.state is S.PROCEEDING:
            return self._send_cancel(transaction, now)
        return []

    def transport_error(self, transaction: Transaction | None, now: float) -> list[Send]:
        """The transport failed to send a message of ``transaction`` (17.1.4, 17.2.4)."""
        if transaction is None or transaction.state is S.TERMINATED:
            return []
        return transaction.transport_error(now)

    def next_timer(self) -> float | None:
        """The earliest deadline at which :meth:`handle_timers` has work, or None."""
        heap = self._heap
        while heap:
            entry = heap[0]
            if entry.transaction.timers.get(entry.timer) == entry.when:
                return entry.when
            heapq.heappop(heap)  # cancelled or re-armed since
        return None

    def handle_timers(self, now: float) -> list[Send]:
        """Fire every timer due at ``now``."""
        sends: list[Send] = []
        heap = self._heap
        while heap and heap[0].when <= now:
            entry = heapq.heappop(heap)
            txn = entry.transaction
            if txn.timers.get(entry.timer) != entry.when or txn.state is S.TERMINATED:
                continue
            sends += txn.timer_expired(entry.timer, now)
        self._expire_acks(now)
        return sends

    def drain_events(self) -> list[TransactionEvent]:
        """Events for the TU since the last call, in order."""
        events, self._events = self._events, []
        return events

    # -- internals used by the transactions -----------------------------------------------------
    def _emit(self, event: TransactionEvent) -> None:
        self._events.append(event)

    def _schedule(self, txn: Transaction, timer: Timer, when: float) -> None:
        heapq.heappush(self._heap, _TimerEntry(when, next(self._seq), txn, timer))

    def _terminated(self, txn: Transaction, reason: str) -> None:
        if isinstance(txn, ClientTransaction):
            if self.clients.get(txn.key) is txn:
                del self.clients[txn.key]
        elif self.servers.get(txn.key) is txn:
            del self.servers[txn.key]
        if isinstance(txn, InviteServerTransaction) and txn.final_response is not None:
            key = _dialog_ack_key(txn.request)
            if self._awaiting_ack.get(key) is txn:
                del self._awaiting_ack[key]
        self._emit(TransactionTerminated(txn, reason))

    def _expect_ack(self, txn: InviteServerTransaction) -> None:
        self._awaiting_ack[_dialog_ack_key(txn.request)] = txn

    def _cached_ack(self, response: Response) -> Send | None:
        entry = self._acks.get((response.call_id, response.cseq.seq, response.from_.tag, response.to.tag))
        return entry[0] if entry else None

    def _expire_acks(self, now: float) -> None:
        # Insertion order is expiry order (same TTL for all), so stop at the first live one.
        while self._acks:
            key, (_, expires) = next(iter(self._acks.items()))
            if expires > now:
                break
            del self._acks[key]

    def _send_cancel(self, ict: InviteClientTransaction, now: float) -> list[Send]:
        ict.cancel_sent = True
        cancel = build_cancel(ict.request)
        _, sends = self.send_request(cancel, ict.dest, ict.transport, now)
        # 9.1: without a final response 64*T1 after the CANCEL, the INVITE has timed out.
        ict._start_timer(Timer.CANCEL, self.timers.cancel_wait(), now)
        return sends

    # -- server side ----------------------------------------------------------------------------
    def _receive_request(self, request: Request, source: Address, transport: str, now: float) -> list[Send]:
        apply_received(request, source)
        key = _server_key(request)
        method = request.method
        txn = self.servers.get(key)
        if method == "ACK":
            return self._receive_ack(request, txn, source, transport, now)
        if txn is not None:
            return self._feed_remote(txn, lambda: txn.receive_request(request, now))
        if method == "CANCEL":
            return self._receive_cancel(request, source, transport, now)
        new: ServerTransaction
        if method == "INVITE":
            new = InviteServerTransaction(self, request, source, transport, key)
        else:
            new = NonInviteServerTransaction(self, request, source, transport, key)
        self.servers[key] = new
        log.debug("%s: new from %s:%s/%s", new.id, source[0], source[1], transport)
        sends: list[Send] = []
        if method == "INVITE" and self.send_trying:
            # 8.2.6.1: 100 Trying carries no To tag (make_response adds none unless asked).
            sends = new.respond(make_response(request, 100, "Trying"), now)
        self._emit(RequestReceived(request, source, transport, new))
        return sends

    def _receive_ack(
        self, ack: Request, txn: ServerTransaction | None, source: Address, transport: str, now: float
    ) -> list[Send]:
        # 17.2.3: the ACK of a non-2xx carries the INVITE's branch and matches its transaction.
        if txn is not None and txn.state in (S.COMPLETED, S.CONFIRMED):
            return self._feed_remote(txn, lambda: txn.receive_request(ack, now))
        # Otherwise the ACK of a 2xx (new branch): it belongs to the dialog, not the transaction.
        ist = self._awaiting_ack.get(_dialog_ack_key(ack))
        if ist is not None:
            first = not ist.acked
            sends = self._feed_remote(ist, lambda: ist.receive_request(ack, now))
            if first:
                self._emit(AckReceived(ack, source, transport, ist))
            return sends
        self._emit(AckReceived(ack, source, transport, None))
        return []

    def _receive_cancel(self, cancel: Request, source: Address, transport: str, now: float) -> list[Send]:
        # 9.2: the CANCEL matches the INVITE server transaction with the same branch and sent-by.
        invite_key = (*_server_key(cancel)[:-1], "INVITE")
        ist = self.servers.get(invite_key)
        nist = NonInviteServerTransaction(self, cancel, source, transport, _server_key(cancel))
        self.servers[nist.key] = nist
        if not isinstance(ist, InviteServerTransaction):
            log.debug("CANCEL %s matches no transaction: 481", cancel.top_via.branch)
            return nist.respond(make_response(cancel, 481, "Call/Transaction Does Not Exist"), now)
        # 9.2: the To tag of the 200 is the one of the INVITE's responses, if any.
        last = ist.last_response
        to_tag = last.to.tag if last is not None else None
        sends = nist.respond(make_response(cancel, 200, "OK", to_tag=to_tag), now)
        if ist.state is S.PROCEEDING and not ist.cancelled:
            ist.cancelled = True
            self._emit(CancelReceived(cancel, source, transport, ist))
        return sends

    # -- client side ----------------------------------------------------------------------------
    def _receive_response(
        self, response: Response, source: Address, transport: str, now: float
    ) -> list[Send]:
        key = _client_key(response.branch, response.cseq.method)
        txn = self.clients.get(key)
        if txn is None:
            if response.cseq.method == "INVITE" and 200 <= response.status < 300:
                resend = self._cached_ack(response)
                if resend is not None:
                    return [resend]  # 13.2.2.4, after the client transaction ended
            self._emit(StrayResponse(response, source, transport))
            return []
        return self._feed_remote(txn, lambda: txn.receive_response(response, now))

    def _feed_remote(self, txn: Transaction, feed: Callable[[], list[Send]]) -> list[Send]:
        # A message from the network the state machine does not expect is the peer's problem:
        # log and drop it rather than fail the caller.
        try:
            return feed()
        except InvalidStateError as exc:
            log.info("%s: dropped: %s", txn.id, exc)
            return []

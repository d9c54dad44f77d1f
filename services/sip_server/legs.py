"""The B2BUA's base: its calls and their dialogs, and the requests it sends on a call's legs.

:class:`B2BUABase` holds what every part of the call control shares: the calls by id, which dialog
belongs to which call and leg, the tasks it spawned, the Resource Managers it opens bridges on. It
sends the in-dialog requests (re-INVITE, UPDATE, BYE, ...) on a call's legs; on the recording leg
with several RMs (active/active, docs/HA.md) a request whose RM does not answer is routed through
another RM. :meth:`B2BUABase.end_call` ends a call on every leg. The parts built on it:
``bridge`` (the recording bridge), ``rejoin`` (a bridge that is lost), ``in_dialog`` (requests
from the phones within a call) and ``b2bua`` (call setup, session timers, takeover, shutdown).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from services.config import ClusterConfig, parse_hostport
from services.sip.auth import DigestChallenger
from services.sip.errors import SipError, SipParseError
from services.sip.message import Request, Response, new_call_id, new_tag
from services.sip.uri import NameAddr, SipUri
from services.sip_server import session_timer as st
from services.sip_server.call import CallPhase, CallState, Leg
from services.sip_server.registrar import Registrar

#: One logger for all of the call control, whichever module a line comes from: the name operators
#: filter on (docs/BENCHMARKS.md quotes it).
log = logging.getLogger("services.sip_server.b2bua")

ALLOW = "INVITE, ACK, CANCEL, BYE, OPTIONS, INFO, UPDATE, MESSAGE, REGISTER"
SUPPORTED = frozenset({"timer"})
SDP = "application/sdp"
USER_AGENT = "callvault-sip-server"
#: Headers copied from a failure response of the other side to the phone's.
FAILURE_HEADERS = ("Reason", "Warning", "Retry-After")
#: How long an ended call's dialogs are remembered (64*T1: a BYE's retransmissions are over by then).
ENDED_DIALOG_TTL = 32.0
#: Seconds to wait for any answer of an RM (100 Trying for an INVITE) before trying another one.
RM_ANSWER_TIMEOUT = 1.0
#: Seconds an RM that did not answer is tried last.
RM_RETRY_AFTER = 10.0


class ClientRequestLike(Protocol):
    request: Request

    async def final(self) -> Response: ...

    def cancel(self) -> None: ...


class EndpointLike(Protocol):
    """What the B2BUA needs of :class:`services.sip.aio.SipEndpoint`."""

    host: str
    port: int

    def start_request(
        self,
        request: Request,
        dest: tuple[str, int],
        transport: str = "udp",
        *,
        on_provisional: Callable[[Response], None] | None = None,
    ) -> Any: ...

    def send_ack(self, ack: Request, dest: tuple[str, int], transport: str = "udp") -> None: ...

    def contact_uri(self, user: str | None = None, transport: str = "udp") -> SipUri: ...


def map_failure(status: int) -> tuple[int, str | None]:
    """The response A gets for B's final failure ``status`` (RFC 3261 16.7-like mapping)."""
    if status in (401, 407):
        return 480, "Temporarily Unavailable (callee requires authentication)"
    if 300 <= status < 400:
        return 480, "Temporarily Unavailable (redirect not followed)"
    if status == 408:
        return 480, "Temporarily Unavailable (callee did not answer)"
    if status == 503:
        return 480, "Temporarily Unavailable (callee unavailable)"
    if status in (420, 421, 423, 422):
        return 500, f"Server Internal Error (callee answered {status})"
    if 500 <= status < 600:
        return 502, "Bad Gateway"
    return status, None


def warning_header(host: str, text: str) -> tuple[str, str]:
    """A Warning header (RFC 3261 20.43) naming an SDP or protocol defect."""
    clean = text.replace("\\", "").replace('"', "'")[:200]
    return "Warning", f'399 {host} "{clean}"'


class Call:
    """A call's state plus its transient asyncio objects."""

    def __init__(self, state: CallState) -> None:
        self.state = state
        #: One offer/answer exchange at a time on a call; a second one gets 491 (RFC 3261 14.2).
        self.lock = asyncio.Lock()
        #: Set to abandon a call still being set up (BYE from B during setup, shutdown).
        self.abort = asyncio.Event()
        self.abort_status: tuple[int, str | None] = (503, "Service Unavailable")
        self.ended = asyncio.Event()
        #: Set when A's ACK arrived: a phone may send a re-INVITE right after its ACK, before the
        #: setup coroutine has seen the ACK; that is not glare.
        self.confirmed = asyncio.Event()

    def __repr__(self) -> str:
        s = self.state
        return f"<Call {s.id[:8]} {s.caller}->{s.callee}@{s.tenant} {s.phase.value}>"


class B2BUABase:
    """What the parts of :class:`services.sip_server.b2bua.B2BUA` share: see the module."""

    def __init__(
        self,
        config: ClusterConfig,
        endpoint: EndpointLike,
        registrar: Registrar,
        challenger: DigestChallenger,
        *,
        clock: Callable[[], float] = time.time,
        on_change: Callable[[CallState], None] | None = None,
    ) -> None:
        self.config = config
        self.sip = config.sip_server
        self.ep = endpoint
        self.registrar = registrar
        self.challenger = challenger
        self.clock = clock
        #: Replication hook: called with a call's state after each change (issue 5).
        self.on_change = on_change
        self.calls: dict[str, Call] = {}
        # (Call-ID, our tag) -> (call, leg name): how in-dialog requests find their call.
        self._dialogs: dict[tuple[str, str], tuple[Call, str]] = {}
        #: Dialogs of calls that ended recently -> until when (wall clock): a retransmitted BYE (to
        #: us, or to a standby that took over) is answered 200, not 481. Replicated (issue 5).
        self.ended_dialogs: dict[tuple[str, str], float] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self.accepting = True
        self.rm = parse_hostport(self.sip.resource_manager, "sip_server.resource_manager")
        #: Every RM (active/active, docs/HA.md): new bridges go to them in turn; an RM that did not
        #: answer is tried last for RM_RETRY_AFTER seconds.
        self.rms: list[tuple[str, int]] = [
            parse_hostport(v, f"sip_server.resource_managers[{i}]")
            for i, v in enumerate(self.sip.resource_managers)
        ] or [self.rm]
        self._rm_turn = 0
        self._rm_failed_until: dict[tuple[str, int], float] = {}
        #: The address we write in SDP o= lines, Call-IDs and Warning headers.
        self._host: str = getattr(endpoint, "advertised_host", None) or endpoint.host

    # ------------------------------------------------------------------ bookkeeping
    def _spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(self._guard(coro, name), name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    @staticmethod
    async def _guard(coro: Any, name: str) -> None:
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s failed", name)

    def _bind(self, call: Call, call_id: str, tag: str, leg: str) -> None:
        self._dialogs[(call_id, tag)] = (call, leg)

    def find(self, request: Request) -> tuple[Call, str] | None:
        """The call and leg of an in-dialog request (by Call-ID and our tag in To)."""
        try:
            key = (request.call_id, request.to.tag or "")
        except SipParseError:
            return None
        return self._dialogs.get(key)

    def _changed(self, call: Call) -> None:
        if self.on_change is not None:
            try:
                self.on_change(call.state)
            except Exception:
                log.exception("replication hook failed for %r", call)

    def _contact(self, transport: str, user: str | None = None) -> str:
        return f"<{self.ep.contact_uri(user, transport)}>"

    # ------------------------------------------------------------------ requests we send in dialog
    async def _rm_working(
        self, final: asyncio.Future[Response], rm: tuple[str, int], deadline: float
    ) -> bool:
        """An RM took an INVITE (100 Trying: a bridge, or a re-INVITE on one) and has no final
        answer yet (it may be trying MCPs): wait for the answer, and every RM_ANSWER_TIMEOUT ask
        the RM itself (OPTIONS) whether it still lives. False when the final answer has not come
        and the RM does not answer."""
        if final.done():
            return True
        while time.monotonic() < deadline:
            await asyncio.wait({final}, timeout=max(0.0, min(RM_ANSWER_TIMEOUT, deadline - time.monotonic())))
            if final.done():
                return True
            host, port = rm
            ping = Request("OPTIONS", SipUri("sip", None, None, host, port))
            for name, value in [
                ("From", f"<sip:sip-server@{self._host}:{self.ep.port}>;tag={new_tag()}"),
                ("To", f"<sip:{host}:{port}>"),
                ("Call-ID", new_call_id(self._host)),
                ("CSeq", "1 OPTIONS"),
                ("Max-Forwards", "70"),
            ]:
                ping.headers.add(name, value)
            try:
                answer = asyncio.ensure_future(self.ep.start_request(ping, rm, "udp").final())
            except (OSError, SipError):
                return False
            done, _ = await asyncio.wait(
                {answer, final}, timeout=RM_ANSWER_TIMEOUT / 2, return_when=asyncio.FIRST_COMPLETED
            )
            if final.done():
                return True
            if answer not in done or _transport_failure(answer.result()):
                answer.add_done_callback(lambda f: f.cancelled() or f.exception())
                return False
        return True

    def _rm_order(self) -> list[tuple[str, int]]:
        """The RMs for a new bridge: in turn (round robin), those that failed lately last."""
        n = len(self.rms)
        self._rm_turn = (self._rm_turn + 1) % n
        turn = [self.rms[(self._rm_turn + i) % n] for i in range(n)]
        now = time.monotonic()
        return sorted(turn, key=lambda rm: self._rm_failed_until.get(rm, 0.0) > now)

    async def _request(self, leg: Leg, req: Request) -> Response | None:
        host, port, transport = leg.destination()
        try:
            if leg.name == "rec" and len(self.rms) > 1:
                return await self._rec_request(leg, req)
            client = self.ep.start_request(req, (host, port), transport)
            return await client.final()
        except (OSError, SipError, LookupError) as exc:
            log.warning("%s on leg %s failed: %s", req.method, leg.name, exc)
            return None

    async def _rec_request(self, leg: Leg, req: Request) -> Response:
        """An in-dialog request on the recording leg with several RMs: it follows the dialog's
        route (the RM that Record-Routed it); when that RM does not answer within
        RM_ANSWER_TIMEOUT (or the request cannot be sent), the route is moved to another RM and the
        request sent again there (any RM routes in-dialog requests: docs/HA.md).

        An RM that took a re-INVITE (100 Trying) and then died took the final answer with it: the
        MCP's 2xx goes back through the RM that forwarded the re-INVITE (RFC 3261 16.7), and an
        INVITE client transaction past 100 Trying has no timer of its own (17.1.1.2: Timer B only
        runs in Calling). So while the final answer is due, the RM is asked every
        RM_ANSWER_TIMEOUT whether it lives (OPTIONS, as for a bridge INVITE); once it does not,
        the request takes another RM, after an ACK for the answer the MCP may have sent: an MCP
        that answered 2xx refuses another re-INVITE (491) until that 2xx is ACKed."""
        assert leg.dialog is not None
        host, port, _ = leg.destination()
        if self._rm_failed_until.get((host, port), 0.0) > time.monotonic() and self._reroute(
            leg, (host, port)
        ):
            _set_routes(req, leg.dialog.route_set)  # that RM failed lately: do not wait for it again
        for _ in range(len(self.rms)):
            host, port, transport = leg.destination()
            heard = asyncio.Event()
            client = self.ep.start_request(req, (host, port), transport, on_provisional=on_any(heard))
            final = asyncio.ensure_future(client.final())
            heard_task = asyncio.ensure_future(heard.wait())
            await asyncio.wait(
                {final, heard_task}, timeout=RM_ANSWER_TIMEOUT, return_when=asyncio.FIRST_COMPLETED
            )
            heard_task.cancel()
            taken = False
            if final.done():
                if not _transport_failure(final.result()):
                    return final.result()
            elif heard.is_set():
                if await self._rm_working(final, (host, port), math.inf):
                    return await final
                taken = True
                if req.method == "INVITE":
                    client.cancel()  # ends our transaction once the CANCEL goes unanswered (9.1)
                final.add_done_callback(lambda f: f.cancelled() or f.exception())
            else:
                final.add_done_callback(lambda f: f.cancelled() or f.exception())
            if not self._reroute(leg, (host, port)):
                return await final
            _set_routes(req, leg.dialog.route_set)
            if taken and req.method == "INVITE":
                # The 2xx may have been lost with the RM: ACK it through the new route (an ACK the
                # MCP cannot match is dropped), so that the re-INVITE sent again is not refused.
                log.warning(
                    "recording dialog %s: RM %s:%d died with re-INVITE %d; ACKed through the new "
                    "route in case its answer was lost, and sent again",
                    leg.dialog.call_id,
                    host,
                    port,
                    req.cseq.seq,
                )
                hop = leg.destination()
                self.ep.send_ack(leg.dialog.create_ack(req), hop[:2], hop[2])
        return await final

    def _reroute(self, leg: Leg, dead: tuple[str, int]) -> bool:
        """Point the recording leg's route at another RM when its first hop is the RM ``dead``."""
        assert leg.dialog is not None
        routes = leg.dialog.route_set
        if not routes or dead not in self.rms:
            return False
        try:
            first = NameAddr.parse(routes[0]).uri
        except SipError:
            return False
        if (first.host, first.port or 5060) != dead:
            return False
        self._rm_failed_until[dead] = time.monotonic() + RM_RETRY_AFTER
        alive = [rm for rm in self._rm_order() if rm != dead]
        if not alive:
            return False
        host, port = alive[0]
        routes[0] = f"<sip:{host}:{port};lr>"
        log.warning(
            "recording dialog %s: RM %s:%d not answering; routed via %s:%d",
            leg.dialog.call_id,
            *dead,
            host,
            port,
        )
        return True

    async def _reinvite(
        self, call: Call, leg: Leg, body: bytes, headers: list[tuple[str, str]] | None = None
    ) -> Response | None:
        """Send a re-INVITE with ``body`` on ``leg``; ACK a 2xx; return the final response."""
        assert leg.dialog is not None
        req = leg.dialog.create_request(
            "INVITE", body=body, content_type=SDP, headers=[("Allow", ALLOW), *(headers or [])]
        )
        resp = await self._request(leg, req)
        if resp is not None and 200 <= resp.status < 300:
            leg.dialog.receive_response(req, resp)
            host, port, transport = leg.destination()
            self.ep.send_ack(leg.dialog.create_ack(req), (host, port), transport)
        return resp

    async def _bye(self, call: Call, leg: Leg, reason: str) -> None:
        if not leg.confirmed or leg.dialog is None:
            return
        leg.confirmed = False
        # RFC 3326 Reason: cause 200 for a call that was answered; 487 for one ended during setup,
        # which tells the MCP that a bridge without media was never a conversation to keep.
        cause = 200 if call.state.answered else 487
        req = leg.dialog.create_request("BYE", headers=[("Reason", f'SIP;cause={cause};text="{reason}"')])
        resp = await self._request(leg, req)
        if resp is not None and resp.status >= 300:
            log.info("call %s: BYE on leg %s answered %d", call.state.id[:8], leg.name, resp.status)

    async def end_call(self, call: Call, reason: str, *, skip: Iterable[str] = ()) -> None:
        """BYE every confirmed leg (except ``skip``), forget the call. Idempotent."""
        state = call.state
        if state.phase in (CallPhase.ENDING, CallPhase.ENDED):
            if state.phase == CallPhase.ENDING:
                await call.ended.wait()
            return
        state.phase = CallPhase.ENDING
        state.end_reason = state.end_reason or reason
        for name in skip:
            with contextlib.suppress(KeyError):
                state.leg(name).confirmed = False
        legs = [leg for leg in state.legs() if leg.confirmed]
        self._changed(call)  # a standby taking over now finishes the ending (see adopt)
        if legs:
            log.info(
                "call %s: ending (%s): BYE %s", state.id[:8], reason, ", ".join(leg.name for leg in legs)
            )
        await asyncio.gather(*(self._bye(call, leg, reason) for leg in legs), return_exceptions=True)
        state.phase = CallPhase.ENDED
        self.calls.pop(state.id, None)
        until = self.clock() + ENDED_DIALOG_TTL
        for key in [k for k, (c, _) in self._dialogs.items() if c is call]:
            del self._dialogs[key]
            self.ended_dialogs[key] = until
        call.ended.set()
        self._changed(call)

    def _refresh_headers(self, leg: Leg) -> list[tuple[str, str]]:
        interval = leg.timer.interval or self.sip.session_expires
        return st.uac_request_headers(interval, self.sip.min_se)


def _set_routes(req: Request, routes: list[str]) -> None:
    req.headers.remove("Route")
    for route in routes:
        req.headers.add("Route", route)


def on_any(event: asyncio.Event) -> Callable[[Response], None]:
    """A provisional-response callback that sets ``event`` (the next hop is alive)."""
    return lambda _response: event.set()


def _transport_failure(resp: Response) -> bool:
    """The transaction layer's own 408 (timeout) or 503 without Retry-After (transport error)."""
    return resp.status == 408 or (resp.status == 503 and "Retry-After" not in resp.headers)

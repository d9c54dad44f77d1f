"""B2BUA call control: calls between registered users, recorded through the RM/MCP bridge.

One :class:`Call` per call: its replicable :class:`~services.sip_server.call.CallState` plus the few
asyncio objects that only live while something is in flight (a lock serialising offer/answer
exchanges, an abort event for calls being set up). The flows are drawn in docs/CALL_FLOWS.md:

- setup: authenticate A (407), find B's bindings (404 / 480), decide on recording, open the
  recording bridge (RM -> MCP) if the tenant's policy says so, INVITE B (highest-q, most recently
  registered contact), relay provisional responses (183 early media anchored on the MCP), CANCEL /
  no-answer timeout / B's failure, then B's 2xx: ACK B, re-INVITE the MCP with B's media, 200 to A;
- in dialog: BYE from either side ends every leg; re-INVITE / UPDATE offers are relayed to the
  other side (anchored on the MCP's ports when recorded), one at a time per call (491 otherwise);
  INFO / OPTIONS / MESSAGE relayed; session timers refreshed or enforced per leg.

The recording is never worth a call: a bridge that does not answer within
``sip_server.recording_timeout`` (or fails) leaves the call unrecorded, with an error logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from services.config import ClusterConfig, Tenant, parse_hostport
from services.sdp import SdpParseError, SessionDescription
from services.sip.auth import DigestChallenger
from services.sip.dialog import Dialog
from services.sip.errors import SipError, SipParseError
from services.sip.message import Request, Response, new_call_id, new_tag
from services.sip.uri import NameAddr, SipUri
from services.sip_server import media
from services.sip_server import session_timer as st
from services.sip_server.call import CallPhase, CallState, Leg
from services.sip_server.media import MediaError, SdpOwner
from services.sip_server.policy import CallInfo, bridge_headers, decide
from services.sip_server.registrar import Binding, Registrar, authenticate

log = logging.getLogger(__name__)

ALLOW = "INVITE, ACK, CANCEL, BYE, OPTIONS, INFO, UPDATE, MESSAGE, REGISTER"
SUPPORTED = frozenset({"timer"})
SDP = "application/sdp"
USER_AGENT = "callvault-sip-server"
#: Headers copied from B's failure response to A's.
_FAILURE_HEADERS = ("Reason", "Warning", "Retry-After")
#: Headers copied on relayed INFO / OPTIONS / MESSAGE requests and their responses.
_RELAY_REQUEST_HEADERS = ("Info-Package", "Content-Disposition", "Event", "Accept")
_RELAY_RESPONSE_HEADERS = ("Allow", "Accept", "Supported", "Content-Disposition", "Recv-Info")
#: How long an ended call's dialogs are remembered (64*T1: a BYE's retransmissions are over by then).
ENDED_DIALOG_TTL = 32.0
#: How far an adopted call's local CSeqs jump (see B2BUA.adopt).
ADOPT_CSEQ_GAP = 100


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


def _warning(host: str, text: str) -> tuple[str, str]:
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


class B2BUA:
    """Call control for one SIP Server; ``handle_*`` are called by the daemon's dispatcher."""

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

    # ------------------------------------------------------------------ new calls
    async def handle_invite(self, inc: Any) -> None:
        """An out-of-dialog INVITE from a phone: authenticate, check, set the call up."""
        req: Request = inc.request
        if not self.accepting:
            inc.respond(503, "Service Unavailable (shutting down)", headers=[("Retry-After", "5")])
            return
        now = self.clock()
        tenant = self.registrar.tenant_for(req)
        if tenant is None:
            inc.respond(404, "No tenant serves this domain")
            return
        # An unknown caller is challenged and refused like a wrong password (407, then 403).
        username, challenge = authenticate(req, self.challenger, tenant, now, proxy=True, source=inc.source)
        if challenge is not None:
            inc.send(challenge)
            return
        assert username is not None
        if (req.from_.uri.user or "") != username:
            inc.respond(403, "Forbidden (From does not match the credentials)")
            return
        unsupported = [
            o.strip() for o in req.headers.get_all("Require") if o.strip().lower() not in SUPPORTED
        ]
        if unsupported:
            inc.respond(420, headers=[("Unsupported", ", ".join(unsupported))])
            return
        callee = req.uri.user or ""
        if not callee:
            inc.respond(484, "Address Incomplete")
            return
        if tenant.user(callee) is None:
            inc.respond(404, "Not Found")
            return
        if not req.body:
            inc.respond(
                488,
                "Not Acceptable Here (an SDP offer is required)",
                headers=[_warning(self._host, "INVITE without SDP offer")],
            )
            return
        ctype = (req.content_type or "").split(";")[0].strip().lower()
        if ctype != SDP:
            inc.respond(415, headers=[("Accept", SDP)])
            return
        try:
            offer = SessionDescription.parse(req.body)
        except SdpParseError as exc:
            log.info("INVITE %s: malformed SDP: %s", req.call_id, exc)
            inc.respond(488, "Not Acceptable Here (malformed SDP)", headers=[_warning(self._host, str(exc))])
            return
        try:
            timer = st.negotiate_uas(req, default_interval=self.sip.session_expires, min_se=self.sip.min_se)
        except st.SessionTimerError as exc:
            inc.respond(400, f"Bad Request ({exc})")
            return
        if timer.reject_min_se is not None:
            inc.respond(422, headers=[("Min-SE", str(timer.reject_min_se))])
            return
        bindings = self.registrar.store.lookup(tenant.id, callee, now)
        if not bindings:
            inc.respond(480, "Temporarily Unavailable (not registered)")
            return
        state = CallState(
            tenant=tenant.id, caller=username, callee=callee, a_call_id=req.call_id, created=now
        )
        state.a.dialog = Dialog.from_uas(
            req, new_tag(), local_target=self.ep.contact_uri(None, inc.transport)
        )
        state.a.dest = (inc.source[0], inc.source[1], inc.transport)
        state.a.remote_sdp = req.body
        state.a.allow_update = "UPDATE" in _allow(req)
        assert timer.timer is not None
        state.a.timer = timer.timer
        state.info = CallInfo(
            call_id=req.call_id,
            from_uri=str(req.from_.uri),
            from_display=req.from_.display or "",
            to_uri=str(req.to.uri),
            to_display=req.to.display or "",
            caller=username,
            callee=callee,
        ).to_dict()
        call = Call(state)
        self.calls[state.id] = call
        self._bind(call, req.call_id, state.a.dialog.local_tag, "a")
        log.info(
            "call %s: %s -> %s (tenant %s, Call-ID %s)",
            state.id[:8],
            username,
            callee,
            tenant.id,
            req.call_id,
        )
        try:
            async with call.lock:
                await self._setup(call, inc, tenant, bindings[0], offer, list(timer.headers))
        except Exception:
            log.exception("call %s: setup failed", state.id[:8])
            if not inc.answered:
                with contextlib.suppress(Exception):
                    inc.respond(500, "Server Internal Error", to_tag=state.a.dialog.local_tag)
            await self.end_call(call, "internal error")
        if state.phase == CallPhase.ENDED or not state.a.confirmed:
            await self.end_call(call, state.end_reason or "setup ended")

    async def _setup(
        self,
        call: Call,
        inc: Any,
        tenant: Tenant,
        binding: Binding,
        offer: SessionDescription,
        a_timer_headers: list[tuple[str, str]],
    ) -> bool:
        """The INVITE flow after the checks; returns True once a final response went to A."""
        state = call.state
        req: Request = inc.request
        a_tag = state.a.dialog.local_tag  # type: ignore[union-attr]
        decision = decide(tenant, state.caller, state.callee)
        state.record = decision.record
        log.info(
            "call %s: %s (%s)",
            state.id[:8],
            "recorded" if decision.record else "not recorded",
            decision.reason,
        )
        if decision.record:
            if media.first_audio(offer) is None:
                log.error("call %s: no audio stream in the offer; the call goes on unrecorded", state.id[:8])
            else:
                try:
                    await self._open_recording(call, offer)
                except Exception:
                    # the call is more important than its recording
                    log.exception("call %s: opening the recording failed; unrecorded", state.id[:8])
                    state.recording = False
        if inc.cancelled.is_set() or call.abort.is_set():
            code, text = (487, None) if inc.cancelled.is_set() else call.abort_status
            inc.respond(code, text, to_tag=a_tag)
            state.end_reason = "cancelled"
            return True

        # -- INVITE B
        dest = binding.destination()
        transport = dest[2]
        if state.recording:
            state.b.owner = SdpOwner(self._host)
            state.a.owner = SdpOwner(self._host)
            b_offer = media.anchor(offer, *state.mcp["callee"], state.b.owner).to_bytes()
        else:
            b_offer = req.body
        from_ = NameAddr(
            req.from_.display, SipUri("sip", state.caller, None, req.uri.host), {"tag": new_tag()}
        )
        to = NameAddr(req.to.display, SipUri("sip", state.callee, None, req.uri.host), {})
        b_call_id = new_call_id(self._host)
        b_req = Request("INVITE", binding.uri)
        for name, value in [
            ("From", str(from_)),
            ("To", str(to)),
            ("Call-ID", b_call_id),
            ("CSeq", "1 INVITE"),
            ("Contact", self._contact(transport)),
            ("Allow", ALLOW),
            *st.uac_request_headers(state.a.timer.interval or self.sip.session_expires, self.sip.min_se),
            ("User-Agent", USER_AGENT),
            ("Content-Type", SDP),
        ]:
            b_req.headers.add(name, value)
        b_req.body = b_offer
        # A B2BUA that loops back to itself must still run out of hops (RFC 3261 16.6 step 3).
        b_req.headers.set("Max-Forwards", str(max(0, min(70, (req.max_forwards or 70) - 1))))
        state.b.dest = dest
        state.b.local_sdp = b_offer
        self._bind(call, b_call_id, from_.tag or "", "b")
        provisional: asyncio.Queue[Response] = asyncio.Queue()
        client = self.ep.start_request(b_req, dest[:2], transport, on_provisional=provisional.put_nowait)
        final_task = asyncio.ensure_future(client.final())
        cancelled_task = asyncio.ensure_future(inc.cancelled.wait())
        abort_task = asyncio.ensure_future(call.abort.wait())
        deadline = time.monotonic() + self.sip.no_answer_timeout
        early_sdp = b""  # B's SDP of a 183 already applied to the bridge
        try:
            while True:
                if not provisional.empty():
                    early_sdp = await self._relay_provisional(call, inc, provisional.get_nowait(), early_sdp)
                    continue
                get_task = asyncio.ensure_future(provisional.get())
                done, _ = await asyncio.wait(
                    {final_task, cancelled_task, abort_task, get_task},
                    timeout=max(0.0, deadline - time.monotonic()),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if get_task in done:
                    early_sdp = await self._relay_provisional(call, inc, get_task.result(), early_sdp)
                else:
                    get_task.cancel()
                if final_task in done:
                    break
                if cancelled_task in done or abort_task in done or not done:
                    if cancelled_task in done:
                        status, reason, why = 487, None, "cancelled by the caller"
                    elif abort_task in done:
                        status, reason = call.abort_status
                        why = "aborted"
                    else:
                        status, reason, why = 480, "Temporarily Unavailable (no answer)", "no answer"
                    log.info("call %s: %s; cancelling B", state.id[:8], why)
                    client.cancel()
                    inc.respond(status, reason, to_tag=a_tag)
                    state.end_reason = why
                    self._spawn(self._reap_cancelled(call, client, final_task), f"reap-{state.id[:8]}")
                    return True
        finally:
            cancelled_task.cancel()
            abort_task.cancel()
        resp = final_task.result()
        if resp.status >= 300:
            status, reason = map_failure(resp.status)
            headers = [(n, v) for n in _FAILURE_HEADERS for v in resp.headers.get_all(n)]
            log.info("call %s: B answered %d %s -> %d to A", state.id[:8], resp.status, resp.reason, status)
            inc.respond(status, reason or resp.reason, to_tag=a_tag, headers=headers)
            state.end_reason = f"callee {resp.status}"
            return True

        # -- B answered
        b_dialog = Dialog.from_uac(client.request, resp)
        state.b.dialog = b_dialog
        state.b.confirmed = True
        state.b.allow_update = "UPDATE" in _allow(resp)
        state.b.remote_sdp = resp.body
        state.b.timer = st.timer_from_uac_response(resp, state.a.timer.interval or self.sip.session_expires)
        self.ep.send_ack(b_dialog.create_ack(client.request), dest[:2], transport)
        try:
            answer = SessionDescription.parse(resp.body)
        except SdpParseError as exc:
            log.error("call %s: B answered with unusable SDP (%s)", state.id[:8], exc)
            inc.respond(
                502,
                "Bad Gateway (callee sent no usable SDP)",
                to_tag=a_tag,
                headers=[_warning(self._host, str(exc))],
            )
            state.end_reason = "callee SDP"
            return True
        if inc.cancelled.is_set() or call.abort.is_set():
            code, text = (487, None) if inc.cancelled.is_set() else call.abort_status
            inc.respond(code, text, to_tag=a_tag)
            state.end_reason = "cancelled after answer"
            return True
        a_answer = resp.body
        if state.recording:
            if not media.same_session_version(early_sdp, resp.body):
                await self._update_bridge(call, offer, answer)
            try:
                a_answer = media.anchor(answer, *state.mcp["caller"], state.a.owner).to_bytes()
            except MediaError as exc:  # B declined the audio stream: nothing to anchor
                log.warning("call %s: B's answer not anchored (%s)", state.id[:8], exc)
        if inc.cancelled.is_set() or call.abort.is_set():
            code, text = (487, None) if inc.cancelled.is_set() else call.abort_status
            inc.respond(code, text, to_tag=a_tag)
            state.end_reason = "cancelled after answer"
            return True
        state.a.local_sdp = a_answer
        inc.respond(
            200,
            to_tag=a_tag,
            headers=[
                ("Contact", self._contact(inc.transport)),
                ("Allow", ALLOW),
                ("Supported", "timer"),
                *a_timer_headers,
            ],
            body=a_answer,
            content_type=SDP,
        )
        state.a.confirmed = True
        state.phase = CallPhase.ANSWERED
        state.answered = self.clock()
        self._changed(call)
        ack = await inc.wait_ack(32.0)
        if ack is None:
            log.warning("call %s: no ACK from A for our 200; ending the call", state.id[:8])
            state.end_reason = "no ACK"
            await self.end_call(call, "no ACK from caller")
            return True
        if state.phase != CallPhase.ANSWERED:
            return True  # ended while waiting (BYE from B)
        state.phase = CallPhase.CONFIRMED
        call.confirmed.set()
        now = self.clock()
        state.a.timer.start(now)
        state.b.timer.start(now)
        log.info("call %s: established%s", state.id[:8], " (recorded)" if state.recording else "")
        self._changed(call)
        return True

    async def _relay_provisional(self, call: Call, inc: Any, resp: Response, early_sdp: bytes) -> bytes:
        """180/183 from B to A; early media SDP anchored on the MCP when recorded."""
        state = call.state
        if resp.status == 100 or state.a.confirmed:
            return early_sdp
        if state.phase == CallPhase.SETUP:
            state.phase = CallPhase.EARLY
        body = b""
        if resp.body and (resp.content_type or "").split(";")[0].strip().lower() == SDP:
            try:
                early = SessionDescription.parse(resp.body)
            except SdpParseError as exc:
                log.info("call %s: ignoring malformed early SDP from B: %s", state.id[:8], exc)
            else:
                body = resp.body
                if state.recording:
                    if not media.same_session_version(early_sdp, resp.body):
                        offer = SessionDescription.parse(state.a.remote_sdp)
                        await self._update_bridge(call, offer, early)
                        early_sdp = resp.body
                    try:
                        body = media.anchor(early, *state.mcp["caller"], state.a.owner).to_bytes()
                    except MediaError:
                        body = b""  # no audio to anchor: ringing without early media
        if inc.cancelled.is_set() or state.a.confirmed:
            return early_sdp
        inc.respond(
            resp.status,
            resp.reason,
            to_tag=state.a.dialog.local_tag,  # type: ignore[union-attr]
            headers=[("Contact", self._contact(inc.transport))],
            body=body,
            content_type=SDP if body else None,
        )
        return early_sdp

    async def _reap_cancelled(self, call: Call, client: Any, final_task: asyncio.Future[Response]) -> None:
        """After CANCEL: B may still answer 2xx (the race of RFC 3261 9.1); ACK and BYE it."""
        try:
            resp = await asyncio.wait_for(asyncio.shield(final_task), 40.0)
        except TimeoutError:
            return
        if 200 <= resp.status < 300:
            log.info("call %s: B answered despite CANCEL; ACK + BYE", call.state.id[:8])
            try:
                dialog = Dialog.from_uac(client.request, resp)
            except SipError as exc:
                log.warning("call %s: cannot build B's dialog: %s", call.state.id[:8], exc)
                return
            dest = call.state.b.dest or dialog.next_hop()
            self.ep.send_ack(dialog.create_ack(client.request), dest[:2], dest[2])
            leg = Leg("b", dialog=dialog, dest=dest, confirmed=True)
            await self._bye(call, leg, "call cancelled")

    # ------------------------------------------------------------------ recording bridge
    async def _open_recording(self, call: Call, offer: SessionDescription) -> None:
        """INVITE the RM for a bridge; on success the call's media is anchored on the MCP."""
        state = call.state
        state.session_id = state.session_id or uuid.uuid4().hex
        rec = Leg("rec", owner=SdpOwner(self._host))
        try:
            body = media.bridge_offer(offer, rec.owner).to_bytes()  # type: ignore[arg-type]
        except MediaError as exc:
            log.error("call %s: cannot build the bridge offer (%s); unrecorded", state.id[:8], exc)
            return
        state.rec = rec
        rec.local_sdp = body
        deadline = time.monotonic() + self.sip.recording_timeout
        candidates = self._rm_order()
        for i, (host, port) in enumerate(candidates):
            tag = new_tag()
            call_id = new_call_id(self._host)
            req = Request("INVITE", SipUri("sip", "record", None, host, port))
            for name, value in [
                ("From", f"<sip:sip-server@{self._host}:{self.ep.port}>;tag={tag}"),
                ("To", f"<sip:record@{host}:{port}>"),
                ("Call-ID", call_id),
                ("CSeq", "1 INVITE"),
                ("Contact", self._contact("udp")),
                ("Allow", ALLOW),
                ("User-Agent", USER_AGENT),
                *bridge_headers(state.tenant, state.session_id, state.part, CallInfo(**state.info)),
                ("Content-Type", SDP),
            ]:
                req.headers.add(name, value)
            req.body = body
            self._bind(call, call_id, tag, "rec")
            heard = asyncio.Event()
            client = self.ep.start_request(req, (host, port), "udp", on_provisional=_on_any(heard))
            final_task = asyncio.ensure_future(client.final())
            if i == len(candidates) - 1:
                break  # the last RM gets what is left of recording_timeout
            heard_task = asyncio.ensure_future(heard.wait())
            wait = max(0.0, min(RM_ANSWER_TIMEOUT, deadline - time.monotonic()))
            await asyncio.wait({final_task, heard_task}, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
            heard_task.cancel()
            if final_task.done() and _rm_refused(final_task.result()):
                why = f"{final_task.result().status} {final_task.result().reason}"
            elif final_task.done() or (
                heard.is_set() and await self._rm_working(final_task, (host, port), deadline)
            ):
                break
            elif heard.is_set():
                why = "it stopped answering after 100 Trying"
                client.cancel()
                self._spawn(self._reap_cancelled_rec(call, client, final_task), f"reap-rec-{state.id[:8]}")
            else:
                why = f"no answer within {wait:.1f} s"
                client.cancel()
                self._spawn(self._reap_cancelled_rec(call, client, final_task), f"reap-rec-{state.id[:8]}")
            self._rm_failed_until[(host, port)] = time.monotonic() + RM_RETRY_AFTER
            self._dialogs.pop((call_id, tag), None)
            log.warning("call %s: RM %s:%d failed (%s); trying the next RM", state.id[:8], host, port, why)
        done, _ = await asyncio.wait({final_task}, timeout=max(0.0, deadline - time.monotonic()))
        if not done:
            log.error(
                "call %s: the recording bridge did not answer within %.1f s; the call goes on unrecorded",
                state.id[:8],
                self.sip.recording_timeout,
            )
            client.cancel()
            self._spawn(self._reap_cancelled_rec(call, client, final_task), f"reap-rec-{state.id[:8]}")
            return
        resp = final_task.result()
        if resp.status >= 300:
            log.error(
                "call %s: the recording bridge refused (%d %s); the call goes on unrecorded",
                state.id[:8],
                resp.status,
                resp.reason,
            )
            return
        rec.dialog = Dialog.from_uac(client.request, resp)
        rec.confirmed = True
        hop = rec.dialog.next_hop()
        self.ep.send_ack(rec.dialog.create_ack(client.request), hop[:2], hop[2])
        rec.remote_sdp = resp.body
        try:
            state.mcp = media.mcp_ports(SessionDescription.parse(resp.body))
        except (SdpParseError, MediaError, ValueError) as exc:
            log.error("call %s: unusable bridge answer (%s); the call goes on unrecorded", state.id[:8], exc)
            await self._bye(call, rec, "unusable answer")
            return
        state.recording = True
        log.info(
            "call %s: recording session %s, MCP caller %s:%d callee %s:%d",
            state.id[:8],
            state.session_id,
            *state.mcp["caller"],
            *state.mcp["callee"],
        )

    async def _reap_cancelled_rec(
        self, call: Call, client: Any, final_task: asyncio.Future[Response]
    ) -> None:
        try:
            resp = await asyncio.wait_for(asyncio.shield(final_task), 40.0)
        except TimeoutError:
            return
        if 200 <= resp.status < 300:
            log.info("call %s: late bridge answer; ACK + BYE", call.state.id[:8])
            dialog = Dialog.from_uac(client.request, resp)
            hop = dialog.next_hop()
            self.ep.send_ack(dialog.create_ack(client.request), hop[:2], hop[2])
            await self._bye(call, Leg("rec", dialog=dialog, confirmed=True), "late answer")

    async def _update_bridge(self, call: Call, a_sdp: SessionDescription, b_sdp: SessionDescription) -> bool:
        """re-INVITE the MCP with both parties' current media. Failure is logged, not fatal: the
        MCP latches on the first RTP it receives anyway (symmetric RTP)."""
        state = call.state
        rec = state.rec
        if rec is None or not rec.confirmed or rec.dialog is None or rec.owner is None:
            return False
        try:
            body = media.bridge_update(a_sdp, b_sdp, rec.owner).to_bytes()
        except (MediaError, ValueError) as exc:
            log.error("call %s: cannot update the bridge (%s)", state.id[:8], exc)
            return False
        try:
            resp = await self._reinvite(call, rec, body)
        except Exception:
            log.exception("call %s: bridge re-INVITE failed", state.id[:8])
            return False
        if resp is None or resp.status >= 300:
            log.error(
                "call %s: bridge re-INVITE failed (%s)",
                state.id[:8],
                f"{resp.status} {resp.reason}" if resp is not None else "no answer",
            )
            return False
        try:
            ports = media.mcp_ports(SessionDescription.parse(resp.body))
        except (SdpParseError, MediaError, ValueError) as exc:
            log.error("call %s: unusable bridge re-answer (%s)", state.id[:8], exc)
            return False
        if ports != state.mcp:
            log.warning("call %s: the MCP changed its ports to %s", state.id[:8], ports)
        return True

    # ------------------------------------------------------------------ requests we send in dialog
    async def _rm_working(
        self, final: asyncio.Future[Response], rm: tuple[str, int], deadline: float
    ) -> bool:
        """An RM took a bridge INVITE (100 Trying) and has no final answer yet (it may be trying
        MCPs): wait for the answer, and every RM_ANSWER_TIMEOUT ask the RM itself (OPTIONS) whether
        it still lives. False when the final answer has not come and the RM does not answer."""
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
        request sent again there (any RM routes in-dialog requests: docs/HA.md)."""
        assert leg.dialog is not None
        host, port, _ = leg.destination()
        if self._rm_failed_until.get((host, port), 0.0) > time.monotonic() and self._reroute(
            leg, (host, port)
        ):
            _set_routes(req, leg.dialog.route_set)  # that RM failed lately: do not wait for it again
        for _ in range(len(self.rms)):
            host, port, transport = leg.destination()
            heard = asyncio.Event()
            client = self.ep.start_request(req, (host, port), transport, on_provisional=_on_any(heard))
            final = asyncio.ensure_future(client.final())
            heard_task = asyncio.ensure_future(heard.wait())
            await asyncio.wait(
                {final, heard_task}, timeout=RM_ANSWER_TIMEOUT, return_when=asyncio.FIRST_COMPLETED
            )
            heard_task.cancel()
            silent = not final.done() and not heard.is_set()
            if not silent and not (final.done() and _transport_failure(final.result())):
                return await final
            if silent:
                final.add_done_callback(lambda f: f.cancelled() or f.exception())
            if not self._reroute(leg, (host, port)):
                return await final
            _set_routes(req, leg.dialog.route_set)
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

    # ------------------------------------------------------------------ in-dialog requests
    async def handle_in_dialog(self, inc: Any) -> None:
        """A request with a To tag: find its call and leg, or answer 481."""
        req: Request = inc.request
        found = self.find(req)
        if found is None:
            if req.method == "BYE" and self._recently_ended(req):
                inc.respond(200)  # a retransmission of a BYE already handled (here or by the peer)
            elif req.method != "ACK":
                inc.respond(481)
            return
        call, name = found
        leg = call.state.leg(name)
        if leg.dialog is not None:
            try:
                leg.dialog.receive_request(req)
            except SipParseError as exc:
                inc.respond(exc.status, exc.reason)
                return
        if name in ("a", "b") and inc.transport == "udp" and leg.dest is not None:
            leg.dest = (inc.source[0], inc.source[1], "udp")  # follow a NAT rebinding
        method = req.method
        if method == "BYE":
            await self._on_bye(call, name, inc)
        elif method in ("INVITE", "UPDATE"):
            if name == "rec":
                await self._on_rec_offer(call, inc)
            else:
                await self._on_offer(call, name, inc)
        elif method in ("INFO", "OPTIONS", "MESSAGE", "NOTIFY"):
            await self._relay_request(call, name, inc)
        elif method == "PRACK":
            inc.respond(481, "No reliable provisional response pending")
        else:
            inc.respond(405, headers=[("Allow", ALLOW)])
        if call.state.phase not in (CallPhase.ENDING, CallPhase.ENDED):
            self._changed(call)  # CSeqs, targets, timers moved on: replicate (issue 5)

    def _recently_ended(self, req: Request) -> bool:
        try:
            key = (req.call_id, req.to.tag or "")
        except SipParseError:
            return False
        return self.ended_dialogs.get(key, 0.0) > self.clock()

    def adopt(self, state: CallState) -> Call:
        """Take over a call from a hot standby's replica (issue 5): bind its dialogs so that
        in-dialog requests find it, arm its session timers. A call whose caller's ACK had not
        been seen is treated as established; one that was ending is ended again. Our CSeq on each
        leg jumps by :data:`ADOPT_CSEQ_GAP`: requests the dead peer sent after its last replicated
        change must not be outnumbered (RFC 3261 12.2.1.1 asks for increasing, not consecutive)."""
        call = Call(state)
        ending = state.phase == CallPhase.ENDING
        if state.phase in (CallPhase.ANSWERED, CallPhase.ENDING):
            state.phase = CallPhase.CONFIRMED
        if state.phase == CallPhase.CONFIRMED:
            call.confirmed.set()
        self.calls[state.id] = call
        for leg in state.legs():
            if leg.dialog is not None:
                leg.dialog.local_cseq += ADOPT_CSEQ_GAP
                self._bind(call, leg.dialog.call_id, leg.dialog.local_tag, leg.name)
        if ending:
            # Which BYEs went out before the takeover is unknown: send them on every leg (a leg
            # that already ended answers 481, harmless).
            for leg in state.legs():
                leg.confirmed = leg.dialog is not None
            self._spawn(self.end_call(call, state.end_reason or "ending"), f"end-{state.id[:8]}")
        return call

    async def _on_bye(self, call: Call, name: str, inc: Any) -> None:
        state = call.state
        inc.respond(200)
        leg = state.leg(name)
        leg.confirmed = False
        if name == "rec":
            await self._on_recording_ended(call, inc.request)
            return
        if state.phase in (CallPhase.SETUP, CallPhase.EARLY) and name == "b":
            call.abort_status = (480, "Temporarily Unavailable (callee hung up)")
            call.abort.set()
            return
        log.info("call %s: BYE from %s", state.id[:8], "caller" if name == "a" else "callee")
        await self.end_call(call, f"BYE from {'caller' if name == 'a' else 'callee'}", skip=[name])

    async def _on_recording_ended(self, call: Call, bye: Request | None = None) -> None:
        """The MCP (or RM) ended the recording dialog: re-join A and B directly so the call
        survives (issue 5: the media no longer flows through a bridge that is gone). When the RM
        ended it because the MCP died (Reason cause 503), record the call again as a new part."""
        state = call.state
        rerecord = bye is not None and mcp_lost(bye)
        log.warning(
            "call %s: the recording bridge ended the session%s",
            state.id[:8],
            " (MCP down: re-joining, then recording a new part)" if rerecord else "",
        )
        if state.rec is not None and state.rec.dialog is not None:
            # A second BYE for the same bridge (both RMs report a dead MCP) finds no call.
            self._dialogs.pop((state.rec.dialog.call_id, state.rec.dialog.local_tag), None)
        was_recording = state.recording
        state.recording = False
        if not was_recording or state.phase in (CallPhase.ENDING, CallPhase.ENDED):
            return
        self._spawn(self._rejoin(call, rerecord=rerecord), f"rejoin-{state.id[:8]}")

    async def _rejoin(self, call: Call, *, rerecord: bool = False) -> None:
        # The next part's bridge is opened while the phones are re-joined (it needs only A's
        # media, which the re-join does not change): the recording gap shrinks by that much.
        part = asyncio.ensure_future(self._open_part(call)) if rerecord else None
        try:
            moved = await self._rejoin_parties(call, part)
        finally:
            if part is not None and not moved:
                self._spawn(self._discard_part(call, part), f"discard-part-{call.state.id[:8]}")

    async def _rejoin_parties(
        self, call: Call, part: asyncio.Future[SessionDescription | None] | None
    ) -> bool:
        """Re-INVITE B and A to talk directly; then, with ``part``, move them onto its MCP.
        Returns True when ``part`` was taken over."""
        state = call.state
        rerecord = part is not None
        if state.phase != CallPhase.CONFIRMED:
            # still being set up (the ACK of A may be on its way): re-join once it is established
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(call.confirmed.wait(), 35.0)
        async with call.lock:
            if state.phase != CallPhase.CONFIRMED:
                return False
            try:
                a_sdp = SessionDescription.parse(state.a.remote_sdp)
                a_addr, a_port = a_sdp.media_address(media.first_audio(a_sdp) or 0)
                b_offer = media.anchor(a_sdp, a_addr, a_port, state.b.owner).to_bytes()
            except (SdpParseError, MediaError, ValueError) as exc:
                log.error("call %s: cannot re-join the parties: %s", state.id[:8], exc)
                return False
            resp = await self._reinvite(call, state.b, b_offer)
            if resp is None or resp.status >= 300:
                log.error("call %s: re-join re-INVITE to B failed; ending the call", state.id[:8])
                await self.end_call(call, "re-join failed")
                return False
            state.b.local_sdp, state.b.remote_sdp = b_offer, resp.body
            try:
                b_sdp = SessionDescription.parse(resp.body)
                b_addr, b_port = b_sdp.media_address(media.first_audio(b_sdp) or 0)
                a_offer = media.anchor(b_sdp, b_addr, b_port, state.a.owner).to_bytes()
            except (SdpParseError, MediaError, ValueError) as exc:
                log.error("call %s: cannot re-join A: %s", state.id[:8], exc)
                return False
            resp = await self._reinvite(call, state.a, a_offer)
            if resp is None or resp.status >= 300:
                log.error("call %s: re-join re-INVITE to A failed; ending the call", state.id[:8])
                await self.end_call(call, "re-join failed")
                return False
            state.a.local_sdp, state.a.remote_sdp = a_offer, resp.body
            log.info(
                "call %s: parties re-joined directly (%s)",
                state.id[:8],
                "recording again next" if rerecord else "unrecorded from now on",
            )
            self._changed(call)
            if part is not None and state.phase == CallPhase.CONFIRMED:
                await self._rerecord(call, part)
                return True
            return False

    async def _open_part(self, call: Call) -> SessionDescription | None:
        """Open the bridge of the call's next recording part (same X-CV-Session and X-CV-Call,
        X-CV-Part + 1; the RM places it on a healthy MCP). Returns A's SDP it was offered, or None
        when no bridge came up."""
        state = call.state
        try:
            a_sdp = SessionDescription.parse(state.a.remote_sdp)
        except SdpParseError as exc:
            log.error("call %s: cannot record again (A's SDP: %s)", state.id[:8], exc)
            return None
        state.part += 1
        try:
            await self._open_recording(call, a_sdp)
        except Exception:
            log.exception("call %s: opening recording part %d failed", state.id[:8], state.part)
            state.recording = False
        if not state.recording or state.rec is None:
            log.error(
                "call %s: recording part %d not started; the call goes on unrecorded",
                state.id[:8],
                state.part,
            )
            return None
        return a_sdp

    async def _discard_part(self, call: Call, part: asyncio.Future[SessionDescription | None]) -> None:
        """The re-join failed or the call ended: the next part's bridge, if it came up, goes."""
        if await part is not None and call.state.rec is not None:
            await self._drop_recording(call, call.state.rec, "call not re-joined")

    async def _rerecord(self, call: Call, part: asyncio.Future[SessionDescription | None]) -> None:
        """Record a re-joined call again after its MCP died (issue 5): once the next part's bridge
        is up (``part``), both phones are re-INVITEd onto the new MCP's ports. Called with the
        call's lock held. Any failure leaves the call re-joined and unrecorded, with an error
        logged."""
        state = call.state
        offered = await part
        rec = state.rec
        if offered is None or rec is None or not state.recording:
            return
        try:
            a_sdp = SessionDescription.parse(state.a.remote_sdp)
        except SdpParseError:
            a_sdp = offered
        try:
            b_offer = media.anchor(a_sdp, *state.mcp["callee"], state.b.owner).to_bytes()
        except (MediaError, ValueError) as exc:
            log.error("call %s: cannot anchor B on the new MCP: %s", state.id[:8], exc)
            await self._drop_recording(call, rec, "anchor failed")
            return
        resp = await self._reinvite(call, state.b, b_offer)
        if resp is None or resp.status >= 300:
            log.error("call %s: B refused the move to the new MCP; unrecorded", state.id[:8])
            await self._drop_recording(call, rec, "callee refused")
            return
        state.b.local_sdp, state.b.remote_sdp = b_offer, resp.body
        try:
            b_sdp = SessionDescription.parse(resp.body)
            a_offer = media.anchor(b_sdp, *state.mcp["caller"], state.a.owner).to_bytes()
        except (SdpParseError, MediaError, ValueError) as exc:
            log.error("call %s: unusable answer from B for the new MCP: %s", state.id[:8], exc)
            await self._drop_recording(call, rec, "callee SDP")
            return
        await self._update_bridge(call, a_sdp, b_sdp)
        resp = await self._reinvite(call, state.a, a_offer)
        if resp is None or resp.status >= 300:
            log.error("call %s: A refused the move to the new MCP; its recording stops", state.id[:8])
            await self._drop_recording(call, rec, "caller refused")
            return
        state.a.local_sdp, state.a.remote_sdp = a_offer, resp.body
        log.info(
            "call %s: recording session %s part %d on MCP caller %s:%d callee %s:%d",
            state.id[:8], state.session_id, state.part, *state.mcp["caller"], *state.mcp["callee"],
        )  # fmt: skip
        self._changed(call)

    async def _drop_recording(self, call: Call, rec: Leg, reason: str) -> None:
        call.state.recording = False
        await self._bye(call, rec, reason)
        self._changed(call)

    async def _on_rec_offer(self, call: Call, inc: Any) -> None:
        """A re-INVITE/UPDATE from the bridge side: answer with what we last offered it."""
        rec = call.state.rec
        body = rec.local_sdp if rec is not None else b""
        inc.respond(
            200,
            headers=[("Contact", self._contact(inc.transport))],
            body=body,
            content_type=SDP if body else None,
        )

    def _timer_response_headers(self, leg: Leg, req: Request) -> list[tuple[str, str]]:
        """Session-Expires for a 2xx to a refresh from ``leg`` (RFC 4028 9), re-arming its timer."""
        try:
            decision = st.negotiate_uas(
                req, default_interval=leg.timer.interval or self.sip.session_expires, min_se=self.sip.min_se
            )
        except st.SessionTimerError:
            decision = st.UasDecision()
        if decision.timer is not None and (leg.timer.interval or st.parse_session_expires(req) is not None):
            leg.timer.interval = decision.timer.interval
            leg.timer.refresher = decision.timer.refresher
        leg.timer.start(self.clock())
        return list(decision.headers) if leg.timer.interval else []

    async def _on_offer(self, call: Call, name: str, inc: Any) -> None:
        """re-INVITE or UPDATE from a phone: a session refresh, or a new offer for the other side."""
        state = call.state
        req: Request = inc.request
        is_invite = req.method == "INVITE"
        if state.phase == CallPhase.ANSWERED:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(call.confirmed.wait(), 5.0)
        if state.phase != CallPhase.CONFIRMED or call.lock.locked():
            inc.respond(491, headers=[("Retry-After", "1")] if not is_invite else None)
            return
        async with call.lock:
            await self._offer_locked(call, name, inc)
        final = inc.final_response
        if is_invite and final is not None and 200 <= final.status < 300:
            await inc.wait_ack(32.0)  # outside the lock: a lost ACK must not block the call

    async def _offer_locked(self, call: Call, name: str, inc: Any) -> None:
        state = call.state
        req: Request = inc.request
        leg, other = state.leg(name), state.leg(CallState.other(name))
        is_invite = req.method == "INVITE"
        contact = [("Contact", self._contact(inc.transport)), ("Allow", ALLOW)]
        if not req.body or media.same_session_version(leg.remote_sdp, req.body):
            # A refresh (RFC 4028) or an unchanged offer: answered here, not relayed.
            headers = contact + self._timer_response_headers(leg, req)
            if not req.body and not is_invite:
                inc.respond(200, headers=headers)
            else:
                inc.respond(200, headers=headers, body=leg.local_sdp, content_type=SDP)
            return
        ctype = (req.content_type or "").split(";")[0].strip().lower()
        if ctype != SDP:
            inc.respond(415, headers=[("Accept", SDP)])
            return
        try:
            offer = SessionDescription.parse(req.body)
            if state.recording:
                other_body = media.anchor(offer, *state.mcp[media.LABELS[other.name]], other.owner).to_bytes()
            else:
                other_body = req.body
        except (SdpParseError, MediaError) as exc:
            inc.respond(488, "Not Acceptable Here (malformed SDP)", headers=[_warning(self._host, str(exc))])
            return
        log.info(
            "call %s: %s offer from %s%s",
            state.id[:8],
            req.method,
            "caller" if name == "a" else "callee",
            " (hold)" if _held(offer) else "",
        )
        if is_invite:
            resp = await self._reinvite(call, other, other_body, self._refresh_headers(other))
        else:
            assert other.dialog is not None
            upd = other.dialog.create_request(
                "UPDATE", body=other_body, content_type=SDP, headers=self._refresh_headers(other)
            )
            resp = await self._request(other, upd)
        if resp is None:
            inc.respond(500, "Server Internal Error (the other party is unreachable)")
            return
        if resp.status >= 300:
            status = resp.status if resp.status in (488, 491, 606) else map_failure(resp.status)[0]
            inc.respond(
                status,
                resp.reason if status == resp.status else None,
                headers=[(n, v) for n in _FAILURE_HEADERS for v in resp.headers.get_all(n)],
            )
            if resp.status in (408, 481):
                await self.end_call(call, f"{other.name} leg gone ({resp.status})")
            return
        other.timer = st.timer_from_uac_response(resp, other.timer.interval or self.sip.session_expires)
        other.timer.start(self.clock())
        try:
            answer = SessionDescription.parse(resp.body)
            if state.recording:
                leg_body = media.anchor(answer, *state.mcp[media.LABELS[name]], leg.owner).to_bytes()
            else:
                leg_body = resp.body
        except (SdpParseError, MediaError) as exc:
            log.error("call %s: unusable answer from %s: %s", state.id[:8], other.name, exc)
            inc.respond(502, "Bad Gateway", headers=[_warning(self._host, str(exc))])
            return
        other.local_sdp, other.remote_sdp = other_body, resp.body
        leg.remote_sdp = req.body
        if state.recording:
            a_sdp = offer if name == "a" else answer
            b_sdp = answer if name == "a" else offer
            await self._update_bridge(call, a_sdp, b_sdp)
        leg.local_sdp = leg_body
        headers = contact + self._timer_response_headers(leg, req)
        inc.respond(200, headers=headers, body=leg_body, content_type=SDP)
        self._changed(call)

    def _refresh_headers(self, leg: Leg) -> list[tuple[str, str]]:
        interval = leg.timer.interval or self.sip.session_expires
        return st.uac_request_headers(interval, self.sip.min_se)

    async def _relay_request(self, call: Call, name: str, inc: Any) -> None:
        """INFO / OPTIONS / MESSAGE / NOTIFY within a dialog: relay to the other phone."""
        state = call.state
        req: Request = inc.request
        if name == "rec":
            inc.respond(200, headers=[("Allow", ALLOW)] if req.method == "OPTIONS" else None)
            return
        other = state.leg(CallState.other(name))
        if other.dialog is None or not other.confirmed:
            if req.method == "OPTIONS":
                inc.respond(200, headers=[("Allow", ALLOW), ("Supported", "timer")])
            else:
                inc.respond(481)
            return
        headers = [(n, v) for n in _RELAY_REQUEST_HEADERS for v in req.headers.get_all(n)]
        out = other.dialog.create_request(
            req.method, body=req.body, content_type=req.content_type if req.body else None, headers=headers
        )
        resp = await self._request(other, out)
        if resp is None:
            inc.respond(408)
            return
        status = (
            resp.status
            if resp.status < 300 or resp.status in range(400, 500)
            else map_failure(resp.status)[0]
        )
        inc.respond(
            status,
            resp.reason if status == resp.status else None,
            headers=[(n, v) for n in _RELAY_RESPONSE_HEADERS for v in resp.headers.get_all(n)],
            body=resp.body,
            content_type=resp.content_type if resp.body else None,
        )

    def handle_stray_response(self, response: Response, source: tuple[str, int], transport: str) -> None:
        """A 2xx to an INVITE of one of our dialogs that no transaction expects: the re-INVITE was
        sent by the HA peer that died before ACKing it (issue 5). ACK it (RFC 3261 13.2.2.4), or
        the phone would retransmit it and hang up after 64*T1."""
        try:
            if not (200 <= response.status < 300 and response.cseq.method == "INVITE"):
                return
            key = (response.call_id, response.from_.tag or "")
        except SipParseError:
            return
        found = self._dialogs.get(key)
        if found is None:
            return
        call, name = found
        leg = call.state.leg(name)
        if leg.dialog is None:
            return
        invite = Request("INVITE", leg.dialog.remote_target)
        invite.headers.set("CSeq", f"{response.cseq.seq} INVITE")
        host, port, transport = leg.destination()
        self.ep.send_ack(leg.dialog.create_ack(invite), (host, port), transport)
        log.info("call %s: ACK for a 2xx on leg %s that no transaction awaited", call.state.id[:8], name)

    def handle_ack(self, request: Request, source: tuple[str, int], transport: str) -> None:
        """ACKs for 2xx not awaited by a handler: nothing to do but note them."""
        log.debug("ACK %s from %s:%d absorbed", request.call_id, *source)

    # ------------------------------------------------------------------ session timers
    def check_timers(self) -> None:
        """Start refreshes that are due and end calls whose peer stopped refreshing (RFC 4028 10)."""
        now = self.clock()
        for key in [k for k, until in self.ended_dialogs.items() if until <= now]:
            del self.ended_dialogs[key]
        for call in list(self.calls.values()):
            if call.state.phase != CallPhase.CONFIRMED:
                continue
            for leg in (call.state.a, call.state.b):
                t = leg.timer
                if not t.interval or not t.deadline or now < t.deadline:
                    continue
                if t.refresher == "local":
                    t.deadline = now + max(1.0, t.interval / 4)  # retry spacing while refreshing
                    self._spawn(self._refresh(call, leg), f"refresh-{call.state.id[:8]}-{leg.name}")
                else:
                    log.warning(
                        "call %s: session timer expired on leg %s; ending the call",
                        call.state.id[:8],
                        leg.name,
                    )
                    t.deadline = 0.0
                    self._spawn(
                        self.end_call(call, f"session expired on leg {leg.name}"),
                        f"expire-{call.state.id[:8]}",
                    )

    async def _refresh(self, call: Call, leg: Leg) -> None:
        """Refresh one leg's session (RFC 4028 7.4): UPDATE without SDP if the peer allows it,
        else a re-INVITE repeating our last SDP (unchanged version). A failed refresh ends the call."""
        try:
            # Wait for an offer/answer (or the other leg's refresh) under way; retried at the
            # new deadline if that takes long.
            await asyncio.wait_for(call.lock.acquire(), 5.0)
        except TimeoutError:
            return
        try:
            if call.state.phase != CallPhase.CONFIRMED or leg.dialog is None:
                return
            headers = self._refresh_headers(leg)
            if leg.allow_update:
                req = leg.dialog.create_request("UPDATE", headers=headers)
                resp = await self._request(leg, req)
            else:
                resp = await self._reinvite(call, leg, leg.local_sdp, headers)
            if resp is not None and 200 <= resp.status < 300:
                leg.timer = st.timer_from_uac_response(resp, leg.timer.interval)
                leg.timer.start(self.clock())
                self._changed(call)
                return
            if resp is not None and resp.status == 491:
                leg.timer.deadline = self.clock() + 2.0
                return
            if resp is not None and resp.status == 422:
                min_se = st.parse_min_se(resp) if resp is not None else None
                if min_se:
                    leg.timer.interval = max(leg.timer.interval, min_se)
                    leg.timer.deadline = self.clock()
                    return
        finally:
            call.lock.release()
        log.warning(
            "call %s: session refresh on leg %s failed (%s); ending the call",
            call.state.id[:8],
            leg.name,
            f"{resp.status} {resp.reason}" if resp is not None else "no answer",
        )
        leg.confirmed = resp is not None and resp.status not in (408, 481)
        await self.end_call(call, f"session refresh failed on leg {leg.name}")

    # ------------------------------------------------------------------ shutdown
    async def shutdown(self, timeout: float) -> None:
        """Stop accepting calls; let established calls end within ``timeout``, then BYE them."""
        self.accepting = False
        deadline = time.monotonic() + timeout
        while self.calls and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for call in list(self.calls.values()):
            if call.state.phase in (CallPhase.SETUP, CallPhase.EARLY):
                call.abort_status = (503, "Service Unavailable (shutting down)")
                call.abort.set()
        remaining = list(self.calls.values())
        if remaining:
            log.info("shutdown: ending %d call(s)", len(remaining))
        await asyncio.gather(
            *(
                self.end_call(c, "server shutdown")
                for c in remaining
                if c.state.phase not in (CallPhase.SETUP, CallPhase.EARLY)
            ),
            return_exceptions=True,
        )
        # Calls in setup end through their abort; give them a moment.
        end = time.monotonic() + 2.0
        while self.calls and time.monotonic() < end:
            await asyncio.sleep(0.05)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


#: Seconds to wait for any answer of an RM (100 Trying for an INVITE) before trying another one.
RM_ANSWER_TIMEOUT = 1.0
#: Seconds an RM that did not answer is tried last.
RM_RETRY_AFTER = 10.0


def _set_routes(req: Request, routes: list[str]) -> None:
    req.headers.remove("Route")
    for route in routes:
        req.headers.add("Route", route)


def _on_any(event: asyncio.Event) -> Callable[[Response], None]:
    """A provisional-response callback that sets ``event`` (the next hop is alive)."""
    return lambda _response: event.set()


def _rm_refused(resp: Response) -> bool:
    """An RM's final answer that another RM may do better with: 503 (no MCP, shutting down)."""
    return resp.status == 503


def _transport_failure(resp: Response) -> bool:
    """The transaction layer's own 408 (timeout) or 503 without Retry-After (transport error)."""
    return resp.status == 408 or (resp.status == 503 and "Retry-After" not in resp.headers)


def mcp_lost(bye: Request) -> bool:
    """A bridge BYE that the RM sent because the MCP died (RFC 3326 Reason, cause 503)."""
    for value in bye.headers.get_all("Reason"):
        proto, _, params = value.partition(";")
        if proto.strip().upper() == "SIP" and re.search(r"(?:^|;)\s*cause\s*=\s*503\b", params, re.I):
            return True
    return False


def _allow(message: Request | Response) -> set[str]:
    return {m.strip().upper() for m in message.headers.get_all("Allow")}


def _held(sdp: SessionDescription) -> bool:
    from services.sdp import hold_state

    index = media.first_audio(sdp)
    return index is not None and hold_state(sdp.media[index], sdp)

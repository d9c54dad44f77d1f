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

:class:`B2BUA` is the orchestrating class: call setup, session timers, takeover of a replicated
call and shutdown are here; it is assembled from the parts in sibling modules: ``legs`` (calls,
dialogs, the requests sent on a call's legs, ending a call), ``bridge`` (opening and updating the
recording bridge), ``in_dialog`` (requests from the phones within a call) and ``rejoin`` (a lost
bridge: the phones re-joined, then recorded again on another MCP).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from services.config import Tenant
from services.sdp import SdpParseError, SessionDescription
from services.sip.dialog import Dialog
from services.sip.errors import SipError
from services.sip.message import Request, Response, new_call_id, new_tag
from services.sip.uri import NameAddr, SipUri
from services.sip_server import media
from services.sip_server import session_timer as st
from services.sip_server.call import CallPhase, CallState, Leg
from services.sip_server.in_dialog import InDialogMixin
from services.sip_server.legs import (
    ALLOW,
    ENDED_DIALOG_TTL,
    FAILURE_HEADERS,
    RM_ANSWER_TIMEOUT,
    RM_RETRY_AFTER,
    SDP,
    SUPPORTED,
    USER_AGENT,
    Call,
    ClientRequestLike,
    EndpointLike,
    log,
    map_failure,
    warning_header,
)
from services.sip_server.media import MediaError, SdpOwner
from services.sip_server.policy import CallInfo, decide
from services.sip_server.registrar import Binding, authenticate
from services.sip_server.rejoin import RejoinMixin, mcp_lost

__all__ = [
    "ADOPT_CSEQ_GAP",
    "ALLOW",
    "B2BUA",
    "ENDED_DIALOG_TTL",
    "RM_ANSWER_TIMEOUT",
    "RM_RETRY_AFTER",
    "SDP",
    "SUPPORTED",
    "USER_AGENT",
    "Call",
    "ClientRequestLike",
    "EndpointLike",
    "map_failure",
    "mcp_lost",
]

#: How far an adopted call's local CSeqs jump (see B2BUA.adopt).
ADOPT_CSEQ_GAP = 100


class B2BUA(InDialogMixin, RejoinMixin):
    """Call control for one SIP Server; ``handle_*`` are called by the daemon's dispatcher."""

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
                headers=[warning_header(self._host, "INVITE without SDP offer")],
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
            inc.respond(
                488, "Not Acceptable Here (malformed SDP)", headers=[warning_header(self._host, str(exc))]
            )
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
            headers = [(n, v) for n in FAILURE_HEADERS for v in resp.headers.get_all(n)]
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
                headers=[warning_header(self._host, str(exc))],
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

    # ------------------------------------------------------------------ takeover (issue 5)
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


def _allow(message: Request | Response) -> set[str]:
    return {m.strip().upper() for m in message.headers.get_all("Allow")}

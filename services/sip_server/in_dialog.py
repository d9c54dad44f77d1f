"""Requests from the phones and the bridge within an established call (RFC 3261 12.2.2).

A request with a To tag finds its call and leg by (Call-ID, our tag), or gets 481 (200 for a
retransmitted BYE of a call that just ended). BYE from either phone ends every leg; a BYE from the
bridge re-joins the phones (``rejoin``). A re-INVITE / UPDATE offer (a new codec, hold, resume) is
relayed to the other phone -- anchored on the MCP's ports when the call is recorded, the bridge
re-INVITEd with both sides' new media -- one exchange at a time per call (491 otherwise,
RFC 3261 14.2); one without SDP or with an unchanged one is a session refresh (RFC 4028) answered
here. INFO / OPTIONS / MESSAGE / NOTIFY are relayed to the other phone with their answer.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any

from services.sdp import SdpParseError, SessionDescription
from services.sip.errors import SipParseError
from services.sip.message import Request, Response
from services.sip_server import media
from services.sip_server import session_timer as st
from services.sip_server.bridge import BridgeMixin
from services.sip_server.call import CallPhase, CallState, Leg
from services.sip_server.legs import ALLOW, FAILURE_HEADERS, SDP, Call, log, map_failure, warning_header
from services.sip_server.media import MediaError

#: Headers copied on relayed INFO / OPTIONS / MESSAGE requests and their responses.
_RELAY_REQUEST_HEADERS = ("Info-Package", "Content-Disposition", "Event", "Accept")
_RELAY_RESPONSE_HEADERS = ("Allow", "Accept", "Supported", "Content-Disposition", "Recv-Info")


class InDialogMixin(BridgeMixin):
    """The B2BUA's handling of requests (and stray responses) within a call's dialogs."""

    if TYPE_CHECKING:
        # services.sip_server.rejoin.RejoinMixin

        async def _on_recording_ended(self, call: Call, bye: Request | None = None) -> None: ...

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
            inc.respond(
                488, "Not Acceptable Here (malformed SDP)", headers=[warning_header(self._host, str(exc))]
            )
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
                headers=[(n, v) for n in FAILURE_HEADERS for v in resp.headers.get_all(n)],
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
            inc.respond(502, "Bad Gateway", headers=[warning_header(self._host, str(exc))])
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


def _held(sdp: SessionDescription) -> bool:
    from services.sdp import hold_state

    index = media.first_audio(sdp)
    return index is not None and hold_state(sdp.media[index], sdp)

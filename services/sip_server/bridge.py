"""The recording bridge of a call: the INVITE that asks an RM for a bridge on an MCP, and the
re-INVITE that gives the MCP both parties' current media.

A bridge INVITE goes to the RMs in turn; one that does not answer within
:data:`~services.sip_server.legs.RM_ANSWER_TIMEOUT` (or answers 503) is left for the next one, and
the last one gets what is left of ``sip_server.recording_timeout``. A bridge that does not come up
leaves the call unrecorded, with an error logged: the recording is never worth a call.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from services.sdp import SdpParseError, SessionDescription
from services.sip.dialog import Dialog
from services.sip.message import Request, Response, new_call_id, new_tag
from services.sip.uri import SipUri
from services.sip_server import media
from services.sip_server.call import Leg
from services.sip_server.legs import (
    ALLOW,
    RM_ANSWER_TIMEOUT,
    RM_RETRY_AFTER,
    SDP,
    USER_AGENT,
    B2BUABase,
    Call,
    log,
    on_any,
)
from services.sip_server.media import MediaError, SdpOwner
from services.sip_server.policy import CallInfo, bridge_headers


class BridgeMixin(B2BUABase):
    """Opening and updating a call's recording bridge (RM -> MCP)."""

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
            client = self.ep.start_request(req, (host, port), "udp", on_provisional=on_any(heard))
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


def _rm_refused(resp: Response) -> bool:
    """An RM's final answer that another RM may do better with: 503 (no MCP, shutting down)."""
    return resp.status == 503

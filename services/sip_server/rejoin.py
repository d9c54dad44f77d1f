"""A lost recording bridge: the phones are re-joined, and recorded again on another MCP.

When the bridge dialog ends under an established call (a BYE from the RM or the MCP), the media
would keep flowing to an MCP that is gone: both phones are re-INVITEd to talk directly -- B with A's
media, then A with B's, one helper for each leg -- so the call survives (issue 5). When the RM
ended the bridge because the MCP died (RFC 3326 Reason with cause 503), the call is recorded again
as the next part of the same session: that part's bridge is opened while the phones are re-joined,
then both phones are moved onto the new MCP. Any failure of the new part leaves the call re-joined
and unrecorded, with an error logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import re

from services.sdp import SdpParseError, SessionDescription
from services.sip.message import Request
from services.sip_server import media
from services.sip_server.bridge import BridgeMixin
from services.sip_server.call import CallPhase, Leg
from services.sip_server.legs import Call, log
from services.sip_server.media import MediaError


def mcp_lost(bye: Request) -> bool:
    """A bridge BYE that the RM sent because the MCP died (RFC 3326 Reason, cause 503)."""
    for value in bye.headers.get_all("Reason"):
        proto, _, params = value.partition(";")
        if proto.strip().upper() == "SIP" and re.search(r"(?:^|;)\s*cause\s*=\s*503\b", params, re.I):
            return True
    return False


class RejoinMixin(BridgeMixin):
    """What the B2BUA does when a call's recording bridge is lost."""

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
        moved = False  # a failed re-join (it raised) has not taken the part over either
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
            # B first, offered A's media; then A, offered B's answer.
            if not await self._rejoin_leg(call, state.b, state.a):
                return False
            if not await self._rejoin_leg(call, state.a, state.b):
                return False
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

    async def _rejoin_leg(self, call: Call, leg: Leg, peer: Leg) -> bool:
        """Re-INVITE ``leg`` with the media of ``peer`` (the SDP that phone last sent us), so that
        the two phones talk directly. Called with the call's lock held. False when it failed: SDP
        that cannot be re-offered leaves the call as it is; a leg that refuses ends the call."""
        state = call.state
        try:
            sdp = SessionDescription.parse(peer.remote_sdp)
            addr, port = sdp.media_address(media.first_audio(sdp) or 0)
            offer = media.anchor(sdp, addr, port, leg.owner).to_bytes()
        except (SdpParseError, MediaError, ValueError) as exc:
            log.error("call %s: cannot re-join %s: %s", state.id[:8], leg.name.upper(), exc)
            return False
        resp = await self._reinvite(call, leg, offer)
        if resp is None or resp.status >= 300:
            log.error(
                "call %s: re-join re-INVITE to %s failed; ending the call", state.id[:8], leg.name.upper()
            )
            await self.end_call(call, "re-join failed")
            return False
        leg.local_sdp, leg.remote_sdp = offer, resp.body
        return True

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

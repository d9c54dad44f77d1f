"""The MCP's SIP UAS for recording-bridge sessions, driving rtp_core and handing files to storage.

Request handling (docs/ARCHITECTURE.md, "SIP Server -> RM -> MCP"):
- INVITE: ``X-CV-*`` headers and the two-m-line offer are checked (400/415/488 with a reason), an
  rtp_core session is opened in ``bridge`` mode with its output in the spool, both legs bound, the
  known party address set, and 200 answered with the legs' ports; then the ACK is awaited (a session
  whose ACK never comes is ended with BYE and finalised, RFC 3261 13.3.1.4).
- re-INVITE / UPDATE with SDP: new remote addresses and payload types, same ports, answer direction.
- BYE: 200, then the session is finalised off the SIP path: engine session closed, the file moved to
  storage, the recording event queued.
- OPTIONS: 200 with ``X-CV-Load`` (active sessions), 503 while draining.
Engine events (``loop.add_reader(engine.fileno())``): ``started``/``ssrc_change`` are logged, ``dtmf``
digits are collected per leg, ``timeout`` ends the session with a BYE towards the SIP Server.

Nothing a peer sends can lose a recording: every handler answers (500 at worst) and every session
that was answered is finalised exactly once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from services.config import McpConfig
from services.sip.errors import SipError, SipParseError
from services.sip.message import Request, new_tag
from services.storage.disk import StorageKeyError, recording_key
from services.storage.s3 import retry_forever
from services.storage.writer import StorageTargetError

from . import bridge as sdp_bridge
from . import xcv
from .events import build_event, check_event
from .session import (
    ENCRYPTED_SUFFIX,
    PART_SUFFIX,
    Leftover,
    RecordingSession,
    State,
    bridge_from_sidecar,
    remove_sidecar,
    set_aside,
    write_sidecar,
)
from .transcode import transcode_part

if TYPE_CHECKING:
    from services.sip.aio import IncomingRequest, SipEndpoint

log = logging.getLogger("callvault.mcp")

ALLOW = "INVITE, ACK, CANCEL, BYE, OPTIONS, INFO, UPDATE"
ACK_TIMEOUT = 32.0  # 64 * T1: RFC 3261 13.3.1.4
BYE_TIMEOUT = 5.0  # how long finalisation waits for the answer to our own BYE
UPLOADS = 8  # recordings stored at the same time (the rest wait their turn)
RECOVERY_WAIT = 2.0  # how long start-up waits for recovered recordings before serving anyway


class McpServer:
    """One MCP: the SIP handlers, the sessions and their finalisation."""

    def __init__(
        self,
        mcp: McpConfig,
        endpoint: SipEndpoint,
        engine: Any,
        *,
        spool: Path,
        writer: Any,
        queue: Any,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        certificates: Callable[[str], list[str]] = lambda tenant: [],
        max_backoff: float = 10.0,
    ) -> None:
        self.mcp = mcp
        self.endpoint = endpoint
        self.engine = engine
        self.spool = spool
        #: StorageTargets: ``store(kind, src, key)`` and ``describe(kind)`` (services/storage/writer.py)
        self.writer = writer
        self.queue = queue
        #: The tenant's certificates (PEM paths): non-empty = recordings are encrypted before storage.
        self.certificates = certificates
        self.max_backoff = max_backoff
        self._uploads = asyncio.Semaphore(UPLOADS)
        self.clock = clock
        self.accepting = True
        self.sessions: dict[str, RecordingSession] = {}  # Call-ID -> session
        self.by_engine: dict[int, RecordingSession] = {}
        self._finalising: dict[str, asyncio.Task[None]] = {}  # recording id -> task
        self._tasks: set[asyncio.Task[Any]] = set()
        self.finalised = 0
        self.discarded = 0

    @property
    def load(self) -> int:
        return sum(1 for s in self.sessions.values() if s.active)

    # -- SIP entry points ---------------------------------------------------------------------------
    async def handle_request(self, incoming: IncomingRequest) -> None:
        request = incoming.request
        try:
            method = request.method
            if method == "INVITE":
                if request.to.tag is None:
                    await self._invite(incoming)
                else:
                    await self._reinvite(incoming)
            elif method == "BYE":
                self._bye(incoming)
            elif method == "OPTIONS" and request.to.tag is None:
                self._options(incoming)
            elif method in ("UPDATE", "INFO", "OPTIONS"):
                await self._in_dialog_other(incoming)
            elif request.to.tag is not None:
                self._answer(incoming, 481, "Call/Transaction Does Not Exist")
            else:
                self._answer(incoming, 405, headers=[("Allow", ALLOW)])
        except SipParseError as exc:
            log.info("bad %s from %s: %s", request.method, incoming.source, exc)
            self._answer(incoming, exc.status, exc.reason)
        except Exception:
            log.exception("error handling %s from %s", request.method, incoming.source)
            self._answer(incoming, 500, "Internal Server Error")

    def handle_ack(self, request: Request, source: tuple[str, int], transport: str) -> None:
        """ACKs not awaited by a transaction (e.g. a retransmission): nothing to do."""
        log.debug("ACK for call %s from %s", request.headers.get("Call-ID"), source)

    def _answer(self, incoming: IncomingRequest, status: int, reason: str | None = None, **kw: Any) -> None:
        try:
            incoming.respond(status, reason, **kw)
        except Exception:
            log.debug("could not answer %s", status, exc_info=True)

    def _contact(self, transport: str) -> str:
        return f"<{self.endpoint.contact_uri('mcp', transport)}>"

    def _options(self, incoming: IncomingRequest) -> None:
        headers = [(xcv.LOAD, str(self.load)), ("Allow", ALLOW), ("Accept", "application/sdp")]
        if self.accepting:
            self._answer(incoming, 200, headers=headers)
        else:
            self._answer(incoming, 503, "Draining", headers=[*headers, ("Retry-After", "5")])

    # -- new session ----------------------------------------------------------------------------------
    async def _invite(self, incoming: IncomingRequest) -> None:
        request = incoming.request
        if not self.accepting:
            self._answer(incoming, 503, "MCP shutting down", headers=[("Retry-After", "5")])
            return
        if request.call_id in self.sessions:
            self._answer(incoming, 482, "Loop Detected")  # same Call-ID without To tag: a loop or a fork
            return
        try:
            bridge = xcv.parse_bridge_headers(request.headers.get)
            offer = sdp_bridge.parse_bridge_offer(sdp_bridge.parse_sdp(request.body, request.content_type))
        except (xcv.XcvError, sdp_bridge.OfferError) as exc:
            log.info(
                "INVITE %s from %s rejected: %d %s", request.call_id, incoming.source, exc.status, exc.reason
            )
            self._answer(incoming, exc.status, exc.reason)
            return
        session = self._open(bridge, offer, request)
        if session is None:
            self._answer(incoming, 503, "Media resources unavailable", headers=[("Retry-After", "5")])
            return
        try:
            answer = sdp_bridge.build_answer(offer, self.mcp.rtp_ip, session.ports)
            session.sdp_session_id = answer.origin.session_id
            session.sdp_version = answer.origin.version
            session.last_answer = answer.to_bytes()
            from services.sip.dialog import Dialog

            session.dialog = Dialog.from_uas(request, session.local_tag)
            await asyncio.to_thread(
                write_sidecar, self.spool, session.recording_id, session.sidecar(self.mcp.name)
            )
        except Exception:
            self._close_engine(session)
            session.spool_path.unlink(missing_ok=True)
            raise
        if incoming.cancelled.is_set():
            self._answer(incoming, 487, "Request Terminated")
            session.unanswered = True  # never answered: nothing to file without media (see _store)
            self._finalise_soon(session, "cancelled")
            return
        self.sessions[session.call_id] = session
        self.by_engine[session.engine_id] = session
        log.info(
            "session %s part %d: recording %s (tenant %s, call %s) on ports %d/%d, %s",
            bridge.session_id, bridge.part, session.recording_id, bridge.tenant, bridge.call.call_id,
            session.ports[0], session.ports[1], session.codec,
        )  # fmt: skip
        incoming.respond(
            200,
            to_tag=session.local_tag,
            headers=[("Contact", self._contact(incoming.transport)), ("Allow", ALLOW)],
            body=session.last_answer,
            content_type="application/sdp",
        )
        ack = await incoming.wait_ack(ACK_TIMEOUT)
        if ack is None:
            if session.state is State.EARLY:
                log.warning("recording %s: no ACK for the 200; ending the session", session.recording_id)
                # The bridge never came up (e.g. the RM that carried it died): without media, no
                # recording is filed for it (see _store).
                session.unanswered = True
                self._end_soon(session, "no ACK")
        elif session.state is State.EARLY:
            session.state = State.CONFIRMED

    def _open(
        self, bridge: xcv.BridgeRequest, offer: sdp_bridge.BridgeOffer, request: Request
    ) -> RecordingSession | None:
        """Open the rtp_core session and its legs; None when the engine cannot (logged)."""
        recording_id = uuid.uuid4().hex
        part = self.spool / f"{recording_id}{PART_SUFFIX}"
        try:
            self.spool.mkdir(parents=True, exist_ok=True)
            engine_id = self.engine.open_session(
                output_path=str(part),
                channels=bridge.profile.channels,
                mode="bridge",
                reorder_ms=bridge.profile.reorder_ms,
                timeout_s=self.mcp.media_timeout,
            )
        except (OSError, ValueError) as exc:
            log.error("cannot open a media session for call %s: %s", request.call_id, exc)
            return None
        try:
            ports = (self.engine.add_leg(engine_id, 0), self.engine.add_leg(engine_id, 1))
        except (OSError, ValueError) as exc:
            log.error("cannot bind RTP ports for call %s: %s", request.call_id, exc)
            self._safe_close(engine_id)
            part.unlink(missing_ok=True)
            return None
        session = RecordingSession(
            recording_id=recording_id,
            bridge=bridge,
            engine_id=engine_id,
            ports=ports,
            spool_path=part,
            opened=self.clock(),
            call_id=request.call_id,
            local_tag=new_tag(),
            codec=offer.legs[0].codec,
        )
        try:
            self._apply_offer(session, offer)
        except (OSError, ValueError) as exc:
            log.error("cannot configure the media session for call %s: %s", request.call_id, exc)
            self._close_engine(session)
            part.unlink(missing_ok=True)
            return None
        return session

    def _apply_offer(self, session: RecordingSession, offer: sdp_bridge.BridgeOffer) -> None:
        for leg in offer.legs:
            self.engine.set_payload_types(session.engine_id, leg.leg, leg.payload_types)
            if leg.address is not None and leg.address != session.remotes[leg.leg]:
                self.engine.set_remote(session.engine_id, leg.leg, leg.address[0], leg.address[1])
                session.remotes[leg.leg] = leg.address
        if offer.legs[0].codec:
            session.codec = offer.legs[0].codec

    # -- in-dialog ------------------------------------------------------------------------------------
    def _dialog_session(self, incoming: IncomingRequest) -> RecordingSession | None:
        request = incoming.request
        session = self.sessions.get(request.call_id)
        if session is None or request.to.tag != session.local_tag or not session.active:
            self._answer(incoming, 481, "Call/Transaction Does Not Exist")
            return None
        if session.dialog is not None:
            try:
                session.dialog.receive_request(request)
            except SipParseError as exc:
                self._answer(incoming, exc.status, exc.reason)
                return None
        return session

    async def _reinvite(self, incoming: IncomingRequest) -> None:
        session = self._dialog_session(incoming)
        if session is None:
            return
        if session.invite_pending:
            self._answer(incoming, 491, "Request Pending", headers=[("Retry-After", "1")])
            return
        session.invite_pending = True
        try:
            body = self._update_media(incoming, session)
            if body is None:
                return
            incoming.respond(
                200,
                to_tag=session.local_tag,
                headers=[("Contact", self._contact(incoming.transport)), ("Allow", ALLOW)],
                body=body,
                content_type="application/sdp",
            )
            if session.state is State.EARLY:
                session.state = State.CONFIRMED  # a re-INVITE implies the first ACK came
            if await incoming.wait_ack(ACK_TIMEOUT) is None:
                log.warning("recording %s: no ACK for the re-INVITE's 200", session.recording_id)
        finally:
            session.invite_pending = False

    def _update_media(self, incoming: IncomingRequest, session: RecordingSession) -> bytes | None:
        """Apply a re-INVITE/UPDATE offer; returns the answer body, or None after answering an error.
        An offerless re-INVITE gets our last answer as the offer (RFC 3261 14.2)."""
        request = incoming.request
        if not request.body.strip():
            return session.last_answer
        try:
            offer = sdp_bridge.parse_bridge_offer(sdp_bridge.parse_sdp(request.body, request.content_type))
        except sdp_bridge.OfferError as exc:
            # The session keeps its current media (RFC 3264 8: a rejected offer changes nothing).
            log.info("recording %s: re-offer rejected: %s", session.recording_id, exc.reason)
            self._answer(incoming, exc.status, exc.reason)
            return None
        try:
            self._apply_offer(session, offer)
        except (OSError, ValueError) as exc:
            log.error("recording %s: cannot apply re-offer: %s", session.recording_id, exc)
            self._answer(incoming, 488, "Media update failed")
            return None
        session.sdp_version += 1
        answer = sdp_bridge.build_answer(
            offer,
            self.mcp.rtp_ip,
            session.ports,
            session_id=session.sdp_session_id,
            version=session.sdp_version,
        )
        session.last_answer = answer.to_bytes()
        log.info(
            "recording %s: media updated (caller %s, callee %s, %s/%s)",
            session.recording_id, session.remotes[0], session.remotes[1],
            offer.legs[0].direction, offer.legs[1].direction,
        )  # fmt: skip
        return session.last_answer

    async def _in_dialog_other(self, incoming: IncomingRequest) -> None:
        session = self._dialog_session(incoming)
        if session is None:
            return
        request = incoming.request
        if request.method == "UPDATE" and request.body.strip():
            body = self._update_media(incoming, session)
            if body is not None:
                incoming.respond(200, body=body, content_type="application/sdp",
                                 headers=[("Contact", self._contact(incoming.transport))])  # fmt: skip
            return
        self._answer(incoming, 200)

    def _bye(self, incoming: IncomingRequest) -> None:
        request = incoming.request
        session = self.sessions.get(request.call_id)
        if session is None or session.state is State.DONE or request.to.tag != session.local_tag:
            self._answer(incoming, 481, "Call/Transaction Does Not Exist")
            return
        self._answer(incoming, 200)
        cause = _reason_cause(request.headers.get_all("Reason"))
        session.unanswered = cause is not None and cause != 200
        log.info("recording %s: BYE from %s (cause %s)", session.recording_id, incoming.source, cause)
        self._finalise_soon(session, "BYE" if not session.unanswered else "BYE, call not answered")

    # -- engine events --------------------------------------------------------------------------------
    def on_engine_readable(self) -> None:
        try:
            events = self.engine.poll_events()
        except Exception:
            log.exception("rtp_core: poll_events failed")
            return
        for event in events:
            try:
                self._engine_event(*event)
            except Exception:
                log.exception("rtp_core: bad event %r", event)

    def _engine_event(self, kind: str, engine_id: int, leg: int, payload: Any) -> None:
        session = self.by_engine.get(engine_id)
        if session is None:
            return
        label = sdp_bridge.LABELS[leg] if leg in (0, 1) else "-"
        if kind == "started":
            if session.media_started is None:
                session.media_started = self.clock()
            log.info("recording %s: RTP started on %s leg from %s", session.recording_id, label, payload)
        elif kind == "ssrc_change":
            log.info("recording %s: new SSRC on %s leg: %s", session.recording_id, label, payload)
        elif kind == "dtmf":
            digit = payload[0] if isinstance(payload, (tuple, list)) else payload
            if leg in (0, 1) and isinstance(digit, str):
                session.dtmf[leg].append(digit)
            log.info("recording %s: DTMF %s on %s leg", session.recording_id, payload, label)
        elif kind == "timeout":
            log.warning(
                "recording %s: no RTP for %.0f s; ending it", session.recording_id, self.mcp.media_timeout
            )
            self._end_soon(session, "media timeout")
        else:
            log.debug("recording %s: engine event %s %r", session.recording_id, kind, payload)

    # -- ending and finalisation ----------------------------------------------------------------------
    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _end_soon(self, session: RecordingSession, reason: str) -> asyncio.Task[None] | None:
        """End a session from this side: BYE towards the SIP Server, then finalise."""
        if not session.active:
            return self._finalising.get(session.recording_id)
        task = self._finalise_soon(session, reason)
        self._spawn(self._send_bye(session, reason))
        return task

    async def _send_bye(self, session: RecordingSession, reason: str) -> None:
        dialog = session.dialog
        if dialog is None:
            return
        try:
            text = reason.replace('"', "'")
            bye = dialog.create_request("BYE", headers=[("Reason", f'SIP;cause=200;text="{text}"')])
            host, port, transport = dialog.next_hop()
            response = await asyncio.wait_for(
                self.endpoint.request(bye, (host, port), transport), BYE_TIMEOUT
            )
            log.info("recording %s: our BYE answered %d", session.recording_id, response.status)
        except TimeoutError:
            log.warning("recording %s: no answer to our BYE", session.recording_id)
        except (SipError, OSError, ValueError) as exc:
            log.warning("recording %s: BYE failed: %s", session.recording_id, exc)

    def _finalise_soon(self, session: RecordingSession, reason: str) -> asyncio.Task[None]:
        existing = self._finalising.get(session.recording_id)
        if existing is not None:
            return existing
        session.state = State.ENDING
        session.end_reason = reason
        end = self.clock()
        stats = self._close_engine(session)
        _log_invalid(session.recording_id, stats)
        task = self._spawn(self._store(session, stats, end))
        self._finalising[session.recording_id] = task
        return task

    def _close_engine(self, session: RecordingSession) -> dict[str, Any] | None:
        self.by_engine.pop(session.engine_id, None)
        return self._safe_close(session.engine_id)

    def _safe_close(self, engine_id: int) -> dict[str, Any] | None:
        try:
            stats: dict[str, Any] = self.engine.close_session(engine_id)
            return stats
        except Exception:
            log.exception("rtp_core: close_session(%d) failed; storing the file as it is", engine_id)
            return None

    async def _store(self, session: RecordingSession, stats: dict[str, Any] | None, end: datetime) -> None:
        """Record the finished recording as pending in its sidecar, then upload it and queue its event
        (:meth:`_upload`). Until the event is queued the spool keeps the file and the pending record,
        so a crash at any point loses nothing: the next start resumes from the record."""
        rid = session.recording_id
        if (
            session.unanswered
            and stats is not None
            and not any(leg.get("packets") for leg in stats.get("legs", []))
        ):
            # The SIP Server ended the bridge of a call that was never answered (CANCEL, busy, no
            # answer) and no RTP (early media) ever arrived: there is nothing to listen to, so no
            # recording is filed. An answered call without media is filed: its zero packet counts are
            # what an operator needs to see.
            await asyncio.to_thread(_discard, session.spool_path, self.spool, rid)
            session.state = State.DONE
            self.sessions.pop(session.call_id, None)
            self._finalising.pop(rid, None)
            self.discarded += 1
            log.info("recording %s discarded (%s): no media was received", rid, session.end_reason)
            return
        try:
            record = {
                **session.sidecar(self.mcp.name),
                "state": "pending",
                "start": session.start.isoformat(),
                "end": end.isoformat(),
                "stats": json.loads(json.dumps(stats, default=str)),  # the sidecar is JSON
                "dtmf": list(session.dtmf_text()),
                "reason": session.end_reason or "finished",
            }
            await retry_forever(
                lambda: asyncio.to_thread(write_sidecar, self.spool, rid, record),
                f"recording {rid}: writing its pending record", cap=self.max_backoff,
            )  # fmt: skip
            await self._upload(rid, record, session.spool_path, queued=lambda: self._done(session))
        except asyncio.CancelledError:
            log.error("recording %s: finalisation interrupted; it stays in the spool for recovery", rid)
            raise
        except Exception:
            log.exception("recording %s: could not be stored; it stays in the spool for recovery", rid)
        finally:
            self._done(session)

    def _done(self, session: RecordingSession) -> None:
        session.state = State.DONE
        self.sessions.pop(session.call_id, None)
        self._finalising.pop(session.recording_id, None)

    async def _upload(
        self, rid: str, record: dict[str, Any], part: Path, queued: Callable[[], None] | None = None
    ) -> None:
        """Encrypt (when the tenant has certificates), store and queue one pending recording.

        Storage and queue failures are retried forever with a capped backoff (the recording waits in
        the spool while the store is down); a spool entry that can never be stored (audio gone from
        both spool and storage, a bad key, a certificate that cannot be used) is set aside in
        ``<spool>/bad/`` with the reason.
        """
        bridge = bridge_from_sidecar(record)
        start = _aware(datetime.fromisoformat(str(record.get("start") or record["opened"])))
        end = max(start, _aware(datetime.fromisoformat(str(record.get("end") or record["opened"]))))
        kind = bridge.profile.storage
        files = [f"{rid}.json", part.name, f"{rid}{ENCRYPTED_SUFFIX}"]
        try:
            key = recording_key(bridge.tenant, start, rid, bridge.profile.format)
            if part.exists():  # gone: encrypted or stored by a previous run (crash-safe either way)
                await asyncio.to_thread(transcode_part, part, bridge.profile.format, bridge.profile.channels)
            src = part
            encryption = record.get("encryption")
            certificates = self.certificates(bridge.tenant)
            # (no plaintext left = a previous run already stored it: the writer finds the object)
            if encryption is None and certificates and part.exists():
                encryption = await retry_forever(
                    lambda: self._encrypt(rid, record, part, certificates),
                    f"recording {rid}: encrypting it", cap=self.max_backoff,
                    permanent=(ValueError, FileNotFoundError),
                )  # fmt: skip
            if encryption is not None:
                src = self.spool / f"{rid}{ENCRYPTED_SUFFIX}"

            async def attempt() -> Any:
                async with self._uploads:
                    return await self.writer.store(kind, src, key)

            stored = await retry_forever(
                attempt, f"recording {rid}: storing {key} ({kind})", cap=self.max_backoff,
                permanent=(FileNotFoundError, StorageKeyError, StorageTargetError),
            )  # fmt: skip
        except (FileNotFoundError, StorageKeyError, StorageTargetError, ValueError) as exc:
            await asyncio.to_thread(set_aside, self.spool, files, f"cannot be stored: {exc}")
            return
        audio = stored.to_dict()
        if encryption is not None:
            # A crash between the pending record naming the envelope and the plaintext's removal
            # leaves the plaintext behind: it must not outlive the stored envelope.
            await asyncio.to_thread(part.unlink, missing_ok=True)
            # The event describes the audio (what playback returns); storage.* the stored envelope.
            audio.update(size=encryption["plaintext_size"], sha256=encryption["plaintext_sha256"])
        dtmf = record.get("dtmf") or ["", ""]
        event = build_event(
            recording_id=rid,
            bridge=bridge,
            start=start,
            end=end,
            close_stats=record.get("stats"),
            stored=audio,
            mcp=str(record.get("mcp") or self.mcp.name),
            codec=str(record.get("codec", "")),
            dtmf=(str(dtmf[0]), str(dtmf[1])),
        )
        event["storage"] = {
            **event["storage"], **self.writer.describe(kind), "size": stored.size, "sha256": stored.sha256,
        }  # fmt: skip
        if encryption is not None:
            event["encryption"] = encryption
        check_event(event)
        await retry_forever(lambda: self.queue.put(event), f"recording {rid}: queueing its event",
                            cap=self.max_backoff)  # fmt: skip
        if queued is not None:
            queued()
        await asyncio.to_thread(remove_sidecar, self.spool, rid)
        self.finalised += 1
        log.info(
            "recording %s finalised (%s): %s %s, %.2f s, %d bytes%s",
            rid, record.get("reason") or "recovered", kind, key, event["duration"], event["size"],
            ", encrypted" if encryption is not None else "",
        )  # fmt: skip

    async def _encrypt(
        self, rid: str, record: dict[str, Any], part: Path, certificates: list[str]
    ) -> dict[str, Any]:
        """Encrypt the spool file for ``certificates`` (services/storage/envelope.py, in a thread),
        make that durable in the pending record, then drop the plaintext."""
        from services.storage.envelope import encrypt_file

        enc = self.spool / f"{rid}{ENCRYPTED_SUFFIX}"
        tmp = self.spool / f".{rid}{ENCRYPTED_SUFFIX}.tmp"

        def run() -> dict[str, Any]:
            meta = dict(encrypt_file(part, tmp, certificates))
            os.replace(tmp, enc)
            return meta

        encryption = await asyncio.to_thread(run)
        record["encryption"] = encryption
        await retry_forever(
            lambda: asyncio.to_thread(write_sidecar, self.spool, rid, record),
            f"recording {rid}: writing its pending record", cap=self.max_backoff,
        )  # fmt: skip
        await asyncio.to_thread(part.unlink, missing_ok=True)
        return encryption

    async def recover(self, leftovers: list[Leftover], wait: float = RECOVERY_WAIT) -> None:
        """Finish recordings a previous run of this MCP left in the spool (see session.py).

        Each one is uploaded by its own task (retrying until storage takes it); start-up waits up to
        ``wait`` seconds for them and then serves while the rest go on in the background.
        """
        tasks = []
        for left in leftovers:
            record = dict(left.data)
            if record.get("state") != "pending":
                # Killed while recording: the WAV header was repaired; its audio ends where it stops.
                record.update(
                    state="pending", start=left.opened.isoformat(), end=left.end.isoformat(),
                    stats={"duration": left.wav.duration, "channels": left.wav.channels} if left.wav else None,
                    reason="recovered after a crash while recording",
                )  # fmt: skip
            else:
                record.setdefault("reason", "recovered from the spool")
            log.warning("recording %s: recovering it from the spool (%s)", left.recording_id,
                        "upload pending" if left.data.get("state") == "pending" else "was recording")  # fmt: skip
            tasks.append(self._spawn(self._recover_one(left, record)))
        if tasks:
            await asyncio.wait(tasks, timeout=wait)

    async def _recover_one(self, left: Leftover, record: dict[str, Any]) -> None:
        try:
            await self._upload(left.recording_id, record, left.part_path)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("recording %s: recovery failed; left in the spool", left.recording_id)

    async def shutdown(self, timeout: float) -> None:
        """Stop taking sessions, end every open one (BYE) and store every recording, within ``timeout``."""
        self.accepting = False
        active = [s for s in self.sessions.values() if s.active]
        if active:
            log.info("ending %d session(s) before stopping", len(active))
        for session in active:
            self._end_soon(session, "MCP shutting down")
        pending = [t for t in list(self._finalising.values()) + list(self._tasks) if not t.done()]
        if pending:
            _, not_done = await asyncio.wait(pending, timeout=timeout)
            if not_done:
                log.error("%d finalisation task(s) still running at the deadline; their files stay in the spool",
                          len(not_done))  # fmt: skip
                for t in not_done:
                    t.cancel()
                await asyncio.wait(not_done, timeout=1.0)


def _reason_cause(values: list[str]) -> int | None:
    """The cause of the first ``SIP`` protocol Reason header value (RFC 3326), if any."""
    for value in values:
        m = re.match(r"\s*SIP\s*;(?:.*;)?\s*cause\s*=\s*(\d{3})\b", value, re.IGNORECASE)
        if m:
            return int(m.group(1))
    return None


def _log_invalid(recording_id: str, stats: dict[str, Any] | None) -> None:
    """A warning per leg whose RTP/RTCP ports received datagrams that were neither (too short,
    wrong version, truncated, inconsistent header): rtp_core counted and dropped them, so they
    are in neither the relayed stream nor the recording; the operator sees someone sent them."""
    legs = (stats or {}).get("legs") or []
    for label, leg in zip(("caller", "callee"), legs, strict=False):
        invalid = leg.get("invalid") if isinstance(leg, dict) else None
        if isinstance(invalid, int) and invalid > 0:
            log.warning(
                "recording %s: %d invalid datagram(s) on the %s leg ignored (not RTP/RTCP; neither "
                "relayed nor recorded)",
                recording_id, invalid, label,
            )  # fmt: skip
        foreign = leg.get("foreign") if isinstance(leg, dict) else None
        if isinstance(foreign, int) and foreign > 0:
            # rtp_core's strict source: RTP/RTCP from an address other than the latched party's
            log.warning(
                "recording %s: %d datagram(s) from a foreign source on the %s leg dropped (possible "
                "RTP injection; neither relayed nor recorded)",
                recording_id, foreign, label,
            )  # fmt: skip


def _aware(dt: datetime) -> datetime:
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


def _discard(spool_file: Path, spool: Path, recording_id: str) -> None:
    spool_file.unlink(missing_ok=True)
    remove_sidecar(spool, recording_id)

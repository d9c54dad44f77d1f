"""A small SIP phone for integration tests, built on SipEndpoint.

It registers with digest auth, places calls (answering 407 challenges), answers or rejects incoming
calls, and answers in-dialog requests (BYE, re-INVITE, UPDATE, INFO, OPTIONS) the way a softphone
does, recording everything it receives so tests can assert on it. No RTP is sent.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field

from services.sdp import SessionDescription
from services.sip.aio import ClientRequest, IncomingRequest, SipEndpoint
from services.sip.auth import build_authorization
from services.sip.dialog import Dialog
from services.sip.message import Request, Response, new_call_id, new_tag
from services.sip.timers import TimerConfig

FAST = TimerConfig(t1=0.05, t2=0.4, t4=0.5, timer_d=0.5)
_ports = itertools.count(40000, 2)


def phone_sdp(
    port: int,
    *,
    version: int = 1,
    direction: str = "sendrecv",
    address: str = "127.0.0.1",
    session_id: int = 4242,
    formats: str = "0 8 101",
) -> bytes:
    return (
        "v=0\r\n"
        f"o=phone {session_id} {version} IN IP4 {address}\r\n"
        "s=call\r\n"
        f"c=IN IP4 {address}\r\n"
        "t=0 0\r\n"
        f"m=audio {port} RTP/AVP {formats}\r\n"
        "a=rtpmap:0 PCMU/8000\r\n"
        "a=rtpmap:8 PCMA/8000\r\n"
        "a=rtpmap:101 telephone-event/8000\r\n"
        "a=fmtp:101 0-16\r\n"
        "a=ptime:20\r\n"
        f"a={direction}\r\n"
    ).encode()


def answer_for(offer: bytes, port: int, version: int = 1) -> bytes:
    """A phone's answer: PCMU/PCMA + telephone-event as offered, direction mirrored."""
    sdp = SessionDescription.parse(offer)
    audio = sdp.media[0]
    direction = sdp.media_direction(0)
    mirrored = {"sendonly": "recvonly", "recvonly": "sendonly"}.get(direction, direction)
    chosen = [pt for pt in audio.formats if pt in (0, 8)][:1] + [pt for pt in audio.formats if pt == 101]
    return phone_sdp(
        port, version=version, direction=mirrored, formats=" ".join(map(str, chosen)), session_id=9999
    )


@dataclass
class OutgoingCall:
    """A call this phone placed."""

    phone: Phone
    request: Request
    client: ClientRequest
    provisional: list[Response] = field(default_factory=list)
    response: Response | None = None
    dialog: Dialog | None = None

    async def final(self, timeout: float = 10.0) -> Response:
        self.response = await asyncio.wait_for(self.client.final(), timeout)
        if 200 <= self.response.status < 300:
            self.dialog = Dialog.from_uac(self.client.request, self.response)
            self.phone.dialogs[(self.dialog.call_id, self.dialog.local_tag)] = self.dialog
            self.phone.ep.send_ack(self.dialog.create_ack(self.client.request), self.phone.server)
        return self.response

    def cancel(self) -> None:
        self.client.cancel()

    async def send(
        self, method: str, body: bytes = b"", headers: list[tuple[str, str]] | None = None
    ) -> Response:
        assert self.dialog is not None
        return await self.phone.in_dialog(self.dialog, method, body, headers)


@dataclass
class IncomingCall:
    """A call this phone received."""

    phone: Phone
    inc: IncomingRequest
    tag: str = field(default_factory=new_tag)
    dialog: Dialog | None = None

    @property
    def request(self) -> Request:
        return self.inc.request

    def ring(self, sdp: bytes = b"") -> None:
        self.inc.respond(
            183 if sdp else 180,
            to_tag=self.tag,
            body=sdp,
            content_type="application/sdp" if sdp else None,
            headers=[("Contact", f"<{self.phone.contact}>")],
        )

    async def answer(
        self, sdp: bytes | None = None, headers: list[tuple[str, str]] | None = None
    ) -> Request | None:
        body = sdp if sdp is not None else answer_for(self.request.body, self.phone.rtp_port)
        self.dialog = Dialog.from_uas(
            self.request, self.tag, local_target=self.phone.ep.contact_uri(self.phone.user)
        )
        self.phone.dialogs[(self.dialog.call_id, self.dialog.local_tag)] = self.dialog
        self.inc.respond(
            200,
            to_tag=self.tag,
            body=body,
            content_type="application/sdp",
            headers=[("Contact", f"<{self.phone.contact}>"), *(headers or [])],
        )
        return await self.inc.wait_ack(5.0)

    def reject(self, status: int) -> None:
        self.inc.respond(status, to_tag=self.tag)

    async def request_in_dialog(
        self, method: str, body: bytes = b"", headers: list[tuple[str, str]] | None = None
    ) -> Response:
        assert self.dialog is not None
        return await self.phone.in_dialog(self.dialog, method, body, headers)


class Phone:
    """A UA registered as ``user`` at the SIP Server ``server``."""

    def __init__(
        self,
        user: str,
        password: str,
        server: tuple[str, int],
        domain: str = "lab.test",
        transport: str = "udp",
    ) -> None:
        self.user, self.password, self.server, self.domain = user, password, server, domain
        self.transport = transport
        self.ep = SipEndpoint(host="127.0.0.1", port=0, name=f"phone-{user}", timers=FAST)
        self.ep.request_handler = self._on_request
        self.calls: asyncio.Queue[IncomingCall] = asyncio.Queue()
        self.received: asyncio.Queue[Request] = asyncio.Queue()  # in-dialog requests
        self.dialogs: dict[tuple[str, str], Dialog] = {}
        self.reg_call_id = new_call_id("phone")
        self._cseq = itertools.count(1)
        self.rtp_port = next(_ports)
        self.sdp_version = 1
        self.reject_reinvite: int | None = None
        self.reinvite_delay = 0.0

    async def start(self) -> Phone:
        await self.ep.start()
        return self

    async def close(self) -> None:
        await self.ep.close()

    @property
    def contact(self) -> str:
        return str(self.ep.contact_uri(self.user, self.transport))

    def _headers(
        self, method: str, to_user: str, call_id: str, from_tag: str, cseq: int
    ) -> list[tuple[str, str]]:
        return [
            ("From", f"<sip:{self.user}@{self.domain}>;tag={from_tag}"),
            ("To", f"<sip:{to_user}@{self.domain}>"),
            ("Call-ID", call_id),
            ("CSeq", f"{cseq} {method}"),
            ("Contact", f"<{self.contact}>"),
        ]

    async def register(
        self, *, expires: int = 3600, password: str | None = None, contact: str | None = None
    ) -> Response:
        """REGISTER, answering one 401 with credentials; the final response."""
        tag = new_tag()
        challenge: Response | None = None
        resp: Response | None = None
        for _ in range(2):
            req = Request(
                "REGISTER",
                f"sip:{self.domain}",
                self._headers("REGISTER", self.user, self.reg_call_id, tag, next(self._cseq)),
            )
            if contact is not None:
                req.headers.set("Contact", contact)
            req.headers.add("Expires", str(expires))
            if challenge is not None:
                value = challenge.headers.get_all("WWW-Authenticate")[0]
                req.headers.add(
                    "Authorization",
                    build_authorization(
                        value,
                        method="REGISTER",
                        uri=f"sip:{self.domain}",
                        username=self.user,
                        password=password or self.password,
                    ),
                )
            resp = await self.ep.request(req, self.server, self.transport)
            if resp.status != 401:
                return resp
            challenge = resp
        assert resp is not None
        return resp

    async def call(
        self,
        callee: str,
        sdp: bytes | None = None,
        *,
        headers: list[tuple[str, str]] | None = None,
        password: str | None = None,
    ) -> OutgoingCall:
        """INVITE ``callee``; a 407 is answered with credentials. Returns once the authorised
        INVITE is on its way (await ``final()`` on the result)."""
        body = sdp if sdp is not None else phone_sdp(self.rtp_port)
        call_id, tag = new_call_id("phone"), new_tag()
        cseq = 1
        challenge: Response | None = None
        provisional: list[Response] = []
        while True:
            req = Request(
                "INVITE", f"sip:{callee}@{self.domain}", self._headers("INVITE", callee, call_id, tag, cseq)
            )
            req.headers.add("Content-Type", "application/sdp")
            req.headers.add("Allow", "INVITE, ACK, CANCEL, BYE, OPTIONS, INFO, UPDATE")
            for name, value in headers or []:
                req.headers.add(name, value)
            if challenge is not None:
                value = challenge.headers.get_all("Proxy-Authenticate")[0]
                req.headers.add(
                    "Proxy-Authorization",
                    build_authorization(
                        value,
                        method="INVITE",
                        uri=str(req.uri),
                        username=self.user,
                        password=password or self.password,
                    ),
                )
            req.body = body
            client = self.ep.start_request(
                req, self.server, self.transport, on_provisional=provisional.append
            )
            if challenge is not None:
                return OutgoingCall(self, req, client, provisional)
            first = await client.final()
            if first.status != 407:
                out = OutgoingCall(self, req, client, provisional)
                out.response = first
                return out
            challenge = first
            cseq += 1

    async def in_dialog(
        self, dialog: Dialog, method: str, body: bytes = b"", headers: list[tuple[str, str]] | None = None
    ) -> Response:
        req = dialog.create_request(
            method, body=body, content_type="application/sdp" if body else None, headers=headers
        )
        if method in ("INVITE", "UPDATE") and "Contact" not in req.headers:
            req.headers.add("Contact", f"<{self.contact}>")
        client = self.ep.start_request(req, self.server, self.transport)
        resp = await asyncio.wait_for(client.final(), 10.0)
        if method == "INVITE" and 200 <= resp.status < 300:
            self.ep.send_ack(dialog.create_ack(client.request), self.server, self.transport)
        return resp

    async def next_call(self, timeout: float = 5.0) -> IncomingCall:
        return await asyncio.wait_for(self.calls.get(), timeout)

    async def next_request(self, timeout: float = 5.0) -> Request:
        return await asyncio.wait_for(self.received.get(), timeout)

    async def _on_request(self, inc: IncomingRequest) -> None:
        req = inc.request
        if req.to.tag is None and req.method == "INVITE":
            await self.calls.put(IncomingCall(self, inc))
            return
        if req.to.tag is None:
            inc.respond(200 if req.method == "OPTIONS" else 405)
            return
        dialog = self.dialogs.get((req.call_id, req.to.tag))
        if dialog is None:
            inc.respond(481)
            return
        dialog.receive_request(req)
        await self.received.put(req)
        if req.method == "INVITE":
            if self.reinvite_delay:
                await asyncio.sleep(self.reinvite_delay)
            if self.reject_reinvite:
                inc.respond(self.reject_reinvite)
                return
            self.sdp_version += 1
            body = (
                answer_for(req.body, self.rtp_port, self.sdp_version)
                if req.body
                else phone_sdp(self.rtp_port)
            )
            inc.respond(
                200, body=body, content_type="application/sdp", headers=[("Contact", f"<{self.contact}>")]
            )
            await inc.wait_ack(5.0)
        else:
            inc.respond(200)

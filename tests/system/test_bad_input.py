"""Bad input against the real stack: a clear answer and a log line, no daemon dies, no recording lost.

Every daemon runs as its own process (the session's ``lab``); the tests talk to them over real
sockets:

- Malformed SIP over UDP and TCP to the SIP Server, the Resource Manager and an MCP (garbage,
  binary junk, no Via, bad CSeq, unreadable and wrong-version request lines, an over-long
  Request-URI, an over-size message, a Content-Length larger than the body, RFC 4475 vectors): a
  readable request gets 400 (or the specific 4xx/5xx) whose reason names the defect, unreadable
  bytes get nothing; over TCP the connection is closed after a framing error; every case leaves a
  WARNING naming its source address in the daemon's log, and the daemon still answers OPTIONS.
- Wrong credentials: REGISTER 401 -> 403, INVITE 407 -> 403, each logged by the SIP Server; an
  unknown user gets the very same answers (no enumeration), the log alone says "unknown user".
- Malformed SDP in an authenticated INVITE to a registered user: 488 with the defect in a Warning
  header; the callee never rings, nothing is recorded.
- Garbage RTP/RTCP from a third socket into the MCP ports of a live recorded SIPp call: the call
  succeeds, its recording has the normal duration and exactly the pcap's packets on the caller
  stream; the MCP logs the junk it ignored.
- Bad Web Services requests: JSON 401/400/404 errors naming the problem; a second tenant's key does
  not see the first tenant's recordings.
- At the end every daemon is alive and a normal call is still recorded.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import secrets
import socket
import struct
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from services.lab import Lab
from services.sip.aio import IncomingRequest, SipEndpoint
from services.sip.auth import build_authorization
from services.sip.message import Request, Response, new_call_id, new_tag
from tests.helpers.sipp import Sipp, run_uac, start_registered_uas
from tests.system.conftest import LabApi

pytestmark = pytest.mark.system

HOST = "127.0.0.1"
VECTORS = Path(__file__).resolve().parents[1] / "vectors" / "rfc4475"
PCAP_PACKETS = 236  # g711a.pcap: 7.08 s of 30 ms packets (240 bytes of A-law each)
TIMEOUT = 3.0
#: Recordings this module filed (the API test uses one of them, not another module's).
OWN_RECORDINGS: list[dict[str, Any]] = []


# -- malformed SIP -------------------------------------------------------------------------------


def sip_request(
    transport: str,
    local_port: int,
    *,
    target: str,
    request_line: str | None = None,
    via: bool = True,
    cseq: str = "1 OPTIONS",
    extra: tuple[str, ...] = (),
    body: bytes = b"",
    content_length: int | None = None,
    call_id: str | None = None,
) -> bytes:
    """An OPTIONS to ``target`` (``sip:x@host:port``), well-formed unless told otherwise."""
    lines = [request_line or f"OPTIONS {target} SIP/2.0"]
    if via:
        lines.append(
            f"Via: SIP/2.0/{transport.upper()} {HOST}:{local_port};branch=z9hG4bK{secrets.token_hex(8)};rport"
        )
    lines += [
        f"From: <sip:bad-input@{HOST}>;tag={new_tag()}",
        f"To: <{target}>",
        f"Call-ID: {call_id or new_call_id('bad-input')}",
        f"CSeq: {cseq}",
        "Max-Forwards: 70",
        *extra,
        f"Content-Length: {len(body) if content_length is None else content_length}",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def tls_client_hello() -> bytes:
    """What a phone configured for TLS sends first: a TLS record, no CRLF anywhere."""
    rnd = random.Random(4475)
    hello = b"\x03\x03" + rnd.randbytes(32) + b"\x00\x00\x04\x13\x01\x13\x02\x01\x00"
    handshake = b"\x01" + len(hello).to_bytes(3, "big") + hello
    return b"\x16\x03\x01" + len(handshake).to_bytes(2, "big") + handshake


@dataclass
class Case:
    """One malformed message: what it is, the answer expected (None: dropped, no answer)."""

    name: str
    build: Callable[[str, int, str], bytes]  # (transport, local port, target URI) -> bytes
    status: int | None
    reason: str  # in the answer's reason phrase and in the daemon's warning
    transports: tuple[str, ...] = ("udp", "tcp")
    half_close: bool = False  # TCP: the client closes its side after sending (the message stays incomplete)
    chunked: bool = False  # TCP: sent in pieces, the last one breaking the size limit


CASES = [
    Case("garbage bytes", lambda t, p, u: b"\x00\xff\xfe GARBAGE \x01\x02\x03\r\n\r\n", None, "Invalid method"),
    Case("binary junk (TLS to a plain SIP port)", lambda t, p, u: tls_client_hello(), None,
         "Header section is not terminated", half_close=True),
    Case("no Via", lambda t, p, u: sip_request(t, p, target=u, via=False), 400, "Via header is missing"),
    Case("bad CSeq", lambda t, p, u: sip_request(t, p, target=u, cseq="one OPTIONS"), 400, "Malformed CSeq header"),
    Case("CSeq method mismatch", lambda t, p, u: sip_request(t, p, target=u, cseq="1 INVITE"), 400,
         "CSeq method does not match"),
    Case("unreadable request line", lambda t, p, u: sip_request(t, p, target=u, request_line=f"OPTIONS {u}"),
         None, "Malformed request line"),
    Case("unknown SIP version", lambda t, p, u: sip_request(t, p, target=u, request_line=f"OPTIONS {u} SIP/7.0"),
         505, "SIP version not supported"),
    Case("over-long Request-URI",
         lambda t, p, u: sip_request(t, p, target=u, request_line=f"OPTIONS sip:{'a' * 9000}@{HOST} SIP/2.0"),
         414, "Request-URI too long"),
    Case("over-size message (70 KB header)",
         lambda t, p, u: sip_request(t, p, target=u, extra=("X-Junk: " + "x" * 70000,)), 413, "Message too large",
         transports=("tcp",), chunked=True),
    Case("Content-Length larger than body",
         lambda t, p, u: sip_request(t, p, target=u, body=b"v=0\r\n", content_length=500), 400,
         "Content-Length larger than body", half_close=True),
    Case("RFC 4475 3.3.1 insuf (missing To, From, Call-ID)", lambda t, p, u: (VECTORS / "insuf.dat").read_bytes(),
         400, "header is missing"),
    Case("RFC 4475 3.3.2 unkscm (unknown URI scheme)", lambda t, p, u: (VECTORS / "unkscm.dat").read_bytes(),
         416, "scheme"),
    Case("RFC 4475 3.1.2.2 clerr (Content-Length larger than message)",
         lambda t, p, u: (VECTORS / "clerr.dat").read_bytes(), 400, "Content-Length", transports=("udp",)),
]  # fmt: skip

DAEMONS = ["sip-server-a", "resource-manager", "mcp1"]


def daemon_port(lab: Lab, label: str) -> int:
    if label == "sip-server-a":
        return lab.config.sip_server.port
    if label == "resource-manager":
        return lab.config.resource_manager.port
    return next(m.port for m in lab.config.mcp if m.name == label)


def status_line(data: bytes) -> tuple[int, str]:
    first = data.split(b"\r\n", 1)[0].decode("utf-8", "replace")
    m = re.fullmatch(r"SIP/2\.0 (\d{3}) (.*)", first)
    assert m, f"not a SIP response: {data[:200]!r}"
    return int(m.group(1)), m.group(2)


def header(data: bytes, name: str) -> str | None:
    for line in data.split(b"\r\n\r\n", 1)[0].decode("utf-8", "replace").split("\r\n")[1:]:
        key, _, value = line.partition(":")
        if key.strip().lower() == name.lower():
            return value.strip()
    return None


def udp_exchange(sock: socket.socket, dest: tuple[str, int], case: Case, target: str) -> bytes | None:
    """Send the case, then a well-formed OPTIONS; the case's answer (None if it was dropped)."""
    port = sock.getsockname()[1]
    sock.sendto(case.build("udp", port, target), dest)
    probe_id = new_call_id("probe")
    sock.sendto(sip_request("udp", port, target=target, call_id=probe_id), dest)
    answers: list[bytes] = []
    while True:
        data = sock.recv(65535)
        if header(data, "Call-ID") == probe_id:
            assert status_line(data)[0] == 200, data[:300]
            assert len(answers) <= 1, f"{case.name}: more than one answer: {[a[:100] for a in answers]}"
            return answers[0] if answers else None
        answers.append(data)


def tcp_exchange(dest: tuple[str, int], case: Case, target: str) -> tuple[int, bytes]:
    """Send the case on a fresh connection; (local port, everything received until the daemon closed)."""
    with socket.create_connection(dest, timeout=TIMEOUT) as sock:
        port = sock.getsockname()[1]
        data = case.build("tcp", port, target)
        if case.chunked:
            # The request line goes first; the byte that breaks the 64 KB limit arrives reads later.
            sock.sendall(data[:200])
            time.sleep(0.02)
            for i in range(200, 65000, 8000):
                sock.sendall(data[i : min(i + 8000, 65000)])
                time.sleep(0.005)
            time.sleep(0.05)
            sock.sendall(data[65000:66000])
        else:
            sock.sendall(data)
        if case.half_close:
            sock.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := sock.recv(65536):  # a timeout here means the daemon kept the connection open
            received += chunk
        return port, received


def options_over_tcp(dest: tuple[str, int], target: str) -> int:
    with socket.create_connection(dest, timeout=TIMEOUT) as sock:
        port = sock.getsockname()[1]
        sock.sendall(sip_request("tcp", port, target=target))
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            assert chunk, "connection closed without an answer to OPTIONS"
            data += chunk
        return status_line(data)[0]


def wait_log(path: Path, patterns: list[str], timeout: float = 5.0) -> list[str]:
    """Wait until every pattern (a regex) matches a line of the log; the ones that never did."""
    deadline = time.monotonic() + timeout
    while True:
        text = path.read_text(errors="replace")
        missing = [p for p in patterns if not re.search(p, text, re.MULTILINE)]
        if not missing or time.monotonic() > deadline:
            return missing
        time.sleep(0.1)


@pytest.mark.parametrize("transport", ["udp", "tcp"])
@pytest.mark.parametrize("label", DAEMONS)
def test_malformed_sip_is_answered_logged_and_survived(lab: Lab, label: str, transport: str) -> None:
    dest = (HOST, daemon_port(lab, label))
    target = f"sip:{label}@{HOST}:{dest[1]}"
    cases = [c for c in CASES if transport in c.transports]
    expect_logged: dict[str, str] = {}  # log pattern -> case name
    if transport == "udp":
        for case in cases:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.settimeout(TIMEOUT)
                sock.bind((HOST, 0))
                port = sock.getsockname()[1]
                answer = udp_exchange(sock, dest, case, target)
            check_answer(case, answer)
            expect_logged[warning_pattern(label, port, transport, case)] = case.name
    else:
        for case in cases:
            port, received = tcp_exchange(dest, case, target)
            # The daemon answered (or not) and closed the connection: recv() reached EOF above.
            check_answer(case, received or None)
            expect_logged[warning_pattern(label, port, transport, case)] = case.name
        assert options_over_tcp(dest, target) == 200
    missing = wait_log(lab.daemons[label].log_path, list(expect_logged))
    assert not missing, f"{label} logged no warning for: {[expect_logged[p] for p in missing]}"
    assert lab.daemons[label].alive()


def check_answer(case: Case, answer: bytes | None) -> None:
    if case.status is None:
        assert answer is None, f"{case.name}: unexpected answer {answer[:200]!r}"
        return
    assert answer is not None, f"{case.name}: no answer"
    status, reason = status_line(answer)
    assert status == case.status and case.reason.lower() in reason.lower(), f"{case.name}: {status} {reason}"
    assert answer.count(b"SIP/2.0 ") == 1, f"{case.name}: more than one answer: {answer[:300]!r}"


def warning_pattern(label: str, port: int, transport: str, case: Case) -> str:
    # "<time> <daemon> WARNING services.sip.aio: <name>: malformed message from 127.0.0.1:PORT/udp: 400 ..."
    outcome = "answered" if case.status is not None else "dropped"
    return (
        rf"^.* WARNING .*(malformed|bad) message from {re.escape(HOST)}:{port}/{transport}: "
        rf".*{re.escape(case.reason)}.*\({outcome}\)$"
    )


# -- wrong credentials, malformed SDP --------------------------------------------------------------


class Client:
    """A SIP client on a SipEndpoint (the SIP core as a phone would use it)."""

    def __init__(self, lab: Lab) -> None:
        self.server = (HOST, lab.config.sip_server.port)
        self.domain = HOST
        self.ep = SipEndpoint(host=HOST, port=0, name="bad-input-client")
        self.incoming: list[Request] = []
        self.ep.request_handler = self._on_request

    async def _on_request(self, inc: IncomingRequest) -> None:
        self.incoming.append(inc.request)
        inc.respond(486 if inc.request.method == "INVITE" else 200)

    async def __aenter__(self) -> Client:
        await self.ep.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.ep.close()

    def request(self, method: str, user: str, to_user: str, *, call_id: str, cseq: int, tag: str) -> Request:
        uri = f"sip:{self.domain}" if method == "REGISTER" else f"sip:{to_user}@{self.domain}"
        return Request(
            method,
            uri,
            [
                ("From", f"<sip:{user}@{self.domain}>;tag={tag}"),
                ("To", f"<sip:{to_user}@{self.domain}>"),
                ("Call-ID", call_id),
                ("CSeq", f"{cseq} {method}"),
                ("Contact", f"<sip:{user}@{HOST}:{self.ep.port}>"),
            ],
        )

    async def with_credentials(
        self, make: Callable[[int], Request], username: str, password: str
    ) -> tuple[Response, Response]:
        """Send the request, answer the challenge with ``username``/``password``; both answers."""
        first = await asyncio.wait_for(self.ep.request(make(1), self.server), 10)
        name = "WWW-Authenticate" if first.status == 401 else "Proxy-Authenticate"
        auth = "Authorization" if first.status == 401 else "Proxy-Authorization"
        challenge = first.headers.get(name)
        assert first.status in (401, 407) and challenge, first
        second = make(2)
        second.headers.add(
            auth,
            build_authorization(
                challenge, method=second.method, uri=str(second.uri), username=username, password=password
            ),
        )
        return first, await asyncio.wait_for(self.ep.request(second, self.server), 10)

    def register(self, user: str, expires: int) -> Callable[[int], Request]:
        call_id, tag = new_call_id("bad-input"), new_tag()

        def make(cseq: int) -> Request:
            req = self.request("REGISTER", user, user, call_id=call_id, cseq=cseq, tag=tag)
            req.headers.add("Expires", str(expires))
            return req

        return make

    def invite(self, user: str, callee: str, sdp: bytes, *, call_id: str) -> Callable[[int], Request]:
        tag = new_tag()

        def make(cseq: int) -> Request:
            req = self.request("INVITE", user, callee, call_id=call_id, cseq=cseq, tag=tag)
            req.headers.add("Content-Type", "application/sdp")
            req.body = sdp
            return req

        return make


def good_sdp(port: int = 40000) -> bytes:
    return (
        f"v=0\r\no=- 1 1 IN IP4 {HOST}\r\ns=-\r\nc=IN IP4 {HOST}\r\nt=0 0\r\n"
        f"m=audio {port} RTP/AVP 8 0\r\na=rtpmap:8 PCMA/8000\r\na=rtpmap:0 PCMU/8000\r\n"
    ).encode()


async def test_wrong_credentials_are_challenged_then_refused(lab: Lab, users: dict[str, str]) -> None:
    log_path = lab.daemons["sip-server-a"].log_path
    async with Client(lab) as client:
        # REGISTER: 401 with a challenge, then 403 for the wrong password (and for an unknown user).
        first, second = await client.with_credentials(client.register("1001", 60), "1001", "wrong-password")
        assert first.status == 401 and "Digest" in (first.headers.get("WWW-Authenticate") or "")
        assert second.status == 403 and "credentials" in second.reason, second
        # An extension nobody has is challenged and refused the same way: no enumeration.
        first, unknown = await client.with_credentials(client.register("1999", 60), "1999", "any-password")
        assert first.status == 401 and "Digest" in (first.headers.get("WWW-Authenticate") or "")
        assert (unknown.status, unknown.reason) == (second.status, second.reason), unknown
        # ... and for good credentials of another user (third-party registration).
        first, second = await client.with_credentials(client.register("1001", 60), "1002", users["1002"])
        assert (first.status, second.status) == (401, 403) and "AOR" in second.reason, (first, second)

        # INVITE: 407, then 403 for the wrong password, and for good credentials of another user.
        make = client.invite("1001", "1002", good_sdp(), call_id=new_call_id("bad-input"))
        first, second = await client.with_credentials(make, "1001", "wrong-password")
        assert first.status == 407 and "Digest" in (first.headers.get("Proxy-Authenticate") or "")
        assert second.status == 403 and "credentials" in second.reason, second
        # An unknown caller: the same 407, then the same 403.
        make = client.invite("1999", "1002", good_sdp(), call_id=new_call_id("bad-input"))
        first, unknown = await client.with_credentials(make, "1999", "any-password")
        assert first.status == 407 and (unknown.status, unknown.reason) == (second.status, second.reason)
        make = client.invite("1003", "1002", good_sdp(), call_id=new_call_id("bad-input"))
        first, second = await client.with_credentials(make, "1001", users["1001"])
        assert (first.status, second.status) == (407, 403) and "From" in second.reason, second
        assert client.incoming == []
    missing = wait_log(
        log_path,
        [
            r"REGISTER from 1001 refused for tenant default: wrong password \(source 127\.0\.0\.1:",
            r"REGISTER from 1999 refused for tenant default: unknown user \(source 127\.0\.0\.1:",
            r"REGISTER of 1001 by 1002 refused: third-party registration",
            r"INVITE from 1001 refused for tenant default: wrong password",
            r"INVITE from 1999 refused for tenant default: unknown user",
        ],
    )
    assert not missing, f"the SIP Server did not log: {missing}"
    assert lab.daemons["sip-server-a"].alive()


MALFORMED_SDP = [
    (b"v=0\r\nthis is not sdp\r\n", "not '<type>=<value>'"),
    (good_sdp().replace(b"m=audio 40000", b"m=audio notaport"), "port is not a number"),
    (b"\x00\xff\xfe\x00", "not valid UTF-8"),
]


async def test_malformed_sdp_gets_488_and_records_nothing(
    lab: Lab, api: LabApi, users: dict[str, str]
) -> None:
    async with Client(lab) as client:
        # The callee is registered here: if anything got through, this client would see the INVITE.
        _, registered = await client.with_credentials(client.register("1002", 60), "1002", users["1002"])
        assert registered.status == 200, registered
        call_ids = []
        try:
            for sdp, defect in MALFORMED_SDP:
                call_id = new_call_id("bad-sdp")
                call_ids.append(call_id)
                make = client.invite("1001", "1002", sdp, call_id=call_id)
                first, answer = await client.with_credentials(make, "1001", users["1001"])
                assert first.status == 407
                assert answer.status == 488 and "malformed SDP" in answer.reason, answer
                assert defect in (answer.headers.get("Warning") or ""), answer.headers.get("Warning")
        finally:
            _, gone = await client.with_credentials(client.register("1002", 0), "1002", users["1002"])
        assert gone.status == 200
        assert client.incoming == [], [r.method for r in client.incoming]
    missing = wait_log(
        lab.daemons["sip-server-a"].log_path,
        [rf"INVITE {re.escape(cid)}: malformed SDP" for cid in call_ids],
    )
    assert not missing, f"the SIP Server did not log: {missing}"
    await asyncio.sleep(1.0)  # what a bridge would take to be filed, had one been opened
    for call_id in call_ids:
        assert await asyncio.to_thread(api.search, call_id=call_id) == []


# -- garbage RTP during a recorded call -------------------------------------------------------------


def rtp_junk() -> list[bytes]:
    """Datagrams that are not RTP, for an RTP port."""
    rnd = random.Random(3550)
    noise = bytearray(rnd.randbytes(200))
    noise[0] = 0xC0 | (noise[0] & 0x3F)  # version 3: random bytes that are surely not RTP
    header = struct.pack("!BBHII", 0x80, 8, 4242, 160, 0xBADBAD)
    return [
        b"",  # empty
        b"\x80\x08",  # shorter than a header
        struct.pack("!BBHII", 0x40, 8, 1, 160, 1) + b"\xd5" * 240,  # version 1
        bytes(noise),
        header + b"\xd5" * 60000,  # huge: larger than any RTP packet rtp_core accepts
        struct.pack("!BBHII", 0x8F, 8, 2, 320, 1) + b"\xd5" * 8,  # 15 CSRCs announced, 2 present
        struct.pack("!BBHII", 0x90, 8, 3, 480, 1)
        + b"\xbe\xde\xff\xff"
        + b"\xd5" * 20,  # extension 256 KB long
        struct.pack("!BBHII", 0xA0, 8, 4, 640, 1) + b"\xd5" * 20 + b"\xff",  # 255 octets of padding
        struct.pack("!BBHII", 0x80, 0xC8, 5, 0, 1) + b"\x00" * 8,  # an RTCP SR (PT 200) on the RTP port
    ]


def rtcp_junk() -> list[bytes]:
    rnd = random.Random(3551)
    return [b"\x81", b"\x00" * 40, bytes([0x3F]) + rnd.randbytes(100), b"\x81\xc8" + b"\x00" * 3000]


def answered_sdp(messages_log: Path) -> tuple[str, int] | None:
    """The c= address and first m= port of the SDP in the 200 OK to our INVITE, once SIPp traced it."""
    text = messages_log.read_text(errors="replace") if messages_log.exists() else ""
    for block in re.split(r"\n-{10,}[^\n]*\n", text):
        if "message received" not in block or "SIP/2.0 200" not in block or "INVITE" not in block:
            continue
        c = re.search(r"^c=IN IP4 (\S+)", block, re.MULTILINE)
        m = re.search(r"^m=audio (\d+) ", block, re.MULTILINE)
        if c and m:
            return c.group(1), int(m.group(1))
    return None


def sent_call_id(messages_log: Path) -> str:
    m = re.search(r"^Call-ID: *(\S+)", messages_log.read_text(errors="replace"), re.MULTILINE)
    assert m, "no Call-ID in SIPp's trace"
    return m.group(1)


@dataclass
class JunkCall:
    recording: dict[str, Any]
    junk_sent: int
    mcp_port: tuple[str, int]


async def test_garbage_rtp_during_a_recorded_call(
    tmp_path: Path, lab: Lab, api: LabApi, sip_addr: str, users: dict[str, str]
) -> None:
    call_ms = 8000
    uas = await start_registered_uas(
        "uas_echo.xml", sip_addr, "1002", users["1002"], workdir=tmp_path / "uas", rtp_echo=True
    )
    uac = Sipp(
        "uac_pcap_auth.xml", workdir=tmp_path / "uac", remote=sip_addr, service="1002", user="1001",
        auth=("1001", users["1001"]), max_calls=1, duration_ms=call_ms,
    )  # fmt: skip
    sent = 0
    try:
        await uac.start()
        deadline = time.monotonic() + 10
        while (where := answered_sdp(uac.message_file)) is None:
            assert time.monotonic() < deadline and uac.running, "no 200 OK with SDP for the SIPp call"
            await asyncio.sleep(0.05)
        # After the caller's first packets: rtp_core latched the leg to SIPp already, so the junk
        # cannot take the relay over.
        await asyncio.sleep(1.5)
        mcp_ip, port = where
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as junk:
            junk.bind((HOST, 0))
            for _ in range(3):
                for data in rtp_junk():
                    junk.sendto(data, (mcp_ip, port))
                    sent += 1
                for data in rtcp_junk():
                    junk.sendto(data, (mcp_ip, port + 1))
                    sent += 1
                await asyncio.sleep(1.0)
        result = await uac.wait(call_ms / 1000 + 20)
    finally:
        if uac.running:
            await uac.stop()
        await uas.stop()
    assert result.ok and result.successful == 1, result.describe()
    call_id = sent_call_id(uac.message_file)
    (rec,) = await api.wait_for(1, timeout=20, call_id=call_id)
    OWN_RECORDINGS.append(rec)
    assert abs(rec["duration"] - call_ms / 1000) < 1.0, rec["duration"]
    streams = {s["label"]: s for s in rec["streams"]}
    # The pcap's packets and nothing else: the junk was neither recorded nor counted as RTP.
    assert streams["caller"]["packets"] == PCAP_PACKETS, streams["caller"]
    assert streams["caller"]["bytes"] == PCAP_PACKETS * 240, streams["caller"]
    assert streams["caller"]["lost"] == 0, streams["caller"]
    assert streams["callee"]["packets"] >= PCAP_PACKETS * 0.98, streams["callee"]
    missing = wait_log(
        lab.daemons[rec["mcp"]].log_path,
        [rf"WARNING .*recording {rec['id']}: {sent} invalid datagram\(s\) on the caller leg ignored"],
    )
    assert not missing, (
        f"{rec['mcp']} did not log the {sent} junk datagrams: {lab.daemons[rec['mcp']].tail(20)}"
    )


# -- bad Web Services requests -----------------------------------------------------------------------


def http(url: str, headers: dict[str, str] | None = None, method: str = "GET", body: bytes | None = None
         ) -> tuple[int, dict[str, str], Any]:  # fmt: skip
    req = urllib.request.Request(url, method=method, data=body, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, dict(resp.headers), json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as err:
        with err:
            return err.code, dict(err.headers), json.loads(err.read())


def api_error(result: tuple[int, dict[str, str], Any], status: int, *words: str) -> None:
    code, headers, body = result
    assert code == status, (code, body)
    assert headers.get("Content-Type", "").startswith("application/json"), headers
    error = body["error"]
    assert error["status"] == status and error["code"] and error["message"], body
    for word in words:
        assert word in error["message"], (word, error["message"])


async def any_recording(tmp_path: Path, api: LabApi, sip_addr: str, users: dict[str, str]) -> dict[str, Any]:
    """A recording of the default tenant that this module filed (a short call's if none yet)."""
    if OWN_RECORDINGS:
        return OWN_RECORDINGS[0]
    return await short_recorded_call(tmp_path, api, sip_addr, users)


async def test_bad_api_requests_get_json_errors(
    tmp_path: Path, lab: Lab, api: LabApi, sip_addr: str, users: dict[str, str], lab_info: dict[str, Any]
) -> None:
    base = api.base_url
    key = {"Authorization": f"Bearer {api.api_key}"}
    rec = await any_recording(tmp_path, api, sip_addr, users)

    def get(path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], Any]:
        return http(base + path, key if headers is None else headers)

    # Authorisation
    no_key = get("/recordings", {})
    api_error(no_key, 401, "Authorization")
    assert no_key[1].get("WWW-Authenticate", "").startswith("Bearer")
    api_error(get("/recordings", {"Authorization": "Bearer cv_not-a-key"}), 401, "API key is not valid")
    api_error(get("/recordings", {"Authorization": f"Basic {api.api_key}"}), 401, "Bearer")
    api_error(get(f"/recordings/{rec['id']}/audio", {}), 401)
    internal = http(
        base + "/internal/recordings", key, "POST", b"{}"
    )  # a tenant key is not the internal token
    api_error(internal, 401, "internal token")
    token = {"Authorization": f"Bearer {lab.config.web_services.internal_token}"}
    api_error(http(base + "/internal/recordings", token, "POST", b"{not json"), 400, "not valid JSON")
    # Search parameters
    api_error(get("/recordings?start_after=yesterday"), 400, "start_after", "ISO 8601")
    api_error(get("/recordings?start_before=2024-13-45T99:00:00Z"), 400, "start_before")
    api_error(get("/recordings?start_after=2024-02-01T00:00:00Z&start_before=2024-01-01T00:00:00Z"), 400,
              "start_after must be earlier")  # fmt: skip
    api_error(get("/recordings?limit=abc"), 400, "limit", "'abc'")
    api_error(get("/recordings?limit=100000"), 400, "limit", "'100000'")
    api_error(get("/recordings?limit=0"), 400, "limit")
    api_error(get("/recordings?cursor=not-a-cursor"), 400)
    api_error(get("/recordings?colour=blue"), 400, "unknown query parameter 'colour'")
    api_error(get("/recordings?party=1001&party=1002"), 400, "more than once")
    # Unknown recordings and resources
    api_error(get("/recordings/no-such-recording-0000"), 404, "no-such-recording-0000")
    api_error(get("/recordings/no-such-recording-0000/audio"), 404, "no-such-recording-0000")
    api_error(get("/recordings/%2e%2e%2f%2e%2e%2fetc"), 404)
    api_error(get("/nothing-here"), 404)
    api_error(http(base + f"/recordings/{rec['id']}", key, "PUT", b"{}"), 405, "PUT")
    # The default tenant's own view works ...
    assert get(f"/recordings/{rec['id']}")[0] == 200

    # ... another tenant's key sees none of it.
    acme = next(t for t in lab_info["tenants"] if t["id"] == "acme")
    acme_key = {"Authorization": f"Bearer {acme['api_key']}"}
    api_error(get(f"/recordings/{rec['id']}", acme_key), 404, rec["id"])
    api_error(get(f"/recordings/{rec['id']}/audio", acme_key), 404, rec["id"])
    api_error(http(base + f"/recordings/{rec['id']}/audio-url", acme_key, "POST"), 404, rec["id"])
    api_error(http(base + f"/recordings/{rec['id']}", acme_key, "DELETE"), 404, rec["id"])
    acme_api = LabApi(base, acme["api_key"])
    acme_ids = {r["id"] for r in await asyncio.to_thread(acme_api.search)}
    assert rec["id"] not in acme_ids
    assert await asyncio.to_thread(acme_api.search, call_id=rec["call_id"]) == []
    assert all(r["tenant"] == "acme" for r in await asyncio.to_thread(acme_api.search))
    # The delete attempt above did not touch it.
    assert get(f"/recordings/{rec['id']}")[0] == 200

    missing = wait_log(
        lab.daemons["web-services"].log_path,
        [
            r"WARNING .*rejected API key",
            r"GET /api/v1/recordings -> 400 limit must be an integer",
            rf"GET /api/v1/recordings/{re.escape(rec['id'])} -> 404",
        ],
    )
    assert not missing, f"Web Services did not log: {missing}"


# -- afterwards ---------------------------------------------------------------------------------------


async def short_recorded_call(
    tmp_path: Path, api: LabApi, sip_addr: str, users: dict[str, str], call_ms: int = 2000
) -> dict[str, Any]:
    t0 = (datetime.now(UTC) - timedelta(seconds=1)).isoformat()
    uas = await start_registered_uas(
        "uas_echo.xml", sip_addr, "1004", users["1004"], workdir=tmp_path / "short-uas", rtp_echo=True
    )
    try:
        result = await run_uac(
            "uac_pcap_auth.xml", sip_addr, workdir=tmp_path / "short-uac", service="1004", user="1003",
            auth=("1003", users["1003"]), duration_ms=call_ms, timeout=20,
        )  # fmt: skip
    finally:
        await uas.stop()
    assert result.ok and result.successful == 1, result.describe()
    call_id = sent_call_id(tmp_path / "short-uac" / "messages.log")
    recs = await api.wait_for(1, timeout=20, call_id=call_id, start_after=t0)
    assert len(recs) == 1, f"the call {call_id} was not recorded"
    OWN_RECORDINGS.append(recs[0])
    return recs[0]


async def test_after_the_bad_input_every_daemon_is_alive_and_calls_record(
    tmp_path: Path, lab: Lab, api: LabApi, sip_addr: str, users: dict[str, str]
) -> None:
    rec = await short_recorded_call(tmp_path, api, sip_addr, users)
    assert abs(rec["duration"] - 2.0) < 0.8, rec["duration"]
    streams = {s["label"]: s for s in rec["streams"]}
    assert streams["caller"]["packets"] > 50 and streams["callee"]["packets"] > 50, streams
    assert rec["caller"] == "1003" and rec["callee"] == "1004"
    dead = {label: d.tail(20) for label, d in lab.daemons.items() if not d.alive()}
    assert not dead, f"daemons died: {dead}"
    for label in [*DAEMONS, "mcp2"]:
        port = daemon_port(lab, label)
        assert options_over_tcp((HOST, port), f"sip:{label}@{HOST}:{port}") == 200, label

"""asyncio glue for the SIP core: UDP and TCP on one port, driving the sans-I/O TransactionLayer.

This module only moves data: bytes in -> ``parse_message`` / ``StreamFramer`` -> the transaction
layer -> messages out and events to the TU; one ``call_at`` timer is re-armed at the layer's
``next_timer()`` after every step. Everything protocol-related lives in ``transaction.py``.

Robustness rules: a malformed datagram whose request line can still be read is answered with the
``SipParseError``'s status (400 unless more specific) and its reason, anything else is dropped, with
a warning either way; a framing error on TCP is answered the same way (from the start of the message,
however many reads it came in) and the connection closed; so is a message left incomplete when the
peer closes its side of the connection (a Content-Length larger than the body). A TCP connection
that carries no complete message (nor a CRLF keep-alive) for ``idle_timeout`` seconds is closed, as is
one whose current message stays incomplete for ``partial_timeout`` seconds (a peer trickling or
stalling in the middle of a message, with a warning); incoming connections beyond
``max_connections`` are accepted and closed at once, with a warning.
Every incoming message and every handler is wrapped so that nothing takes the endpoint down.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import re
import socket
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from .errors import InvalidStateError, SipParseError
from .message import Request, Response, StreamFramer, make_response, new_tag, parse_message
from .timers import DEFAULT_TIMERS, TimerConfig, is_reliable
from .transaction import (
    AckReceived,
    AckTimeout,
    CancelReceived,
    ClientTransaction,
    InviteServerTransaction,
    RequestReceived,
    ResponseReceived,
    Send,
    ServerTransaction,
    StrayResponse,
    TransactionLayer,
    TransactionState,
    TransactionTerminated,
    prepend_via,
)
from .uri import SipUri

__all__ = ["ClientRequest", "IncomingRequest", "SipEndpoint"]

log = logging.getLogger(__name__)

Address = tuple[str, int]
RequestHandler = Callable[["IncomingRequest"], Awaitable[None] | None]
AckHandler = Callable[[Request, Address, str], None]

_CONNECT_TIMEOUT = 5.0
#: TCP connection limits (SipEndpoint arguments): no complete message in either direction nor a
#: keep-alive for this long closes a connection (RFC 3261 18.3 leaves the lifetime to the server);
IDLE_TIMEOUT = 300.0
#: a message begun but not completed after 64*T1 (the transaction timeout) is abandoned;
PARTIAL_TIMEOUT = 32.0
#: simultaneous TCP connections per endpoint.
MAX_CONNECTIONS = 10000
_REQUEST_LINE = re.compile(r"([A-Za-z0-9\-.!%*_+`'~]+) +(\S+) +SIP/(\d+\.\d+)")
_COMPACT = {"v": "Via", "f": "From", "t": "To", "i": "Call-ID"}
_ECHOED = {"via": "Via", "from": "From", "to": "To", "call-id": "Call-ID", "cseq": "CSeq"}


def error_response_for(data: bytes, status: int, reason: str) -> bytes | None:
    """A best-effort error response to bytes that failed to parse (8.2.6, 21.4.1).

    Returns None unless the first line is a readable request line (never answers a response or
    an ACK). Via, From, To, Call-ID and CSeq are echoed as they are, so the client can match it.
    """
    head = data.split(b"\r\n\r\n", 1)[0].split(b"\n\n", 1)[0]
    lines = [line.rstrip(b"\r").decode("utf-8", "replace") for line in head.split(b"\n")]
    while lines and not lines[0].strip():
        lines.pop(0)  # RFC 3261 7.5: leading CRLFs are ignored
    if not lines:
        return None
    m = _REQUEST_LINE.fullmatch(lines[0].strip())
    if m is None or m.group(1).upper() == "ACK":
        return None
    out = [f"SIP/2.0 {status} {' '.join(reason.split())[:120] or 'Bad Request'}"]
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon:
            continue
        key = name.strip().lower()
        canonical = _COMPACT.get(key) or _ECHOED.get(key)
        if canonical is None:
            continue
        value = value.strip()
        if canonical == "To" and ";tag=" not in value.replace(" ", "").lower():
            value += f";tag={new_tag()}"  # 8.2.6.2
        out.append(f"{canonical}: {value}")
    out.append("Content-Length: 0")
    return ("\r\n".join(out) + "\r\n\r\n").encode("utf-8")


class ClientRequest:
    """A request sent in a client transaction; await :meth:`final` for its final response."""

    def __init__(
        self,
        endpoint: SipEndpoint,
        request: Request,
        transaction: ClientTransaction,
        on_provisional: Callable[[Response], None] | None,
    ) -> None:
        self.request = request
        self.transaction = transaction
        self.on_provisional = on_provisional
        self.provisional: list[Response] = []
        self._endpoint = endpoint
        self._final: asyncio.Future[Response] = asyncio.get_running_loop().create_future()

    def __repr__(self) -> str:
        return f"<ClientRequest {self.request.method} {self.request.uri} {self.transaction.state.value}>"

    async def final(self) -> Response:
        """The final response; a timeout (timer B/F) or transport error comes back as a synthetic
        408 / 503 response (RFC 3261 8.1.3.1)."""
        return await asyncio.shield(self._final)

    @property
    def done(self) -> bool:
        """True once the final response is known."""
        return self._final.done()

    def cancel(self) -> None:
        """RFC 3261 9.1: send CANCEL (deferred until a provisional response arrived; nothing once
        the final response did). The INVITE then normally ends with 487."""
        self._endpoint._cancel(self.transaction)

    def _on_response(self, response: Response) -> None:
        if response.status < 200:
            self.provisional.append(response)
            if self.on_provisional is not None:
                try:
                    self.on_provisional(response)
                except Exception:
                    log.exception("on_provisional callback failed for %s", self.request.method)
        elif not self._final.done():
            self._final.set_result(response)
        else:
            log.info("%s: further %d (another fork) ignored", self.transaction.id, response.status)


class IncomingRequest:
    """A new request from the network, answered through its server transaction."""

    def __init__(self, endpoint: SipEndpoint, event: RequestReceived) -> None:
        self.request = event.request
        self.source = event.source
        self.transport = event.transport
        self.transaction: ServerTransaction = event.transaction
        self.cancelled = asyncio.Event()
        self.final_response: Response | None = None
        self._endpoint = endpoint
        self._to_tag: str | None = None
        self._ack: asyncio.Future[Request | None] | None = None
        self._waiting_ack = False

    def __repr__(self) -> str:
        return f"<IncomingRequest {self.request.method} {self.request.uri} from {self.source}>"

    @property
    def to_tag(self) -> str:
        """The To tag of our responses: the request's own tag (in-dialog) or one generated once,
        so every response to this request (180, 200 ...) shares it (8.2.6.2)."""
        if self._to_tag is None:
            self._to_tag = self.request.to.tag or new_tag()
        return self._to_tag

    @property
    def answered(self) -> bool:
        """True once a final response was sent."""
        return self.final_response is not None

    def respond(
        self,
        status: int,
        reason: str | None = None,
        *,
        to_tag: str | None = None,
        headers: list[tuple[str, str]] | None = None,
        body: bytes = b"",
        content_type: str | None = None,
    ) -> Response:
        """Build a response (``make_response``; the To tag defaults to :attr:`to_tag` for anything
        but 100) and send it. Raises InvalidStateError when the transaction cannot send it."""
        if to_tag is None and status > 100 and self.request.to.tag is None:
            to_tag = self.to_tag
        response = make_response(
            self.request, status, reason, to_tag=to_tag, headers=headers, body=body, content_type=content_type
        )
        self.send(response)
        return response

    def send(self, response: Response) -> None:
        """Send a built response as is (a proxy forwarding a downstream response)."""
        if (
            response.status >= 200
            and self.request.method == "INVITE"
            and response.status < 300
            and self._ack is None
        ):
            self._ack = asyncio.get_running_loop().create_future()
        self._endpoint._respond(self.transaction, response)
        if response.status >= 200:
            self.final_response = response

    async def wait_ack(self, timeout: float = 32.0) -> Request | None:
        """After a 2xx to INVITE: the ACK, or None when it did not come within ``timeout`` (or the
        transaction gave up after 64*T1). An ACK that arrived before the call is returned too."""
        if self._ack is None:
            raise InvalidStateError("wait_ack() needs a 2xx response to an INVITE first")
        self._waiting_ack = True
        try:
            return await asyncio.wait_for(asyncio.shield(self._ack), timeout)
        except TimeoutError:
            return None
        finally:
            self._waiting_ack = False

    def _ack_arrived(self, ack: Request | None) -> bool:
        """Record the ACK (None: timed out); True when a wait_ack() caller takes it."""
        if self._ack is not None and not self._ack.done():
            self._ack.set_result(ack)
        return self._waiting_ack


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, endpoint: SipEndpoint) -> None:
        self.endpoint = endpoint

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.endpoint._on_datagram(data, (addr[0], addr[1]))

    def error_received(self, exc: Exception) -> None:
        log.debug("%s: UDP error: %s", self.endpoint.name, exc)


class _TcpConnection(asyncio.Protocol):
    """One TCP connection, incoming or outgoing, framed with StreamFramer (RFC 3261 18.3)."""

    def __init__(self, endpoint: SipEndpoint, remote: Address | None = None) -> None:
        self.endpoint = endpoint
        self.remote = remote
        self.framer = StreamFramer()
        self.transport: asyncio.Transport | None = None
        self.closing = False
        self._loop = asyncio.get_running_loop()
        self.closed: asyncio.Future[None] = self._loop.create_future()
        # The stream bytes the framer holds (the start of the message not yet complete): what a
        # framing error is answered from, since its request line may have come in an earlier read.
        self._unframed = bytearray()
        # Loop times for the idle / partial-message timeouts: the last complete message (either
        # direction) or keep-alive, and the first byte of the message still incomplete (None: none).
        self._last_activity = self._loop.time()
        self._partial_since: float | None = None
        # One timer per connection, armed at the earliest deadline and re-checked when it fires, so
        # that activity only updates the times above (no re-arming on every read).
        self._watchdog: asyncio.TimerHandle | None = None
        self._watchdog_when = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not an asyncio.Transport
        if self.remote is None:
            peer = transport.get_extra_info("peername")
            self.remote = (peer[0], peer[1])
            if not self.endpoint._admit(self.remote):
                self.closing = True
                transport.close()
                return
        self.endpoint._connections[self.remote] = self
        log.debug("%s: TCP connection with %s:%s", self.endpoint.name, *self.remote)
        self._last_activity = self._loop.time()
        self._arm(self._last_activity + self.endpoint.idle_timeout)

    def data_received(self, data: bytes) -> None:
        assert self.remote is not None
        if self.closing:
            return  # closed by a timeout or the connection limit; the transport may still deliver
        self._unframed += data
        try:
            messages = self.framer.feed(data)
        except SipParseError as exc:
            self.endpoint._malformed(self._pending() or data, exc, self.remote, "tcp")
            self.close()
            return
        except Exception:
            log.exception("%s: TCP framing failed, closing %s:%s", self.endpoint.name, *self.remote)
            self.close()
            return
        del self._unframed[: len(self._unframed) - self.framer.buffered]
        now = self._loop.time()
        if messages or not self.framer.buffered:
            # A complete message, or nothing but CRLFs: a keep-alive (RFC 5626 4.4.1) is activity.
            self._last_activity = now
        if not self.framer.buffered:
            self._partial_since = None
        elif messages or self._partial_since is None:
            self._partial_since = now  # a new message has begun
            self._arm(now + self.endpoint.partial_timeout)
        for message in messages:
            self.endpoint._on_message(message, self.remote, "tcp")

    def _pending(self) -> bytes:
        """The bytes the framer holds: the start of the message it has not completed (the one a
        framing error is about)."""
        keep = self.framer.buffered
        return bytes(self._unframed[len(self._unframed) - keep :]) if keep else b""

    def eof_received(self) -> bool | None:
        """The peer closed its sending side: a message it left incomplete is a framing error
        (its body is shorter than its Content-Length, or its header section never ended), answered
        over the half-open connection like any other. Then the connection is closed."""
        pending = self._pending()
        if pending and self.remote is not None and not self.closing:
            head = pending.lstrip(b"\r\n")
            if b"\r\n\r\n" in head or b"\n\n" in head:
                reason = "Content-Length larger than body (connection closed before the end of the body)"
            else:
                reason = "Header section is not terminated by an empty line (connection closed)"
            self.endpoint._malformed(pending, SipParseError(reason), self.remote, "tcp")
        self.closing = True
        return None  # the transport closes itself (after writing what is queued)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self._disarm()
        if not self.closed.done():
            self.closed.set_result(None)
        if self.remote is not None and self.endpoint._connections.get(self.remote) is self:
            del self.endpoint._connections[self.remote]

    def write(self, data: bytes) -> None:
        """Send one whole message (what the endpoint writes is always complete): activity."""
        assert self.transport is not None
        self.transport.write(data)
        self._last_activity = self._loop.time()

    def close(self) -> None:
        self.closing = True
        self._disarm()
        if self.transport is not None:
            self.transport.close()

    # -- idle and partial-message timeouts ----------------------------------------------------
    def _arm(self, when: float) -> None:
        """Make sure the watchdog fires no later than ``when``."""
        if self.closing or (self._watchdog is not None and self._watchdog_when <= when):
            return
        self._disarm()
        self._watchdog_when = when
        self._watchdog = self._loop.call_at(when, self._on_watchdog)

    def _disarm(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None

    def _on_watchdog(self) -> None:
        self._watchdog = None
        if self.closing or self.remote is None:
            return
        endpoint = self.endpoint
        now = self._loop.time()
        deadline = self._last_activity + endpoint.idle_timeout
        begun = self._partial_since
        if begun is not None and now >= begun + endpoint.partial_timeout:
            log.warning(
                "%s: TCP %s:%s: message still incomplete %.1f s after it began (%d bytes received), closing",
                endpoint.name,
                self.remote[0],
                self.remote[1],
                now - begun,
                self.framer.buffered,
            )
            self.close()
        elif now >= deadline:
            log.info(
                "%s: TCP %s:%s idle for %.1f s, closing",
                endpoint.name,
                *self.remote,
                now - self._last_activity,
            )
            self.close()
        else:
            self._arm(deadline if begun is None else min(deadline, begun + endpoint.partial_timeout))


#: Receive buffer asked for on the UDP socket. The kernel's default (about 208 KiB) overflows within
#: a fraction of a second when the event loop lags under a burst of calls; the kernel caps the value
#: at net.core.rmem_max.
UDP_RECEIVE_BUFFER = 4 * 1024 * 1024


def _grow_receive_buffer(sock: Any, name: str) -> None:
    if sock is None:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_RECEIVE_BUFFER)
        got = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    except OSError as exc:
        log.warning("%s: cannot enlarge the UDP receive buffer: %s", name, exc)
        return
    log.debug("%s: UDP receive buffer %d bytes", name, got)


class SipEndpoint:
    """A SIP endpoint on one address: UDP and TCP on the same port, one TransactionLayer.

    ``timers`` shrinks T1 and friends for tests; ``advertised_host`` is the host written in Via and
    Contact (defaults to ``host``, or 127.0.0.1 when binding a wildcard address). TCP limits:
    ``idle_timeout`` closes a connection that carried no complete message (received or sent) nor a
    CRLF keep-alive for that many seconds; ``partial_timeout`` closes one whose current message is
    still incomplete that long after its first byte (with a warning, unanswered);
    ``max_connections`` caps the simultaneous connections: an incoming one beyond it is accepted
    and closed at once, with a warning.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 5060,
        udp: bool = True,
        tcp: bool = True,
        name: str = "sip",
        timers: TimerConfig | None = None,
        advertised_host: str | None = None,
        idle_timeout: float = IDLE_TIMEOUT,
        partial_timeout: float = PARTIAL_TIMEOUT,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        if not (udp or tcp):
            raise ValueError("SipEndpoint needs UDP, TCP or both")
        for what, value in (("idle_timeout", idle_timeout), ("partial_timeout", partial_timeout)):
            if not value > 0:
                raise ValueError(f"SipEndpoint {what} must be > 0, not {value!r}")
        if max_connections < 1:
            raise ValueError(f"SipEndpoint max_connections must be >= 1, not {max_connections!r}")
        self.idle_timeout = float(idle_timeout)
        self.partial_timeout = float(partial_timeout)
        self.max_connections = max_connections
        self.host = host
        self.port = port
        self.name = name
        self.udp = udp
        self.tcp = tcp
        self.advertised_host = advertised_host or ("127.0.0.1" if host in ("0.0.0.0", "", "::") else host)
        self.layer = TransactionLayer(timers or DEFAULT_TIMERS)
        self.request_handler: RequestHandler | None = None
        self.ack_handler: AckHandler | None = None
        #: Responses that match no client transaction (e.g. a 2xx retransmitted to a hot standby
        #: that took over from the process that sent the INVITE); logged and dropped when None.
        self.stray_response_handler: Callable[[Response, Address, str], None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._udp: asyncio.DatagramTransport | None = None
        self._server: asyncio.Server | None = None
        self._connections: dict[Address, _TcpConnection] = {}
        self._pending_tcp: dict[Address, list[tuple[bytes, Send | None]]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_when: float | None = None
        self._incoming: dict[ServerTransaction, IncomingRequest] = {}
        self._clients: dict[ClientTransaction, ClientRequest] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._flushing = False
        self._closed = False
        self._refused = 0  # incoming TCP connections refused since the last warning about it
        self._refused_warned: float | None = None

    def __repr__(self) -> str:
        return f"<SipEndpoint {self.name} {self.host}:{self.port}>"

    # -- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        """Bind UDP and TCP on the same port (port 0: one free for both)."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        attempts = 20 if self.port == 0 and self.udp and self.tcp else 1
        for attempt in range(attempts):
            udp: asyncio.DatagramTransport | None = None
            try:
                port = self.port
                if self.udp:
                    udp, _ = await loop.create_datagram_endpoint(
                        lambda: _UdpProtocol(self), local_addr=(self.host, port)
                    )
                    port = udp.get_extra_info("sockname")[1]
                    _grow_receive_buffer(udp.get_extra_info("socket"), self.name)
                if self.tcp:
                    self._server = await loop.create_server(
                        lambda: _TcpConnection(self), self.host, port, reuse_address=True
                    )
                    port = self._server.sockets[0].getsockname()[1]
            except OSError:
                if udp is not None:
                    udp.close()
                if attempt == attempts - 1:
                    raise
                continue  # the UDP port picked by the kernel was taken for TCP: try another
            except asyncio.CancelledError:
                if udp is not None:  # cancelled between the two binds: leave nothing bound
                    udp.close()
                raise
            self._udp = udp
            self.port = port
            break
        log.info(
            "%s: listening on %s:%s (%s)",
            self.name,
            self.host,
            self.port,
            "+".join(t for t, on in (("udp", self.udp), ("tcp", self.tcp)) if on),
        )

    async def close(self) -> None:
        """Stop listening, close connections, cancel handler tasks and pending requests."""
        if self._closed:
            return
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._udp is not None:
            self._udp.close()
        if self._server is not None:
            self._server.close()
        connections = list(self._connections.values())
        for conn in connections:
            conn.close()
        if connections:
            await asyncio.wait([c.closed for c in connections], timeout=1.0)
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for client in self._clients.values():
            if not client._final.done():
                client._final.set_result(make_response(client.request, 503, "Endpoint Closed"))
        if self._server is not None:
            await self._server.wait_closed()
        log.info("%s: closed", self.name)

    # -- TU API -------------------------------------------------------------------------------
    def _now(self) -> float:
        assert self._loop is not None, "SipEndpoint.start() was not called"
        return self._loop.time()

    def start_request(
        self,
        request: Request,
        dest: Address,
        transport: str = "udp",
        *,
        on_provisional: Callable[[Response], None] | None = None,
    ) -> ClientRequest:
        """Send ``request`` (a copy, with this endpoint's Via on top: fresh branch, ``;rport``, and
        Max-Forwards 70 if missing) in a new client transaction."""
        transport = transport.lower()
        request = request.copy()
        prepend_via(request, self.advertised_host, self.port, transport)
        if "Max-Forwards" not in request.headers:
            request.headers.add("Max-Forwards", "70")
        txn, sends = self.layer.send_request(request, dest, transport, self._now())
        client = ClientRequest(self, request, txn, on_provisional)
        self._clients[txn] = client
        self._flush(sends)
        return client

    async def request(
        self,
        request: Request,
        dest: Address,
        transport: str = "udp",
        *,
        on_provisional: Callable[[Response], None] | None = None,
    ) -> Response:
        """``start_request(...).final()``."""
        return await self.start_request(request, dest, transport, on_provisional=on_provisional).final()

    def send_ack(self, ack: Request, dest: Address, transport: str = "udp") -> None:
        """Send the ACK of a 2xx (no transaction; a copy with our Via prepended). The endpoint
        re-sends it whenever that 2xx is retransmitted (13.2.2.4)."""
        transport = transport.lower()
        ack = ack.copy()
        prepend_via(ack, self.advertised_host, self.port, transport)
        if "Max-Forwards" not in ack.headers:
            ack.headers.add("Max-Forwards", "70")
        self._flush(self.layer.send_ack(ack, dest, transport, self._now()))

    def send_stateless(self, message: Request | Response, dest: Address, transport: str = "udp") -> None:
        """Send a message as is, outside any transaction."""
        self._flush([Send(message, dest, transport.lower())])

    def contact_uri(self, user: str | None = None, transport: str = "udp") -> SipUri:
        """A Contact URI for this endpoint (``;transport=tcp`` unless UDP)."""
        params: dict[str, str | None] = {}
        if transport.lower() != "udp":
            params["transport"] = transport.lower()
        return SipUri("sip", user, None, self.advertised_host, self.port, params, {})

    # -- called by ClientRequest / IncomingRequest ---------------------------------------------
    def _cancel(self, transaction: ClientTransaction) -> None:
        self._flush(self.layer.cancel(transaction, self._now()))

    def _respond(self, transaction: ServerTransaction, response: Response) -> None:
        self._flush(self.layer.respond(transaction, response, self._now()))

    # -- input ----------------------------------------------------------------------------------
    def _admit(self, remote: Address) -> bool:
        """Whether a new incoming TCP connection may stay (``max_connections``). Refusals are
        warned about at most once a second, with their count, so a flood does not flood the log."""
        if self._closed:
            return False
        if len(self._connections) < self.max_connections:
            return True
        self._refused += 1
        now = self._now()
        if self._refused_warned is None or now - self._refused_warned >= 1.0:
            log.warning(
                "%s: TCP connection from %s:%s closed at once: %d connections open (max_connections %d)%s",
                self.name,
                remote[0],
                remote[1],
                len(self._connections),
                self.max_connections,
                f"; {self._refused} refused since the last warning" if self._refused > 1 else "",
            )
            self._refused_warned = now
            self._refused = 0
        return False

    def _on_datagram(self, data: bytes, source: Address) -> None:
        if not data.strip(b"\r\n \t\0"):
            return  # keep-alive (RFC 5626 4.4.1: CRLF) or padding
        try:
            message = parse_message(data)
        except SipParseError as exc:
            self._malformed(data, exc, source, "udp")
            return
        except Exception:
            log.exception("%s: parser failed on a datagram from %s:%s", self.name, *source)
            return
        self._on_message(message, source, "udp")

    def _malformed(self, data: bytes, exc: SipParseError, source: Address, transport: str) -> None:
        reply = error_response_for(data, exc.status, exc.reason)
        log.warning(
            "%s: malformed message from %s:%s/%s: %s (%s)",
            self.name,
            source[0],
            source[1],
            transport,
            exc,
            "answered" if reply else "dropped",
        )
        if reply is not None:
            self._send_bytes(reply, source, transport, None)

    def _on_message(self, message: Request | Response, source: Address, transport: str) -> None:
        if self._closed:
            return
        try:
            sends = self.layer.receive(message, source, transport, self._now())
        except SipParseError as exc:
            # Parsed, but a header the layer needs is broken (CSeq, Via, From ...).
            self._reject(message, exc, source, transport)
            return
        except Exception:
            log.exception("%s: failed to process a message from %s:%s", self.name, *source)
            return
        try:
            self._flush(sends)
        except Exception:
            log.exception("%s: failed to send after a message from %s:%s", self.name, *source)

    def _reject(
        self, message: Request | Response, exc: SipParseError, source: Address, transport: str
    ) -> None:
        log.warning("%s: bad message from %s:%s/%s: %s", self.name, source[0], source[1], transport, exc)
        if not isinstance(message, Request) or message.method == "ACK":
            return
        try:
            data = message.to_bytes()
        except Exception:
            return
        reply = error_response_for(data, exc.status, exc.reason)
        if reply is not None:
            self._send_bytes(reply, source, transport, None)

    # -- output ---------------------------------------------------------------------------------
    def _flush(self, sends: list[Send]) -> None:
        """Send, deliver the layer's events, re-arm the timer (re-entrant: nested calls queue)."""
        queue = list(sends)
        for send in queue:  # transport errors append to the queue while iterating
            try:
                data = send.message.to_bytes()
            except Exception:
                log.exception("%s: cannot serialise a %s", self.name, type(send.message).__name__)
                continue
            if not self._send_bytes(data, send.dest, send.transport, send):
                queue.extend(self.layer.transport_error(send.transaction, self._now()))
        if self._flushing:
            return
        self._flushing = True
        try:
            self._dispatch_events()
        finally:
            self._flushing = False
        self._rearm()

    def _send_bytes(self, data: bytes, dest: Address, transport: str, send: Send | None) -> bool:
        """Send now (UDP) or queue on a TCP connection; False on an immediate failure."""
        if self._closed:
            return True
        if not is_reliable(transport):
            if self._udp is None:
                log.warning("%s: no UDP socket to send to %s:%s", self.name, *dest)
                return False
            try:
                self._udp.sendto(data, dest)
            except OSError as exc:
                log.warning("%s: UDP send to %s:%s failed: %s", self.name, dest[0], dest[1], exc)
                return False
            return True
        conn = self._connections.get(dest)
        if conn is not None and not conn.closing:
            conn.write(data)
            return True
        pending = self._pending_tcp.get(dest)
        if pending is not None:
            pending.append((data, send))  # a connect is under way
            return True
        self._pending_tcp[dest] = [(data, send)]
        assert self._loop is not None
        task = self._loop.create_task(self._connect(dest))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def _connect(self, dest: Address) -> None:
        assert self._loop is not None
        try:
            await asyncio.wait_for(
                self._loop.create_connection(lambda: _TcpConnection(self, dest), dest[0], dest[1]),
                _CONNECT_TIMEOUT,
            )
        except (OSError, TimeoutError) as exc:
            pending = self._pending_tcp.pop(dest, [])
            log.warning("%s: TCP connect to %s:%s failed: %s", self.name, dest[0], dest[1], exc)
            now = self._now()
            sends: list[Send] = []
            failed: set[int] = set()
            for _, send in pending:
                txn = send.transaction if send is not None else None
                if txn is not None and id(txn) not in failed:
                    failed.add(id(txn))
                    sends += self.layer.transport_error(txn, now)
            self._flush(sends)
            return
        conn = self._connections.get(dest)
        for data, _ in self._pending_tcp.pop(dest, []):
            if conn is not None:
                conn.write(data)

    def _rearm(self) -> None:
        """Keep exactly one loop timer, at the layer's next deadline."""
        if self._closed or self._loop is None:
            return
        when = self.layer.next_timer()
        if when == self._timer_when and (self._timer is not None or when is None):
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_when = when
        if when is not None:
            self._timer = self._loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        when = self._timer_when
        self._timer = None
        self._timer_when = None
        # call_at may run up to one clock tick early: never pass a "now" before the deadline.
        now = max(self._now(), when or 0.0)
        try:
            sends = self.layer.handle_timers(now)
        except Exception:
            log.exception("%s: timer processing failed", self.name)
            sends = []
        self._flush(sends)

    # -- events for the TU -------------------------------------------------------------------------
    def _dispatch_events(self) -> None:
        while True:
            events = self.layer.drain_events()
            if not events:
                return
            for event in events:
                try:
                    self._dispatch(event)
                except Exception:
                    log.exception("%s: failed to deliver %s", self.name, type(event).__name__)

    def _dispatch(self, event: Any) -> None:
        if isinstance(event, RequestReceived):
            incoming = IncomingRequest(self, event)
            self._incoming[event.transaction] = incoming
            if self.request_handler is None:
                incoming.respond(501, "Not Implemented")
                return
            self._spawn(self._run_handler(incoming))
        elif isinstance(event, ResponseReceived):
            client = self._clients.get(event.transaction)
            if client is not None:
                client._on_response(event.response)
        elif isinstance(event, CancelReceived):
            cancelled = self._incoming.get(event.transaction)
            if cancelled is not None:
                cancelled.cancelled.set()
        elif isinstance(event, AckReceived):
            self._on_ack(event)
        elif isinstance(event, AckTimeout):
            log.warning("%s: no ACK for %d to %s", self.name, event.response.status, event.transaction.id)
            unacked = self._incoming.get(event.transaction)
            if unacked is not None:
                unacked._ack_arrived(None)
        elif isinstance(event, TransactionTerminated):
            txn = event.transaction
            self._clients.pop(txn, None)  # type: ignore[call-overload]
            self._incoming.pop(txn, None)  # type: ignore[call-overload]
        elif isinstance(event, StrayResponse):
            log.debug("%s: stray %d response from %s:%s", self.name, event.response.status, *event.source)
            if self.stray_response_handler is not None:
                self.stray_response_handler(event.response, event.source, event.transport)

    def _on_ack(self, event: AckReceived) -> None:
        incoming = self._incoming.get(event.transaction) if event.transaction is not None else None
        if incoming is not None and incoming._ack_arrived(event.ack):
            return  # taken by wait_ack()
        if self.ack_handler is not None:
            self.ack_handler(event.ack, event.source, event.transport)
        elif incoming is None:
            log.debug("%s: ACK for %s without a handler", self.name, event.ack.call_id)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        assert self._loop is not None
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_handler(self, incoming: IncomingRequest) -> None:
        handler = self.request_handler
        assert handler is not None
        try:
            result = handler(incoming)
            if inspect.isawaitable(result):
                await result
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception(
                "%s: handler failed for %s from %s:%s", self.name, incoming.request.method, *incoming.source
            )
            txn = incoming.transaction
            if not incoming.answered and txn.state is not TransactionState.TERMINATED:
                try:
                    incoming.respond(500, "Server Internal Error")
                except InvalidStateError:
                    pass

    # -- introspection for tests and health --------------------------------------------------------
    @property
    def connections(self) -> list[Address]:
        """Remote addresses of the open TCP connections."""
        return list(self._connections)

    def pending_server_transactions(self) -> list[InviteServerTransaction | ServerTransaction]:
        """Server transactions not yet terminated."""
        return list(self.layer.servers.values())

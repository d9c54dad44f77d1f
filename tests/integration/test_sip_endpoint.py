"""SipEndpoint on real sockets (127.0.0.1, port 0): two endpoints call each other over UDP and TCP."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from services.sip.aio import IncomingRequest, SipEndpoint
from services.sip.dialog import Dialog
from services.sip.errors import InvalidStateError
from services.sip.message import Request, Response, new_call_id, new_tag, parse_message
from services.sip.timers import TimerConfig

FAST = TimerConfig(t1=0.02, t2=0.16, t4=0.2, timer_d=0.5)
TRANSPORTS = ["udp", "tcp"]


@pytest.fixture
async def pair() -> AsyncIterator[tuple[SipEndpoint, SipEndpoint]]:
    alice = SipEndpoint(host="127.0.0.1", port=0, name="alice", timers=FAST)
    bob = SipEndpoint(host="127.0.0.1", port=0, name="bob", timers=FAST)
    await alice.start()
    await bob.start()
    try:
        yield alice, bob
    finally:
        await alice.close()
        await bob.close()


def new_request(method: str, src: SipEndpoint, dst: SipEndpoint, transport: str = "udp") -> Request:
    uri = f"sip:bob@127.0.0.1:{dst.port}" + (";transport=tcp" if transport == "tcp" else "")
    return Request(
        method,
        uri,
        [
            ("From", f"<sip:alice@127.0.0.1>;tag={new_tag()}"),
            ("To", "<sip:bob@127.0.0.1>"),
            ("Call-ID", new_call_id("127.0.0.1")),
            ("CSeq", f"1 {method}"),
            ("Contact", f"<{src.contact_uri('alice', transport)}>"),
        ],
    )


def addr(endpoint: SipEndpoint) -> tuple[str, int]:
    return ("127.0.0.1", endpoint.port)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_invite_ringing_answer_ack_bye(pair: tuple[SipEndpoint, SipEndpoint], transport: str) -> None:
    alice, bob = pair
    acks: list[Request | None] = []
    bye_seen = asyncio.Event()
    dialogs: dict[tuple[str, str, str], Dialog] = {}

    async def bob_handler(incoming: IncomingRequest) -> None:
        request = incoming.request
        if request.method == "INVITE":
            assert incoming.transport == transport
            incoming.respond(180)
            await asyncio.sleep(0.01)
            contact = bob.contact_uri("bob", transport)
            dialog = Dialog.from_uas(request, incoming.to_tag, local_target=contact)
            dialogs[dialog.id] = dialog
            incoming.respond(
                200, headers=[("Contact", f"<{contact}>")], body=b"v=0\r\n", content_type="application/sdp"
            )
            acks.append(await incoming.wait_ack(timeout=2.0))
        elif request.method == "BYE":
            dialog = dialogs[(request.call_id, request.to.tag or "", request.from_.tag or "")]
            dialog.receive_request(request)
            incoming.respond(200)
            bye_seen.set()

    bob.request_handler = bob_handler
    provisional: list[int] = []
    invite = new_request("INVITE", alice, bob, transport)
    client = alice.start_request(
        invite, addr(bob), transport, on_provisional=lambda r: provisional.append(r.status)
    )
    final = await asyncio.wait_for(client.final(), 5)
    assert final.status == 200
    assert final.body == b"v=0\r\n"
    assert provisional == [100, 180]
    assert client.request.top_via.params["rport"] is None  # ;rport, empty (RFC 3581)
    assert final.top_via.received == "127.0.0.1"
    if transport == "udp":
        assert final.top_via.rport == alice.port  # over TCP: the connection's source port

    dialog = Dialog.from_uac(client.request, final)
    host, port, hop_transport = dialog.next_hop()
    assert (host, port, hop_transport) == ("127.0.0.1", bob.port, transport)
    alice.send_ack(dialog.create_ack(client.request), (host, port), transport)
    for _ in range(100):
        if acks:
            break
        await asyncio.sleep(0.01)
    assert acks and acks[0] is not None and acks[0].method == "ACK"
    assert acks[0].cseq.seq == invite.cseq.seq

    bye = dialog.create_request("BYE")
    response = await asyncio.wait_for(alice.request(bye, (host, port), transport), 5)
    assert response.status == 200
    await asyncio.wait_for(bye_seen.wait(), 2)
    if transport == "tcp":
        assert addr(bob) in alice.connections  # the connection is reused for the whole call


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_cancel_gets_487(pair: tuple[SipEndpoint, SipEndpoint], transport: str) -> None:
    alice, bob = pair

    async def bob_handler(incoming: IncomingRequest) -> None:
        incoming.respond(180)
        await asyncio.wait_for(incoming.cancelled.wait(), 5)
        incoming.respond(487)

    bob.request_handler = bob_handler
    client = alice.start_request(
        new_request("INVITE", alice, bob, transport),
        addr(bob),
        transport,
        on_provisional=lambda r: client.cancel() if r.status == 180 else None,
    )
    final = await asyncio.wait_for(client.final(), 5)
    assert final.status == 487


async def test_cancel_without_transaction_gets_481(pair: tuple[SipEndpoint, SipEndpoint]) -> None:
    alice, bob = pair
    cancel = new_request("CANCEL", alice, bob)
    response = await asyncio.wait_for(alice.request(cancel, addr(bob)), 5)
    assert response.status == 481


@pytest.mark.parametrize("method", ["INVITE", "OPTIONS"])
async def test_timeout_is_a_synthetic_408(pair: tuple[SipEndpoint, SipEndpoint], method: str) -> None:
    alice, _ = pair
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # bound, never answers
    silent.bind(("127.0.0.1", 0))
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        request = new_request(method, alice, alice)
        response = await asyncio.wait_for(alice.request(request, silent.getsockname()), 5)
        assert response.status == 408
        assert loop.time() - started >= 64 * FAST.t1 * 0.9
        # Timer A/E retransmitted the request meanwhile.
        silent.setblocking(False)
        copies = 0
        while True:
            try:
                silent.recv(65535)
            except BlockingIOError:
                break
            copies += 1
        assert copies >= 4
    finally:
        silent.close()


async def test_tcp_connection_refused_is_a_synthetic_503(pair: tuple[SipEndpoint, SipEndpoint]) -> None:
    alice, bob = pair
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    response = await asyncio.wait_for(
        alice.request(new_request("OPTIONS", alice, bob), ("127.0.0.1", port), "tcp"), 5
    )
    assert response.status == 503


class RawUdp(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.received: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.received.put_nowait(data)


async def test_malformed_datagram_gets_400_and_endpoint_keeps_working(
    pair: tuple[SipEndpoint, SipEndpoint], caplog: pytest.LogCaptureFixture
) -> None:
    alice, bob = pair
    bob.request_handler = lambda incoming: incoming.respond(200) and None
    loop = asyncio.get_running_loop()
    transport, raw = await loop.create_datagram_endpoint(RawUdp, local_addr=("127.0.0.1", 0))
    try:
        broken = (
            b"OPTIONS sip:bob@127.0.0.1 SIP/2.0\r\n"
            b"Via: SIP/2.0/UDP 127.0.0.1:9;branch=z9hG4bKbroken\r\n"
            b"From: <sip:a@x>;tag=1\r\nTo: <sip:b@y>\r\nCall-ID: c1\r\n"
            b"CSeq: one OPTIONS\r\nContent-Length: 0\r\n\r\n"
        )
        transport.sendto(broken, addr(bob))
        reply = (await asyncio.wait_for(raw.received.get(), 2)).decode()
        status_line, *header_lines = reply.split("\r\n")
        assert status_line.startswith("SIP/2.0 400 ") and "CSeq" in status_line
        # The identifying headers are echoed as they came, so the client can match the answer.
        assert "Call-ID: c1" in header_lines
        assert "Via: SIP/2.0/UDP 127.0.0.1:9;branch=z9hG4bKbroken" in header_lines
        assert "CSeq: one OPTIONS" in header_lines
        # Garbage without a request line: dropped (no answer), warned about.
        transport.sendto(b"\x00\xffnot sip at all\r\n\r\n", addr(bob))
        transport.sendto(b"SIP/2.0 200 OK\r\nbroken\r\n\r\n", addr(bob))
        await asyncio.sleep(0.1)
        assert raw.received.empty()
        assert any("malformed" in r.getMessage() for r in caplog.records)
    finally:
        transport.close()
    response = await asyncio.wait_for(alice.request(new_request("OPTIONS", alice, bob), addr(bob)), 5)
    assert response.status == 200


async def test_tcp_framing_error_is_answered_and_closed(pair: tuple[SipEndpoint, SipEndpoint]) -> None:
    _, bob = pair
    reader, writer = await asyncio.open_connection("127.0.0.1", bob.port)
    try:
        writer.write(
            b"OPTIONS sip:bob@127.0.0.1 SIP/2.0\r\n"
            b"Via: SIP/2.0/TCP 127.0.0.1:9;branch=z9hG4bKnolength\r\n"
            b"From: <sip:a@x>;tag=1\r\nTo: <sip:b@y>\r\nCall-ID: c2\r\nCSeq: 1 OPTIONS\r\n\r\n"
        )
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 2)  # read() to EOF: the endpoint closes
        reply = parse_message(data)
        assert isinstance(reply, Response) and reply.status == 400
        assert "Content-Length" in reply.reason
    finally:
        writer.close()


async def test_tcp_oversize_header_in_pieces_is_answered_413(pair: tuple[SipEndpoint, SipEndpoint]) -> None:
    """The request line came in an earlier read than the byte that broke the size limit: the 413
    still echoes the request's identifiers (it is built from the start of the message)."""
    _, bob = pair
    reader, writer = await asyncio.open_connection("127.0.0.1", bob.port)
    try:
        head = (
            b"OPTIONS sip:bob@127.0.0.1 SIP/2.0\r\n"
            b"Via: SIP/2.0/TCP 127.0.0.1:9;branch=z9hG4bKhuge\r\n"
            b"From: <sip:a@x>;tag=1\r\nTo: <sip:b@y>\r\nCall-ID: c-huge\r\nCSeq: 1 OPTIONS\r\nX-Junk: "
        )
        writer.write(head)
        await writer.drain()
        for _ in range(13):
            await asyncio.sleep(0.005)
            writer.write(b"x" * 5000)  # 65000 bytes of one header, still below the limit
            await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"x" * 1000)  # over 65535: the framer gives up
        data = await asyncio.wait_for(reader.read(), 2)  # read() to EOF: the endpoint closes
        reply = parse_message(data)
        assert isinstance(reply, Response) and reply.status == 413, data[:200]
        assert reply.call_id == "c-huge" and reply.branch == "z9hG4bKhuge"
    finally:
        writer.close()


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        (b"Content-Length: 500\r\n\r\nv=0\r\n", "Content-Length larger than body"),
        (b"Content-Length: 0\r\nX-Never-Ending: ", "Header section is not terminated"),
    ],
)
async def test_tcp_message_cut_short_by_eof_is_answered(
    pair: tuple[SipEndpoint, SipEndpoint], caplog: pytest.LogCaptureFixture, message: bytes, reason: str
) -> None:
    """A peer that half-closes the connection in the middle of a message gets the 400 over the
    half-open connection, a warning is logged, and the endpoint closes its side."""
    _, bob = pair
    reader, writer = await asyncio.open_connection("127.0.0.1", bob.port)
    try:
        writer.write(
            b"OPTIONS sip:bob@127.0.0.1 SIP/2.0\r\n"
            b"Via: SIP/2.0/TCP 127.0.0.1:9;branch=z9hG4bKshort\r\n"
            b"From: <sip:a@x>;tag=1\r\nTo: <sip:b@y>\r\nCall-ID: c-short\r\nCSeq: 1 OPTIONS\r\n" + message
        )
        await writer.drain()
        writer.write_eof()
        data = await asyncio.wait_for(reader.read(), 2)
        reply = parse_message(data)
        assert isinstance(reply, Response) and reply.status == 400 and reason in reply.reason, data[:200]
        assert reply.call_id == "c-short"
        assert any(reason in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)
    finally:
        writer.close()
    await asyncio.sleep(0.05)
    assert bob.connections == []


# -- TCP connection limits: idle and partial-message timeouts, connection cap ----------------------
@asynccontextmanager
async def limited_endpoint(**limits: Any) -> AsyncIterator[SipEndpoint]:
    """One endpoint answering 200, with small TCP limits."""
    endpoint = SipEndpoint(host="127.0.0.1", port=0, name="limited", timers=FAST, **limits)

    def answer(incoming: IncomingRequest) -> None:
        incoming.respond(200)

    endpoint.request_handler = answer
    await endpoint.start()
    try:
        yield endpoint
    finally:
        await endpoint.close()


def raw_options(branch: str) -> bytes:
    return (
        f"OPTIONS sip:bob@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.1:9;branch=z9hG4bK{branch}\r\n"
        f"From: <sip:a@x>;tag=1\r\nTo: <sip:b@y>\r\nCall-ID: {branch}\r\nCSeq: 1 OPTIONS\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()


async def read_response(reader: asyncio.StreamReader) -> Response:
    data = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
    reply = parse_message(data)
    assert isinstance(reply, Response)
    return reply


async def until_closed(reader: asyncio.StreamReader, timeout: float = 3.0) -> tuple[bytes, float]:
    """Read to EOF (the endpoint closed the connection): what came, and after how long."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    data = await asyncio.wait_for(reader.read(), timeout)
    return data, loop.time() - t0


async def test_tcp_idle_connection_is_closed() -> None:
    async with limited_endpoint(idle_timeout=0.3, partial_timeout=5.0) as bob:
        reader, writer = await asyncio.open_connection("127.0.0.1", bob.port)
        try:
            data, elapsed = await until_closed(reader)
            assert data == b"" and 0.25 <= elapsed < 2.0, (data, elapsed)
        finally:
            writer.close()
        await asyncio.sleep(0.05)
        assert bob.connections == []


async def test_tcp_messages_and_crlf_keepalives_keep_a_connection_open() -> None:
    """RFC 5626 CRLF keep-alives and complete messages are activity; once they stop, the idle
    timeout closes the connection."""
    async with limited_endpoint(idle_timeout=0.3, partial_timeout=5.0) as bob:
        reader, writer = await asyncio.open_connection("127.0.0.1", bob.port)
        try:
            for i in range(8):  # 0.8 s, far beyond the idle timeout
                await asyncio.sleep(0.1)
                writer.write(b"\r\n\r\n" if i % 2 else raw_options(f"ka{i}"))
                await writer.drain()
                if not i % 2:
                    assert (await read_response(reader)).status == 200
            assert len(bob.connections) == 1
            data, elapsed = await until_closed(reader)  # silence: closed after the idle timeout
            assert data == b"" and 0.2 <= elapsed < 2.0, (data, elapsed)
        finally:
            writer.close()


@pytest.mark.parametrize("trickle", [False, True], ids=["stalled", "trickled"])
async def test_tcp_partial_message_times_out(caplog: pytest.LogCaptureFixture, trickle: bool) -> None:
    """A message begun but never completed (stalled, or sent a byte at a time so the connection is
    never silent) is abandoned after the partial-message timeout: no answer, a warning, closed."""
    async with limited_endpoint(idle_timeout=5.0, partial_timeout=0.3) as bob:
        reader, writer = await asyncio.open_connection("127.0.0.1", bob.port)
        writer.write(raw_options("ka-first"))  # a complete message first: the next one is partial
        message = raw_options("partial")
        writer.write(message[:40])
        await writer.drain()
        assert (await read_response(reader)).status == 200

        async def trickle_bytes() -> None:
            for i in range(40, len(message) - 1):
                await asyncio.sleep(0.03)
                writer.write(message[i : i + 1])

        task = asyncio.create_task(trickle_bytes()) if trickle else None
        try:
            data, elapsed = await until_closed(reader)
            assert data == b"" and 0.2 <= elapsed < 2.0, (data, elapsed)
        finally:
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            writer.close()
        await asyncio.sleep(0.05)
        assert bob.connections == []
        assert any(
            "still incomplete" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records
        ), caplog.text


async def test_tcp_connections_beyond_the_limit_are_closed_at_once(caplog: pytest.LogCaptureFixture) -> None:
    async with limited_endpoint(max_connections=2) as bob:
        opened = [await asyncio.open_connection("127.0.0.1", bob.port) for _ in range(2)]
        try:
            for i, (reader, writer) in enumerate(opened):
                writer.write(raw_options(f"cap{i}"))
                assert (await read_response(reader)).status == 200
            reader, writer = await asyncio.open_connection("127.0.0.1", bob.port)
            try:
                data, elapsed = await until_closed(reader, 2.0)
                assert data == b"" and elapsed < 1.0
            finally:
                writer.close()
            assert any(
                "closed at once" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records
            ), caplog.text
            assert len(bob.connections) == 2
            # The connections already open still work, and a freed place is taken again.
            reader, writer = opened[0]
            writer.write(raw_options("cap-again"))
            assert (await read_response(reader)).status == 200
            writer.close()
            await asyncio.sleep(0.1)
            reader, writer = await asyncio.open_connection("127.0.0.1", bob.port)
            opened[0] = (reader, writer)
            writer.write(raw_options("cap-new"))
            assert (await read_response(reader)).status == 200
        finally:
            for _, writer in opened:
                writer.close()


@pytest.mark.parametrize(
    "limits", [{"idle_timeout": 0}, {"partial_timeout": -1.0}, {"max_connections": 0}], ids=str
)
def test_tcp_limits_must_be_positive(limits: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=next(iter(limits))):
        SipEndpoint(port=0, **limits)  # type: ignore[arg-type]


async def test_handler_exception_answers_500(pair: tuple[SipEndpoint, SipEndpoint]) -> None:
    alice, bob = pair

    async def broken(incoming: IncomingRequest) -> None:
        raise RuntimeError("handler bug")

    bob.request_handler = broken
    response = await asyncio.wait_for(alice.request(new_request("OPTIONS", alice, bob), addr(bob)), 5)
    assert response.status == 500
    bob.request_handler = lambda incoming: incoming.respond(200) and None
    response = await asyncio.wait_for(alice.request(new_request("OPTIONS", alice, bob), addr(bob)), 5)
    assert response.status == 200


async def test_no_handler_answers_501(pair: tuple[SipEndpoint, SipEndpoint]) -> None:
    alice, bob = pair
    response = await asyncio.wait_for(alice.request(new_request("OPTIONS", alice, bob), addr(bob), "tcp"), 5)
    assert response.status == 501


async def test_unacknowledged_2xx_is_retransmitted_then_wait_ack_gives_none(
    pair: tuple[SipEndpoint, SipEndpoint],
) -> None:
    alice, bob = pair
    result: list[Request | None] = []

    async def bob_handler(incoming: IncomingRequest) -> None:
        incoming.respond(200, headers=[("Contact", f"<{bob.contact_uri('bob')}>")])
        result.append(await incoming.wait_ack(timeout=5))

    bob.request_handler = bob_handler
    final = await asyncio.wait_for(alice.request(new_request("INVITE", alice, bob), addr(bob)), 5)
    assert final.status == 200  # alice never ACKs
    for _ in range(300):
        if result:
            break
        await asyncio.sleep(0.01)
    assert result == [None]  # gave up after 64*T1


async def test_ack_handler_gets_acks_nobody_waits_for(pair: tuple[SipEndpoint, SipEndpoint]) -> None:
    alice, bob = pair
    seen: list[Request] = []
    bob.ack_handler = lambda ack, source, transport: seen.append(ack)
    bob.request_handler = lambda incoming: (
        incoming.respond(200, headers=[("Contact", f"<{bob.contact_uri('bob')}>")]) and None
    )
    client = alice.start_request(new_request("INVITE", alice, bob), addr(bob))
    final = await asyncio.wait_for(client.final(), 5)
    dialog = Dialog.from_uac(client.request, final)
    alice.send_ack(dialog.create_ack(client.request), dialog.next_hop()[:2])
    for _ in range(100):
        if seen:
            break
        await asyncio.sleep(0.01)
    assert len(seen) == 1 and seen[0].method == "ACK"


async def test_udp_and_tcp_share_the_port_and_contact_uri() -> None:
    endpoint = SipEndpoint(host="127.0.0.1", port=0, name="solo")
    await endpoint.start()
    try:
        assert endpoint.port != 0
        for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
            probe = socket.socket(socket.AF_INET, kind)
            with pytest.raises(OSError):
                probe.bind(("127.0.0.1", endpoint.port))  # taken for both transports
            probe.close()
        assert str(endpoint.contact_uri("u")) == f"sip:u@127.0.0.1:{endpoint.port}"
        assert str(endpoint.contact_uri(None, "tcp")) == f"sip:127.0.0.1:{endpoint.port};transport=tcp"
    finally:
        await endpoint.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_many_concurrent_requests(pair: tuple[SipEndpoint, SipEndpoint], transport: str) -> None:
    alice, bob = pair

    async def bob_handler(incoming: IncomingRequest) -> None:
        await asyncio.sleep(0.01)
        incoming.respond(200, headers=[("X-Echo", incoming.request.call_id)])

    bob.request_handler = bob_handler
    requests = [new_request("OPTIONS", alice, bob, transport) for _ in range(30)]
    responses = await asyncio.wait_for(
        asyncio.gather(*(alice.request(r, addr(bob), transport) for r in requests)), 10
    )
    assert [r.headers.get("X-Echo") for r in responses] == [r.call_id for r in requests]
    if transport == "tcp":
        assert alice.connections == [addr(bob)]  # one connection, reused


async def test_close_resolves_pending_requests(pair: tuple[SipEndpoint, SipEndpoint]) -> None:
    alice, bob = pair
    never = asyncio.Event()

    async def bob_handler(incoming: IncomingRequest) -> None:
        await never.wait()

    bob.request_handler = bob_handler
    client = alice.start_request(new_request("OPTIONS", alice, bob), addr(bob))
    await asyncio.sleep(0.05)
    await alice.close()
    response = await asyncio.wait_for(client.final(), 1)
    assert response.status == 503


async def test_handler_failing_after_a_provisional_still_answers_500(
    pair: tuple[SipEndpoint, SipEndpoint],
) -> None:
    alice, bob = pair

    async def bob_handler(incoming: IncomingRequest) -> None:
        incoming.respond(180)
        with pytest.raises(InvalidStateError, match="2xx"):
            await incoming.wait_ack()
        raise ValueError("media setup failed")

    bob.request_handler = bob_handler
    client = alice.start_request(new_request("INVITE", alice, bob), addr(bob))
    final = await asyncio.wait_for(client.final(), 5)
    assert final.status == 500
    assert [r.status for r in client.provisional] == [100, 180]


async def test_keepalives_and_stateless_sends(pair: tuple[SipEndpoint, SipEndpoint]) -> None:
    alice, bob = pair
    loop = asyncio.get_running_loop()
    transport, raw = await loop.create_datagram_endpoint(RawUdp, local_addr=("127.0.0.1", 0))
    try:
        transport.sendto(b"\r\n\r\n", addr(bob))  # RFC 5626 keep-alive: ignored, not answered
        await asyncio.sleep(0.05)
        assert raw.received.empty()
        request = new_request("MESSAGE", alice, bob)
        request.headers.add("Via", "SIP/2.0/UDP 127.0.0.1:9;branch=z9hG4bKstateless")
        alice.send_stateless(request, transport.get_extra_info("sockname"))
        data = await asyncio.wait_for(raw.received.get(), 2)
        assert data.startswith(b"MESSAGE sip:bob@") and b"z9hG4bKstateless" in data
    finally:
        transport.close()


def test_error_response_for_echoes_identifiers() -> None:
    from services.sip.aio import error_response_for

    data = (
        b"\r\nINVITE sip:x@y SIP/2.0\r\nv: SIP/2.0/UDP h;branch=z9hG4bK1\r\nf: <sip:a@b>;tag=1\r\n"
        b"t: <sip:x@y>\r\ni: id\r\nCSeq: 1 INVITE\r\nContact: <sip:a@b>\r\n\r\nbody"
    )
    reply = error_response_for(data, 416, "Unsupported URI scheme\r\nX-Injected: 1")
    assert reply is not None
    lines = reply.decode().split("\r\n")
    assert lines[0] == "SIP/2.0 416 Unsupported URI scheme X-Injected: 1"  # no header injection
    assert lines[1:4] == ["Via: SIP/2.0/UDP h;branch=z9hG4bK1", "From: <sip:a@b>;tag=1", lines[3]]
    assert lines[3].startswith("To: <sip:x@y>;tag=")  # 8.2.6.2: a To tag is added
    assert "Call-ID: id" in lines and "CSeq: 1 INVITE" in lines
    assert not any(line.startswith("Contact") for line in lines)
    assert error_response_for(b"ACK sip:x@y SIP/2.0\r\n\r\n", 400, "x") is None  # never answer ACK
    assert error_response_for(b"SIP/2.0 200 OK\r\n\r\n", 400, "x") is None  # nor a response
    assert error_response_for(b"\xff\xfe garbage", 400, "x") is None


async def test_udp_receive_buffer_is_enlarged() -> None:
    # A burst of calls while the event loop lags must not overflow the kernel's default buffer.
    import socket

    ep = SipEndpoint(host="127.0.0.1", port=0, tcp=False, name="buf")
    await ep.start()
    try:
        sock = ep._udp.get_extra_info("socket")  # type: ignore[union-attr]
        with open("/proc/sys/net/core/rmem_max") as f:
            cap = int(f.read())
        # Linux reports twice the value it accepted (bookkeeping overhead), capped at rmem_max
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) >= min(2 * cap, 2 * 4 * 1024 * 1024) // 2
    finally:
        await ep.close()

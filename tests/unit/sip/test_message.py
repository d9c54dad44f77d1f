"""Message parsing, serialization, TCP framing and response building (RFC 3261 7, 8.2.6, 18.3)."""

from __future__ import annotations

import pytest

from services.sip.errors import SipParseError
from services.sip.headers import Headers, canonical_name
from services.sip.message import (
    Request,
    Response,
    StreamFramer,
    is_keepalive,
    make_response,
    new_branch,
    new_call_id,
    new_tag,
    parse_message,
    reason_phrase,
)
from services.sip.uri import SipUri

INVITE = (
    b"INVITE sip:bob@biloxi.example.com SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP pc33.atlanta.example.com;branch=z9hG4bK776asdhds;rport\r\n"
    b"Via: SIP/2.0/TCP proxy.example.com:5070;branch=z9hG4bKp1, SIP/2.0/UDP [2001:db8::1];branch=z9hG4bKp0\r\n"
    b"Max-Forwards: 70\r\n"
    b'To: "Bob" <sip:bob@biloxi.example.com>\r\n'
    b"From: Alice <sip:alice@atlanta.example.com>;tag=1928301774\r\n"
    b"Call-ID: a84b4c76e66710@pc33.atlanta.example.com\r\n"
    b"CSeq: 314159 INVITE\r\n"
    b"Record-Route: <sip:rm.example.com;lr>\r\n"
    b"Contact: <sip:alice@pc33.atlanta.example.com>\r\n"
    b"X-CV-Tenant: acme\r\n"
    b"Content-Type: application/sdp\r\n"
    b"Content-Length: 10\r\n"
    b"\r\n"
    b"v=0\r\ns=-\r\n"
)

RESPONSE = (
    b"SIP/2.0 200 OK\r\n"
    b"Via: SIP/2.0/UDP pc33.atlanta.example.com;branch=z9hG4bK776asdhds;received=192.0.2.1\r\n"
    b"To: Bob <sip:bob@biloxi.example.com>;tag=a6c85cf\r\n"
    b"From: Alice <sip:alice@atlanta.example.com>;tag=1928301774\r\n"
    b"Call-ID: a84b4c76e66710@pc33.atlanta.example.com\r\n"
    b"CSeq: 314159 INVITE\r\n"
    b"Content-Length: 0\r\n"
    b"\r\n"
)


def test_parse_request_fields() -> None:
    msg = parse_message(INVITE)
    assert isinstance(msg, Request)
    assert msg.method == "INVITE"
    assert msg.uri == SipUri.parse("sip:bob@biloxi.example.com")
    assert msg.call_id == "a84b4c76e66710@pc33.atlanta.example.com"
    assert (msg.cseq.seq, msg.cseq.method) == (314159, "INVITE")
    assert msg.from_.tag == "1928301774"
    assert msg.from_.display == "Alice"
    assert msg.to.tag is None
    assert msg.to.display == "Bob"
    assert [v.host for v in msg.vias] == ["pc33.atlanta.example.com", "proxy.example.com", "2001:db8::1"]
    assert msg.top_via.rport == ""
    assert msg.branch == "z9hG4bK776asdhds"
    assert msg.max_forwards == 70
    assert msg.content_type == "application/sdp"
    assert [c.uri.user for c in msg.contacts] == ["alice"]
    assert msg.headers.get("x-cv-tenant") == "acme"
    assert msg.body == b"v=0\r\ns=-\r\n"


def test_parse_response_fields() -> None:
    msg = parse_message(RESPONSE)
    assert isinstance(msg, Response)
    assert (msg.status, msg.reason) == (200, "OK")
    assert msg.to.tag == "a6c85cf"
    assert msg.top_via.received == "192.0.2.1"
    assert msg.body == b""


def test_round_trip() -> None:
    for raw in (INVITE, RESPONSE):
        msg = parse_message(raw)
        assert msg.to_bytes() == raw
        again = parse_message(msg.to_bytes())
        assert again.headers == msg.headers
        assert again.body == msg.body


def test_compact_forms_folding_and_case() -> None:
    raw = (
        b"OPTIONS sip:carol@chicago.example.com SIP/2.0\r\n"
        b"v: SIP/2.0/UDP pc33.example.com\r\n"
        b"  ;branch=z9hG4bKhjhs8ass877\r\n"
        b"MAX-FORWARDS: 70\r\n"
        b"t: <sip:carol@chicago.example.com>\r\n"
        b"f:\tAlice <sip:alice@example.com>;tag=1928301774\r\n"
        b"i: a84b4c76e66710\r\n"
        b"cseq: 63104\r\n\tOPTIONS\r\n"
        b"m: <sip:alice@pc33.example.com>\r\n"
        b"k: timer, 100rel\r\n"
        b"s: hello\r\n"
        b"c: application/sdp\r\n"
        b"l: 0\r\n"
        b"o: presence\r\nu: dialog\r\nr: <sip:x@y>\r\nb: <sip:z@y>\r\ne: gzip\r\n"
        b"\r\n"
    )
    msg = parse_message(raw)
    names = [n for n, _ in msg.headers.items()]
    assert names == [
        "Via", "Max-Forwards", "To", "From", "Call-ID", "CSeq", "Contact", "Supported", "Subject",
        "Content-Type", "Content-Length", "Event", "Allow-Events", "Refer-To", "Referred-By",
        "Content-Encoding",
    ]  # fmt: skip
    assert msg.headers.get("Via") == "SIP/2.0/UDP pc33.example.com ;branch=z9hG4bKhjhs8ass877"
    assert msg.branch == "z9hG4bKhjhs8ass877"
    assert msg.cseq.method == "OPTIONS"
    assert msg.headers.get_all("supported") == ["timer", "100rel"]
    assert b"\r\nSupported: timer, 100rel\r\n" in msg.to_bytes()
    assert b"\r\nCSeq: 63104 OPTIONS\r\n" in msg.to_bytes()


def test_canonical_names() -> None:
    assert canonical_name("call-id") == "Call-ID"
    assert canonical_name("CSEQ") == "CSeq"
    assert canonical_name("www-authenticate") == "WWW-Authenticate"
    assert canonical_name("i") == "Call-ID"
    assert canonical_name("X-Custom") == "X-Custom"


def test_headers_multimap() -> None:
    h = Headers(
        [("Via", "SIP/2.0/UDP a;branch=z9hG4bK1, SIP/2.0/UDP b;branch=z9hG4bK2"), ("v", "SIP/2.0/UDP c")]
    )
    assert h.get("VIA") == "SIP/2.0/UDP a;branch=z9hG4bK1"
    assert h.get_all("via") == [
        "SIP/2.0/UDP a;branch=z9hG4bK1",
        "SIP/2.0/UDP b;branch=z9hG4bK2",
        "SIP/2.0/UDP c",
    ]
    assert h.pop_first("Via") == "SIP/2.0/UDP a;branch=z9hG4bK1"
    assert h.get_all("Via") == ["SIP/2.0/UDP b;branch=z9hG4bK2", "SIP/2.0/UDP c"]
    h.add("Via", "SIP/2.0/UDP top", first=True)
    assert h.get("Via") == "SIP/2.0/UDP top"
    assert "v" in h
    h.add("Contact", '"Doe, John" <sip:j@x>, <sip:k@y;a=",">')
    assert h.get_all("m") == ['"Doe, John" <sip:j@x>', '<sip:k@y;a=",">']
    # non-list headers are never split
    h.add("Subject", "a, b")
    assert h.get_all("Subject") == ["a, b"]
    h.set("Subject", "c")
    assert h.get_all("Subject") == ["c"]
    assert h.remove("via") == 3
    assert "Via" not in h
    assert h.get("missing") is None
    with pytest.raises(ValueError):
        h.add("X-Evil", "a\r\nVia: injected")
    with pytest.raises(ValueError):
        h.add("Bad Name", "x")
    copy = h.copy()
    copy.set("Subject", "d")
    assert h.get("Subject") == "c"


def test_build_request_and_serialize() -> None:
    req = Request("OPTIONS", "sip:mcp1@127.0.0.1:5080")
    req.headers.add("Via", f"SIP/2.0/UDP 127.0.0.1:5070;branch={new_branch()}")
    req.headers.add("From", f"<sip:rm@127.0.0.1>;tag={new_tag()}")
    req.headers.add("To", "<sip:mcp1@127.0.0.1:5080>")
    req.headers.add("call-id", new_call_id("127.0.0.1"))
    req.headers.add("CSeq", "1 OPTIONS")
    req.headers.add("Content-Length", "999")  # always rewritten from len(body)
    data = req.to_bytes()
    assert data.startswith(b"OPTIONS sip:mcp1@127.0.0.1:5080 SIP/2.0\r\n")
    assert data.endswith(b"Content-Length: 0\r\n\r\n")
    assert b"\r\nCall-ID: " in data
    parsed = parse_message(data)
    assert isinstance(parsed, Request)
    assert parsed.cseq.method == "OPTIONS"
    clone = req.copy()
    clone.headers.set("CSeq", "2 OPTIONS")
    clone.uri.params["transport"] = "tcp"
    assert req.cseq.seq == 1
    assert req.uri.params == {}


def test_new_identifiers() -> None:
    assert new_branch().startswith("z9hG4bK")
    assert new_branch() != new_branch()
    assert len(new_tag()) >= 8
    assert new_call_id("10.0.0.1").endswith("@10.0.0.1")
    assert new_call_id("h") != new_call_id("h")


def test_reason_phrases() -> None:
    assert reason_phrase(200) == "OK"
    assert reason_phrase(481) == "Call/Transaction Does Not Exist"
    assert reason_phrase(499) == "Client Error"
    assert Response(486).reason == "Busy Here"
    assert Response(299, "Fine").to_bytes().startswith(b"SIP/2.0 299 Fine\r\n")


def test_make_response() -> None:
    req = parse_message(INVITE)
    assert isinstance(req, Request)
    trying = make_response(req, 100, to_tag="ignored")
    assert trying.to.tag is None  # RFC 3261 8.2.6.2: 100 Trying gets no tag
    assert trying.reason == "Trying"
    ringing = make_response(req, 180, to_tag="abc")
    assert ringing.to.tag == "abc"
    assert ringing.headers.get_all("Via") == req.headers.get_all("Via")
    assert ringing.headers.items()[:2] == req.headers.items()[:2]
    assert ringing.from_ == req.from_
    assert ringing.call_id == req.call_id
    assert ringing.cseq == req.cseq
    assert ringing.headers.get_all("Record-Route") == ["<sip:rm.example.com;lr>"]  # 12.1.1
    ok = make_response(
        req,
        200,
        headers=[("Contact", "<sip:mcp@127.0.0.1>")],
        body=b"v=0\r\n",
        content_type="application/sdp",
    )
    assert ok.to.tag  # a fresh tag when none given
    assert ok.headers.get("Contact") == "<sip:mcp@127.0.0.1>"
    assert ok.content_type == "application/sdp"
    parsed = parse_message(ok.to_bytes())
    assert isinstance(parsed, Response)
    assert parsed.body == b"v=0\r\n"
    busy = make_response(req, 486)
    assert "Record-Route" not in busy.headers
    # an existing To tag (in-dialog request) is kept
    ok_request = req.copy()
    ok_request.headers.set("To", "<sip:bob@biloxi.example.com>;tag=xyz")
    assert make_response(ok_request, 200, to_tag="other").to.tag == "xyz"
    # addr-spec To keeps its text and gains the tag as a header parameter
    ok_request.headers.set("To", "sip:bob@biloxi.example.com")
    assert (
        make_response(ok_request, 404, to_tag="t1").headers.get("To") == "sip:bob@biloxi.example.com;tag=t1"
    )


def _replace(raw: bytes, old: bytes, new: bytes) -> bytes:
    assert old in raw
    return raw.replace(old, new)


@pytest.mark.parametrize(
    ("raw", "status", "reason"),
    [
        (_replace(INVITE, b"Via: SIP/2.0/UDP pc33.atlanta.example.com;branch=z9hG4bK776asdhds;rport\r\n", b"")
         .replace(b"Via: SIP/2.0/TCP proxy.example.com:5070;branch=z9hG4bKp1, SIP/2.0/UDP [2001:db8::1];branch=z9hG4bKp0\r\n", b""),
         400, "Via header is missing"),
        (_replace(INVITE, b"CSeq: 314159 INVITE", b"CSeq: 314159 OPTIONS"), 400,
         "CSeq method does not match request method"),
        (_replace(INVITE, b"Content-Length: 10", b"Content-Length: 11"), 400, "Content-Length larger than body"),
        (_replace(INVITE, b"Content-Length: 10", b"Content-Length: -1"), 400, "Invalid Content-Length"),
        (_replace(INVITE, b"SIP/2.0\r\n", b"SIP/3.0\r\n"), 505, "SIP version not supported"),
        (_replace(INVITE, b"INVITE sip:bob", b"INVITE http:bob"), 416, "Unsupported URI scheme"),
        (_replace(INVITE, b"Call-ID: a84b4c76e66710@pc33.atlanta.example.com\r\n", b""), 400, "Call-ID header is missing"),
        (_replace(INVITE, b"CSeq: 314159 INVITE\r\n", b""), 400, "CSeq header is missing"),
        (_replace(INVITE, b'To: "Bob" <sip:bob@biloxi.example.com>\r\n', b""), 400, "To header is missing"),
        (_replace(INVITE, b"From: Alice", b"X-From: Alice"), 400, "From header is missing"),
        (_replace(INVITE, b"Max-Forwards: 70", b"Max-Forwards: 256"), 400, "Max-Forwards"),
        (_replace(INVITE, b"X-CV-Tenant: acme", b"X-CV-Tenant acme"), 400, "Malformed header line"),
        (_replace(INVITE, b"INVITE sip:bob@biloxi.example.com SIP", b"INVITE  sip:bob@biloxi.example.com SIP"),
         400, "Malformed request line"),
        (_replace(INVITE, b"\r\n\r\n", b"\r\n"), 400, "not terminated"),
        (_replace(RESPONSE, b"200 OK", b"2000 OK"), 400, "Malformed status line"),
        (_replace(RESPONSE, b"200 OK", b"099 OK"), 400, "Status code out of range"),
        (_replace(RESPONSE, b"SIP/2.0 200", b"SIP/2.1 200"), 505, "SIP version not supported"),
        (b"\r\n\r\n", 400, "Empty message"),
    ],
)  # fmt: skip
def test_parse_errors(raw: bytes, status: int, reason: str) -> None:
    with pytest.raises(SipParseError) as info:
        parse_message(raw)
    assert info.value.status == status
    assert reason in info.value.reason


def test_datagram_extra_bytes_are_truncated_and_missing_length_takes_rest() -> None:
    msg = parse_message(INVITE + b"garbage")
    assert msg.body == b"v=0\r\ns=-\r\n"
    no_length = INVITE.replace(b"Content-Length: 10\r\n", b"")
    assert parse_message(no_length + b"tail").body == b"v=0\r\ns=-\r\ntail"
    assert parse_message(b"\r\n\r\n" + RESPONSE).status == 200  # type: ignore[union-attr]


def test_datagram_size_limit() -> None:
    with pytest.raises(SipParseError) as info:
        parse_message(INVITE, max_size=100)
    assert info.value.status == 513


def test_keepalive() -> None:
    assert is_keepalive(b"\r\n\r\n")
    assert is_keepalive(b"\r\n")
    assert not is_keepalive(RESPONSE)


def _feed_all(framer: StreamFramer, data: bytes, step: int) -> list[Request | Response]:
    out: list[Request | Response] = []
    for i in range(0, len(data), step):
        out.extend(framer.feed(data[i : i + step]))
    return out


@pytest.mark.parametrize("step", [1, 2, 7, 1000])
def test_framer_pieces(step: int) -> None:
    stream = b"\r\n\r\n" + INVITE + b"\r\n" + RESPONSE + INVITE
    framer = StreamFramer()
    msgs = _feed_all(framer, stream, step)
    assert [type(m).__name__ for m in msgs] == ["Request", "Response", "Request"]
    assert msgs[0].body == msgs[2].body == b"v=0\r\ns=-\r\n"
    assert framer.buffered == 0


def test_framer_partial_then_rest() -> None:
    framer = StreamFramer()
    assert framer.feed(INVITE[:-3]) == []
    assert framer.buffered == len(INVITE) - 3
    msgs = framer.feed(INVITE[-3:] + RESPONSE[:10])
    assert len(msgs) == 1
    assert framer.feed(RESPONSE[10:])[0].status == 200  # type: ignore[union-attr]


def test_framer_missing_content_length() -> None:
    framer = StreamFramer()
    with pytest.raises(SipParseError) as info:
        framer.feed(RESPONSE.replace(b"Content-Length: 0\r\n", b""))
    assert info.value.status == 400
    assert "Content-Length" in info.value.reason
    with pytest.raises(SipParseError):  # the stream is dead
        framer.feed(RESPONSE)


def test_framer_size_limits() -> None:
    framer = StreamFramer(max_message=200)
    with pytest.raises(SipParseError) as info:
        framer.feed(INVITE)
    assert info.value.status == 413
    framer = StreamFramer(max_message=1000)
    with pytest.raises(SipParseError) as info:
        framer.feed(RESPONSE.replace(b"Content-Length: 0", b"Content-Length: 5000"))
    assert info.value.status == 413
    framer = StreamFramer(max_message=100)
    with pytest.raises(SipParseError) as info:
        for _ in range(20):
            framer.feed(b"X-Long-Header-Without-End: " + b"a" * 20)
    assert info.value.status == 413


def test_bare_cr_in_header_is_rejected() -> None:
    with pytest.raises(SipParseError) as info:
        parse_message(INVITE.replace(b"X-CV-Tenant: acme", b"X-CV-Tenant: ac\rVia: x"))
    assert "Bare CR" in info.value.reason


def test_message_layer_is_sans_io() -> None:
    import ast
    import importlib
    from pathlib import Path

    for name in ("errors", "uri", "headers", "message"):
        module = importlib.import_module(f"services.sip.{name}")
        tree = ast.parse(Path(module.__file__ or "").read_text(encoding="utf-8"))
        imported = {
            a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names
        }
        imported |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not imported & {"asyncio", "socket", "time", "os", "selectors", "threading"}, name


def test_accessors_parse_once_and_follow_edits() -> None:
    """A parsed header is kept while its text stays the same, and parsed anew once it changes."""
    msg = parse_message(
        b"INVITE sip:b@example.com SIP/2.0\r\nVia: SIP/2.0/UDP a.example.com;branch=z9hG4bK1\r\n"
        b"From: <sip:a@example.com>;tag=1\r\nTo: <sip:b@example.com>\r\nCall-ID: x\r\nCSeq: 1 INVITE\r\n"
        b"Contact: <sip:a@10.0.0.1>\r\nContent-Length: 0\r\n\r\n"
    )
    assert msg.to is msg.to and msg.top_via is msg.vias[0] and msg.contacts[0] is msg.contacts[0]
    assert msg.to.tag is None
    msg.headers.set("To", "<sip:b@example.com>;tag=9")
    assert msg.to.tag == "9"
    msg.headers.add("Via", "SIP/2.0/TCP proxy.example.com;branch=z9hG4bK2", first=True)
    assert msg.branch == "z9hG4bK2" and [v.branch for v in msg.vias] == ["z9hG4bK2", "z9hG4bK1"]
    msg.headers.set("CSeq", "2 INVITE")
    assert msg.cseq.seq == 2
    copy = msg.copy()
    copy.headers.set("From", "<sip:c@example.com>;tag=2")
    assert copy.from_.tag == "2" and msg.from_.tag == "1"

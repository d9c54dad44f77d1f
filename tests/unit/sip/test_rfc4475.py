"""RFC 4475 torture messages (tests/vectors/rfc4475/, see its README) and fuzzing of the parser.

Each vector is fed three ways (habit 8 in STYLE.md): whole as a datagram, byte by byte into the TCP
framer, and with another message appended. Whatever the input, the parser may only ever raise
``SipParseError``.

Choices where RFC 4475 leaves room:
* mismatch02 (3.1.2.18): the RFC prefers 501 for an unknown method whose CSeq does not match, but
  allows 400; the parser cannot know which methods the TU implements, so it answers 400.
* scalarlg (3.1.2.5) and bigcode (3.1.2.19) are responses: the status (400) only classifies the
  defect, the caller drops the response.
* unksm2 (3.3.4): To/From/Contact with non-SIP schemes. ``NameAddr`` models sip/sips/tel URIs only,
  so the parser rejects such a message with 400 instead of carrying opaque URIs.
* inv2543 (3.4.1, RFC 2543 syntax, no Content-Length): accepted as a datagram (the body runs to the
  end of the datagram, RFC 3261 18.3); on a stream a missing Content-Length is a framing error (400).
* clerr (3.1.2.2): a datagram raises 400; on a stream the framer can only wait for the 9999 octets
  (RFC 4475: "there's not much the receiving party could do but wait"), so it returns nothing.
* dblreq (3.1.1.8): the trailing INVITE is noise in a datagram; on a stream it is the next message
  and is returned too, its one octet beyond its Content-Length left buffered.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.sip.errors import SipParseError
from services.sip.headers import CSeq, Via
from services.sip.message import Request, Response, StreamFramer, parse_message
from services.sip.uri import NameAddr, SipUri

VECTORS = Path(__file__).resolve().parents[2] / "vectors" / "rfc4475"

# Appended after a vector to test trailing data.
GOOD = (
    b"OPTIONS sip:probe@example.com SIP/2.0\r\n"
    b"Via: SIP/2.0/TCP probe.example.com;branch=z9hG4bKprobe\r\n"
    b"To: <sip:probe@example.com>\r\n"
    b"From: <sip:probe@example.com>;tag=probe\r\n"
    b"Call-ID: probe@example.com\r\n"
    b"CSeq: 1 OPTIONS\r\n"
    b"Content-Length: 0\r\n"
    b"\r\n"
)


def load(name: str) -> bytes:
    return (VECTORS / f"{name}.dat").read_bytes()


def _wsinv(m: Request | Response) -> None:
    assert isinstance(m, Request)
    assert m.method == "INVITE"
    assert m.uri.params == {"unknownparam": None}
    assert (m.to.uri.user, m.to.tag) == ("vivekg", "1918181833n")
    assert m.from_.display == 'J Rosenberg \\"'
    assert m.from_.tag == "98asjd8"
    assert m.max_forwards == 68
    assert m.cseq == CSeq(9, "INVITE")
    assert [(v.transport, v.host, v.branch) for v in m.vias] == [
        ("UDP", "192.0.2.2", "390skdjuw"),
        ("TCP", "spindle.example.com", "z9hG4bK9ikj8"),
        ("UDP", "192.168.255.111", "z9hG4bK30239"),
    ]
    assert m.headers.get("Subject") == ""
    assert m.headers.get("newfangledheader") == "newfangled value continued newfangled value"
    assert m.headers.get("UnknownHeaderWithUnusualValue") == ";;,,;;,;"
    (contact,) = m.contacts
    assert contact.display == 'Quoted string ""'
    assert contact.params == {"newparam": "newvalue", "secondparam": None, "q": "0.33"}
    route = NameAddr.parse(m.headers.get_all("Route")[0])
    assert route.uri.params == {"lr": None, "unknownwith": "value", "unknown-no-value": None}
    assert len(m.body) == 150


def _intmeth(m: Request | Response) -> None:
    assert isinstance(m, Request)
    assert m.method == "!interesting-Method0123456789_*+`.%indeed'~"
    assert m.uri.user == "1_unusual.URI~(to-be!sure)&isn't+it$/crazy?,/;;*"
    assert m.uri.password == "&it+has=1,weird!*pas$wo~d_too.(doesn't-it)"
    assert m.uri.host == "example.com"
    assert m.to.display == "BEL:\x07 NUL:\x00 DEL:\x7f"
    assert m.from_.display == "token1~` token2'+_ token3*%!.-"
    assert m.from_.tag == "_token~1'+`*%!-."
    assert m.from_.params["fromparam''~+*_!.-%"] == '"работающий"'
    assert m.call_id == "intmeth.word%ZK-!.*_+'@word`~)(><:\\/\"][?}{"
    assert m.cseq == CSeq(139122385, m.method)
    assert m.max_forwards == 255
    assert m.branch == "z9hG4bK-.!%66*_+`'~"
    assert m.headers.get("extensionHeader-!.%*+_`'~") == "\ufeff大停電"


def _esc01(m: Request | Response) -> None:
    assert isinstance(m, Request)
    assert (m.uri.user, m.uri.host) == ("sips:user@example.com", "example.net")
    assert m.to.uri.user == "user"
    assert m.from_.uri.user == "I have spaces"
    assert m.call_id == "esc01.239409asdfakjkn23onasd0-3234"
    assert m.content_type == "application/sdp"
    (contact,) = m.contacts
    assert contact.uri.user == "caller"
    # "%6C%72" is "lr" escaped; the value "v%61lue%25%34%31" is not unescaped recursively.
    assert contact.uri.params == {"%6c%72": None, "n%61me": "v%61lue%25%34%31"}


def _escnull(m: Request | Response) -> None:
    assert m.to.uri.user == "null-\x00-null"
    assert [c.uri.user for c in m.contacts] == ["\x00", "\x00\x00"]  # two distinct contacts


def _esc02(m: Request | Response) -> None:
    assert isinstance(m, Request)
    assert m.method == "RE%47IST%45R"  # not REGISTER
    assert m.to.display == "%Z%45"
    assert [c.uri.user for c in m.contacts] == ["alias1", "alias3"]
    assert m.headers.get("C%6Fntact") == "<sip:alias2@host2.example.com>"
    assert m.branch == "z9hG4bK209%fzsnel234"


def _lwsdisp(m: Request | Response) -> None:
    assert (m.from_.display, m.from_.tag) == ("caller", "323")


def _longreq(m: Request | Response) -> None:
    assert len(m.vias) == 34
    assert m.vias[0].host == "sip33.example.com"
    assert m.vias[-1].received == "192.0.2.5"
    assert m.to.uri.port == 6000
    assert len(m.to.uri.params) == 3
    assert m.from_.tag is not None
    assert len(m.from_.tag) == 155
    assert len(m.body) == 150


def _dblreq(m: Request | Response) -> None:
    assert isinstance(m, Request)
    assert m.method == "REGISTER"
    assert m.body == b""  # the INVITE octets after the empty body are discarded (RFC 3261 18.3)


def _semiuri(m: Request | Response) -> None:
    assert isinstance(m, Request)
    assert (m.uri.user, m.uri.host, m.uri.params) == ("user;par=u@example.net", "example.com", {})
    assert len(m.headers.get_all("Accept")) == 6


def _transports(m: Request | Response) -> None:
    assert [v.transport for v in m.vias] == ["UDP", "SCTP", "TLS", "UNKNOWN", "TCP"]
    assert m.call_id == "transports.kijh4akdnaqjkwendsasfdj"


def _mpart01(m: Request | Response) -> None:
    assert len(m.body) == 553
    assert b"\x00" in m.body
    assert m.content_type == "multipart/mixed;boundary=7a9cbec02ceef655"


def _unreason(m: Request | Response) -> None:
    assert isinstance(m, Response)
    assert m.status == 200
    assert m.reason == "= 2**3 * 5**2 но сто девяносто девять - простое"
    assert len(m.body) == 154


def _noreason(m: Request | Response) -> None:
    assert isinstance(m, Response)
    assert (m.status, m.reason) == (100, "")


def _badbranch(m: Request | Response) -> None:
    assert m.branch == "z9hG4bK"  # magic cookie and nothing else: the transaction layer decides


def _bcast(m: Request | Response) -> None:
    assert m.vias[1].host == "255.255.255.255"


def _zeromf(m: Request | Response) -> None:
    assert m.max_forwards == 0


def _cparam01(m: Request | Response) -> None:
    (contact,) = m.contacts
    assert (contact.uri.params, contact.params) == ({}, {"unknownparam": None})  # header param


def _cparam02(m: Request | Response) -> None:
    (contact,) = m.contacts
    assert (contact.uri.params, contact.params) == ({"unknownparam": None}, {})  # URI param


def _regescrt(m: Request | Response) -> None:
    assert m.contacts[0].uri.headers == {"Route": "%3Csip:sip.example.com%3E"}


def _inv2543(m: Request | Response) -> None:
    assert m.branch is None
    assert m.max_forwards is None
    assert m.from_.tag is None
    assert m.to.params == {"user": "phone"}
    assert len(m.body) == 105  # no Content-Length: the rest of the datagram


def _nothing(m: Request | Response) -> None:
    pass


VALID: dict[str, Callable[[Request | Response], None]] = {
    # RFC 4475 3.1.1: syntactically valid messages
    "wsinv": _wsinv,
    "intmeth": _intmeth,
    "esc01": _esc01,
    "escnull": _escnull,
    "esc02": _esc02,
    "lwsdisp": _lwsdisp,  # RFC 3261 grammar bug; RFC 4475 says accept
    "longreq": _longreq,
    "dblreq": _dblreq,
    "semiuri": _semiuri,
    "transports": _transports,
    "mpart01": _mpart01,
    "unreason": _unreason,
    "noreason": _noreason,
    # RFC 4475 3.2-3.4: parse fine; the transaction layer / TU decides what to answer
    "badbranch": _badbranch,
    "bext01": _nothing,
    "invut": _nothing,
    "regaut01": _nothing,
    "bcast": _bcast,
    "zeromf": _zeromf,
    "cparam01": _cparam01,
    "cparam02": _cparam02,
    "regescrt": _regescrt,
    "sdp01": _nothing,
    "inv2543": _inv2543,
}

INVALID: dict[str, int] = {
    # RFC 4475 3.1.2: invalid messages
    "badinv01": 400,
    "clerr": 400,
    "ncl": 400,
    "scalar02": 400,
    "scalarlg": 400,
    "quotbal": 400,
    "ltgtruri": 400,
    "lwsruri": 400,
    "lwsstart": 400,
    "trws": 400,
    "escruri": 400,
    "baddate": 400,
    "regbadct": 400,
    "badaspec": 400,
    "baddn": 400,
    "badvers": 505,  # RFC 4475 3.1.2.16: 505 Version Not Supported
    "mismatch01": 400,
    "mismatch02": 400,
    "bigcode": 400,
    # RFC 4475 3.3: rejected by the parser
    "insuf": 400,
    "unkscm": 416,
    "novelsc": 416,
    "unksm2": 400,
    "multi01": 400,
    "mcl01": 400,
}


def test_every_vector_is_classified() -> None:
    names = {p.stem for p in VECTORS.glob("*.dat")}
    assert len(names) == 49
    assert names == set(VALID) | set(INVALID)


@pytest.mark.parametrize("name", sorted(VALID))
def test_valid_datagram(name: str) -> None:
    msg = parse_message(load(name))
    VALID[name](msg)
    again = parse_message(msg.to_bytes())
    assert type(again) is type(msg)
    assert again.body == msg.body
    without_length = [(n, v) for n, v in msg.headers.items() if n != "Content-Length"]
    assert [(n, v) for n, v in again.headers.items() if n != "Content-Length"] == without_length


@pytest.mark.parametrize("name", sorted(INVALID))
def test_invalid_datagram(name: str) -> None:
    with pytest.raises(SipParseError) as info:
        parse_message(load(name))
    assert info.value.status == INVALID[name]
    assert info.value.reason


@pytest.mark.parametrize("name", sorted(VALID))
def test_valid_datagram_with_trailing_data(name: str) -> None:
    data = load(name)
    msg = parse_message(data + GOOD)
    if name == "inv2543":  # no Content-Length: the body runs to the end of the datagram
        assert msg.body.endswith(GOOD)
        return
    VALID[name](msg)


@pytest.mark.parametrize("name", sorted(INVALID))
def test_invalid_datagram_with_trailing_data(name: str) -> None:
    with pytest.raises(SipParseError) as info:
        parse_message(load(name) + GOOD)
    assert info.value.status == INVALID[name]


def _feed(data: bytes, step: int) -> tuple[list[Request | Response], StreamFramer]:
    framer = StreamFramer()
    out: list[Request | Response] = []
    for i in range(0, len(data), step):
        out.extend(framer.feed(data[i : i + step]))
    return out, framer


def _stream_error(name: str) -> int | None:
    """The status a stream of this vector must fail with (None: it frames without error)."""
    if name == "inv2543":
        return 400  # RFC 3261 18.3: Content-Length is mandatory on streams
    if name == "clerr":
        return None  # waits for the announced body
    return INVALID.get(name)


@pytest.mark.parametrize("step", [1, 5])
@pytest.mark.parametrize("name", sorted(VALID) + sorted(INVALID))
def test_stream_byte_by_byte(name: str, step: int) -> None:
    data = load(name)
    status = _stream_error(name)
    if status is not None:
        with pytest.raises(SipParseError) as info:
            _feed(data, step)
        assert info.value.status == status
        return
    msgs, framer = _feed(data, step)
    if name == "clerr":
        assert msgs == []
        assert framer.buffered == len(data)
    elif name == "dblreq":
        assert [m.cseq.method for m in msgs] == ["REGISTER", "INVITE"]
        assert framer.buffered == 3  # "C\r\n": the INVITE's body is one octet longer than 150
    else:
        assert len(msgs) == 1
        VALID[name](msgs[0])
        assert framer.buffered == 0


@pytest.mark.parametrize("step", [1, 7, 100_000])
@pytest.mark.parametrize("name", sorted((set(VALID) | set(INVALID)) - {"dblreq"}))
def test_stream_with_trailing_message(name: str, step: int) -> None:
    data = load(name) + GOOD
    status = _stream_error(name)
    if status is not None:
        with pytest.raises(SipParseError) as info:
            _feed(data, step)
        assert info.value.status == status
        return
    msgs, _ = _feed(data, step)
    if name == "clerr":
        assert msgs == []  # the appended message is swallowed as part of the 9999-octet body
        return
    assert len(msgs) == 2
    VALID[name](msgs[0])
    assert isinstance(msgs[1], Request)
    assert msgs[1].call_id == "probe@example.com"


# -- fuzzing -------------------------------------------------------------------------------
VALID_BYTES = [load(n) for n in sorted(VALID) if n != "inv2543"] + [GOOD]
_INTERESTING = [b";", b",", b'"', b"\\", b"<", b">", b":", b"@", b"%", b"=", b" ", b"\t", b"\r\n", b"\r\n ",
                b"\x00", b"\xff", b"[", b"]", b"?", b"SIP/2.0", b"Content-Length: 99999\r\n", b"\r\n\r\n"]  # fmt: skip


@st.composite
def mutated_messages(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(VALID_BYTES)))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "duplicate", "truncate"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[pos] = draw(st.integers(0, 255))
        elif op == "insert":
            data[pos:pos] = draw(st.sampled_from(_INTERESTING) | st.binary(min_size=1, max_size=4))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 8))]
        elif op == "duplicate":
            data[pos:pos] = data[pos : pos + draw(st.integers(1, 40))]
        elif op == "truncate":
            del data[pos:]
    return bytes(data)


def _exercise(data: bytes) -> None:
    """Parse ``data`` every way; only SipParseError may escape, and what parses must round-trip."""
    try:
        msg = parse_message(data)
    except SipParseError as exc:
        assert 400 <= exc.status < 600
    else:
        for accessor in ("call_id", "cseq", "from_", "to", "vias", "top_via", "branch", "content_type",
                         "contacts", "max_forwards"):  # fmt: skip
            try:
                getattr(msg, accessor)
            except SipParseError:
                pass
        for name in ("Route", "Record-Route"):
            for value in msg.headers.get_all(name):
                try:
                    NameAddr.parse(value)
                except SipParseError:
                    pass
        again = parse_message(msg.to_bytes())
        assert again.body == msg.body
        assert [i for i in again.headers.items() if i[0] != "Content-Length"] == [
            i for i in msg.headers.items() if i[0] != "Content-Length"
        ]
    for step in (1, 64):
        framer = StreamFramer()
        try:
            for i in range(0, len(data), step):
                framer.feed(data[i : i + step])
        except SipParseError as exc:
            assert 400 <= exc.status < 600


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(mutated_messages())
def test_fuzz_mutated_messages(data: bytes) -> None:
    _exercise(data)


@FUZZ
@given(st.binary(max_size=600))
def test_fuzz_random_bytes(data: bytes) -> None:
    _exercise(data)


@FUZZ
@given(st.text(max_size=200))
def test_fuzz_header_values(text: str) -> None:
    for parser in (SipUri.parse, NameAddr.parse, Via.parse, CSeq.parse):
        try:
            parser(text)
        except SipParseError:
            pass

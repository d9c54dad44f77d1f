"""SIP messages: parsing from bytes, serializing, TCP framing and response building (RFC 3261 7, 8.2.6, 18.3).

Sans-I/O: ``parse_message`` takes one datagram, ``StreamFramer`` takes stream bytes in whatever
pieces they arrive; neither touches sockets or clocks. Every remote protocol violation raises
``SipParseError`` carrying the status code to answer with.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable, Iterable
from typing import Any, Self, TypeVar

from .errors import InvalidStateError, SipError, SipParseError
from .headers import COMPACT_FORMS, LIST_HEADERS, CSeq, Headers, Via, canonical_name
from .uri import NameAddr, SipUri, is_token

__all__ = [
    "COMPACT_FORMS",
    "LIST_HEADERS",
    "REASON_PHRASES",
    "CSeq",
    "Headers",
    "InvalidStateError",
    "Message",
    "NameAddr",
    "Request",
    "Response",
    "SipError",
    "SipParseError",
    "SipUri",
    "StreamFramer",
    "Via",
    "canonical_name",
    "is_keepalive",
    "make_response",
    "new_branch",
    "new_call_id",
    "new_tag",
    "parse_message",
    "reason_phrase",
]

SIP_VERSION = "SIP/2.0"
MAGIC_COOKIE = "z9hG4bK"  # RFC 3261 8.1.1.7
MAX_URI_LENGTH = 8192  # longer Request-URIs get 414 (RFC 3261 21.4.12)
DEFAULT_MAX_DATAGRAM = 65535

# RFC 3261 21 plus the extensions a recording stack meets.
REASON_PHRASES: dict[int, str] = {
    100: "Trying", 180: "Ringing", 181: "Call Is Being Forwarded", 182: "Queued",
    183: "Session Progress", 199: "Early Dialog Terminated",
    200: "OK", 202: "Accepted", 204: "No Notification",
    300: "Multiple Choices", 301: "Moved Permanently", 302: "Moved Temporarily", 305: "Use Proxy",
    380: "Alternative Service",
    400: "Bad Request", 401: "Unauthorized", 402: "Payment Required", 403: "Forbidden",
    404: "Not Found", 405: "Method Not Allowed", 406: "Not Acceptable",
    407: "Proxy Authentication Required", 408: "Request Timeout", 410: "Gone",
    412: "Conditional Request Failed", 413: "Request Entity Too Large", 414: "Request-URI Too Long",
    415: "Unsupported Media Type", 416: "Unsupported URI Scheme", 417: "Unknown Resource-Priority",
    420: "Bad Extension", 421: "Extension Required", 422: "Session Interval Too Small",
    423: "Interval Too Brief", 428: "Use Identity Header", 429: "Provide Referrer Identity",
    433: "Anonymity Disallowed", 436: "Bad Identity-Info", 437: "Unsupported Certificate",
    438: "Invalid Identity Header", 439: "First Hop Lacks Outbound Support",
    440: "Max-Breadth Exceeded", 469: "Bad Info Package", 470: "Consent Needed",
    480: "Temporarily Unavailable", 481: "Call/Transaction Does Not Exist", 482: "Loop Detected",
    483: "Too Many Hops", 484: "Address Incomplete", 485: "Ambiguous", 486: "Busy Here",
    487: "Request Terminated", 488: "Not Acceptable Here", 489: "Bad Event", 491: "Request Pending",
    493: "Undecipherable", 494: "Security Agreement Required",
    500: "Server Internal Error", 501: "Not Implemented", 502: "Bad Gateway",
    503: "Service Unavailable", 504: "Server Time-out", 505: "Version Not Supported",
    513: "Message Too Large", 555: "Push Notification Service Not Supported",
    580: "Precondition Failure",
    600: "Busy Everywhere", 603: "Decline", 604: "Does Not Exist Anywhere", 606: "Not Acceptable",
    607: "Unwanted", 608: "Rejected",
}  # fmt: skip

_CLASS_REASONS = {1: "Trying", 2: "OK", 3: "Redirection", 4: "Client Error", 5: "Server Error", 6: "Failure"}


def reason_phrase(status: int) -> str:
    """The default reason phrase for ``status`` (the class's generic phrase when unknown)."""
    return REASON_PHRASES.get(status) or _CLASS_REASONS.get(status // 100, "Unknown")


def new_branch() -> str:
    """A fresh RFC 3261 branch: the magic cookie ``z9hG4bK`` plus 80 random bits (8.1.1.7)."""
    return MAGIC_COOKIE + secrets.token_hex(10)


def new_tag() -> str:
    """A fresh From/To tag with 64 random bits (RFC 3261 19.3 asks for at least 32)."""
    return secrets.token_hex(8)


def new_call_id(host: str) -> str:
    """A fresh globally unique Call-ID ``<128 random bits>@host`` (RFC 3261 8.1.1.4)."""
    local = secrets.token_hex(16)
    return f"{local}@{host}" if host else local


def is_keepalive(data: bytes) -> bool:
    """True for a datagram that only holds CRLFs (RFC 5626 3.5.1 keep-alive): not a message."""
    return not data.strip(b"\r\n")


_T = TypeVar("_T")


class Message:
    """Base of :class:`Request` and :class:`Response`: headers and body plus typed accessors.

    An accessor parses the header's text once and keeps the result for as long as the text stays
    the same (never stale after the headers are edited); a missing or malformed header raises
    ``SipParseError``. The parsed values are shared between calls: copy one (``.copy()``) before
    changing it.
    """

    headers: Headers
    body: bytes
    _memo: dict[str, tuple[Any, Any]]

    def __init__(self, headers: Headers | Iterable[tuple[str, str]] | None = None, body: bytes = b"") -> None:
        if headers is None:
            headers = Headers()
        elif not isinstance(headers, Headers):
            headers = Headers(headers)
        self.headers = headers
        self.body = bytes(body)
        self._memo = {}

    # -- typed accessors -------------------------------------------------------------------
    def _require(self, name: str) -> str:
        value = self.headers.get(name)
        if value is None:
            raise SipParseError(f"{name} header is missing")
        return value

    def _parsed(self, key: str, text: Any, parse: Callable[[Any], _T]) -> _T:
        """``parse(text)``, kept under ``key`` while the header text is ``text``."""
        hit = self._memo.get(key)
        if hit is not None and hit[0] == text:
            return hit[1]  # type: ignore[no-any-return]
        value = parse(text)
        self._memo[key] = (text, value)
        return value

    @property
    def call_id(self) -> str:
        """The Call-ID (RFC 3261 20.8)."""
        return self._require("Call-ID")

    @property
    def cseq(self) -> CSeq:
        """The parsed CSeq (RFC 3261 20.16)."""
        return self._parsed("CSeq", self._require("CSeq"), CSeq.parse)

    @property
    def from_(self) -> NameAddr:
        """The parsed From (RFC 3261 20.20)."""
        return self._parsed("From", self._require("From"), NameAddr.parse)

    @property
    def to(self) -> NameAddr:
        """The parsed To (RFC 3261 20.39)."""
        return self._parsed("To", self._require("To"), NameAddr.parse)

    @property
    def vias(self) -> list[Via]:
        """Every Via value, topmost first (RFC 3261 20.42)."""
        return [self._via(v) for v in self.headers.get_all("Via")]

    def _via(self, text: str) -> Via:
        return self._parsed("Via " + text, text, Via.parse)

    @property
    def top_via(self) -> Via:
        """The topmost Via; raises ``SipParseError`` when there is none."""
        return self._via(self._require("Via"))

    @property
    def branch(self) -> str | None:
        """The top Via's branch parameter, or None (no Via or no branch)."""
        value = self.headers.get("Via")
        return None if value is None else self._via(value).branch

    @property
    def content_type(self) -> str | None:
        """The Content-Type value as written (RFC 3261 20.15), or None."""
        return self.headers.get("Content-Type")

    @property
    def contacts(self) -> list[NameAddr]:
        """Every Contact value; the wildcard ``*`` (REGISTER, RFC 3261 10.2.2) is skipped, see
        :attr:`contact_wildcard`."""
        return [
            self._parsed("Contact " + v, v, NameAddr.parse)
            for v in self.headers.get_all("Contact")
            if v != "*"
        ]

    @property
    def contact_wildcard(self) -> bool:
        """True when a Contact value is ``*`` (remove all bindings, RFC 3261 10.2.2)."""
        return "*" in self.headers.get_all("Contact")

    @property
    def max_forwards(self) -> int | None:
        """Max-Forwards (RFC 3261 20.22) or None when absent; malformed raises ``SipParseError``."""
        value = self.headers.get("Max-Forwards")
        if value is None:
            return None
        # 1*DIGIT, leading zeros allowed (RFC 4475 3.1.1.1 sends "0068"); range 0-255.
        if not value.isdigit() or len(value) > 10 or int(value) > 255:
            raise SipParseError("Invalid Max-Forwards value")
        return int(value)

    # -- serialization ---------------------------------------------------------------------
    def start_line(self) -> str:
        """The request-line or status-line, without CRLF."""
        raise NotImplementedError

    def to_bytes(self) -> bytes:
        """Serialize with canonical header names and CRLFs; Content-Length is always written
        (last) from ``len(body)``, replacing any Content-Length header (RFC 3261 18.3, 20.14)."""
        lines = [self.start_line()]
        lines.extend(f"{n}: {v}" for n, v in self.headers.items() if n != "Content-Length")
        lines.append(f"Content-Length: {len(self.body)}")
        head = "\r\n".join(lines) + "\r\n\r\n"
        return head.encode("utf-8", "surrogateescape") + self.body

    def __bytes__(self) -> bytes:
        return self.to_bytes()

    def copy(self) -> Self:
        """A copy whose headers (and Request-URI) can be edited independently."""
        raise NotImplementedError


class Request(Message):
    """A SIP request: ``Request(method, uri, headers=None, body=b"")``; ``uri`` may be text."""

    method: str
    uri: SipUri

    def __init__(
        self,
        method: str,
        uri: SipUri | str,
        headers: Headers | Iterable[tuple[str, str]] | None = None,
        body: bytes = b"",
    ) -> None:
        super().__init__(headers, body)
        self.method = method
        self.uri = SipUri.parse(uri) if isinstance(uri, str) else uri

    def start_line(self) -> str:
        return f"{self.method} {self.uri} {SIP_VERSION}"

    def copy(self) -> Self:
        return type(self)(self.method, self.uri.copy(), self.headers.copy(), self.body)

    def __repr__(self) -> str:
        return f"<Request {self.method} {self.uri}>"


class Response(Message):
    """A SIP response: ``Response(status, reason=None, headers=None, body=b"")``; the reason
    defaults to the standard phrase."""

    status: int
    reason: str

    def __init__(
        self,
        status: int,
        reason: str | None = None,
        headers: Headers | Iterable[tuple[str, str]] | None = None,
        body: bytes = b"",
    ) -> None:
        super().__init__(headers, body)
        self.status = status
        self.reason = reason_phrase(status) if reason is None else reason

    def start_line(self) -> str:
        return f"{SIP_VERSION} {self.status} {self.reason}"

    def copy(self) -> Self:
        return type(self)(self.status, self.reason, self.headers.copy(), self.body)

    def __repr__(self) -> str:
        return f"<Response {self.status} {self.reason}>"


# -- parsing ---------------------------------------------------------------------------------
_LINE_SPLIT = re.compile(r"\r?\n")
_VERSION_RE = re.compile(r"SIP/[0-9]+\.[0-9]+", re.IGNORECASE)
# RFC 3261 3 / 25.1 rfc1123-date, always GMT (20.17).
_DATE_RE = re.compile(
    r"(Mon|Tue|Wed|Thu|Fri|Sat|Sun), [0-9]{2} (Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) "
    r"[0-9]{4} [0-9]{2}:[0-9]{2}:[0-9]{2} GMT"
)
# Headers that may appear only once (RFC 3261 7.3.1: not a comma list).
_SINGLE_HEADERS = ("To", "From", "Call-ID", "CSeq", "Max-Forwards", "Content-Length", "Content-Type")


def _find_head_end(data: bytes | bytearray, start: int = 0) -> tuple[int, int]:
    """Index of the empty line ending the header section and the index where the body begins
    ((-1, -1) when not yet present). Bare LF line ends are tolerated."""
    crlf = data.find(b"\r\n\r\n", start)
    lf = data.find(b"\n\n", start)
    if crlf >= 0 and (lf < 0 or crlf + 1 <= lf):
        return crlf, crlf + 4
    if lf >= 0:
        return lf, lf + 2
    return -1, -1


def _check_version(version: str) -> None:
    if version.upper() == SIP_VERSION:
        return
    if _VERSION_RE.fullmatch(version):
        raise SipParseError(f"SIP version not supported: {version[:20]}", status=505)
    raise SipParseError(f"Malformed SIP version: {version[:20]!r}")


class _Head:
    """A parsed start line and header section, before the body is attached."""

    __slots__ = ("headers", "method", "reason", "status", "uri")

    def __init__(self, head: bytes) -> None:
        text = head.decode("utf-8", "surrogateescape")
        lines = _LINE_SPLIT.split(text)
        if "\r" in text.replace("\r\n", ""):
            # A bare CR is no line end in SIP (RFC 3261 7: CRLF) but some parsers treat it as one;
            # passing it on would let a message mean different things to different hops.
            raise SipParseError("Bare CR in header section")
        start = lines[0]
        self.method: str | None = None
        self.uri: SipUri | None = None
        self.status = 0
        self.reason = ""
        if start[:4].upper() == "SIP/":
            # RFC 3261 7.2: Status-Line = SIP-Version SP Status-Code SP Reason-Phrase
            parts = start.split(" ", 2)
            _check_version(parts[0])
            if len(parts) < 2 or len(parts[1]) != 3 or not parts[1].isdigit():
                raise SipParseError(f"Malformed status line: {start[:60]!r}")
            self.status = int(parts[1])
            if not 100 <= self.status <= 699:
                raise SipParseError(f"Status code out of range: {self.status}")
            self.reason = parts[2] if len(parts) > 2 else ""
        else:
            # RFC 3261 7.1: Request-Line = Method SP Request-URI SP SIP-Version, single SPs.
            parts = start.split(" ")
            if len(parts) != 3 or not all(parts):
                raise SipParseError(f"Malformed request line: {start[:60]!r}")
            method, uri_text, version = parts
            if not is_token(method):
                raise SipParseError(f"Invalid method: {method[:40]!r}")
            _check_version(version)
            if len(uri_text) > MAX_URI_LENGTH:
                raise SipParseError("Request-URI too long", status=414)
            uri = SipUri.parse(uri_text)
            if uri.headers or "?" in uri_text.partition("@")[2]:
                # RFC 3261 19.1.1 table 1: headers are not allowed in a Request-URI.
                raise SipParseError("Request-URI must not contain headers")
            self.method = method
            self.uri = uri
        self.headers = _parse_header_lines(lines[1:])

    def build(self, body: bytes) -> Request | Response:
        msg: Request | Response
        if self.method is not None and self.uri is not None:
            msg = Request(self.method, self.uri, self.headers, body)
        else:
            msg = Response(self.status, self.reason, self.headers, body)
        _validate(msg)
        return msg

    def content_length(self) -> int | None:
        values = self.headers.get_all("Content-Length")
        if not values:
            return None
        if len(values) > 1:
            raise SipParseError("Multiple Content-Length headers")
        value = values[0]
        if not value.isdigit():
            raise SipParseError(f"Invalid Content-Length: {value[:20]!r}")
        return int(value)


def _parse_header_lines(lines: list[str]) -> Headers:
    items: list[tuple[str, str]] = []
    for line in lines:
        if not line:
            continue
        if line[0] in " \t":
            # RFC 3261 7.3.1: a line starting with whitespace continues the previous header;
            # the line break and the whitespace around it are equivalent to one SP.
            if not items:
                raise SipParseError("Continuation line before any header")
            name, value = items[-1]
            piece = line.strip(" \t")
            items[-1] = (name, f"{value} {piece}" if value else piece)
            continue
        name, colon, value = line.partition(":")
        name = name.rstrip(" \t")
        if not colon or not is_token(name):
            raise SipParseError(f"Malformed header line: {line[:60]!r}")
        items.append((canonical_name(name), value.strip(" \t")))
    headers = Headers()
    headers._items = [(n, v.strip(" \t")) for n, v in items]
    return headers


def _validate(msg: Request | Response) -> None:
    """Check the headers every request and response must carry (RFC 3261 8.1.1, 8.2.2, 20)."""
    h = msg.headers
    vias = h.get_all("Via")
    if not vias:
        raise SipParseError("Via header is missing")
    for via in vias:
        msg._via(via)
    for name in _SINGLE_HEADERS:
        if h.count(name) > 1:
            raise SipParseError(f"Multiple {name} headers")
    for name in ("To", "From"):
        value = h.get(name)
        if value is None:
            raise SipParseError(f"{name} header is missing")
        try:
            msg._parsed(name, value, NameAddr.parse)
        except SipParseError as exc:
            # 416 is about the Request-URI only; a bad URI in a header is a 400.
            raise SipParseError(f"Invalid {name} header: {exc.reason}") from None
    call_id = h.get("Call-ID")
    if call_id is None:
        raise SipParseError("Call-ID header is missing")
    if not call_id or any(c in call_id for c in " \t"):
        raise SipParseError("Invalid Call-ID header")
    cseq_text = h.get("CSeq")
    if cseq_text is None:
        raise SipParseError("CSeq header is missing")
    cseq = msg._parsed("CSeq", cseq_text, CSeq.parse)
    if isinstance(msg, Request) and cseq.method != msg.method:
        # RFC 3261 8.1.1.5 / RFC 4475 3.1.2.17
        raise SipParseError("CSeq method does not match request method")
    msg.max_forwards  # noqa: B018  -- validates when present (RFC 3261 20.22: 0-255)
    for value in h.get_all("Contact"):
        if value != "*":
            try:
                msg._parsed("Contact " + value, value, NameAddr.parse)
            except SipParseError as exc:
                raise SipParseError(f"Invalid Contact header: {exc.reason}") from None
    date = h.get("Date")
    if date is not None and not _DATE_RE.fullmatch(date):
        raise SipParseError("Invalid Date header (RFC 1123 date in GMT required)")


def parse_message(data: bytes, *, max_size: int = DEFAULT_MAX_DATAGRAM) -> Request | Response:
    """Parse one datagram into a :class:`Request` or :class:`Response`.

    Leading CRLFs are skipped (RFC 3261 7.5). The body is ``Content-Length`` bytes when the header
    is present -- octets beyond it are discarded, fewer raise ``SipParseError(400)`` (RFC 3261
    18.3) -- else the rest of the datagram. A datagram over ``max_size`` raises 513. Mandatory
    headers (Via, From, To, Call-ID, CSeq) are checked, as is the CSeq method of requests.
    """
    data = bytes(data)
    if len(data) > max_size:
        raise SipParseError("Message too large", status=513)
    start = 0
    while data.startswith(b"\r\n", start) or data.startswith(b"\n", start):
        start += 2 if data[start] == 0x0D else 1
    if start >= len(data):
        raise SipParseError("Empty message")
    end, body_start = _find_head_end(data, start)
    if end < 0:
        raise SipParseError("Header section is not terminated by an empty line")
    head = _Head(data[start:end])
    body = data[body_start:]
    length = head.content_length()
    if length is not None:
        if length > len(body):
            raise SipParseError("Content-Length larger than body")
        body = body[:length]
    return head.build(body)


class StreamFramer:
    """Split a byte stream (TCP, TLS) into messages by Content-Length (RFC 3261 18.3).

    ``feed()`` returns every message completed by the new bytes. CRLFs between messages
    (RFC 5626 keep-alives) are skipped. A message with no Content-Length raises
    ``SipParseError(400)``, one over ``max_message`` bytes ``SipParseError(413)``; after an
    error the stream cannot be resynchronised, so every later ``feed()`` raises it again and
    the connection should be closed.
    """

    def __init__(self, max_message: int = 65535) -> None:
        self.max_message = max_message
        self._buf = bytearray()
        self._head: _Head | None = None
        self._body_start = 0
        self._length = 0
        self._error: SipParseError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet part of a returned message."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[Request | Response]:
        """Add stream bytes; return the messages they complete (possibly none)."""
        if self._error is not None:
            raise self._error
        self._buf += data
        out: list[Request | Response] = []
        try:
            while self._step(out):
                pass
        except SipParseError as exc:
            self._error = exc
            raise
        return out

    def _step(self, out: list[Request | Response]) -> bool:
        buf = self._buf
        if self._head is None:
            skip = 0
            while skip < len(buf) and buf[skip] in (0x0D, 0x0A):
                skip += 1
            if skip:
                # RFC 3261 7.5: CRLFs before a start line are ignored. A lone trailing CR may be
                # the first half of a CRLF; keep waiting for more bytes instead of guessing.
                del buf[:skip]
            if not buf:
                return False
            end, body_start = _find_head_end(buf)
            if end < 0:
                if len(buf) > self.max_message:
                    raise SipParseError("Message too large", status=413)
                return False
            if body_start > self.max_message:
                raise SipParseError("Message too large", status=413)
            head = _Head(bytes(buf[:end]))
            length = head.content_length()
            if length is None:
                raise SipParseError("Content-Length header is missing")
            if body_start + length > self.max_message:
                raise SipParseError("Message too large", status=413)
            self._head, self._body_start, self._length = head, body_start, length
        total = self._body_start + self._length
        if len(buf) < total:
            return False
        body = bytes(buf[self._body_start : total])
        head = self._head
        self._head = None
        del buf[:total]
        out.append(head.build(body))
        return True


# -- responses -------------------------------------------------------------------------------
_DIALOG_METHODS = frozenset({"INVITE", "SUBSCRIBE", "REFER", "NOTIFY"})


def make_response(
    request: Request,
    status: int,
    reason: str | None = None,
    *,
    to_tag: str | None = None,
    headers: list[tuple[str, str]] | None = None,
    body: bytes = b"",
    content_type: str | None = None,
) -> Response:
    """Build a response to ``request`` as a UAS does (RFC 3261 8.2.6.2).

    Copies every Via (in order), From, To, Call-ID and CSeq. When the To has no tag, one is
    added -- ``to_tag`` or a fresh :func:`new_tag` -- except on 100 Trying, which never gets a
    tag. 100 Trying also copies Timestamp (8.2.6.1). A dialog-creating response (101-299 to
    INVITE/SUBSCRIBE/REFER/NOTIFY) copies Record-Route (12.1.1) unless ``headers`` supplies it.
    ``headers`` are appended; ``content_type`` sets Content-Type.
    """
    h = Headers()
    for name, value in request.headers.items():
        if name == "Via":
            h.add(name, value)
    h.set("From", request._require("From"))
    to_value = request._require("To")
    if status != 100 and NameAddr.parse(to_value).tag is None:
        # Appending ";tag=" keeps the request's To text (works for name-addr and addr-spec:
        # after an addr-spec, ';' starts header parameters, RFC 3261 20).
        to_value = f"{to_value};tag={to_tag or new_tag()}"
    h.set("To", to_value)
    h.set("Call-ID", request._require("Call-ID"))
    h.set("CSeq", request._require("CSeq"))
    extra = headers or []
    if status == 100 and "Timestamp" in request.headers:
        h.set("Timestamp", request.headers.get("Timestamp") or "")
    if (
        100 < status < 300
        and request.method in _DIALOG_METHODS
        and not any(canonical_name(n) == "Record-Route" for n, _ in extra)
    ):
        for name, value in request.headers.items():
            if name == "Record-Route":
                h.add(name, value)
    for name, value in extra:
        h.add(name, value)
    if content_type is not None:
        h.set("Content-Type", content_type)
    return Response(status, reason, h, body)

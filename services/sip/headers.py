"""Header fields: the ordered multi-map and the structured values Via and CSeq (RFC 3261 7.3, 20).

Values are stored as text and parsed into structured objects only when asked (``Via.parse``,
``CSeq.parse``, ``NameAddr.parse``), so a proxy pays only for the headers it touches.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from .errors import SipParseError
from .uri import NameAddr, format_host, format_params, is_token, parse_host, parse_params, split_quoted

__all__ = [
    "COMPACT_FORMS",
    "LIST_HEADERS",
    "CSeq",
    "Headers",
    "NameAddr",
    "Via",
    "canonical_name",
    "split_list",
]

# RFC 3261 7.3.3 and the IANA registry: compact form -> full name.
COMPACT_FORMS: dict[str, str] = {
    "v": "Via",
    "f": "From",
    "t": "To",
    "i": "Call-ID",
    "m": "Contact",
    "l": "Content-Length",
    "c": "Content-Type",
    "k": "Supported",
    "s": "Subject",
    "e": "Content-Encoding",
    "o": "Event",  # RFC 6665
    "u": "Allow-Events",  # RFC 6665
    "r": "Refer-To",  # RFC 3515
    "b": "Referred-By",  # RFC 3892
    "x": "Session-Expires",  # RFC 4028
    "a": "Accept-Contact",  # RFC 3841
    "j": "Reject-Contact",  # RFC 3841
    "d": "Request-Disposition",  # RFC 3841
    "y": "Identity",  # RFC 8224
}

_CANONICAL_LIST = [
    "Accept", "Accept-Contact", "Accept-Encoding", "Accept-Language", "Alert-Info", "Allow",
    "Allow-Events", "Authentication-Info", "Authorization", "Call-ID", "Call-Info", "Contact",
    "Content-Disposition", "Content-Encoding", "Content-ID", "Content-Language", "Content-Length",
    "Content-Type", "CSeq", "Date", "Diversion", "Error-Info", "Event", "Expires", "From",
    "History-Info", "Identity", "In-Reply-To", "Info-Package", "Max-Forwards", "MIME-Version",
    "Min-Expires", "Min-SE", "Organization", "P-Asserted-Identity", "P-Preferred-Identity", "Path",
    "Priority", "Privacy", "Proxy-Authenticate", "Proxy-Authorization", "Proxy-Require", "RAck",
    "Reason", "Record-Route", "Recv-Info", "Refer-To", "Referred-By", "Reject-Contact", "Replaces",
    "Reply-To", "Request-Disposition", "Require", "Retry-After", "Route", "RSeq", "Security-Client",
    "Security-Server", "Security-Verify", "Server", "Service-Route", "Session-Expires", "SIP-ETag",
    "SIP-If-Match", "Subject", "Subscription-State", "Supported", "Target-Dialog", "Timestamp", "To",
    "Unsupported", "User-Agent", "Via", "Warning", "WWW-Authenticate",
]  # fmt: skip
_CANONICAL: dict[str, str] = {name.lower(): name for name in _CANONICAL_LIST}
_CANONICAL.update(COMPACT_FORMS)

# Headers whose grammar is a comma-separated list (RFC 3261 7.3.1: such values may be combined
# into one line or split over several; both mean the same).
LIST_HEADERS: frozenset[str] = frozenset(
    n.lower()
    for n in (
        "Via", "Route", "Record-Route", "Contact", "Allow", "Supported", "Require", "Proxy-Require",
        "Unsupported", "Accept", "Accept-Encoding", "Accept-Language", "Allow-Events",
        "Content-Encoding", "Content-Language", "In-Reply-To", "Alert-Info", "Call-Info",
        "Error-Info", "Warning", "Path", "Service-Route", "Reason", "History-Info",
        "P-Asserted-Identity", "P-Preferred-Identity", "Accept-Contact", "Reject-Contact",
        "Security-Client", "Security-Server", "Security-Verify", "Diversion", "Recv-Info",
    )
)  # fmt: skip


def canonical_name(name: str) -> str:
    """The canonical spelling of a header name: compact forms expanded, known names re-cased
    ("cseq" -> "CSeq", "v" -> "Via"); unknown names are returned as given."""
    return _CANONICAL.get(name.lower(), name)


def split_list(value: str) -> list[str]:
    """Split a list header value on commas outside quoted strings and ``<...>``; empty elements
    are dropped (RFC 3261 7.3.1)."""
    return [p for p in (s.strip(" \t") for s in split_quoted(value, ",")) if p]


class Headers:
    """Ordered, case-insensitive multi-map of header fields.

    Names are stored canonically (compact forms expanded), entries keep their order and their
    original line grouping (``items()``); ``get_all`` splits comma-separated list headers.
    """

    __slots__ = ("_items",)

    def __init__(self, items: Iterable[tuple[str, str]] | None = None) -> None:
        self._items: list[tuple[str, str]] = []
        if items is not None:
            for name, value in items:
                self.add(name, value)

    @staticmethod
    def _check(name: str, value: str) -> None:
        # Local misuse, not a protocol error: a CR/LF in a value would inject header lines.
        if not is_token(name):
            raise ValueError(f"invalid header name {name!r}")
        if "\r" in value or "\n" in value:
            raise ValueError(f"header {name} value must not contain CR or LF")

    def get(self, name: str) -> str | None:
        """The first value (the first list element for list headers), or None."""
        key = canonical_name(name).lower()
        for n, v in self._items:
            if n.lower() == key:
                if key in LIST_HEADERS:
                    values = split_list(v)
                    if not values:
                        continue
                    return values[0]
                return v
        return None

    def get_all(self, name: str) -> list[str]:
        """Every value in order; comma-separated list headers are split into elements."""
        key = canonical_name(name).lower()
        out: list[str] = []
        for n, v in self._items:
            if n.lower() == key:
                if key in LIST_HEADERS:
                    out.extend(split_list(v))
                else:
                    out.append(v)
        return out

    def count(self, name: str) -> int:
        """Number of header lines (entries) with this name."""
        key = canonical_name(name).lower()
        return sum(1 for n, _ in self._items if n.lower() == key)

    def set(self, name: str, value: str) -> None:
        """Replace every value of ``name`` with ``value`` (at the first one's position)."""
        name = canonical_name(name)
        self._check(name, value)
        key = name.lower()
        index = next((i for i, (n, _) in enumerate(self._items) if n.lower() == key), len(self._items))
        self._items = [(n, v) for n, v in self._items if n.lower() != key]
        self._items.insert(min(index, len(self._items)), (name, value))

    def add(self, name: str, value: str, *, first: bool = False) -> None:
        """Append a value (or prepend it before every other header when ``first``)."""
        name = canonical_name(name)
        self._check(name, value)
        if first:
            self._items.insert(0, (name, value))
        else:
            self._items.append((name, value))

    def remove(self, name: str) -> int:
        """Remove every value of ``name``; returns how many lines were removed."""
        key = canonical_name(name).lower()
        before = len(self._items)
        self._items = [(n, v) for n, v in self._items if n.lower() != key]
        return before - len(self._items)

    def pop_first(self, name: str) -> str | None:
        """Remove and return the first value (list element) of ``name``, e.g. a proxy's own top
        Via (RFC 3261 16.7 step 3) or a loose-route Route (16.4); None when absent."""
        key = canonical_name(name).lower()
        for i, (n, v) in enumerate(self._items):
            if n.lower() != key:
                continue
            if key not in LIST_HEADERS:
                del self._items[i]
                return v
            values = split_list(v)
            if not values:
                del self._items[i]
                continue
            if len(values) == 1:
                del self._items[i]
            else:
                self._items[i] = (n, ", ".join(values[1:]))
            return values[0]
        return None

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        key = canonical_name(name).lower()
        return any(n.lower() == key for n, _ in self._items)

    def items(self) -> list[tuple[str, str]]:
        """Every header line as ``(canonical name, value)``, in order."""
        return list(self._items)

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(list(self._items))

    def __len__(self) -> int:
        return len(self._items)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Headers):
            return NotImplemented
        return self._items == other._items

    __hash__ = None  # type: ignore[assignment]

    def copy(self) -> Headers:
        """An independent copy."""
        new = Headers()
        new._items = list(self._items)
        return new

    def __repr__(self) -> str:
        return f"Headers({self._items!r})"


_SENT_PROTOCOL_RE = re.compile(
    r"[ \t]*([A-Za-z0-9\-.!%*_+`'~]+)[ \t]*/[ \t]*([A-Za-z0-9\-.!%*_+`'~]+)[ \t]*/[ \t]*"
    r"([A-Za-z0-9\-.!%*_+`'~]+)[ \t]+(.*)",
    re.DOTALL,
)


@dataclass
class Via:
    """One Via value (RFC 3261 20.42): ``SIP/2.0/UDP host:port;branch=z9hG4bK...``.

    ``transport`` is upper-cased; ``host`` has no IPv6 brackets; parameter names lower-cased.
    """

    transport: str
    host: str
    port: int | None = None
    params: dict[str, str | None] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> Via:
        """Parse one via-parm; LWS around ``/``, ``:``, ``;`` and ``=`` is allowed (RFC 3261 25.1)."""
        m = _SENT_PROTOCOL_RE.fullmatch(text)
        if m is None:
            raise SipParseError(f"Malformed Via header: {text.strip()[:60]!r}")
        name, version, transport, rest = m.groups()
        if name.upper() != "SIP" or version != "2.0":
            raise SipParseError(f"Unsupported protocol in Via: {name}/{version}")
        sent_by, semi, param_text = rest.partition(";")
        host, port = parse_host(sent_by, "Via")
        params = parse_params(semi + param_text, what="Via")
        return cls(transport.upper(), host, port, params)

    def __str__(self) -> str:
        return f"SIP/2.0/{self.transport} {format_host(self.host, self.port)}{format_params(self.params)}"

    @property
    def branch(self) -> str | None:
        """The ``branch`` parameter (RFC 3261 8.1.1.7), or None."""
        return self.params.get("branch")

    @property
    def received(self) -> str | None:
        """The ``received`` parameter (RFC 3261 18.2.1), or None."""
        return self.params.get("received")

    @property
    def rport(self) -> int | str | None:
        """RFC 3581: None when absent, ``''`` when present without a value, else the port number."""
        if "rport" not in self.params:
            return None
        value = self.params["rport"]
        if value is None or value == "":
            return ""
        return int(value) if value.isdigit() else value

    @property
    def sent_by(self) -> tuple[str, int | None]:
        """``(host, port)`` as written in the sent-by."""
        return self.host, self.port

    def copy(self) -> Via:
        """A deep copy."""
        return Via(self.transport, self.host, self.port, dict(self.params))


_CSEQ_RE = re.compile(r"[ \t]*([0-9]+)[ \t]+([A-Za-z0-9\-.!%*_+`'~]+)[ \t]*")


@dataclass
class CSeq:
    """The CSeq value (RFC 3261 20.16): a sequence number below 2**31 and a method."""

    seq: int
    method: str

    @classmethod
    def parse(cls, text: str) -> CSeq:
        """Parse ``"<number> <method>"``."""
        m = _CSEQ_RE.fullmatch(text)
        if m is None:
            raise SipParseError(f"Malformed CSeq header: {text.strip()[:40]!r}")
        number, method = m.groups()
        # RFC 3261 8.1.1.5: the sequence number MUST be expressible as a 32-bit unsigned integer
        # and less than 2**31.
        if len(number) > 10 or int(number) >= 2**31:
            raise SipParseError("CSeq number out of range")
        return cls(int(number), method)

    def __str__(self) -> str:
        return f"{self.seq} {self.method}"

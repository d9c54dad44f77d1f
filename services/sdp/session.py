"""SDP session descriptions (RFC 4566): a sans-I/O parser and serializer.

``SessionDescription.parse()`` turns bytes into dataclasses and raises :class:`SdpParseError` (a
``ValueError``) naming the first defect; ``to_bytes()`` writes them back in the RFC 4566 section 5
field order with CRLF line ends. The model keeps every line it understands (attributes in order,
bandwidth, timing), so ``parse(x).to_bytes()`` is stable: parsing it again gives an equal object.

Leniency, chosen for interoperability with real phones:
- LF line ends are accepted as well as CRLF, blank lines are skipped;
- a missing ``t=`` line is taken as ``t=0 0`` (some SIP phones omit it) and written back;
- ``s=`` may be empty or a single space (RFC 4566 asks for ``s=-``; many stacks send ``s= ``).
Everything else that RFC 4566 forbids is a parse error: unknown type letters (section 5: a parser
must reject a description with a type letter it does not understand), a missing ``v=0``/``o=``/``s=``,
malformed ``o=``/``c=``/``m=``/``b=``/``t=``/``rtpmap``/``fmtp`` lines, a media section without any
``c=`` (section 5.7), payload types out of 0..127 or ports out of 0..65535, NUL/CR inside a line.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field

__all__ = [
    "DIRECTIONS",
    "STATIC_PAYLOAD_TYPES",
    "Media",
    "Origin",
    "SdpParseError",
    "SessionDescription",
    "TimeDescription",
    "audio_media",
    "new_session",
]

#: The four direction attributes of RFC 4566 section 6 / RFC 3264 section 5.1.
DIRECTIONS = ("sendrecv", "sendonly", "recvonly", "inactive")

#: Static audio payload types of RFC 3551 table 4: pt -> (encoding name, clock rate, channels).
STATIC_PAYLOAD_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("PCMU", 8000, 1),
    3: ("GSM", 8000, 1),
    4: ("G723", 8000, 1),
    5: ("DVI4", 8000, 1),
    6: ("DVI4", 16000, 1),
    7: ("LPC", 8000, 1),
    8: ("PCMA", 8000, 1),
    9: ("G722", 8000, 1),  # RFC 3551 4.5.2: the RTP clock is 8000 although G.722 samples at 16 kHz
    10: ("L16", 44100, 2),
    11: ("L16", 44100, 1),
    12: ("QCELP", 8000, 1),
    13: ("CN", 8000, 1),
    14: ("MPA", 90000, 1),
    15: ("G728", 8000, 1),
    16: ("DVI4", 11025, 1),
    17: ("DVI4", 22050, 1),
    18: ("G729", 8000, 1),
}

# RFC 4566 section 9: token = 1*(token-char), token-char excludes spaces, controls and separators.
_TOKEN = re.compile(r"[!#$%&'*+\-.0-9A-Z^_`a-z{|}~]+")
_INT = re.compile(r"[0-9]+")
_SESSION_TYPES = frozenset("vosiuepcbtrzka")
_MEDIA_TYPES = frozenset("icbka")


class SdpParseError(ValueError):
    """The remote side sent a malformed session description; the message names the defect."""


@dataclass
class Origin:
    """The ``o=`` line (RFC 4566 section 5.2)."""

    username: str
    session_id: str
    version: int
    nettype: str = "IN"
    addrtype: str = "IP4"
    address: str = "127.0.0.1"

    def to_line(self) -> str:
        return (
            f"{self.username} {self.session_id} {self.version} {self.nettype} {self.addrtype} {self.address}"
        )


@dataclass
class TimeDescription:
    """One ``t=`` line with its ``r=`` repeat lines (RFC 4566 sections 5.9, 5.10), kept verbatim."""

    start: int = 0
    stop: int = 0
    repeats: list[str] = field(default_factory=list)


def _direction_of(attributes: Iterable[tuple[str, str | None]]) -> str | None:
    found = None
    for name, value in attributes:
        if value is None and name in DIRECTIONS:
            found = name  # the last one wins if a (broken) peer sends several
    return found


@dataclass
class Media:
    """One media description: the ``m=`` line and the lines after it (RFC 4566 section 5.14)."""

    media: str
    port: int
    proto: str
    formats: list[int]
    connection: str | None = None
    attributes: list[tuple[str, str | None]] = field(default_factory=list)
    #: ``m=audio 49170/2 ...``: the number of ports (1 when absent).
    port_count: int = 1
    #: non-numeric formats of non-RTP protocols (``m=image 9 udptl t38``), written after ``formats``.
    format_names: list[str] = field(default_factory=list)
    information: str | None = None
    bandwidth: list[tuple[str, int]] = field(default_factory=list)
    key: str | None = None

    # -- attributes -----------------------------------------------------------------------------
    def attribute(self, name: str) -> str | None:
        """The value of the first ``a=name:value``; None when absent or a flag (``a=sendrecv``)."""
        for n, v in self.attributes:
            if n == name:
                return v
        return None

    def attribute_values(self, name: str) -> list[str | None]:
        """Every value of ``a=name`` in order (None for flag occurrences)."""
        return [v for n, v in self.attributes if n == name]

    def has_attribute(self, name: str) -> bool:
        return any(n == name for n, _ in self.attributes)

    def set_attribute(self, name: str, value: str | None) -> None:
        """Replace every ``a=name`` by one (in place of the first), or append it."""
        index = next((i for i, (n, _) in enumerate(self.attributes) if n == name), None)
        self.attributes = [(n, v) for n, v in self.attributes if n != name]
        self.attributes.insert(len(self.attributes) if index is None else index, (name, value))

    def remove_attribute(self, name: str) -> None:
        self.attributes = [(n, v) for n, v in self.attributes if n != name]

    # -- payload types --------------------------------------------------------------------------
    def _rtpmap_entries(self) -> dict[int, tuple[str, int, int]]:
        entries: dict[int, tuple[str, int, int]] = {}
        for name, value in self.attributes:
            if name == "rtpmap" and value is not None:
                pt, encoding, rate, channels = _parse_rtpmap(value)
                entries.setdefault(pt, (encoding, rate, channels))
        for pt in self.formats:
            if pt not in entries and pt in STATIC_PAYLOAD_TYPES:
                entries[pt] = STATIC_PAYLOAD_TYPES[pt]
        return entries

    @property
    def rtpmap(self) -> dict[int, str]:
        """Payload type -> encoding name, with the RFC 3551 static types filled in."""
        return {pt: enc for pt, (enc, _, _) in self._rtpmap_entries().items()}

    def clock_rate(self, pt: int) -> int | None:
        """The RTP clock rate of payload type ``pt`` (``a=rtpmap`` or static), None if unknown."""
        entry = self._rtpmap_entries().get(pt)
        return entry[1] if entry else None

    def channels(self, pt: int) -> int | None:
        entry = self._rtpmap_entries().get(pt)
        return entry[2] if entry else None

    def rtpmap_value(self, pt: int) -> str | None:
        """The ``a=rtpmap`` text after the payload type (``PCMU/8000``), static types included."""
        entry = self._rtpmap_entries().get(pt)
        if entry is None:
            return None
        enc, rate, ch = entry
        return f"{enc}/{rate}" + (f"/{ch}" if ch != 1 else "")

    @property
    def fmtp(self) -> dict[int, str]:
        """Payload type -> format parameters (``a=fmtp:101 0-16`` gives ``{101: "0-16"}``)."""
        out: dict[int, str] = {}
        for name, value in self.attributes:
            if name == "fmtp" and value is not None:
                pt_text, _, params = value.partition(" ")
                if _INT.fullmatch(pt_text) and len(pt_text) <= 3:
                    out.setdefault(int(pt_text), params.strip())
        return out

    @property
    def ptime(self) -> int | None:
        value = self.attribute("ptime")
        try:
            return int(value) if value is not None and len(value) < 10 else None
        except ValueError:
            return None

    # -- direction, label -----------------------------------------------------------------------
    @property
    def explicit_direction(self) -> str | None:
        """The direction attribute on this m-line, None if it has none (then the session's applies)."""
        return _direction_of(self.attributes)

    @property
    def direction(self) -> str:
        """This m-line's direction attribute, ``sendrecv`` when absent (RFC 3264 section 5.1).

        Use :meth:`SessionDescription.media_direction` to honour a session-level attribute.
        """
        return self.explicit_direction or "sendrecv"

    def set_direction(self, direction: str) -> None:
        """Replace the direction attributes by ``direction`` (kept where the first one was)."""
        if direction not in DIRECTIONS:
            raise ValueError(f"unknown direction {direction!r}; expected one of {', '.join(DIRECTIONS)}")
        index = next((i for i, (n, v) in enumerate(self.attributes) if v is None and n in DIRECTIONS), None)
        self.attributes = [(n, v) for n, v in self.attributes if not (v is None and n in DIRECTIONS)]
        self.attributes.insert(len(self.attributes) if index is None else index, (direction, None))

    @property
    def label(self) -> str | None:
        """``a=label`` (RFC 4574)."""
        return self.attribute("label")

    # -- serialization --------------------------------------------------------------------------
    def _lines(self) -> list[str]:
        port = f"{self.port}/{self.port_count}" if self.port_count != 1 else str(self.port)
        fmts = [str(f) for f in self.formats] + list(self.format_names)
        lines = ["m=" + " ".join([self.media, port, self.proto, *fmts])]
        if self.information is not None:
            lines.append(f"i={self.information}")
        if self.connection is not None:
            lines.append("c=" + _connection_line(self.connection))
        lines.extend(f"b={t}:{v}" for t, v in self.bandwidth)
        if self.key is not None:
            lines.append(f"k={self.key}")
        lines.extend(_attribute_line(n, v) for n, v in self.attributes)
        return lines


@dataclass
class SessionDescription:
    """A whole session description (RFC 4566 section 5)."""

    origin: Origin
    name: str = "-"
    connection: str | None = None
    attributes: list[tuple[str, str | None]] = field(default_factory=list)
    media: list[Media] = field(default_factory=list)
    information: str | None = None
    uri: str | None = None
    emails: list[str] = field(default_factory=list)
    phones: list[str] = field(default_factory=list)
    bandwidth: list[tuple[str, int]] = field(default_factory=list)
    times: list[TimeDescription] = field(default_factory=lambda: [TimeDescription()])
    zone: str | None = None
    key: str | None = None

    @classmethod
    def parse(cls, data: bytes | str) -> SessionDescription:
        """Parse a session description; :class:`SdpParseError` names the first defect."""
        return _Parser(data).parse()

    def to_bytes(self) -> bytes:
        lines = ["v=0", "o=" + self.origin.to_line(), f"s={self.name}"]
        if self.information is not None:
            lines.append(f"i={self.information}")
        if self.uri is not None:
            lines.append(f"u={self.uri}")
        lines.extend(f"e={e}" for e in self.emails)
        lines.extend(f"p={p}" for p in self.phones)
        if self.connection is not None:
            lines.append("c=" + _connection_line(self.connection))
        lines.extend(f"b={t}:{v}" for t, v in self.bandwidth)
        for t in self.times or [TimeDescription()]:
            lines.append(f"t={t.start} {t.stop}")
            lines.extend(f"r={r}" for r in t.repeats)
        if self.zone is not None:
            lines.append(f"z={self.zone}")
        if self.key is not None:
            lines.append(f"k={self.key}")
        lines.extend(_attribute_line(n, v) for n, v in self.attributes)
        for m in self.media:
            lines.extend(m._lines())
        return ("\r\n".join(lines) + "\r\n").encode("utf-8")

    def __bytes__(self) -> bytes:
        return self.to_bytes()

    # -- queries --------------------------------------------------------------------------------
    def attribute(self, name: str) -> str | None:
        """The value of the first session-level ``a=name``; None when absent or a flag."""
        for n, v in self.attributes:
            if n == name:
                return v
        return None

    @property
    def direction(self) -> str:
        """The session-level direction attribute, ``sendrecv`` when absent."""
        return _direction_of(self.attributes) or "sendrecv"

    def media_direction(self, index: int) -> str:
        """Effective direction of m-line ``index``: its own attribute, else the session's (RFC 4566 6)."""
        media = self.media[index]
        return media.explicit_direction or self.direction

    def media_address(self, index: int) -> tuple[str, int]:
        """Effective connection address (m-line ``c=``, else session ``c=``) and port of m-line ``index``.

        A multicast ``/ttl`` suffix is dropped. ValueError if neither level has a ``c=`` line.
        """
        media = self.media[index]
        connection = media.connection if media.connection is not None else self.connection
        if connection is None:
            raise ValueError(f"m-line {index} has no connection address and the session has none")
        return connection.split("/", 1)[0], media.port

    def find_media(self, *, label: str | None = None, media: str | None = None) -> int | None:
        """Index of the first m-line with this ``a=label`` and/or media type, None if there is none."""
        for i, m in enumerate(self.media):
            if (label is None or m.label == label) and (media is None or m.media == media):
                return i
        return None

    def bump_version(self) -> None:
        """Increment the ``o=`` version, as a changed offer must (RFC 3264 section 8)."""
        self.origin.version += 1


def new_session(
    address: str, *, username: str = "callvault", session_id: str | None = None
) -> SessionDescription:
    """A fresh description with ``o=`` and session-level ``c=`` on ``address`` and no m-lines yet.

    ``session_id`` defaults to a random 63-bit number; the version starts equal to it when numeric
    (the common convention, RFC 4566 section 5.2 suggests NTP timestamps for both).
    """
    if session_id is None:
        session_id = str(secrets.randbits(62) + 1)
    version = int(session_id) if _INT.fullmatch(session_id) else 0
    addrtype = "IP6" if ":" in address else "IP4"
    return SessionDescription(
        origin=Origin(username, session_id, version, "IN", addrtype, address),
        name="-",
        connection=address,
    )


def audio_media(
    port: int,
    formats: Iterable[int],
    *,
    rtpmap: dict[int, str] | None = None,
    fmtp: dict[int, str] | None = None,
    connection: str | None = None,
    direction: str | None = None,
    label: str | None = None,
    ptime: int | None = None,
    proto: str = "RTP/AVP",
) -> Media:
    """Build an ``m=audio`` line with ``a=rtpmap`` for every payload type.

    ``rtpmap`` maps dynamic (or overriding) payload types to their rtpmap text (``"telephone-event/8000"``);
    static types get ``PCMU/8000`` etc. from the RFC 3551 table. ValueError for an unknown dynamic type.
    """
    formats = list(formats)
    rtpmap = rtpmap or {}
    fmtp = fmtp or {}
    attributes: list[tuple[str, str | None]] = []
    for pt in formats:
        if pt in rtpmap:
            attributes.append(("rtpmap", f"{pt} {rtpmap[pt]}"))
        elif pt in STATIC_PAYLOAD_TYPES:
            enc, rate, ch = STATIC_PAYLOAD_TYPES[pt]
            attributes.append(("rtpmap", f"{pt} {enc}/{rate}" + (f"/{ch}" if ch != 1 else "")))
        else:
            raise ValueError(f"payload type {pt} is dynamic and has no rtpmap entry")
        if pt in fmtp:
            attributes.append(("fmtp", f"{pt} {fmtp[pt]}"))
    if ptime is not None:
        attributes.append(("ptime", str(ptime)))
    if label is not None:
        attributes.append(("label", label))
    media = Media("audio", port, proto, formats, connection, attributes)
    if direction is not None:
        media.set_direction(direction)
    return media


# -- helpers -------------------------------------------------------------------------------------


def _connection_line(address: str) -> str:
    addrtype = "IP6" if ":" in address.split("/", 1)[0] else "IP4"
    return f"IN {addrtype} {address}"


def _attribute_line(name: str, value: str | None) -> str:
    return f"a={name}" if value is None else f"a={name}:{value}"


def _parse_rtpmap(value: str) -> tuple[int, str, int, int]:
    """``"101 telephone-event/8000"`` -> (101, "telephone-event", 8000, 1) (RFC 4566 section 6)."""
    pt_text, _, rest = value.strip().partition(" ")
    pt = _number(pt_text, "a=rtpmap payload type", 127)
    parts = rest.strip().split("/")
    if len(parts) not in (2, 3) or not parts[0] or not _TOKEN.fullmatch(parts[0]):
        raise SdpParseError(f"a=rtpmap:{value[:60]} is not '<pt> <encoding>/<clock rate>[/<channels>]'")
    rate = _number(parts[1], "a=rtpmap clock rate")
    channels = _number(parts[2], "a=rtpmap channel count") if len(parts) == 3 else 1
    return pt, parts[0], rate, channels


class _Parser:
    def __init__(self, data: bytes | str) -> None:
        if isinstance(data, bytes | bytearray | memoryview):
            try:
                data = bytes(data).decode("utf-8")
            except UnicodeDecodeError as exc:
                raise SdpParseError(f"SDP is not valid UTF-8 (byte {exc.start})") from None
        elif not isinstance(data, str):
            raise TypeError(f"SDP must be bytes or str, not {type(data).__name__}")
        self.text = data
        self.session: SessionDescription | None = None
        self.media: Media | None = None

    def parse(self) -> SessionDescription:
        version_seen = False
        origin: Origin | None = None
        name: str | None = None
        session = SessionDescription(origin=Origin("-", "0", 0), times=[])
        for number, raw in enumerate(self.text.split("\n"), start=1):
            line = raw[:-1] if raw.endswith("\r") else raw
            if not line.strip():
                continue
            if "\r" in line or "\0" in line:
                raise SdpParseError(f"line {number} contains a CR or NUL character")
            if len(line) < 2 or line[1] != "=":
                raise SdpParseError(f"line {number} is not '<type>=<value>': {line[:40]!r}")
            kind, value = line[0], line[2:]
            if not version_seen:
                if kind != "v":
                    raise SdpParseError("SDP does not start with a v= line")
                if value != "0":
                    raise SdpParseError(f"unsupported SDP version v={value[:20]}")
                version_seen = True
                continue
            if self.media is not None:
                if kind not in _MEDIA_TYPES and kind != "m":
                    if kind in _SESSION_TYPES:
                        raise SdpParseError(f"{kind}= line inside a media section (line {number})")
                    raise SdpParseError(f"unknown SDP line type {kind!r} (line {number})")
            elif kind not in _SESSION_TYPES and kind != "m":
                raise SdpParseError(f"unknown SDP line type {kind!r} (line {number})")
            if kind == "v":
                raise SdpParseError("more than one v= line")
            elif kind == "o":
                if origin is not None:
                    raise SdpParseError("more than one o= line")
                origin = _parse_origin(value)
            elif kind == "s":
                if name is not None:
                    raise SdpParseError("more than one s= line")
                name = value
            elif kind == "m":
                self.media = _parse_media_line(value)
                session.media.append(self.media)
            elif kind == "i":
                target = self.media if self.media is not None else session
                if target.information is not None:
                    raise SdpParseError("more than one i= line in a section")
                target.information = value
            elif kind == "u":
                if session.uri is not None:
                    raise SdpParseError("more than one u= line")
                session.uri = value
            elif kind == "e":
                session.emails.append(value)
            elif kind == "p":
                session.phones.append(value)
            elif kind == "c":
                address = _parse_connection(value)
                target_c = self.media if self.media is not None else session
                if target_c.connection is not None:
                    raise SdpParseError("more than one c= line in a section")
                target_c.connection = address
            elif kind == "b":
                (self.media if self.media is not None else session).bandwidth.append(_parse_bandwidth(value))
            elif kind == "t":
                session.times.append(_parse_time(value))
            elif kind == "r":
                if not session.times:
                    raise SdpParseError("r= line before any t= line")
                session.times[-1].repeats.append(value)
            elif kind == "z":
                session.zone = value
            elif kind == "k":
                (self.media if self.media is not None else session).key = value
            elif kind == "a":
                (self.media if self.media is not None else session).attributes.append(_parse_attribute(value))
        if not version_seen:
            raise SdpParseError("SDP is empty" if not self.text.strip() else "SDP has no v= line")
        if origin is None:
            raise SdpParseError("o= line is missing")
        if name is None:
            raise SdpParseError("s= line is missing")
        session.origin = origin
        session.name = name
        if not session.times:
            session.times = [TimeDescription()]
        for index, media in enumerate(session.media):
            if media.connection is None and session.connection is None:
                raise SdpParseError(f"m-line {index} has no c= line and the session has none")
        return session


def _number(text: str, what: str, maximum: int | None = None) -> int:
    """A decimal field; at most 20 digits (64-bit NTP values) so int() can never refuse it."""
    if not _INT.fullmatch(text) or len(text) > 20:
        raise SdpParseError(f"{what} is not a number: {text[:30]!r}")
    number = int(text)
    if maximum is not None and number > maximum:
        raise SdpParseError(f"{what} {number} is out of range (0..{maximum})")
    return number


def _is_rtp(proto: str) -> bool:
    return "RTP/" in proto.upper()


def _parse_origin(value: str) -> Origin:
    parts = value.split(" ")
    if len(parts) != 6 or not all(parts):
        raise SdpParseError(f"o= line must have 6 fields separated by single spaces: {value[:60]!r}")
    username, session_id, version, nettype, addrtype, address = parts
    if not _INT.fullmatch(session_id):
        raise SdpParseError(f"o= session id is not numeric: {session_id[:30]!r}")
    number = _number(version, "o= session version")
    return Origin(username, session_id, number, nettype, addrtype, address)


def _parse_connection(value: str) -> str:
    parts = value.split(" ")
    if len(parts) != 3 or not all(parts):
        raise SdpParseError(f"c= line is not '<nettype> <addrtype> <address>': {value[:60]!r}")
    nettype, addrtype, address = parts
    if nettype != "IN":
        raise SdpParseError(f"c= network type {nettype[:20]!r} is not IN")
    if addrtype not in ("IP4", "IP6"):
        raise SdpParseError(f"c= address type {addrtype[:20]!r} is not IP4 or IP6")
    host, _, suffix = address.partition("/")
    if not host or (suffix and not all(_INT.fullmatch(s) for s in suffix.split("/"))):
        raise SdpParseError(f"c= address is malformed: {address[:60]!r}")
    if (addrtype == "IP6") != (":" in host):
        raise SdpParseError(f"c= address {host[:60]!r} does not match address type {addrtype}")
    return address


def _parse_bandwidth(value: str) -> tuple[str, int]:
    bwtype, sep, amount = value.partition(":")
    if not sep or not _TOKEN.fullmatch(bwtype):
        raise SdpParseError(f"b= line is not '<bwtype>:<bandwidth>': {value[:60]!r}")
    return bwtype, _number(amount, "b= bandwidth")


def _parse_time(value: str) -> TimeDescription:
    parts = value.split(" ")
    if len(parts) != 2:
        raise SdpParseError(f"t= line is not '<start> <stop>': {value[:60]!r}")
    return TimeDescription(_number(parts[0], "t= start time"), _number(parts[1], "t= stop time"))


def _parse_media_line(value: str) -> Media:
    parts = value.split(" ")
    if len(parts) < 2 or not parts[1]:
        raise SdpParseError("m= line has no port")
    if len(parts) < 3 or not parts[2]:
        raise SdpParseError("m= line has no transport protocol")
    media_type, port_text, proto, *fmts = parts
    if not _TOKEN.fullmatch(media_type):
        raise SdpParseError(f"m= media type is malformed: {media_type[:30]!r}")
    port_part, slash, count_part = port_text.partition("/")
    port = _number(port_part, "m= port", 65535)
    port_count = _number(count_part, "m= port count", 65535) if slash else 1
    if port_count < 1:
        raise SdpParseError("m= port count is 0")
    if not re.fullmatch(r"[!#$%&'*+\-.0-9A-Z^_`a-z{|}~/]+", proto):
        raise SdpParseError(f"m= transport protocol is malformed: {proto[:30]!r}")
    if any(not f for f in fmts):
        raise SdpParseError("m= line has an empty format (doubled or trailing space)")
    if not fmts and port != 0:
        raise SdpParseError("m= line has no formats")
    formats: list[int] = []
    names: list[str] = []
    if _is_rtp(proto):
        for f in fmts:
            formats.append(_number(f, "m= RTP payload type", 127))
    else:
        for f in fmts:
            if not _TOKEN.fullmatch(f):
                raise SdpParseError(f"m= line has a malformed format {f[:20]!r}")
            if _INT.fullmatch(f) and len(f) <= 3 and not names and str(int(f)) == f:
                formats.append(int(f))
            else:
                names.append(f)
    return Media(media_type, port, proto, formats, port_count=port_count, format_names=names)


def _parse_attribute(value: str) -> tuple[str, str | None]:
    name, sep, attr_value = value.partition(":")
    if not _TOKEN.fullmatch(name):
        raise SdpParseError(f"a= attribute name is malformed: {name[:30]!r}")
    if not sep:
        return name, None
    if name == "rtpmap":
        _parse_rtpmap(attr_value)
    elif name == "fmtp":
        fmt = attr_value.partition(" ")[0]
        if not _TOKEN.fullmatch(fmt):
            raise SdpParseError(f"a=fmtp has an invalid format {fmt[:20]!r}")
    elif name in DIRECTIONS:
        raise SdpParseError(f"a={name} takes no value")
    return name, attr_value

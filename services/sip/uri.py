"""SIP, SIPS and tel URIs (RFC 3261 19.1, RFC 3966) and name-addr values (RFC 3261 20.10).

Also holds the small lexical helpers (tokens, quoted strings, parameter lists) shared by
``headers.py``: they are the RFC 3261 25.1 grammar's building blocks.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from urllib.parse import unquote_to_bytes

from .errors import SipParseError

__all__ = [
    "NameAddr",
    "SipUri",
    "format_params",
    "is_token",
    "parse_params",
    "quote_string",
    "split_quoted",
]

# RFC 3261 25.1: token = 1*(alphanum / "-" / "." / "!" / "%" / "*" / "_" / "+" / "`" / "'" / "~")
TOKEN_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.!%*_+`'~")
_TOKEN_RE = re.compile(r"[A-Za-z0-9\-.!%*_+`'~]+")
_SCHEME_RE = re.compile(r"[A-Za-z][A-Za-z0-9+\-.]*")
_HOSTNAME_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9\-_.]*[A-Za-z0-9_])?\.?")
_DIGITS_RE = re.compile(r"[0-9]+")
# unreserved = alphanum / mark ; user-unreserved (RFC 3261 25.1); '#' is tolerated (star codes).
_ALNUM = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
_UNRESERVED = _ALNUM + "-_.!~*'()"
_USER_SAFE = frozenset(_UNRESERVED + "&=+$,;?/")
_USER_ALLOWED = _USER_SAFE | {"%", "#"}
_PASSWORD_SAFE = frozenset(_UNRESERVED + "&=+$,")
_PARAM_ALLOWED = frozenset(_UNRESERVED + "[]/:&+$%")
_HEADER_ALLOWED = frozenset(_UNRESERVED + "[]/?:+$%")
_TEL_ALLOWED = frozenset("0123456789ABCDEFabcdef*#+-.()pPwW")
_WS = " \t"


def is_token(text: str) -> bool:
    """True when ``text`` is a non-empty RFC 3261 token."""
    return _TOKEN_RE.fullmatch(text) is not None


def quote_string(text: str) -> str:
    """Return ``text`` as a quoted-string, escaping ``"`` and ``\\`` (RFC 3261 25.1 quoted-pair)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def read_quoted(text: str, start: int) -> tuple[str, int]:
    """Read the quoted-string beginning at ``text[start] == '"'``.

    Returns the unescaped content and the index just after the closing quote. A quoted-pair
    (backslash) escapes any character but CR and LF (RFC 3261 25.1).
    """
    out: list[str] = []
    i = start + 1
    n = len(text)
    while i < n:
        ch = text[i]
        if ch == '"':
            return "".join(out), i + 1
        if ch == "\\":
            if i + 1 >= n or text[i + 1] in "\r\n":
                break
            out.append(text[i + 1])
            i += 2
            continue
        if ch in "\r\n":
            break
        out.append(ch)
        i += 1
    raise SipParseError("Unterminated quoted string")


def split_quoted(text: str, sep: str, *, angle: bool = True) -> list[str]:
    """Split ``text`` on ``sep`` outside quoted strings (and outside ``<...>`` when ``angle``).

    Pieces are returned unstripped. An unterminated quote or bracket swallows the rest of the
    text into the last piece (the caller's parser then reports the defect).
    """
    pieces: list[str] = []
    depth = 0
    i = 0
    last = 0
    n = len(text)
    while i < n:
        ch = text[i]
        if ch == '"':
            i += 1
            while i < n and text[i] != '"':
                i += 2 if text[i] == "\\" else 1
        elif angle and ch == "<":
            depth += 1
        elif angle and ch == ">" and depth:
            depth -= 1
        elif ch == sep and depth == 0:
            pieces.append(text[last:i])
            last = i + 1
        i += 1
    pieces.append(text[last:])
    return pieces


def parse_params(text: str, *, what: str = "header") -> dict[str, str | None]:
    """Parse ``;name[=value]`` parameters (RFC 3261 25.1 generic-param), LWS tolerated.

    ``text`` must be empty or start with ``;`` (after optional whitespace). Names are lower-cased
    (parameter names are case-insensitive, RFC 3261 7.3.1); values are kept verbatim, quoted
    strings with their quotes so they serialize back unchanged.
    """
    params: dict[str, str | None] = {}
    rest = text.strip(_WS)
    if not rest:
        return params
    if rest[0] != ";":
        raise SipParseError(f"Unexpected text in {what}: {rest[:40]!r}")
    for piece in split_quoted(rest[1:], ";", angle=False):
        name, eq, value = piece.partition("=")
        name = name.strip(_WS)
        if not is_token(name):
            raise SipParseError(f"Malformed parameter in {what}: {piece.strip()[:40]!r}")
        if not eq:
            params[name.lower()] = None
            continue
        value = value.strip(_WS)
        if value.startswith('"'):
            _, end = read_quoted(value, 0)
            if end != len(value):
                raise SipParseError(f"Malformed parameter value in {what}: {value[:40]!r}")
        elif not value or not all(c in TOKEN_CHARS or c in "[]:" for c in value):
            # gen-value = token / host / quoted-string
            raise SipParseError(f"Malformed parameter value in {what}: {value[:40]!r}")
        params[name.lower()] = value
    return params


def format_params(params: dict[str, str | None]) -> str:
    """Serialize a parameter dict as ``;name=value;flag``."""
    return "".join(f";{k}" if v is None else f";{k}={v}" for k, v in params.items())


def _unescape(text: str, what: str) -> str:
    """Decode %HH escapes (RFC 3261 19.1.2); bytes that are not UTF-8 survive as surrogates."""
    if "%" in text and re.search(r"%(?![0-9A-Fa-f]{2})", text):
        raise SipParseError(f"Invalid escape in URI {what}")
    return unquote_to_bytes(text).decode("utf-8", "surrogateescape")


def _escape(text: str, safe: frozenset[str]) -> str:
    out: list[str] = []
    for ch in text:
        if ch in safe:
            out.append(ch)
        else:
            out.extend(f"%{b:02X}" for b in ch.encode("utf-8", "surrogateescape"))
    return "".join(out)


def parse_host(text: str, what: str = "URI") -> tuple[str, int | None]:
    """Parse ``host[:port]`` where host is a name, IPv4 or ``[IPv6]`` (RFC 3261 25.1 hostport).

    Returns the host without brackets and the port (or None). Whitespace around the colon is
    tolerated (Via's sent-by uses COLON = SWS ":" SWS).
    """
    text = text.strip(_WS)
    port_text: str | None = None
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise SipParseError(f"Unterminated IPv6 reference in {what}")
        host = text[1:end]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise SipParseError(f"Invalid IPv6 address in {what}: {host[:45]!r}") from None
        tail = text[end + 1 :].strip(_WS)
        if tail:
            if tail[0] != ":":
                raise SipParseError(f"Invalid host in {what}: {text[:60]!r}")
            port_text = tail[1:].strip(_WS)
    else:
        host, colon, port_part = text.partition(":")
        host = host.rstrip(_WS)
        if colon:
            port_text = port_part.strip(_WS)
        if not _HOSTNAME_RE.fullmatch(host):
            raise SipParseError(f"Invalid host in {what}: {host[:60]!r}")
    port: int | None = None
    if port_text is not None:
        if not _DIGITS_RE.fullmatch(port_text) or len(port_text) > 5 or int(port_text) > 65535:
            raise SipParseError(f"Invalid port in {what}: {port_text[:20]!r}")
        port = int(port_text)
    return host, port


def format_host(host: str, port: int | None = None) -> str:
    """``host[:port]``, bracketing IPv6 addresses (RFC 3261 25.1 IPv6reference)."""
    text = f"[{host}]" if ":" in host else host
    return text if port is None else f"{text}:{port}"


def _parse_uri_params(text: str, allowed: frozenset[str]) -> dict[str, str | None]:
    params: dict[str, str | None] = {}
    for piece in text.split(";"):
        name, eq, value = piece.partition("=")
        if not name or not all(c in allowed for c in name):
            raise SipParseError(f"Malformed URI parameter: {piece[:40]!r}")
        if eq and not all(c in allowed for c in value):
            raise SipParseError(f"Malformed URI parameter: {piece[:40]!r}")
        params[name.lower()] = value if eq else None
    return params


@dataclass
class SipUri:
    """A ``sip:``, ``sips:`` or ``tel:`` URI (RFC 3261 19.1.1, RFC 3966).

    ``user`` and ``password`` are stored unescaped (``%40`` -> ``@``) and re-escaped by
    ``__str__`` (RFC 3261 19.1.2: escaped and unescaped forms are equivalent); ``host`` is
    stored without IPv6 brackets; parameter names are lower-cased, values kept verbatim.
    For ``tel:`` URIs the number is in ``user`` and ``host`` is empty.
    """

    scheme: str
    user: str | None
    password: str | None
    host: str
    port: int | None = None
    params: dict[str, str | None] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> SipUri:
        """Parse a URI; raises ``SipParseError(416)`` for a scheme other than sip/sips/tel."""
        if any(c in text for c in ' \t\r\n<>"') or not text:
            raise SipParseError(f"Invalid URI: {text[:60]!r}")
        scheme, colon, rest = text.partition(":")
        if not colon or not _SCHEME_RE.fullmatch(scheme):
            raise SipParseError(f"Invalid URI: {text[:60]!r}")
        scheme = scheme.lower()
        if scheme == "tel":
            return cls._parse_tel(rest)
        if scheme not in ("sip", "sips"):
            # RFC 3261 8.2.2.1: 416 Unsupported URI Scheme
            raise SipParseError(f"Unsupported URI scheme: {scheme[:40]}", status=416)
        user: str | None = None
        password: str | None = None
        # The first '@' ends the userinfo: '@' may not appear unescaped in user or password.
        userinfo, at, hostpart = rest.partition("@")
        if not at:
            hostpart = rest
        else:
            user_text, pcolon, pass_text = userinfo.partition(":")
            if not user_text or not all(c in _USER_ALLOWED for c in user_text):
                raise SipParseError(f"Invalid user part in URI: {userinfo[:60]!r}")
            user = _unescape(user_text, "user part")
            if pcolon:
                if not all(c in _PASSWORD_SAFE or c == "%" for c in pass_text):
                    raise SipParseError("Invalid password in URI")
                password = _unescape(pass_text, "password")
        hostpart, qmark, header_text = hostpart.partition("?")
        hostport, semi, param_text = hostpart.partition(";")
        host, port = parse_host(hostport)
        params = _parse_uri_params(param_text, _PARAM_ALLOWED) if semi else {}
        headers: dict[str, str] = {}
        if qmark and header_text:
            for piece in header_text.split("&"):
                name, eq, value = piece.partition("=")
                if not name or not eq or not all(c in _HEADER_ALLOWED for c in name + value):
                    raise SipParseError(f"Malformed URI header: {piece[:40]!r}")
                headers[name] = value
        return cls(scheme, user, password, host, port, params, headers)

    @classmethod
    def _parse_tel(cls, rest: str) -> SipUri:
        # RFC 3966 3: telephone-subscriber = global-number / local-number, then ;params
        number, semi, param_text = rest.partition(";")
        if not number or not all(c in _TEL_ALLOWED for c in number):
            raise SipParseError(f"Invalid tel URI number: {number[:40]!r}")
        params = _parse_uri_params(param_text, _PARAM_ALLOWED) if semi else {}
        return cls("tel", number, None, "", None, params, {})

    def __str__(self) -> str:
        if self.scheme == "tel":
            return f"tel:{self.user or ''}{format_params(self.params)}"
        out = [self.scheme, ":"]
        if self.user is not None:
            out.append(_escape(self.user, _USER_SAFE))
            if self.password is not None:
                out.append(":" + _escape(self.password, _PASSWORD_SAFE))
            out.append("@")
        out.append(format_host(self.host, self.port))
        out.append(format_params(self.params))
        if self.headers:
            out.append("?" + "&".join(f"{k}={v}" for k, v in self.headers.items()))
        return "".join(out)

    @property
    def transport(self) -> str:
        """Lower-cased ``transport`` parameter; ``'udp'`` when absent (``'tls'`` is not implied)."""
        value = self.params.get("transport")
        return value.lower() if value else "udp"

    @property
    def secure(self) -> bool:
        """True for ``sips:`` URIs (RFC 3261 19.1.1)."""
        return self.scheme == "sips"

    @property
    def aor(self) -> str:
        """The address-of-record form ``scheme:user@host`` (no port, params or headers)."""
        if self.scheme == "tel":
            return f"tel:{self.user}"
        user = f"{_escape(self.user, _USER_SAFE)}@" if self.user is not None else ""
        return f"{self.scheme}:{user}{format_host(self.host.lower())}"

    def copy(self) -> SipUri:
        """A deep copy (parameter and header dicts are not shared)."""
        return SipUri(
            self.scheme, self.user, self.password, self.host, self.port, dict(self.params), dict(self.headers)
        )


@dataclass
class NameAddr:
    """A ``name-addr`` or ``addr-spec`` with header parameters (RFC 3261 20.10, 20.20, 20.39).

    Used for From, To, Contact, Route, Record-Route, Refer-To ... ``display`` is unquoted and
    unescaped; ``params`` are the header parameters (``tag``, ``expires``, ``q`` ...), names
    lower-cased, values verbatim. ``__str__`` always writes the ``<...>`` form.
    """

    display: str | None
    uri: SipUri
    params: dict[str, str | None] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> NameAddr:
        """Parse one value; a URI with an unsupported scheme raises ``SipParseError(416)``."""
        text = text.strip(_WS)
        display: str | None = None
        if text.startswith('"'):
            display, end = read_quoted(text, 0)
            rest = text[end:].lstrip(_WS)
            if not rest.startswith("<"):
                raise SipParseError("Quoted display name not followed by <URI>")
            return cls._angle(display, rest)
        lt = text.find("<")
        if lt >= 0:
            words = text[:lt].split()
            # RFC 3261 25.1: display-name = *(token LWS) / quoted-string
            if not all(is_token(w) for w in words):
                raise SipParseError(f"Invalid display name: {text[:lt].strip()[:60]!r}")
            display = " ".join(words) or None
            return cls._angle(display, text[lt:])
        # addr-spec: RFC 3261 20: a URI with ',', '?' or ';' must be in <>, so ';' starts
        # header parameters and '?' / ',' are errors.
        uri_text, semi, param_text = text.partition(";")
        uri_text = uri_text.rstrip(_WS)
        if not uri_text or any(c in uri_text for c in "?, \t"):
            raise SipParseError(f"Invalid addr-spec (URI must be enclosed in <>): {text[:60]!r}")
        params = parse_params(semi + param_text, what="address")
        return cls(None, SipUri.parse(uri_text), params)

    @classmethod
    def _angle(cls, display: str | None, text: str) -> NameAddr:
        end = text.find(">")
        if end < 0:
            raise SipParseError("Unterminated <URI>")
        uri_text = text[1:end]
        # LAQUOT / RAQUOT: no whitespace inside the brackets (RFC 4475 3.1.2.14)
        if not uri_text or uri_text != uri_text.strip(" \t"):
            raise SipParseError("Whitespace inside <URI>")
        params = parse_params(text[end + 1 :], what="address")
        return cls(display, SipUri.parse(uri_text), params)

    def __str__(self) -> str:
        name = f"{quote_string(self.display)} " if self.display else ""
        return f"{name}<{self.uri}>{format_params(self.params)}"

    @property
    def tag(self) -> str | None:
        """The ``tag`` parameter (RFC 3261 19.3), or None."""
        return self.params.get("tag")

    def copy(self) -> NameAddr:
        """A deep copy."""
        return NameAddr(self.display, self.uri.copy(), dict(self.params))

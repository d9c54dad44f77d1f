"""HTTP Digest authentication for SIP (RFC 3261 22.4, RFC 2617, RFC 7616; SHA-256 per RFC 8760).

Server side: :class:`DigestChallenger` issues ``WWW-Authenticate`` / ``Proxy-Authenticate`` values
and verifies ``Authorization`` / ``Proxy-Authorization`` values. Its nonces are stateless: a nonce
carries its creation time and a random salt, authenticated with an HMAC under a server secret, so any
process sharing the secret (a hot standby) can verify it and nothing is stored per challenge. A nonce
older than ``nonce_ttl`` is reported as *stale* (RFC 7616 3.3) when the response was otherwise right,
so a client retries with the new nonce without asking the user again.

Client side: :func:`build_authorization` answers a challenge (qop=auth, or the RFC 2069 form when
the challenge offers no qop).

Sans-I/O: ``now`` is passed in; nothing here reads a clock or touches the network.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass

__all__ = [
    "SUPPORTED_ALGORITHMS",
    "AuthResult",
    "DigestChallenger",
    "build_authorization",
    "digest_response",
    "parse_digest",
]

# RFC 7616 3.2 / RFC 8760 2.1: algorithm token -> hashlib name. "-sess" variants hash the
# session key (H(A1) with nonce and cnonce) instead of the plain A1 (RFC 7616 3.4.2).
_HASHES = {"MD5": "md5", "SHA-256": "sha256", "SHA-512-256": "sha512_256"}
SUPPORTED_ALGORITHMS = ("SHA-256", "SHA-256-sess", "MD5", "MD5-sess")

_NONCE_TS = struct.Struct(">Q")  # creation time, whole milliseconds
_SALT_LEN = 8
_MAC_LEN = 16
# A nonce from the future beyond this is forged or from a wildly skewed peer of the cluster.
_MAX_CLOCK_SKEW = 5.0


def _hash_name(algorithm: str) -> str:
    base = algorithm.upper().removesuffix("-SESS")
    try:
        return _HASHES[base]
    except KeyError:
        raise ValueError(f"unsupported digest algorithm {algorithm!r}") from None


def _h(hash_name: str, data: str) -> str:
    return hashlib.new(hash_name, data.encode("utf-8")).hexdigest()


def digest_response(
    *,
    algorithm: str,
    username: str,
    realm: str,
    password: str,
    method: str,
    uri: str,
    nonce: str,
    qop: str | None = None,
    nc: str | None = None,
    cnonce: str | None = None,
) -> str:
    """The ``response`` value of RFC 7616 3.4.1 (qop=auth) or RFC 2069 (no qop).

    ``auth-int`` is not supported (SIP bodies are rarely integrity-protected this way and the
    SIP core never offers it).
    """
    name = _hash_name(algorithm)
    ha1 = _h(name, f"{username}:{realm}:{password}")
    if algorithm.upper().endswith("-SESS"):
        # RFC 7616 3.4.2: A1 = H(user:realm:pass):nonce:cnonce for the -sess algorithms.
        ha1 = _h(name, f"{ha1}:{nonce}:{cnonce or ''}")
    ha2 = _h(name, f"{method}:{uri}")
    if qop is None:
        return _h(name, f"{ha1}:{nonce}:{ha2}")
    if qop.lower() != "auth":
        raise ValueError(f"unsupported qop {qop!r}")
    return _h(name, f"{ha1}:{nonce}:{nc}:{cnonce}:{qop}:{ha2}")


def parse_digest(value: str) -> dict[str, str]:
    """Parse a Digest challenge or credentials value into ``{lower-case name: value}``.

    The leading ``Digest`` scheme token is removed; quoted strings are unquoted (with ``\\``
    escapes, RFC 3261 25.1); commas inside quotes do not split. Raises ValueError when the scheme
    is not Digest or the value is malformed.
    """
    text = value.strip()
    scheme, _, rest = text.partition(" ")
    if scheme.lower() != "digest":
        raise ValueError(f"not a Digest value: {value[:40]!r}")
    params: dict[str, str] = {}
    i, n = 0, len(rest)
    while i < n:
        while i < n and rest[i] in " \t\r\n,":
            i += 1
        if i >= n:
            break
        eq = rest.find("=", i)
        if eq < 0:
            raise ValueError(f"Digest parameter without '=' near {rest[i : i + 20]!r}")
        name = rest[i:eq].strip().lower()
        if not name or any(c in name for c in ' \t",'):
            raise ValueError(f"bad Digest parameter name {name!r}")
        i = eq + 1
        while i < n and rest[i] in " \t":
            i += 1
        if i < n and rest[i] == '"':
            i += 1
            chars: list[str] = []
            while i < n and rest[i] != '"':
                if rest[i] == "\\" and i + 1 < n:
                    i += 1
                chars.append(rest[i])
                i += 1
            if i >= n:
                raise ValueError(f"unterminated quoted string in Digest parameter {name!r}")
            i += 1  # closing quote
            params[name] = "".join(chars)
        else:
            end = rest.find(",", i)
            if end < 0:
                end = n
            params[name] = rest[i:end].strip()
            i = end
    return params


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass(frozen=True, slots=True)
class AuthResult:
    """The outcome of :meth:`DigestChallenger.verify`.

    ``ok`` is True only for valid credentials on a fresh nonce. ``stale`` is True when the
    credentials were right but the nonce expired: challenge again with ``stale=True``.
    ``reason`` says what was wrong (for logs; never send it to the peer).
    """

    ok: bool
    username: str | None = None
    stale: bool = False
    reason: str = ""


class DigestChallenger:
    """Server side of Digest: issues challenges and verifies credentials with stateless nonces.

    Nonce = base64url(creation time ms | 8 random bytes | HMAC-SHA256(secret, time | salt | realm)
    truncated to 16 bytes). Verification recomputes the HMAC, so only this realm's secret can mint
    nonces, and the age comes from the nonce itself. Replays within the TTL are not detected (that
    would need per-nonce state, i.e. nonce-count tracking).
    """

    def __init__(
        self,
        realm: str,
        secret: bytes,
        *,
        algorithms: Iterable[str] = ("SHA-256", "MD5"),
        nonce_ttl: float = 300.0,
    ) -> None:
        if not secret:
            raise ValueError("DigestChallenger: the secret must not be empty")
        self.realm = realm
        self.algorithms = tuple(algorithms)
        if not self.algorithms:
            raise ValueError("DigestChallenger: at least one algorithm is needed")
        for algorithm in self.algorithms:
            _hash_name(algorithm)  # raises ValueError for an unknown one
        self.nonce_ttl = nonce_ttl
        self._secret = secret

    # -- nonces ---------------------------------------------------------------------------
    def _mac(self, head: bytes) -> bytes:
        return hmac.new(self._secret, head + self.realm.encode("utf-8"), hashlib.sha256).digest()[:_MAC_LEN]

    def make_nonce(self, now: float) -> str:
        """A fresh nonce stamped with ``now``."""
        head = _NONCE_TS.pack(max(0, int(now * 1000))) + secrets.token_bytes(_SALT_LEN)
        return base64.urlsafe_b64encode(head + self._mac(head)).decode("ascii").rstrip("=")

    def check_nonce(self, nonce: str, now: float) -> tuple[bool, bool]:
        """``(authentic, expired)`` for a nonce this challenger (or one with its secret) issued."""
        try:
            raw = base64.urlsafe_b64decode(nonce + "=" * (-len(nonce) % 4))
        except ValueError:
            return False, False
        if len(raw) != _NONCE_TS.size + _SALT_LEN + _MAC_LEN:
            return False, False
        head, mac = raw[:-_MAC_LEN], raw[-_MAC_LEN:]
        if not hmac.compare_digest(mac, self._mac(head)):
            return False, False
        created = _NONCE_TS.unpack_from(head)[0] / 1000.0
        if created > now + _MAX_CLOCK_SKEW:
            return False, False
        return True, now - created > self.nonce_ttl

    # -- challenges -----------------------------------------------------------------------
    def challenges(self, now: float, *, stale: bool = False) -> list[str]:
        """One ``WWW-Authenticate`` (or ``Proxy-Authenticate``) value per algorithm, preferred
        first (RFC 8760 2.4: the client picks the first one it supports)."""
        nonce = self.make_nonce(now)
        values = []
        for algorithm in self.algorithms:
            value = f'Digest realm={_quote(self.realm)}, nonce="{nonce}", algorithm={algorithm}, qop="auth"'
            if stale:
                value += ", stale=true"
            values.append(value)
        return values

    def verify(
        self,
        header_value: str,
        method: str,
        password_lookup: Callable[[str], str | None],
        now: float,
    ) -> AuthResult:
        """Check an ``Authorization`` value for a request of ``method``.

        ``password_lookup(username)`` returns the clear-text password or None for an unknown user.
        The ``uri`` parameter is not compared with the Request-URI here (a proxy may have rewritten
        it); a caller that cares compares ``parse_digest(header_value)["uri"]`` itself.
        """
        try:
            params = parse_digest(header_value)
        except ValueError as exc:
            return AuthResult(False, reason=f"malformed credentials: {exc}")
        username = params.get("username")
        if not username:
            return AuthResult(False, reason="username is missing")
        for name in ("realm", "nonce", "uri", "response"):
            if name not in params:
                return AuthResult(False, username, reason=f"{name} is missing")
        if params["realm"] != self.realm:
            return AuthResult(False, username, reason=f"wrong realm {params['realm']!r}")
        algorithm = params.get("algorithm", "MD5")  # RFC 7616 3.3: absent means MD5
        offered = {a.upper(): a for a in self.algorithms}
        if algorithm.upper() not in offered:
            return AuthResult(False, username, reason=f"algorithm {algorithm!r} not offered")
        algorithm = offered[algorithm.upper()]
        qop = params.get("qop")
        if qop is None or qop.lower() != "auth":
            # RFC 7616 3.4: qop is mandatory; we only ever offer auth.
            return AuthResult(False, username, reason=f"qop must be auth, got {qop!r}")
        nc, cnonce = params.get("nc"), params.get("cnonce")
        if not nc or not cnonce:
            return AuthResult(False, username, reason="nc and cnonce are required with qop=auth")
        authentic, expired = self.check_nonce(params["nonce"], now)
        if not authentic:
            return AuthResult(False, username, reason="nonce was not issued by this realm")
        password = password_lookup(username)
        if password is None:
            return AuthResult(False, username, reason="unknown user")
        expected = digest_response(
            algorithm=algorithm,
            username=username,
            realm=self.realm,
            password=password,
            method=method,
            uri=params["uri"],
            nonce=params["nonce"],
            qop="auth",
            nc=nc,
            cnonce=cnonce,
        )
        # Constant-time comparison, so the response cannot be guessed byte by byte.
        if not hmac.compare_digest(
            expected.encode("ascii"), params["response"].lower().encode("ascii", "replace")
        ):
            return AuthResult(False, username, reason="wrong response (bad password?)")
        if expired:
            # RFC 7616 3.3: stale only when the response was valid for the old nonce.
            return AuthResult(False, username, stale=True, reason="nonce expired")
        return AuthResult(True, username)


def build_authorization(
    challenge: str,
    *,
    method: str,
    uri: str,
    username: str,
    password: str,
    cnonce: str | None = None,
    nc: int = 1,
) -> str:
    """Answer one ``WWW-Authenticate`` / ``Proxy-Authenticate`` value (client side).

    Uses qop=auth when the challenge offers it (a fresh random cnonce unless given), the RFC 2069
    form otherwise. Raises ValueError for a challenge that is not Digest or uses an unsupported
    algorithm.
    """
    params = parse_digest(challenge)
    realm, nonce = params.get("realm"), params.get("nonce")
    if realm is None or nonce is None:
        raise ValueError("Digest challenge without realm or nonce")
    algorithm = params.get("algorithm", "MD5")
    qops = [q.strip().lower() for q in params.get("qop", "").split(",") if q.strip()]
    qop = "auth" if "auth" in qops else None
    if qops and qop is None:
        raise ValueError(f"Digest challenge offers only unsupported qop {params['qop']!r}")
    nc_text = f"{nc:08x}"
    if qop is not None and cnonce is None:
        cnonce = secrets.token_hex(16)
    response = digest_response(
        algorithm=algorithm,
        username=username,
        realm=realm,
        password=password,
        method=method,
        uri=uri,
        nonce=nonce,
        qop=qop,
        nc=nc_text if qop else None,
        cnonce=cnonce,
    )
    parts = [
        f"username={_quote(username)}",
        f"realm={_quote(realm)}",
        f"nonce={_quote(nonce)}",
        f"uri={_quote(uri)}",
        f'response="{response}"',
        f"algorithm={algorithm}",
    ]
    if qop is not None:
        parts += [f"qop={qop}", f"nc={nc_text}", f"cnonce={_quote(cnonce or '')}"]
    if "opaque" in params:
        parts.append(f"opaque={_quote(params['opaque'])}")
    return "Digest " + ", ".join(parts)

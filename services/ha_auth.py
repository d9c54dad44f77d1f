"""Shared-secret authentication of the HA replication links, sans-I/O (docs/HA.md).

Both replicated pairs, the SIP Servers (active / hot standby, :mod:`services.sip_server.ha`) and the
Resource Managers (active / active, :mod:`services.resource_manager.replication`), authenticate
their TCP link with the same challenge: each side sends a fresh random nonce (:func:`new_nonce`) in
its hello and the other answers with :func:`mac`, an HMAC-SHA256 under the pair's shared secret over
that nonce and the answering node's name. A recorded answer is worth nothing on a later connection
(the nonce differs), and a stranger without the secret cannot answer at all.

The RM link also seals every message after the challenge (:class:`Sealer` / :class:`Opener`): a
session key is derived from the secret and both nonces, and each line carries an HMAC of the
sender's name, the line's sequence number on the connection (implicit: counted by both sides, never
sent) and the line itself. A line injected into the connection, altered, replayed, reordered or
reflected back to its sender does not verify.

No sockets, clocks or environment here; :class:`AuthError` names the defect.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

#: The SIP Server pair's challenge label (kept as it was: both nodes of a pair must agree).
SIP_CONTEXT = "callvault-ha"
#: Random bytes in a nonce (sent as hex).
NONCE_BYTES = 16
#: Length of a MAC as sent (hex SHA-256).
MAC_HEX = 64
_HEX_MAC = re.compile(rb"[0-9a-f]{64}")


class AuthError(ValueError):
    """A peer's answer or message that does not prove the pair's secret (missing, malformed, bad MAC)."""


def new_nonce() -> str:
    """A fresh challenge for one connection."""
    return secrets.token_hex(NONCE_BYTES)


def mac(secret: bytes, nonce: str, node: str, context: str = SIP_CONTEXT) -> str:
    """The answer of ``node`` to the challenge ``nonce``: hex HMAC-SHA256 under ``secret``."""
    return hmac.new(secret, f"{context}\n{nonce}\n{node}".encode(), hashlib.sha256).hexdigest()


def verify(secret: bytes, nonce: str, node: str, answer: object, context: str = SIP_CONTEXT) -> bool:
    """Whether ``answer`` (anything a peer sent) is ``node``'s valid answer to our ``nonce``."""
    return isinstance(answer, str) and hmac.compare_digest(answer, mac(secret, nonce, node, context))


def session_key(secret: bytes, context: str, dialler_nonce: str, acceptor_nonce: str) -> bytes:
    """The key sealing one connection's messages: both nonces, in the order of the connection's
    roles, so that each connection has its own key and both ends compute the same one."""
    label = f"{context}\nsession\n{dialler_nonce}\n{acceptor_nonce}".encode()
    return hmac.new(secret, label, hashlib.sha256).digest()


def _line_mac(key: bytes, sender: str, seq: int, body: bytes) -> bytes:
    return hmac.new(key, f"{sender}\n{seq}\n".encode() + body, hashlib.sha256).hexdigest().encode()


class Sealer:
    """Seals the lines one side sends on one connection: ``body + b" " + mac + b"\\n"``."""

    def __init__(self, key: bytes, sender: str) -> None:
        self._key = key
        self.sender = sender
        self.seq = 0

    def seal(self, line: bytes) -> bytes:
        """``line`` (one line, its newline optional) with its MAC; counts it."""
        body = line[:-1] if line.endswith(b"\n") else line
        if b"\n" in body:
            raise ValueError("a sealed message must be one line")
        out = body + b" " + _line_mac(self._key, self.sender, self.seq, body) + b"\n"
        self.seq += 1
        return out


class Opener:
    """Checks the lines the peer ``sender`` sent on one connection, in order.

    :meth:`open` returns the line without its MAC, or raises :class:`AuthError` without counting it
    (a rejected line does not shift the sequence of the genuine ones).
    """

    def __init__(self, key: bytes, sender: str) -> None:
        self._key = key
        self.sender = sender
        self.seq = 0

    def open(self, line: bytes) -> bytes:
        body, sep, tag = line.rstrip(b"\n").rpartition(b" ")
        if not sep:
            raise AuthError("message without a MAC")
        if not _HEX_MAC.fullmatch(tag):
            raise AuthError(f"malformed MAC ({len(tag)} bytes, {MAC_HEX} hex digits expected)")
        if not hmac.compare_digest(tag, _line_mac(self._key, self.sender, self.seq, body)):
            raise AuthError(f"bad MAC on message {self.seq} (forged, altered or replayed)")
        self.seq += 1
        return body + b"\n"

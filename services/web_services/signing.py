"""Short-lived signed playback URLs.

An ``<audio>`` element cannot send an ``Authorization`` header, and fetching the whole file into a
blob first would defeat streaming and seeking. So the web page asks (with its API key) for a signed
URL: ``/api/v1/recordings/<id>/audio?tenant=<t>&expires=<unix>&sig=<hmac>``, where ``sig`` is
HMAC-SHA256 over ``tenant, id, expires`` with a key shared by all Web Services instances. The URL
grants read access to that one recording's audio until it expires (5 minutes by default) and to
nothing else; the browser then streams it with ordinary Range requests.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import time

log = logging.getLogger("callvault.web_services")


def signing_key(url_signing_key: str, internal_token: str) -> bytes:
    """The key from config; derived from the internal token when not set; random as a last resort."""
    if url_signing_key:
        return url_signing_key.encode()
    if internal_token:
        return hmac.new(internal_token.encode(), b"callvault signed audio URLs", hashlib.sha256).digest()
    log.warning(
        "web_services.url_signing_key and internal_token are empty: signed URLs work on this instance only"
    )
    return os.urandom(32)


class UrlSigner:
    """Signs and verifies ``(tenant, recording id, expiry)`` triples."""

    def __init__(self, key: bytes, ttl: float = 300.0) -> None:
        self._key = key
        self.ttl = ttl

    def _mac(self, tenant: str, recording_id: str, expires: int) -> str:
        msg = f"audio\n{tenant}\n{recording_id}\n{expires}".encode()
        return (
            base64.urlsafe_b64encode(hmac.new(self._key, msg, hashlib.sha256).digest()).decode().rstrip("=")
        )

    def sign(self, tenant: str, recording_id: str, now: float | None = None) -> tuple[int, str]:
        expires = int((time.time() if now is None else now) + self.ttl)
        return expires, self._mac(tenant, recording_id, expires)

    def verify(
        self, tenant: str, recording_id: str, expires: int, sig: str, now: float | None = None
    ) -> bool:
        if expires < (time.time() if now is None else now):
            return False
        return hmac.compare_digest(self._mac(tenant, recording_id, expires), sig)

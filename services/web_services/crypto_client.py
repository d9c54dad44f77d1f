"""Web Services' client of the Crypto Server: unwrap a recording's data key, trying the instances in turn.

The instances (``crypto_server.urls``) are active/active. Each request starts at the next instance
in rotation; an instance that cannot be reached, times out or answers 5xx (or 401/403: a token
mismatch on that instance) is skipped for ``SKIP_SECONDS`` and the next one is asked, so one dead
instance costs at most one timeout. A definite refusal (the tenant holds no such key, the wrapped
key does not open) is not retried elsewhere: every instance reads the same keystore.

Unwrapped data keys stay in memory for ``crypto_server.key_cache_seconds`` (a player's seeks are
many range requests of one recording), keyed by tenant and the wrapped keys themselves.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import time
from collections import OrderedDict

import aiohttp

from services.config import CryptoServerConfig

log = logging.getLogger("callvault.web_services.crypto")

SKIP_SECONDS = 5.0
CACHE_ENTRIES = 1024


class CryptoUnavailable(Exception):
    """No Crypto Server instance could be asked (all down, unreachable or misconfigured)."""


class UnwrapRefused(Exception):
    """A Crypto Server answered that it will not or cannot unwrap this key; ``code`` says why."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class CryptoClient:
    """Unwraps data keys through the Crypto Server instances of one cluster configuration."""

    def __init__(self, cfg: CryptoServerConfig, requester: str = "") -> None:
        self.urls = cfg.instance_urls()
        self.token = cfg.internal_token
        self.timeout = cfg.request_timeout
        self.cache_seconds = cfg.key_cache_seconds
        self.requester = requester
        self._session: aiohttp.ClientSession | None = None
        self._next = 0
        self._skip_until: dict[str, float] = {}
        self._cache: OrderedDict[tuple[str, bytes], tuple[float, bytes]] = OrderedDict()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _order(self) -> list[str]:
        start = self._next % len(self.urls)
        self._next += 1
        rotated = self.urls[start:] + self.urls[:start]
        now = time.monotonic()
        up = [u for u in rotated if self._skip_until.get(u, 0.0) <= now]
        return up + [u for u in rotated if u not in up]  # skipped ones last, not never

    async def unwrap(self, tenant: str, candidates: list[tuple[str, bytes]], recording_id: str = "") -> bytes:
        """The data key wrapped in ``candidates`` (key id, wrapped key): one request, the Crypto
        Server uses the first key the tenant holds. Raises UnwrapRefused or CryptoUnavailable."""
        digest = hashlib.sha256()
        for key_id, wrapped in candidates:
            digest.update(key_id.encode() + len(wrapped).to_bytes(2, "big") + wrapped)
        cache_key = (tenant, digest.digest())
        now = time.monotonic()
        hit = self._cache.get(cache_key)
        if hit is not None and hit[0] > now:
            self._cache.move_to_end(cache_key)
            return hit[1]
        if not self.token:
            raise CryptoUnavailable(
                "crypto_server.internal_token is not set: encrypted recordings cannot be played"
            )
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        body = {
            "tenant": tenant,
            "candidates": [
                {"key_id": key_id, "wrapped_key": base64.b64encode(wrapped).decode()}
                for key_id, wrapped in candidates
            ],
            "recording_id": recording_id,
            "requester": self.requester,
        }
        headers = {"Authorization": f"Bearer {self.token}"}
        failures: list[str] = []
        for url in self._order():
            try:
                async with self._session.post(f"{url}/api/v1/unwrap", json=body, headers=headers) as resp:
                    status = resp.status
                    try:
                        data = await resp.json(content_type=None)
                    except ValueError:
                        data = None
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                reason = f"{url}: {type(exc).__name__} {exc}".rstrip()
                self._skip(url, reason)
                failures.append(reason)
                continue
            if status == 200 and isinstance(data, dict) and isinstance(data.get("data_key"), str):
                try:
                    data_key = base64.b64decode(data["data_key"], validate=True)
                except ValueError:
                    data_key = b""
                if len(data_key) == 32:
                    self._skip_until.pop(url, None)
                    self._remember(cache_key, data_key)
                    return data_key
                failures.append(f"{url}: answered a malformed data key")
                self._skip(url, failures[-1])
                continue
            error = data.get("error", {}) if isinstance(data, dict) else {}
            message = error.get("message", "") if isinstance(error, dict) else ""
            code = error.get("code", "") if isinstance(error, dict) else ""
            if status in (400, 404, 422):
                raise UnwrapRefused(str(code or status), str(message or f"HTTP {status}"))
            reason = f"{url}: HTTP {status} {message}".rstrip()
            self._skip(url, reason)
            failures.append(reason)
        raise CryptoUnavailable("no Crypto Server instance unwrapped the key (" + "; ".join(failures) + ")")

    def _skip(self, url: str, reason: str) -> None:
        log.warning("Crypto Server %s failed, trying the next instance: %s", url, reason)
        self._skip_until[url] = time.monotonic() + SKIP_SECONDS

    def _remember(self, cache_key: tuple[str, bytes], data_key: bytes) -> None:
        if self.cache_seconds <= 0:
            return
        self._cache[cache_key] = (time.monotonic() + self.cache_seconds, data_key)
        self._cache.move_to_end(cache_key)
        while len(self._cache) > CACHE_ENTRIES:
            self._cache.popitem(last=False)

"""The Crypto Server REST API (aiohttp).

- ``POST /api/v1/unwrap`` (``Authorization: Bearer <crypto_server.internal_token>``, what Web
  Services presents): ``{"tenant", "key_id", "wrapped_key" (base64), "recording_id"?,
  "requester"?}`` -> ``{"key_id", "data_key" (base64)}``; or ``"candidates": [{"key_id",
  "wrapped_key"}, ...]`` instead of one pair (the first key the tenant holds is used). Only the
  named tenant's keys are used: another tenant's key id is a 404 like a missing one. Every attempt
  gives one audit line.
- ``GET /api/v1/tenants/{tenant}/certificates`` (``Bearer <crypto_server.admin_token>``): the
  tenant's keys as certificates (key id, subject, validity, bits, PEM certificate).
- ``POST /api/v1/tenants/{tenant}/certificates`` (admin): ``{"certificate", "private_key"}`` imports
  a pair, ``{"generate": true, "bits"?, "days"?, "common_name"?}`` creates one (key rotation: put the
  returned certificate into the tenant's IVR Profile). 201 when added, 200 when already there.
- ``GET /healthz``.

No answer ever contains a private key. Errors are JSON ``{"error": {"status", "code", "message"}}``
with one log line; RSA and file work run in worker threads.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import logging
from typing import Any

from aiohttp import web

from services.config import ClusterConfig
from services.crypto_server.keystore import Keystore, KeystoreError, UnknownKey, valid_key_id, valid_tenant
from services.storage.envelope import EnvelopeError

log = logging.getLogger("callvault.crypto_server")
audit = logging.getLogger("callvault.audit")

API = "/api/v1"
MAX_BODY = 64 * 1024
MAX_WRAPPED = 1024  # an RSA-8192 block; real ones are 256-512 bytes
MAX_CANDIDATES = 16  # envelope.MAX_KEYS


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"status": status, "code": code, "message": message}}, status=status)


@web.middleware
async def error_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        log.info("%s %s -> %d %s", request.method, request.path, exc.status, exc.message)
        response = _error(exc.status, exc.code, exc.message)
        if exc.status == 401:
            response.headers["WWW-Authenticate"] = 'Bearer realm="callvault-crypto"'
        return response
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        log.info("%s %s -> %d %s", request.method, request.path, exc.status, exc.reason)
        return _error(exc.status, "error", exc.reason)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return _error(500, "internal_error", "internal server error")


def _bearer(request: web.Request) -> str:
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" else ""


async def _json(request: web.Request) -> dict[str, Any]:
    body = await request.read()
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, "bad_request", f"the request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "bad_request", "the request body must be a JSON object")
    return data


def _string(data: dict[str, Any], name: str, *, required: bool = True, limit: int = 256) -> str:
    value = data.get(name)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value) or len(value) > limit:
        raise ApiError(400, "bad_request", f"{name} must be a non-empty string of at most {limit} characters")
    return value


def _candidates(data: dict[str, Any]) -> list[tuple[str, bytes]]:
    """The (key id, wrapped key) pairs of an unwrap request: ``key_id`` + ``wrapped_key``, or a list
    ``candidates`` of such objects (a recording wrapped for several certificates: the first key the
    tenant holds is used)."""
    if "candidates" in data:
        items = data["candidates"]
        if not isinstance(items, list) or not 0 < len(items) <= MAX_CANDIDATES:
            raise ApiError(400, "bad_request", f"candidates must be a list of 1-{MAX_CANDIDATES} objects")
    else:
        items = [data]
    out = []
    for item in items:
        if not isinstance(item, dict):
            raise ApiError(400, "bad_request", "each candidate must be an object {key_id, wrapped_key}")
        key_id = _string(item, "key_id", limit=64)
        if not valid_key_id(key_id):
            raise ApiError(400, "bad_request", "key_id must be 64 lower-case hex digits")
        try:
            wrapped = base64.b64decode(_string(item, "wrapped_key", limit=2 * MAX_WRAPPED), validate=True)
        except binascii.Error:
            raise ApiError(400, "bad_request", "wrapped_key must be base64") from None
        if not 0 < len(wrapped) <= MAX_WRAPPED:
            raise ApiError(400, "bad_request", f"wrapped_key must be 1-{MAX_WRAPPED} bytes")
        out.append((key_id, wrapped))
    return out


class CryptoApi:
    def __init__(self, config: ClusterConfig, keystore: Keystore) -> None:
        self.config = config
        self.keystore = keystore
        self.name = f"{config.crypto_server.host}:{config.crypto_server.port}"

    def _auth(self, request: web.Request, token: str, what: str) -> None:
        if not token:
            raise ApiError(
                403, "disabled", f"{what} is disabled: crypto_server.{what.split()[0]}_token is not set"
            )
        if not hmac.compare_digest(_bearer(request).encode(), token.encode()):
            log.warning("rejected %s token from %s on %s", what, request.remote, request.path)
            raise ApiError(401, "unauthorized", f"the {what} token is missing or not valid")

    def _tenant(self, tenant: str) -> str:
        if not valid_tenant(tenant) or self.config.tenant(tenant) is None:
            raise ApiError(404, "unknown_tenant", f"no tenant {tenant!r}")
        return tenant

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "instance": self.name})

    async def unwrap(self, request: web.Request) -> web.Response:
        self._auth(request, self.config.crypto_server.internal_token, "internal token")
        data = await _json(request)
        tenant = _string(data, "tenant", limit=63)
        recording = _string(data, "recording_id", required=False, limit=128)
        requester = _string(data, "requester", required=False, limit=256)
        candidates = _candidates(data)
        asked = ",".join(k for k, _ in candidates)

        def outcome(result: str) -> None:
            audit.info(
                "unwrap tenant=%s key_id=%s recording=%s requester=%s remote=%s instance=%s -> %s",
                tenant,
                asked,
                recording or "-",
                requester or "-",
                request.remote,
                self.name,
                result,
            )

        try:
            self._tenant(tenant)
            key_id, data_key = await asyncio.to_thread(self.keystore.unwrap_first, tenant, candidates)
        except ApiError:
            outcome("unknown tenant")
            raise
        except UnknownKey:
            outcome("unknown key")
            raise ApiError(404, "unknown_key", f"tenant {tenant!r} holds none of the keys {asked}") from None
        except EnvelopeError as exc:
            outcome("does not unwrap")
            raise ApiError(422, "unwrap_failed", str(exc)) from None
        except KeystoreError as exc:
            outcome("keystore error")
            log.error("keystore: %s", exc)
            raise ApiError(500, "keystore_error", "the key cannot be read from the keystore") from None
        outcome(f"ok with {key_id}" if len(candidates) > 1 else "ok")
        return web.json_response({"key_id": key_id, "data_key": base64.b64encode(data_key).decode()})

    async def list_certificates(self, request: web.Request) -> web.Response:
        self._auth(request, self.config.crypto_server.admin_token, "admin token")
        tenant = self._tenant(request.match_info["tenant"])
        try:
            infos = await asyncio.to_thread(self.keystore.list, tenant)
        except KeystoreError as exc:
            log.error("keystore: %s", exc)
            raise ApiError(
                500, "keystore_error", "the tenant's keys cannot be read from the keystore"
            ) from None
        return web.json_response({"tenant": tenant, "certificates": [i.to_dict() for i in infos]})

    async def add_certificate(self, request: web.Request) -> web.Response:
        self._auth(request, self.config.crypto_server.admin_token, "admin token")
        tenant = self._tenant(request.match_info["tenant"])
        data = await _json(request)
        try:
            if data.get("generate") is True:
                bits, days = data.get("bits", 3072), data.get("days", 825)
                if not isinstance(bits, int) or not isinstance(days, int):
                    raise ApiError(400, "bad_request", "bits and days must be integers")
                cn = _string(data, "common_name", required=False, limit=64)
                info = await asyncio.to_thread(
                    self.keystore.generate, tenant, bits=bits, days=days, common_name=cn
                )
                created = True
            elif "certificate" in data and "private_key" in data:
                cert = _string(data, "certificate", limit=32768).encode()
                key = _string(data, "private_key", limit=32768).encode()
                info, created = await asyncio.to_thread(self.keystore.add, tenant, cert, key)
            else:
                raise ApiError(
                    400,
                    "bad_request",
                    'expected {"certificate": PEM, "private_key": PEM} or {"generate": true}',
                )
        except EnvelopeError as exc:  # includes CertificateError
            raise ApiError(400, "invalid_key", str(exc)) from None
        except KeystoreError as exc:
            log.error("keystore: %s", exc)
            raise ApiError(500, "keystore_error", "the key cannot be stored in the keystore") from None
        audit.info(
            "certificate %s tenant=%s key_id=%s subject=%s remote=%s",
            "added" if created else "already present",
            tenant,
            info.key_id,
            info.subject,
            request.remote,
        )
        location = f"{API}/tenants/{tenant}/certificates/{info.key_id}"
        return web.json_response(
            info.to_dict(), status=201 if created else 200, headers={"Location": location}
        )

    async def get_certificate(self, request: web.Request) -> web.Response:
        self._auth(request, self.config.crypto_server.admin_token, "admin token")
        tenant = self._tenant(request.match_info["tenant"])
        key_id = request.match_info["key_id"]
        try:
            infos = await asyncio.to_thread(self.keystore.list, tenant)
        except KeystoreError as exc:
            log.error("keystore: %s", exc)
            raise ApiError(
                500, "keystore_error", "the tenant's keys cannot be read from the keystore"
            ) from None
        for info in infos:
            if info.key_id == key_id:
                return web.json_response(info.to_dict())
        raise ApiError(404, "unknown_key", f"tenant {tenant!r} holds no key {key_id}")


def create_app(config: ClusterConfig, keystore: Keystore) -> web.Application:
    app = web.Application(middlewares=[error_middleware], client_max_size=MAX_BODY)
    api = CryptoApi(config, keystore)
    r = app.router
    r.add_get("/healthz", api.healthz)
    r.add_post(f"{API}/unwrap", api.unwrap)
    r.add_get(f"{API}/tenants/{{tenant}}/certificates", api.list_certificates)
    r.add_post(f"{API}/tenants/{{tenant}}/certificates", api.add_certificate)
    r.add_get(f"{API}/tenants/{{tenant}}/certificates/{{key_id}}", api.get_certificate)
    return app

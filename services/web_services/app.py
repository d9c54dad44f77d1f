"""The Web Services REST API (aiohttp): search, metadata, playback, delete, internal insert.

Authorisation: tenants' API keys (``Authorization: Bearer <api key>``) for the public API, scoped to
the key's tenant (another tenant's recording is a 404, indistinguishable from a missing one); the
cluster's ``web_services.internal_token`` for ``POST /api/v1/internal/recordings``; a short-lived
HMAC-signed URL as an alternative for the audio of one recording (see ``signing.py``).

Every client error is a JSON ``{"error": {"status", "code", "message"}}`` with a 4xx status and one
log line; nothing a client sends produces a 500.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

from aiohttp import web
from multidict import MultiMapping

from services.config import ClusterConfig, Tenant
from services.storage.disk import DiskWriter, StorageKeyError
from services.storage.envelope import EnvelopeError
from services.storage.metadata import DocumentError, format_time, parse_time, validate_document
from services.storage.s3 import S3Client, S3Error, S3Settings
from services.web_services import openapi
from services.web_services.audio import AudioUnavailable, open_audio
from services.web_services.crypto_client import CryptoClient
from services.web_services.ranges import RangeNotSatisfiable, content_range, parse_range
from services.web_services.signing import UrlSigner, signing_key
from services.web_services.store import (
    MAX_LIMIT,
    CursorError,
    MetadataStore,
    PutResult,
    SearchFilters,
    StoreUnavailable,
    decode_cursor,
)

log = logging.getLogger("callvault.web_services")
audit = logging.getLogger("callvault.audit")

API = "/api/v1"
STATIC_DIR = Path(__file__).with_name("static")
MAX_BODY = 1 << 20
DEFAULT_LIMIT = 50
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-]{0,127}")
SEARCH_PARAMS = (
    "call_id",
    "session_id",
    "party",
    "direction",
    "label",
    "start_after",
    "start_before",
    "limit",
    "cursor",
)
SIGNED_PARAMS = ("tenant", "expires", "sig")
_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    410: "gone",
    413: "payload_too_large",
    415: "unsupported_media_type",
    416: "range_not_satisfiable",
}


class ApiError(Exception):
    """A request that is answered with a JSON error."""

    def __init__(self, status: int, message: str, code: str | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code or _CODES.get(status, "error")
        self.extra = extra
        self.headers: dict[str, str] = {}


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None, **extra: Any
) -> web.Response:
    body = {"error": {"status": status, "code": code, "message": message, **extra}}
    return web.json_response(body, status=status, headers=headers)


@web.middleware
async def error_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Turn every error into a JSON response with one log line; unexpected ones into a logged 500."""
    try:
        return await handler(request)
    except ApiError as exc:
        log.info("%s %s -> %d %s", request.method, request.path, exc.status, exc.message)
        return error_response(exc.status, exc.code, exc.message, exc.headers, **exc.extra)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        message = {
            404: f"no such resource: {request.path}",
            405: f"method {request.method} is not allowed on {request.path}",
            413: f"request body is larger than {MAX_BODY} bytes",
        }.get(exc.status, exc.reason)
        log.info("%s %s -> %d %s", request.method, request.path, exc.status, message)
        keep = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "www-authenticate")}
        return error_response(exc.status, _CODES.get(exc.status, "error"), message, keep)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except StoreUnavailable as exc:
        log.error("%s %s -> 503: metadata store unavailable: %s", request.method, request.path, exc)
        return error_response(
            503, "store_unavailable", "the metadata store is unavailable; retry", {"Retry-After": "1"}
        )
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(500, "internal_error", "internal server error")


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "no-referrer")
    if response.content_type == "text/html":
        response.headers.setdefault(
            "Content-Security-Policy",
            "default-src 'self'; media-src 'self' blob:; img-src 'self' data:; frame-ancestors 'none'",
        )


def _unauthorized(message: str) -> NoReturn:
    exc = ApiError(401, message)
    exc.headers["WWW-Authenticate"] = 'Bearer realm="callvault"'
    raise exc


def _bearer(request: web.Request) -> str:
    header = request.headers.get("Authorization")
    if header is None:
        _unauthorized("missing 'Authorization: Bearer <api key>' header")
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        _unauthorized("the Authorization header must be 'Bearer <api key>'")
    return token.strip()


def _single_params(query: MultiMapping[str], allowed: tuple[str, ...]) -> dict[str, str]:
    out: dict[str, str] = {}
    for name in query:
        if name not in allowed:
            raise ApiError(400, f"unknown query parameter {name!r} (allowed: {', '.join(allowed)})")
        values = query.getall(name)
        if len(values) > 1:
            raise ApiError(400, f"query parameter {name!r} is given more than once")
        value = values[0]
        if not value:
            raise ApiError(400, f"query parameter {name!r} is empty")
        if len(value) > 2048:
            raise ApiError(400, f"query parameter {name!r} is longer than 2048 characters")
        out[name] = value
    return out


def parse_search(query: MultiMapping[str]) -> tuple[SearchFilters, int, str | None]:
    """Search filters, page size and cursor from a query string; ApiError(400) naming the problem."""
    p = _single_params(query, SEARCH_PARAMS)
    times = {}
    for name in ("start_after", "start_before"):
        if name in p:
            try:
                times[name] = parse_time(p[name], name)
            except DocumentError:
                raise ApiError(
                    400, f"{name} must be an ISO 8601 timestamp such as 2024-05-01T08:00:00Z, not {p[name]!r}"
                ) from None
    if "start_after" in times and "start_before" in times and times["start_after"] >= times["start_before"]:
        raise ApiError(400, "start_after must be earlier than start_before")
    limit = DEFAULT_LIMIT
    if "limit" in p:
        if not re.fullmatch(r"[0-9]{1,4}", p["limit"]) or not 1 <= int(p["limit"]) <= MAX_LIMIT:
            raise ApiError(400, f"limit must be an integer from 1 to {MAX_LIMIT}, not {p['limit']!r}")
        limit = int(p["limit"])
    cursor = p.get("cursor")
    if cursor is not None:
        try:
            decode_cursor(cursor)
        except CursorError as exc:
            raise ApiError(400, str(exc)) from None
    filters = SearchFilters(
        call_id=p.get("call_id"),
        session_id=p.get("session_id"),
        party=p.get("party"),
        direction=p.get("direction"),
        label=p.get("label"),
        start_after=times.get("start_after"),
        start_before=times.get("start_before"),
    )
    return filters, limit, cursor


class Api:
    """The request handlers, bound to the cluster config, the store and the disk storage."""

    def __init__(self, config: ClusterConfig, store: MetadataStore) -> None:
        ws = config.web_services
        self.config = config
        self.store = store
        self.disk = DiskWriter(config.path(config.storage.disk_root))
        self.signer = UrlSigner(signing_key(ws.url_signing_key, ws.internal_token), ws.signed_url_ttl)
        self._openapi = json.dumps(openapi.document(), indent=1).encode()
        self.crypto = CryptoClient(config.crypto_server, requester=f"web-services {ws.host}:{ws.port}")
        self.s3 = S3Client(S3Settings.from_config(config.storage)) if config.storage.s3_configured else None

    # ------------------------------------------------------------------ helpers
    def tenant(self, request: web.Request) -> Tenant:
        tenant = self.config.tenant_for_api_key(_bearer(request))
        if tenant is None:
            log.warning("rejected API key from %s on %s %s", request.remote, request.method, request.path)
            _unauthorized("the API key is not valid")
        return tenant

    async def recording(self, tenant: str, request: web.Request) -> dict[str, Any]:
        rid = request.match_info["id"]
        doc = await self.store.get(tenant, rid) if _ID_RE.fullmatch(rid) else None
        if doc is None:
            raise ApiError(404, f"recording {rid!r} not found")
        return doc

    # ------------------------------------------------------------------ public API
    async def healthz(self, request: web.Request) -> web.Response:
        try:
            await self.store.ping()
        except Exception as exc:
            log.error("health check: store unavailable: %s", exc)
            return web.json_response({"status": "unavailable", "store": str(exc)}, status=503)
        return web.json_response({"status": "ok"})

    async def openapi(self, request: web.Request) -> web.Response:
        return web.Response(body=self._openapi, content_type="application/json")

    async def index(self, request: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    async def list_recordings(self, request: web.Request) -> web.Response:
        tenant = self.tenant(request)
        filters, limit, cursor = parse_search(request.query)
        page = await self.store.search(tenant.id, filters, limit, cursor)
        return web.json_response({"items": page.items, "next": page.next})

    async def get_recording(self, request: web.Request) -> web.Response:
        tenant = self.tenant(request)
        _single_params(request.query, ())
        return web.json_response(await self.recording(tenant.id, request))

    async def delete_recording(self, request: web.Request) -> web.Response:
        tenant = self.tenant(request)
        _single_params(request.query, ())
        doc = await self.recording(tenant.id, request)
        storage = doc.get("storage") or {}
        # Audio first: if that fails the metadata stays and the delete can be retried; the other order
        # could leave audio nobody can find any more.
        if storage.get("kind") == "s3" and self.s3 is not None:
            try:
                await self.s3.delete(str(storage["key"]))
            except S3Error as exc:
                log.error("recording %s: deleting its S3 object failed: %s", doc["id"], exc)
                raise ApiError(503, "the storage is unreachable; try again", "storage_unavailable") from None
        elif storage.get("kind") != "disk":
            raise ApiError(
                501, f"deleting from {storage.get('kind')!r} storage is not configured", "not_implemented"
            )
        try:
            if storage.get("kind") == "disk":
                await self.disk.delete(storage["key"])
        except StorageKeyError as exc:
            log.error("recording %s has an invalid storage key: %s", doc["id"], exc)
        await self.store.delete(tenant.id, doc["id"])
        audit.info(
            "delete recording=%s tenant=%s call_id=%s storage=%s:%s remote=%s",
            doc["id"],
            tenant.id,
            doc.get("call_id", ""),
            storage.get("kind"),
            storage.get("key"),
            request.remote,
        )
        return web.Response(status=204)

    async def audio_url(self, request: web.Request) -> web.Response:
        tenant = self.tenant(request)
        _single_params(request.query, ())
        doc = await self.recording(tenant.id, request)
        expires, sig = self.signer.sign(tenant.id, doc["id"])
        url = f"{API}/recordings/{doc['id']}/audio?tenant={tenant.id}&expires={expires}&sig={sig}"
        return web.json_response({"url": url, "expires": format_time(datetime.fromtimestamp(expires, UTC))})

    async def audio(self, request: web.Request) -> web.StreamResponse:
        if "sig" in request.query:
            p = _single_params(request.query, SIGNED_PARAMS)
            if not all(k in p for k in SIGNED_PARAMS) or not re.fullmatch(r"[0-9]{1,12}", p["expires"]):
                raise ApiError(400, "a signed audio URL needs tenant, expires (unix time) and sig")
            rid = request.match_info["id"]
            if not self.signer.verify(p["tenant"], rid, int(p["expires"]), p["sig"]):
                raise ApiError(403, "the signed URL is invalid or has expired")
            tenant_id = p["tenant"]
        else:
            tenant_id = self.tenant(request).id
            _single_params(request.query, ())
        doc = await self.recording(tenant_id, request)
        try:
            src = await open_audio(doc, self.disk, self.crypto, self.s3)
        except AudioUnavailable as exc:
            if exc.status >= 500:
                log.error("audio of %s unavailable: %s", doc["id"], exc)
            raise ApiError(exc.status, str(exc), exc.code) from None
        except StorageKeyError as exc:
            log.error("recording %s has an invalid storage key: %s", doc["id"], exc)
            raise ApiError(404, "the recording's audio is not available", "audio_missing") from None
        etag = f'"{doc["sha256"]}"' if doc.get("sha256") else f'"size-{src.size}"'
        headers = {
            "Accept-Ranges": "bytes",
            "ETag": etag,
            "Cache-Control": "private, no-cache",
            "Content-Disposition": f'inline; filename="{doc["id"]}.{doc.get("format", "wav")}"',
        }
        inm = request.headers.get("If-None-Match")
        if inm is not None and (inm.strip() == "*" or etag in [t.strip() for t in inm.split(",")]):
            return web.Response(status=304, headers=headers)
        range_header = request.headers.get("Range")
        if_range = request.headers.get("If-Range")
        if if_range is not None and if_range.strip() != etag:
            range_header = None  # the client's copy is stale: send it all (RFC 9110 13.1.5)
        try:
            rng = parse_range(range_header, src.size)
        except RangeNotSatisfiable:
            err = ApiError(416, f"range {range_header!r} is outside the {src.size} bytes of audio")
            err.headers.update({"Content-Range": f"bytes */{src.size}", "Accept-Ranges": "bytes"})
            raise err from None
        first, last = rng if rng else (0, src.size - 1)
        response = web.StreamResponse(status=206 if rng else 200, headers=headers)
        response.content_type = src.content_type
        response.content_length = last - first + 1
        if rng:
            response.headers["Content-Range"] = content_range(first, last, src.size)
        await response.prepare(request)
        if request.method != "HEAD" and last >= first:
            try:
                # aclosing: the file is closed now, not when the generator is collected, also
                # when the client goes away mid-stream
                async with contextlib.aclosing(src.iter_range(first, last)) as chunks:
                    async for chunk in chunks:
                        await response.write(chunk)
            except (ConnectionResetError, ConnectionError):
                log.debug("client went away while streaming %s", doc["id"])
                return response
            except EnvelopeError as exc:
                # the status line is gone: cutting the connection short is the only signal left
                log.error("recording %s: %s; the response is cut short", doc["id"], exc)
                if request.transport is not None:
                    request.transport.close()
                return response
        await response.write_eof()
        return response

    # ------------------------------------------------------------------ internal API
    async def internal_put(self, request: web.Request) -> web.Response:
        token = self.config.web_services.internal_token
        presented = _bearer(request)
        if not token:
            _unauthorized("the internal API is disabled: web_services.internal_token is not set")
        if not hmac.compare_digest(presented.encode(), token.encode()):
            log.warning("rejected internal token from %s", request.remote)
            _unauthorized("the internal token is not valid")
        body = await request.read()
        if not body:
            raise ApiError(400, "the request body is empty; expected a recording metadata document (JSON)")
        try:
            data = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ApiError(400, f"the request body is not valid JSON: {exc}") from None
        try:
            doc = validate_document(data)
        except DocumentError as exc:
            raise ApiError(400, str(exc), "invalid_document", field=exc.field) from None
        if self.config.tenant(doc["tenant"]) is None:
            log.warning("recording %s belongs to unknown tenant %r; stored anyway", doc["id"], doc["tenant"])
        result = await self.store.put(doc)
        if result is PutResult.CREATED:
            log.info("recording %s of %s indexed", doc["id"], doc["tenant"])
            location = f"{API}/recordings/{doc['id']}"
            return web.json_response(
                {"id": doc["id"], "result": result.value}, status=201, headers={"Location": location}
            )
        if result is PutResult.EXISTS:
            return web.json_response({"id": doc["id"], "result": result.value}, status=200)
        if result is PutResult.DELETED:
            raise ApiError(410, f"recording {doc['id']} was deleted; it is not indexed again", "deleted")
        log.warning("recording %s posted again with different content; the first version is kept", doc["id"])
        raise ApiError(409, f"recording {doc['id']} already exists with different content", "conflict")


def create_app(config: ClusterConfig, store: MetadataStore) -> web.Application:
    """The aiohttp application; the caller owns ``store`` (opens and closes it)."""
    app = web.Application(middlewares=[error_middleware], client_max_size=MAX_BODY)
    app.on_response_prepare.append(_security_headers)
    api = Api(config, store)

    async def close_crypto(_app: web.Application) -> None:
        await api.crypto.close()
        if api.s3 is not None:
            await api.s3.close()

    app.on_cleanup.append(close_crypto)
    r = app.router
    r.add_get("/healthz", api.healthz)
    r.add_get(f"{API}/openapi.json", api.openapi)
    r.add_get(f"{API}/recordings", api.list_recordings)
    r.add_get(f"{API}/recordings/{{id}}", api.get_recording)
    r.add_delete(f"{API}/recordings/{{id}}", api.delete_recording)
    r.add_get(f"{API}/recordings/{{id}}/audio", api.audio)
    r.add_post(f"{API}/recordings/{{id}}/audio-url", api.audio_url)
    r.add_post(f"{API}/internal/recordings", api.internal_put)
    r.add_get("/", api.index)
    r.add_static("/static/", STATIC_DIR)
    return app

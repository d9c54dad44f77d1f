"""The Web Services API in process (aiohttp test server): auth, search, audio, delete, internal insert."""

from __future__ import annotations

import hashlib
import io
import logging
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from services import config as config_mod
from services.config import ClusterConfig
from services.storage.disk import DiskWriter
from services.web_services import openapi
from services.web_services.app import create_app
from services.web_services.store import SqliteMetadataStore

DocFactory = Callable[..., dict[str, Any]]
ACME_KEY = "acme-key-0123456789abcdef"
GLOBEX_KEY = "globex-key-0123456789abcdef"
INTERNAL = "internal-token-0123456789"


def make_config(tmp_path: Path, internal_token: str = INTERNAL) -> ClusterConfig:
    return config_mod.from_dict(
        {
            "storage": {"disk_root": "storage", "queue_dir": "queue"},
            "web_services": {
                "database": "meta.sqlite3",
                "internal_token": internal_token,
                "signed_url_ttl": 60,
            },
            "tenants": [{"id": "acme", "api_key": ACME_KEY}, {"id": "globex", "api_key": GLOBEX_KEY}],
        },
        base_dir=str(tmp_path),
        environ={},
    )


@dataclass
class Env:
    client: TestClient
    store: SqliteMetadataStore
    config: ClusterConfig
    disk: DiskWriter
    make_doc: DocFactory

    async def add(
        self, rid: str, tenant: str = "acme", payload: bytes | None = None, **kw: Any
    ) -> dict[str, Any]:
        """Store a recording: audio file on disk plus its metadata."""
        payload = os.urandom(10_000) if payload is None else payload
        doc = self.make_doc(
            rid, tenant=tenant, size=len(payload), sha256=hashlib.sha256(payload).hexdigest(), **kw
        )
        path = self.disk.path(doc["storage"]["key"])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(payload)
        await self.store.put(doc)
        return doc


def auth(key: str = ACME_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def _env(tmp_path: Path, make_doc: DocFactory, internal_token: str = INTERNAL) -> AsyncIterator[Env]:
    config = make_config(tmp_path, internal_token)
    store = SqliteMetadataStore(config.path(config.web_services.database))
    await store.open()
    client = TestClient(TestServer(create_app(config, store)))
    await client.start_server()
    try:
        yield Env(client, store, config, DiskWriter(config.path(config.storage.disk_root)), make_doc)
    finally:
        await client.close()
        await store.close()


@pytest.fixture
async def env(tmp_path: Path, make_doc: DocFactory) -> AsyncIterator[Env]:
    async for e in _env(tmp_path, make_doc):
        yield e


async def error_of(resp: Any, status: int) -> dict[str, Any]:
    assert resp.status == status, await resp.text()
    assert resp.content_type == "application/json"
    body = await resp.json()
    assert body["error"]["status"] == status and body["error"]["message"]
    return dict(body["error"])


# ---------------------------------------------------------------------------------------------- auth
@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Basic abc"},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer wrong-key-xxxxxxxxxx"},
    ],
)
async def test_unauthorized(env: Env, headers: dict[str, str]) -> None:
    resp = await env.client.get("/api/v1/recordings", headers=headers)
    await error_of(resp, 401)
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")


async def test_internal_token_is_not_an_api_key(env: Env) -> None:
    await error_of(await env.client.get("/api/v1/recordings", headers=auth(INTERNAL)), 401)


async def test_tenant_isolation(env: Env) -> None:
    await env.add("a1", "acme")
    await env.add("b1", "globex")
    body = await (await env.client.get("/api/v1/recordings", headers=auth())).json()
    assert [d["id"] for d in body["items"]] == ["a1"]
    for path in ("/api/v1/recordings/b1", "/api/v1/recordings/b1/audio"):
        await error_of(await env.client.get(path, headers=auth()), 404)
    await error_of(await env.client.delete("/api/v1/recordings/b1", headers=auth()), 404)
    await error_of(await env.client.post("/api/v1/recordings/b1/audio-url", headers=auth()), 404)
    assert (await env.client.get("/api/v1/recordings/b1", headers=auth(GLOBEX_KEY))).status == 200


# ---------------------------------------------------------------------------------------------- search
async def test_search_and_pagination(env: Env) -> None:
    from datetime import UTC, datetime, timedelta

    t0 = datetime(2024, 5, 1, 8, 0, tzinfo=UTC)
    for i in range(5):
        await env.add(
            f"r{i}",
            start=t0 + timedelta(minutes=i),
            caller=f"10{i:02d}",
            callee=f"20{i:02d}",
            from_uri=f"sip:10{i:02d}@acme.example",
            to_uri=f"sip:20{i:02d}@acme.example",
        )
    seen = []
    url = "/api/v1/recordings?limit=2"
    while url:
        body = await (await env.client.get(url, headers=auth())).json()
        seen += [d["id"] for d in body["items"]]
        url = f"/api/v1/recordings?limit=2&cursor={body['next']}" if body["next"] else ""
    assert seen == ["r4", "r3", "r2", "r1", "r0"]
    q = {"party": "1002", "start_after": "2024-05-01T08:00:00Z", "start_before": "2024-05-01T10:30:00+02:00"}
    body = await (await env.client.get("/api/v1/recordings", params=q, headers=auth())).json()
    assert [d["id"] for d in body["items"]] == ["r2"] and body["next"] is None
    body = await (await env.client.get("/api/v1/recordings?call_id=call-r3@pbx", headers=auth())).json()
    assert [d["id"] for d in body["items"]] == ["r3"]


@pytest.mark.parametrize(
    ("query", "words"),
    [
        ("limit=0", "limit"),
        ("limit=501", "limit"),
        ("limit=ten", "limit"),
        ("limit=-1", "limit"),
        ("start_after=yesterday", "start_after"),
        ("start_before=2024-13-01", "start_before"),
        ("start_after=2024-05-02&start_before=2024-05-01", "start_after"),
        ("colour=red", "colour"),
        ("party=1&party=2", "party"),
        ("party=", "party"),
        ("cursor=garbage!", "cursor"),
        ("offset=10", "offset"),
    ],
)
async def test_bad_search_requests(env: Env, query: str, words: str) -> None:
    err = await error_of(await env.client.get(f"/api/v1/recordings?{query}", headers=auth()), 400)
    assert words in err["message"]
    assert err["code"] == "bad_request"


async def test_unknown_routes_and_methods_are_json(env: Env) -> None:
    await error_of(await env.client.get("/api/v1/nothing", headers=auth()), 404)
    err = await error_of(await env.client.put("/api/v1/recordings", headers=auth()), 405)
    assert "PUT" in err["message"]
    await error_of(await env.client.get("/api/v1/recordings/..%2F..%2Fetc", headers=auth()), 404)
    await error_of(await env.client.get("/api/v1/recordings/r1?x=1", headers=auth()), 400)


# ---------------------------------------------------------------------------------------------- audio
async def test_audio_full_and_ranges(env: Env) -> None:
    payload = os.urandom(100_000)
    doc = await env.add("r1", payload=payload)
    url = "/api/v1/recordings/r1/audio"
    resp = await env.client.get(url, headers=auth())
    assert resp.status == 200
    assert await resp.read() == payload
    assert resp.headers["Content-Type"] == "audio/wav"
    assert resp.headers["Accept-Ranges"] == "bytes"
    assert resp.headers["ETag"] == f'"{doc["sha256"]}"'
    assert resp.headers["Content-Length"] == str(len(payload))

    for rng, first, last in (
        ("bytes=0-99", 0, 99),
        ("bytes=99990-", 99990, 99999),
        ("bytes=-10", 99990, 99999),
        ("bytes=50000-200000", 50000, 99999),
    ):
        resp = await env.client.get(url, headers={**auth(), "Range": rng})
        assert resp.status == 206, rng
        assert await resp.read() == payload[first : last + 1]
        assert resp.headers["Content-Range"] == f"bytes {first}-{last}/{len(payload)}"

    resp = await env.client.get(url, headers={**auth(), "Range": "bytes=100000-"})
    await error_of(resp, 416)
    assert resp.headers["Content-Range"] == "bytes */100000"

    # If-Range with a stale ETag: the whole file; with the current one: the range
    resp = await env.client.get(url, headers={**auth(), "Range": "bytes=0-9", "If-Range": '"old"'})
    assert resp.status == 200 and len(await resp.read()) == len(payload)
    resp = await env.client.get(
        url, headers={**auth(), "Range": "bytes=0-9", "If-Range": resp.headers["ETag"]}
    )
    assert resp.status == 206 and await resp.read() == payload[:10]

    resp = await env.client.get(url, headers={**auth(), "If-None-Match": f'"{doc["sha256"]}"'})
    assert resp.status == 304
    resp = await env.client.head(url, headers=auth())
    assert resp.status == 200 and resp.headers["Content-Length"] == str(len(payload))
    assert await resp.read() == b""


async def test_audio_missing_file(env: Env) -> None:
    doc = await env.add("r1")
    env.disk.path(doc["storage"]["key"]).unlink()
    err = await error_of(await env.client.get("/api/v1/recordings/r1/audio", headers=auth()), 404)
    assert err["code"] == "audio_missing"


async def test_signed_audio_url(env: Env) -> None:
    payload = os.urandom(5000)
    await env.add("r1", payload=payload)
    await env.add("r2")
    body = await (await env.client.post("/api/v1/recordings/r1/audio-url", headers=auth())).json()
    url = body["url"]
    assert "tenant=acme" in url and body["expires"].endswith("Z")
    resp = await env.client.get(url)  # no Authorization header
    assert resp.status == 200 and await resp.read() == payload
    resp = await env.client.get(url, headers={"Range": "bytes=10-19"})
    assert resp.status == 206 and await resp.read() == payload[10:20]
    await error_of(await env.client.get(url.replace("/r1/", "/r2/")), 403)
    await error_of(await env.client.get(url.replace("tenant=acme", "tenant=globex")), 403)
    await error_of(await env.client.get(url[:-2] + ("AA" if not url.endswith("AA") else "BB")), 403)
    expired = url.split("&expires=")[0] + "&expires=1000&sig=" + url.split("&sig=")[1]
    await error_of(await env.client.get(expired), 403)
    await error_of(await env.client.get("/api/v1/recordings/r1/audio?sig=x"), 400)


# ---------------------------------------------------------------------------------------------- delete
async def test_delete(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    doc = await env.add("r1")
    with caplog.at_level(logging.INFO, "callvault.audit"):
        resp = await env.client.delete("/api/v1/recordings/r1", headers=auth())
    assert resp.status == 204
    assert any("delete recording=r1 tenant=acme" in r.getMessage() for r in caplog.records)
    assert not env.disk.path(doc["storage"]["key"]).exists()
    await error_of(await env.client.get("/api/v1/recordings/r1", headers=auth()), 404)
    # a late duplicate from a Recording Processor does not bring it back
    resp = await env.client.post("/api/v1/internal/recordings", json=doc, headers=auth(INTERNAL))
    assert (await error_of(resp, 410))["code"] == "deleted"


# ---------------------------------------------------------------------------------------------- internal
async def test_internal_insert_is_idempotent(env: Env, make_doc: DocFactory) -> None:
    doc = make_doc("r9")
    resp = await env.client.post("/api/v1/internal/recordings", json=doc, headers=auth(INTERNAL))
    assert resp.status == 201 and resp.headers["Location"] == "/api/v1/recordings/r9"
    resp = await env.client.post("/api/v1/internal/recordings", json=doc, headers=auth(INTERNAL))
    assert resp.status == 200 and (await resp.json())["result"] == "exists"
    changed = make_doc("r9", seconds=3)
    resp = await env.client.post("/api/v1/internal/recordings", json=changed, headers=auth(INTERNAL))
    assert (await error_of(resp, 409))["code"] == "conflict"
    body = await (await env.client.get("/api/v1/recordings/r9", headers=auth())).json()
    assert body == doc


@pytest.mark.parametrize(
    ("body", "field"),
    [(b"{not json", None), (b"", None), (b"[1,2]", "document"), (b'{"id": "x"}', "tenant")],
)
async def test_internal_bad_bodies(env: Env, body: bytes, field: str | None) -> None:
    resp = await env.client.post(
        "/api/v1/internal/recordings",
        data=body,
        headers={**auth(INTERNAL), "Content-Type": "application/json"},
    )
    err = await error_of(resp, 400)
    assert err.get("field") == field


async def test_internal_invalid_document_names_field(env: Env, make_doc: DocFactory) -> None:
    doc = make_doc("r1")
    doc["channels"] = 5
    resp = await env.client.post("/api/v1/internal/recordings", json=doc, headers=auth(INTERNAL))
    err = await error_of(resp, 400)
    assert err["field"] == "channels" and err["code"] == "invalid_document"


async def test_internal_auth(env: Env, make_doc: DocFactory) -> None:
    doc = make_doc("r1")
    for headers in ({}, auth(ACME_KEY), auth("nope-nope-nope-nope")):
        await error_of(await env.client.post("/api/v1/internal/recordings", json=doc, headers=headers), 401)


async def test_internal_too_large(env: Env) -> None:
    resp = await env.client.post(
        "/api/v1/internal/recordings", data=io.BytesIO(b"x" * (2 << 20)), headers=auth(INTERNAL)
    )
    await error_of(resp, 413)


async def test_internal_disabled_without_token(tmp_path: Path, make_doc: DocFactory) -> None:
    async for e in _env(tmp_path, make_doc, internal_token=""):
        resp = await e.client.post("/api/v1/internal/recordings", json=make_doc("r1"), headers=auth(""))
        await error_of(resp, 401)
        resp = await e.client.post("/api/v1/internal/recordings", json=make_doc("r1"), headers=auth("x"))
        assert "internal_token" in (await error_of(resp, 401))["message"]


# ---------------------------------------------------------------------------------------------- misc
async def test_healthz_openapi_and_page(env: Env) -> None:
    assert await (await env.client.get("/healthz")).json() == {"status": "ok"}
    spec = await (await env.client.get("/api/v1/openapi.json")).json()
    assert spec["openapi"].startswith("3.1")
    resp = await env.client.get("/")
    assert resp.status == 200 and "text/html" in resp.headers["Content-Type"]
    assert "default-src 'self'" in resp.headers["Content-Security-Policy"]
    assert "<audio" in await resp.text()
    for asset in ("/static/app.js", "/static/style.css"):
        assert (await env.client.get(asset)).status == 200


def test_openapi_describes_every_route(tmp_path: Path) -> None:
    app = create_app(make_config(tmp_path), SqliteMetadataStore(":memory:"))
    routed: set[tuple[str, str]] = set()
    for route in app.router.routes():
        info = route.resource.get_info() if route.resource else {}
        path = info.get("path") or info.get("formatter")
        if not path or path == "/" or route.method == "HEAD" or "prefix" in info:
            continue
        routed.add((path, route.method.lower()))
    spec = openapi.document()
    documented = {(p, m) for p, ops in spec["paths"].items() for m in ops if m != "parameters"}
    assert routed == documented
    # every $ref resolves
    import json

    text = json.dumps(spec)
    for name in ("Recording", "Stream", "Page", "Error"):
        assert name in spec["components"]["schemas"]
    assert text.count("#/components/schemas/") == sum(
        text.count(f'#/components/schemas/{n}"') for n in spec["components"]["schemas"]
    )


async def test_store_failure_is_a_logged_500_and_unhealthy(env: Env) -> None:
    await env.store.close()
    resp = await env.client.get("/api/v1/recordings", headers=auth())
    assert (await error_of(resp, 500))["code"] == "internal_error"
    assert (await env.client.get("/healthz")).status == 503
    await env.store.open()


def test_app_is_an_aiohttp_application(tmp_path: Path) -> None:
    assert isinstance(create_app(make_config(tmp_path), SqliteMetadataStore(":memory:")), web.Application)


@pytest.mark.parametrize(
    "path",
    [
        "/api/v1/recordings?limit=%C2%B2",  # superscript two: isdigit() but not int()
        "/api/v1/recordings?limit=99999999999999999999",
        "/api/v1/recordings?start_after=%00",
        "/api/v1/recordings?start_after=2024-05-01T08:00:00%2B99:00",
        "/api/v1/recordings?start_before=9999-12-31T23:59:59-23:59",
        "/api/v1/recordings?cursor=%E2%9C%93",
        "/api/v1/recordings?cursor=WyJhIiwgMV0",  # ["a", 1]
        "/api/v1/recordings?call_id=" + "x" * 3000,
        "/api/v1/recordings/%E2%9C%93",
        "/api/v1/recordings/" + "a" * 300,
        "/api/v1/recordings/r1/audio?sig=x&tenant=acme&expires=%C2%B2",
        "/api/v1/recordings/r1/audio?sig=x&tenant=acme&expires=99999999999999999999999",
        "/api/v1/recordings/r1/audio?sig=x&sig=y",
    ],
)
async def test_nasty_requests_are_client_errors(env: Env, path: str) -> None:
    await env.add("r1")
    resp = await env.client.get(path, headers=auth())
    assert 400 <= resp.status < 500, (path, resp.status, await resp.text())
    await error_of(resp, resp.status)


async def test_nasty_range_headers(env: Env) -> None:
    await env.add("r1", payload=b"0123456789")
    for rng in ("bytes=%s-" % ("9" * 40), "bytes=\u00b2-3", "bytes=0-1,2-3", "bytes=--1", "bytes=1-0"):
        resp = await env.client.get("/api/v1/recordings/r1/audio", headers={**auth(), "Range": rng})
        assert resp.status in (200, 206, 416), (rng, resp.status)

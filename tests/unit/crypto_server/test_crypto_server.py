"""The Crypto Server in process: keystore permissions and contents, unwrap, key management."""

from __future__ import annotations

import base64
import logging
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from services import config as config_mod
from services.config import ClusterConfig
from services.crypto_server import daemon
from services.crypto_server.app import create_app
from services.crypto_server.keystore import Keystore, KeystoreError, UnknownKey
from services.storage import envelope
from services.storage.envelope import CertificateError, EnvelopeError
from tests.helpers.certs import CertPair, make_cert

INTERNAL = "crypto-internal-0123456789"
ADMIN = "crypto-admin-0123456789"


@pytest.fixture(scope="module")
def acme_cert() -> CertPair:
    return make_cert("acme")


@pytest.fixture(scope="module")
def globex_cert() -> CertPair:
    return make_cert("globex")


def make_config(tmp_path: Path, **crypto: object) -> ClusterConfig:
    return config_mod.from_dict(
        {
            "crypto_server": {
                "keystore_dir": "keystore",
                "internal_token": INTERNAL,
                "admin_token": ADMIN,
                **crypto,
            },
            "tenants": [
                {"id": "acme", "api_key": "acme-key-0123456789abcdef"},
                {"id": "globex", "api_key": "globex-key-0123456789abcdef"},
            ],
        },
        base_dir=str(tmp_path),
        environ={},
    )


def wrapped_for(cert: CertPair, data_key: bytes) -> bytes:
    return envelope.wrap_key(data_key, envelope.load_certificate(cert.cert_pem))


# --- keystore -------------------------------------------------------------------------------------


def new_keystore(tmp_path: Path) -> Keystore:
    ks = Keystore(tmp_path / "keystore")
    ks.ensure_root()
    return ks


def test_keystore_add_list_unwrap(tmp_path: Path, acme_cert: CertPair, globex_cert: CertPair) -> None:
    ks = new_keystore(tmp_path)
    assert (ks.root.stat().st_mode & 0o777) == 0o700
    info, created = ks.add("acme", acme_cert.cert_pem, acme_cert.key_pem)
    assert created and info.key_id == acme_cert.key_id and info.bits == 2048
    assert ks.add("acme", acme_cert.cert_pem, acme_cert.key_pem) == (info, False)
    ks.add("globex", globex_cert.cert_pem, globex_cert.key_pem)
    path = ks.root / "acme" / f"{acme_cert.key_id}.pem"
    assert (path.stat().st_mode & 0o777) == 0o600 and (path.parent.stat().st_mode & 0o777) == 0o700
    assert [i.key_id for i in ks.list("acme")] == [acme_cert.key_id]
    assert ks.list("initech") == []
    assert ks.check() == 2
    data_key = os.urandom(32)
    assert ks.unwrap("acme", acme_cert.key_id, wrapped_for(acme_cert, data_key)) == data_key
    # a tenant's keys only: globex's key id is unknown under acme
    with pytest.raises(UnknownKey, match="holds no key"):
        ks.unwrap("acme", globex_cert.key_id, wrapped_for(globex_cert, data_key))
    with pytest.raises(EnvelopeError, match="does not unwrap"):
        ks.unwrap("acme", acme_cert.key_id, wrapped_for(globex_cert, data_key))
    with pytest.raises(UnknownKey, match="not 64 lower-case hex"):
        ks.unwrap("acme", "../globex/" + globex_cert.key_id, b"x")
    with pytest.raises(UnknownKey, match="not a valid tenant"):
        ks.unwrap("../acme", acme_cert.key_id, b"x")


def test_keystore_refuses_bad_pairs(tmp_path: Path, acme_cert: CertPair, globex_cert: CertPair) -> None:
    ks = new_keystore(tmp_path)
    with pytest.raises(EnvelopeError, match="does not belong to the certificate"):
        ks.add("acme", acme_cert.cert_pem, globex_cert.key_pem)
    weak = make_cert("weak", bits=1024)
    with pytest.raises(CertificateError, match="at least 2048"):
        ks.add("acme", weak.cert_pem, weak.key_pem)
    with pytest.raises(EnvelopeError, match="not a readable PEM private key"):
        ks.add("acme", acme_cert.cert_pem, b"junk")
    assert ks.check() == 0


def test_keystore_generate_rotates(tmp_path: Path) -> None:
    ks = new_keystore(tmp_path)
    first = ks.generate("acme", bits=2048, days=30)
    second = ks.generate("acme", bits=2048, days=30, common_name="acme 2")
    assert first.key_id != second.key_id
    assert {i.key_id for i in ks.list("acme")} == {first.key_id, second.key_id}
    assert "PRIVATE" not in first.certificate_pem
    cert = envelope.load_certificate(second.certificate_pem)
    data_key = os.urandom(32)
    assert ks.unwrap("acme", second.key_id, envelope.wrap_key(data_key, cert)) == data_key
    with pytest.raises(EnvelopeError, match="bits must be one of"):
        ks.generate("acme", bits=1024)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda root, f: root.chmod(0o755), r"keystore directory .* \(mode 755\): chmod 700"),
        (lambda root, f: f.parent.chmod(0o750), r"tenant directory .* \(mode 750\): chmod 700"),
        (lambda root, f: f.chmod(0o644), r"key file .* \(mode 644\): chmod 600"),
        (lambda root, f: f.chmod(0o640), r"key file .* \(mode 640\): chmod 600"),
        (lambda root, f: f.write_bytes(b"garbage"), "must hold a PEM private key and a PEM certificate"),
        (lambda root, f: f.rename(f.with_name("a" * 64 + ".pem")), "holds the certificate of key"),
        (lambda root, f: (root / "notes.txt").write_text("x"), "is not a tenant directory"),
        (lambda root, f: (f.parent / "readme").write_text("x"), r"is not named <key id>\.pem"),
    ],
)
def test_keystore_check_refuses_unsafe_or_broken_contents(
    tmp_path: Path, acme_cert: CertPair, damage, message: str
) -> None:
    ks = new_keystore(tmp_path)
    ks.add("acme", acme_cert.cert_pem, acme_cert.key_pem)
    damage(ks.root, ks.root / "acme" / f"{acme_cert.key_id}.pem")
    with pytest.raises(KeystoreError, match=message):
        Keystore(ks.root).check()


def test_keystore_rechecks_a_key_file_on_every_use(tmp_path: Path, acme_cert: CertPair) -> None:
    ks = new_keystore(tmp_path)
    ks.add("acme", acme_cert.cert_pem, acme_cert.key_pem)
    wrapped = wrapped_for(acme_cert, b"k" * 32)
    assert ks.unwrap("acme", acme_cert.key_id, wrapped) == b"k" * 32
    (ks.root / "acme" / f"{acme_cert.key_id}.pem").chmod(0o604)
    with pytest.raises(KeystoreError, match="accessible by group or others"):
        ks.unwrap("acme", acme_cert.key_id, wrapped)


async def test_daemon_refuses_to_start_on_an_unsafe_keystore(tmp_path: Path, acme_cert: CertPair) -> None:
    cfg = make_config(tmp_path)
    ks = new_keystore(tmp_path)
    ks.add("acme", acme_cert.cert_pem, acme_cert.key_pem)
    ks.root.chmod(0o711)
    with pytest.raises(
        config_mod.ConfigError, match=r"crypto_server.keystore_dir: keystore directory .* \(mode 711\)"
    ):
        await daemon.run(cfg)


# --- the API --------------------------------------------------------------------------------------


@dataclass
class Env:
    client: TestClient
    keystore: Keystore


@pytest.fixture
async def env(tmp_path: Path, acme_cert: CertPair, globex_cert: CertPair) -> AsyncIterator[Env]:
    cfg = make_config(tmp_path)
    ks = new_keystore(tmp_path)
    ks.add("acme", acme_cert.cert_pem, acme_cert.key_pem)
    ks.add("globex", globex_cert.cert_pem, globex_cert.key_pem)
    client = TestClient(TestServer(create_app(cfg, ks)))
    await client.start_server()
    try:
        yield Env(client, ks)
    finally:
        await client.close()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def unwrap_body(tenant: str, cert: CertPair, wrapped: bytes) -> dict[str, str]:
    return {
        "tenant": tenant,
        "key_id": cert.key_id,
        "wrapped_key": base64.b64encode(wrapped).decode(),
        "recording_id": "rec-1",
        "requester": "test",
    }


async def test_unwrap_returns_the_data_key_with_an_audit_line(
    env: Env, acme_cert: CertPair, caplog: pytest.LogCaptureFixture
) -> None:
    data_key = os.urandom(32)
    with caplog.at_level(logging.INFO, logger="callvault.audit"):
        resp = await env.client.post(
            "/api/v1/unwrap",
            json=unwrap_body("acme", acme_cert, wrapped_for(acme_cert, data_key)),
            headers=bearer(INTERNAL),
        )
        assert resp.status == 200
        body = await resp.json()
    assert base64.b64decode(body["data_key"]) == data_key and body["key_id"] == acme_cert.key_id
    lines = [r.getMessage() for r in caplog.records if r.name == "callvault.audit"]
    assert len(lines) == 1
    assert f"tenant=acme key_id={acme_cert.key_id} recording=rec-1 requester=test" in lines[0]
    assert lines[0].endswith("-> ok") and data_key.hex() not in lines[0]


async def test_unwrap_refusals(env: Env, acme_cert: CertPair, globex_cert: CertPair, caplog) -> None:
    data_key = os.urandom(32)
    globex_wrapped = wrapped_for(globex_cert, data_key)
    cases = [
        # globex's recording asked for as acme: acme holds no such key
        (unwrap_body("acme", globex_cert, globex_wrapped), INTERNAL, 404, "unknown_key"),
        # acme's key id with a key wrapped for globex: does not unwrap
        (unwrap_body("acme", acme_cert, globex_wrapped), INTERNAL, 422, "unwrap_failed"),
        (unwrap_body("initech", acme_cert, globex_wrapped), INTERNAL, 404, "unknown_tenant"),
        (unwrap_body("globex", globex_cert, globex_wrapped), "wrong-token", 401, "unauthorized"),
        (unwrap_body("globex", globex_cert, globex_wrapped), ADMIN, 401, "unauthorized"),
        (
            {**unwrap_body("globex", globex_cert, globex_wrapped), "key_id": "xyz"},
            INTERNAL,
            400,
            "bad_request",
        ),
        (
            {**unwrap_body("globex", globex_cert, globex_wrapped), "wrapped_key": "!!"},
            INTERNAL,
            400,
            "bad_request",
        ),
        ({"tenant": "globex"}, INTERNAL, 400, "bad_request"),
    ]
    with caplog.at_level(logging.INFO, logger="callvault.audit"):
        for body, token, status, code in cases:
            resp = await env.client.post("/api/v1/unwrap", json=body, headers=bearer(token))
            assert resp.status == status, body
            assert (await resp.json())["error"]["code"] == code
    audits = [r.getMessage() for r in caplog.records if r.name == "callvault.audit"]
    assert [a.rsplit("-> ", 1)[1] for a in audits] == ["unknown key", "does not unwrap", "unknown tenant"]
    resp = await env.client.post("/api/v1/unwrap", data=b"{nope", headers=bearer(INTERNAL))
    assert resp.status == 400 and "not valid JSON" in (await resp.json())["error"]["message"]


async def test_unwrap_with_candidates_uses_the_first_key_the_tenant_holds(
    env: Env, acme_cert: CertPair, globex_cert: CertPair, caplog: pytest.LogCaptureFixture
) -> None:
    data_key = os.urandom(32)
    other = make_cert("not-in-keystore")

    def candidate(cert: CertPair) -> dict[str, str]:
        return {"key_id": cert.key_id, "wrapped_key": base64.b64encode(wrapped_for(cert, data_key)).decode()}

    # a recording wrapped for three certificates, of which acme holds the last one only
    body = {"tenant": "acme", "candidates": [candidate(other), candidate(globex_cert), candidate(acme_cert)]}
    with caplog.at_level(logging.INFO, logger="callvault.audit"):
        resp = await env.client.post("/api/v1/unwrap", json=body, headers=bearer(INTERNAL))
        assert resp.status == 200
        got = await resp.json()
    assert got["key_id"] == acme_cert.key_id and base64.b64decode(got["data_key"]) == data_key
    (line,) = [r.getMessage() for r in caplog.records if r.name == "callvault.audit"]
    assert line.endswith(f"-> ok with {acme_cert.key_id}")
    body = {"tenant": "acme", "candidates": [candidate(other), candidate(globex_cert)]}
    resp = await env.client.post("/api/v1/unwrap", json=body, headers=bearer(INTERNAL))
    assert resp.status == 404 and (await resp.json())["error"]["code"] == "unknown_key"
    for bad in ([], [1], [candidate(acme_cert)] * 17, "x"):
        resp = await env.client.post(
            "/api/v1/unwrap", json={"tenant": "acme", "candidates": bad}, headers=bearer(INTERNAL)
        )
        assert resp.status == 400, bad


async def test_key_management_never_returns_a_private_key(env: Env, acme_cert: CertPair) -> None:
    resp = await env.client.get("/api/v1/tenants/acme/certificates", headers=bearer(ADMIN))
    assert resp.status == 200
    listed = await resp.json()
    assert [c["key_id"] for c in listed["certificates"]] == [acme_cert.key_id]
    # rotation: the server makes a new pair and hands out the certificate only
    resp = await env.client.post(
        "/api/v1/tenants/acme/certificates",
        json={"generate": True, "bits": 2048, "days": 90},
        headers=bearer(ADMIN),
    )
    assert resp.status == 201
    new = await resp.json()
    assert "PRIVATE" not in await resp.text()
    assert resp.headers["Location"].endswith(new["key_id"])
    resp = await env.client.get(f"/api/v1/tenants/acme/certificates/{new['key_id']}", headers=bearer(ADMIN))
    assert (await resp.json())["certificate"] == new["certificate"]
    resp = await env.client.get("/api/v1/tenants/acme/certificates", headers=bearer(ADMIN))
    text = await resp.text()
    assert "PRIVATE" not in text
    assert {c["key_id"] for c in (await resp.json())["certificates"]} == {acme_cert.key_id, new["key_id"]}
    # import an existing pair: 201 the first time, 200 after
    other = make_cert("imported")
    for status in (201, 200):
        resp = await env.client.post(
            "/api/v1/tenants/globex/certificates",
            json={"certificate": other.cert_pem.decode(), "private_key": other.key_pem.decode()},
            headers=bearer(ADMIN),
        )
        assert resp.status == status and "PRIVATE" not in await resp.text()
    data_key = os.urandom(32)
    cert = envelope.load_certificate(new["certificate"])
    body = {
        "tenant": "acme",
        "key_id": new["key_id"],
        "wrapped_key": base64.b64encode(envelope.wrap_key(data_key, cert)).decode(),
    }
    resp = await env.client.post("/api/v1/unwrap", json=body, headers=bearer(INTERNAL))
    assert base64.b64decode((await resp.json())["data_key"]) == data_key


async def test_key_management_refusals(env: Env, acme_cert: CertPair, globex_cert: CertPair) -> None:
    url = "/api/v1/tenants/acme/certificates"
    assert (await env.client.get(url, headers=bearer(INTERNAL))).status == 401
    assert (await env.client.get(url)).status == 401
    assert (await env.client.get("/api/v1/tenants/initech/certificates", headers=bearer(ADMIN))).status == 404
    weak = make_cert("weak", bits=1024)
    for body, message in [
        ({"certificate": weak.cert_pem.decode(), "private_key": weak.key_pem.decode()}, "at least 2048"),
        (
            {"certificate": acme_cert.cert_pem.decode(), "private_key": globex_cert.key_pem.decode()},
            "does not belong",
        ),
        ({"certificate": "x", "private_key": "y"}, "not an X.509 PEM certificate"),
        ({"generate": True, "bits": 1000}, "bits must be one of"),
        ({"generate": True, "bits": "many"}, "must be integers"),
        ({"something": 1}, "expected"),
    ]:
        resp = await env.client.post(url, json=body, headers=bearer(ADMIN))
        assert resp.status == 400, body
        assert message in (await resp.json())["error"]["message"]


async def test_disabled_tokens(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, internal_token="", admin_token="")
    client = TestClient(TestServer(create_app(cfg, new_keystore(tmp_path))))
    await client.start_server()
    try:
        resp = await client.post("/api/v1/unwrap", json={}, headers=bearer(""))
        assert resp.status == 403 and "internal_token is not set" in (await resp.json())["error"]["message"]
        resp = await client.get("/api/v1/tenants/acme/certificates", headers=bearer(""))
        assert resp.status == 403 and "admin_token is not set" in (await resp.json())["error"]["message"]
        assert (await client.get("/healthz")).status == 200
    finally:
        await client.close()


def test_cli_refuses_an_unsafe_keystore_with_a_clear_error(tmp_path: Path, acme_cert: CertPair) -> None:
    """`callvault crypto-server` as a process: exit code 2 and one line naming the file and the fix."""
    ks = new_keystore(tmp_path)
    ks.add("acme", acme_cert.cert_pem, acme_cert.key_pem)
    key_file = ks.root / "acme" / f"{acme_cert.key_id}.pem"
    key_file.chmod(0o644)
    config_path = tmp_path / "c.toml"
    config_path.write_text(
        '[crypto_server]\nkeystore_dir = "keystore"\nport = 1\n[[tenants]]\nid = "acme"\napi_key = "acme-key-0123456789abcdef"\n'
    )
    proc = subprocess.run(
        [sys.executable, "-m", "services.cli", "crypto-server", "--config", str(config_path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2, proc.stderr
    assert f"configuration error: crypto_server.keystore_dir: key file {key_file}" in proc.stderr
    assert f"(mode 644): chmod 600 {key_file}" in proc.stderr
    assert "Traceback" not in proc.stderr

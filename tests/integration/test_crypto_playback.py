"""Encrypted recordings end to end: envelope on disk -> queue -> Recording Processor -> Web Services,
played back through two real Crypto Server processes (active/active, one of them SIGKILLed).

The Crypto Servers run as ``callvault crypto-server`` processes (services.lab.DaemonProcess) over one
keystore directory; Web Services and the Recording Processor run as tasks of the test's event loop
(both loops). The recordings are real speech WAVs (espeak-ng + sox) encrypted with
``envelope.encrypt_file`` for the tenant's certificate, as the MCP's writer does.
"""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import signal
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from services import config as config_mod
from services.config import ClusterConfig
from services.crypto_server.keystore import Keystore
from services.lab import DaemonProcess, LabPorts, to_toml
from services.recording_processor import daemon as rp_daemon
from services.storage import envelope
from services.storage.disk import DiskWriter, recording_key
from services.storage.queue import EventQueue
from services.storage.s3 import S3Client, S3Settings, S3Writer
from services.web_services import daemon as ws_daemon
from tests.helpers.audio import speech_wav
from tests.helpers.certs import CertPair, make_cert
from tests.helpers.seaweed import SeaweedS3

ACME_KEY = "acme-api-key-0123456789"
GLOBEX_KEY = "globex-api-key-0123456789"
INITECH_KEY = "initech-api-key-0123456789"
INTERNAL = "internal-token-abcdef0123456789"
CRYPTO_TOKEN = "crypto-token-abcdef0123456789"
T0 = datetime(2024, 6, 3, 9, 30, tzinfo=UTC)


@dataclass
class Cluster:
    """What outlives one test: the configuration file, keystore, certificates and Crypto Servers."""

    dir: Path
    config_path: Path
    config: ClusterConfig
    certs: dict[str, CertPair]
    crypto: list[DaemonProcess]
    speech: Path
    s3: SeaweedS3

    def start_crypto(self, i: int) -> None:
        d = self.crypto[i]
        d.start()
        for _ in range(300):
            if d.is_ready():
                return
            assert d.alive(), f"{d.label} exited:\n{d.tail()}"
            time.sleep(0.05)
        raise AssertionError(f"{d.label} did not become ready:\n{d.tail()}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("crypto")
    ports = LabPorts.free(mcps=0)  # free ports: web and the two Crypto Servers are used
    crypto_ports = ports.crypto
    certs = {"acme": make_cert("acme"), "globex": make_cert("globex"), "initech": make_cert("initech")}
    s3 = SeaweedS3(root / "s3")
    for tenant, cert in certs.items():
        cert.write(root / "certs", tenant)
    data = {
        "storage": {
            "disk_root": "storage",
            "queue_dir": "queue",
            **{k.split(".", 1)[1]: v for k, v in s3.config_patch().items()},
        },
        "web_services": {
            "host": "127.0.0.1",
            "port": ports.web,
            "database": "meta.sqlite3",
            "internal_token": INTERNAL,
        },
        "recording_processor": {
            "web_services_url": f"http://127.0.0.1:{ports.web}",
            "poll_interval": 0.05,
            "max_backoff": 0.4,
        },
        "crypto_server": {
            "host": "127.0.0.1",
            "port": crypto_ports[0],
            "keystore_dir": "keystore",
            "internal_token": CRYPTO_TOKEN,
            "admin_token": "crypto-admin-abcdef0123456789",
            "urls": [f"http://127.0.0.1:{p}" for p in crypto_ports],
            "request_timeout": 2.0,
            "key_cache_seconds": 0,  # every playback asks a Crypto Server
        },
        "tenants": [
            {"id": t, "api_key": k, "profile": {"certificates": [f"certs/{t}.crt"], "storage": kind}}
            for t, k, kind in (
                ("acme", ACME_KEY, "disk"),
                ("globex", GLOBEX_KEY, "disk"),
                ("initech", INITECH_KEY, "s3"),
            )
        ],
    }
    config_path = root / "cluster.toml"
    config_path.write_text(to_toml(data))
    config = config_mod.load(config_path, environ={})
    keystore = Keystore(config.path("keystore"))
    keystore.ensure_root()
    for tenant, cert in certs.items():
        keystore.add(tenant, cert.cert_pem, cert.key_pem)
    procs = [
        DaemonProcess(
            f"crypto-server{i + 1}",
            ["crypto-server", "--set", f"crypto_server.port={port}"],
            config_path,
            root / "log",
        )
        for i, port in enumerate(crypto_ports)
    ]
    speech = speech_wav(root / "speech.wav", "This call is recorded and encrypted at rest.", pad_s=6.0)
    c = Cluster(root, config_path, config, certs, procs, speech, s3)
    try:
        s3.start()
        for i in range(len(procs)):
            c.start_crypto(i)
        yield c
    finally:
        for d in procs:
            d.signal(signal.SIGTERM)
        for d in procs:
            if not d.wait(10):
                d.signal(signal.SIGKILL)
                d.wait(5)
        s3.stop()


@dataclass
class Env:
    cluster: Cluster
    config: ClusterConfig
    base_url: str
    queue: EventQueue
    disk: DiskWriter
    session: aiohttp.ClientSession

    async def record(self, tenant: str, certs: list[str] | None = None) -> tuple[dict[str, Any], bytes]:
        """What the MCP does at BYE for an encrypted tenant: WAV -> envelope in storage -> event."""
        rid = uuid.uuid4().hex
        spool = self.cluster.dir / "spool"
        spool.mkdir(exist_ok=True)
        plain_path = spool / f"{rid}.wav"
        shutil.copyfile(self.cluster.speech, plain_path)
        plain = plain_path.read_bytes()
        sealed = spool / f"{rid}.wav.enc"
        profile_certs = self.config.tenant(tenant).profile.certificates  # type: ignore[union-attr]
        meta = await asyncio.to_thread(envelope.encrypt_file, plain_path, sealed, certs or profile_certs)
        plain_path.unlink()
        key = recording_key(tenant, T0, rid)
        if self.config.tenant(tenant).profile.storage == "s3":  # type: ignore[union-attr]
            writer = S3Writer(S3Settings.from_config(self.config.storage))
            try:
                stored = await writer.store(sealed, key, content_type="application/octet-stream")
            finally:
                await writer.close()
        else:
            stored = await self.disk.store(sealed, key)
        seconds = (len(plain) - 44) / 16000
        await self.queue.put(
            {
                "id": rid,
                "tenant": tenant,
                "session_id": uuid.uuid4().hex,
                "part": 1,
                "call_id": f"{rid[:8]}@10.0.0.1",
                "from_uri": "sip:1001@example",
                "to_uri": "sip:1002@example",
                "caller": "1001",
                "callee": "1002",
                "direction": "internal",
                "start": T0.isoformat(),
                "end": (T0 + timedelta(seconds=seconds)).isoformat(),
                "codec": "PCMU",
                "format": "wav",
                "channels": 1,
                "sample_rate": 8000,
                # as the MCP does: size/sha256 describe the audio, storage.* the stored envelope
                "size": meta["plaintext_size"],
                "sha256": meta["plaintext_sha256"],
                "storage": stored.to_dict(),
                "mcp": "mcp1",
                "streams": [],
                "encryption": meta,
            }
        )
        api_key = {"acme": ACME_KEY, "globex": GLOBEX_KEY, "initech": INITECH_KEY}[tenant]
        for _ in range(200):
            async with self.get(f"/api/v1/recordings/{rid}", api_key) as resp:
                if resp.status == 200:
                    return await resp.json(), plain
            await asyncio.sleep(0.05)
        raise AssertionError(f"recording {rid} was not indexed")

    def get(self, path: str, key: str = ACME_KEY, **headers: str) -> Any:
        return self.session.get(self.base_url + path, headers={"Authorization": f"Bearer {key}", **headers})


@pytest.fixture
async def env(cluster: Cluster) -> AsyncIterator[Env]:
    config = config_mod.load(cluster.config_path, environ={})
    tasks = []
    for module in (ws_daemon, rp_daemon):
        ready = asyncio.Event()
        task = asyncio.create_task(module.run(config, ready=ready.set))
        waiter = asyncio.create_task(ready.wait())
        done, _ = await asyncio.wait({task, waiter}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            task.result()
        waiter.cancel()
        assert ready.is_set()
        tasks.append(task)
    async with aiohttp.ClientSession() as session:
        try:
            yield Env(
                cluster,
                config,
                f"http://127.0.0.1:{config.web_services.port}",
                EventQueue(config.path("queue")),
                DiskWriter(config.path("storage")),
                session,
            )
        finally:
            for task in reversed(tasks):
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)


async def test_stored_object_is_no_wav_and_plays_back_bit_identical(env: Env) -> None:
    doc, plain = await env.record("acme")
    enc = doc["encryption"]
    assert enc["algorithm"] == envelope.ALGORITHM and enc["key_ids"] == [env.cluster.certs["acme"].key_id]
    assert enc["plaintext_sha256"] == hashlib.sha256(plain).hexdigest()
    assert enc["plaintext_size"] == len(plain) and "key" not in {k.lower() for k in enc}
    # on disk: not a WAV, and no piece of the audio in clear
    stored = env.disk.path(doc["storage"]["key"]).read_bytes()
    assert plain.startswith(b"RIFF") and not stored.startswith(b"RIFF") and b"WAVE" not in stored
    for offset in range(44, len(plain) - 16, len(plain) // 50):
        assert plain[offset : offset + 16] not in stored
    # through the API: the original bytes
    async with env.get(f"/api/v1/recordings/{doc['id']}/audio") as resp:
        assert resp.status == 200 and resp.headers["Content-Type"] == "audio/wav"
        body = await resp.read()
    assert int(resp.headers["Content-Length"]) == len(plain)
    assert hashlib.sha256(body).hexdigest() == enc["plaintext_sha256"]


async def test_ranged_requests_are_bit_identical(env: Env) -> None:
    doc, plain = await env.record("acme")
    n, chunk = len(plain), doc["encryption"]["chunk_size"]
    assert n > 2 * chunk, "the speech sample must span several chunks"
    ranges = {
        "bytes=0-43": (0, 43),
        f"bytes={chunk - 10}-{chunk + 9}": (chunk - 10, chunk + 9),  # across a chunk boundary
        f"bytes={chunk}-{2 * chunk - 1}": (chunk, 2 * chunk - 1),  # exactly one chunk
        f"bytes={n - 1000}-": (n - 1000, n - 1),
        "bytes=-77": (n - 77, n - 1),
        f"bytes=1000-{n + 5000}": (1000, n - 1),
    }
    for header, (first, last) in ranges.items():
        async with env.get(f"/api/v1/recordings/{doc['id']}/audio", Range=header) as resp:
            assert resp.status == 206, header
            assert resp.headers["Content-Range"] == f"bytes {first}-{last}/{n}"
            assert await resp.read() == plain[first : last + 1], header
    async with env.get(f"/api/v1/recordings/{doc['id']}/audio", Range=f"bytes={n}-") as resp:
        assert resp.status == 416 and resp.headers["Content-Range"] == f"bytes */{n}"
    # a signed URL plays the same bytes
    async with env.session.post(
        f"{env.base_url}/api/v1/recordings/{doc['id']}/audio-url",
        headers={"Authorization": f"Bearer {ACME_KEY}"},
    ) as resp:
        url = (await resp.json())["url"]
    async with env.session.get(env.base_url + url) as resp:
        assert hashlib.sha256(await resp.read()).hexdigest() == doc["encryption"]["plaintext_sha256"]


async def test_encrypted_recording_in_s3_plays_back_bit_identical(env: Env) -> None:
    doc, plain = await env.record("initech")
    assert doc["storage"]["kind"] == "s3" and doc["encryption"]["key_ids"] == [
        env.cluster.certs["initech"].key_id
    ]
    client = S3Client(S3Settings.from_config(env.config.storage))
    try:
        stored = b"".join(
            [
                c
                async for c in client.iter_range(
                    doc["storage"]["key"], 0, doc["storage"]["size"] - 1, 1 << 20
                )
            ]
        )
    finally:
        await client.close()
    assert stored.startswith(envelope.MAGIC) and plain[2000:2032] not in stored
    async with env.get(f"/api/v1/recordings/{doc['id']}/audio", INITECH_KEY) as resp:
        assert resp.status == 200
        assert hashlib.sha256(await resp.read()).hexdigest() == doc["encryption"]["plaintext_sha256"]
    n = len(plain)
    for first, last in ((0, 99), (65000, 70000), (n - 10, n - 1)):
        async with env.get(
            f"/api/v1/recordings/{doc['id']}/audio", INITECH_KEY, Range=f"bytes={first}-{last}"
        ) as resp:
            assert resp.status == 206 and await resp.read() == plain[first : last + 1]


async def test_many_certificates_a_header_over_4_kib(env: Env) -> None:
    """14 certificates (rotation gone wild): the header no longer fits Web Services' first read."""
    extra = [make_cert(f"extra{i}").write(env.cluster.dir / "certs", f"extra{i}")[0] for i in range(13)]
    doc, plain = await env.record("acme", certs=[*map(str, extra), str(env.cluster.dir / "certs/acme.crt")])
    assert len(doc["encryption"]["key_ids"]) == 14
    with open(env.disk.path(doc["storage"]["key"]), "rb") as f:
        assert envelope.read_header(f).data_offset > 4096
    async with env.get(f"/api/v1/recordings/{doc['id']}/audio", Range="bytes=100-199") as resp:
        assert resp.status == 206 and await resp.read() == plain[100:200]


async def test_one_tenant_cannot_read_anothers_recordings(env: Env) -> None:
    doc, _ = await env.record("globex")
    # globex's recording with acme's API key: not found, like a missing one
    async with env.get(f"/api/v1/recordings/{doc['id']}/audio", ACME_KEY) as resp:
        assert resp.status == 404
    async with env.get(f"/api/v1/recordings/{doc['id']}/audio", GLOBEX_KEY) as resp:
        assert resp.status == 200
    # an object sealed for globex's key filed under acme: acme's keys cannot open it
    misfiled, _ = await env.record("acme", certs=[str(env.cluster.dir / "certs/globex.crt")])
    async with env.get(f"/api/v1/recordings/{misfiled['id']}/audio", ACME_KEY) as resp:
        assert resp.status == 403
        assert (await resp.json())["error"]["code"] == "key_unavailable"


async def test_damaged_object_is_a_clear_error(env: Env) -> None:
    doc, _ = await env.record("acme")
    path = env.disk.path(doc["storage"]["key"])
    raw = path.read_bytes()
    path.write_bytes(raw[:-100])  # truncated
    async with env.get(f"/api/v1/recordings/{doc['id']}/audio") as resp:
        assert resp.status == 502
        body = await resp.json()
    assert body["error"]["code"] == "audio_corrupt" and "truncated" in body["error"]["message"]
    # a flipped byte in the middle: the bytes before it are served, then the connection is cut
    damaged = bytearray(raw)
    damaged[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(damaged))
    with pytest.raises(aiohttp.ClientPayloadError):
        async with env.get(f"/api/v1/recordings/{doc['id']}/audio") as resp:
            assert resp.status == 200
            await resp.read()


async def test_a_killed_crypto_server_the_other_serves(env: Env) -> None:
    """Last in the module: it kills and restarts the Crypto Servers."""
    cluster = env.cluster
    docs = [await env.record("acme") for _ in range(3)]

    async def play(doc: dict[str, Any]) -> int:
        async with env.get(f"/api/v1/recordings/{doc['id']}/audio") as resp:
            body = await resp.read()
            if resp.status == 200:
                assert hashlib.sha256(body).hexdigest() == doc["encryption"]["plaintext_sha256"]
            return resp.status

    assert [await play(d) for d, _ in docs] == [200, 200, 200]
    cluster.crypto[0].signal(signal.SIGKILL)
    assert cluster.crypto[0].wait(5)
    # every request is served by the survivor (the key cache is off: each one asks)
    assert [await play(d) for d, _ in docs * 2] == [200] * 6
    cluster.crypto[1].signal(signal.SIGKILL)
    assert cluster.crypto[1].wait(5)
    async with env.get(f"/api/v1/recordings/{docs[0][0]['id']}/audio") as resp:
        assert resp.status == 503 and (await resp.json())["error"]["code"] == "crypto_unavailable"
    await asyncio.to_thread(cluster.start_crypto, 1)
    assert await play(docs[0][0]) == 200
    await asyncio.to_thread(cluster.start_crypto, 0)
    assert [await play(d) for d, _ in docs] == [200, 200, 200]

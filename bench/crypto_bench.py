"""Envelope encryption costs: encrypt a recording, decrypt it whole and by ranges, unwrap data keys.

A 10-minute stereo 8 kHz 16-bit WAV (the MCP's default output, 19.2 MB) is encrypted with
``envelope.encrypt_file`` for one RSA-3072 certificate, decrypted whole with ``decrypt_range`` and
by 1,000 random 4 KiB ranges (what a seeking player asks); RSA-OAEP unwraps are timed for 2048- and
3072-bit keys (the Crypto Server's work per playback). Prints the figures, then ``name: value``
headline lines.

    .venv/bin/python bench/crypto_bench.py [--minutes 10]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import random
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchlib import machine  # noqa: E402

from services import config as config_mod  # noqa: E402
from services.crypto_server.app import create_app as crypto_app  # noqa: E402
from services.crypto_server.keystore import Keystore  # noqa: E402
from services.storage import envelope  # noqa: E402
from services.storage.disk import recording_key  # noqa: E402
from services.storage.metadata import validate_document  # noqa: E402
from services.web_services.app import create_app as web_app  # noqa: E402
from services.web_services.store import SqliteMetadataStore  # noqa: E402
from tests.helpers.certs import make_cert  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    size = int(args.minutes * 60 * 8000 * 4) + 44
    with tempfile.TemporaryDirectory(prefix="crypto-bench-") as tmp:
        d = Path(tmp)
        plain = d / "rec.wav"
        plain.write_bytes(b"RIFF" + os.urandom(size - 4))
        cert = make_cert("bench", bits=3072)
        crt, _ = cert.write(d, "bench")
        sealed = d / "rec.wav.enc"
        t0 = time.perf_counter()
        meta = envelope.encrypt_file(plain, sealed, [str(crt)])
        t_enc = time.perf_counter() - t0
        private = envelope.load_private_key(cert.key_pem)
        with open(sealed, "rb") as f:
            header = envelope.read_header(f)
            key = envelope.unwrap_with_private_key(header.wrapped_keys[meta["key_ids"][0]], private)  # type: ignore[index]
            t0 = time.perf_counter()
            total = sum(len(p) for p in envelope.decrypt_range(f, key, 0, size - 1, header))
            t_dec = time.perf_counter() - t0
            assert total == size
            rng = random.Random(1)
            t0 = time.perf_counter()
            for _ in range(1000):
                first = rng.randrange(0, size - 4096)
                for _p in envelope.decrypt_range(f, key, first, first + 4095, header):
                    pass
            t_ranges = (time.perf_counter() - t0) / 1000
        overhead = sealed.stat().st_size - size
    mb = size / 1e6
    print(f"recording: {args.minutes:g} min stereo 8 kHz, {mb:.1f} MB; envelope overhead {overhead} bytes")
    print(
        f"encrypt_file: {t_enc * 1000:.0f} ms ({mb / t_enc:.0f} MB/s, {args.minutes * 60 / t_enc:.0f}x realtime)"
    )
    print(f"decrypt whole: {t_dec * 1000:.0f} ms ({mb / t_dec:.0f} MB/s)")
    print(f"decrypt a 4 KiB range: {t_ranges * 1e6:.0f} us (one 64 KiB chunk read and authenticated)")
    unwrap: dict[int, float] = {}
    for bits in (2048, 3072):
        c = make_cert(f"bench{bits}", bits=bits)
        cert_obj = envelope.load_certificate(c.cert_pem)
        priv = envelope.load_private_key(c.key_pem)
        wrapped = envelope.wrap_key(os.urandom(32), cert_obj)
        n = 200
        t0 = time.perf_counter()
        for _ in range(n):
            envelope.unwrap_with_private_key(wrapped, priv)
        unwrap[bits] = (time.perf_counter() - t0) / n
        print(f"RSA-{bits} OAEP unwrap: {unwrap[bits] * 1000:.2f} ms ({1 / unwrap[bits]:.0f}/s per core)")
    plain_s, enc_s = asyncio.run(http_playback(args.minutes))
    print(
        f"HTTP playback through Web Services, whole {mb:.1f} MB file: plain {plain_s * 1000:.0f} ms, encrypted {enc_s * 1000:.0f} ms"
    )
    print()
    print(f"playback_encrypted_mb_per_s: {mb / enc_s:.0f}")
    print(f"playback_plain_mb_per_s: {mb / plain_s:.0f}")
    print(f"encrypt_mb_per_s: {mb / t_enc:.0f}")
    print(f"decrypt_mb_per_s: {mb / t_dec:.0f}")
    print(f"range_4k_decrypt_us: {t_ranges * 1e6:.0f}")
    print(f"unwrap_rsa3072_per_s: {1 / unwrap[3072]:.0f}")
    return 0


async def http_playback(minutes: float) -> tuple[float, float]:
    """Seconds to GET a plain and an encrypted recording of ``minutes`` through Web Services
    (in process, aiohttp test servers on loopback, a real Crypto Server app and keystore)."""
    from aiohttp.test_utils import TestClient, TestServer

    with tempfile.TemporaryDirectory(prefix="crypto-bench-http-") as tmp:
        d = Path(tmp)
        cert = make_cert("bench-http", bits=3072)
        crt, _ = cert.write(d / "certs", "acme")
        keystore = Keystore(d / "keystore")
        keystore.ensure_root()
        keystore.add("acme", cert.cert_pem, cert.key_pem)
        base = {"tenants": [{"id": "acme", "api_key": "bench-api-key-0123456789"}]}
        crypto_cfg = config_mod.from_dict({**base, "crypto_server": {"internal_token": "t" * 20}}, environ={})
        crypto = TestServer(crypto_app(crypto_cfg, keystore))
        await crypto.start_server()
        cfg = config_mod.from_dict(
            {
                **base,
                "storage": {"disk_root": "storage"},
                "crypto_server": {"internal_token": "t" * 20, "urls": [str(crypto.make_url("")).rstrip("/")]},
                "web_services": {"url_signing_key": "bench-signing-key"},
            },
            base_dir=str(d),
            environ={},
        )
        store = SqliteMetadataStore(d / "meta.sqlite3")
        await store.open()
        client = TestClient(TestServer(web_app(cfg, store)))
        await client.start_server()
        size = int(minutes * 60 * 8000 * 4) + 44
        src = d / "src.wav"
        src.write_bytes(b"RIFF" + os.urandom(size - 4))
        sha = hashlib.sha256(src.read_bytes()).hexdigest()
        times = []
        try:
            for rid, encrypted in (("plain", False), ("sealed", True)):
                key = recording_key("acme", datetime.now(UTC), rid)
                path = d / "storage" / key
                path.parent.mkdir(parents=True, exist_ok=True)
                extra = {}
                if encrypted:
                    extra["encryption"] = envelope.encrypt_file(src, path, [str(crt)])
                else:
                    path.write_bytes(src.read_bytes())
                await store.put(validate_document(_doc(rid, key, size, sha, **extra)))
                url = f"/api/v1/recordings/{rid}/audio"
                headers = {"Authorization": "Bearer bench-api-key-0123456789"}
                best = float("inf")
                for _ in range(3):
                    t0 = time.perf_counter()
                    async with client.get(url, headers=headers) as resp:
                        body = await resp.read()
                    best = min(best, time.perf_counter() - t0)
                    assert resp.status == 200 and hashlib.sha256(body).hexdigest() == sha
                times.append(best)
        finally:
            await client.close()
            await crypto.close()
            await store.close()
    return times[0], times[1]


def _doc(rid: str, key: str, size: int, sha: str, **extra: object) -> dict[str, object]:
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return {
        "id": rid, "tenant": "acme", "session_id": rid, "part": 1, "call_id": rid, "from_uri": "sip:a@x",
        "to_uri": "sip:b@x", "caller": "a", "callee": "b", "direction": "internal", "start": now, "end": now,
        "codec": "PCMU", "format": "wav", "channels": 2, "sample_rate": 8000, "size": size, "sha256": sha,
        "storage": {"kind": "disk", "key": key}, "mcp": "bench", "streams": [], **extra,
    }  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())

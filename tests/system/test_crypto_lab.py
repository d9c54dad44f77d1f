"""Encryption at rest through the whole real stack: a lab whose default tenant has a certificate.

The test makes an RSA key pair and certificate with `cryptography`, names the certificate in the
default tenant's IVR Profile, and imports the pair into the keystore through the second Crypto
Server's key-management API. Two baresip phones then place a recorded call with speech. The MCP
encrypts the recording in its spool; what lands in storage is an envelope (no WAV, no audio in
clear) that Web Services plays back through the Crypto Servers: the caller's speech is in the left
channel, ranges are exact, and with one Crypto Server SIGKILLed the other one serves.
"""

from __future__ import annotations

import hashlib
import json
import signal
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from services.lab import Lab, LabPorts, make_config, to_toml
from services.storage import envelope
from tests.helpers.audio import best_lag, read_wav, speech_wav
from tests.helpers.baresip import BaresipPhone
from tests.helpers.certs import CertPair, make_cert
from tests.system.conftest import LabApi, storage_file

pytestmark = pytest.mark.system


@pytest.fixture(scope="module")
def cert() -> CertPair:
    return make_cert("lab-default", bits=3072)


@pytest.fixture(scope="module")
def crypto_lab(tmp_path_factory: pytest.TempPathFactory, cert: CertPair) -> Iterator[Lab]:
    var = tmp_path_factory.mktemp("crypto-lab")
    cert.write(var / "certs", "default")
    data = make_config(LabPorts.free())
    data["tenants"][0]["profile"]["certificates"] = ["certs/default.crt"]
    data["crypto_server"]["key_cache_seconds"] = 0  # every playback asks a Crypto Server
    (var / "lab.toml").write_text(to_toml(data))
    lab = Lab(var)
    lab.start()
    try:
        yield lab
    finally:
        lab.stop()


def admin(lab: Lab, url: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    req = urllib.request.Request(
        url + path,
        data=json.dumps(body).encode() if body is not None else None,
        method="POST" if body is not None else "GET",
        headers={
            "Authorization": f"Bearer {lab.config.crypto_server.admin_token}",
            "Content-Type": "application/json",
        },
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return resp.status, json.loads(resp.read())


async def test_encrypted_tenant_end_to_end(tmp_path: Path, crypto_lab: Lab, cert: CertPair) -> None:
    lab = crypto_lab
    info = lab.info()
    urls = lab.config.crypto_server.instance_urls()
    assert len(urls) == 2 and {"crypto-server1", "crypto-server2"} <= set(lab.daemons)
    # the key pair goes in through the second instance; the first one reads it from the shared keystore
    status, added = admin(
        lab,
        urls[1],
        "/api/v1/tenants/default/certificates",
        {"certificate": cert.cert_pem.decode(), "private_key": cert.key_pem.decode()},
    )
    assert status == 201 and added["key_id"] == cert.key_id and "private" not in json.dumps(added).lower()
    status, listed = admin(lab, urls[0], "/api/v1/tenants/default/certificates")
    assert [c["key_id"] for c in listed["certificates"]] == [cert.key_id]

    users = {u["extension"]: u["password"] for u in info["users"]}
    sip_addr = f"{info['sip']['host']}:{info['sip']['port']}"
    caller_wav = speech_wav(tmp_path / "caller.wav", "this call is encrypted at rest", lead_s=0.3, pad_s=1.0)
    callee_wav = speech_wav(tmp_path / "callee.wav", "hello", pad_s=8.0)
    proxy = f'outbound="sip:{sip_addr};transport=udp"'
    caller = BaresipPhone(
        tmp_path / "a", "1001", users["1001"], sip_addr, audio_file=caller_wav, account_params=proxy
    )
    callee = BaresipPhone(
        tmp_path / "b", "1002", users["1002"], sip_addr, audio_file=callee_wav, account_params=proxy
    )
    t0 = datetime.now(UTC) - timedelta(seconds=1)
    async with callee, caller:
        await callee.wait_registered(10)
        await caller.wait_registered(10)
        await caller.dial(f"sip:1002@{info['sip']['domain']}")
        await caller.wait_established(10)
        await caller.wait_closed(20)
        await callee.wait_closed(5)

    api = LabApi(info["api"]["base_url"], info["api"]["api_key"])
    found = await api.wait_for(1, timeout=20, party="1001", start_after=t0.isoformat())
    assert len(found) == 1
    rec = found[0]
    enc = rec["encryption"]
    assert enc["algorithm"] == envelope.ALGORITHM and enc["key_ids"] == [cert.key_id]
    assert enc["plaintext_sha256"] == rec["sha256"] and enc["plaintext_size"] == rec["size"]

    # in storage: an envelope, not a WAV; its own size and hash in storage.*
    stored = storage_file(lab, rec).read_bytes()
    assert not stored.startswith(b"RIFF") and stored.startswith(envelope.MAGIC)
    assert (
        len(stored) == rec["storage"]["size"]
        and hashlib.sha256(stored).hexdigest() == rec["storage"]["sha256"]
    )

    # through the API: the original WAV, bit for bit, with the caller's speech on the left
    status, headers, audio = api.request(f"/recordings/{rec['id']}/audio")
    assert status == 200 and headers["Content-Type"] == "audio/wav"
    assert hashlib.sha256(audio).hexdigest() == rec["sha256"]
    for offset in range(44, len(audio) - 16, len(audio) // 40):
        if audio[offset : offset + 16].strip(b"\x00"):
            assert audio[offset : offset + 16] not in stored
    (tmp_path / "played.wav").write_bytes(audio)
    rate, samples = read_wav(tmp_path / "played.wav")
    _, peak = best_lag(read_wav(caller_wav)[1][:, 0], samples[:, 0], rate, 2.0)
    assert peak > 0.5, f"the caller's speech is not in the decrypted recording (peak {peak:.2f})"
    n = len(audio)
    for first, last in ((0, 43), (65530, 65545), (n - 500, n - 1)):
        status, headers, part = api.request(
            f"/recordings/{rec['id']}/audio", headers={"Range": f"bytes={first}-{last}"}
        )
        assert status == 206 and part == audio[first : last + 1]

    # one Crypto Server SIGKILLed: the other serves every request
    lab.kill("crypto-server1", signal.SIGKILL)
    for _ in range(4):
        status, _, again = api.request(f"/recordings/{rec['id']}/audio")
        assert status == 200 and again == audio
    lab.start_daemon("crypto-server1")
    lab.kill("crypto-server2", signal.SIGKILL)
    status, _, again = api.request(f"/recordings/{rec['id']}/audio")
    assert status == 200 and again == audio
    lab.start_daemon("crypto-server2")

"""The MCP's store path against a real S3 endpoint (SeaweedFS): a finished recording waits in the
spool while S3 is down and is uploaded when it returns; start-up recovery resumes pending uploads,
finishes recordings cut off by a crash and sets corrupt spool entries aside; recordings of tenants
with certificates are stored encrypted and decrypt to the recorded bytes.

The MCP's store path is driven directly (``McpServer._store`` / ``recover``); the SIP side is covered
by tests/unit/mcp and the whole chain by tests/system/test_storage_failures.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import struct
import time
import wave
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from services.config import IvrProfile, McpConfig
from services.mcp.server import McpServer
from services.mcp.session import RecordingSession, find_leftovers, write_sidecar
from services.mcp.xcv import BridgeRequest, CallInfo, encode_profile
from services.storage import envelope
from services.storage.disk import DiskWriter
from services.storage.queue import EventQueue
from services.storage.s3 import S3Client, journal_path
from services.storage.writer import StorageTargets
from tests.helpers.certs import make_cert
from tests.helpers.seaweed import SeaweedS3

OPENED = datetime(2025, 6, 7, 8, 9, 10, tzinfo=UTC)


@pytest.fixture(scope="module")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    s3 = SeaweedS3(tmp_path_factory.mktemp("seaweed"))
    s3.start()
    try:
        yield s3
    finally:
        s3.kill()  # nothing to keep: no need to wait for a clean stop


def bridge(storage: str = "s3", tenant: str = "acme") -> BridgeRequest:
    return BridgeRequest(tenant, "5e" * 16, 1, CallInfo("call-1", caller="1001", callee="1002"),
                         IvrProfile(storage=storage, channels=2))  # fmt: skip


def write_wav(path: Path, seconds: float, *, broken_header: bool = False) -> bytes:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(8000)
        frames = int(seconds * 8000)
        w.writeframes((bytes(range(256)) * (frames * 4 // 256 + 1))[: frames * 4])
    data = bytearray(path.read_bytes())
    if broken_header:  # what rtp_core leaves when its process is killed mid-recording
        data[4:8] = data[40:44] = struct.pack("<I", 0)
        path.write_bytes(bytes(data))
    return bytes(data)


def make_server(
    root: Path, seaweed: SeaweedS3, certificates: list[str] | None = None, client: S3Client | None = None
) -> McpServer:
    writer = StorageTargets(DiskWriter(root / "storage"), None)
    from services.storage.s3 import S3Writer

    client = client or S3Client(seaweed.settings(max_attempts=2), backoff=0.05)
    writer.s3 = S3Writer(client.settings, client)
    return McpServer(
        McpConfig(name="mcp1", spool_dir=str(root / "spool")), None, None,  # type: ignore[arg-type]
        spool=root / "spool", writer=writer, queue=EventQueue(root / "queue"),
        certificates=lambda tenant: list(certificates or []), max_backoff=0.5,
    )  # fmt: skip


def events(root: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted((root / "queue").glob("*.json"))]


async def wait_events(root: Path, n: int, timeout: float = 60.0) -> list[dict[str, Any]]:
    """The queued events once there are ``n`` (recovery uploads run in the background)."""
    deadline = time.monotonic() + timeout
    while len(found := events(root)) < n and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    return found


async def fetch(seaweed: SeaweedS3, key: str) -> bytes:
    client = S3Client(seaweed.settings())
    try:
        size, _ = await client.head(key) or (0, {})
        return b"".join([c async for c in client.iter_range(key, 0, size - 1)])
    finally:
        await client.close()


def session(root: Path, rid: str, storage: str = "s3") -> RecordingSession:
    spool = root / "spool"
    spool.mkdir(parents=True, exist_ok=True)
    s = RecordingSession(recording_id=rid, bridge=bridge(storage), engine_id=1, ports=(1, 2),
                         spool_path=spool / f"{rid}.wav.part", opened=OPENED, call_id=rid, local_tag="t",
                         codec="PCMU")  # fmt: skip
    s.dtmf[1].append("7")
    return s


STATS = {"duration": 1.0, "channels": 2, "legs": [{"packets": 50, "ssrc": 1}, {"packets": 49, "ssrc": 2}]}


async def test_recording_waits_while_s3_is_down_and_uploads_when_it_returns(
    seaweed: SeaweedS3, tmp_path: Path
) -> None:
    server = make_server(tmp_path, seaweed)
    s = session(tmp_path, "a1" * 16)
    audio = write_wav(s.spool_path, 1.0)
    seaweed.stop()
    try:
        task = asyncio.create_task(server._store(s, STATS, OPENED + timedelta(seconds=1)))
        await asyncio.sleep(2.0)
        assert not task.done() and events(tmp_path) == []
        record = json.loads((tmp_path / "spool" / f"{s.recording_id}.json").read_text())
        assert record["state"] == "pending" and record["dtmf"] == ["", "7"] and s.spool_path.exists()
    finally:
        seaweed.start()
    await asyncio.wait_for(task, 30)
    (event,) = events(tmp_path)
    assert event["storage"]["kind"] == "s3" and event["storage"]["bucket"] == seaweed.bucket
    assert event["storage"]["key"] == f"acme/2025/06/07/{s.recording_id}.wav"
    assert event["sha256"] == hashlib.sha256(audio).hexdigest() == event["storage"]["sha256"]
    assert event["streams"][1]["dtmf"] == "7" and event["streams"][0]["packets"] == 50
    assert hashlib.sha256(await fetch(seaweed, event["storage"]["key"])).hexdigest() == event["sha256"]
    assert list((tmp_path / "spool").iterdir()) == []
    await server.writer.close()


class StopsS3MidUpload(S3Client):
    """Stops the store when part 2 of a multipart upload is first sent (parts 1 and 3 in flight)."""

    def __init__(self, seaweed: SeaweedS3) -> None:
        super().__init__(seaweed.settings(max_attempts=2, part_size=5 * 1024 * 1024, part_concurrency=3),
                         backoff=0.05)  # fmt: skip
        self.seaweed = seaweed
        self.stopping: asyncio.Future[None] | None = None
        self.ops: list[str] = []

    async def call(self, op: str, what: str, **kwargs: Any) -> dict[str, Any]:
        self.ops.append(op)
        if op == "upload_part" and kwargs["PartNumber"] == 2 and self.stopping is None:
            # (a future of its own: when the other parts fail first, this part is cancelled)
            self.stopping = asyncio.ensure_future(asyncio.to_thread(self.seaweed.stop))
            await asyncio.shield(self.stopping)
        return await super().call(op, what, **kwargs)


async def test_multipart_upload_cut_by_an_s3_outage_resumes_when_s3_returns(
    seaweed: SeaweedS3, tmp_path: Path
) -> None:
    client = StopsS3MidUpload(seaweed)
    server = make_server(tmp_path, seaweed, client=client)
    s = session(tmp_path, hashlib.sha1(str(tmp_path).encode()).hexdigest()[:32])  # one per event loop
    audio = write_wav(s.spool_path, 400.0)  # 12.8 MB: 3 parts of 5 MiB, sent concurrently
    journal = journal_path(s.spool_path)
    task = asyncio.create_task(server._store(s, STATS, OPENED + timedelta(seconds=400)))
    try:
        while client.stopping is None:
            assert not task.done()
            await asyncio.sleep(0.05)
        await client.stopping
        await asyncio.sleep(2.0)  # the upload fails, is retried by the spool, fails again
        assert not task.done() and events(tmp_path) == []
        assert journal.exists() and s.spool_path.exists()  # kept for the resume, not aborted
        assert [t for t in asyncio.all_tasks() if t.get_name().startswith("s3 upload")] == []
    finally:
        if client.stopping is not None:
            await client.stopping
            seaweed.start()
    try:
        await asyncio.wait_for(task, 60)
        (event,) = events(tmp_path)
        assert event["sha256"] == hashlib.sha256(audio).hexdigest() == event["storage"]["sha256"]
        assert await fetch(seaweed, event["storage"]["key"]) == audio
        assert client.ops.count("create_multipart_upload") == 1 and "list_parts" in client.ops
        assert "abort_multipart_upload" not in client.ops
        assert list((tmp_path / "spool").iterdir()) == []
    finally:
        await server.writer.close()


def _sidecar(spool: Path, rid: str, **extra: Any) -> None:
    b = bridge()
    write_sidecar(spool, rid, {
        "id": rid, "mcp": "mcp1", "opened": OPENED.isoformat(), "tenant": b.tenant, "session_id": b.session_id,
        "part": 1, "call": b.call.to_dict(), "profile": encode_profile(b.profile), "codec": "PCMU", **extra,
    })  # fmt: skip


async def test_recovery_resumes_uploads_and_sets_corrupt_entries_aside(
    seaweed: SeaweedS3, tmp_path: Path
) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    pending, cut, junk, notwav = "b1" * 16, "b2" * 16, "b3" * 16, "b4" * 16
    # 1. Finished, killed during its upload: the pending record has the engine's stats.
    _sidecar(spool, pending, state="pending", start=OPENED.isoformat(),
             end=(OPENED + timedelta(seconds=1)).isoformat(), stats=STATS, dtmf=["12", ""])  # fmt: skip
    pending_audio = write_wav(spool / f"{pending}.wav.part", 1.0)
    # 2. Killed while recording: the header was never finalised.
    _sidecar(spool, cut)
    write_wav(spool / f"{cut}.wav.part", 0.5, broken_header=True)
    # 3-5. Corrupt: unreadable sidecar, audio that is not a WAV, audio without a sidecar.
    (spool / f"{junk}.json").write_text('{"id": "trunc')
    (spool / f"{junk}.wav.part").write_bytes(b"RIFF")
    _sidecar(spool, notwav)
    (spool / f"{notwav}.wav.part").write_bytes(b"\x00" * 10)
    (spool / "c0ffee.wav.part").write_bytes(b"orphan")

    leftovers = await asyncio.to_thread(find_leftovers, spool)
    assert sorted(left.recording_id for left in leftovers) == [pending, cut]
    server = make_server(tmp_path, seaweed)
    await server.recover(leftovers, wait=20)
    by_id = {e["id"]: e for e in await wait_events(tmp_path, 2)}
    assert set(by_id) == {pending, cut}
    assert by_id[pending]["sha256"] == hashlib.sha256(pending_audio).hexdigest()
    assert by_id[pending]["streams"][0]["dtmf"] == "12" and by_id[pending]["duration"] == 1.0
    assert by_id[cut]["duration"] == 0.5 and by_id[cut]["end"] == "2025-06-07T08:09:10.500000Z"
    cut_audio = await fetch(seaweed, by_id[cut]["storage"]["key"])
    (tmp_path / "cut.wav").write_bytes(cut_audio)
    with wave.open(str(tmp_path / "cut.wav")) as w:
        assert w.getnframes() == 4000  # the repaired header matches the audio
    bad = spool / "bad"
    assert sorted(p.name for p in bad.iterdir()) == sorted([
        f"{junk}.json", f"{junk}.wav.part", f"{junk}.json.reason", f"{notwav}.json", f"{notwav}.wav.part",
        f"{notwav}.json.reason", "c0ffee.wav.part", "c0ffee.wav.part.reason",
    ])  # fmt: skip
    assert "unreadable" in (bad / f"{junk}.json.reason").read_text()
    assert "not a WAV" in (bad / f"{notwav}.json.reason").read_text()
    assert "no sidecar" in (bad / "c0ffee.wav.part.reason").read_text()
    assert sorted(p.name for p in spool.iterdir()) == ["bad"]
    await server.writer.close()


async def test_recordings_of_a_tenant_with_certificates_are_stored_encrypted(
    seaweed: SeaweedS3, tmp_path: Path
) -> None:
    pair = make_cert("spool")
    crt, _ = pair.write(tmp_path / "keys", "acme")
    server = make_server(tmp_path, seaweed, certificates=[str(crt)])
    s = session(tmp_path, "c1" * 16)
    audio = write_wav(s.spool_path, 1.0)
    await asyncio.wait_for(server._store(s, STATS, OPENED + timedelta(seconds=1)), 30)
    (event,) = events(tmp_path)
    enc = event["encryption"]
    assert enc["algorithm"] == envelope.ALGORITHM and enc["key_ids"] == [pair.key_id]
    assert "key" not in json.dumps(enc).replace("key_ids", "")  # never the data key
    assert event["sha256"] == hashlib.sha256(audio).hexdigest() and event["size"] == len(audio)
    stored = await fetch(seaweed, event["storage"]["key"])
    assert stored.startswith(envelope.MAGIC) and audio[44:1044] not in stored
    assert event["storage"]["sha256"] == hashlib.sha256(stored).hexdigest() != event["sha256"]
    header = envelope.parse_header(stored[:4096])
    private = envelope.load_private_key(pair.key_pem)
    data_key = envelope.unwrap_with_private_key(header.wrapped_keys[pair.key_id], private)
    (tmp_path / "obj").write_bytes(stored)
    envelope.decrypt_file(tmp_path / "obj", tmp_path / "plain.wav", data_key)
    assert (tmp_path / "plain.wav").read_bytes() == audio
    assert list((tmp_path / "spool").iterdir()) == []  # neither plaintext nor envelope left behind
    await server.writer.close()


async def test_crash_after_encryption_resumes_with_the_envelope(seaweed: SeaweedS3, tmp_path: Path) -> None:
    pair = make_cert("spool")
    crt, _ = pair.write(tmp_path / "keys", "acme")
    spool = tmp_path / "spool"
    spool.mkdir()
    rid = "d1" * 16
    audio = write_wav(spool / f"{rid}.wav.part", 0.5)
    meta = envelope.encrypt_file(spool / f"{rid}.wav.part", spool / f"{rid}.wav.enc", [str(crt)])
    # Killed after the pending record named the envelope, before the plaintext was removed.
    _sidecar(spool, rid, state="pending", start=OPENED.isoformat(), end=OPENED.isoformat(), stats=STATS,
             encryption=meta)  # fmt: skip
    envelope_bytes = (spool / f"{rid}.wav.enc").read_bytes()
    leftovers = await asyncio.to_thread(find_leftovers, spool)
    server = make_server(tmp_path, seaweed, certificates=[str(crt)])
    await server.recover(leftovers, wait=20)
    (event,) = await wait_events(tmp_path, 1)
    assert event["encryption"] == meta and event["sha256"] == hashlib.sha256(audio).hexdigest()
    assert await fetch(seaweed, event["storage"]["key"]) == envelope_bytes  # not encrypted twice
    assert list(spool.iterdir()) == []  # the plaintext did not outlive the stored envelope
    await server.writer.close()

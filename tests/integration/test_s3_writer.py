"""The S3 writer against a real S3 endpoint (SeaweedFS ``weed mini``): round trips with SHA-256
equality, multipart uploads (parts sent concurrently), resuming after a crash (also around a gap left
by concurrent parts), idempotent re-stores, unreachable storage and refused credentials."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from services.storage.disk import recording_key
from services.storage.s3 import (
    META_SHA256,
    S3Client,
    S3Error,
    S3Settings,
    S3Writer,
    journal_path,
)
from tests.helpers.seaweed import SeaweedS3

MIB = 1024 * 1024


@pytest.fixture(scope="module")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    s3 = SeaweedS3(tmp_path_factory.mktemp("seaweed"))
    s3.start()
    try:
        yield s3
    finally:
        s3.kill()  # nothing to keep: no need to wait for a clean stop


def _file(path: Path, size: int) -> str:
    data = os.urandom(size)
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


async def _fetch(client: S3Client, key: str, size: int) -> bytes:
    return b"".join([chunk async for chunk in client.iter_range(key, 0, size - 1)])


def _key(tmp_path: Path) -> str:
    rid = hashlib.sha1(str(tmp_path).encode()).hexdigest()
    return recording_key("acme", datetime(2025, 3, 4, 5, 6, 7, tzinfo=UTC), rid)


async def test_small_file_is_one_put_and_round_trips(seaweed: SeaweedS3, tmp_path: Path) -> None:
    src = tmp_path / "r.wav.part"
    sha = _file(src, 100_000)
    writer = S3Writer(seaweed.settings(part_size=5 * MIB))
    key = _key(tmp_path)
    try:
        stored = await writer.store(src, key)
        assert (stored.kind, stored.key, stored.size, stored.sha256) == ("s3", key, 100_000, sha)
        assert key.startswith("acme/2025/03/04/") and not src.exists()
        size, meta = await writer.client.head(key) or (0, {})
        assert size == 100_000 and meta[META_SHA256] == sha
        assert (await writer.client.call("head_object", key, Key=key))["ContentType"] == "audio/wav"
        assert hashlib.sha256(await _fetch(writer.client, key, size)).hexdigest() == sha
        part = b"".join([c async for c in writer.client.iter_range(key, 10, 19)])
        assert len(part) == 10
    finally:
        await writer.close()


async def test_multipart_round_trip_and_idempotent_restore(seaweed: SeaweedS3, tmp_path: Path) -> None:
    src = tmp_path / "big.wav.part"
    sha = _file(src, 12 * MIB + 123)
    writer = S3Writer(seaweed.settings(part_size=5 * MIB))
    key = _key(tmp_path)
    try:
        stored = await writer.store(src, key)
        assert stored.size == 12 * MIB + 123 and stored.sha256 == sha
        assert not journal_path(src).exists() and not src.exists()
        assert hashlib.sha256(await _fetch(writer.client, key, stored.size)).hexdigest() == sha
        # A crash after the upload and before the event was queued: the source is gone.
        again = await writer.store(src, key)
        assert again == stored
    finally:
        await writer.close()


class CrashingClient(S3Client):
    """Fails every upload_part from number ``fail_from`` on, as if the process died there."""

    def __init__(self, settings: S3Settings, fail_from: int) -> None:
        super().__init__(settings)
        self.fail_from = fail_from
        self.calls: list[tuple[str, Any]] = []

    async def call(self, op: str, what: str, **kwargs: Any) -> dict[str, Any]:
        self.calls.append((op, kwargs.get("PartNumber")))
        if op == "upload_part" and kwargs["PartNumber"] >= self.fail_from:
            raise S3Error(f"connection lost during {what}")
        return await super().call(op, what, **kwargs)


async def test_interrupted_multipart_upload_resumes_with_the_missing_parts(
    seaweed: SeaweedS3, tmp_path: Path
) -> None:
    src = tmp_path / "big.wav.part"
    sha = _file(src, 11 * MIB)
    key = _key(tmp_path)
    settings = seaweed.settings(part_size=5 * MIB)
    crashing = CrashingClient(settings, fail_from=2)
    first = S3Writer(settings, crashing)
    with pytest.raises(S3Error, match="connection lost"):
        await first.store(src, key)
    await first.close()
    assert journal_path(src).exists() and src.exists()  # the upload is journalled, the file kept
    again = CrashingClient(settings, fail_from=99)
    second = S3Writer(settings, again)
    try:
        stored = await second.store(src, key)
        assert stored.sha256 == sha
        uploaded = [n for op, n in again.calls if op == "upload_part"]
        assert uploaded == [2, 3]  # part 1 was already stored and matched the local bytes
        assert "create_multipart_upload" not in [op for op, _ in again.calls]
        assert hashlib.sha256(await _fetch(second.client, key, stored.size)).hexdigest() == sha
        assert not journal_path(src).exists()
    finally:
        await second.close()


class OverlapClient(S3Client):
    """Counts the upload_part requests in flight; each part waits (10 s at most) until ``together``
    of them are, so the upload only gets through if its parts really overlap."""

    def __init__(self, settings: S3Settings, together: int) -> None:
        super().__init__(settings)
        self.together = together
        self.in_flight = self.max_in_flight = 0
        self.full = asyncio.Event()
        self.sent: list[int] = []

    async def call(self, op: str, what: str, **kwargs: Any) -> dict[str, Any]:
        if op != "upload_part":
            return await super().call(op, what, **kwargs)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.in_flight >= self.together:
                self.full.set()
            await asyncio.wait_for(self.full.wait(), 10)
            result = await super().call(op, what, **kwargs)
        finally:
            self.in_flight -= 1
        self.sent.append(kwargs["PartNumber"])
        return result


async def test_parts_upload_concurrently_and_the_object_is_byte_identical(
    seaweed: SeaweedS3, tmp_path: Path
) -> None:
    src = tmp_path / "big.wav.part"
    sha = _file(src, 23 * MIB + 123)  # 5 parts, the last one short
    settings = seaweed.settings(part_size=5 * MIB, part_concurrency=3)
    client = OverlapClient(settings, together=3)
    writer = S3Writer(settings, client)
    key = _key(tmp_path)
    try:
        stored = await writer.store(src, key)
        assert stored.sha256 == sha and stored.size == 23 * MIB + 123
        assert client.max_in_flight == 3 and sorted(client.sent) == [1, 2, 3, 4, 5]
        assert hashlib.sha256(await _fetch(writer.client, key, stored.size)).hexdigest() == sha
        assert not journal_path(src).exists() and not src.exists()
    finally:
        await writer.close()


class GapClient(S3Client):
    """Part ``fail`` waits until the parts ``first`` are stored, then fails as if the connection was
    lost; the parts after those wait until they are cancelled. The store is left holding a multipart
    upload with a gap (with ``fail=2, first=(1, 3)``: parts 1 and 3)."""

    def __init__(self, settings: S3Settings, fail: int, first: tuple[int, ...]) -> None:
        super().__init__(settings)
        self.fail, self.first = fail, first
        self.stored = asyncio.Event()
        self.sent: list[int] = []
        self.cancelled: list[int] = []

    async def call(self, op: str, what: str, **kwargs: Any) -> dict[str, Any]:
        number = kwargs.get("PartNumber")
        if op != "upload_part":
            return await super().call(op, what, **kwargs)
        if number == self.fail:
            await asyncio.wait_for(self.stored.wait(), 10)
            raise S3Error(f"connection lost during {what}")
        try:
            if number > max(self.first):
                await asyncio.sleep(30)
            result = await super().call(op, what, **kwargs)
        except asyncio.CancelledError:
            self.cancelled.append(number)
            raise
        self.sent.append(number)
        if set(self.first) <= set(self.sent):
            self.stored.set()
        return result


async def test_interrupted_concurrent_upload_resumes_around_the_gap(
    seaweed: SeaweedS3, tmp_path: Path
) -> None:
    src = tmp_path / "big.wav.part"
    sha = _file(src, 23 * MIB)  # 5 parts
    key = _key(tmp_path)
    settings = seaweed.settings(part_size=5 * MIB, part_concurrency=3)
    gap = GapClient(settings, fail=2, first=(1, 3))
    first = S3Writer(settings, gap)
    with pytest.raises(S3Error, match=r"connection lost during .* part 2"):
        await first.store(src, key)
    await first.close()
    # Part 2 failed once 1 and 3 were stored; 4 and 5, if they were started meanwhile, were cancelled.
    assert sorted(gap.sent) == [1, 3] and set(gap.cancelled) <= {4, 5}
    assert journal_path(src).exists() and src.exists()
    again = CrashingClient(settings, fail_from=99)
    second = S3Writer(settings, again)
    try:
        stored = await second.store(src, key)
        assert stored.sha256 == sha
        assert sorted(n for op, n in again.calls if op == "upload_part") == [2, 4, 5]
        assert "create_multipart_upload" not in [op for op, _ in again.calls]
        assert hashlib.sha256(await _fetch(second.client, key, stored.size)).hexdigest() == sha
        assert not journal_path(src).exists()
    finally:
        await second.close()


async def test_unreachable_store_fails_after_the_retries_and_keeps_the_file(tmp_path: Path) -> None:
    src = tmp_path / "r.wav.part"
    _file(src, 1000)
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = S3Settings(endpoint_url=f"http://127.0.0.1:{port}", bucket="b", access_key="a",
                          secret_key="s", max_attempts=3, timeout=2.0)  # fmt: skip
    client = S3Client(settings, backoff=0.01)
    writer = S3Writer(settings, client)
    try:
        with pytest.raises(S3Error, match="after 3 attempt"):
            await writer.store(src, "acme/2025/01/01/x.wav")
        assert src.exists()
    finally:
        await writer.close()


async def test_refused_credentials_fail_at_once(seaweed: SeaweedS3, tmp_path: Path) -> None:
    src = tmp_path / "r.wav.part"
    _file(src, 1000)
    settings = S3Settings(endpoint_url=seaweed.endpoint_url, bucket=seaweed.bucket,
                          access_key=seaweed.access_key, secret_key="wrong" * 8, max_attempts=5)  # fmt: skip
    writer = S3Writer(settings)
    try:
        with pytest.raises(S3Error, match="after 1 attempt") as info:
            await writer.store(src, "acme/2025/01/01/y.wav")
        assert info.value.status == 403 and src.exists()
    finally:
        await writer.close()


async def test_web_services_audio_source_for_s3_objects(seaweed: SeaweedS3, tmp_path: Path) -> None:
    from services.storage.disk import DiskWriter
    from services.web_services.audio import AudioUnavailable, S3Audio, open_audio

    src = tmp_path / "r.wav.part"
    sha = _file(src, 300_000)
    writer = S3Writer(seaweed.settings())
    key = _key(tmp_path)
    disk = DiskWriter(tmp_path / "disk")
    down = S3Client(S3Settings(endpoint_url="http://127.0.0.1:9", bucket="b", max_attempts=1))
    try:
        stored = await writer.store(src, key)
        doc = {"format": "wav", "storage": {"kind": "s3", "key": key, "size": stored.size}}
        audio = await open_audio(doc, disk, None, writer.client)
        assert isinstance(audio, S3Audio) and audio.size == 300_000
        data = b"".join([c async for c in audio.iter_range(0, audio.size - 1)])
        assert hashlib.sha256(data).hexdigest() == sha
        assert b"".join([c async for c in audio.iter_range(1000, 1999)]) == data[1000:2000]
        cases = [  # truncated object (size differs from the metadata), missing object, store down
            ({"storage": {"kind": "s3", "key": key, "size": stored.size + 10}}, writer.client, 502),
            ({"storage": {"kind": "s3", "key": key + "x"}}, writer.client, 404),
            ({"storage": {"kind": "s3", "key": key}}, down, 503),
            ({"storage": {"kind": "s3", "key": key}}, None, 501),
            ({"storage": {"kind": "s3", "key": key, "bucket": "elsewhere"}}, writer.client, 501),
        ]
        for bad, client, status in cases:
            with pytest.raises(AudioUnavailable) as info:
                await open_audio(bad, disk, None, client)
            assert info.value.status == status, (bad, info.value)
    finally:
        await writer.close()
        await down.close()

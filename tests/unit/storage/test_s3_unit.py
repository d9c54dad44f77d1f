"""The S3 writer's decisions at its seam (the aiobotocore client faked): retry classification,
checksums and ETags checked, a wrong answer aborts the upload, multipart parts in flight together
(bounded, completed in order), a part failing for good cancels the others; the storage settings'
validation."""

from __future__ import annotations

import asyncio
import base64
import hashlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError

from services.config import ConfigError, from_dict
from services.storage.s3 import (
    S3Client,
    S3Error,
    S3IntegrityError,
    S3Settings,
    S3Writer,
    is_retryable,
    journal_path,
    retry_forever,
)

SETTINGS = S3Settings(endpoint_url="http://127.0.0.1:1", bucket="b", part_size=5 * 1024 * 1024)


def client_error(code: str, status: int) -> ClientError:
    return ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "Op")


def test_retry_classification() -> None:
    assert is_retryable(client_error("InternalError", 500))
    assert is_retryable(client_error("SlowDown", 503))
    assert is_retryable(client_error("BadDigest", 400))
    assert is_retryable(EndpointConnectionError(endpoint_url="http://x"))
    assert is_retryable(ConnectionResetError())
    assert not is_retryable(client_error("AccessDenied", 403))
    assert not is_retryable(client_error("NoSuchBucket", 404))


class FakeBoto:
    """Answers like a store that keeps what it is sent, except for the ETags it is told to spoil.

    ``part_hook(number, attempt)`` runs inside every upload_part before it is answered (to hold a
    part back or fail it); ``in_flight`` / ``max_in_flight`` count the parts being sent at once and
    ``log`` records, in order, the parts that were cancelled and the upload's abort and completion.
    """

    def __init__(self, bad_etag_part: int | None = None) -> None:
        self.bad_etag_part = bad_etag_part
        self.calls: list[str] = []
        self.objects: dict[str, tuple[bytes, dict[str, str]]] = {}
        self.failures: list[Exception] = []
        self.part_hook: Callable[[int, int], Awaitable[None]] | None = None
        self.attempts: dict[int, int] = {}
        self.parts: dict[int, bytes] = {}  # of the one upload "u1"
        self.uploaded: list[int] = []
        self.in_flight = self.max_in_flight = 0
        self.log: list[str] = []
        self.completed: list[dict[str, Any]] = []
        self.full = asyncio.Event()

    def __getattr__(self, op: str) -> Any:
        async def call(Bucket: str, **kw: Any) -> dict[str, Any]:
            self.calls.append(op)
            if self.failures:
                raise self.failures.pop(0)
            if op == "head_object":
                if kw["Key"] not in self.objects:
                    raise client_error("404", 404)
                data, meta = self.objects[kw["Key"]]
                return {"ContentLength": len(data), "Metadata": meta}
            if op == "put_object":
                self.objects[kw["Key"]] = (kw["Body"], kw["Metadata"])
                return {"ETag": f'"{hashlib.md5(kw["Body"]).hexdigest()}"'}
            if op == "create_multipart_upload":
                self.metadata = kw["Metadata"]
                return {"UploadId": "u1"}
            if op == "upload_part":
                return await self._upload_part(kw["PartNumber"], kw["Body"])
            if op == "list_parts":
                parts = [{"PartNumber": n, "ETag": f'"{hashlib.md5(b).hexdigest()}"', "Size": len(b)}
                         for n, b in sorted(self.parts.items())]  # fmt: skip
                return {"Parts": parts, "IsTruncated": False}
            if op == "complete_multipart_upload":
                self.log.append("complete")
                self.completed = kw["MultipartUpload"]["Parts"]
                body = b"".join(self.parts[p["PartNumber"]] for p in self.completed)
                self.objects[kw["Key"]] = (body, self.metadata)
            if op == "abort_multipart_upload":
                self.log.append("abort")
            return {}

        return call

    async def together(self, parts: int) -> None:
        """Wait until ``parts`` part uploads are in flight at once (10 s at most): sequential
        uploads never get there, so a part that waits here proves the overlap."""
        if self.in_flight >= parts:
            self.full.set()
        await asyncio.wait_for(self.full.wait(), 10)

    async def _upload_part(self, number: int, body: bytes) -> dict[str, Any]:
        self.attempts[number] = attempt = self.attempts.get(number, 0) + 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.part_hook is not None:
                await self.part_hook(number, attempt)
        except asyncio.CancelledError:
            self.log.append(f"cancelled {number}")
            raise
        finally:
            self.in_flight -= 1
        self.parts[number] = body
        self.uploaded.append(number)
        etag = hashlib.md5(body).hexdigest()
        return {"ETag": f'"{"0" * 32 if number == self.bad_etag_part else etag}"'}


def make_writer(fake: FakeBoto, settings: S3Settings = SETTINGS) -> S3Writer:
    client = S3Client(settings, backoff=0.001)
    client._client = fake
    return S3Writer(settings, client)


async def test_put_carries_md5_sha256_and_metadata(tmp_path: Path) -> None:
    src = tmp_path / "a"
    src.write_bytes(b"x" * 1000)
    fake = FakeBoto()
    fake.failures = [client_error("InternalError", 500)]  # the first head fails once: retried
    stored = await make_writer(fake).store(src, "t/2025/01/01/a.wav")
    assert stored.sha256 == hashlib.sha256(b"x" * 1000).hexdigest()
    assert fake.calls == ["head_object", "head_object", "put_object", "head_object"]
    assert fake.objects["t/2025/01/01/a.wav"][1] == {"sha256": stored.sha256}


async def test_wrong_part_etag_aborts_the_upload(tmp_path: Path) -> None:
    src = tmp_path / "a"
    src.write_bytes(b"y" * (6 * 1024 * 1024))
    fake = FakeBoto(bad_etag_part=2)
    with pytest.raises(S3IntegrityError, match="ETag"):
        await make_writer(fake).store(src, "t/2025/01/01/b.wav")
    assert fake.calls[-1] == "abort_multipart_upload"
    assert src.exists() and not journal_path(src).exists()


MIB = 1024 * 1024
WINDOW_3 = S3Settings(endpoint_url="http://127.0.0.1:1", bucket="b", part_size=5 * MIB, part_concurrency=3)


def big_file(path: Path, parts: int) -> bytes:
    """A file of ``parts`` 5 MiB parts, the last one short, each part's bytes different."""
    data = b"".join(bytes([n]) * (5 * MIB) for n in range(parts - 1)) + b"z" * 1000
    path.write_bytes(data)
    return data


def part_tasks() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if t.get_name().startswith("s3 upload")]


async def test_parts_go_up_concurrently_and_complete_in_order(tmp_path: Path) -> None:
    src = tmp_path / "a"
    data = big_file(src, 6)
    fake = FakeBoto()

    async def hook(number: int, attempt: int) -> None:
        await fake.together(3)  # the first three wait for each other
        await asyncio.sleep(0.01 * (7 - number))  # and finish in reverse order

    fake.part_hook = hook
    stored = await make_writer(fake, WINDOW_3).store(src, "t/2025/01/01/c.wav")
    assert fake.max_in_flight == 3  # overlapping, and never more than the window (memory bound)
    assert [p["PartNumber"] for p in fake.completed] == [1, 2, 3, 4, 5, 6]
    for p in fake.completed:
        body = data[(p["PartNumber"] - 1) * 5 * MIB :][: 5 * MIB]
        assert p["ETag"] == f'"{hashlib.md5(body).hexdigest()}"'
        assert p["ChecksumSHA256"] == base64.b64encode(hashlib.sha256(body).digest()).decode()
    assert fake.objects["t/2025/01/01/c.wav"][0] == data and stored.sha256 == hashlib.sha256(data).hexdigest()
    assert not src.exists() and not journal_path(src).exists() and part_tasks() == []


async def test_a_part_failing_for_good_cancels_the_others_then_aborts(tmp_path: Path) -> None:
    src = tmp_path / "a"
    big_file(src, 6)
    fake = FakeBoto()

    async def hook(number: int, attempt: int) -> None:
        await fake.together(3)
        if number == 2:
            raise client_error("AccessDenied", 403)  # not retried: the upload cannot succeed
        await asyncio.sleep(30)

    fake.part_hook = hook
    with pytest.raises(S3Error, match="part 2") as info:
        await make_writer(fake, WINDOW_3).store(src, "t/2025/01/01/d.wav")
    assert info.value.status == 403
    # Parts 1 and 3 were cancelled (and had ended) before the abort; nothing else was started.
    assert sorted(fake.log[:2]) == ["cancelled 1", "cancelled 3"] and fake.log[2:] == ["abort"]
    assert fake.attempts == {1: 1, 2: 1, 3: 1} and part_tasks() == []
    assert src.exists() and not journal_path(src).exists()


async def test_a_part_failing_after_its_retries_leaves_the_upload_to_resume(tmp_path: Path) -> None:
    src = tmp_path / "a"
    data = big_file(src, 6)
    fake = FakeBoto()

    async def hook(number: int, attempt: int) -> None:
        if number == 1:
            return
        await fake.together(3)  # parts 2, 3 and 4
        if number == 2:
            raise client_error("InternalError", 500)  # every attempt of part 2
        await asyncio.sleep(30)

    fake.part_hook = hook
    writer = make_writer(fake, WINDOW_3)
    with pytest.raises(S3Error, match="part 2 failed after 5 attempt"):
        await writer.store(src, "t/2025/01/01/e.wav")
    assert sorted(fake.log) == ["cancelled 3", "cancelled 4"]  # no abort: the store may come back
    assert fake.attempts[2] == 5 and 5 not in fake.attempts and part_tasks() == []
    assert src.exists() and journal_path(src).exists() and fake.uploaded == [1]
    # The spool's next attempt: the store answers again; only the missing parts are sent.
    fake.part_hook = None
    stored = await writer.store(src, "t/2025/01/01/e.wav")
    assert sorted(fake.uploaded) == [1, 2, 3, 4, 5, 6] and fake.calls.count("create_multipart_upload") == 1
    assert [p["PartNumber"] for p in fake.completed] == [1, 2, 3, 4, 5, 6]
    assert fake.objects["t/2025/01/01/e.wav"][0] == data and stored.size == len(data)
    assert not journal_path(src).exists()


async def test_a_cancelled_store_cancels_its_parts(tmp_path: Path) -> None:
    src = tmp_path / "a"
    big_file(src, 6)
    fake = FakeBoto()

    async def hook(number: int, attempt: int) -> None:
        await fake.together(4)  # the default window
        await asyncio.sleep(30)

    fake.part_hook = hook
    store = asyncio.create_task(make_writer(fake).store(src, "t/2025/01/01/f.wav"))
    await asyncio.wait_for(fake.full.wait(), 10)
    store.cancel()
    with pytest.raises(asyncio.CancelledError):
        await store
    assert sorted(fake.log) == ["cancelled 1", "cancelled 2", "cancelled 3", "cancelled 4"]
    assert part_tasks() == [] and journal_path(src).exists() and src.exists()


async def test_retry_forever_backs_off_and_logs(caplog: pytest.LogCaptureFixture) -> None:
    attempts = []

    async def flaky() -> str:
        attempts.append(1)
        if len(attempts) < 4:
            raise S3Error("down")
        return "ok"

    assert await retry_forever(flaky, "upload x", first=0.001, cap=0.002) == "ok"
    assert len(attempts) == 4
    assert sum("upload x failed (attempt" in r.message for r in caplog.records) == 3
    with pytest.raises(FileNotFoundError):
        await asyncio.wait_for(
            retry_forever(_missing, "upload y", first=0.001, permanent=(FileNotFoundError,)), 1
        )


async def _missing() -> None:
    raise FileNotFoundError("gone")


def test_storage_settings_are_validated() -> None:
    base: dict[str, Any] = {"tenants": [{"id": "a", "api_key": "k" * 16, "profile": {"storage": "s3"}}]}
    with pytest.raises(ConfigError, match=r"tenants\[0\].profile.storage is 's3' but storage.s3_bucket"):
        from_dict(base, environ={})
    cfg = from_dict({**base, "storage": {"s3_bucket": "rec", "s3_endpoint_url": "http://127.0.0.1:9"}},
                    environ={})  # fmt: skip
    assert cfg.storage.s3_part_size == 8 * 1024 * 1024 and cfg.tenants[0].profile.storage == "s3"
    with pytest.raises(ConfigError, match=r"storage\.s3_part_size"):
        from_dict({"storage": {"s3_part_size": 1024}}, environ={})
    with pytest.raises(ConfigError, match=r"storage\.s3_endpoint_url"):
        from_dict({"storage": {"s3_endpoint_url": "ftp://x"}}, environ={})
    assert cfg.storage.s3_part_concurrency == 4
    most = from_dict({"storage": {"s3_part_concurrency": 16}}, environ={}).storage
    assert S3Settings.from_config(most).part_concurrency == 16
    for bad in (0, 17):
        with pytest.raises(ConfigError, match=r"storage\.s3_part_concurrency must be within 1-16"):
            from_dict({"storage": {"s3_part_concurrency": bad}}, environ={})
    with pytest.raises(ConfigError, match=r"storage\.s3_max_attempts"):
        from_dict({"storage": {"s3_max_attempts": 0}}, environ={})


async def test_storage_targets_follow_the_profile(tmp_path: Path) -> None:
    from services.storage.writer import StorageTargetError, StorageTargets

    cfg = from_dict(
        {"storage": {"disk_root": "d", "s3_bucket": "rec", "s3_endpoint_url": "http://127.0.0.1:9"}},
        base_dir=str(tmp_path), environ={},
    )  # fmt: skip
    targets = StorageTargets.from_config(cfg)
    assert targets.target("disk") is targets.disk and targets.disk.root == tmp_path / "d"
    assert targets.target("s3") is targets.s3 and targets.describe("s3") == {"bucket": "rec"}
    assert targets.describe("disk") == {}
    with pytest.raises(StorageTargetError, match="'tape'"):
        targets.target("tape")
    src = tmp_path / "x"
    src.write_bytes(b"abc")
    stored = await targets.store("disk", src, "t/2025/01/01/x.wav")
    assert stored.kind == "disk" and (tmp_path / "d" / "t/2025/01/01/x.wav").read_bytes() == b"abc"
    await targets.close()
    disk_only = StorageTargets.from_config(from_dict({}, base_dir=str(tmp_path), environ={}))
    assert disk_only.s3 is None
    with pytest.raises(StorageTargetError, match="not configured"):
        disk_only.target("s3")

"""The S3 writer's decisions at its seam (the aiobotocore client faked): retry classification,
checksums and ETags checked, a wrong answer aborts the upload; the storage settings' validation."""

from __future__ import annotations

import asyncio
import hashlib
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
    """Answers like a store that keeps what it is sent, except for the ETags it is told to spoil."""

    def __init__(self, bad_etag_part: int | None = None) -> None:
        self.bad_etag_part = bad_etag_part
        self.calls: list[str] = []
        self.objects: dict[str, tuple[bytes, dict[str, str]]] = {}
        self.failures: list[Exception] = []

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
                return {"UploadId": "u1"}
            if op == "upload_part":
                etag = hashlib.md5(kw["Body"]).hexdigest()
                return {"ETag": f'"{"0" * 32 if kw["PartNumber"] == self.bad_etag_part else etag}"'}
            return {}

        return call


def make_writer(fake: FakeBoto) -> S3Writer:
    client = S3Client(SETTINGS, backoff=0.001)
    client._client = fake
    return S3Writer(SETTINGS, client)


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

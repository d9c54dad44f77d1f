"""Retention purges audio in real S3 (SeaweedFS) as well as on disk, and only what the rules say."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from services import config as config_mod
from services.storage.disk import DiskWriter, recording_key
from services.storage.metadata import format_time, validate_document
from services.storage.s3 import S3Client, S3Writer
from services.web_services.retention import RetentionJob, storage_audio_deleter
from services.web_services.store import SqliteMetadataStore
from tests.helpers.seaweed import SeaweedS3

NOW = datetime(2024, 7, 1, 12, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    s3 = SeaweedS3(tmp_path_factory.mktemp("seaweed"))
    s3.start()
    try:
        yield s3
    finally:
        s3.stop()


def doc(
    rid: str, start: datetime, key: str, size: int, sha: str, bucket: str | None = None
) -> dict[str, object]:
    storage: dict[str, object] = {"kind": "s3", "key": key}
    if bucket:
        storage["bucket"] = bucket
    return validate_document(
        {
            "id": rid,
            "tenant": "acme",
            "call_id": f"{rid}@pbx",
            "start": format_time(start),
            "end": format_time(start + timedelta(seconds=1)),
            "size": size,
            "sha256": sha,
            "storage": storage,
        }
    )


async def test_retention_deletes_s3_objects(seaweed: SeaweedS3, tmp_path: Path) -> None:
    config = config_mod.from_dict(
        {
            "tenants": [
                {"id": "acme", "api_key": "acme-api-key-0123456789", "retention": [{"max_age_days": 30}]}
            ]
        },
        base_dir=str(tmp_path),
        environ={},
    )
    writer = S3Writer(seaweed.settings())
    client = S3Client(seaweed.settings())
    store = SqliteMetadataStore(tmp_path / "meta.sqlite3")
    await store.open()
    try:
        docs = {}
        for rid, age, bucket in (
            ("old", 40, seaweed.bucket),
            ("young", 3, None),
            ("other-bucket", 50, "archive"),
        ):
            start = NOW - timedelta(days=age)
            src = tmp_path / f"{rid}.wav"
            src.write_bytes(b"RIFF" + rid.encode() * 1000)
            stored = await writer.store(src, recording_key("acme", start, rid))
            docs[rid] = doc(rid, start, stored.key, stored.size, stored.sha256, bucket)
            await store.put(docs[rid])
            assert await client.head(stored.key) is not None
        job = RetentionJob(config, store, storage_audio_deleter(DiskWriter(tmp_path / "storage"), client))
        report = await job.run_once(NOW)
        assert report.purged == {"acme": ["old"]}
        assert report.failed == {"acme": ["other-bucket"]}  # not this instance's bucket: kept, logged
        assert await client.head(docs["old"]["storage"]["key"]) is None  # type: ignore[index]
        assert await store.get("acme", "old") is None
        for rid in ("young", "other-bucket"):
            assert await client.head(docs[rid]["storage"]["key"]) is not None  # type: ignore[index]
            assert await store.get("acme", rid) == docs[rid]
        assert [e["storage"]["kind"] for e in await store.audit_entries("acme")] == ["s3"]
    finally:
        await store.close()
        await writer.close()
        await client.close()

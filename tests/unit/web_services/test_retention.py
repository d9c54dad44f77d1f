"""The retention job over a real SQLite store and real files in disk storage."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from services import config as config_mod
from services.config import ClusterConfig
from services.storage.disk import DiskWriter
from services.web_services.retention import (
    LEASE,
    AudioDeleteError,
    RetentionJob,
    storage_audio_deleter,
)
from services.web_services.store import MetadataStore, PutResult, SearchFilters, SqliteMetadataStore

DocFactory = Callable[..., dict[str, Any]]
NOW = datetime(2024, 7, 1, 12, 0, tzinfo=UTC)


def make_config(tmp_path: Path) -> ClusterConfig:
    return config_mod.from_dict(
        {
            "storage": {"disk_root": "storage"},
            "tenants": [
                {
                    # everything older than 30 days goes, except 'legal-hold'; 'vip' recordings go after 365 days
                    "id": "acme",
                    "api_key": "acme-api-key-0123456789",
                    "retention": [
                        {"max_age_days": 30, "exempt_labels": ["legal-hold", "vip"]},
                        {"max_age_days": 365, "labels": ["vip"], "exempt_labels": ["legal-hold"]},
                    ],
                },
                # only recordings labelled 'test' are purged, after 1 day
                {
                    "id": "globex",
                    "api_key": "globex-api-key-0123456789",
                    "retention": [{"max_age_days": 1, "labels": ["test"]}],
                },
                {"id": "initech", "api_key": "initech-api-key-0123456789"},  # no rules: keeps everything
            ],
        },
        base_dir=str(tmp_path),
        environ={},
    )


@pytest.fixture
def env(tmp_path: Path, mstore: MetadataStore) -> tuple[ClusterConfig, MetadataStore, DiskWriter]:
    """Config, a store of each backend (conftest.py: SQLite, and Cassandra when configured), disk storage."""
    config = make_config(tmp_path)
    return config, mstore, DiskWriter(config.path("storage"))


async def add(
    store: MetadataStore,
    disk: DiskWriter,
    make_doc: DocFactory,
    rid: str,
    tenant: str,
    age_days: float,
    labels: list[str] | None = None,
) -> dict[str, Any]:
    doc = make_doc(
        rid, tenant=tenant, start=NOW - timedelta(days=age_days), **({"labels": labels} if labels else {})
    )
    path = disk.path(doc["storage"]["key"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"RIFF" + rid.encode())
    assert await store.put(doc) is PutResult.CREATED
    return doc


async def test_purges_exactly_what_the_rules_say(
    env: tuple[ClusterConfig, MetadataStore, DiskWriter],
    make_doc: DocFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    config, store, disk = env
    caplog.set_level(logging.INFO, "callvault.audit")
    cases = [
        # id, tenant, age in days, labels, purged?
        ("a-old", "acme", 31, None, True),
        ("a-edge-in", "acme", 30.001, None, True),
        ("a-edge-out", "acme", 29.999, None, False),
        ("a-new", "acme", 1, None, False),
        ("a-hold", "acme", 400, ["legal-hold"], False),
        ("a-hold-vip", "acme", 400, ["vip", "legal-hold"], False),
        ("a-vip-young", "acme", 100, ["vip"], False),
        ("a-vip-old", "acme", 366, ["vip"], True),
        ("a-other-label", "acme", 40, ["sales"], True),
        ("g-test-old", "globex", 2, ["test"], True),
        ("g-test-new", "globex", 0.5, ["test"], False),
        ("g-plain-old", "globex", 900, None, False),
        ("g-other-old", "globex", 900, ["prod"], False),
        ("i-ancient", "initech", 5000, None, False),
    ]
    docs = {
        rid: await add(store, disk, make_doc, rid, tenant, age, labels)
        for rid, tenant, age, labels, _ in cases
    }
    # many old ones to cross page boundaries
    for i in range(7):
        docs[f"a-bulk{i}"] = await add(store, disk, make_doc, f"a-bulk{i}", "acme", 50 + i)
    job = RetentionJob(config, store, storage_audio_deleter(disk), holder="ws-test", page_size=3)
    report = await job.run_once(NOW)

    expected = {rid for rid, _, _, _, purged in cases if purged} | {f"a-bulk{i}" for i in range(7)}
    assert {rid for ids in report.purged.values() for rid in ids} == expected
    assert report.failed == {} and not report.skipped
    for rid, doc in docs.items():
        gone = rid in expected
        assert (await store.get(doc["tenant"], rid) is None) == gone, rid
        assert disk.path(doc["storage"]["key"]).exists() != gone, rid
    # tombstoned: a late duplicate event does not bring a purged recording back
    assert await store.put(docs["a-old"]) is PutResult.DELETED
    # audit: one record per purge in the store, and a log line
    trail = await store.audit_entries("acme", limit=100) + await store.audit_entries("globex", limit=100)
    assert sorted(e["recording"] for e in trail) == sorted(expected)
    vip = next(e for e in trail if e["recording"] == "a-vip-old")
    assert vip["rule"] == {"max_age_days": 365, "labels": ["vip"], "exempt_labels": ["legal-hold"]}
    assert vip["action"] == "retention_purge" and vip["by"] == "ws-test" and vip["storage"]["kind"] == "disk"
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("retention-purge")]
    assert len(lines) == len(expected) and any("recording=g-test-old tenant=globex" in m for m in lines)
    # idempotent: a second run finds nothing more
    again = await job.run_once(NOW)
    assert again.purged == {} and again.failed == {}
    # the lease was given back
    assert await store.acquire_lease(LEASE, "someone-else", 30)


async def test_one_instance_at_a_time(
    env: tuple[ClusterConfig, MetadataStore, DiskWriter], make_doc: DocFactory
) -> None:
    config, store, disk = env
    old = await add(store, disk, make_doc, "a-old", "acme", 40)
    # a second Web Services instance holds the lease
    assert await store.acquire_lease(LEASE, "ws-2", 60)
    report = await RetentionJob(config, store, storage_audio_deleter(disk), holder="ws-1").run_once(NOW)
    assert report.skipped and report.purged == {}
    assert await store.get("acme", "a-old") == old
    await store.release_lease(LEASE, "ws-2")
    # both run at once: exactly one of them purges
    jobs = [RetentionJob(config, store, storage_audio_deleter(disk), holder=h) for h in ("ws-1", "ws-2")]
    reports = await asyncio.gather(*(j.run_once(NOW) for j in jobs))
    assert sorted(r.skipped for r in reports) in ([False, True], [False, False])
    assert sum(len(r.purged.get("acme", [])) for r in reports) == 1


async def test_audio_that_cannot_be_deleted_keeps_its_metadata(
    env: tuple[ClusterConfig, MetadataStore, DiskWriter],
    make_doc: DocFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    config, store, disk = env
    s3_doc = make_doc(
        "a-s3", start=NOW - timedelta(days=40), storage={"kind": "s3", "key": "acme/2024/05/22/a-s3.wav"}
    )
    await store.put(s3_doc)
    await add(store, disk, make_doc, "a-disk", "acme", 40)
    report = await RetentionJob(config, store, storage_audio_deleter(disk)).run_once(NOW)
    assert report.purged == {"acme": ["a-disk"]} and report.failed == {"acme": ["a-s3"]}
    assert await store.get("acme", "a-s3") == s3_doc
    assert any("a-s3" in r.getMessage() and r.levelno == logging.ERROR for r in caplog.records)

    async def broken(doc: dict[str, Any]) -> None:
        raise AudioDeleteError("storage unreachable")

    report = await RetentionJob(config, store, broken).run_once(NOW)
    assert report.failed == {"acme": ["a-s3"]}
    assert [d["id"] for d in (await store.search("acme", SearchFilters())).items] == ["a-s3"]


async def test_web_services_daemon_runs_the_job(tmp_path: Path, make_doc: DocFactory) -> None:
    """The daemon purges on its own every retention_interval, and keeps serving meanwhile."""
    import socket

    from services.web_services import daemon as ws_daemon

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = config_mod.from_dict(
        {
            "storage": {"disk_root": "storage"},
            "web_services": {"port": port, "database": "meta.sqlite3", "retention_interval": 0.2},
            "tenants": [
                {"id": "acme", "api_key": "acme-api-key-0123456789", "retention": [{"max_age_days": 30}]}
            ],
        },
        base_dir=str(tmp_path),
        environ={},
    )
    store = SqliteMetadataStore(config.path("meta.sqlite3"))
    await store.open()
    disk = DiskWriter(config.path("storage"))
    now = datetime.now(UTC)
    old = await add(store, disk, make_doc, "old", "acme", (NOW - now).total_seconds() / 86400 + 31)
    young = await add(store, disk, make_doc, "young", "acme", (NOW - now).total_seconds() / 86400 + 1)
    ready = asyncio.Event()
    task = asyncio.create_task(ws_daemon.run(config, ready=ready.set))
    try:
        await asyncio.wait_for(ready.wait(), 20)
        for _ in range(400):  # 20 s: generous for a loaded CI machine; ~0.3 s normally
            if await store.get("acme", "old") is None:
                break
            await asyncio.sleep(0.05)
        assert await store.get("acme", "old") is None
        assert not disk.path(old["storage"]["key"]).exists()
        assert await store.get("acme", "young") == young
        assert [e["recording"] for e in await store.audit_entries("acme")] == ["old"]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await store.close()

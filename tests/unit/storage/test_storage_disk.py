"""DiskWriter and recording keys: atomic moves, hashes, key validation."""

from __future__ import annotations

import hashlib
import os
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from services.storage import disk
from services.storage.disk import DiskWriter, StorageKeyError, StoredObject, recording_key, validate_key


def test_recording_key_layout() -> None:
    start = datetime(2024, 3, 9, 23, 30, tzinfo=UTC)
    assert recording_key("acme", start, "abc123") == "acme/2024/03/09/abc123.wav"
    assert recording_key("acme", start, "abc123", "opus") == "acme/2024/03/09/abc123.opus"


def test_recording_key_uses_utc_date() -> None:
    start = datetime(2024, 3, 10, 1, 0, tzinfo=timezone(timedelta(hours=2)))
    assert recording_key("acme", start, "r1") == "acme/2024/03/09/r1.wav"
    assert recording_key("acme", datetime(2024, 1, 2, 3, 4), "r1") == "acme/2024/01/02/r1.wav"


@pytest.mark.parametrize(
    ("tenant", "rid", "ext"),
    [
        ("../x", "r1", "wav"),
        ("acme", "../r1", "wav"),
        ("acme", "r/1", "wav"),
        ("acme", "r1", "w/v"),
        ("", "r1", "wav"),
        ("acme", "", "wav"),
        ("Acme", "r1", "wav"),
    ],
)
def test_recording_key_rejects_unsafe_parts(tenant: str, rid: str, ext: str) -> None:
    with pytest.raises(StorageKeyError):
        recording_key(tenant, datetime(2024, 1, 1, tzinfo=UTC), rid, ext)


@pytest.mark.parametrize(
    "key",
    [
        "",
        "/etc/passwd",
        "../x.wav",
        "a/../../x.wav",
        "a//b.wav",
        "a/./b.wav",
        "a\\b.wav",
        "a/.hidden",
        "a/b\x00.wav",
        "a/" + "x" * 2000,
    ],
)
def test_validate_key_rejects(key: str) -> None:
    with pytest.raises(StorageKeyError):
        validate_key(key)


def test_path_stays_under_root(tmp_path: Path) -> None:
    w = DiskWriter(tmp_path / "root")
    assert w.path("acme/2024/01/01/r.wav") == (tmp_path / "root" / "acme/2024/01/01/r.wav").resolve()
    for bad in ("../outside.wav", "/abs.wav", "acme/../../x"):
        with pytest.raises(StorageKeyError):
            w.path(bad)


def test_path_rejects_symlink_escape(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "link").symlink_to(tmp_path)
    with pytest.raises(StorageKeyError):
        DiskWriter(root).path("link/x.wav")


async def test_store_same_fs_renames(tmp_path: Path) -> None:
    src = tmp_path / "spool" / "r1.wav.part"
    src.parent.mkdir()
    payload = os.urandom(300_000)
    src.write_bytes(payload)
    inode = src.stat().st_ino
    w = DiskWriter(tmp_path / "store")
    obj = await w.store(src, "acme/2024/01/01/r1.wav")
    assert obj == StoredObject(
        "disk", "acme/2024/01/01/r1.wav", len(payload), hashlib.sha256(payload).hexdigest()
    )
    dest = tmp_path / "store/acme/2024/01/01/r1.wav"
    assert dest.read_bytes() == payload
    assert dest.stat().st_ino == inode  # renamed, not copied
    assert not src.exists()
    with w.open_read(obj.key) as f:
        assert f.read() == payload
    assert await w.stat(obj.key) == len(payload)


async def test_store_cross_device_copies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "r2.wav"
    payload = b"RIFF" + os.urandom(5000)
    src.write_bytes(payload)

    real_replace = os.replace

    def fake_replace(a: os.PathLike[str], b: os.PathLike[str]) -> None:
        if Path(a) == src:
            raise OSError(18, "Invalid cross-device link")
        real_replace(a, b)

    monkeypatch.setattr(disk.os, "replace", fake_replace)
    w = DiskWriter(tmp_path / "store")
    obj = await w.store(src, "acme/2024/01/02/r2.wav")
    assert obj.size == len(payload) and obj.sha256 == hashlib.sha256(payload).hexdigest()
    dest = tmp_path / "store/acme/2024/01/02/r2.wav"
    assert dest.read_bytes() == payload
    assert not src.exists()
    assert not [p for p in dest.parent.iterdir() if p.name.startswith(".")]


async def test_store_is_idempotent_after_move(tmp_path: Path) -> None:
    src = tmp_path / "r3.wav"
    src.write_bytes(b"abc")
    w = DiskWriter(tmp_path / "store")
    first = await w.store(src, "acme/2024/01/03/r3.wav")
    again = await w.store(src, "acme/2024/01/03/r3.wav")  # src is gone, object exists
    assert first == again


async def test_store_missing_source_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        await DiskWriter(tmp_path / "store").store(tmp_path / "nope.wav", "acme/2024/01/03/x.wav")


async def test_store_rejects_bad_key_before_touching_source(tmp_path: Path) -> None:
    src = tmp_path / "r.wav"
    src.write_bytes(b"x")
    with pytest.raises(StorageKeyError):
        await DiskWriter(tmp_path / "store").store(src, "../escape.wav")
    assert src.exists()


async def test_delete(tmp_path: Path) -> None:
    src = tmp_path / "r.wav"
    src.write_bytes(b"x")
    w = DiskWriter(tmp_path / "store")
    obj = await w.store(src, "acme/2024/01/03/r.wav")
    await w.delete(obj.key)
    assert not w.path(obj.key).exists()
    await w.delete(obj.key)  # missing is fine

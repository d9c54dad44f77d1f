"""The disk storage writer: finished recordings moved into ``<disk_root>/<tenant>/<YYYY>/<MM>/<DD>/``.

Crash safety: a recording becomes visible under its key only once its bytes are on disk. When the
source is on the same file system it is fsynced and renamed into place (rename is atomic); otherwise
it is copied to a hidden temporary name next to the destination, fsynced, renamed, and only then is
the source removed. The directories touched are fsynced too, so a power cut after :meth:`store`
returns cannot lose the file or leave a half-written one under the final name.

All file work happens in a worker thread (:func:`asyncio.to_thread`) so the event loop never blocks
on the disk.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
import os
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import BinaryIO

log = logging.getLogger("callvault.storage.disk")

CHUNK = 1 << 20
TEMP_PREFIX = ".tmp-"

_TENANT_RE = re.compile(r"[a-z0-9][a-z0-9_\-]{0,62}")
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-]{0,127}")
_EXT_RE = re.compile(r"[a-z0-9]{1,8}")
_SEGMENT_RE = re.compile(r"[A-Za-z0-9_\-][A-Za-z0-9_.\-]*")


class StorageKeyError(ValueError):
    """A storage key is malformed or would escape the storage root."""


@dataclass(frozen=True)
class StoredObject:
    """Where a recording was stored and what it contains."""

    kind: str
    key: str
    size: int
    sha256: str

    def to_dict(self) -> dict[str, object]:
        return {"kind": self.kind, "key": self.key, "size": self.size, "sha256": self.sha256}


def recording_key(tenant: str, start: datetime, recording_id: str, ext: str = "wav") -> str:
    """The storage key of a recording: ``<tenant>/<YYYY>/<MM>/<DD>/<id>.<ext>`` (date in UTC).

    A naive ``start`` is taken to be UTC already.
    """
    if not _TENANT_RE.fullmatch(tenant):
        raise StorageKeyError(f"tenant {tenant!r} is not a valid tenant id")
    if not _ID_RE.fullmatch(recording_id):
        raise StorageKeyError(f"recording id {recording_id!r} must be letters, digits, '-' or '_'")
    if not _EXT_RE.fullmatch(ext):
        raise StorageKeyError(f"extension {ext!r} must be 1-8 lower-case letters or digits")
    day = start.astimezone(UTC) if start.tzinfo else start
    return f"{tenant}/{day:%Y}/{day:%m}/{day:%d}/{recording_id}.{ext}"


def validate_key(key: str) -> str:
    """Return ``key`` if it is a relative key made of safe segments; raise StorageKeyError otherwise.

    Rejected: empty keys, absolute paths, backslashes, NUL, ``.``/``..`` segments, empty segments and
    segments starting with a dot (temporary files are hidden names).
    """
    if not isinstance(key, str) or not key:
        raise StorageKeyError("storage key is empty")
    if len(key) > 1024:
        raise StorageKeyError("storage key is longer than 1024 characters")
    if "\\" in key or "\x00" in key:
        raise StorageKeyError(f"storage key {key!r} contains a backslash or NUL")
    if key.startswith("/") or PurePosixPath(key).is_absolute():
        raise StorageKeyError(f"storage key {key!r} is absolute")
    for segment in key.split("/"):
        if segment in ("", ".", ".."):
            raise StorageKeyError(f"storage key {key!r} has an empty, '.' or '..' segment")
        if not _SEGMENT_RE.fullmatch(segment):
            raise StorageKeyError(f"storage key {key!r} has an unsafe segment {segment!r}")
    return key


def fsync_dir(directory: Path) -> None:
    """fsync a directory so that renames and unlinks in it survive a crash."""
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _makedirs(directory: Path, stop: Path) -> None:
    """Create ``directory`` and its missing parents up to ``stop``, fsyncing each new entry's parent."""
    missing: list[Path] = []
    d = directory
    while not d.exists() and d != stop and d != d.parent:
        missing.append(d)
        d = d.parent
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:
            continue
        fsync_dir(d.parent)


def hash_file(path: Path) -> tuple[int, str]:
    """Size and SHA-256 (hex) of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


class DiskWriter:
    """Stores finished recordings under ``root`` by key, atomically and durably."""

    kind = "disk"

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, key: str) -> Path:
        """The file of ``key`` under the root; raises StorageKeyError for keys that would escape it."""
        validate_key(key)
        root = self.root.resolve()
        p = (root / key).resolve()
        if not p.is_relative_to(root) or p == root:
            raise StorageKeyError(f"storage key {key!r} escapes the storage root")
        return p

    async def store(self, src: Path, key: str) -> StoredObject:
        """Move ``src`` to ``key`` (rename on the same file system, otherwise copy then remove).

        Returns the stored object with its size and SHA-256. Idempotent after a crash: when ``src``
        no longer exists but the destination does (a previous call got as far as the rename), the
        existing object is described and returned.
        """
        dest = self.path(key)
        return await asyncio.to_thread(self._store_sync, Path(src), key, dest)

    def _store_sync(self, src: Path, key: str, dest: Path) -> StoredObject:
        root = self.root.resolve()
        root.mkdir(parents=True, exist_ok=True)
        _makedirs(dest.parent, root)
        if not src.exists() and dest.exists():
            size, sha = hash_file(dest)
            log.info("store %s: source %s already moved, keeping the stored object", key, src)
            return StoredObject(self.kind, key, size, sha)
        if src.resolve() == dest:
            size, sha = hash_file(dest)
            return StoredObject(self.kind, key, size, sha)
        # Same file system: hash and fsync the source in place, then rename it over the key.
        digest = hashlib.sha256()
        size = 0
        with open(src, "rb") as f:
            if os.stat(f.fileno()).st_dev == os.stat(dest.parent).st_dev:
                while chunk := f.read(CHUNK):
                    digest.update(chunk)
                    size += len(chunk)
                os.fsync(f.fileno())
                try:
                    os.replace(src, dest)
                except OSError as exc:
                    if exc.errno != errno.EXDEV:
                        raise
                else:
                    fsync_dir(dest.parent)
                    if src.parent.resolve() != dest.parent:
                        fsync_dir(src.parent)
                    return StoredObject(self.kind, key, size, digest.hexdigest())
        # Different file systems: copy to a temporary name, fsync, rename, then drop the source.
        size, sha = self._copy_sync(src, dest)
        src.unlink()
        fsync_dir(src.parent)
        return StoredObject(self.kind, key, size, sha)

    @staticmethod
    def _copy_sync(src: Path, dest: Path) -> tuple[int, str]:
        tmp = dest.parent / f"{TEMP_PREFIX}{dest.name}.{uuid.uuid4().hex}"
        digest = hashlib.sha256()
        size = 0
        try:
            with open(src, "rb") as fin, open(tmp, "xb") as fout:
                while chunk := fin.read(CHUNK):
                    digest.update(chunk)
                    fout.write(chunk)
                    size += len(chunk)
                fout.flush()
                os.fsync(fout.fileno())
            os.replace(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(dest.parent)
        return size, digest.hexdigest()

    async def stat(self, key: str) -> int:
        """Size in bytes of the object at ``key`` (FileNotFoundError when absent)."""
        p = self.path(key)
        return (await asyncio.to_thread(p.stat)).st_size

    def open_read(self, key: str) -> BinaryIO:
        """Open the object at ``key`` for reading (blocking: call it in a thread from async code)."""
        return open(self.path(key), "rb")

    async def delete(self, key: str) -> None:
        """Remove the object at ``key``; a missing object is not an error."""
        p = self.path(key)

        def _delete() -> None:
            try:
                p.unlink()
            except FileNotFoundError:
                return
            fsync_dir(p.parent)

        await asyncio.to_thread(_delete)

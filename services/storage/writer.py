"""The storage targets an MCP writes finished recordings to, chosen per tenant by the IVR Profile.

``IvrProfile.storage`` names the target: ``disk`` (:class:`services.storage.disk.DiskWriter` under
``storage.disk_root``) or ``s3`` (:class:`services.storage.s3.S3Writer` on ``storage.s3_*``). Both
take a spool file and a key, consume the file once it is durably stored, and return a
:class:`StoredObject` (kind, key, size, SHA-256); both are idempotent when a crash interrupted a
previous call for the same file. The configuration is checked at load time (a tenant on ``s3``
without ``storage.s3_bucket`` is a ConfigError), so a missing target here is a programming error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from services.config import ClusterConfig
from services.storage.disk import DiskWriter, StoredObject
from services.storage.s3 import S3Settings, S3Writer


class StorageTarget(Protocol):
    kind: str

    async def store(self, src: Path, key: str) -> StoredObject:
        """Store ``src`` under ``key`` durably, then remove ``src``; raise OSError on failure."""
        ...


class StorageTargetError(ValueError):
    """A recording names a storage target this node does not have."""


class StorageTargets:
    """The disk target, and the S3 target when the cluster configures a bucket."""

    def __init__(self, disk: DiskWriter, s3: S3Writer | None = None) -> None:
        self.disk = disk
        self.s3 = s3

    @classmethod
    def from_config(cls, config: ClusterConfig) -> StorageTargets:
        storage = config.storage
        s3 = S3Writer(S3Settings.from_config(storage)) if storage.s3_configured else None
        return cls(DiskWriter(config.path(storage.disk_root)), s3)

    def target(self, kind: str) -> StorageTarget:
        if kind == "disk":
            return self.disk
        if kind == "s3" and self.s3 is not None:
            return self.s3
        raise StorageTargetError(f"storage target {kind!r} is not configured on this node")

    def describe(self, kind: str) -> dict[str, str]:
        """Where objects of ``kind`` live, for the recording event's ``storage`` field."""
        if kind == "s3" and self.s3 is not None:
            return {"bucket": self.s3.bucket}
        return {}

    async def store(self, kind: str, src: Path, key: str) -> StoredObject:
        return await self.target(kind).store(src, key)

    async def close(self) -> None:
        if self.s3 is not None:
            await self.s3.close()

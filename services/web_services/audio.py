"""Audio sources for playback: where the bytes of a recording come from.

Today only unencrypted disk objects exist. Issue 4 adds S3 objects and AES-256-GCM encrypted chunks;
they plug in here as other :class:`AudioSource` implementations (``size`` is the plaintext size and
``iter_range`` decrypts the chunks that cover the range), leaving the HTTP handler unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from services.storage.disk import DiskWriter

if TYPE_CHECKING:
    from services.storage.s3 import S3Client
    from services.web_services.crypto_client import CryptoClient

CHUNK = 256 * 1024

CONTENT_TYPES = {"wav": "audio/wav", "mp3": "audio/mpeg", "opus": "audio/ogg", "flac": "audio/flac"}


class AudioUnavailable(Exception):
    """The recording's audio cannot be served; ``status`` is the HTTP status to answer."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class AudioSource(Protocol):
    size: int
    content_type: str

    def iter_range(self, first: int, last: int) -> AsyncGenerator[bytes, None]:
        """Bytes ``first..last`` (inclusive), in chunks, without blocking the event loop."""
        ...


@dataclass
class DiskAudio:
    """A plain file under the disk storage root, read in a worker thread chunk by chunk."""

    path: Path
    size: int
    content_type: str

    async def iter_range(self, first: int, last: int) -> AsyncGenerator[bytes, None]:
        opening = asyncio.ensure_future(asyncio.to_thread(open, self.path, "rb"))
        try:
            f = await asyncio.shield(opening)
        except asyncio.CancelledError:
            # the open goes on in its thread: close what it opens
            opening.add_done_callback(_close_opened)
            raise
        try:
            await asyncio.to_thread(f.seek, first)
            remaining = last - first + 1
            while remaining > 0:
                chunk = await asyncio.to_thread(f.read, min(CHUNK, remaining))
                if not chunk:  # truncated underneath us
                    break
                remaining -= len(chunk)
                yield chunk
        finally:
            f.close()  # closing a read-only file does not block; an await here could be cancelled


@dataclass
class S3Audio:
    """An object in the S3 bucket, read by ranged GETs (services/storage/s3.py)."""

    client: S3Client
    key: str
    size: int
    content_type: str

    async def iter_range(self, first: int, last: int) -> AsyncGenerator[bytes, None]:
        async with contextlib.aclosing(self.client.iter_range(self.key, first, last, CHUNK)) as chunks:
            async for chunk in chunks:
                yield chunk


def _close_opened(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and task.exception() is None:
        task.result().close()


async def open_audio(
    doc: dict[str, Any], disk: DiskWriter, crypto: CryptoClient | None = None, s3: S3Client | None = None
) -> AudioSource:
    """The audio of a metadata document; raises AudioUnavailable.

    A document with ``encryption`` is played through the Crypto Server (``crypto``): the stored
    object is wrapped in a decrypting source (services/web_services/decrypting.py).
    """
    storage = doc.get("storage") or {}
    content_type = CONTENT_TYPES.get(doc.get("format", "wav"), "application/octet-stream")
    raw: AudioSource
    if storage.get("kind") == "s3" and s3 is not None:
        raw = await _open_s3(s3, storage, content_type)
    elif storage.get("kind") != "disk":
        raise AudioUnavailable(
            501, "not_implemented", f"playback from {storage.get('kind')!r} storage is not configured"
        )
    else:
        path = disk.path(storage["key"])
        try:
            st = await asyncio.to_thread(path.stat)
        except FileNotFoundError:
            raise AudioUnavailable(
                404, "audio_missing", "the recording's audio file is missing from storage"
            ) from None
        raw = DiskAudio(path, st.st_size, content_type)
    if doc.get("encryption"):
        from services.web_services.decrypting import open_encrypted

        return await open_encrypted(raw, doc, crypto, content_type)
    return raw


async def _open_s3(s3: S3Client, storage: dict[str, Any], content_type: str) -> S3Audio:
    from services.storage.s3 import S3Error

    key = str(storage["key"])
    bucket = storage.get("bucket")
    if bucket and bucket != s3.bucket:
        raise AudioUnavailable(
            501,
            "not_implemented",
            f"the recording is in S3 bucket {bucket!r}, this instance reads {s3.bucket!r}",
        )
    try:
        found = await s3.head(key)
    except S3Error as exc:
        raise AudioUnavailable(503, "storage_unavailable", f"S3 storage is unreachable: {exc}") from None
    if found is None:
        raise AudioUnavailable(404, "audio_missing", "the recording's audio object is missing from storage")
    size = found[0]
    expected = storage.get("size")
    if isinstance(expected, int) and expected != size:
        raise AudioUnavailable(
            502, "audio_corrupt", f"the stored object has {size} bytes, the metadata says {expected}"
        )
    return S3Audio(s3, key, size, content_type)

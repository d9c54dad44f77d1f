"""The S3 storage writer and reader (aiobotocore), for any S3-compatible object store.

Objects are keyed like disk files (``<tenant>/<YYYY>/<MM>/<DD>/<id>.<ext>``, see
:func:`services.storage.disk.recording_key`) in one bucket, with path-style addressing so that
SeaweedFS, MinIO and Ceph work without DNS tricks.

Upload (:meth:`S3Writer.store`):

- a file up to ``part_size`` goes in one ``PutObject``; a larger one as a multipart upload of
  ``part_size`` parts, up to ``part_concurrency`` of them in flight at once: the parts are read (and
  the whole object hashed) in order in a worker thread, so at most ``part_concurrency`` parts are held
  in memory; the first part that fails for good cancels the others before the upload is aborted or
  left to be resumed, and the upload is completed with its parts in order;
- every request body carries ``Content-MD5`` and ``x-amz-checksum-sha256``, so the store rejects a
  body damaged on the way (``BadDigest``, retried); the ETag it answers must be the MD5 we sent;
- the SHA-256 of the whole object is stored as user metadata ``x-amz-meta-sha256`` and checked by a
  final ``HeadObject`` (size and digest) before the upload counts as done;
- a multipart upload in progress is journalled next to the spool file (``.<name>.s3upload.json``:
  key, upload id, size, digest): after a crash the next :meth:`store` lists the parts the store
  already holds, keeps those whose MD5 matches the local bytes and sends only the rest;
- an object already stored under the key with the same size and digest (the process died between the
  upload and queueing its event) is not sent again.

Every request is retried ``max_attempts`` times with exponential backoff on connection errors,
timeouts, 5xx, throttling and checksum mismatches; other client errors (403, 404...) fail at once.
What still fails raises :class:`S3Error` (an ``OSError``): the caller keeps the file and retries later.
File reading and hashing run in worker threads; the event loop never blocks on the disk.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import os
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.config import StorageConfig
from services.storage.disk import StoredObject, fsync_dir, hash_file, validate_key

log = logging.getLogger("callvault.storage.s3")

META_SHA256 = "sha256"  # x-amz-meta-sha256: the hex SHA-256 of the whole object
JOURNAL_SUFFIX = ".s3upload.json"
CONTENT_TYPES = {"wav": "audio/wav", "mp3": "audio/mpeg", "opus": "audio/ogg", "flac": "audio/flac"}
_RETRY_CODES = frozenset(
    {
        "BadDigest",
        "InternalError",
        "RequestTimeout",
        "RequestTimeTooSkewed",
        "ServiceUnavailable",
        "SlowDown",
        "Throttling",
        "XAmzContentSHA256Mismatch",
        "XAmzContentChecksumMismatch",
    }
)


class S3Error(OSError):
    """An S3 request failed for good (after its retries) or the store answered something wrong."""

    def __init__(self, message: str, *, code: str = "", status: int = 0) -> None:
        super().__init__(message)
        self.code = code
        self.status = status


class S3IntegrityError(S3Error):
    """What the store holds or answered does not match what was sent (size, MD5 or SHA-256)."""


class S3NotFound(S3Error):
    """The object (or bucket, or multipart upload) does not exist."""


@dataclass(frozen=True)
class S3Settings:
    """Where and how to reach the bucket (StorageConfig's ``s3_*`` fields)."""

    endpoint_url: str
    bucket: str
    region: str = "us-east-1"
    access_key: str = ""
    secret_key: str = ""
    part_size: int = 8 * 1024 * 1024
    part_concurrency: int = 4
    max_attempts: int = 5
    timeout: float = 30.0

    @classmethod
    def from_config(cls, storage: StorageConfig) -> S3Settings:
        return cls(
            endpoint_url=storage.s3_endpoint_url,
            bucket=storage.s3_bucket,
            region=storage.s3_region,
            access_key=storage.s3_access_key,
            secret_key=storage.s3_secret_key,
            part_size=storage.s3_part_size,
            part_concurrency=storage.s3_part_concurrency,
            max_attempts=storage.s3_max_attempts,
            timeout=storage.s3_timeout,
        )


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode("ascii")


def _error_info(exc: BaseException) -> tuple[str, int]:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        code = str((response.get("Error") or {}).get("Code") or "")
        status = int((response.get("ResponseMetadata") or {}).get("HTTPStatusCode") or 0)
        return code, status
    return "", 0


def is_retryable(exc: BaseException) -> bool:
    """True for failures worth another attempt: the network, the store's 5xx/throttling, bad digests."""
    from botocore.exceptions import BotoCoreError, ClientError

    if isinstance(exc, ClientError):
        code, status = _error_info(exc)
        return status >= 500 or status in (408, 429) or code in _RETRY_CODES
    return isinstance(exc, (BotoCoreError, OSError, TimeoutError)) or type(exc).__module__.startswith(
        "aiohttp"
    )


class S3Client:
    """One aiobotocore client for a bucket, created on first use, with retrying calls."""

    def __init__(self, settings: S3Settings, *, backoff: float = 0.2, max_backoff: float = 5.0) -> None:
        if not settings.bucket:
            raise ValueError("S3 bucket name is empty")
        self.settings = settings
        self.bucket = settings.bucket
        self.backoff = backoff
        self.max_backoff = max_backoff
        self._stack: contextlib.AsyncExitStack | None = None
        self._client: Any = None
        self._lock = asyncio.Lock()

    async def client(self) -> Any:
        if self._client is None:
            async with self._lock:
                if self._client is None:
                    from aiobotocore.session import get_session
                    from botocore.config import Config

                    s = self.settings
                    config = Config(
                        s3={"addressing_style": "path"},
                        retries={"total_max_attempts": 1, "mode": "standard"},  # we retry, with logging
                        connect_timeout=min(10.0, s.timeout),
                        read_timeout=s.timeout,
                        request_checksum_calculation="when_required",
                        response_checksum_validation="when_required",
                        max_pool_connections=32,
                    )
                    stack = contextlib.AsyncExitStack()
                    self._client = await stack.enter_async_context(
                        get_session().create_client(
                            "s3",
                            endpoint_url=s.endpoint_url or None,
                            region_name=s.region,
                            aws_access_key_id=s.access_key or None,
                            aws_secret_access_key=s.secret_key or None,
                            config=config,
                        )
                    )
                    self._stack = stack
        return self._client

    async def close(self) -> None:
        stack, self._stack, self._client = self._stack, None, None
        if stack is not None:
            await stack.aclose()

    async def call(self, op: str, what: str, **kwargs: Any) -> dict[str, Any]:
        """``client.<op>(Bucket=bucket, **kwargs)``, retried; raises S3Error naming ``what``."""
        from botocore.exceptions import ClientError

        delay = self.backoff
        attempts = self.settings.max_attempts
        for attempt in range(1, attempts + 1):
            try:
                client = await self.client()
                result: dict[str, Any] = await getattr(client, op)(Bucket=self.bucket, **kwargs)
                return result
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                code, status = _error_info(exc)
                detail = f"{code or type(exc).__name__} {status or ''}".strip()
                if isinstance(exc, ClientError) and (status == 404 or code in ("NoSuchKey", "NoSuchUpload")):
                    raise S3NotFound(f"S3 {op} {what}: {detail}", code=code, status=status) from None
                if not is_retryable(exc) or attempt == attempts:
                    raise S3Error(
                        f"S3 {op} {what} failed after {attempt} attempt(s): {detail}: {exc}",
                        code=code,
                        status=status,
                    ) from exc
                log.warning("S3 %s %s failed (%s); attempt %d/%d in %.1f s",
                            op, what, detail, attempt + 1, attempts, delay)  # fmt: skip
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.max_backoff)
        raise AssertionError("unreachable")

    # ------------------------------------------------------------------ reading
    async def head(self, key: str) -> tuple[int, dict[str, str]] | None:
        """(size, user metadata) of the object at ``key``, or None when it does not exist."""
        try:
            r = await self.call("head_object", key, Key=key)
        except S3NotFound:
            return None
        return int(r["ContentLength"]), dict(r.get("Metadata") or {})

    async def iter_range(
        self, key: str, first: int, last: int, chunk: int = 256 * 1024
    ) -> AsyncGenerator[bytes, None]:
        """Bytes ``first..last`` (inclusive) of the object, by a ranged GET, in chunks."""
        r = await self.call("get_object", key, Key=key, Range=f"bytes={first}-{last}")
        body = r["Body"]
        try:
            while data := await body.read(chunk):
                yield data
        finally:
            body.close()

    async def delete(self, key: str) -> None:
        """Remove the object at ``key``; a missing object is not an error."""
        with contextlib.suppress(S3NotFound):
            await self.call("delete_object", key, Key=key)


def journal_path(src: Path) -> Path:
    return src.parent / f".{src.name}{JOURNAL_SUFFIX}"


def _read_part(path: Path, offset: int, size: int) -> tuple[bytes, str, str, bytes]:
    """Bytes of one part with their MD5 (base64 and hex) and SHA-256 digest (blocking)."""
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(size)
    md5 = hashlib.md5(data, usedforsecurity=False).digest()
    return data, _b64(md5), md5.hex(), hashlib.sha256(data).digest()


def _write_journal(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _read_journal(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("S3 upload journal %s is unreadable (%s); starting the upload over", path, exc)
        return None
    return data if isinstance(data, dict) else None


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        return
    fsync_dir(path.parent)


class S3Writer:
    """Stores finished recordings as objects (see the module docstring for the guarantees)."""

    kind = "s3"

    def __init__(self, settings: S3Settings, client: S3Client | None = None) -> None:
        self.settings = settings
        self.client = client or S3Client(settings)
        self.bucket = settings.bucket

    async def close(self) -> None:
        await self.client.close()

    async def store(self, src: Path, key: str, *, content_type: str | None = None) -> StoredObject:
        """Upload ``src`` as ``key``, verify it, then remove ``src`` (like the disk writer's move).

        ``content_type`` defaults to the audio type of the key's extension, or
        ``application/octet-stream`` for an encrypted spool file (``*.enc``).

        Idempotent after a crash: when ``src`` is gone but the object exists (a previous call got as
        far as the upload), the stored object is described and returned.
        """
        validate_key(key)
        src = Path(src)
        if content_type is None:
            ext = key.rsplit(".", 1)[-1]
            plain = not src.name.endswith(".enc")
            content_type = (
                CONTENT_TYPES.get(ext, "application/octet-stream") if plain else "application/octet-stream"
            )
        try:
            size, sha = await asyncio.to_thread(hash_file, src)
        except FileNotFoundError:
            found = await self.client.head(key)
            if found is None or not found[1].get(META_SHA256):
                raise
            log.info("store %s: source %s already uploaded, keeping the stored object", key, src)
            return StoredObject(self.kind, key, found[0], found[1][META_SHA256])
        existing = await self.client.head(key)
        if existing is not None and existing == (size, {**existing[1], META_SHA256: sha}):
            log.info("store %s: the object is already stored (same size and SHA-256)", key)
        elif size <= self.settings.part_size:
            await self._put(src, key, size, sha, content_type)
        else:
            await self._multipart(src, key, size, sha, content_type)
        await self._verify(key, size, sha)
        await asyncio.to_thread(_remove, src)
        return StoredObject(self.kind, key, size, sha)

    async def _put(self, src: Path, key: str, size: int, sha: str, content_type: str) -> None:
        data, md5_b64, md5_hex, digest = await asyncio.to_thread(_read_part, src, 0, size)
        if digest.hex() != sha:
            raise S3IntegrityError(f"{src} changed while it was being uploaded")
        r = await self.client.call(
            "put_object", key, Key=key, Body=data, ContentMD5=md5_b64, ChecksumSHA256=_b64(digest),
            ContentType=content_type, Metadata={META_SHA256: sha},
        )  # fmt: skip
        _check_etag(r, md5_hex, key)

    async def _multipart(self, src: Path, key: str, size: int, sha: str, content_type: str) -> None:
        journal = journal_path(src)
        state = await asyncio.to_thread(_read_journal, journal)
        part_size = self.settings.part_size
        done: dict[int, tuple[str, int]] = {}
        upload_id = None
        if state and state.get("key") == key and state.get("sha256") == sha and state.get("size") == size:
            upload_id = str(state.get("upload_id"))
            part_size = int(state.get("part_size") or part_size)
            try:
                done = await self._listed_parts(key, upload_id)
                log.info("store %s: resuming multipart upload (%d part(s) already stored)", key, len(done))
            except S3NotFound:
                log.info("store %s: the journalled multipart upload is gone; starting over", key)
                upload_id = None
        if upload_id is None:
            r = await self.client.call(
                "create_multipart_upload", key, Key=key, ContentType=content_type,
                Metadata={META_SHA256: sha}, ChecksumAlgorithm="SHA256",
            )  # fmt: skip
            upload_id = str(r["UploadId"])
            await asyncio.to_thread(
                _write_journal, journal,
                {"key": key, "upload_id": upload_id, "size": size, "sha256": sha, "part_size": part_size},
            )  # fmt: skip
        try:
            parts, read_sha = await self._send_parts(src, key, upload_id, size, part_size, done)
            if read_sha != sha:
                raise S3IntegrityError(f"{src} changed while it was being uploaded")
            await self.client.call(
                "complete_multipart_upload", key, Key=key, UploadId=upload_id,
                MultipartUpload={"Parts": parts},
            )  # fmt: skip
        except S3Error as exc:
            if isinstance(exc, S3IntegrityError) or not is_retryable_error(exc):
                # The upload cannot succeed as it is: drop it so the next attempt starts clean.
                with contextlib.suppress(S3Error):
                    await self.client.call("abort_multipart_upload", key, Key=key, UploadId=upload_id)
                await asyncio.to_thread(_remove, journal)
            raise
        await asyncio.to_thread(_remove, journal)

    async def _send_parts(
        self, src: Path, key: str, upload_id: str, size: int, part_size: int,
        done: dict[int, tuple[str, int]],
    ) -> tuple[list[dict[str, Any]], str]:  # fmt: skip
        """Upload the parts of ``src`` that are not in ``done`` (number -> stored MD5 and size), up to
        ``part_concurrency`` at once; return the part list for CompleteMultipartUpload (in part
        order) and the SHA-256 of the file as it was read."""
        etags: dict[int, str] = {}
        checksums: dict[int, str] = {}
        whole = hashlib.sha256()
        uploads: set[asyncio.Task[None]] = set()
        window = max(1, self.settings.part_concurrency)
        try:
            for number, offset in enumerate(range(0, size, part_size), start=1):
                # Room for one more part first, then read it: at most `window` parts in memory.
                await _collect(uploads, window - 1)
                length = min(part_size, size - offset)
                data, md5_b64, md5_hex, part_sha = await asyncio.to_thread(_read_part, src, offset, length)
                await asyncio.to_thread(whole.update, data)
                checksums[number] = _b64(part_sha)
                if done.get(number) == (md5_hex, length):
                    etags[number] = f'"{md5_hex}"'
                else:
                    send = self._upload_part(key, upload_id, number, data, md5_b64, md5_hex, part_sha, etags)
                    uploads.add(asyncio.create_task(send, name=f"s3 upload {key} part {number}"))
                del data  # the task holds it while it is sent, and no longer
            await _collect(uploads, 0)
        finally:
            await _cancel(uploads)  # after a failure: no part request outlives its upload
        parts = [{"PartNumber": n, "ETag": etags[n], "ChecksumSHA256": checksums[n]} for n in sorted(etags)]
        return parts, whole.hexdigest()

    async def _upload_part(
        self, key: str, upload_id: str, number: int, data: bytes, md5_b64: str, md5_hex: str,
        part_sha: bytes, etags: dict[int, str],
    ) -> None:  # fmt: skip
        """Send one part (retried by :meth:`S3Client.call`); its ETag goes into ``etags``."""
        what = f"{key} part {number}"
        r = await self.client.call(
            "upload_part", what, Key=key, UploadId=upload_id, PartNumber=number, Body=data,
            ContentMD5=md5_b64, ChecksumSHA256=_b64(part_sha),
        )  # fmt: skip
        _check_etag(r, md5_hex, what)
        etags[number] = str(r["ETag"])

    async def _listed_parts(self, key: str, upload_id: str) -> dict[int, tuple[str, int]]:
        out: dict[int, tuple[str, int]] = {}
        marker = 0
        while True:
            r = await self.client.call(
                "list_parts", key, Key=key, UploadId=upload_id, PartNumberMarker=marker
            )
            for p in r.get("Parts") or []:
                out[int(p["PartNumber"])] = (str(p["ETag"]).strip('"'), int(p["Size"]))
            if not r.get("IsTruncated"):
                return out
            marker = int(r.get("NextPartNumberMarker") or 0)

    async def _verify(self, key: str, size: int, sha: str) -> None:
        found = await self.client.head(key)
        if found is None:
            raise S3IntegrityError(f"S3 object {key} is missing right after its upload")
        got_size, meta = found
        if got_size != size or meta.get(META_SHA256) != sha:
            raise S3IntegrityError(
                f"S3 object {key} holds {got_size} bytes with SHA-256 {meta.get(META_SHA256)!r}; "
                f"sent {size} bytes with SHA-256 {sha}"
            )


async def _collect(uploads: set[asyncio.Task[None]], at_most: int) -> None:
    """Take the part uploads that have ended out of ``uploads``, waiting until at most ``at_most``
    are still running; the first failure among the ended ones is raised (every one is retrieved)."""
    while True:
        ended = [t for t in uploads if t.done()]
        uploads.difference_update(ended)
        failure: BaseException | None = None
        for task in ended:
            try:
                task.result()
            except BaseException as exc:  # a CancelledError too: the part was not sent
                failure = failure or exc
        if failure is not None:
            raise failure
        if len(uploads) <= at_most:
            return
        await asyncio.wait(uploads, return_when=asyncio.FIRST_COMPLETED)


async def _cancel(uploads: set[asyncio.Task[None]]) -> None:
    """Cancel the part uploads still running and wait until they have ended, even when the caller is
    cancelled meanwhile (its cancellation is raised afterwards): an abort never races a part, and no
    task is left behind with an exception nobody retrieved."""
    for task in uploads:
        task.cancel()
    cancelled = False
    while uploads:
        try:
            await asyncio.wait(uploads)
        except asyncio.CancelledError:
            cancelled = True
            continue
        for task in uploads:
            if not task.cancelled():
                task.exception()  # retrieved: the failure that stopped the upload is being raised
        uploads.clear()
    if cancelled:
        raise asyncio.CancelledError


def is_retryable_error(exc: S3Error) -> bool:
    """Whether a failed upload is worth resuming later (the store or the network was the problem)."""
    return exc.status == 0 or exc.status >= 500 or exc.status in (408, 429) or exc.code in _RETRY_CODES


def _check_etag(response: dict[str, Any], md5_hex: str, what: str) -> None:
    etag = str(response.get("ETag") or "").strip('"')
    if etag and etag != md5_hex:
        raise S3IntegrityError(f"S3 answered ETag {etag} for {what}; its MD5 is {md5_hex}")


async def retry_forever(
    make: Callable[[], Awaitable[Any]],
    what: str,
    *,
    first: float = 0.5,
    cap: float = 10.0,
    permanent: tuple[type[BaseException], ...] = (),
) -> Any:
    """Await ``make()`` until it succeeds, the delay doubling from ``first`` up to ``cap``.

    Every failure is logged (a warning with the attempt number and the next delay); exceptions of
    the ``permanent`` types are not retried.
    """
    delay = first
    attempt = 0
    while True:
        attempt += 1
        try:
            return await make()
        except asyncio.CancelledError:
            raise
        except permanent:
            raise
        except Exception as exc:
            log.warning("%s failed (attempt %d: %s); retrying in %.1f s", what, attempt, exc, delay)
        await asyncio.sleep(delay)
        delay = min(delay * 2, cap)

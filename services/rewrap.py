"""``callvault rewrap``: re-wrap the data keys of a tenant's encrypted recordings after a key rotation.

An envelope's key table lies outside the chunks' associated data (services/storage/envelope.py),
so a recording can be opened by a new certificate's key, and stop being opened by a retired one,
without re-encrypting its audio. For each of the tenant's encrypted recordings this tool:

1. finds it through the metadata store Web Services uses (the documents name the storage object,
   the tenant and the key ids; a walk of the storage tree would find objects whose metadata is
   missing or deleted, which must not be touched, and could not update the key ids);
2. reads only the envelope header (disk or S3) and stops there when the table already holds every
   added certificate and none of the dropped key ids and the metadata agrees ("already done");
3. has the data key unwrapped by a Crypto Server (``POST /api/v1/unwrap``, internal token: the
   tool never holds a private key) and checks that it opens chunk 0 of the object;
4. wraps the data key for the added certificates (public keys only) and removes the dropped key
   ids; when a key is dropped, asks the Crypto Server to unwrap again with only the keys that
   remain, so a recording is never left without a key the keystore holds;
5. writes the object again, crash-safely: disk = temporary file beside it, fsync, rename, fsync of
   the directory; S3 = the whole object uploaded again under its key (a PUT, or a multipart upload
   completed at once: readers see the old or the new object, never a mix). The header sits in front
   of the audio and changes length, so the chunks are copied (disk) or downloaded and uploaded
   again (S3), byte for byte, never re-encrypted;
6. updates the document's ``encryption.key_ids`` and ``storage.size``/``sha256`` (compare-and-set
   on the document read in step 1).

A crash between 5 and 6 leaves a correct object with stale metadata; the next run finds the header
done and only repairs the metadata, so the tool is idempotent and resumable. Failures are per
recording, with the reason; the run goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import json
import logging
import os
import re
import sys
import tempfile
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

from cryptography import x509

from services import config as config_mod
from services.config import ClusterConfig
from services.storage import envelope
from services.storage.disk import DiskWriter, StorageKeyError, fsync_dir, hash_file
from services.storage.envelope import EnvelopeError, Header
from services.storage.s3 import META_SHA256, S3Client, S3Error, S3Settings, S3Writer
from services.web_services.crypto_client import CryptoClient, CryptoUnavailable, UnwrapRefused
from services.web_services.store import (
    MAX_LIMIT,
    MetadataStore,
    SearchFilters,
    SqliteMetadataStore,
    StoreUnavailable,
    canonical,
    create_store,
)

log = logging.getLogger("callvault.rewrap")

HEADER_READ = 4096
COPY_CHUNK = 1 << 20
_KEY_ID_RE = re.compile(r"[0-9a-f]{64}")


class RewrapUsageError(ValueError):
    """The command line or configuration asks for something impossible (exit code 2)."""


class RecordingFailed(Exception):
    """One recording could not be re-wrapped; the message says why. The run goes on."""


@dataclass(frozen=True)
class Plan:
    """What to do to every recording of a tenant."""

    tenant: str
    add: tuple[x509.Certificate, ...]
    drop: frozenset[str]
    since: datetime | None = None
    dry_run: bool = False

    @property
    def add_ids(self) -> tuple[str, ...]:
        return tuple(envelope.key_id(c) for c in self.add)

    def header_done(self, header: Header) -> bool:
        keys = header.wrapped_keys
        return all(k in keys for k in self.add_ids) and not any(k in keys for k in self.drop)


@dataclass
class Report:
    """Counts of a run and the reasons of its failures."""

    counts: Counter[str] = field(default_factory=Counter)
    failures: list[tuple[str, str]] = field(default_factory=list)

    def fail(self, rid: str, reason: str) -> None:
        self.counts["failed"] += 1
        self.failures.append((rid, reason))
        log.error("recording %s: %s", rid, reason)

    def summary(self, dry_run: bool) -> str:
        verb = "would be re-wrapped" if dry_run else "re-wrapped"
        c = self.counts
        lines = [
            f"{c['rewrapped']} {verb}, {c['metadata_repaired']} metadata repaired, "
            f"{c['already_done']} already done, {c['not_encrypted']} not encrypted, {c['failed']} failed"
        ]
        lines += [f"  failed {rid}: {reason}" for rid, reason in self.failures]
        return "\n".join(lines)


# --- objects: disk and S3 ------------------------------------------------------------------------


def _copy_rewrapped(src: BinaryIO, old: Header, new_head: bytes, dst: BinaryIO) -> tuple[int, str]:
    """Write ``new_head`` then the chunks of ``src`` (after its old header) into ``dst``; checks that
    ``src`` has exactly the size its header announces. Returns the new object's size and SHA-256."""
    digest = hashlib.sha256(new_head)
    dst.write(new_head)
    src.seek(old.data_offset)
    remaining = old.total_size - old.data_offset
    while remaining > 0:
        piece = src.read(min(COPY_CHUNK, remaining))
        if not piece:
            raise RecordingFailed("the stored object is truncated (shorter than its header says)")
        digest.update(piece)
        dst.write(piece)
        remaining -= len(piece)
    if src.read(1):
        raise RecordingFailed("the stored object has bytes after its last chunk")
    return len(new_head) + old.total_size - old.data_offset, digest.hexdigest()


def _check_first_chunk(f: BinaryIO, header: Header, data_key: bytes) -> None:
    """The data key must open chunk 0 of the object in ``f`` (whose header is ``header``)."""
    f.seek(header.chunk_offset(0))
    sealed = f.read(header.chunk_plain_size(0) + envelope.TAG_SIZE)
    try:
        envelope.decrypt_chunk(header, data_key, 0, sealed)
    except EnvelopeError as exc:
        raise RecordingFailed(f"the unwrapped data key does not open the audio: {exc}") from None


def rewrite_disk_object(path: Path, old: Header, new_head: bytes, data_key: bytes) -> tuple[int, str]:
    """Replace the header of the disk object ``path`` crash-safely (blocking; a worker thread).

    Temporary file beside it, fsync, check, rename over the old one, fsync of the directory: a
    crash leaves either the old or the new object whole (and at worst a stray ``.rewrap.tmp``).
    """
    tmp = path.with_name(f".{path.name}.rewrap.tmp")
    try:
        with open(path, "rb") as src, open(tmp, "w+b") as dst:
            size, sha = _copy_rewrapped(src, old, new_head, dst)
            dst.flush()
            os.fsync(dst.fileno())
            _check_first_chunk(dst, envelope.parse_header(new_head), data_key)
        os.chmod(tmp, os.stat(path).st_mode & 0o777)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return size, sha


class ObjectStore:
    """Reads headers of and rewrites the stored objects of recordings (disk root and S3 bucket)."""

    def __init__(self, config: ClusterConfig, work_dir: Path | None = None) -> None:
        self.disk = DiskWriter(config.path(config.storage.disk_root))
        self.s3: S3Client | None = None
        if config.storage.s3_endpoint_url or config.storage.s3_bucket:
            self.s3 = S3Client(S3Settings.from_config(config.storage))
        self.work_dir = work_dir

    async def close(self) -> None:
        if self.s3 is not None:
            await self.s3.close()

    def _s3(self, storage: dict[str, Any]) -> S3Client:
        if self.s3 is None:
            raise RecordingFailed("the recording is in S3 and storage.s3_* is not configured")
        bucket = storage.get("bucket")
        if bucket and bucket != self.s3.bucket:
            raise RecordingFailed(
                f"the recording is in S3 bucket {bucket!r}, the config names {self.s3.bucket!r}"
            )
        return self.s3

    def _disk_path(self, storage: dict[str, Any]) -> Path:
        try:
            return self.disk.path(str(storage.get("key", "")))
        except StorageKeyError as exc:
            raise RecordingFailed(f"the storage key is invalid: {exc}") from None

    async def read_header(self, storage: dict[str, Any]) -> tuple[Header, int]:
        """The envelope header of the object and the object's size; reads only the header."""
        kind = storage.get("kind")
        if kind == "disk":
            path = self._disk_path(storage)

            def _read() -> tuple[Header, int]:
                with open(path, "rb") as f:
                    return envelope.read_header(f), os.fstat(f.fileno()).st_size

            try:
                header, size = await asyncio.to_thread(_read)
            except FileNotFoundError:
                raise RecordingFailed(f"the stored object {path} is missing") from None
        elif kind == "s3":
            s3, key = self._s3(storage), str(storage.get("key", ""))
            found = await s3.head(key)
            if found is None:
                raise RecordingFailed(f"the S3 object {key} is missing")
            size = found[0]
            if size < envelope.FIXED_SIZE + 4:
                raise EnvelopeError("the stored object is too short to be an encrypted recording")
            head = await _s3_read(s3, key, 0, min(size, HEADER_READ) - 1)
            need = envelope.header_size(head)
            if need > size:
                raise EnvelopeError("the header is truncated")
            if need > len(head):
                head += await _s3_read(s3, key, len(head), need - 1)
            header = envelope.parse_header(head[:need])
        else:
            raise RecordingFailed(f"storage kind {kind!r} is not supported")
        if header.total_size != size:
            raise EnvelopeError(
                f"the stored object has {size} bytes, its header says {header.total_size}: truncated or padded"
            )
        return header, size

    async def delete(self, storage: dict[str, Any]) -> None:
        """Remove the stored object (a missing one is not an error)."""
        if storage.get("kind") == "disk":
            await asyncio.to_thread(self._disk_path(storage).unlink, True)
        else:
            await self._s3(storage).delete(str(storage.get("key", "")))

    async def digest(self, storage: dict[str, Any]) -> str:
        """The SHA-256 of the stored object as it is now (for a metadata repair)."""
        if storage.get("kind") == "disk":
            return (await asyncio.to_thread(hash_file, self._disk_path(storage)))[1]
        s3, key = self._s3(storage), str(storage.get("key", ""))
        found = await s3.head(key)
        if found is None or not found[1].get(META_SHA256):
            raise RecordingFailed(f"the S3 object {key} is missing or has no {META_SHA256} metadata")
        return found[1][META_SHA256]

    async def rewrite(
        self, storage: dict[str, Any], old: Header, new_head: bytes, data_key: bytes
    ) -> tuple[int, str]:
        """Store the object again with ``new_head`` in front of its unchanged chunks."""
        if storage.get("kind") == "disk":
            return await asyncio.to_thread(
                rewrite_disk_object, self._disk_path(storage), old, new_head, data_key
            )
        s3, key = self._s3(storage), str(storage.get("key", ""))
        with tempfile.TemporaryDirectory(prefix="callvault-rewrap-", dir=self.work_dir) as work:
            tmp = Path(work) / "object.enc"
            with open(tmp, "w+b") as dst:
                digest = hashlib.sha256(new_head)
                await asyncio.to_thread(dst.write, new_head)
                got = 0
                async with contextlib.aclosing(
                    s3.iter_range(key, old.data_offset, old.total_size - 1, COPY_CHUNK)
                ) as pieces:
                    async for piece in pieces:
                        digest.update(piece)
                        got += len(piece)
                        await asyncio.to_thread(dst.write, piece)
                if got != old.total_size - old.data_offset:
                    raise RecordingFailed(f"the S3 object {key} changed size while being read")
                await asyncio.to_thread(dst.flush)
                await asyncio.to_thread(_check_first_chunk, dst, envelope.parse_header(new_head), data_key)
            # S3Writer.store: one PUT or a multipart upload, then HEAD checks size and SHA-256
            stored = await S3Writer(s3.settings, s3).store(tmp, key, content_type="application/octet-stream")
        if stored.sha256 != digest.hexdigest():
            raise RecordingFailed(f"the S3 object {key} does not hold what was uploaded")
        return stored.size, stored.sha256


async def _s3_read(s3: S3Client, key: str, first: int, last: int) -> bytes:
    parts = []
    async with contextlib.aclosing(s3.iter_range(key, first, last)) as pieces:
        async for piece in pieces:
            parts.append(piece)
    return b"".join(parts)


# --- metadata ------------------------------------------------------------------------------------


async def iter_documents(
    store: MetadataStore, tenant: str, since: datetime | None
) -> AsyncIterator[dict[str, Any]]:
    """Every document of ``tenant`` (newest first, from ``since`` on), page by page (keyset cursor:
    updating documents while walking does not move the cursor)."""
    cursor = None
    while True:
        page = await store.search(tenant, SearchFilters(start_after=since), MAX_LIMIT, cursor)
        for doc in page.items:
            yield doc
        if page.next is None:
            return
        cursor = page.next


async def replace_document(store: MetadataStore, old: dict[str, Any], new: dict[str, Any]) -> bool:
    """Replace ``old`` by ``new`` if the stored document is still ``old`` (compare-and-set).

    Only the SQLite store is supported: the MetadataStore interface has no update yet, so this runs
    one UPDATE on the store's own connection and thread. False when the document changed or was
    deleted meanwhile.
    """
    if not isinstance(store, SqliteMetadataStore):
        raise RewrapUsageError(
            "rewrap updates metadata in the SQLite store only (web_services.backend = sqlite)"
        )

    def _cas() -> bool:
        conn = store.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            cur = conn.execute(
                "UPDATE recordings SET doc = ? WHERE id = ? AND tenant = ? AND doc = ?",
                (canonical(new), old["id"], old["tenant"], canonical(old)),
            )
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        return cur.rowcount == 1

    return await store._call(_cas)


def _updated(doc: dict[str, Any], key_ids: list[str], size: int, sha: str) -> dict[str, Any]:
    new = copy.deepcopy(doc)
    new["encryption"]["key_ids"] = key_ids
    new["storage"]["size"] = size
    new["storage"]["sha256"] = sha
    return new


def _metadata_done(doc: dict[str, Any], header: Header, size: int) -> bool:
    return (
        doc["encryption"].get("key_ids") == list(header.wrapped_keys) and doc["storage"].get("size") == size
    )


# --- one recording, one run ----------------------------------------------------------------------


class Rewrapper:
    """Applies a :class:`Plan` to recordings, one at a time."""

    def __init__(self, plan: Plan, store: MetadataStore, objects: ObjectStore, crypto: CryptoClient) -> None:
        self.plan = plan
        self.store = store
        self.objects = objects
        self.crypto = crypto

    async def run(self) -> Report:
        report = Report()
        async for doc in iter_documents(self.store, self.plan.tenant, self.plan.since):
            rid = str(doc.get("id", "?"))
            try:
                outcome = await self.one(doc)
            except RecordingFailed as exc:
                report.fail(rid, str(exc))
            except EnvelopeError as exc:
                report.fail(rid, f"the stored object is not a valid envelope: {exc}")
            except (S3Error, OSError) as exc:
                report.fail(rid, f"storage error: {exc}")
            else:
                report.counts[outcome] += 1
                if outcome in ("rewrapped", "metadata_repaired"):
                    log.info("recording %s: %s", rid, outcome.replace("_", " "))
        return report

    async def one(self, doc: dict[str, Any]) -> str:
        """Re-wrap one recording; returns the outcome (a Report counter name)."""
        if not doc.get("encryption"):
            return "not_encrypted"
        storage = doc.get("storage")
        if not isinstance(storage, dict) or not isinstance(doc["encryption"], dict):
            raise RecordingFailed("the metadata document has no usable storage/encryption section")
        rid = str(doc["id"])
        header, size = await self.objects.read_header(storage)
        if self.plan.header_done(header):
            if _metadata_done(doc, header, size):
                return "already_done"
            if self.plan.dry_run:
                return "metadata_repaired"
            # a previous run died between writing the object and updating its metadata
            sha = await self.objects.digest(storage)
            await self._update(doc, _updated(doc, list(header.wrapped_keys), size, sha))
            return "metadata_repaired"
        remaining = {k for k in header.wrapped_keys if k not in self.plan.drop}
        if not remaining and not self.plan.add:
            raise RecordingFailed(
                "refusing to drop "
                + ", ".join(sorted(header.wrapped_keys))
                + ": it is the last key of the recording"
            )
        if self.plan.dry_run:
            return "rewrapped"
        data_key = await self._unwrap(list(header.wrapped_keys.items()), rid)
        try:
            keys = envelope.rewrapped_keys(header, data_key, list(self.plan.add), self.plan.drop)
        except EnvelopeError as exc:
            raise RecordingFailed(str(exc)) from None
        if any(k in self.plan.drop for k in header.wrapped_keys):
            # never leave a recording that the keystore cannot open: the remaining keys must unwrap
            try:
                again = await self._unwrap(list(keys.items()), rid)
            except RecordingFailed as exc:
                raise RecordingFailed(
                    f"refusing to drop {', '.join(sorted(self.plan.drop))}: {exc}"
                ) from None
            if again != data_key:
                raise RecordingFailed("the remaining wrapped keys unwrap to another data key")
        new_head = envelope.encode_header(header, keys)
        new_size, sha = await self.objects.rewrite(storage, header, new_head, data_key)
        await self._update(doc, _updated(doc, list(keys), new_size, sha))
        return "rewrapped"

    async def _unwrap(self, candidates: list[tuple[str, bytes]], rid: str) -> bytes:
        try:
            return await self.crypto.unwrap(self.plan.tenant, candidates, rid)
        except UnwrapRefused as exc:
            raise RecordingFailed(f"the Crypto Server refused to unwrap ({exc.code}: {exc})") from None
        except CryptoUnavailable as exc:
            raise RecordingFailed(str(exc)) from None

    async def _update(self, old: dict[str, Any], new: dict[str, Any]) -> None:
        if await replace_document(self.store, old, new):
            return
        if await self.store.get(self.plan.tenant, str(old["id"])) is None:
            # deleted (retention, API) while the object was being rewritten: do not leave it behind
            await self.objects.delete(old["storage"])
            raise RecordingFailed("the recording was deleted meanwhile; its rewritten object was removed")
        raise RecordingFailed("the object was re-wrapped but its metadata changed meanwhile; run again")


# --- command line --------------------------------------------------------------------------------


async def _certificate_from_crypto_server(config: ClusterConfig, tenant: str, kid: str) -> x509.Certificate:
    import aiohttp

    cs = config.crypto_server
    if not cs.admin_token:
        raise RewrapUsageError(
            f"--add-cert {kid}: not a certificate of tenant {tenant!r}'s profile, and crypto_server.admin_token "
            "is not set to look it up in the keystore (give the PEM file instead)"
        )
    errors = []
    timeout = aiohttp.ClientTimeout(total=cs.request_timeout)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for url in cs.instance_urls():
            try:
                async with session.get(
                    f"{url}/api/v1/tenants/{tenant}/certificates/{kid}",
                    headers={"Authorization": f"Bearer {cs.admin_token}"},
                ) as resp:
                    body = await resp.json(content_type=None)
            except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as exc:
                errors.append(f"{url}: {type(exc).__name__} {exc}".rstrip())
                continue
            if resp.status == 200 and isinstance(body, dict) and isinstance(body.get("certificate"), str):
                return envelope.load_certificate(body["certificate"])
            if resp.status == 404:
                raise RewrapUsageError(f"--add-cert {kid}: tenant {tenant!r} has no such key in the keystore")
            errors.append(f"{url}: HTTP {resp.status}")
    raise RewrapUsageError(f"--add-cert {kid}: no Crypto Server answered ({'; '.join(errors)})")


async def resolve_certificates(
    config: ClusterConfig, tenant: str, values: list[str], profile: bool
) -> list[x509.Certificate]:
    """``--add-cert`` values (PEM file or key id) and ``--profile`` as checked certificates."""
    t = config.tenant(tenant)
    assert t is not None
    by_id = {}
    for path in t.profile.certificates:
        cert = envelope.load_certificate(path)
        by_id[envelope.key_id(cert)] = cert
    out: list[x509.Certificate] = list(by_id.values()) if profile else []
    for value in values:
        if _KEY_ID_RE.fullmatch(value.lower()):
            kid = value.lower()
            cert = by_id.get(kid) or await _certificate_from_crypto_server(config, tenant, kid)
        else:
            try:
                cert = envelope.load_certificate(Path(value))
            except EnvelopeError as exc:
                raise RewrapUsageError(f"--add-cert {exc}") from None
        if envelope.key_id(cert) not in {envelope.key_id(c) for c in out}:
            out.append(cert)
    return out


def parse_since(value: str) -> datetime:
    """``--since``: a date (2025-01-31) or an ISO 8601 timestamp; naive values are UTC."""
    try:
        dt = datetime.fromisoformat(value.strip())
    except ValueError:
        raise RewrapUsageError(
            f"--since {value!r} is not a date (YYYY-MM-DD) or ISO 8601 timestamp"
        ) from None
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=UTC)


async def _main(args: Any) -> int:
    config = config_mod.load(args.config, overrides=getattr(args, "overrides", None) or {})
    tenant = config.tenant(args.tenant)
    if tenant is None:
        known = ", ".join(t.id for t in config.tenants) or "none"
        raise RewrapUsageError(f"unknown tenant {args.tenant!r} (known: {known})")
    since = parse_since(args.since) if args.since else None
    drop = frozenset(k.lower() for k in args.drop_key)
    for kid in drop:
        if not _KEY_ID_RE.fullmatch(kid):
            raise RewrapUsageError(
                f"--drop-key {kid!r} is not a key id (64 hex digits, the certificate's SHA-256)"
            )
    add = await resolve_certificates(config, tenant.id, list(args.add_cert), bool(args.profile))
    if not add and not drop:
        raise RewrapUsageError("nothing to do: give --add-cert, --profile and/or --drop-key")
    both = drop & {envelope.key_id(c) for c in add}
    if both:
        raise RewrapUsageError(f"key {', '.join(sorted(both))} is both added and dropped")
    if config.web_services.backend != "sqlite":
        raise RewrapUsageError(
            "rewrap updates metadata in the SQLite store only (web_services.backend = sqlite)"
        )
    if not args.dry_run and not config.crypto_server.internal_token:
        raise RewrapUsageError(
            "crypto_server.internal_token is not set: the Crypto Server cannot be asked to unwrap"
        )
    plan = Plan(tenant.id, tuple(add), drop, since, bool(args.dry_run))
    print(
        f"rewrap {tenant.id}: add {', '.join(plan.add_ids) or 'nothing'}; drop {', '.join(sorted(drop)) or 'nothing'}"
        + ("; dry run" if plan.dry_run else ""),
        flush=True,
    )
    store = create_store(config)
    await store.open()
    objects = ObjectStore(config, Path(args.work_dir) if args.work_dir else None)
    crypto = CryptoClient(config.crypto_server, requester="rewrap")
    try:
        report = await Rewrapper(plan, store, objects, crypto).run()
    finally:
        await crypto.close()
        await objects.close()
        await store.close()
    print(report.summary(plan.dry_run), flush=True)
    if args.json:
        print(json.dumps({"counts": dict(report.counts), "failures": report.failures}), flush=True)
    return 1 if report.counts["failed"] else 0


def main(args: Any) -> int:
    """Entry point of ``callvault rewrap`` (services/cli.py); exit 0 all done, 1 some recording
    failed, 2 bad input (config, tenant, certificate, key id)."""
    try:
        return asyncio.run(_main(args))
    except (RewrapUsageError, config_mod.ConfigError, EnvelopeError) as exc:
        print(f"callvault rewrap: {exc}", file=sys.stderr)
        return 2
    except StoreUnavailable as exc:  # the run stops; what was done is done, the next run resumes
        print(f"callvault rewrap: the metadata store is unavailable: {exc}", file=sys.stderr)
        return 1

"""The Recording Processor: recording events from the durable queue -> Web Services.

For each pending event, oldest first: claim it (atomic rename into ``claimed/<consumer>/``, so two
processors never post the same event at once), load and validate it into the metadata document,
``POST /api/v1/internal/recordings`` with the internal token, and acknowledge (delete) it only after
Web Services has it:

==================  =====================================================================
response            what happens to the event
==================  =====================================================================
2xx                 acknowledged (201 created, 200 identical duplicate)
409, 410            acknowledged with a log line (already indexed differently / deleted)
400, 413, 422       moved to ``bad/`` with the reason (it can never be accepted)
401, 403, other 4xx returned to the queue, retried with backoff (a configuration problem)
5xx, no connection  returned to the queue, retried with backoff (Web Services is down)
==================  =====================================================================

Several Web Services instances (``web_services_url`` + ``web_services_urls``): a connection failure
or a 5xx moves on to the next instance at once; only when every instance fails does the event wait.
Roles: every ``active`` processor consumes (active/active); a ``backup`` consumes only while no
active processor of the host is alive (:class:`ActiveGate`).

Backoff starts at ``poll_interval`` and doubles up to ``max_backoff``. Claims of a processor that
died are returned to the queue by any processor after ``claim_timeout``; a processor returns its own
claims at start-up and on shutdown. Posting is idempotent by recording id, so the rare duplicate post
(a slow processor whose claim timed out) is harmless.
"""

from __future__ import annotations

import asyncio
import enum
import fcntl
import json
import logging
import os
import re
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import aiohttp

from services.config import ClusterConfig
from services.storage.disk import DiskWriter, StorageKeyError
from services.storage.metadata import DocumentError, split_unknown, validate_document
from services.storage.queue import EventQueue, QueueCorruptError

log = logging.getLogger("callvault.recording_processor")

INTERNAL_PATH = "/api/v1/internal/recordings"
STALE_CHECK_INTERVAL = 5.0
TEMP_PURGE_INTERVAL = 600.0


class Outcome(enum.Enum):
    DONE = "done"  # acknowledged, rejected or gone: move on
    RETRY = "retry"  # Web Services unavailable or refusing us: back off


def build_document(event: dict[str, Any]) -> dict[str, Any]:
    """The metadata document of a queue event; raises DocumentError naming the bad field.

    Fields this version does not know are kept under ``extra`` rather than dropped or rejected, so a
    newer MCP can add fields without its events being refused.
    """
    known, unknown = split_unknown(event)
    if unknown:
        extra = known.get("extra")
        if extra is not None and not isinstance(extra, dict):
            raise DocumentError("extra", "must be a JSON object or null")
        known["extra"] = {**(extra or {}), **unknown}
        log.debug("event %s: unknown fields %s kept under 'extra'", event.get("id"), sorted(unknown))
    return validate_document(known)


def _sanitise(raw: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", raw)[:100].lstrip("._-")


def consumer_name(name: str | None) -> str:
    """A claim-directory name: the daemon's name, else ``pid-<host>-<pid>``."""
    if name:
        return _sanitise(name) or f"rp-{os.getpid()}"
    return f"pid-{_sanitise(socket.gethostname()) or 'host'}-{os.getpid()}"


def local_consumer_dead(consumer: str) -> bool:
    """True for a ``pid-<this host>-<pid>`` consumer whose process no longer exists.

    Lets a restarted processor take over the claims of one that was killed at once instead of
    after ``claim_timeout``. A reused pid only makes us wait for the timeout, never steal early.
    """
    prefix = f"pid-{_sanitise(socket.gethostname()) or 'host'}-"
    if not consumer.startswith(prefix) or not consumer[len(prefix) :].isdigit():
        return False
    pid = int(consumer[len(prefix) :])
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError):
        return False
    return False


class ActiveGate:
    """Active/backup among the processors of one host, by ``flock`` on ``<queue_dir>/.active.lock``.

    Active processors hold the lock shared for their lifetime; a backup consumes only while it could
    take it exclusively, i.e. while no active processor is alive (the kernel drops the lock of a
    killed process at once). A backup that sees an active come back stands by again; in between both
    may consume, which the claims make safe. Works on a local file system (flock).
    """

    def __init__(self, directory: Path) -> None:
        self.path = directory / ".active.lock"
        self._fd: int | None = None

    def _open(self) -> int:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)

    def hold_shared(self) -> None:
        """Mark this process active (blocking: call it in a thread)."""
        fd = self._open()
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                break
            except BlockingIOError:  # a backup is checking right now
                time.sleep(0.01)
        self._fd = fd

    def no_active(self) -> bool:
        """True when no active processor holds the lock (blocking: call it in a thread)."""
        fd = self._open()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        finally:
            os.close(fd)  # closing drops the lock
        return True

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class RecordingProcessor:
    """One consumer of the event queue."""

    def __init__(
        self,
        queue: EventQueue,
        session: aiohttp.ClientSession,
        *,
        url: str | Sequence[str],
        token: str,
        consumer: str,
        poll_interval: float = 0.2,
        max_backoff: float = 5.0,
        claim_timeout: float = 60.0,
        disk: DiskWriter | None = None,
        role: str = "active",
    ) -> None:
        if role not in ("active", "backup"):
            raise ValueError(f"role must be 'active' or 'backup', not {role!r}")
        self.role = role
        self.gate = ActiveGate(queue.directory)
        self.queue = queue
        self.session = session
        bases = [url] if isinstance(url, str) else list(url)
        if not bases:
            raise ValueError("at least one Web Services URL is needed")
        self.urls = [u.rstrip("/") + INTERNAL_PATH for u in bases]
        self.current = 0
        self.token = token
        self.consumer = consumer
        self.poll_interval = poll_interval
        self.max_backoff = max(max_backoff, poll_interval)
        self.claim_timeout = claim_timeout
        self.disk = disk
        self.backoff = poll_interval
        self.down_since: float | None = None
        self.delivered = 0

    @property
    def url(self) -> str:
        """The Web Services instance posted to now."""
        return self.urls[self.current]

    async def run(self, ready: Callable[[], None] | None = None) -> None:
        """Consume until cancelled; own claims go back to the queue on the way out."""
        await self.queue.release(self.consumer)
        if self.role == "active":
            await asyncio.to_thread(self.gate.hold_shared)
        if ready is not None:
            ready()
        next_stale = 0.0
        next_purge = 0.0
        standing_by = False
        try:
            while True:
                if self.role == "backup":
                    idle = not await asyncio.to_thread(self.gate.no_active)
                    if idle != standing_by:
                        standing_by = idle
                        if idle:
                            log.info("backup: an active processor is alive; standing by")
                        else:
                            log.warning("backup: no active processor is alive; consuming the queue")
                    if idle:
                        await asyncio.sleep(self.poll_interval)
                        continue
                now = time.monotonic()
                if now >= next_stale:
                    await self.queue.release_stale(self.claim_timeout, local_consumer_dead)
                    next_stale = now + STALE_CHECK_INTERVAL
                if now >= next_purge:
                    await self.queue.purge_temp()
                    next_purge = now + TEMP_PURGE_INTERVAL
                outcome = await self.process_pending()
                if outcome is Outcome.RETRY:
                    await asyncio.sleep(self.backoff)
                    self.backoff = min(self.backoff * 2, self.max_backoff)
                else:
                    await asyncio.sleep(self.poll_interval)
        finally:
            # in-flight event (if any) goes back; another processor, or our next life, posts it
            await asyncio.shield(self.queue.release(self.consumer))
            self.gate.release()

    async def process_pending(self) -> Outcome:
        """Deliver the pending events, oldest first; stop at the first one that must be retried."""
        for path in await self.queue.pending():
            claimed = await self.queue.claim(path, self.consumer)
            if claimed is None:
                continue  # another processor took it
            outcome = await self.deliver(claimed)
            if outcome is Outcome.RETRY:
                await self.queue.unclaim(claimed)
                return outcome
            if self.down_since is not None:
                log.info("Web Services reachable again after %.1f s", time.monotonic() - self.down_since)
                self.down_since = None
            self.backoff = self.poll_interval
        return Outcome.DONE

    async def deliver(self, path: Path) -> Outcome:
        """Post one claimed event; acknowledge, reject or ask for a retry."""
        try:
            event = await self.queue.load(path)
        except QueueCorruptError:
            return Outcome.DONE  # moved to bad/ and logged by the queue
        except FileNotFoundError:
            return Outcome.DONE  # our claim went stale and someone else delivered it
        try:
            doc = build_document(event)
        except DocumentError as exc:
            await self.queue.reject(path, f"invalid recording event: {exc}")
            return Outcome.DONE
        await self._check_audio(doc)
        # each instance once, starting with the current one; the first that answers below 500 keeps us
        for _ in range(len(self.urls)):
            url = self.url
            try:
                async with self.session.post(
                    url, json=doc, headers={"Authorization": f"Bearer {self.token}"}
                ) as resp:
                    status = resp.status
                    body = await resp.text()
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                why = f"{type(exc).__name__}: {exc}"
            else:
                if status < 500:
                    break
                why = f"HTTP {status}: {_msg(body)}"
            if len(self.urls) == 1:
                self._down(why)
                return Outcome.RETRY
            self.current = (self.current + 1) % len(self.urls)
            log.warning("Web Services %s unavailable (%s); switching to %s", url, why, self.url)
        else:
            self._down("every instance failed")
            return Outcome.RETRY
        rid = doc["id"]
        if 200 <= status < 300:
            await self.queue.ack(path)
            self.delivered += 1
            log.info("recording %s posted to Web Services (%d)", rid, status)
            return Outcome.DONE
        if status in (409, 410):
            await self.queue.ack(path)
            log.warning(
                "recording %s: Web Services answered %d (%s); event acknowledged", rid, status, _msg(body)
            )
            return Outcome.DONE
        if status in (400, 413, 422):
            await self.queue.reject(path, f"Web Services refused it with {status}: {_msg(body)}")
            return Outcome.DONE
        # another 4xx: a configuration problem (token, tenant), not a document problem
        log.error(
            "recording %s: Web Services answered %d (%s); check the configuration, retrying",
            rid,
            status,
            _msg(body),
        )
        self._down(f"HTTP {status}", quiet=True)
        return Outcome.RETRY

    def _down(self, why: str, quiet: bool = False) -> None:
        if self.down_since is None:
            self.down_since = time.monotonic()
            if not quiet:
                log.warning("Web Services unavailable (%s); events wait in the queue", why)
        else:
            log.debug("Web Services still unavailable (%s)", why)

    async def _check_audio(self, doc: dict[str, Any]) -> None:
        """Warn (only) when a disk recording's file is not where the event says."""
        storage = doc["storage"]
        if self.disk is None or storage["kind"] != "disk":
            return
        try:
            size = await self.disk.stat(storage["key"])
        except (FileNotFoundError, StorageKeyError) as exc:
            log.warning(
                "recording %s: audio %s not found in disk storage (%s)", doc["id"], storage["key"], exc
            )
            return
        if doc["size"] and size != doc["size"]:
            log.warning("recording %s: audio is %d bytes, the event says %d", doc["id"], size, doc["size"])


def _msg(body: str) -> str:
    try:
        return str(json.loads(body)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return body[:200]


async def run(
    config: ClusterConfig, *, name: str | None = None, ready: Callable[[], None] | None = None
) -> None:
    """Consume ``storage.queue_dir`` and post to the ``recording_processor`` URLs until cancelled."""
    rp = config.recording_processor
    token = config.web_services.internal_token
    if not token:
        log.warning("web_services.internal_token is empty: Web Services will refuse the recordings")
    queue = EventQueue(config.path(config.storage.queue_dir))
    consumer = consumer_name(name)
    timeout = aiohttp.ClientTimeout(total=rp.request_timeout, connect=min(rp.request_timeout, 5.0))
    async with aiohttp.ClientSession(timeout=timeout, raise_for_status=False) as session:
        processor = RecordingProcessor(
            queue,
            session,
            url=rp.urls(),
            token=token,
            consumer=consumer,
            poll_interval=rp.poll_interval,
            max_backoff=rp.max_backoff,
            claim_timeout=rp.claim_timeout,
            disk=DiskWriter(config.path(config.storage.disk_root)),
            role=rp.role,
        )
        log.info(
            "Recording Processor %s (%s): queue %s -> %s",
            consumer,
            rp.role,
            queue.directory,
            ", ".join(processor.urls),
        )
        await processor.run(ready)

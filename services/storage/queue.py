"""The durable recording-event queue: one JSON file per event in a directory.

Layout of the queue directory::

    <dir>/<id>.json                              pending events (the MCP's put())
    <dir>/.<id>.json.<random>.tmp                being written; never read, purged when stale
    <dir>/claimed/<consumer>/<claim ns>~<id>.json events a Recording Processor is posting
    <dir>/bad/<id>.json (+ <id>.json.reason)      corrupt or rejected events, kept for an operator

Writes are crash safe: temporary name, fsync, rename, fsync of the directory. A consumer *claims* an
event by renaming it into its own ``claimed/<consumer>/`` directory; rename is atomic, so of two
Recording Processors racing for one event exactly one wins and the other sees it gone. The claim time
is part of the claimed name (set by the same rename), so a claim left behind by a consumer that died
is recognisable and :meth:`EventQueue.release_stale` renames it back into the queue after a timeout.
A slow-but-alive consumer losing its claim that way only causes a duplicate post, which Web Services
absorbs (inserts are idempotent by recording id).

All file work happens in a worker thread.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from services.storage.disk import fsync_dir

log = logging.getLogger("callvault.storage.queue")

CLAIMED = "claimed"
BAD = "bad"
SUFFIX = ".json"
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-]{0,127}")
_CONSUMER_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")
_CLAIMED_RE = re.compile(r"(\d+)~(.+\.json)")


class QueueError(Exception):
    """Base class of the queue's errors."""


class QueueCorruptError(QueueError, ValueError):
    """An event file is not a JSON object; it has been moved to ``bad/``."""

    def __init__(self, message: str, moved_to: Path) -> None:
        super().__init__(message)
        self.moved_to = moved_to


def event_name(path: Path) -> str:
    """The ``<id>.json`` name of an event file, pending or claimed."""
    m = _CLAIMED_RE.fullmatch(path.name)
    return m.group(2) if m else path.name


class EventQueue:
    """A directory of recording events, written by MCPs and consumed by Recording Processors."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.bad_dir = self.directory / BAD
        self.claimed_dir = self.directory / CLAIMED

    # ------------------------------------------------------------------ producer
    async def put(self, event: dict[str, Any]) -> Path:
        """Write ``event`` durably as ``<id>.json``; returns its path. ``event["id"]`` names it."""
        event_id = event.get("id") if isinstance(event, dict) else None
        if not isinstance(event_id, str) or not _ID_RE.fullmatch(event_id):
            raise ValueError(f"event id {event_id!r} must be letters, digits, '-' or '_' (1-128)")
        data = json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode()
        return await asyncio.to_thread(self._put_sync, event_id, data)

    def _put_sync(self, event_id: str, data: bytes) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        final = self.directory / f"{event_id}{SUFFIX}"
        tmp = self.directory / f".{event_id}{SUFFIX}.{uuid.uuid4().hex}.tmp"
        try:
            with open(tmp, "xb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(self.directory)
        return final

    # ------------------------------------------------------------------ consumer
    async def pending(self) -> list[Path]:
        """Pending (unclaimed) events, oldest first; temporary files and subdirectories are ignored."""
        return await asyncio.to_thread(self._pending_sync)

    def _pending_sync(self) -> list[Path]:
        found: list[tuple[int, str, Path]] = []
        try:
            entries = list(os.scandir(self.directory))
        except FileNotFoundError:
            return []
        for entry in entries:
            name = entry.name
            if name.startswith(".") or not name.endswith(SUFFIX):
                continue
            try:
                if not entry.is_file(follow_symlinks=False):
                    continue
                mtime = entry.stat(follow_symlinks=False).st_mtime_ns
            except FileNotFoundError:  # claimed or acked meanwhile
                continue
            found.append((mtime, name, Path(entry.path)))
        found.sort(key=lambda t: (t[0], t[1]))
        return [p for _, _, p in found]

    async def claim(self, path: Path, consumer: str) -> Path | None:
        """Atomically take a pending event for ``consumer``; None when another consumer was first."""
        if not _CONSUMER_RE.fullmatch(consumer):
            raise ValueError(f"consumer name {consumer!r} must be letters, digits, '.', '-' or '_'")
        return await asyncio.to_thread(self._claim_sync, Path(path), consumer)

    def _claim_sync(self, path: Path, consumer: str) -> Path | None:
        target_dir = self.claimed_dir / consumer
        target_dir.mkdir(parents=True, exist_ok=True)
        target = target_dir / f"{time.time_ns()}~{event_name(path)}"
        try:
            os.rename(path, target)
        except FileNotFoundError:
            return None
        fsync_dir(target_dir)
        return target

    async def claimed(self, consumer: str) -> list[Path]:
        """The events currently claimed by ``consumer``, oldest claim first."""
        return await asyncio.to_thread(self._claimed_sync, consumer)

    def _claimed_sync(self, consumer: str) -> list[Path]:
        d = self.claimed_dir / consumer
        try:
            names = [n for n in os.listdir(d) if _CLAIMED_RE.fullmatch(n)]
        except FileNotFoundError:
            return []
        names.sort(key=lambda n: int(n.split("~", 1)[0]))
        return [d / n for n in names]

    async def unclaim(self, path: Path) -> Path | None:
        """Put a claimed event back into the queue (e.g. Web Services is down); None if it is gone."""
        return await asyncio.to_thread(self._unclaim_sync, Path(path))

    def _unclaim_sync(self, path: Path) -> Path | None:
        target = self.directory / event_name(path)
        try:
            os.rename(path, target)
        except FileNotFoundError:
            return None
        fsync_dir(self.directory)
        return target

    async def release(self, consumer: str) -> int:
        """Return every claim of ``consumer`` to the queue (at start-up and on shutdown)."""

        def _release() -> int:
            return sum(self._unclaim_sync(p) is not None for p in self._claimed_sync(consumer))

        n = await asyncio.to_thread(_release)
        if n:
            log.info("returned %d claimed event(s) of %s to the queue", n, consumer)
        return n

    async def release_stale(self, max_age: float, is_dead: Callable[[str], bool] | None = None) -> int:
        """Return claims older than ``max_age`` seconds (of any consumer) to the queue.

        ``is_dead(consumer)``, when given, lets the caller vouch that a consumer is gone (e.g. a
        process of this host that no longer exists): its claims are returned whatever their age.
        """
        return await asyncio.to_thread(self._release_stale_sync, max_age, is_dead)

    def _release_stale_sync(self, max_age: float, is_dead: Callable[[str], bool] | None) -> int:
        limit = time.time_ns() - int(max_age * 1e9)
        released = 0
        try:
            consumers = [e.name for e in os.scandir(self.claimed_dir) if e.is_dir()]
        except FileNotFoundError:
            return 0
        for consumer in consumers:
            claims = self._claimed_sync(consumer)
            if not claims:
                continue
            dead = is_dead is not None and is_dead(consumer)
            for p in claims:
                if (dead or int(p.name.split("~", 1)[0]) < limit) and self._unclaim_sync(p) is not None:
                    why = "its consumer is gone" if dead else "stale"
                    log.warning("claim of %s by %s returned to the queue (%s)", event_name(p), consumer, why)
                    released += 1
        return released

    async def load(self, path: Path) -> dict[str, Any]:
        """Read an event. A file that is not a JSON object is moved to ``bad/`` (QueueCorruptError)."""
        return await asyncio.to_thread(self._load_sync, Path(path))

    def _load_sync(self, path: Path) -> dict[str, Any]:
        data = path.read_bytes()
        try:
            event = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            problem = f"not valid JSON: {exc}"
        else:
            if isinstance(event, dict):
                return event
            problem = f"not a JSON object but {type(event).__name__}"
        moved = self._move_bad_sync(path, problem)
        raise QueueCorruptError(f"event {event_name(path)} is corrupt ({problem}); moved to {moved}", moved)

    async def reject(self, path: Path, reason: str) -> Path | None:
        """Move an event that can never be delivered to ``bad/`` with the reason beside it."""
        return await asyncio.to_thread(self._move_bad_sync, Path(path), reason)

    def _move_bad_sync(self, path: Path, reason: str) -> Path:
        self.bad_dir.mkdir(parents=True, exist_ok=True)
        name = event_name(path)
        target = self.bad_dir / name
        if target.exists():
            target = self.bad_dir / f"{name[: -len(SUFFIX)]}.{time.time_ns()}{SUFFIX}"
        os.rename(path, target)
        target.with_name(target.name + ".reason").write_text(reason + "\n", encoding="utf-8")
        fsync_dir(self.bad_dir)
        log.error("queue event %s moved to %s: %s", name, target, reason)
        return target

    async def ack(self, path: Path) -> None:
        """Remove a delivered event; an event already gone (e.g. re-claimed and acked) is fine."""

        def _ack() -> None:
            try:
                os.unlink(path)
            except FileNotFoundError:
                return
            fsync_dir(Path(path).parent)

        await asyncio.to_thread(_ack)

    async def purge_temp(self, max_age: float = 3600.0) -> int:
        """Delete temporary files older than ``max_age`` seconds left by writers that crashed."""

        def _purge() -> int:
            limit = time.time() - max_age
            n = 0
            try:
                entries = list(os.scandir(self.directory))
            except FileNotFoundError:
                return 0
            for e in entries:
                if e.name.startswith(".") and e.name.endswith(".tmp"):
                    try:
                        if e.stat().st_mtime < limit:
                            os.unlink(e.path)
                            n += 1
                    except FileNotFoundError:
                        continue
            return n

        return await asyncio.to_thread(_purge)

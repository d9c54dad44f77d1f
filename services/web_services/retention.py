"""The retention job: purge the recordings (audio, then metadata) that tenants' rules say to drop.

Each tenant lists rules (``[[tenants.retention]]``: ``max_age_days``, optional ``labels`` the rule
applies to, optional ``exempt_labels``; see :class:`services.config.RetentionRule`). A recording is
purged when one of its tenant's rules says so: it started more than ``max_age_days`` ago, carries one
of the rule's labels (any recording when the rule has none) and none of its exempt labels.

Every Web Services instance runs the job every ``web_services.retention_interval`` seconds, but only
the holder of the store's ``retention`` lease works: the lease is taken (or renewed) before each page
of recordings and given up at the end, so N instances never purge at the same time, and one that
dies mid-run loses the lease when it expires.

A purge deletes the audio first (a failure leaves the metadata, and the next run retries), then the
metadata (with the store's tombstone, so a late duplicate event cannot bring it back), and writes an
audit record into the store (``audit_entries``) and a line to the ``callvault.audit`` log.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from services.config import ClusterConfig, RetentionRule, Tenant
from services.storage.disk import DiskWriter
from services.storage.metadata import format_time, parse_time
from services.storage.s3 import S3Client
from services.web_services.store import MAX_LIMIT, MetadataStore, SearchFilters

log = logging.getLogger("callvault.web_services.retention")
audit = logging.getLogger("callvault.audit")

LEASE = "retention"
AudioDeleter = Callable[[dict[str, Any]], Awaitable[None]]


class AudioDeleteError(RuntimeError):
    """A recording's audio could not be deleted (its metadata is kept for the next run)."""


def rule_applies(rule: RetentionRule, doc: dict[str, Any], now: datetime) -> bool:
    """True when ``rule`` says ``doc`` must go at ``now``."""
    labels = doc.get("labels") or []
    labels = set(labels) if isinstance(labels, list) else set()
    if rule.labels and not labels & set(rule.labels):
        return False
    if labels & set(rule.exempt_labels):
        return False
    return parse_time(doc["start"], "start") < now - timedelta(days=rule.max_age_days)


def purging_rule(tenant: Tenant, doc: dict[str, Any], now: datetime) -> RetentionRule | None:
    """The first of the tenant's rules that purges ``doc``, or None when the recording stays."""
    return next((r for r in tenant.retention if rule_applies(r, doc, now)), None)


def storage_audio_deleter(disk: DiskWriter, s3: S3Client | None = None) -> AudioDeleter:
    """Delete a recording's audio where its ``storage`` says: disk, or S3 when this instance has it.

    Raises AudioDeleteError for audio it cannot reach (S3 not configured here, another bucket) and
    OSError (S3Error) when the storage fails; a missing object is not an error.
    """

    async def delete(doc: dict[str, Any]) -> None:
        storage = doc.get("storage") or {}
        kind, key = storage.get("kind"), str(storage.get("key", ""))
        if kind == "disk":
            await disk.delete(key)
            return
        if kind == "s3" and s3 is not None:
            bucket = storage.get("bucket")
            if bucket and bucket != s3.bucket:
                raise AudioDeleteError(f"the object is in bucket {bucket!r}; this instance has {s3.bucket!r}")
            await s3.delete(key)
            return
        raise AudioDeleteError(f"no storage writer for {kind!r} audio on this instance")

    return delete


@dataclass
class RunReport:
    """What one run did, per tenant."""

    purged: dict[str, list[str]] = field(default_factory=dict)
    failed: dict[str, list[str]] = field(default_factory=dict)
    skipped: bool = False  # another instance held the lease


class RetentionJob:
    """Applies the tenants' retention rules to one metadata store and its storage."""

    def __init__(
        self,
        config: ClusterConfig,
        store: MetadataStore,
        delete_audio: AudioDeleter,
        *,
        holder: str | None = None,
        lease_ttl: float = 300.0,
        page_size: int = MAX_LIMIT,
    ) -> None:
        self.config = config
        self.store = store
        self.delete_audio = delete_audio
        self.holder = holder or f"{socket.gethostname()}:{os.getpid()}"
        self.lease_ttl = lease_ttl
        self.page_size = page_size

    async def run_once(self, now: datetime | None = None) -> RunReport:
        """One pass over every tenant with rules; skipped while another instance holds the lease."""
        now = now or datetime.now(UTC)
        report = RunReport()
        tenants = [t for t in self.config.tenants if t.retention]
        if not tenants:
            return report
        if not await self.store.acquire_lease(LEASE, self.holder, self.lease_ttl):
            log.debug("retention: another instance holds the lease")
            report.skipped = True
            return report
        try:
            for tenant in tenants:
                if not await self._purge_tenant(tenant, now, report):
                    break
        finally:
            await asyncio.shield(self.store.release_lease(LEASE, self.holder))
        total = sum(len(v) for v in report.purged.values())
        failed = sum(len(v) for v in report.failed.values())
        if total or failed:
            log.info("retention: %d recording(s) purged, %d failed", total, failed)
        return report

    async def _purge_tenant(self, tenant: Tenant, now: datetime, report: RunReport) -> bool:
        """Purge one tenant; False when the lease was lost (stop the run)."""
        # candidates: older than the shortest max age of the tenant's rules
        cutoff = now - timedelta(days=min(r.max_age_days for r in tenant.retention))
        cursor = None
        while True:
            page = await self.store.search(
                tenant.id, SearchFilters(start_before=cutoff), self.page_size, cursor
            )
            for doc in page.items:
                rule = purging_rule(tenant, doc, now)
                if rule is not None:
                    await self._purge(tenant, doc, rule, now, report)
            if page.next is None:
                return True
            cursor = page.next
            if not await self.store.acquire_lease(LEASE, self.holder, self.lease_ttl):
                log.warning("retention: lease lost during tenant %s; stopping this run", tenant.id)
                return False

    async def _purge(
        self, tenant: Tenant, doc: dict[str, Any], rule: RetentionRule, now: datetime, report: RunReport
    ) -> None:
        rid = doc["id"]
        try:
            await self.delete_audio(doc)
        except Exception as exc:  # any storage failure: keep the metadata, retry next run
            log.error(
                "retention: audio of %s (tenant %s) not deleted, kept for the next run: %s",
                rid,
                tenant.id,
                exc,
            )
            report.failed.setdefault(tenant.id, []).append(rid)
            return
        if await self.store.delete(tenant.id, rid) is None:
            return  # deleted meanwhile (API or another run)
        storage = doc.get("storage") or {}
        entry = {
            "action": "retention_purge",
            "at": format_time(now),
            "by": self.holder,
            "tenant": tenant.id,
            "recording": rid,
            "call_id": doc.get("call_id", ""),
            "start": doc["start"],
            "labels": doc.get("labels") or [],
            "storage": {"kind": storage.get("kind"), "key": storage.get("key")},
            "rule": {
                "max_age_days": rule.max_age_days,
                "labels": rule.labels,
                "exempt_labels": rule.exempt_labels,
            },
        }
        await self.store.add_audit(tenant.id, entry)
        audit.info(
            "retention-purge recording=%s tenant=%s call_id=%s start=%s storage=%s:%s rule=max_age_days:%d",
            rid,
            tenant.id,
            entry["call_id"],
            doc["start"],
            storage.get("kind"),
            storage.get("key"),
            rule.max_age_days,
        )
        report.purged.setdefault(tenant.id, []).append(rid)

    async def run_forever(self, interval: float) -> None:
        """Run every ``interval`` seconds (10% jitter) until cancelled; errors are logged, not fatal."""
        await asyncio.sleep(min(interval, 5.0) * random.uniform(0.5, 1.0))
        while True:
            try:
                await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("retention run failed; next run in %.0f s", interval)
            await asyncio.sleep(interval * random.uniform(0.9, 1.1))

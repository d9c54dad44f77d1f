"""The Web Services daemon: the REST API of app.py on ``web_services.host:port`` over the metadata
store of ``web_services.backend`` (SQLite or Cassandra), plus the periodic retention job.

Shutdown (cancellation): stop accepting, let in-flight requests finish for up to SHUTDOWN_TIMEOUT
seconds, then close the store.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable

from aiohttp import web

from services.config import ClusterConfig
from services.storage.disk import DiskWriter
from services.storage.s3 import S3Client, S3Settings
from services.web_services.app import create_app
from services.web_services.retention import RetentionJob, storage_audio_deleter
from services.web_services.store import SqliteMetadataStore, create_store

log = logging.getLogger("callvault.web_services")

SHUTDOWN_TIMEOUT = 5.0


async def run(
    config: ClusterConfig, *, name: str | None = None, ready: Callable[[], None] | None = None
) -> None:
    """Serve the API until cancelled."""
    ws = config.web_services
    if not ws.internal_token:
        log.warning("web_services.internal_token is empty: Recording Processors cannot post recordings")
    store = create_store(config)
    await store.open()
    runner: web.AppRunner | None = None
    retention: asyncio.Task[None] | None = None
    retention_s3: S3Client | None = None
    try:
        app = create_app(config, store)
        runner = web.AppRunner(
            app,
            shutdown_timeout=SHUTDOWN_TIMEOUT,
            access_log=logging.getLogger("callvault.web_services.access"),
        )
        await runner.setup()
        site = web.TCPSite(runner, ws.host, ws.port, reuse_address=True)
        await site.start()
        where = store.path if isinstance(store, SqliteMetadataStore) else f"cassandra {ws.cassandra_keyspace}"
        log.info("Web Services on http://%s:%d (store %s)", ws.host, ws.port, where)
        if ws.retention_interval > 0 and any(t.retention for t in config.tenants):
            if config.storage.s3_configured:
                retention_s3 = S3Client(S3Settings.from_config(config.storage))
            job = RetentionJob(
                config,
                store,
                storage_audio_deleter(DiskWriter(config.path(config.storage.disk_root)), retention_s3),
                holder=f"{ws.host}:{ws.port}:{os.getpid()}",
                lease_ttl=max(60.0, ws.retention_interval),
            )
            retention = asyncio.create_task(job.run_forever(ws.retention_interval))
        if ready is not None:
            ready()
        await asyncio.Event().wait()
    finally:
        if retention is not None:
            retention.cancel()
            await asyncio.gather(retention, return_exceptions=True)
        if retention_s3 is not None:
            await retention_s3.close()
        if runner is not None:
            await runner.cleanup()
        await store.close()
        log.info("Web Services stopped")

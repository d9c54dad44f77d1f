"""The Web Services daemon: the REST API of app.py on ``web_services.host:port`` over SQLite.

Shutdown (cancellation): stop accepting, let in-flight requests finish for up to SHUTDOWN_TIMEOUT
seconds, then close the store.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from aiohttp import web

from services.config import ClusterConfig
from services.web_services.app import create_app
from services.web_services.store import SqliteMetadataStore

log = logging.getLogger("callvault.web_services")

SHUTDOWN_TIMEOUT = 5.0


async def run(
    config: ClusterConfig, *, name: str | None = None, ready: Callable[[], None] | None = None
) -> None:
    """Serve the API until cancelled."""
    ws = config.web_services
    if not ws.internal_token:
        log.warning("web_services.internal_token is empty: Recording Processors cannot post recordings")
    store = SqliteMetadataStore(config.path(ws.database))
    await store.open()
    runner: web.AppRunner | None = None
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
        log.info("Web Services on http://%s:%d (store %s)", ws.host, ws.port, store.path)
        if ready is not None:
            ready()
        await asyncio.Event().wait()
    finally:
        if runner is not None:
            await runner.cleanup()
        await store.close()
        log.info("Web Services stopped")

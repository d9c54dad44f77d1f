"""The Crypto Server daemon: the REST API of app.py on ``crypto_server.host:port``.

Start-up checks the keystore (owner, modes 0700/0600, every key file readable and matching its
certificate) and refuses to start on the first problem, naming the file and the fix. Several
instances share one keystore directory (active/active): each serves any request, and keys added
through one are read from the directory by the others when first needed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from aiohttp import web

from services.config import ClusterConfig, ConfigError
from services.crypto_server.app import create_app
from services.crypto_server.keystore import Keystore, KeystoreError

log = logging.getLogger("callvault.crypto_server")

SHUTDOWN_TIMEOUT = 5.0


async def run(
    config: ClusterConfig, *, name: str | None = None, ready: Callable[[], None] | None = None
) -> None:
    """Serve until cancelled; raises ConfigError when the keystore is unsafe or unreadable."""
    cs = config.crypto_server
    keystore = Keystore(config.path(cs.keystore_dir))
    try:
        await asyncio.to_thread(keystore.ensure_root)
        count = await asyncio.to_thread(keystore.check)
    except (KeystoreError, OSError) as exc:
        raise ConfigError(f"crypto_server.keystore_dir: {exc}") from None
    if not cs.internal_token:
        log.warning("crypto_server.internal_token is empty: no data key can be unwrapped")
    if not cs.admin_token:
        log.warning("crypto_server.admin_token is empty: key management is disabled")
    runner = web.AppRunner(
        create_app(config, keystore),
        shutdown_timeout=SHUTDOWN_TIMEOUT,
        access_log=logging.getLogger("callvault.crypto_server.access"),
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, cs.host, cs.port, reuse_address=True)
        await site.start()
        log.info(
            "Crypto Server on http://%s:%d, keystore %s (%d keys)", cs.host, cs.port, keystore.root, count
        )
        if ready is not None:
            ready()
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
        log.info("Crypto Server stopped")

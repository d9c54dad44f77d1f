"""The MCP daemon: one ``[[mcp]]`` entry's SIP endpoint, rtp_core engine and storage hand-off.

``run(config, name=...)`` first finishes recordings a previous run left in its spool (see
services/mcp/session.py), then serves on ``host:port`` (UDP and TCP) and calls ``ready()``. On
cancellation it drains: OPTIONS and new INVITEs get 503, every open session is ended with BYE and its
recording stored and queued within ``shutdown_timeout``; what does not make it stays in the spool and
is recovered at the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable
from typing import Any

from services.config import ClusterConfig, McpConfig
from services.sip.aio import SipEndpoint
from services.storage.queue import EventQueue
from services.storage.writer import StorageTargets

from .server import McpServer
from .session import find_leftovers

log = logging.getLogger("callvault.mcp")


def pick_mcp(config: ClusterConfig, name: str | None) -> McpConfig:
    if name is not None:
        return config.mcp_named(name)
    if len(config.mcp) == 1:
        return config.mcp[0]
    return config.mcp_named("")  # raises ConfigError listing the known names


def make_engine(mcp: McpConfig) -> Any:
    """The rtp_core engine for this MCP's RTP address and port range."""
    from rtp_core import Engine

    return Engine(
        bind_ip=mcp.rtp_ip,
        port_min=mcp.rtp_port_min,
        port_max=mcp.rtp_port_max,
        threads=mcp.engine_threads,
        io=mcp.engine_io,
    )


async def run(
    config: ClusterConfig,
    *,
    name: str | None = None,
    ready: Callable[[], None] | None = None,
    engine_factory: Callable[[McpConfig], Any] = make_engine,
) -> None:
    """Run the MCP named ``name`` until cancelled (docs/ARCHITECTURE.md, daemon entry points)."""
    mcp = pick_mcp(config, name)
    spool = config.path(mcp.spool_dir)
    spool.mkdir(parents=True, exist_ok=True)
    writer = StorageTargets.from_config(config)
    queue = EventQueue(config.path(config.storage.queue_dir))
    engine = engine_factory(mcp)
    endpoint = SipEndpoint(host=mcp.host, port=mcp.port, name=mcp.name)

    def certificates(tenant_id: str) -> list[str]:
        tenant = config.tenant(tenant_id)
        return list(tenant.profile.certificates) if tenant is not None else []

    server = McpServer(
        mcp, endpoint, engine, spool=spool, writer=writer, queue=queue, certificates=certificates,
        max_backoff=config.storage.upload_max_backoff,
    )  # fmt: skip
    loop = asyncio.get_running_loop()
    reader = False
    started = False
    try:
        leftovers = await asyncio.to_thread(find_leftovers, spool)
        if leftovers:
            log.warning(
                "MCP %s: %d recording(s) left in the spool by a previous run", mcp.name, len(leftovers)
            )
            await server.recover(leftovers)
        await endpoint.start()
        started = True
        endpoint.request_handler = server.handle_request
        endpoint.ack_handler = server.handle_ack
        loop.add_reader(engine.fileno(), server.on_engine_readable)
        reader = True
        log.info(
            "MCP %s on %s:%d (udp+tcp), RTP %s:%d-%d (%s receive path, %d engine thread(s)), spool %s",
            mcp.name, endpoint.host, endpoint.port, mcp.rtp_ip, mcp.rtp_port_min, mcp.rtp_port_max,
            getattr(engine, "io", mcp.engine_io), mcp.engine_threads, spool,
        )  # fmt: skip
        _drain_signals(loop, server, mcp.name)
        if ready is not None:
            ready()
        if hasattr(engine, "loop_stats"):
            await _watch_engine(engine, mcp.name)  # until cancelled, unless the engine cannot report
        await asyncio.Event().wait()
    finally:
        for signum in DRAIN_SIGNALS:
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.remove_signal_handler(signum)
        log.info("MCP %s stopping", mcp.name)
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(_shutdown(server, endpoint, engine, mcp, reader=reader, started=started))


#: How often the MCP reads its media engine's loss counters (seconds).
ENGINE_WATCH_INTERVAL = 10.0


class EngineWatch:
    """What the media engine's counters say went wrong since the last look (rtp_core's
    ``loop_stats()``, docs/RTP_CORE.md): one log line per counter that grew."""

    #: counter -> what its growth means
    COUNTERS = {
        "ring_drops": "packet(s) dropped by the kernel because the engine's packet ring was full "
        "(the engine thread is overloaded)",
        "ring_rejected": "packet(s) with a bad IPv4 header, length or UDP checksum refused",
        "events_dropped": "engine event(s) lost because the event queue was full",
    }

    def __init__(self) -> None:
        self.seen: dict[str, int] = {}

    def check(self, stats: list[dict[str, Any]]) -> list[str]:
        out = []
        for key, meaning in self.COUNTERS.items():
            if key == "events_dropped":  # engine-wide: every thread reports the same count
                total = int(stats[0].get(key, 0)) if stats else 0
            else:
                total = sum(int(t.get(key, 0)) for t in stats)
            grew = total - self.seen.get(key, 0)
            self.seen[key] = total
            if grew > 0:
                out.append(f"{grew} {meaning}")
        return out


async def _watch_engine(engine: Any, name: str, interval: float | None = None) -> None:
    """Logs the engine's losses every ``interval`` seconds until cancelled; returns if the engine
    cannot report them (the MCP goes on without the watch)."""
    watch = EngineWatch()
    while True:
        try:
            stats = engine.loop_stats()
        except Exception:
            log.exception("MCP %s: the media engine's counters cannot be read; not watching them", name)
            return
        for line in watch.check(stats):
            log.warning("MCP %s media engine: %s", name, line)
        await asyncio.sleep(ENGINE_WATCH_INTERVAL if interval is None else interval)


#: SIGUSR1 takes the MCP out of service (graceful drain), SIGUSR2 puts it back (docs/HA.md).
DRAIN_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)


def _drain_signals(loop: asyncio.AbstractEventLoop, server: McpServer, name: str) -> None:
    """Drain: OPTIONS and new INVITEs get 503 + Retry-After (the RM marks the MCP draining and
    sends it nothing new); the sessions it has go on until they end, without a deadline."""

    def drain(on: bool) -> None:
        if server.accepting == (not on):
            return
        server.accepting = not on
        if on:
            log.warning("MCP %s draining: no new sessions, %d session(s) go on", name, server.load)
        else:
            log.warning("MCP %s back in service", name)

    loop.add_signal_handler(signal.SIGUSR1, drain, True)
    loop.add_signal_handler(signal.SIGUSR2, drain, False)


async def _shutdown(
    server: McpServer, endpoint: SipEndpoint, engine: Any, mcp: McpConfig, *, reader: bool, started: bool
) -> None:
    try:
        await server.shutdown(mcp.shutdown_timeout)
    finally:
        if reader:
            asyncio.get_running_loop().remove_reader(engine.fileno())
        try:
            engine.close()
        except Exception:
            log.exception("rtp_core: engine close failed")
        if started:
            await endpoint.close()
        await server.writer.close()
        log.info("MCP %s stopped (%d recording(s) finalised)", mcp.name, server.finalised)

"""The Resource Manager daemon: the proxy, the OPTIONS prober and the affinity sweeper.

``run(config)`` binds ``[resource_manager] host:port`` (UDP and TCP), probes every ``[[mcp]]`` with
OPTIONS every ``options_interval`` and calls ``ready()`` once the first round of probes is in (so the
first call already sees the MCPs that are up). Cancellation stops it gracefully: new sessions get 503,
transactions in flight get ``shutdown_timeout`` seconds to finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from services.config import ClusterConfig
from services.mcp import xcv
from services.sip.aio import SipEndpoint
from services.sip.message import Request, new_call_id, new_tag
from services.sip.uri import SipUri

from .affinity import AffinityStore, InMemoryAffinityStore
from .pool import McpNode, McpPool
from .proxy import Proxy, is_refusal
from .replication import Peer, Replicator

log = logging.getLogger("callvault.rm")


class HealthProber:
    """Sends OPTIONS to every MCP every ``interval`` seconds and feeds the answers to the pool."""

    def __init__(
        self, endpoint: SipEndpoint, proxy: Proxy, interval: float, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.endpoint = endpoint
        self.proxy = proxy
        self.pool = proxy.pool
        self.interval = interval
        self.clock = clock
        self._call_ids = {n.name: new_call_id(endpoint.host) for n in self.pool}
        self._seq = dict.fromkeys(self._call_ids, 0)
        self._tag = new_tag()
        self.rounds = 0

    def options(self, node: McpNode) -> Request:
        self._seq[node.name] += 1
        uri = SipUri.parse(node.uri)
        me = self.proxy.me
        host = f"[{me.host}]" if ":" in me.host else me.host
        return Request(
            "OPTIONS",
            uri,
            [
                ("From", f"<sip:rm@{host}:{me.port}>;tag={self._tag}"),
                ("To", f"<{uri}>"),
                ("Call-ID", self._call_ids[node.name]),
                ("CSeq", f"{self._seq[node.name]} OPTIONS"),
                ("Max-Forwards", "70"),
                ("Accept", "application/sdp"),
            ],
        )

    async def probe(self, node: McpNode) -> None:
        """One OPTIONS to ``node``; the answer (or its absence within one interval) goes to the pool."""
        try:
            client = self.endpoint.start_request(self.options(node), node.address, "udp")
        except OSError as exc:
            self.proxy.note(self.pool.probe_failed(node.name, self.clock(), f"send failed: {exc}"))
            return
        final = asyncio.ensure_future(client.final())
        done, _ = await asyncio.wait({final}, timeout=self.interval)
        if not done:
            # The transaction keeps running to Timer F; its late answer no longer matters.
            final.add_done_callback(lambda f: f.cancelled() or f.exception())
            self.proxy.note(self.pool.probe_failed(node.name, self.clock(), "no answer to OPTIONS"))
            return
        try:
            response = final.result()
        except Exception as exc:
            self.proxy.note(self.pool.probe_failed(node.name, self.clock(), f"OPTIONS failed: {exc}"))
            return
        now = self.clock()
        if is_refusal(response):
            self.proxy.note(self.pool.probe_draining(node.name, now, f"503 {response.reason}"))
        elif response.status == 408 or response.status >= 500:
            self.proxy.note(
                self.pool.probe_failed(node.name, now, f"OPTIONS {response.status} {response.reason}")
            )
        else:
            load = xcv.parse_load(response.headers.get(xcv.LOAD))
            self.proxy.note(self.pool.probe_ok(node.name, now, load))

    async def round(self) -> None:
        await asyncio.gather(*(self.probe(n) for n in self.pool))
        self.rounds += 1

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            await self.round()
            await asyncio.sleep(max(0.0, self.interval - (loop.time() - started)))


async def sweep_affinity(store: AffinityStore, ttl: float, *, clock: Callable[[], float] = time.time) -> None:
    """Forget sessions idle for longer than ``ttl`` (dialogs whose BYE the RM never saw)."""
    period = min(60.0, max(1.0, ttl / 10))
    while True:
        await asyncio.sleep(period)
        for entry in store.expire(clock(), ttl):
            log.info("session %s affinity expired (MCP %s, idle > %.0f s)", entry.session_id, entry.mcp, ttl)


async def run(
    config: ClusterConfig,
    *,
    name: str | None = None,
    ready: Callable[[], None] | None = None,
    store: AffinityStore | None = None,
) -> None:
    """Run the Resource Manager until cancelled (docs/ARCHITECTURE.md, daemon entry points)."""
    rm = config.resource_manager
    if not config.mcp:
        log.warning("no [[mcp]] configured: every recording session will be answered 503")
    inst = rm.instance(name)
    host, port = (inst.host, inst.port) if inst is not None else (rm.host, rm.port)
    endpoint = SipEndpoint(host=host, port=port, name=name or "rm")
    await endpoint.start()
    pool = McpPool(config.mcp, failures_before_down=rm.failures_before_down)
    proxy = Proxy(config, endpoint, pool, store or InMemoryAffinityStore())
    endpoint.request_handler = proxy.handle_request
    endpoint.ack_handler = proxy.handle_ack
    prober = HealthProber(endpoint, proxy, rm.options_interval)
    tasks: list[asyncio.Task[None]] = []
    replicator: Replicator | None = None
    try:
        if inst is not None and len(rm.instances) > 1:
            peers = [Peer(i.name, i.host, i.replication_port) for i in rm.instances if i.name != inst.name]
            replicator = Replicator(
                inst.name, proxy.store, host=inst.host, port=inst.replication_port, peers=peers,
                secret=rm.replication_secret.encode("utf-8"), on_mcp_down=proxy.peer_found_down,
            )  # fmt: skip
            proxy.tell_peers = replicator.mcp_down
            await replicator.start()
            # A (re)started RM learns the sessions its peers placed before it serves (docs/HA.md).
            synced = await replicator.wait_synced(rm.sync_timeout)
            log.info(
                "affinity: %d session(s) after synchronising with %s", len(proxy.store.entries()),
                ", ".join(synced) or f"no peer (none answered within {rm.sync_timeout:g} s)",
            )  # fmt: skip
        await prober.round()
        tasks.append(asyncio.create_task(prober.run(), name="rm-prober"))
        tasks.append(asyncio.create_task(sweep_affinity(proxy.store, rm.affinity_ttl), name="rm-affinity"))
        up = [n.name for n in pool if pool.healthy(n.name)]
        log.info(
            "Resource Manager on %s:%d (udp+tcp); MCPs up: %s of %s",
            endpoint.host, endpoint.port, ", ".join(up) or "none", ", ".join(n.name for n in pool) or "none",
        )  # fmt: skip
        if ready is not None:
            ready()
        await asyncio.Event().wait()
    finally:
        log.info("Resource Manager stopping")
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(_shutdown(proxy, endpoint, tasks, rm.shutdown_timeout, replicator))


async def _shutdown(
    proxy: Proxy,
    endpoint: SipEndpoint,
    tasks: list[asyncio.Task[None]],
    timeout: float,
    replicator: Replicator | None = None,
) -> None:
    await proxy.drain(timeout)
    if replicator is not None:
        await replicator.close()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await endpoint.close()
    log.info("Resource Manager stopped")

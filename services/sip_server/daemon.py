"""The SIP Server daemon: registrar + B2BUA on ``sip_server.host:port`` (UDP and TCP).

:class:`SipServer` wires a :class:`~services.sip.aio.SipEndpoint` to the registrar and the B2BUA and
dispatches every incoming request: REGISTER to the registrar, requests with a To tag to the call
they belong to, new INVITEs to the B2BUA, OPTIONS answered here, anything else 405. Every handler
is wrapped: one request's failure is logged and answered 500, and never reaches another call.

:func:`run` is the daemon entry point of docs/ARCHITECTURE.md: it serves until cancelled, then shuts
down gracefully -- new INVITEs get 503, established calls get ``sip_server.shutdown_timeout``
seconds to end on their own and are then ended by BYE.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import signal
import time
from collections.abc import Callable

from services.config import ClusterConfig, ConfigError
from services.sip.aio import IncomingRequest, SipEndpoint
from services.sip.auth import DigestChallenger
from services.sip.errors import InvalidStateError, SipParseError
from services.sip.timers import TimerConfig
from services.sip_server.b2bua import ALLOW, B2BUA, SDP
from services.sip_server.registrar import Registrar

log = logging.getLogger(__name__)

#: How often session timers are checked and expired bindings purged.
TICK = 0.25
PURGE_EVERY = 30.0


class SipServer:
    """The registrar and the B2BUA behind one SIP endpoint."""

    def __init__(
        self,
        config: ClusterConfig,
        *,
        timers: TimerConfig | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        sip = config.sip_server
        self.config = config
        self.clock = clock
        secret = sip.nonce_secret.encode("utf-8") if sip.nonce_secret else secrets.token_bytes(32)
        try:
            self.challenger = DigestChallenger(sip.realm, secret, algorithms=sip.digest_algorithms)
        except ValueError as exc:
            raise ConfigError(f"sip_server.digest_algorithms: {exc}") from None
        self.endpoint = SipEndpoint(host=sip.host, port=sip.port, name="sip-server", timers=timers)
        self.registrar = Registrar(config, self.challenger)
        self.b2bua = B2BUA(config, self.endpoint, self.registrar, self.challenger, clock=clock)
        self.endpoint.request_handler = self.dispatch
        self.endpoint.ack_handler = self.b2bua.handle_ack
        self.endpoint.stray_response_handler = self.b2bua.handle_stray_response
        self._ticker: asyncio.Task[None] | None = None

    @property
    def port(self) -> int:
        return self.endpoint.port

    async def start(self) -> None:
        await self.endpoint.start()
        self._ticker = asyncio.get_running_loop().create_task(self._tick(), name="sip-server-tick")
        _drain_signals(self, True)
        log.info(
            "SIP Server on %s:%d (udp+tcp), realm %r, %d tenant(s), recording via RM %s",
            self.config.sip_server.host,
            self.endpoint.port,
            self.config.sip_server.realm,
            len(self.config.tenants),
            self.config.sip_server.resource_manager,
        )

    async def stop(self, timeout: float | None = None) -> None:
        """Graceful shutdown: 503 to new calls, let calls end, BYE the rest, close."""
        if timeout is None:
            timeout = self.config.sip_server.shutdown_timeout
        _drain_signals(self, False)
        try:
            await self.b2bua.shutdown(timeout)
        finally:
            if self._ticker is not None:
                self._ticker.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._ticker
            await self.endpoint.close()

    async def abandon(self) -> None:
        """Stop serving at once without ending any call: the HA peer holds them now (issue 5)."""
        self.b2bua.accepting = False
        _drain_signals(self, False)
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        tasks = list(self.b2bua._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.b2bua.calls.clear()
        await self.endpoint.close()

    async def _tick(self) -> None:
        last_purge = time.monotonic()
        while True:
            await asyncio.sleep(TICK)
            try:
                self.b2bua.check_timers()
                if time.monotonic() - last_purge > PURGE_EVERY:
                    last_purge = time.monotonic()
                    dropped = self.registrar.store.purge(self.clock())
                    if dropped:
                        log.info("registrar: %d binding(s) expired", dropped)
            except Exception:
                log.exception("SIP Server tick failed")

    async def dispatch(self, inc: IncomingRequest) -> None:
        """Route one incoming request (a task of its own, run by the endpoint)."""
        req = inc.request
        try:
            mf = req.max_forwards
            if mf is not None and mf == 0 and req.method not in ("ACK", "REGISTER"):
                inc.respond(483)
                return
            if req.method == "REGISTER":
                inc.send(self.registrar.handle(req, inc.source, inc.transport, self.clock()))
            elif req.to.tag:
                await self.b2bua.handle_in_dialog(inc)
            elif req.method == "INVITE":
                await self.b2bua.handle_invite(inc)
            elif req.method == "OPTIONS":
                inc.respond(200, headers=[("Allow", ALLOW), ("Accept", SDP), ("Supported", "timer")])
            elif req.method == "ACK":
                return
            else:
                inc.respond(405, headers=[("Allow", ALLOW)])
        except asyncio.CancelledError:
            raise
        except SipParseError as exc:
            log.info("%s from %s:%d: %s", req.method, *inc.source, exc)
            _answer(inc, exc.status, exc.reason)
        except Exception:
            log.exception("%s from %s:%d failed", req.method, *inc.source)
            _answer(inc, 500, "Server Internal Error")


def _drain_signals(server: SipServer, on: bool) -> None:
    """While ``server`` serves: SIGUSR1 takes it out of service for maintenance (new INVITEs get
    503 + Retry-After, established calls go on without a deadline), SIGUSR2 puts it back
    (docs/HA.md, graceful drain). ``on=False`` removes the handlers."""

    def drain(out: bool) -> None:
        server.b2bua.accepting = not out
        log.warning("SIP Server %s", "draining: new calls get 503" if out else "back in service")

    loop = asyncio.get_running_loop()
    for signum, out in ((signal.SIGUSR1, True), (signal.SIGUSR2, False)):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            if on:
                loop.add_signal_handler(signum, drain, out)
            else:
                loop.remove_signal_handler(signum)


def _answer(inc: IncomingRequest, status: int, reason: str) -> None:
    if inc.answered or inc.request.method == "ACK":
        return
    with contextlib.suppress(InvalidStateError, SipParseError):
        inc.respond(status, reason)


async def run(
    config: ClusterConfig,
    *,
    name: str | None = None,
    ready: Callable[[], None] | None = None,
) -> None:
    """Serve the SIP Server until cancelled, then shut down gracefully.

    With ``sip_server.replication_port`` set, the server is one of an active / hot-standby pair
    (:class:`services.sip_server.ha.HaNode`): ``ready()`` is called once it serves or, as a
    standby, once it holds the active's snapshot (or took over).
    """
    if config.sip_server.replication_port:
        from services.sip_server.ha import HaNode

        await HaNode(config, ready=ready).run()
        return
    server = SipServer(config)
    await server.start()
    if ready is not None:
        ready()
    try:
        await asyncio.Event().wait()
    finally:
        await asyncio.shield(server.stop())

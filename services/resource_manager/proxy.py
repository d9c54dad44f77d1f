"""The Resource Manager's stateful proxy (RFC 3261 section 16) in front of the MCPs.

Initial INVITE (no To tag): identify the tenant, attach its IVR Profile (``X-CV-Profile``), pick the
MCP (session affinity first, else the least-loaded healthy one), Record-Route, forward, relay the
provisionals and the final response, relay CANCEL, and fail over to the next healthy MCP when the
chosen one answers 503 or nothing before any provisional was relayed upstream.

In-dialog requests carry the RM's Record-Route as their top Route; the RM removes it and forwards by
loose routing to the Request-URI (the MCP's or the SIP Server's Contact, RFC 3261 16.4/16.12). No
affinity look-up is needed for them, so any RM instance sharing the Record-Route address can route
them. ACKs for 2xx are forwarded statelessly (16.11).

The pure helpers at the top (tenant identification, request preparation) are unit-tested on their
own; :class:`Proxy` is the part that talks to a :class:`~services.sip.aio.SipEndpoint`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from services.config import ClusterConfig, Tenant
from services.mcp import xcv
from services.sip.errors import SipError, SipParseError
from services.sip.headers import NameAddr, Via
from services.sip.message import Request, Response
from services.sip.uri import SipUri

from .affinity import AffinityEntry, AffinityStore, DialogRef
from .pool import Health, McpNode, McpPool, Transition

if TYPE_CHECKING:
    from services.sip.aio import ClientRequest, IncomingRequest, SipEndpoint

log = logging.getLogger("callvault.rm.proxy")

ALLOW = "INVITE, ACK, CANCEL, BYE, OPTIONS, INFO, UPDATE"
#: RFC 3261 16.6 step 11 / 16.8: Timer C, the longest an INVITE may stay without a final response.
TIMER_C = 180.0


class ProxyError(Exception):
    """The proxy answers the request itself with ``status`` and ``reason``."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason


# -- pure helpers ------------------------------------------------------------------------------


def identify_tenant(config: ClusterConfig, request: Request) -> Tenant:
    """The tenant of a new recording session.

    ``X-CV-Tenant`` when present (an unknown id is 403); else the tenant listing the Request-URI's or
    the To URI's domain; else :meth:`ClusterConfig.tenant_for_domain`'s fallback (the first tenant).
    404 when the cluster has no tenant at all.
    """
    tenant_id = request.headers.get(xcv.TENANT)
    if tenant_id is not None:
        tenant_id = tenant_id.strip()
        tenant = config.tenant(tenant_id)
        if tenant is None:
            raise ProxyError(403, f"Unknown tenant {tenant_id[:64]!r}")
        return tenant
    domains = [request.uri.host]
    with contextlib.suppress(SipError):
        domains.append(request.to.uri.host)
    for domain in domains:
        for tenant in config.tenants:
            if domain and domain.lower() in (d.lower() for d in tenant.domains):
                return tenant
    fallback = config.tenant_for_domain(domains[-1])
    if fallback is None:
        raise ProxyError(404, f"No tenant for domain {domains[-1][:64]!r}")
    return fallback


def uri_port(uri: SipUri) -> int:
    return uri.port if uri.port is not None else (5061 if uri.secure else 5060)


def destination(uri: SipUri) -> tuple[str, int, str]:
    """Where to send a request for ``uri`` (no DNS: the lab and the cluster use addresses)."""
    return uri.host, uri_port(uri), uri.transport if uri.transport in ("udp", "tcp") else "udp"


def pop_top_via(response: Response) -> Response:
    """Remove the proxy's own Via before relaying a response upstream (RFC 3261 16.7 step 3)."""
    response.headers.pop_first("Via")
    return response


def decrement_max_forwards(request: Request) -> None:
    """RFC 3261 16.6 step 3 (a missing Max-Forwards becomes 70); 483 at zero (16.3 step 3)."""
    mf = request.max_forwards
    if mf is None:
        request.headers.set("Max-Forwards", "70")
        return
    if mf <= 0:
        raise ProxyError(483, "Too Many Hops")
    request.headers.set("Max-Forwards", str(mf - 1))


def stateless_branch(request: Request) -> str:
    """A branch for a statelessly forwarded request, the same for its retransmissions (16.11)."""
    top = request.headers.get("Via") or ""
    digest = hashlib.sha256(f"{top}|{request.uri}|{request.headers.get('Call-ID')}".encode()).hexdigest()
    return "z9hG4bK-cvs-" + digest[:24]


def is_refusal(response: Response) -> bool:
    """A 503 that the MCP itself sent (it is alive but takes no new sessions), as opposed to the
    transaction layer's synthetic 503 for a transport error (RFC 3261 8.1.3.1), which carries
    neither Retry-After nor X-CV-Load."""
    return response.status == 503 and ("Retry-After" in response.headers or xcv.LOAD in response.headers)


def uac_contact(request: Request, transport: str) -> str:
    """The Contact URI of a new dialog's UAC (the SIP Server), kept to reach it without the MCP."""
    with contextlib.suppress(SipError, IndexError):
        uri = request.contacts[0].uri.copy()
        if transport == "tcp" and "transport" not in uri.params:
            uri.params["transport"] = "tcp"
        return str(uri)
    return ""


#: RFC 3326 Reason of the BYE that ends a recording dialog whose MCP died.
MCP_DOWN_REASON = 'SIP;cause=503;text="MCP down"'


def mcp_down_bye(dialog: DialogRef, me: LocalAddress, cseq: int) -> tuple[Request, tuple[str, int, str]]:
    """The BYE the RM sends on behalf of a dead MCP (it plays the MCP's side of the dialog: From
    carries the MCP's tag, To the SIP Server's), and where it goes (the SIP Server's Contact)."""
    if not dialog.contact or not dialog.to_tag:
        raise ValueError(f"dialog {dialog.call_id} is not established (no Contact or To tag)")
    target = SipUri.parse(dialog.contact)
    host = f"[{me.host}]" if ":" in me.host else me.host
    request = Request(
        "BYE",
        target,
        [
            ("From", f"<sip:record@{host}:{me.port}>;tag={dialog.to_tag}"),
            ("To", f"<{target}>;tag={dialog.from_tag}"),
            ("Call-ID", dialog.call_id),
            ("CSeq", f"{cseq} BYE"),
            ("Max-Forwards", "70"),
            ("Reason", MCP_DOWN_REASON),
        ],
    )
    return request, destination(target)


def mcp_side_bye(dialog: DialogRef, node: McpNode, cseq: int) -> Request:
    """The BYE that ends a dialog at an MCP declared down (in case it is only slow): the SIP
    Server's side of the dialog, sent straight to the MCP."""
    target = SipUri.parse(node.uri)
    return Request(
        "BYE",
        target,
        [
            ("From", f"<sip:sip-server@{target.host}>;tag={dialog.from_tag}"),
            ("To", f"<{target}>;tag={dialog.to_tag}"),
            ("Call-ID", dialog.call_id),
            ("CSeq", f"{cseq} BYE"),
            ("Max-Forwards", "70"),
            ("Reason", MCP_DOWN_REASON),
        ],
    )


@dataclass
class LocalAddress:
    """The addresses under which requests are meant for this RM itself."""

    host: str
    port: int
    aliases: frozenset[str] = frozenset()

    def matches(self, uri: SipUri) -> bool:
        host = uri.host.lower()
        return uri_port(uri) == self.port and (host == self.host.lower() or host in self.aliases)

    def record_route(self, transport: str = "udp") -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        tp = ";transport=tcp" if transport == "tcp" else ""
        return f"<sip:{host}:{self.port}{tp};lr>"


def strip_own_route(request: Request, me: LocalAddress) -> None:
    """RFC 3261 16.4: remove the top Route when it is this proxy; undo a strict router's rewrite
    (the Request-URI is our Record-Route: the real target is the last Route)."""
    if me.matches(request.uri) and "lr" in request.uri.params:
        routes = request.headers.get_all("Route")
        if routes:
            last = routes[-1]
            request.headers.remove("Route")
            for r in routes[:-1]:
                request.headers.add("Route", r)
            request.uri = NameAddr.parse(last).uri
    top = request.headers.get("Route")
    if top is not None and me.matches(NameAddr.parse(top).uri):
        request.headers.pop_first("Route")


def next_hop(request: Request) -> tuple[str, int, str]:
    """Where a loose-routed request goes: its first Route, else its Request-URI (16.6 steps 6-7)."""
    top = request.headers.get("Route")
    if top is not None:
        return destination(NameAddr.parse(top).uri)
    return destination(request.uri)


def prepare_initial_invite(request: Request, *, tenant: Tenant, me: LocalAddress, transport: str) -> Request:
    """The INVITE as the RM forwards it (Request-URI still to be retargeted to the MCP)."""
    fwd = request.copy()
    strip_own_route(fwd, me)
    decrement_max_forwards(fwd)
    fwd.headers.set(xcv.TENANT, tenant.id)
    fwd.headers.set(xcv.PROFILE, xcv.encode_profile(tenant.profile))
    # RFC 3261 16.6 step 4: Record-Route so that the dialog's requests come back through us.
    fwd.headers.add("Record-Route", me.record_route(transport), first=True)
    return fwd


# -- the proxy ---------------------------------------------------------------------------------


class Proxy:
    """The RM's request handling on a SipEndpoint; state lives in ``pool`` and ``store``."""

    def __init__(
        self,
        config: ClusterConfig,
        endpoint: SipEndpoint,
        pool: McpPool,
        store: AffinityStore,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.rm = config.resource_manager
        self.endpoint = endpoint
        self.pool = pool
        self.store = store
        self.clock = clock
        # Record-Route and Via carry the advertised address (a wildcard bind is not routable).
        advertised = getattr(endpoint, "advertised_host", None) or endpoint.host
        self.me = LocalAddress(
            advertised, endpoint.port, frozenset({self.rm.host.lower(), endpoint.host.lower()})
        )
        self.accepting = True
        self.on_mcp_down: Callable[[str, list[AffinityEntry]], None] = self._report_down
        #: Active/active: tells the peer RMs about an MCP this RM found dead.
        self.tell_peers: Callable[[str], None] | None = None
        # CSeq of the BYEs the RM sends for the MCPs it lost: above any the MCP itself used.
        self._cseq = itertools.count(1_000_000)
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- entry points (wired to the endpoint) ---------------------------------------------------
    async def handle_request(self, incoming: IncomingRequest) -> None:
        """Every request except CANCEL and ACK; never raises: a bad request gets an answer."""
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            await self._dispatch(incoming)
        except ProxyError as exc:
            self._answer(incoming, exc.status, exc.reason)
        except SipParseError as exc:
            log.info("bad %s from %s: %s", incoming.request.method, incoming.source, exc)
            self._answer(incoming, exc.status, exc.reason)
        except Exception:
            log.exception("error proxying %s from %s", incoming.request.method, incoming.source)
            self._answer(incoming, 500, "Internal Server Error")
        finally:
            if task is not None:
                self._tasks.discard(task)

    def handle_ack(self, request: Request, source: tuple[str, int], transport: str) -> None:
        """ACK for a 2xx: forwarded statelessly by loose routing (RFC 3261 16.11)."""
        try:
            fwd = request.copy()
            strip_own_route(fwd, self.me)
            decrement_max_forwards(fwd)
            host, port, tp = next_hop(fwd)
            if self.me.matches(SipUri("sip", None, None, host, port)):
                log.debug("ACK for this RM dropped (call %s)", request.headers.get("Call-ID"))
                return
            via = Via(
                "TCP" if tp == "tcp" else "UDP",
                self.me.host,
                self.me.port,
                {"branch": stateless_branch(request)},
            )
            fwd.headers.add("Via", str(via), first=True)
            self.endpoint.send_stateless(fwd, (host, port), tp)
        except (SipError, ProxyError, OSError, ValueError) as exc:
            log.info("ACK from %s not forwarded: %s", source, exc)

    async def drain(self, timeout: float) -> None:
        """Stop taking new sessions and wait (up to ``timeout``) for the transactions in flight."""
        self.accepting = False
        pending = [t for t in self._tasks if t is not asyncio.current_task()]
        if pending:
            log.info("waiting for %d request(s) in flight", len(pending))
            await asyncio.wait(pending, timeout=timeout)

    # -- dispatch ------------------------------------------------------------------------------------
    async def _dispatch(self, incoming: IncomingRequest) -> None:
        request = incoming.request
        to_tag = request.to.tag
        if request.method == "INVITE" and to_tag is None:
            await self._initial_invite(incoming)
            return
        local = request.copy()
        strip_own_route(local, self.me)
        if "Route" not in local.headers and self.me.matches(local.uri):
            # Addressed to the RM itself.
            if request.method == "OPTIONS":
                healthy = sum(1 for n in self.pool if n.state is Health.UP)
                incoming.respond(200, headers=[("Allow", ALLOW), ("X-CV-Healthy-MCPs", str(healthy))])
            elif to_tag is not None:
                incoming.respond(481, "Call/Transaction Does Not Exist")
            else:
                incoming.respond(405, headers=[("Allow", "OPTIONS")])
            return
        await self._forward(incoming)

    def _answer(self, incoming: IncomingRequest, status: int, reason: str | None = None, **kw: Any) -> None:
        try:
            incoming.respond(status, reason, **kw)
        except Exception:  # the transaction may be gone already (e.g. answered, then an error)
            log.debug("could not answer %s %s", status, reason, exc_info=True)

    # -- initial INVITE: MCP selection with failover -------------------------------------------------
    async def _initial_invite(self, incoming: IncomingRequest) -> None:
        request = incoming.request
        # RFC 3261 16.2's 100 Trying went out already: the transaction layer sends it for every INVITE.
        if request.max_forwards == 0:
            raise ProxyError(483, "Too Many Hops")
        if not self.accepting:
            retry = [("Retry-After", self.rm_retry_after())]
            self._answer(incoming, 503, "Resource Manager shutting down", headers=retry)
            return
        tenant = identify_tenant(self.config, request)
        fwd = prepare_initial_invite(request, tenant=tenant, me=self.me, transport=incoming.transport)
        session_id = (request.headers.get(xcv.SESSION) or "").strip() or request.call_id
        call_id = request.call_id
        from_tag = request.from_.tag or ""
        contact = uac_contact(request, incoming.transport)
        entry = self.store.get(session_id)
        prefer = entry.mcp if entry is not None else None
        tried: set[str] = set()
        while True:
            if incoming.cancelled.is_set():
                self._answer(incoming, 487, "Request Terminated")
                return
            node = self.pool.choose(active=self.store.active_dialogs(), exclude=tried, prefer=prefer)
            if node is None:
                log.warning(
                    "no healthy MCP for session %s (call %s); tried %s",
                    session_id,
                    call_id,
                    sorted(tried) or "none",
                )
                self._answer(
                    incoming, 503, "No MCP available", headers=[("Retry-After", self.rm_retry_after())]
                )
                return
            tried.add(node.name)
            now = self.clock()
            if prefer is not None and node.name != prefer:
                log.info(
                    "session %s: affinity MCP %s unavailable, moving to %s", session_id, prefer, node.name
                )
            ref = DialogRef(call_id, from_tag, node.name, contact=contact)
            self.store.place(session_id, ref, tenant=tenant.id, now=now)
            self.pool.placed(node.name, now)
            log.info(
                "session %s part %s (tenant %s, call %s) -> MCP %s",
                session_id, request.headers.get(xcv.PART), tenant.id, call_id, node.name,
            )  # fmt: skip
            outcome = await self._forward_invite_to(incoming, fwd, node)
            if outcome is None:
                return
            log.info("MCP %s failed for call %s (%s); trying the next one", node.name, call_id, outcome)

    def rm_retry_after(self) -> str:
        return str(max(1, self.rm.retry_after))

    async def _forward_invite_to(self, incoming: IncomingRequest, fwd: Request, node: McpNode) -> str | None:
        """Send the INVITE to ``node`` and relay its answer. Returns None when the transaction is
        done (answered upstream), or the reason to fail over to another MCP."""
        out = fwd.copy()
        out.uri = SipUri.parse(node.uri)
        state = {"heard": False, "relayed": False}
        heard = asyncio.Event()

        def on_provisional(response: Response) -> None:
            state["heard"] = True
            heard.set()
            if response.status == 100:
                return  # hop-by-hop (RFC 3261 16.7 step 5)
            state["relayed"] = True
            self._relay(incoming, response)

        client = self.endpoint.start_request(out, node.address, "udp", on_provisional=on_provisional)
        final = asyncio.ensure_future(client.final())
        cancelled = asyncio.ensure_future(incoming.cancelled.wait())
        heard_task = asyncio.ensure_future(heard.wait())
        try:
            timeout = self.rm.failover_timeout
            await asyncio.wait(
                {final, cancelled, heard_task}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
            if not (final.done() or heard.is_set() or cancelled.done()):
                # The MCP said nothing at all: treat as dead for this session (passive health check).
                self._abandon(client, final)
                self.store.end(out.call_id, self.clock())
                self._note(self.pool.probe_failed(node.name, self.clock(), "no answer to INVITE"))
                return "no answer"
            cancel_sent = False
            deadline = asyncio.get_running_loop().time() + TIMER_C
            while not final.done():
                if cancelled.done() and not cancel_sent:
                    cancel_sent = True
                    if not heard.is_set():
                        # Nothing to CANCEL yet (9.1): answer upstream now, clean up a late 2xx.
                        self._answer(incoming, 487, "Request Terminated")
                        client.cancel()
                        self._abandon(client, final)
                        self.store.end(out.call_id, self.clock())
                        return None
                    client.cancel()
                remaining = deadline - asyncio.get_running_loop().time()
                if remaining <= 0:
                    if not cancel_sent:  # Timer C fired (16.8): give up on this branch
                        cancel_sent = True
                        client.cancel()
                    deadline += 32.0
                    continue
                waiting: set[asyncio.Future[Any]] = {final} if cancelled.done() else {final, cancelled}
                await asyncio.wait(waiting, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
            response = final.result()
        finally:
            for t in (cancelled, heard_task):
                t.cancel()
        if response.status in (503, 408) and not state["relayed"] and not incoming.cancelled.is_set():
            self.store.end(out.call_id, self.clock())
            if is_refusal(response):
                self._note(self.pool.probe_draining(node.name, self.clock(), f"503 {response.reason}"))
            else:
                self._note(self.pool.probe_failed(node.name, self.clock(), f"INVITE {response.status}"))
            return f"{response.status} {response.reason}"
        if 200 <= response.status < 300:
            self._note(self.pool.probe_ok(node.name, self.clock()))
            self.store.confirm(out.call_id, response.to.tag or "", self.clock())
        elif response.status >= 300:
            self.store.end(out.call_id, self.clock())
        self._relay(incoming, response)
        return None

    def _abandon(self, client: ClientRequest, final: asyncio.Future[Response]) -> None:
        """Forget a branch; should it still answer 2xx, end that dialog (ACK then BYE)."""

        def done(f: asyncio.Future[Response]) -> None:
            if f.cancelled() or f.exception() is not None:
                return
            response = f.result()
            if 200 <= response.status < 300:
                self._spawn(self._hang_up_late(client.request, response))

        final.add_done_callback(done)

    async def _hang_up_late(self, invite: Request, response: Response) -> None:
        try:
            from services.sip.dialog import Dialog

            dialog = Dialog.from_uac(invite, response)
            dialog.route_set = [r for r in dialog.route_set if not self.me.matches(NameAddr.parse(r).uri)]
            host, port, tp = dialog.next_hop()
            self.endpoint.send_ack(dialog.create_ack(invite), (host, port), tp)
            bye = dialog.create_request("BYE")
            await self.endpoint.request(bye, (host, port), tp)
            log.info("late 2xx for abandoned call %s: dialog ended with BYE", invite.call_id)
        except Exception:
            log.exception("could not end the late dialog of call %s", invite.call_id)

    # -- in-dialog and other requests: loose routing ------------------------------------------------
    async def _forward(self, incoming: IncomingRequest) -> None:
        request = incoming.request
        fwd = request.copy()
        strip_own_route(fwd, self.me)
        decrement_max_forwards(fwd)
        host, port, tp = next_hop(fwd)
        if self.me.matches(SipUri("sip", None, None, host, port)):
            raise ProxyError(482, "Loop Detected")
        call_id = request.call_id
        self.store.touch(call_id, self.clock())
        relayed = {"any": False}

        def on_provisional(response: Response) -> None:
            if response.status != 100:
                relayed["any"] = True
                self._relay(incoming, response)

        client = self.endpoint.start_request(fwd, (host, port), tp, on_provisional=on_provisional)
        final = asyncio.ensure_future(client.final())
        if request.method == "INVITE":
            cancelled = asyncio.ensure_future(incoming.cancelled.wait())
            try:
                await asyncio.wait({final, cancelled}, return_when=asyncio.FIRST_COMPLETED)
                if not final.done():
                    client.cancel()
            finally:
                cancelled.cancel()
        response = await final
        mcp = self.pool.by_address(host, port)
        if mcp is not None and (
            response.status == 408 or (response.status == 503 and not is_refusal(response))
        ):
            # An in-dialog request the MCP did not answer (or could not be sent): a missed probe.
            self._note(self.pool.probe_failed(mcp.name, self.clock(), f"{request.method} {response.status}"))
        if request.method == "BYE" and (200 <= response.status < 300 or response.status in (404, 408, 481)):
            # The dialog is over (481/408: it is gone or its MCP is; keep no stale affinity).
            entry = self.store.end(call_id, self.clock())
            if entry is not None:
                log.info("session %s: dialog %s ended (%s)", entry.session_id, call_id, response.status)
        self._relay(incoming, response)

    def _relay(self, incoming: IncomingRequest, response: Response) -> None:
        up = response.copy()
        pop_top_via(up)
        try:
            incoming.send(up)
        except Exception:
            log.info("could not relay %s upstream", response.status, exc_info=True)

    # -- health bookkeeping ------------------------------------------------------------------------
    def _note(self, transition: Transition | None) -> None:
        if transition is not None and transition.new is Health.DOWN:
            self.on_mcp_down(transition.mcp, self.store.sessions_on(transition.mcp))
            if self.tell_peers is not None:
                self.tell_peers(transition.mcp)

    def peer_found_down(self, mcp: str, peer: str) -> None:
        """A peer RM declared ``mcp`` down: no new session goes there from here either (its
        sessions were ended by the peer, whose affinity changes arrived before this news)."""
        if mcp not in self.pool.nodes:
            log.warning("RM %s reports unknown MCP %r down", peer, mcp[:64])
            return
        transition = self.pool.mark_down(mcp, self.clock(), f"reported down by {peer}")
        if transition is not None:
            self.on_mcp_down(mcp, self.store.sessions_on(mcp))

    def note(self, transition: Transition | None) -> None:
        """Act on a health transition observed by the prober."""
        self._note(transition)

    def _report_down(self, mcp: str, sessions: list[AffinityEntry]) -> None:
        """Tell the SIP Server: BYE (Reason 503 "MCP down") on every dialog the dead MCP held, so
        that it re-joins the parties and records the call again as a new part (docs/HA.md)."""
        if not sessions:
            log.warning("MCP %s is down (no sessions on it)", mcp)
            return
        log.warning(
            "MCP %s is down with %d recording session(s): %s",
            mcp, len(sessions), ", ".join(e.session_id for e in sessions),
        )  # fmt: skip
        for entry in sessions:
            for dialog in entry.dialogs:
                if dialog.mcp != mcp:
                    continue
                # The dialog is gone with its MCP: no stale affinity (a new part goes elsewhere).
                self.store.end(dialog.call_id, self.clock())
                if dialog.confirmed and dialog.contact:
                    self._spawn(self._bye_upstream(entry.session_id, dialog))
                if dialog.confirmed and dialog.mcp in self.pool.nodes:
                    # Should the MCP only be slow, not dead, it must not record on (orphan part).
                    self._spawn(self._bye_downstream(entry.session_id, dialog, self.pool.node(dialog.mcp)))

    async def _bye_downstream(self, session_id: str, dialog: DialogRef, node: McpNode) -> None:
        bye = mcp_side_bye(dialog, node, next(self._cseq))
        try:
            response = await asyncio.wait_for(self.endpoint.request(bye, node.address, "udp"), 5.0)
        except (TimeoutError, SipError, OSError):
            return  # dead indeed
        log.info("session %s: MCP %s answered the BYE of dialog %s: %d (it was alive)",
                 session_id, node.name, dialog.call_id, response.status)  # fmt: skip

    async def _bye_upstream(self, session_id: str, dialog: DialogRef) -> None:
        try:
            bye, dest = mcp_down_bye(dialog, self.me, next(self._cseq))
        except (SipError, ValueError) as exc:
            log.error("session %s: cannot build the BYE for dialog %s: %s", session_id, dialog.call_id, exc)
            return
        try:
            response = await self.endpoint.request(bye, dest[:2], dest[2])
        except (SipError, OSError) as exc:
            log.warning("session %s: BYE for dialog %s failed: %s", session_id, dialog.call_id, exc)
            return
        log.info(
            "session %s: dialog %s ended towards the SIP Server (MCP %s down): %d",
            session_id, dialog.call_id, dialog.mcp, response.status,
        )  # fmt: skip

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

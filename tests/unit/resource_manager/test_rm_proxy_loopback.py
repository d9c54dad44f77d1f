"""The RM daemon on loopback in front of scripted fake MCPs (plain SipEndpoints).

Covers what real MCPs rarely do: ringing, CANCEL, 503, silence, draining, reported load, and checks
what the MCP receives (Record-Route, X-CV-Profile, Max-Forwards, the ACK through the RM).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from services.config import ClusterConfig, IvrProfile, McpConfig, ResourceManagerConfig, Tenant
from services.lab import free_port
from services.mcp import xcv
from services.resource_manager import daemon as rm_daemon
from services.sip.aio import IncomingRequest, SipEndpoint
from services.sip.dialog import Dialog
from services.sip.message import Request, Response, new_call_id, new_tag
from services.sip.timers import TimerConfig

FAST = TimerConfig(t1=0.05, t2=0.4, t4=0.5, timer_d=0.5)


async def until(condition: Any, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition never met"
        await asyncio.sleep(0.02)


@dataclass
class FakeMcp:
    """A scripted MCP: ``mode`` decides how it answers INVITEs."""

    name: str
    ep: SipEndpoint
    mode: str = "answer"  # answer | ring | busy | silent
    load: int | None = 0
    draining: bool = False
    options_down: bool = False
    invites: list[Request] = field(default_factory=list)
    acks: list[Request] = field(default_factory=list)
    others: list[Request] = field(default_factory=list)
    cancelled: int = 0
    probes: int = 0

    async def on_request(self, inc: IncomingRequest) -> None:
        req = inc.request
        if req.method == "OPTIONS":
            self.probes += 1
            if self.options_down:
                return  # no answer at all
            headers = [] if self.load is None else [(xcv.LOAD, str(self.load))]
            inc.respond(503 if self.draining else 200, headers=headers)
            return
        if req.method == "INVITE" and req.to.tag is None:
            self.invites.append(req)
            if self.mode == "silent":
                return
            if self.mode == "busy":
                inc.respond(503, "Busy here", headers=[("Retry-After", "3")])
                return
            if self.mode == "ring":
                inc.respond(180)
                await inc.cancelled.wait()
                self.cancelled += 1
                inc.respond(487)
                return
            inc.respond(200, headers=[("Contact", f"<{self.ep.contact_uri('mcp')}>")], body=b"v=0\r\n",
                        content_type="application/sdp")  # fmt: skip
            ack = await inc.wait_ack(5)
            if ack is not None:
                self.acks.append(ack)
            return
        self.others.append(req)
        inc.respond(200)


@dataclass
class Rig:
    config: ClusterConfig
    mcps: dict[str, FakeMcp]
    uac: SipEndpoint
    rm: tuple[str, int]
    uac_requests: list[Request]

    def invite(
        self, session: str = "s1", *, tenant: str = "acme", extra: list[tuple[str, str]] | None = None
    ) -> Request:
        return Request(
            "INVITE",
            f"sip:record@{self.rm[0]}:{self.rm[1]}",
            [
                ("From", f"<sip:ss@127.0.0.1>;tag={new_tag()}"),
                ("To", f"<sip:record@{self.rm[0]}>"),
                ("Call-ID", new_call_id("rig")),
                ("CSeq", "1 INVITE"),
                ("Max-Forwards", "70"),
                ("Contact", f"<{self.uac.contact_uri('ss')}>"),
                ("X-CV-Tenant", tenant),
                ("X-CV-Session", session),
                ("X-CV-Part", "1"),
                *(extra or []),
            ],
        )

    async def call(self, request: Request, **kw: Any) -> tuple[Response, Dialog | None, Any]:
        client = self.uac.start_request(request, self.rm, **kw)
        response = await asyncio.wait_for(client.final(), 10)
        dialog = None
        if 200 <= response.status < 300:
            dialog = Dialog.from_uac(client.request, response)
            self.uac.send_ack(dialog.create_ack(client.request), dialog.next_hop()[:2])
        return response, dialog, client

    async def probe_rounds(self, rounds: int = 2, timeout: float = 10.0) -> None:
        """Wait until every fake MCP got ``rounds`` more OPTIONS (and the RM saw the answers)."""
        target = {name: m.probes + rounds + 1 for name, m in self.mcps.items()}
        deadline = asyncio.get_running_loop().time() + timeout
        while any(m.probes < target[name] for name, m in self.mcps.items()):
            assert asyncio.get_running_loop().time() < deadline, "the RM stopped probing"
            await asyncio.sleep(0.02)

    async def wait_healthy(self, count: int, timeout: float = 10.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while (await self.options_rm()).headers.get("X-CV-Healthy-MCPs") != str(count):
            assert asyncio.get_running_loop().time() < deadline, f"never {count} healthy MCPs"
            await asyncio.sleep(0.05)

    async def options_rm(self) -> Response:
        req = Request(
            "OPTIONS", f"sip:{self.rm[0]}:{self.rm[1]}",
            [("From", f"<sip:x@127.0.0.1>;tag={new_tag()}"), ("To", f"<sip:{self.rm[0]}>"),
             ("Call-ID", new_call_id("o")), ("CSeq", "1 OPTIONS")],
        )  # fmt: skip
        return await self.uac.request(req, self.rm)


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    mcps: dict[str, FakeMcp] = {}
    cfgs = []
    for name in ("mcp1", "mcp2"):
        ep = SipEndpoint(host="127.0.0.1", port=0, name=name, timers=FAST)
        fake = FakeMcp(name, ep)
        ep.request_handler = fake.on_request
        await ep.start()
        mcps[name] = fake
        cfgs.append(McpConfig(name=name, port=ep.port))
    config = ClusterConfig(
        resource_manager=ResourceManagerConfig(
            port=free_port(),
            options_interval=0.1,
            failures_before_down=2,
            failover_timeout=0.4,
            retry_after=7,
        ),
        mcp=cfgs,
        tenants=[
            Tenant(id="acme", api_key="a" * 16, profile=IvrProfile(name="stereo", channels=2, reorder_ms=120))
        ],
    )
    ready = asyncio.Event()
    task = asyncio.create_task(rm_daemon.run(config, ready=ready.set))
    await asyncio.wait_for(ready.wait(), 5)
    uac = SipEndpoint(host="127.0.0.1", port=0, name="uac", timers=FAST)
    uac_requests: list[Request] = []

    async def on_uac(inc: IncomingRequest) -> None:
        uac_requests.append(inc.request)
        inc.respond(200)

    uac.request_handler = on_uac
    await uac.start()
    try:
        yield Rig(config, mcps, uac, ("127.0.0.1", config.resource_manager.port), uac_requests)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await uac.close()
        for m in mcps.values():
            await m.ep.close()


async def test_forwarded_invite_carries_profile_record_route_and_one_hop_less(rig: Rig) -> None:
    response, dialog, _ = await rig.call(rig.invite())
    assert response.status == 200 and dialog is not None
    # The RM's own Via is gone from the relayed response.
    assert len(response.headers.get_all("Via")) == 1
    (inv,) = rig.mcps["mcp1"].invites
    assert str(inv.uri) == f"sip:record@127.0.0.1:{rig.mcps['mcp1'].ep.port}"
    assert inv.max_forwards == 69
    assert inv.headers.get_all("Record-Route") == [f"<sip:127.0.0.1:{rig.rm[1]};lr>"]
    assert xcv.decode_profile(inv.headers.get(xcv.PROFILE) or "") == IvrProfile(
        "stereo", channels=2, reorder_ms=120
    )
    assert len(inv.headers.get_all("Via")) == 2
    # The ACK reaches the MCP through the RM (loose routing, forwarded statelessly).
    await until(lambda: rig.mcps["mcp1"].acks)
    (ack,) = rig.mcps["mcp1"].acks
    assert "Route" not in ack.headers and len(ack.headers.get_all("Via")) == 2
    # In-dialog requests from either side pass the RM.
    info = await rig.uac.request(dialog.create_request("INFO"), dialog.next_hop()[:2])
    assert info.status == 200 and [r.method for r in rig.mcps["mcp1"].others] == ["INFO"]
    mcp_side = Dialog.from_uas(inv, response.to.tag or "")
    bye = await rig.mcps["mcp1"].ep.request(mcp_side.create_request("BYE"), mcp_side.next_hop()[:2])
    assert bye.status == 200 and [r.method for r in rig.uac_requests] == ["BYE"]


async def test_least_loaded_by_reported_load_and_affinity(rig: Rig) -> None:
    rig.mcps["mcp1"].load = 10
    rig.mcps["mcp2"].load = 1
    await rig.probe_rounds()
    r1, _, _ = await rig.call(rig.invite("sA"))
    assert r1.status == 200 and len(rig.mcps["mcp2"].invites) == 1
    rig.mcps["mcp1"].load = 0
    rig.mcps["mcp2"].load = 5
    await rig.probe_rounds()
    r2, _, _ = await rig.call(rig.invite("sB"))
    assert r2.status == 200 and len(rig.mcps["mcp1"].invites) == 1
    # A second part of sA stays with mcp2 although mcp1 is less loaded.
    r3, _, _ = await rig.call(rig.invite("sA"))
    assert r3.status == 200 and len(rig.mcps["mcp2"].invites) == 2


async def test_failover_on_503_and_on_silence(rig: Rig) -> None:
    rig.mcps["mcp1"].mode = "busy"
    response, _, _ = await rig.call(rig.invite("s1"))
    assert response.status == 200
    assert len(rig.mcps["mcp1"].invites) == 1 and len(rig.mcps["mcp2"].invites) == 1
    rig.mcps["mcp1"].mode = "answer"
    rig.mcps["mcp2"].mode = "silent"
    rig.mcps["mcp2"].ep.layer.send_trying = False  # a hung MCP: not even 100 Trying
    rig.mcps["mcp1"].load = 3  # mcp2 looks better, but does not answer
    await rig.probe_rounds()  # mcp1's 503 made it draining until its next OPTIONS 200
    started = asyncio.get_running_loop().time()
    response, _, _ = await rig.call(rig.invite("s2"))
    assert response.status == 200 and len(rig.mcps["mcp2"].invites) == 1 + 1
    assert asyncio.get_running_loop().time() - started >= 0.4  # waited failover_timeout


async def test_no_healthy_mcp_is_503_with_retry_after(rig: Rig) -> None:
    for m in rig.mcps.values():
        m.options_down = True
    await rig.wait_healthy(0)
    response, _, _ = await rig.call(rig.invite())
    assert response.status == 503 and response.headers.get("Retry-After") == "7"
    assert all(not m.invites for m in rig.mcps.values())
    assert (await rig.options_rm()).headers.get("X-CV-Healthy-MCPs") == "0"
    rig.mcps["mcp2"].options_down = False  # back on the next 200
    await rig.wait_healthy(1)
    response, _, _ = await rig.call(rig.invite())
    assert response.status == 200 and len(rig.mcps["mcp2"].invites) == 1


async def test_draining_mcp_gets_no_new_sessions(rig: Rig) -> None:
    rig.mcps["mcp1"].draining = True
    await rig.wait_healthy(1)
    for i in range(3):
        response, _, _ = await rig.call(rig.invite(f"d{i}"))
        assert response.status == 200
    assert not rig.mcps["mcp1"].invites and len(rig.mcps["mcp2"].invites) == 3


async def test_provisional_relay_and_cancel(rig: Rig) -> None:
    for m in rig.mcps.values():
        m.mode = "ring"
    provisional: list[Response] = []
    client = rig.uac.start_request(rig.invite(), rig.rm, on_provisional=provisional.append)
    for _ in range(100):
        if any(p.status == 180 for p in provisional):
            break
        await asyncio.sleep(0.02)
    assert [p.status for p in provisional if p.status != 100] == [180]
    assert len(provisional[-1].headers.get_all("Via")) == 1
    client.cancel()
    final = await asyncio.wait_for(client.final(), 5)
    assert final.status == 487
    assert sum(m.cancelled for m in rig.mcps.values()) == 1
    # No failover after a provisional was relayed: only one MCP saw the INVITE.
    assert sum(len(m.invites) for m in rig.mcps.values()) == 1


async def test_max_forwards_zero_and_unknown_tenant(rig: Rig) -> None:
    req = rig.invite()
    req.headers.set("Max-Forwards", "0")
    response, _, _ = await rig.call(req)
    assert response.status == 483
    response, _, _ = await rig.call(rig.invite(tenant="nobody"))
    assert response.status == 403 and "nobody" in response.reason
    assert all(not m.invites for m in rig.mcps.values())


async def test_options_to_the_rm(rig: Rig) -> None:
    response = await rig.options_rm()
    assert response.status == 200 and response.headers.get("X-CV-Healthy-MCPs") == "2"


async def test_tcp_upstream(rig: Rig) -> None:
    client = rig.uac.start_request(rig.invite("t1"), rig.rm, "tcp")
    response = await asyncio.wait_for(client.final(), 10)
    assert response.status == 200
    dialog = Dialog.from_uac(client.request, response)
    assert dialog.route_set == [f"<sip:127.0.0.1:{rig.rm[1]};transport=tcp;lr>"]
    rig.uac.send_ack(dialog.create_ack(client.request), dialog.next_hop()[:2], "tcp")
    bye = await asyncio.wait_for(
        rig.uac.request(dialog.create_request("BYE"), dialog.next_hop()[:2], "tcp"), 10
    )
    assert bye.status == 200
    assert [r.method for r in rig.mcps["mcp1"].others] == ["BYE"]
    await until(lambda: len(rig.mcps["mcp1"].acks) == 1)


async def test_garbage_does_not_disturb_the_rm(rig: Rig) -> None:
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol, remote_addr=rig.rm)
    try:
        for junk in (
            b"\x00\xff" * 50,
            b"INVITE sip:x SIP/2.0\r\n\r\n",
            b"SIP/2.0 200 OK\r\n\r\n",
            b"\r\n\r\n",
        ):
            transport.sendto(junk)
    finally:
        transport.close()
    response, _, _ = await rig.call(rig.invite("g1"))
    assert response.status == 200

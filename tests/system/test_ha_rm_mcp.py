"""Failure injection on the recording tier (issue 5): MCPs and RMs killed (SIGKILL) or drained
under SIPp calls carrying RTP both ways, against a lab of its own (real processes on loopback).

The figures these tests measure are written down in docs/HA.md with the command that reproduces
them: ``make test PYTEST_ARGS="tests/system/test_ha_rm_mcp.py -s"`` prints them.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from services.lab import Lab, LabPorts
from services.sdp import SessionDescription
from services.sip.aio import SipEndpoint
from services.sip.dialog import Dialog
from services.sip.message import Request, new_call_id, new_tag
from services.sip_server.policy import CallInfo, bridge_headers
from tests.helpers.sipp import Sipp
from tests.system.conftest import LabApi, echo_callee, lab_api, lab_passwords, lab_sip

pytestmark = pytest.mark.system

CALLER, CALLEE = "1001", "1002"
#: Fast MCP failure detection for the lab: OPTIONS every 0.2 s, down after 3 misses (0.6-0.8 s);
#: an MCP silent to an INVITE for 0.5 s is skipped for the next one.
FAST_PROBES = {
    "resource_manager.options_interval": 0.2,
    "resource_manager.failures_before_down": 3,
    "resource_manager.failover_timeout": 0.5,
}


@pytest.fixture(scope="module")
def ha_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    the_lab = Lab(
        tmp_path_factory.mktemp("ha-lab"), ports=LabPorts.free(), fresh=True, config_patch=FAST_PROBES
    )
    the_lab.start()
    try:
        yield the_lab
    finally:
        the_lab.stop()


@pytest.fixture(scope="module")
def ha_api(ha_lab: Lab) -> LabApi:
    return lab_api(ha_lab)


def _caller(lab: Lab, workdir: Path, *, rate: float, calls: int, hold_ms: int, trace: bool = False) -> Sipp:
    """SIPp calls that answer the SIP Server's re-INVITEs and hang up ``hold_ms`` after the last."""
    return Sipp(
        "uac_pcap_reinvite_auth.xml",
        workdir=workdir,
        remote=lab_sip(lab),
        service=CALLEE,
        user=CALLER,
        auth=(CALLER, lab_passwords(lab)[CALLER]),
        rate=rate,
        max_calls=calls,
        limit=calls,
        recv_timeout_ms=hold_ms,
        trace_messages=trace,
    )


def _ts(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


async def _recordings(
    api: LabApi, pid: int, since: datetime, count: int, timeout: float
) -> list[dict[str, Any]]:
    """The recordings of one SIPp run (its Call-IDs are ``<n>-<pid>@<ip>``), at least ``count``."""
    deadline = time.monotonic() + timeout
    while True:
        found = await asyncio.to_thread(api.search, party=CALLER, start_after=since.isoformat())
        mine = [r for r in found if f"-{pid}@" in r["call_id"]]
        if len(mine) >= count or time.monotonic() > deadline:
            return mine
        await asyncio.sleep(0.5)


def _by_call(recs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    calls: dict[str, list[dict[str, Any]]] = {}
    for r in recs:
        calls.setdefault(r["call_id"], []).append(r)
    for parts in calls.values():
        parts.sort(key=lambda r: r["part"])
    return calls


async def test_drained_mcp_takes_no_new_sessions_and_finishes_its_calls(
    ha_lab: Lab, ha_api: LabApi, tmp_path: Path
) -> None:
    """SIGUSR1 takes mcp1 out of service: calls placed afterwards all go to mcp2, the calls mcp1
    carries go on to their end and are recorded there in one part; SIGUSR2 puts it back."""
    since = datetime.now(UTC) - timedelta(seconds=2)
    uas = await echo_callee(ha_lab, CALLEE, tmp_path / "uas")
    before = _caller(ha_lab, tmp_path / "before", rate=10.0, calls=10, hold_ms=5000)
    after = _caller(ha_lab, tmp_path / "after", rate=10.0, calls=10, hold_ms=1500)
    try:
        await before.start()
        await asyncio.sleep(1.5)  # the first 10 calls are up, spread over both MCPs
        ha_lab.daemons["mcp1"].signal(signal.SIGUSR1)
        await asyncio.sleep(1.0)  # a few OPTIONS rounds: the RM sees mcp1 draining
        await after.start()
        r_after = await after.wait(timeout=30)
        r_before = await before.wait(timeout=30)
    finally:
        for sipp in (before, after):
            if sipp.running:
                await sipp.stop()
        await uas.stop()
        ha_lab.daemons["mcp1"].signal(signal.SIGUSR2)
    assert r_before.successful == 10 and r_before.failed == 0, r_before.describe()
    assert r_after.successful == 10 and r_after.failed == 0, r_after.describe()
    assert before.process is not None and after.process is not None
    old = _by_call(await _recordings(ha_api, before.process.pid, since, 10, timeout=30))
    new = _by_call(await _recordings(ha_api, after.process.pid, since, 10, timeout=30))
    assert len(old) == 10 and len(new) == 10
    assert {parts[0]["mcp"] for parts in new.values()} == {"mcp2"}, "a drained MCP got new sessions"
    on_drained = [parts for parts in old.values() if parts[0]["mcp"] == "mcp1"]
    assert on_drained, "no call was on mcp1 when it was drained"
    for parts in on_drained:
        assert len(parts) == 1 and parts[0]["part"] == 1, parts
        assert parts[0]["duration"] > 4.5, "a call on the drained MCP was cut short"
    log = ha_lab.daemons["mcp1"].log_path.read_text()
    assert "draining" in log and "back in service" in log
    print(f"\nDrain: {len(on_drained)} calls finished on the drained MCP, 10 of 10 new calls on mcp2")


async def test_drained_sip_server_refuses_new_calls_and_keeps_its_calls(
    ha_lab: Lab, ha_api: LabApi, tmp_path: Path
) -> None:
    """SIGUSR1 to the active SIP Server: a new call gets 503, the established calls go on to their
    BYE (recorded whole); SIGUSR2: new calls are taken again."""
    active = next(label for label in ("sip-server-a", "sip-server") if label in ha_lab.daemons)
    since = datetime.now(UTC) - timedelta(seconds=2)
    uas = await echo_callee(ha_lab, CALLEE, tmp_path / "uas")
    established = _caller(ha_lab, tmp_path / "established", rate=10.0, calls=5, hold_ms=3000)
    refused = _caller(ha_lab, tmp_path / "refused", rate=10.0, calls=1, hold_ms=500, trace=True)
    again = _caller(ha_lab, tmp_path / "again", rate=10.0, calls=1, hold_ms=500)
    try:
        await established.start()
        await asyncio.sleep(1.0)
        ha_lab.daemons[active].signal(signal.SIGUSR1)
        await asyncio.sleep(0.3)
        await refused.start()
        r_refused = await refused.wait(timeout=20)
        ha_lab.daemons[active].signal(signal.SIGUSR2)
        await asyncio.sleep(0.3)
        await again.start()
        r_again = await again.wait(timeout=20)
        r_established = await established.wait(timeout=30)
    finally:
        for sipp in (established, refused, again):
            if sipp.running:
                await sipp.stop()
        await uas.stop()
        ha_lab.daemons[active].signal(signal.SIGUSR2)
    assert r_refused.failed == 1 and 503 in r_refused.received_responses(), r_refused.describe()
    assert r_again.successful == 1, r_again.describe()
    assert r_established.successful == 5 and r_established.failed == 0, r_established.describe()
    assert established.process is not None
    recs = await _recordings(ha_api, established.process.pid, since, 5, timeout=30)
    assert len(recs) == 5 and all(r["duration"] > 2.5 for r in recs), recs


async def test_mcp_killed_calls_survive_and_recordings_resume(
    ha_lab: Lab, ha_api: LabApi, tmp_path: Path
) -> None:
    """40 calls over two MCPs (~20 each), SIGKILL mcp1: every call succeeds, each of mcp1's calls
    gets a second part on mcp2 under the same session, with a gap of at most 2 s."""
    calls, rate, hold_ms = 40, 20.0, 5000
    since = datetime.now(UTC) - timedelta(seconds=2)
    uas = await echo_callee(ha_lab, CALLEE, tmp_path / "uas")
    uac = _caller(ha_lab, tmp_path / "uac", rate=rate, calls=calls, hold_ms=hold_ms)
    try:
        await uac.start()
        assert uac.process is not None
        pid = uac.process.pid
        await asyncio.sleep(calls / rate + 0.7)  # every call placed and established
        killed_at = time.time()
        ha_lab.kill("mcp1")
        result = await uac.wait(timeout=calls / rate + hold_ms / 1000 + 30)
    finally:
        if uac.running:
            await uac.stop()
        await uas.stop()
    assert result.successful == calls and result.failed == 0, result.describe()

    # The killed MCP comes back (as a supervisor would restart it) and stores what its spool holds.
    await asyncio.to_thread(ha_lab.start_daemon, "mcp1")
    recs = await _recordings(ha_api, pid, since, calls + 10, timeout=40)
    by_call = _by_call(recs)
    assert len(by_call) == calls, f"{len(by_call)} of {calls} calls have recordings"
    moved = {cid: parts for cid, parts in by_call.items() if parts[0]["mcp"] == "mcp1"}
    assert len(moved) >= 10, f"only {len(moved)} calls were on mcp1"
    gaps = []
    for cid, parts in moved.items():
        assert [p["part"] for p in parts] == [1, 2], f"{cid}: parts {[(p['part'], p['mcp']) for p in parts]}"
        first, second = parts
        assert first["session_id"] == second["session_id"]
        assert second["mcp"] == "mcp2"
        gap = _ts(second["start"]) - _ts(first["end"])
        gaps.append(gap)
        assert -0.1 <= gap <= 2.0, f"{cid}: recording gap {gap:.2f} s"
        assert second["duration"] > 1.0
        linked = await asyncio.to_thread(ha_api.search, session_id=first["session_id"])
        assert {r["id"] for r in linked} == {first["id"], second["id"]}
    for cid, parts in by_call.items():
        if cid not in moved:
            assert len(parts) == 1 and parts[0]["mcp"] == "mcp2", f"{cid}: {parts}"
    gaps.sort()
    print(
        f"\nMCP kill: {len(moved)} of {calls} calls on the killed MCP, all {result.successful} calls "
        f"successful; detected {_down_logged(ha_lab, 'mcp1', killed_at) - killed_at:.2f} s after the kill; "
        f"gap min {gaps[0]:.2f} s, median {gaps[len(gaps) // 2]:.2f} s, max {gaps[-1]:.2f} s"
    )


def _down_logged(lab: Lab, mcp: str, since: float) -> float:
    """When the first RM logged ``mcp`` down (epoch seconds; the logs are in local time)."""
    stamps = []
    for label, d in lab.daemons.items():
        if label.startswith("resource-manager"):
            for line in d.log_path.read_text().splitlines():
                if f"MCP {mcp}: up -> down" in line:
                    stamps.append(datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp())
    return min(t for t in stamps if t > since - 0.5)


BRIDGE_SDP = (
    b"v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
    b"m=audio 40000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\na=label:caller\r\n"
    b"m=audio 9 RTP/AVP 0\r\nc=IN IP4 0.0.0.0\r\na=rtpmap:0 PCMU/8000\r\na=label:callee\r\n"
)


async def _bridge_part(ep: SipEndpoint, rm: tuple[str, int], session: str, part: int) -> tuple[Dialog, int]:
    """Open part ``part`` of recording session ``session`` through the RM at ``rm`` as the SIP
    Server would; returns the dialog and the MCP's caller port (which tells the MCP)."""
    info = CallInfo(f"probe-{session}", "sip:a@x", "", "sip:b@x", "", "a", "b")
    req = Request("INVITE", f"sip:record@{rm[0]}:{rm[1]}")
    for name, value in [
        ("From", f"<sip:sip-server@127.0.0.1:{ep.port}>;tag={new_tag()}"),
        ("To", f"<sip:record@{rm[0]}:{rm[1]}>"),
        ("Call-ID", new_call_id("probe")),
        ("CSeq", "1 INVITE"),
        ("Contact", f"<{ep.contact_uri('sip-server')}>"),
        *bridge_headers("default", session, part, info),
        ("Content-Type", "application/sdp"),
    ]:
        req.headers.add(name, value)
    req.body = BRIDGE_SDP
    client = ep.start_request(req, rm)
    resp = await asyncio.wait_for(client.final(), 10)
    assert resp.status == 200, f"part {part} via {rm}: {resp.status} {resp.reason}"
    dialog = Dialog.from_uac(client.request, resp)
    ep.send_ack(dialog.create_ack(client.request), dialog.next_hop()[:2])
    port = SessionDescription.parse(resp.body).media[0].port
    return dialog, port


def _mcp_of(lab: Lab, rtp_port: int) -> str:
    return next(m.name for m in lab.config.mcp if m.rtp_port_min <= rtp_port <= m.rtp_port_max)


async def _hang_up(ep: SipEndpoint, dialog: Dialog) -> None:
    # cause 487: a bridge that never carried media; the MCP files no recording for it
    bye = dialog.create_request("BYE", headers=[("Reason", 'SIP;cause=487;text="probe"')])
    resp = await asyncio.wait_for(ep.request(bye, dialog.next_hop()[:2]), 10)
    assert resp.status == 200


async def test_rm_killed_under_20_cps_loses_no_call_and_keeps_affinity(
    ha_lab: Lab, ha_api: LabApi, tmp_path: Path
) -> None:
    """Two RMs share the affinity; SIGKILL rm1 under 20 calls/s: no SIPp call fails, new parts of
    a session placed before the kill still go to its MCP (through rm2), the in-dialog requests of
    rm1's dialogs take rm2, and a restarted rm1 resynchronises before it serves."""
    rms = {i.name: (i.host, i.port) for i in ha_lab.config.resource_manager.instances}
    assert set(rms) == {"rm1", "rm2"}
    calls, rate, hold_ms = 120, 20.0, 2000
    since = datetime.now(UTC) - timedelta(seconds=2)
    ep = SipEndpoint(host="127.0.0.1", port=0, name="probe")
    ep.request_handler = lambda inc: inc.respond(200)  # type: ignore[assignment,return-value]
    await ep.start()
    uas = await echo_callee(ha_lab, CALLEE, tmp_path / "uas")
    uac: Sipp | None = None
    try:
        session = "ha" + new_tag()
        part1, port1 = await _bridge_part(ep, rms["rm1"], session, 1)
        mcp = _mcp_of(ha_lab, port1)
        uac = Sipp(
            "uac_pcap_auth.xml", workdir=tmp_path / "uac", remote=lab_sip(ha_lab), service=CALLEE, user=CALLER,
            auth=(CALLER, lab_passwords(ha_lab)[CALLER]), rate=rate, max_calls=calls, limit=calls,
            duration_ms=hold_ms, trace_messages=False,
        )  # fmt: skip
        await uac.start()
        assert uac.process is not None
        pid = uac.process.pid
        await asyncio.sleep(3.0)
        killed = time.monotonic()
        ha_lab.kill("resource-manager")
        # A second part of the session, after the kill: rm2 knows where the session lives.
        part2, port2 = await _bridge_part(ep, rms["rm2"], session, 2)
        assert _mcp_of(ha_lab, port2) == mcp, "the session's second part went to another MCP"
        result = await uac.wait(timeout=calls / rate + hold_ms / 1000 + 40)
        assert result.successful == calls and result.failed == 0, result.describe()
        # rm1 comes back: it learns the sessions from rm2 before it reports ready, then routes.
        await asyncio.to_thread(ha_lab.start_daemon, "resource-manager")
        restarted = time.monotonic() - killed
        log = ha_lab.daemons["resource-manager"].log_path.read_text()
        assert "after synchronising with rm2" in log.rsplit("Resource Manager stopping", 1)[-1]
        part3, port3 = await _bridge_part(ep, rms["rm1"], session, 3)
        assert _mcp_of(ha_lab, port3) == mcp
        for dialog in (part1, part2, part3):  # part1 was Record-Routed by rm1's previous life
            await _hang_up(ep, dialog)
    finally:
        if uac is not None and uac.running:
            await uac.stop()
        await uas.stop()
        await ep.close()
    recs = await _recordings(ha_api, pid, since, calls, timeout=40)
    by_call = _by_call(recs)
    recorded = [cid for cid, parts in by_call.items() if any(p["duration"] > 1.0 for p in parts)]
    print(
        f"\nRM kill: {result.successful} of {calls} calls successful, {result.failed} failed, "
        f"{len(recorded)} recorded ({len(recs)} recordings); rm1 back and synchronised "
        f"{restarted:.1f} s after the kill"
    )
    for cid, parts in by_call.items():
        if len(parts) > 1 or cid not in recorded:
            print("  ", cid, [(p["part"], p["mcp"], p["duration"]) for p in parts])
    assert len(recorded) >= calls - 3, f"only {len(recorded)} of {calls} calls were recorded"

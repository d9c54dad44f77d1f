"""SIP Server active / hot standby under load, with a real kill -9 (issue 5, docs/HA.md).

A lab of its own (the pair sip-server-a primary, sip-server-b standby, on the same SIP address).
A SIPp UAS registers as 1002 and echoes RTP; a SIPp UAC places 50 recorded calls from 1001, each
playing the G.711 pcap for CALL_MS before its BYE. Once the 50 calls are established, the primary
is killed with SIGKILL; an OPTIONS probe every 20 ms measures when the SIP address answers again
(the standby took it over). All 50 calls must then end normally by BYE through the new active,
50 recordings must be indexed, none with a gap over 100 ms in either stream, and the old primary,
restarted, must rejoin as standby holding the replica. Alongside, 5 calls from 1003 put themselves
on hold and resume by re-INVITE after the takeover: the new active relays both re-INVITEs of each.
"""

from __future__ import annotations

import asyncio
import re
import socket
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from services.lab import Lab, LabPorts
from tests.helpers.sipp import run_uac, start_registered_uas
from tests.system.conftest import LabApi

pytestmark = pytest.mark.system

CALLS = 50
RATE = 25.0
CALL_MS = 6000
PCAP_PACKETS = 236  # g711a.pcap: 7.08 s of 30 ms packets (longer than CALL_MS: audio until the BYE)
HOLD_CALLS = 5  # uac_hold_auth.xml: hold and resume re-INVITEs, both after the takeover
HOLD_STEP_MS = 3500


@pytest.fixture(scope="module")
def ha_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    the_lab = Lab(tmp_path_factory.mktemp("halab"), ports=LabPorts.free(), fresh=True)
    the_lab.start()
    try:
        yield the_lab
    finally:
        the_lab.stop()


def count_log(path: Path, pattern: str) -> int:
    return len(re.findall(pattern, path.read_text(errors="replace")))


async def wait_log_count(path: Path, pattern: str, count: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while True:
        n = count_log(path, pattern)
        if n >= count or time.monotonic() > deadline:
            return n
        await asyncio.sleep(0.05)


def probe_until_answered(addr: tuple[str, int], timeout: float, every: float = 0.02) -> float | None:
    """OPTIONS to ``addr`` every ``every`` seconds; the wall-clock time of the first 200, or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(every)
        port = sock.getsockname()[1]
        deadline = time.monotonic() + timeout
        n = 0
        while time.monotonic() < deadline:
            n += 1
            call_id = uuid.uuid4().hex
            request = (
                f"OPTIONS sip:{addr[0]}:{addr[1]} SIP/2.0\r\n"
                f"Via: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bK{call_id[:12]}{n};rport\r\n"
                f"From: <sip:probe@127.0.0.1>;tag={call_id[:8]}\r\nTo: <sip:{addr[0]}:{addr[1]}>\r\n"
                f"Call-ID: {call_id}\r\nCSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
            )
            sock.sendto(request.encode(), addr)
            end = time.monotonic() + every
            while time.monotonic() < end:
                try:
                    data = sock.recv(65535)
                except (TimeoutError, ConnectionRefusedError):
                    break
                if data.startswith(b"SIP/2.0 200") and call_id.encode() in data:
                    return time.time()
    return None


async def test_kill_primary_with_50_recorded_calls(tmp_path: Path, ha_lab: Lab) -> None:
    lab = ha_lab
    info = lab.info()
    users = {u["extension"]: u["password"] for u in info["users"]}
    api = LabApi(info["api"]["base_url"], info["api"]["api_key"])
    sip_addr = (info["sip"]["host"], info["sip"]["port"])
    remote = f"{sip_addr[0]}:{sip_addr[1]}"
    primary, standby = lab.daemons["sip-server-a"], lab.daemons["sip-server-b"]
    t0 = datetime.now(UTC) - timedelta(seconds=1)

    uas = await start_registered_uas(
        "uas_echo.xml", remote, "1002", users["1002"], workdir=tmp_path / "uas", rtp_echo=True
    )
    try:
        uac = asyncio.ensure_future(
            run_uac(
                "uac_pcap_auth.xml",
                remote,
                workdir=tmp_path / "uac",
                service="1002",
                user="1001",
                auth=("1001", users["1001"]),
                rate=RATE,
                max_calls=CALLS,
                duration_ms=CALL_MS,
                timeout=CALLS / RATE + CALL_MS / 1000 + 40,
            )
        )
        hold = asyncio.ensure_future(
            run_uac(
                "uac_hold_auth.xml",
                remote,
                workdir=tmp_path / "hold",
                service="1002",
                user="1003",
                auth=("1003", users["1003"]),
                rate=float(HOLD_CALLS),
                max_calls=HOLD_CALLS,
                duration_ms=HOLD_STEP_MS,
                timeout=3 * HOLD_STEP_MS / 1000 + 40,
            )
        )
        total = CALLS + HOLD_CALLS
        established = await wait_log_count(primary.log_path, r"established \(recorded\)", total, 15)
        assert established == total, f"{established} of {total} calls established before the kill"
        assert count_log(primary.log_path, r"INVITE offer from caller") == 0  # no hold yet
        # the standby has each call (replicated on answer and on confirmation)
        await asyncio.sleep(0.1)

        killed_at = time.time()
        lab.kill("sip-server-a")
        serving_at = await asyncio.to_thread(probe_until_answered, sip_addr, 5.0)
        assert serving_at is not None, f"nobody answered OPTIONS after the kill:\n{standby.tail(20)}"
        takeover_ms = (serving_at - killed_at) * 1000
        log_text = standby.log_path.read_text(errors="replace")
        m = re.search(r"HA: ACTIVE at ([\d.]+) \(epoch \d+\): serving (\d+) call\(s\)", log_text)
        assert m, standby.tail(20)
        logged_ms = (float(m.group(1)) - killed_at) * 1000
        print(
            f"\nSIP Server takeover: first OPTIONS answered {takeover_ms:.0f} ms after SIGKILL "
            f"(standby logged ACTIVE after {logged_ms:.0f} ms), {m.group(2)} calls adopted"
        )
        assert int(m.group(2)) == total, log_text[-3000:]
        assert takeover_ms < 1000, f"takeover took {takeover_ms:.0f} ms"

        result = await uac
        held = await hold
    finally:
        await uas.stop()
    assert result.ok and result.successful == CALLS and result.failed == 0, result.describe()
    assert held.ok and held.successful == HOLD_CALLS and held.failed == 0, held.describe()
    # Every re-INVITE (hold, resume) and BYE went through the new active (the old primary is dead).
    assert count_log(standby.log_path, r"INVITE offer from caller \(hold\)") == HOLD_CALLS
    assert count_log(standby.log_path, r"INVITE offer from caller") == 2 * HOLD_CALLS
    byes = count_log(standby.log_path, r"call \w+: BYE from caller")
    assert byes == total, f"the new active handled {byes} BYEs"

    recs = await api.wait_for(CALLS, timeout=60, party="1001", start_after=t0.isoformat())
    assert len(recs) == CALLS, f"{len(recs)} of {CALLS} recordings were indexed"
    assert len({r["call_id"] for r in recs}) == CALLS
    worst = 0.0
    for r in recs:
        assert r["caller"] == "1001" and r["callee"] == "1002"
        assert abs(r["duration"] - CALL_MS / 1000) < 1.0, (r["id"], r["duration"])
        for s in r["streams"]:
            worst = max(worst, s["longest_gap_ms"])
            assert s["longest_gap_ms"] <= 100, (r["id"], s)
            assert s["lost"] == 0, (r["id"], s)
            assert s["packets"] >= (CALL_MS / 30) * 0.9, (r["id"], s)
    print(f"50 recordings, longest gap in any stream {worst:.0f} ms")
    held_recs = await api.wait_for(HOLD_CALLS, timeout=30, party="1003", start_after=t0.isoformat())
    assert len(held_recs) == HOLD_CALLS
    for r in held_recs:
        assert abs(r["duration"] - 3 * HOLD_STEP_MS / 1000) < 1.5, (r["id"], r["duration"])

    # The old primary restarts and joins as standby, resynchronised by snapshot.
    lab.start_daemon("sip-server-a")
    text = primary.log_path.read_text(errors="replace").split("HA: node sip-server-a")[-1]
    assert re.search(r"peer sip-server-b is active \(epoch 2", text), text[-2000:]
    assert "HA: standby synchronised" in text, text[-2000:]
    assert "HA: ACTIVE" not in text and "listening on" not in text, text[-2000:]
    assert standby.alive()

    # The pair still serves a new recorded call, through the new active, replicated to the old primary.
    uas = await start_registered_uas(
        "uas_echo.xml", remote, "1003", users["1003"], workdir=tmp_path / "uas2", rtp_echo=True
    )
    try:
        one = await run_uac(
            "uac_pcap_auth.xml",
            remote,
            workdir=tmp_path / "uac2",
            service="1003",
            user="1004",
            auth=("1004", users["1004"]),
            max_calls=1,
            duration_ms=1000,
            timeout=20,
        )
    finally:
        await uas.stop()
    assert one.ok, one.describe()
    assert primary.alive() and standby.alive()

"""Recorded calls under load with SIPp (Debian sip-tester) through the real stack.

A SIPp UAS registers as 1002 and echoes RTP; a SIPp UAC authenticates as 1001 and places 200 calls
at 20 calls/s, each playing G.711 A-law RTP from the pcap shipped with SIPp for 8 s. Every call
must succeed, and 200 recordings with the right duration and metadata must be found through the
API.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from services.lab import Lab
from tests.helpers.sipp import run_uac, start_registered_uas
from tests.system.conftest import LabApi, storage_file

pytestmark = pytest.mark.system

CALLS = 200
RATE = 20.0
CALL_MS = 8000
PCAP_PACKETS = 236  # g711a.pcap: 7.08 s of 30 ms packets (240 bytes of A-law each)


async def test_sipp_200_recorded_calls_at_20_cps(
    tmp_path: Path, lab: Lab, api: LabApi, sip_addr: str, users: dict[str, str], lab_info: dict[str, Any]
) -> None:
    t0 = datetime.now(UTC) - timedelta(seconds=1)
    uas = await start_registered_uas(
        "uas_echo.xml", sip_addr, "1003", users["1003"], workdir=tmp_path / "uas", rtp_echo=True
    )
    try:
        result = await run_uac(
            "uac_pcap_auth.xml",
            sip_addr,
            workdir=tmp_path / "uac",
            service="1003",
            user="1004",
            auth=("1004", users["1004"]),
            rate=RATE,
            max_calls=CALLS,
            duration_ms=CALL_MS,
            timeout=CALLS / RATE + CALL_MS / 1000 + 40,
        )
    finally:
        await uas.stop()
    assert result.ok and result.successful == CALLS and result.failed == 0, result.describe()

    recs = await api.wait_for(CALLS, timeout=60, party="1004", start_after=t0.isoformat())
    assert len(recs) == CALLS, f"{len(recs)} of {CALLS} recordings were indexed"
    assert len({r["call_id"] for r in recs}) == CALLS
    assert len({r["id"] for r in recs}) == CALLS
    mcps = {r["mcp"] for r in recs}
    assert mcps == {"mcp1", "mcp2"}, f"calls were not spread over both MCPs: {mcps}"
    for r in recs:
        assert r["tenant"] == "default"
        assert r["caller"] == "1004" and r["callee"] == "1003"
        assert r["from_uri"].startswith("sip:1004@") and r["to_uri"].startswith("sip:1003@")
        assert r["codec"] == "PCMA" and r["channels"] == 2 and r["sample_rate"] == 8000
        assert abs(r["duration"] - CALL_MS / 1000) < 1.0, (r["id"], r["duration"])
        assert abs(r["size"] - 44 - r["duration"] * 8000 * 4) <= 4 * 160, (r["size"], r["duration"])
        streams = {s["label"]: s for s in r["streams"]}
        # the caller's pcap, and the echo of it relayed back by the callee: nothing may be lost on loopback
        assert streams["caller"]["packets"] >= PCAP_PACKETS * 0.98, streams["caller"]
        assert streams["callee"]["packets"] >= PCAP_PACKETS * 0.98, streams["callee"]
        assert streams["caller"]["bytes"] == PCAP_PACKETS * 240, streams["caller"]
        assert streams["caller"]["lost"] == 0 and streams["callee"]["lost"] == 0, streams
    # Spot-check stored files against their metadata.
    for r in recs[:: CALLS // 10]:
        data = storage_file(lab, r).read_bytes()
        assert len(data) == r["size"] and hashlib.sha256(data).hexdigest() == r["sha256"]

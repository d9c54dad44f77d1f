"""Call scenarios through the real stack with real peers, asserting SIP answers and recordings.

- CANCEL while ringing: the caller gets 487; no recording is filed (nothing was said).
- Callee busy: 486 reaches the caller; no recording.
- Unknown extension: 404; no recording.
- Hold and resume (re-INVITEs from the caller): the call and its recording go on; the recording
  stays aligned with wall-clock time across the hold (what the caller plays after resuming sits at
  the moment it was played).
- BYE from the callee: both legs end, the recording is filed with the call's duration.
"""

from __future__ import annotations

import asyncio
import wave
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from services.lab import Lab
from tests.helpers.audio import best_lag, pcap_rtp_audio, read_wav, speech_wav
from tests.helpers.baresip import BaresipPhone
from tests.helpers.sipp import PCAP_DIR, run_uac, start_registered_uas
from tests.system.conftest import LabApi, storage_file

pytestmark = pytest.mark.system


def since() -> str:
    return (datetime.now(UTC) - timedelta(seconds=1)).isoformat()


async def assert_no_recording(api: LabApi, caller: str, t0: str) -> None:
    await asyncio.sleep(2.0)  # longer than an MCP takes to file and index a recording
    found = await asyncio.to_thread(api.search, party=caller, start_after=t0)
    assert found == [], f"unexpected recordings: {[(r['id'], r['duration']) for r in found]}"


async def test_cancel_while_ringing(
    tmp_path: Path, lab: Lab, api: LabApi, sip_addr: str, users: dict[str, str]
) -> None:
    t0 = since()
    uas = await start_registered_uas(
        "uas_ring.xml", sip_addr, "1002", users["1002"], workdir=tmp_path / "uas"
    )
    try:
        result = await run_uac(
            "uac_cancel_auth.xml", sip_addr, workdir=tmp_path / "uac", service="1002", user="1001",
            auth=("1001", users["1001"]), duration_ms=1000, timeout=20,
        )  # fmt: skip
    finally:
        uas_result = await uas.stop()
    assert result.ok and result.successful == 1, result.describe()
    assert 487 in result.received_responses() and 180 in result.received_responses()
    # B saw the CANCEL too (its scenario answers 200 to CANCEL and 487 to the INVITE)
    assert "CANCEL" in uas.message_file.read_text(errors="replace"), uas_result.describe()
    await assert_no_recording(api, "1001", t0)


async def test_callee_busy(
    tmp_path: Path, lab: Lab, api: LabApi, sip_addr: str, users: dict[str, str]
) -> None:
    t0 = since()
    uas = await start_registered_uas(
        "uas_busy.xml", sip_addr, "1002", users["1002"], workdir=tmp_path / "uas"
    )
    try:
        result = await run_uac(
            "uac_pcap_auth.xml", sip_addr, workdir=tmp_path / "uac", service="1002", user="1001",
            auth=("1001", users["1001"]), duration_ms=1000, timeout=20,
        )  # fmt: skip
    finally:
        await uas.stop()
    assert result.failed == 1 and result.received_responses()[-1] == 486, result.describe()
    await assert_no_recording(api, "1001", t0)


async def test_unknown_extension(
    tmp_path: Path, lab: Lab, api: LabApi, sip_addr: str, users: dict[str, str]
) -> None:
    t0 = since()
    result = await run_uac(
        "uac_pcap_auth.xml", sip_addr, workdir=tmp_path / "uac", service="1999", user="1001",
        auth=("1001", users["1001"]), duration_ms=1000, timeout=20,
    )  # fmt: skip
    assert result.failed == 1 and result.received_responses()[-1] == 404, result.describe()
    await assert_no_recording(api, "1001", t0)


HOLD_STEP_MS = 5000  # uac_hold_auth: play, hold after 1 step, resume after 2, play again, BYE after 3


async def test_hold_and_resume_keep_the_recording_aligned(
    tmp_path: Path, lab: Lab, api: LabApi, sip_addr: str, users: dict[str, str]
) -> None:
    t0 = since()
    uas = await start_registered_uas(
        "uas_echo.xml", sip_addr, "1002", users["1002"], workdir=tmp_path / "uas", rtp_echo=True
    )
    try:
        result = await run_uac(
            "uac_hold_auth.xml", sip_addr, workdir=tmp_path / "uac", service="1002", user="1001",
            auth=("1001", users["1001"]), duration_ms=HOLD_STEP_MS, timeout=40,
        )  # fmt: skip
    finally:
        await uas.stop()
    assert result.ok and result.successful == 1, result.describe()
    sent = uas.message_file.read_text(errors="replace")
    assert "a=sendonly" in sent, "the hold re-INVITE did not reach the callee"
    assert sent.count("INVITE sip:") >= 3, "initial INVITE, hold and resume must all reach the callee"

    (rec,) = await api.wait_for(1, timeout=20, party="1001", start_after=t0)
    total = 3 * HOLD_STEP_MS / 1000
    assert abs(rec["duration"] - total) < 1.0, rec["duration"]
    caller = next(s for s in rec["streams"] if s["label"] == "caller")
    # the caller was silent from the end of its first pcap (7.08 s) until it resumed (10 s)
    assert caller["longest_gap_ms"] > 2000, caller

    with wave.open(str(storage_file(lab, rec))) as w:
        left = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").reshape(-1, 2)[:, 0]
    _, pcap = pcap_rtp_audio(PCAP_DIR / "g711a.pcap")
    first = pcap[: 4 * 8000]
    lag1, peak1 = best_lag(first, left[: 6 * 8000], 8000, 2.0)
    resumed_at = 2 * HOLD_STEP_MS / 1000
    lag2, peak2 = best_lag(first, left[int((resumed_at - 1) * 8000) :], 8000, 2.0)
    assert peak1 > 0.8 and peak2 > 0.8, (peak1, peak2)
    # what was played after the resume sits one hold-and-resume later in the recording
    gap = (resumed_at - 1 + lag2) - lag1
    assert abs(gap - resumed_at) < 0.1, (
        f"after the hold the recording is off wall-clock time by {gap - resumed_at:.3f} s"
    )


async def test_bye_from_callee(tmp_path: Path, lab: Lab, api: LabApi, sip_addr: str, users: dict[str, str],
                               lab_info: dict[str, Any]) -> None:  # fmt: skip
    t0 = since()
    uas = await start_registered_uas(
        "uas_bye.xml",
        sip_addr,
        "1002",
        users["1002"],
        workdir=tmp_path / "uas",
        rtp_echo=True,
        duration_ms=3000,
    )
    speech = speech_wav(tmp_path / "a.wav", "hello, is anybody there", pad_s=10.0)
    proxy = f'outbound="sip:{sip_addr};transport=udp"'
    caller = BaresipPhone(
        tmp_path / "a", "1001", users["1001"], sip_addr, audio_file=speech, account_params=proxy
    )
    try:
        async with caller:
            await caller.wait_registered(10)
            await caller.dial(f"sip:1002@{lab_info['sip']['domain']}")
            await caller.wait_established(10)
            closed = await caller.wait_closed(15)
    finally:
        uas_result = await uas.stop()
    assert uas_result.successful == 1, uas_result.describe()
    assert "end of file" not in closed.param, f"the caller hung up itself: {closed.param}"
    (rec,) = await api.wait_for(1, timeout=20, party="1001", start_after=t0)
    assert abs(rec["duration"] - 3.0) < 0.8, rec["duration"]
    assert rec["call_id"] == closed.call_id
    # the caller's speech is on the left, and the callee (echoing it) sent it back on the right
    rate, audio = read_wav(storage_file(lab, rec))
    ref = read_wav(speech)[1][: int(2.5 * 8000), 0]
    assert best_lag(ref, audio[:, 0], rate, 1.0)[1] > 0.8
    assert best_lag(ref, audio[:, 1], rate, 1.0)[1] > 0.8

"""A recorded call end to end with two real softphones (baresip) through the real stack.

1001 and 1002 register with digest auth at the SIP Server, 1001 calls 1002, each plays its own
speech file. The call is anchored on an MCP through the Resource Manager; afterwards the recording
is found through the Web Services API and downloaded, and:
- its left channel carries what the caller played and its right channel what the callee played;
- the two channels are aligned in time as the phones played them (each speech starts at a known
  offset into its file; both phones start playing when the call is established);
- each phone received the other's speech (the MCP relayed the media both ways).
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from services.lab import Lab
from tests.helpers.audio import best_lag, read_wav, rms_dbfs, speech_wav, write_wav
from tests.helpers.baresip import BaresipPhone
from tests.system.conftest import LabApi, storage_file

pytestmark = pytest.mark.system

CALLER_LEAD = 0.5  # seconds of silence before the caller's speech
CALLEE_LEAD = 1.5  # ... and before the callee's
ALIGNMENT_TOLERANCE = 0.040  # issue 2: alignment error < 40 ms


async def test_two_baresip_phones_recorded_call(
    tmp_path: Path, lab: Lab, api: LabApi, sip_addr: str, users: dict[str, str], lab_info: dict[str, Any]
) -> None:
    caller_wav = speech_wav(
        tmp_path / "caller.wav", "one two three four five six", lead_s=CALLER_LEAD, pad_s=1.5
    )
    callee_wav = speech_wav(
        tmp_path / "callee.wav", "the quick brown fox jumps over the lazy dog", lead_s=CALLEE_LEAD, pad_s=8.0
    )
    domain = lab_info["sip"]["domain"]
    # Phones send everything through the SIP Server (outbound proxy), as a provisioned phone would.
    proxy = f'outbound="sip:{sip_addr};transport=udp"'
    caller = BaresipPhone(
        tmp_path / "a", "1001", users["1001"], sip_addr, audio_file=caller_wav, account_params=proxy
    )
    callee = BaresipPhone(
        tmp_path / "b", "1002", users["1002"], sip_addr, audio_file=callee_wav, account_params=proxy
    )
    t0 = datetime.now(UTC) - timedelta(seconds=1)
    async with callee, caller:
        await callee.wait_registered(10)
        await caller.wait_registered(10)
        await caller.dial(f"sip:1002@{domain}")
        await caller.wait_established(10)
        await callee.wait_established(5)
        closed = await caller.wait_closed(20)  # the caller's file ends first: it hangs up (BYE from A)
        assert "end of file" in closed.param
        await callee.wait_closed(5)

    # Each phone heard the other through the MCP.
    caller_ref = read_wav(caller_wav)[1][:, 0]
    callee_ref = read_wav(callee_wav)[1][:, 0]
    rx_at_callee = read_wav(callee.received_wav())[1][:, 0]
    rx_at_caller = read_wav(caller.received_wav())[1][:, 0]
    _, peak = best_lag(caller_ref, rx_at_callee, 8000, 2.0)
    assert peak > 0.8, f"the callee did not receive the caller's speech (peak {peak:.2f})"
    _, peak = best_lag(callee_ref[: len(caller_ref)], rx_at_caller, 8000, 2.0)
    assert peak > 0.8, f"the caller did not receive the callee's speech (peak {peak:.2f})"

    # The recording: found through the API by party, metadata right.
    found = await api.wait_for(1, timeout=20, party="1001", start_after=t0.isoformat())
    assert len(found) == 1, f"expected one recording of the call, found {len(found)}"
    rec = found[0]
    assert closed.call_id and rec["call_id"] == closed.call_id  # the A leg's Call-ID
    assert rec["tenant"] == "default"
    assert rec["caller"] == "1001" and rec["callee"] == "1002"
    assert rec["channels"] == 2 and rec["format"] == "wav" and rec["codec"] in ("PCMU", "PCMA")
    call_len = len(caller_ref) / 8000
    assert abs(rec["duration"] - call_len) < 1.0, (rec["duration"], call_len)
    labels = sorted(s["label"] for s in rec["streams"])
    assert labels == ["callee", "caller"]
    assert all(s["packets"] > 0.8 * call_len * 50 for s in rec["streams"]), rec["streams"]

    # The audio through the API is the stored file, byte for byte.
    status, headers, audio = api.request(f"/recordings/{rec['id']}/audio")
    assert status == 200 and headers["Content-Type"].startswith("audio/")
    assert hashlib.sha256(audio).hexdigest() == rec["sha256"]
    assert storage_file(lab, rec).read_bytes() == audio
    wav_path = tmp_path / "recording.wav"
    wav_path.write_bytes(audio)
    rate, rec_audio = read_wav(wav_path)
    assert rate == 8000 and rec_audio.shape[1] == 2
    left, right = rec_audio[:, 0], rec_audio[:, 1]

    # Left = caller, right = callee, and not the other way round.
    lag_left, peak_left = best_lag(caller_ref, left, 8000, 3.0)
    lag_right, peak_right = best_lag(callee_ref, right, 8000, 3.0)
    assert peak_left > 0.8, f"left channel does not carry the caller (peak {peak_left:.2f})"
    assert peak_right > 0.8, f"right channel does not carry the callee (peak {peak_right:.2f})"
    assert best_lag(caller_ref, right, 8000, 3.0)[1] < 0.5
    assert rms_dbfs(left) > -45 and rms_dbfs(right) > -45

    # Time alignment: both phones start playing their files when the call is established, so each
    # whole file (lead silence included) must sit at the same offset in its channel. The different
    # leads keep the two speeches apart in time, so neither correlation can lock onto the other.
    skew = lag_right - lag_left
    expected = 0.0
    assert abs(skew - expected) < ALIGNMENT_TOLERANCE, (
        f"channels misaligned by {1000 * (skew - expected):.1f} ms (left lag {lag_left:.3f} s, right lag {lag_right:.3f} s)"
    )
    # Keep the figures visible in the test log.
    print(f"alignment error {1000 * abs(skew - expected):.1f} ms; peaks L {peak_left:.3f} R {peak_right:.3f}")
    write_wav(tmp_path / "left.wav", 8000, np.ascontiguousarray(left))

"""Per-tenant recording policy, IVR Profile and isolation, through the real stack.

The lab's second tenant, acme (SIP domain acme.lab), records only calls with extension 2001, as
mono WAV. Its phones register as sip:EXT@acme.lab through the SIP Server (outbound proxy).
- 2003 calls 2002: not recorded by policy, yet the call connects and the phones hear each other.
- 2002 calls 2001: recorded, mono (the profile), visible to acme's API key only.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from services.lab import Lab
from tests.helpers.audio import best_lag, read_wav, speech_wav
from tests.helpers.baresip import BaresipPhone
from tests.system.conftest import LabApi, storage_file

pytestmark = pytest.mark.system

DOMAIN = "acme.lab"


def acme(lab_info: dict[str, Any]) -> dict[str, Any]:
    return next(t for t in lab_info["tenants"] if t["id"] == "acme")


def phone(tmp_path: Path, ext: str, tenant: dict[str, Any], sip_addr: str, wav: Path) -> BaresipPhone:
    password = next(u["password"] for u in tenant["users"] if u["extension"] == ext)
    return BaresipPhone(
        tmp_path / ext, ext, password, DOMAIN, audio_file=wav,
        account_params=f'outbound="sip:{sip_addr};transport=udp"',
    )  # fmt: skip


async def call(caller: BaresipPhone, callee: BaresipPhone, target: str) -> str:
    async with callee, caller:
        await callee.wait_registered(10)
        await caller.wait_registered(10)
        await caller.dial(f"sip:{target}@{DOMAIN}")
        await caller.wait_established(10)
        closed = await caller.wait_closed(20)
        await callee.wait_closed(5)
    assert "end of file" in closed.param
    assert closed.call_id
    return closed.call_id


async def test_policy_and_mono_profile_per_tenant(
    tmp_path: Path, lab: Lab, api: LabApi, sip_addr: str, lab_info: dict[str, Any]
) -> None:
    tenant = acme(lab_info)
    assert tenant["profile"]["channels"] == 1 and tenant["policy"]["patterns"] == ["2001"]
    acme_api = LabApi(lab_info["api"]["base_url"], tenant["api_key"])
    t0 = (datetime.now(UTC) - timedelta(seconds=1)).isoformat()
    a_wav = speech_wav(tmp_path / "a.wav", "acme calling, not recorded", pad_s=1.0)
    b_wav = speech_wav(tmp_path / "b.wav", "hello from the other side", pad_s=6.0)

    # 2003 -> 2002: not recorded, but a working call (media straight between the phones)
    a, b = phone(tmp_path, "2003", tenant, sip_addr, a_wav), phone(tmp_path, "2002", tenant, sip_addr, b_wav)
    unrecorded_call = await call(a, b, "2002")
    rx = read_wav(b.received_wav())[1][:, 0]
    assert best_lag(read_wav(a_wav)[1][:, 0], rx, 8000, 2.0)[1] > 0.8, "2002 did not hear 2003"

    # 2002 -> 2001: recorded, mono
    c_wav = speech_wav(tmp_path / "c.wav", "this call is recorded in mono", pad_s=1.0)
    c = phone(tmp_path / "2", "2002", tenant, sip_addr, c_wav)
    d = phone(tmp_path / "2", "2001", tenant, sip_addr, b_wav)
    recorded_call = await call(c, d, "2001")

    (rec,) = await acme_api.wait_for(1, timeout=20, start_after=t0)
    assert rec["call_id"] == recorded_call and rec["call_id"] != unrecorded_call
    assert rec["tenant"] == "acme" and rec["channels"] == 1
    assert (rec["caller"], rec["callee"]) == ("2002", "2001")
    rate, audio = read_wav(storage_file(lab, rec))
    assert audio.shape[1] == 1
    # the mono mix carries the caller's speech
    assert best_lag(read_wav(c_wav)[1][:, 0], audio[:, 0], rate, 2.0)[1] > 0.5

    # isolation: the default tenant's key neither finds nor fetches acme's recording
    await asyncio.sleep(0.5)
    assert all(r["id"] != rec["id"] for r in await asyncio.to_thread(api.search, start_after=t0))
    assert api.request(f"/recordings/{rec['id']}")[0] == 404
    assert api.request(f"/recordings/{rec['id']}/audio")[0] == 404
    assert acme_api.request(f"/recordings/{rec['id']}/audio")[0] == 200

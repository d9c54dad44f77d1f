"""The real-peer harness proved against itself, without the callvault stack.

SIPp UAC -> SIPp UAS (echo, digest challenge, hold/resume, CANCEL, busy, REGISTER), baresip ->
baresip with speech both ways, baresip registering at a SIPp registrar, baresip -> SIPp (UAS hangs
up, echoes RTP) and SIPp (pcap RTP) -> baresip. Each test runs in a few seconds.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.audio import (
    best_lag,
    pcap_rtp_audio,
    read_wav,
    rms_dbfs,
    speech_wav,
    write_wav,
)
from tests.helpers.baresip import BaresipError, BaresipPhone
from tests.helpers.sipp import PCAP_DIR, Sipp, run_uac, start_registered_uas, start_uas

pytestmark = pytest.mark.system

# The peers are Debian packages that `make test` installs (deploy/install-debian-packages.sh); a
# missing one is a broken set-up, reported as such rather than skipped.
_MISSING = [tool for tool in ("sipp", "baresip", "espeak-ng", "sox") if shutil.which(tool) is None]
assert not _MISSING, f"missing {', '.join(_MISSING)}: run deploy/install-debian-packages.sh"

AUTH = ("1001", "s3cret")


def messages(sipp: Sipp) -> str:
    return sipp.message_file.read_text(errors="replace")


# -- audio helpers -------------------------------------------------------------------------------


def test_speech_wav_and_best_lag(tmp_path: Path) -> None:
    path = speech_wav(tmp_path / "a.wav", "one two three", pad_s=0.7, lead_s=0.2)
    rate, samples = read_wav(path)
    assert rate == 8000 and samples.dtype == np.int16 and samples.shape[1] == 1
    assert not samples[: 1600 - 10].any() and not samples[-5000:].any()  # lead and pad are silence
    assert -35 < rms_dbfs(samples) < -10
    delayed = np.concatenate([np.zeros(2400, np.int16), samples[:, 0]])
    lag, peak = best_lag(samples, delayed, rate, 1.0)
    assert lag == pytest.approx(0.3) and peak > 0.99
    lag, peak = best_lag(samples, delayed, rate, 1.0, mode="envelope")
    assert lag == pytest.approx(0.3, abs=0.002) and peak > 0.95
    other = read_wav(speech_wav(tmp_path / "b.wav", "something else entirely"))[1]
    assert best_lag(samples, other, rate, 1.0)[1] < 0.5
    write_wav(tmp_path / "stereo.wav", 8000, np.stack([delayed, delayed], axis=1))
    assert read_wav(tmp_path / "stereo.wav")[1].shape == (delayed.size, 2)
    assert rms_dbfs(np.zeros(10)) == float("-inf")


def test_pcap_reference_audio() -> None:
    rate, audio = pcap_rtp_audio(PCAP_DIR / "g711a.pcap")
    assert rate == 8000 and audio.size == 236 * 240  # 236 packets of 30 ms PCMA
    assert rms_dbfs(audio) > -40


# -- SIPp against SIPp ---------------------------------------------------------------------------


async def test_sipp_uac_pcap_to_sipp_uas_echo(tmp_path: Path) -> None:
    async with Sipp("uas_echo.xml", workdir=tmp_path / "uas", rtp_echo=True) as uas:
        # -rtp_echo reflects whatever reaches the media port to its sender.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.settimeout(2)
            probe.sendto(b"\x80\x08\x00\x01" + bytes(168), ("127.0.0.1", uas.media_port))
            assert probe.recv(2048).startswith(b"\x80\x08\x00\x01")
        result = await run_uac(
            "uac_pcap_auth.xml",
            f"127.0.0.1:{uas.local_port}",
            workdir=tmp_path / "uac",
            service="1002",
            user="1001",
            auth=AUTH,
            duration_ms=1000,
            timeout=15,
        )
        assert result.ok, result.describe()
        assert result.received_responses()[-1] == 200  # the BYE's
    uas_result = uas.result
    assert uas_result is not None and uas_result.ok, uas_result.describe() if uas_result else ""
    answer = messages(uas).split("SIP/2.0 200 OK", 1)[1]
    assert f"m=audio {uas.media_port} RTP/AVP 8" in answer  # the offer's first codec


async def test_sipp_digest_challenge_and_hold_resume(tmp_path: Path) -> None:
    keys = {"user": AUTH[0], "password": AUTH[1]}
    async with Sipp("uas_challenge_echo.xml", workdir=tmp_path / "uas", rtp_echo=True, keys=keys) as uas:
        result = await run_uac(
            "uac_hold_auth.xml",
            f"127.0.0.1:{uas.local_port}",
            workdir=tmp_path / "uac",
            service="1002",
            user="1001",
            auth=AUTH,
            duration_ms=300,
            timeout=15,
        )
        assert result.ok, result.describe()
        assert result.received_responses()[:1] == [401]
    text = messages(uas)
    assert 'Authorization: Digest username="1001"' in text
    # hold offer sendonly -> answer recvonly; resume sendrecv -> sendrecv (RFC 3264 6.1)
    assert text.count("a=sendonly") == 1 and text.count("a=recvonly") == 1
    versions = [line.split()[2] for line in text.splitlines() if line.startswith("o=- 1 ")]
    assert versions == sorted(versions, key=int) and len(set(versions)) == 3  # grows with each answer

    async with Sipp("uas_challenge_echo.xml", workdir=tmp_path / "uas2", keys=keys) as uas:
        wrong = await run_uac(
            "uac_pcap_auth.xml",
            f"127.0.0.1:{uas.local_port}",
            workdir=tmp_path / "uac2",
            service="1002",
            user="1001",
            auth=(AUTH[0], "wrong"),
            timeout=15,
        )
        assert wrong.failed == 1 and 403 in wrong.received_responses(), wrong.describe()


async def test_sipp_cancel_after_ringing(tmp_path: Path) -> None:
    async with Sipp("uas_ring.xml", workdir=tmp_path / "uas") as uas:
        result = await run_uac(
            "uac_cancel_auth.xml",
            f"127.0.0.1:{uas.local_port}",
            workdir=tmp_path / "uac",
            service="1002",
            user="1001",
            auth=AUTH,
            duration_ms=300,
            timeout=15,
        )
        assert result.ok, result.describe()
        assert result.received_responses()[-2:] == [200, 487]
    assert uas.result is not None and uas.result.ok, uas.result.describe() if uas.result else ""


async def test_sipp_busy(tmp_path: Path) -> None:
    uas = await start_uas("uas_busy.xml", workdir=tmp_path / "uas")
    try:
        result = await run_uac(
            "uac_pcap_auth.xml",
            f"127.0.0.1:{uas.local_port}",
            workdir=tmp_path / "uac",
            service="1002",
            user="1001",
            auth=AUTH,
            timeout=15,
        )
    finally:
        uas_result = await uas.stop()
    assert result.failed == 1 and result.received_responses()[-1] == 486, result.describe()
    assert uas_result.ok, uas_result.describe()


async def test_sipp_register_with_digest(tmp_path: Path) -> None:
    keys = {"user": AUTH[0], "password": AUTH[1]}
    async with Sipp("uas_registrar.xml", workdir=tmp_path / "registrar", keys=keys) as registrar:
        ok = await run_uac(
            "uac_register_auth.xml",
            f"127.0.0.1:{registrar.local_port}",
            workdir=tmp_path / "ok",
            user=AUTH[0],
            auth=AUTH,
            keys={"expires": "60"},
            timeout=10,
        )
        assert ok.ok and ok.received_responses() == [401, 200], ok.describe()
        bad = await run_uac(
            "uac_register_auth.xml",
            f"127.0.0.1:{registrar.local_port}",
            workdir=tmp_path / "bad",
            user=AUTH[0],
            auth=(AUTH[0], "wrong"),
            timeout=10,
        )
        assert bad.failed == 1 and bad.received_responses() == [401, 403], bad.describe()


async def test_sipp_uas_registered_from_its_own_port(tmp_path: Path) -> None:
    keys = {"user": "1002", "password": "pw2"}
    async with Sipp("uas_registrar.xml", workdir=tmp_path / "registrar", keys=keys) as registrar:
        uas = await start_registered_uas(
            "uas_echo.xml",
            f"127.0.0.1:{registrar.local_port}",
            "1002",
            "pw2",
            workdir=tmp_path / "callee",
            rtp_echo=True,
        )
        try:
            contact = f"Contact: <sip:1002@127.0.0.1:{uas.local_port}>"
            assert contact in messages(registrar)
            result = await run_uac(
                "uac_pcap_auth.xml",
                f"127.0.0.1:{uas.local_port}",
                workdir=tmp_path / "caller",
                service="1002",
                user="1001",
                duration_ms=200,
                timeout=10,
            )
            assert result.ok, result.describe()
        finally:
            await uas.stop()


# -- baresip -------------------------------------------------------------------------------------


async def test_baresip_direct_call_speech_both_ways(tmp_path: Path) -> None:
    a_wav = speech_wav(tmp_path / "a.wav", "alpha bravo charlie delta echo", pad_s=1.0)
    b_wav = speech_wav(tmp_path / "b.wav", "the quick brown fox jumps over the lazy dog", pad_s=3.0)
    a = BaresipPhone(tmp_path / "a", "1001", audio_file=a_wav)
    b = BaresipPhone(tmp_path / "b", "1002", audio_file=b_wav, answer_mode="manual")
    async with a, b:
        await a.dial(b.uri)
        incoming = await b.wait_incoming(5)
        assert "1001" in str(incoming.data.get("peeruri"))
        await a.wait_ringing(5)
        await b.answer()
        await a.wait_established()
        await b.wait_established()
        closed = await a.wait_closed(15)  # a's aufile ends first and hangs up
        assert "end of file" in closed.param
        await b.wait_closed(5)
    a_ref, b_ref = read_wav(a_wav)[1], read_wav(b_wav)[1]
    a_rx_path, b_rx_path = a.received_wav(), b.received_wav()
    assert a_rx_path is not None and b_rx_path is not None
    a_rx, b_rx = read_wav(a_rx_path)[1], read_wav(b_rx_path)[1]
    # what B received is what A played, and the other way round; not each other's speech
    lag, peak = best_lag(a_ref, b_rx, 8000, 1.0)
    assert peak > 0.9 and abs(lag) < 0.2, (lag, peak)
    lag, peak = best_lag(b_ref[: a_ref.shape[0]], a_rx, 8000, 1.0)
    assert peak > 0.9 and abs(lag) < 0.2, (lag, peak)
    assert best_lag(a_ref, a_rx, 8000, 1.0)[1] < 0.5


async def test_baresip_registers_with_digest(tmp_path: Path) -> None:
    keys = {"user": AUTH[0], "password": AUTH[1]}
    async with Sipp("uas_registrar.xml", workdir=tmp_path / "registrar", keys=keys) as registrar:
        phone = BaresipPhone(tmp_path / "p", AUTH[0], AUTH[1], f"127.0.0.1:{registrar.local_port}")
        async with phone:
            await phone.wait_registered(5)
            assert "OK" in await phone.command("reginfo")
        text = messages(registrar)
    assert 'username="1001"' in text and 'realm="callvault"' in text
    assert "SIP/2.0 200 OK" in text


async def test_baresip_calls_sipp_uas_that_hangs_up_and_echoes(tmp_path: Path) -> None:
    wav = speech_wav(tmp_path / "a.wav", "hello echo, can you hear me", pad_s=6.0)
    async with Sipp("uas_bye.xml", workdir=tmp_path / "uas", rtp_echo=True, duration_ms=3500) as uas:
        phone = BaresipPhone(tmp_path / "p", "1001", audio_file=wav)
        async with phone:
            await phone.dial(f"sip:1002@127.0.0.1:{uas.local_port}")
            await phone.wait_established(5)
            closed = await phone.wait_closed(10)  # the UAS's BYE, before the audio ends
            assert "end of file" not in closed.param
        assert uas.result is None  # still running: stopped by the context manager
    assert uas.result is not None and uas.result.ok, uas.result.describe()
    received = phone.received_wav()
    assert received is not None
    lag, peak = best_lag(read_wav(wav)[1][: 3 * 8000], read_wav(received)[1], 8000, 1.0)
    assert peak > 0.8 and 0 <= lag < 0.3, (lag, peak)  # our own speech, echoed


async def test_sipp_pcap_to_baresip(tmp_path: Path) -> None:
    callee = BaresipPhone(tmp_path / "b", "1002", codecs=("PCMA", "PCMU"))
    async with callee:
        result = await run_uac(
            "uac_pcap_auth.xml",
            f"127.0.0.1:{callee.sip_port}",
            workdir=tmp_path / "uac",
            service="1002",
            user="1001",
            duration_ms=3000,
            timeout=15,
        )
        assert result.ok, result.describe()
        await callee.wait_closed(5)
    received = callee.received_wav()
    assert received is not None
    _, reference = pcap_rtp_audio(PCAP_DIR / "g711a.pcap")
    rx = read_wav(received)[1]
    lag, peak = best_lag(reference[: 2 * 8000], rx, 8000, 1.0)
    assert peak > 0.9 and abs(lag) < 0.2, (lag, peak)


async def test_sipp_cancel_to_ringing_baresip(tmp_path: Path) -> None:
    callee = BaresipPhone(tmp_path / "b", "1002", answer_mode="manual")
    async with callee:
        result = await run_uac(
            "uac_cancel_auth.xml",
            f"127.0.0.1:{callee.sip_port}",
            workdir=tmp_path / "uac",
            service="1002",
            user="1001",
            duration_ms=300,
            timeout=15,
        )
        assert result.ok and result.received_responses()[-1] == 487, result.describe()
        await callee.wait_incoming(1)
        await callee.wait_closed(5)


async def test_baresip_wait_established_fails_fast_on_busy(tmp_path: Path) -> None:
    async with Sipp("uas_busy.xml", workdir=tmp_path / "uas") as uas:
        phone = BaresipPhone(tmp_path / "p", "1001")
        async with phone:
            await phone.dial(f"sip:1002@127.0.0.1:{uas.local_port}")
            with pytest.raises(BaresipError, match="CALL_CLOSED"):
                await asyncio.wait_for(phone.wait_established(5), 6)

"""MCP-side storage -> queue -> Recording Processor -> Web Services, with the real daemons on loopback.

Both daemons run through their ``run()`` entry points as tasks of the test's event loop, on free
127.0.0.1 ports, over a real disk storage root, a real queue directory and a real SQLite file. The
recordings are real WAV files moved into storage by the DiskWriter, as the MCP does.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import socket
import struct
import uuid
import wave
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from services import config as config_mod
from services.config import ClusterConfig
from services.recording_processor import daemon as rp_daemon
from services.storage.disk import DiskWriter, recording_key
from services.storage.queue import EventQueue
from services.web_services import daemon as ws_daemon

ACME_KEY = "acme-api-key-0123456789"
GLOBEX_KEY = "globex-api-key-0123456789"
INTERNAL = "internal-token-abcdef0123456789"
T0 = datetime(2024, 6, 3, 9, 30, tzinfo=UTC)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_wav(path: Path, seconds: float, freq: float) -> None:
    """A stereo 8 kHz 16-bit WAV: a tone on the left (caller), silence on the right (callee)."""
    rate = 8000
    frames = bytearray()
    for n in range(int(seconds * rate)):
        frames += struct.pack("<hh", int(8000 * math.sin(2 * math.pi * freq * n / rate)), 0)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(bytes(frames))


@dataclass
class Lab:
    config: ClusterConfig
    tmp: Path
    base_url: str
    queue: EventQueue
    disk: DiskWriter
    session: aiohttp.ClientSession
    tasks: list[asyncio.Task[None]]

    async def start(self, module: Any, name: str | None = None) -> asyncio.Task[None]:
        ready = asyncio.Event()
        task = asyncio.create_task(module.run(self.config, name=name, ready=ready.set))
        done, _ = await asyncio.wait(
            {task, asyncio.create_task(ready.wait())}, timeout=10, return_when=asyncio.FIRST_COMPLETED
        )
        if task in done:
            task.result()  # raises the daemon's start-up error
        assert ready.is_set(), f"{module.__name__} did not become ready"
        self.tasks.append(task)
        return task

    async def stop(self, task: asyncio.Task[None]) -> None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        self.tasks.remove(task)

    async def record(
        self,
        tenant: str = "acme",
        *,
        seconds: float = 1.0,
        freq: float = 440.0,
        start: datetime = T0,
        **fields: Any,
    ) -> dict[str, Any]:
        """What the MCP does at BYE: WAV in the spool -> disk storage -> event in the queue."""
        rid = uuid.uuid4().hex
        spool = self.tmp / "spool"
        spool.mkdir(exist_ok=True)
        part = spool / f"{rid}.wav.part"
        write_wav(part, seconds, freq)
        stored = await self.disk.store(part, recording_key(tenant, start, rid))
        event = {
            "id": rid,
            "tenant": tenant,
            "session_id": uuid.uuid4().hex,
            "part": 1,
            "call_id": f"{rid[:8]}@10.0.0.1",
            "from_uri": "sip:1001@acme.example",
            "from_display": "Alice",
            "to_uri": "sip:1002@acme.example",
            "to_display": "Bob",
            "caller": "1001",
            "callee": "1002",
            "direction": "internal",
            "start": start.isoformat(),
            "end": (start + timedelta(seconds=seconds)).isoformat(),
            "duration": seconds,
            "codec": "PCMU",
            "format": "wav",
            "channels": 2,
            "sample_rate": 8000,
            "size": stored.size,
            "sha256": stored.sha256,
            "storage": {"kind": stored.kind, "key": stored.key},
            "mcp": "mcp1",
            "streams": [
                {
                    "label": "caller",
                    "ssrc": 1234,
                    "packets": 50,
                    "bytes": 8000,
                    "lost": 0,
                    "late": 0,
                    "duplicates": 0,
                    "reordered": 0,
                    "jitter_ms": 0.4,
                    "gap_total_ms": 0.0,
                    "longest_gap_ms": 0.0,
                    "dtmf": "",
                }
            ],
        }
        event.update(fields)
        await self.queue.put(event)
        return event

    async def get(self, path: str, key: str = ACME_KEY, **kw: Any) -> aiohttp.ClientResponse:
        headers = {"Authorization": f"Bearer {key}", **kw.pop("headers", {})}
        return await self.session.get(self.base_url + path, headers=headers, **kw)

    async def ids(self, key: str = ACME_KEY, query: str = "") -> list[str]:
        async with await self.get(f"/api/v1/recordings?limit=500{query}", key) as resp:
            assert resp.status == 200, await resp.text()
            return [d["id"] for d in (await resp.json())["items"]]

    async def wait_for(self, predicate: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while not await predicate():
            assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
            await asyncio.sleep(0.05)

    async def queue_files(self) -> list[Path]:
        return [p for p in self.queue.directory.rglob("*.json") if "bad" not in p.parts]


@pytest.fixture
async def lab(tmp_path: Path) -> AsyncIterator[Lab]:
    port = free_port()
    config = config_mod.from_dict(
        {
            "storage": {"disk_root": "storage", "queue_dir": "queue"},
            "web_services": {
                "host": "127.0.0.1",
                "port": port,
                "database": "db/meta.sqlite3",
                "internal_token": INTERNAL,
            },
            "recording_processor": {
                "web_services_url": f"http://127.0.0.1:{port}",
                "poll_interval": 0.05,
                "max_backoff": 0.4,
                "claim_timeout": 30,
                "request_timeout": 5,
            },
            "tenants": [{"id": "acme", "api_key": ACME_KEY}, {"id": "globex", "api_key": GLOBEX_KEY}],
        },
        base_dir=str(tmp_path),
        environ={},
    )
    async with aiohttp.ClientSession() as session:
        lab = Lab(
            config,
            tmp_path,
            f"http://127.0.0.1:{port}",
            EventQueue(config.path("queue")),
            DiskWriter(config.path("storage")),
            session,
            [],
        )
        try:
            yield lab
        finally:
            for task in list(lab.tasks):
                await lab.stop(task)


async def test_recordings_flow_to_the_api(lab: Lab, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "callvault")
    await lab.start(ws_daemon)
    await lab.start(rp_daemon, "rp1")
    a1 = await lab.record("acme", seconds=1.0, freq=440, start=T0)
    a2 = await lab.record(
        "acme",
        seconds=2.0,
        freq=880,
        start=T0 + timedelta(minutes=5),
        caller="1003",
        from_uri="sip:1003@acme.example",
        direction="outbound",
    )
    g1 = await lab.record("globex", seconds=0.5, start=T0 + timedelta(minutes=1))

    async def arrived() -> bool:
        return len(await lab.ids()) == 2 and len(await lab.ids(GLOBEX_KEY)) == 1

    await lab.wait_for(arrived)
    await lab.wait_for(lambda: _empty(lab))

    # search: newest first, filters
    assert await lab.ids() == [a2["id"], a1["id"]]
    assert await lab.ids(GLOBEX_KEY) == [g1["id"]]
    assert await lab.ids(query="&party=1003") == [a2["id"]]
    assert await lab.ids(query=f"&call_id={a1['call_id']}") == [a1["id"]]
    assert await lab.ids(query="&direction=outbound") == [a2["id"]]
    assert await lab.ids(query="&start_after=2024-06-03T09:31:00Z") == [a2["id"]]
    assert await lab.ids(query="&start_before=2024-06-03T11:31:00%2B02:00") == [a1["id"]]
    async with await lab.get("/api/v1/recordings?limit=1") as resp:
        page = await resp.json()
    async with await lab.get(f"/api/v1/recordings?limit=1&cursor={page['next']}") as resp:
        page2 = await resp.json()
    assert [page["items"][0]["id"], page2["items"][0]["id"]] == [a2["id"], a1["id"]] and page2["next"] is None

    # metadata: the event, normalised
    async with await lab.get(f"/api/v1/recordings/{a1['id']}") as resp:
        meta = await resp.json()
    assert meta["start"] == "2024-06-03T09:30:00.000000Z" and meta["duration"] == 1.0
    for name in ("tenant", "call_id", "caller", "callee", "sha256", "size", "storage", "channels", "streams"):
        assert meta[name] == a1[name], name

    # audio: full and ranged, bytes equal to the stored file
    stored = lab.disk.path(a2["storage"]["key"]).read_bytes()
    async with await lab.get(f"/api/v1/recordings/{a2['id']}/audio") as resp:
        assert resp.status == 200 and resp.headers["Content-Type"] == "audio/wav"
        assert resp.headers["ETag"] == f'"{a2["sha256"]}"'
        body = await resp.read()
    assert body == stored and hashlib.sha256(body).hexdigest() == a2["sha256"]
    async with await lab.get(
        f"/api/v1/recordings/{a2['id']}/audio", headers={"Range": "bytes=44-1043"}
    ) as resp:
        assert resp.status == 206
        assert resp.headers["Content-Range"] == f"bytes 44-1043/{len(stored)}"
        assert await resp.read() == stored[44:1044]
    async with await lab.get(f"/api/v1/recordings/{a2['id']}/audio", headers={"Range": "bytes=-100"}) as resp:
        assert resp.status == 206 and await resp.read() == stored[-100:]
    async with await lab.get(
        f"/api/v1/recordings/{a2['id']}/audio", headers={"Range": f"bytes={len(stored)}-"}
    ) as resp:
        assert resp.status == 416

    # tenant isolation
    for path in (f"/api/v1/recordings/{g1['id']}", f"/api/v1/recordings/{g1['id']}/audio"):
        async with await lab.get(path) as resp:
            assert resp.status == 404 and (await resp.json())["error"]["code"] == "not_found"
    async with await lab.get(f"/api/v1/recordings/{g1['id']}", GLOBEX_KEY) as resp:
        assert resp.status == 200

    # a duplicate event (e.g. the MCP re-queued it after a crash) yields one record
    await lab.queue.put(a1)
    await lab.wait_for(lambda: _empty(lab))
    assert await lab.ids() == [a2["id"], a1["id"]]

    # bad requests: JSON errors, never 500
    for path, key, status in [
        ("/api/v1/recordings?limit=0", ACME_KEY, 400),
        ("/api/v1/recordings?start_after=notadate", ACME_KEY, 400),
        ("/api/v1/recordings?bogus=1", ACME_KEY, 400),
        ("/api/v1/recordings", "not-a-valid-key-at-all", 401),
        ("/api/v1/recordings/does-not-exist", ACME_KEY, 404),
    ]:
        async with await lab.get(path, key) as resp:
            assert resp.status == status, path
            assert (await resp.json())["error"]["message"]
    async with lab.session.post(
        lab.base_url + "/api/v1/internal/recordings",
        data=b"{oops",
        headers={"Authorization": f"Bearer {INTERNAL}"},
    ) as resp:
        assert resp.status == 400
    async with lab.session.get(lab.base_url + "/healthz") as resp:
        assert resp.status == 200
    async with lab.session.get(lab.base_url + "/api/v1/openapi.json") as resp:
        assert (await resp.json())["openapi"] == "3.1.0"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_events_wait_while_web_services_is_down(lab: Lab) -> None:
    await lab.start(rp_daemon, "rp1")
    events = [await lab.record("acme", start=T0 + timedelta(seconds=i)) for i in range(5)]
    await asyncio.sleep(1.0)  # several failed attempts with backoff
    assert len(await lab.queue_files()) == 5  # nothing lost, nothing dropped
    ws = await lab.start(ws_daemon)
    await lab.wait_for(lambda: _empty(lab))
    assert sorted(await lab.ids()) == sorted(e["id"] for e in events)

    # and again: Web Services goes away while the processor runs, then comes back
    await lab.stop(ws)
    late = await lab.record("acme", start=T0 + timedelta(minutes=10))
    await asyncio.sleep(0.6)
    assert len(await lab.queue_files()) == 1
    await lab.start(ws_daemon)
    await lab.wait_for(lambda: _empty(lab))
    assert late["id"] in await lab.ids()


async def test_bad_events_go_to_bad_dir(lab: Lab) -> None:
    await lab.start(ws_daemon)
    await lab.start(rp_daemon)
    good = await lab.record("acme")
    missing_start = await lab.record("acme")
    del missing_start["start"]
    await lab.queue.put(missing_start)
    (lab.queue.directory / "garbage.json").write_bytes(b"\x00\x01 not json")
    bad_channels = await lab.record("acme", channels=7)
    unknown_tenant_field = await lab.record("acme", siprec={"participants": 2})  # kept under 'extra'
    await lab.wait_for(lambda: _empty(lab))
    bad = sorted(p.name for p in (lab.queue.directory / "bad").glob("*.json"))
    assert bad == sorted([f"{missing_start['id']}.json", "garbage.json", f"{bad_channels['id']}.json"])
    reason = (lab.queue.directory / "bad" / f"{missing_start['id']}.json.reason").read_text()
    assert "start" in reason
    assert sorted(await lab.ids()) == sorted([good["id"], unknown_tenant_field["id"]])
    async with await lab.get(f"/api/v1/recordings/{unknown_tenant_field['id']}") as resp:
        assert (await resp.json())["extra"] == {"siprec": {"participants": 2}}


async def test_two_processors_no_loss_no_duplicate_posts(lab: Lab, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "callvault.recording_processor")
    await lab.start(ws_daemon)
    events = [await lab.record("acme", seconds=0.1, start=T0 + timedelta(seconds=i)) for i in range(30)]
    await asyncio.gather(lab.start(rp_daemon, "rpA"), lab.start(rp_daemon, "rpB"))
    await lab.wait_for(lambda: _empty(lab))
    assert sorted(await lab.ids()) == sorted(e["id"] for e in events)
    posted = [r.getMessage() for r in caplog.records if "posted to Web Services" in r.getMessage()]
    assert len(posted) == 30 and all("(201)" in m for m in posted)


async def test_shutdown_returns_claims_and_restart_resumes(lab: Lab) -> None:
    rp = await lab.start(rp_daemon, "rp1")  # Web Services is down: events get claimed and returned
    for i in range(3):
        await lab.record("acme", start=T0 + timedelta(seconds=i))
    await asyncio.sleep(0.3)
    await lab.stop(rp)
    assert len(list((lab.queue.directory).glob("*.json"))) == 3  # all back in the queue, none claimed
    assert not list((lab.queue.directory / "claimed").rglob("*.json"))
    # a claim left behind by a processor that died is picked up after claim_timeout
    dead = lab.queue.directory / "claimed" / "dead-rp"
    dead.mkdir(parents=True)
    orphan = await lab.record("acme", start=T0 + timedelta(minutes=1))
    src = lab.queue.directory / f"{orphan['id']}.json"
    src.rename(dead / f"{1}~{orphan['id']}.json")  # claimed at the epoch: long stale
    await lab.start(ws_daemon)
    await lab.start(rp_daemon, "rp1")
    await lab.wait_for(lambda: _empty(lab))
    assert len(await lab.ids()) == 4


async def _empty(lab: Lab) -> bool:
    return not await lab.queue_files()

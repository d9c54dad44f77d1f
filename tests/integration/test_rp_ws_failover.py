"""Recording Processor and Web Services instances killed (SIGKILL) under load, as real processes.

Every daemon here is its own ``python -m services.cli ...`` process (services.lab.DaemonProcess),
sharing one configuration, one queue directory, one disk storage root and one SQLite file, as
instances on one host would. The recordings are real WAV files moved into storage by the
DiskWriter and announced by events in the queue, as the MCP does at BYE.

* Two Recording Processors consume a queue being fed; one is killed mid-stream: every recording is
  indexed exactly once (Web Services' log creates each id once, the API lists each id once).
* Two Web Services instances over one store serve clients doing search + playback; one is killed:
  clients retrying on the other lose nothing (every answer complete and the audio bit-identical),
  and events for the dead instance wait in the queue until it is back.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import signal
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from services.lab import DaemonProcess, to_toml
from services.storage.disk import DiskWriter, recording_key
from services.storage.queue import EventQueue
from tests.helpers.audio import tone_wav

ACME_KEY = "acme-api-key-0123456789"
INTERNAL = "internal-token-abcdef0123456789"
T0 = datetime(2024, 6, 3, 9, 30, tzinfo=UTC)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Cluster:
    """The configuration, the shared directories and the daemon processes of one test."""

    tmp: Path
    config_path: Path
    ws_ports: list[int]
    queue: EventQueue
    disk: DiskWriter
    daemons: list[DaemonProcess] = field(default_factory=list)
    n: int = 0

    def start(self, label: str, *args: str, timeout: float = 20.0) -> DaemonProcess:
        d = DaemonProcess(label, list(args), self.config_path, self.tmp / "log")
        d.start()
        self.daemons.append(d)
        deadline = time.monotonic() + timeout
        while not d.is_ready():
            assert d.alive(), f"{label} exited during start-up:\n{d.tail()}"
            assert time.monotonic() < deadline, f"{label} not ready in {timeout} s:\n{d.tail()}"
            time.sleep(0.05)
        return d

    def web_services(self, i: int) -> DaemonProcess:
        return self.start(f"ws{i}", "web-services", "--set", f"web_services.port={self.ws_ports[i]}")

    def kill(self, d: DaemonProcess) -> None:
        d.signal(signal.SIGKILL)
        assert d.wait(10)

    async def record(self, seconds: float = 0.2) -> dict[str, Any]:
        """A finished recording: WAV moved into storage, its event in the queue."""
        self.n += 1
        rid = uuid.uuid4().hex
        start = T0 + timedelta(seconds=self.n)
        spool = self.tmp / "spool"
        spool.mkdir(exist_ok=True)
        part = spool / f"{rid}.wav.part"
        await asyncio.to_thread(tone_wav, part, seconds, 200.0 + self.n)
        stored = await self.disk.store(part, recording_key("acme", start, rid))
        event = {
            "id": rid,
            "tenant": "acme",
            "session_id": uuid.uuid4().hex,
            "part": 1,
            "call_id": f"{rid[:8]}@10.0.0.1",
            "from_uri": "sip:1001@acme.example",
            "to_uri": "sip:1002@acme.example",
            "caller": "1001",
            "callee": "1002",
            "direction": "internal",
            "start": start.isoformat(),
            "end": (start + timedelta(seconds=seconds)).isoformat(),
            "duration": seconds,
            "codec": "PCMU",
            "format": "wav",
            "channels": 1,
            "sample_rate": 8000,
            "size": stored.size,
            "sha256": stored.sha256,
            "storage": {"kind": stored.kind, "key": stored.key},
            "mcp": "mcp1",
            "streams": [],
        }
        await self.queue.put(event)
        return event

    def pending(self) -> int:
        return sum(1 for p in self.queue.directory.rglob("*.json") if "bad" not in p.parts)

    def posted(self, label: str, status: int) -> list[str]:
        """Recording ids a processor's log says it posted with ``status``."""
        text = (self.tmp / "log" / f"{label}.log").read_text(errors="replace")
        return re.findall(rf"recording ([0-9a-f]{{32}}) posted to Web Services \({status}\)", text)


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    ports = [free_port(), free_port()]
    data = {
        "storage": {"disk_root": "storage", "queue_dir": "queue"},
        "web_services": {
            "host": "127.0.0.1",
            "port": ports[0],
            "database": "meta.sqlite3",
            "internal_token": INTERNAL,
        },
        "recording_processor": {
            "web_services_url": f"http://127.0.0.1:{ports[0]}",
            "poll_interval": 0.05,
            "max_backoff": 0.3,
            "claim_timeout": 30.0,
            "request_timeout": 5.0,
        },
        "tenants": [{"id": "acme", "api_key": ACME_KEY}],
    }
    config_path = tmp_path / "cluster.toml"
    config_path.write_text(to_toml(data))
    c = Cluster(
        tmp_path, config_path, ports, EventQueue(tmp_path / "queue"), DiskWriter(tmp_path / "storage")
    )
    try:
        yield c
    finally:
        for d in c.daemons:
            d.signal(signal.SIGKILL)
            d.wait(10)


async def wait_for(predicate: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def list_ids(session: aiohttp.ClientSession, port: int) -> list[str]:
    ids: list[str] = []
    cursor = ""
    while True:
        url = f"http://127.0.0.1:{port}/api/v1/recordings?limit=500{cursor}"
        async with session.get(url, headers={"Authorization": f"Bearer {ACME_KEY}"}) as resp:
            assert resp.status == 200, await resp.text()
            page = await resp.json()
        ids += [d["id"] for d in page["items"]]
        if page["next"] is None:
            return ids
        cursor = f"&cursor={page['next']}"


async def test_recording_processor_killed_mid_stream(cluster: Cluster) -> None:
    cluster.web_services(0)
    rp_a = cluster.start("rpA", "recording-processor")
    cluster.start("rpB", "recording-processor")
    total = 240
    events: list[dict[str, Any]] = []

    async def produce() -> None:
        for _ in range(total):
            events.append(await cluster.record(seconds=0.05))
            await asyncio.sleep(0.005)

    producer = asyncio.create_task(produce())
    async with aiohttp.ClientSession() as session:
        # kill A once both processors are busy and a third of the recordings are in
        async def a_third_in() -> bool:
            return (
                len(cluster.posted("rpA", 201)) >= 10
                and len(await list_ids(session, cluster.ws_ports[0])) >= total // 3
            )

        await wait_for(a_third_in, 30, "a third of the recordings")
        cluster.kill(rp_a)
        killed_after = len(await list_ids(session, cluster.ws_ports[0]))
        await producer

        async def all_in() -> bool:
            return cluster.pending() == 0 and len(await list_ids(session, cluster.ws_ports[0])) >= total

        # the dead processor's claims come back within the survivor's stale check (5 s)
        await wait_for(all_in, 30, "every recording indexed")
        ids = await list_ids(session, cluster.ws_ports[0])
    assert killed_after < total, "the processor was killed after the end of the stream"
    assert len(ids) == len(set(ids)) == total  # no loss, no duplicate record
    assert set(ids) == {e["id"] for e in events}
    # Web Services created each recording exactly once (a post whose answer the killed processor
    # never saw is repeated by the survivor and answered 200 "exists")
    ws_log = (cluster.tmp / "log" / "ws0.log").read_text(errors="replace")
    created = re.findall(r"recording ([0-9a-f]{32}) of acme indexed", ws_log)
    assert sorted(created) == sorted(ids)
    assert cluster.posted("rpB", 201), "the survivor delivered nothing"
    assert not list((cluster.queue.directory / "bad").glob("*.json"))


async def test_web_services_killed_under_search_and_playback_load(cluster: Cluster) -> None:
    ws = [cluster.web_services(0), cluster.web_services(1)]
    cluster.start("rp", "recording-processor")  # posts to ws0 only
    events = [await cluster.record(seconds=0.5) for _ in range(12)]
    by_id = {e["id"]: e for e in events}
    stats = {"ok": 0, "retried": 0, "failed": 0}
    stop = asyncio.Event()

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        await wait_for(lambda: _count_is(session, cluster.ws_ports[1], 12), 20, "the recordings on ws1")

        async def call(prefer: int, path: str) -> tuple[int, bytes]:
            """GET on the preferred instance, on the other one when it fails (a client behind N+1)."""
            last: Exception | None = None
            for attempt, i in enumerate((prefer, 1 - prefer)):
                url = f"http://127.0.0.1:{cluster.ws_ports[i]}{path}"
                try:
                    async with session.get(url, headers={"Authorization": f"Bearer {ACME_KEY}"}) as resp:
                        body = await resp.read()
                        if resp.status >= 500:
                            raise aiohttp.ClientResponseError(resp.request_info, (), status=resp.status)
                        if attempt:
                            stats["retried"] += 1
                        return resp.status, body
                except (aiohttp.ClientError, TimeoutError) as exc:
                    last = exc
            raise AssertionError(f"both instances failed on {path}: {last}")

        async def client(prefer: int) -> None:
            n = 0
            while not stop.is_set():
                try:
                    status, body = await call(prefer, "/api/v1/recordings?limit=50")
                    assert status == 200
                    items = json.loads(body)["items"]
                    assert {d["id"] for d in items} >= set(by_id)
                    rid = events[n % len(events)]["id"]
                    n += 1
                    status, audio = await call(prefer, f"/api/v1/recordings/{rid}/audio")
                    assert status == 200 and hashlib.sha256(audio).hexdigest() == by_id[rid]["sha256"]
                    stats["ok"] += 1
                except AssertionError:
                    stats["failed"] += 1
                    raise

        clients = [asyncio.create_task(client(i % 2)) for i in range(6)]
        await asyncio.sleep(1.0)
        before = stats["ok"]
        cluster.kill(ws[0])  # SIGKILL under load
        await asyncio.sleep(1.5)
        # events for the dead instance wait in the queue
        late = [await cluster.record(seconds=0.2) for _ in range(3)]
        await asyncio.sleep(1.0)
        assert cluster.pending() == 3
        stop.set()
        await asyncio.gather(*clients)
        assert stats["failed"] == 0
        assert stats["retried"] >= 1 and stats["ok"] > before > 0
        # ws0 back: the waiting events arrive, and every instance sees them (one store)
        cluster.web_services(0)
        await wait_for(lambda: _count_is(session, cluster.ws_ports[1], 15), 20, "the late recordings")
        assert cluster.pending() == 0
        ids = await list_ids(session, cluster.ws_ports[0])
        assert sorted(ids) == sorted([*by_id, *(e["id"] for e in late)])


async def _count_is(session: aiohttp.ClientSession, port: int, n: int) -> bool:
    try:
        return len(await list_ids(session, port)) == n
    except aiohttp.ClientError:
        return False


async def test_processor_fails_over_between_web_services_instances(cluster: Cluster) -> None:
    """With both instances in its list, a processor moves to the survivor at once; only when every
    instance is down do events wait."""
    ws = [cluster.web_services(0), cluster.web_services(1)]
    other = f"recording_processor.web_services_urls=http://127.0.0.1:{cluster.ws_ports[1]}"
    cluster.start("rp", "recording-processor", "--set", other)
    events = [await cluster.record(seconds=0.05) for _ in range(20)]
    async with aiohttp.ClientSession() as session:
        await wait_for(lambda: _count_is(session, cluster.ws_ports[1], 20), 20, "the first recordings")
        cluster.kill(ws[0])
        events += [await cluster.record(seconds=0.05) for _ in range(20)]
        await wait_for(
            lambda: _count_is(session, cluster.ws_ports[1], 40), 20, "the recordings after the kill"
        )
        assert cluster.pending() == 0
        log = (cluster.tmp / "log" / "rp.log").read_text()
        assert f"switching to http://127.0.0.1:{cluster.ws_ports[1]}" in log
        # every instance down: events wait in the queue, then arrive when one is back
        cluster.kill(ws[1])
        late = [await cluster.record(seconds=0.05) for _ in range(5)]
        await asyncio.sleep(1.0)
        assert cluster.pending() == 5
        cluster.web_services(0)
        await wait_for(lambda: _count_is(session, cluster.ws_ports[0], 45), 20, "the late recordings")
        ids = await list_ids(session, cluster.ws_ports[0])
    assert sorted(ids) == sorted(e["id"] for e in [*events, *late])


async def test_backup_processor_takes_over_from_a_killed_active_one(cluster: Cluster) -> None:
    cluster.web_services(0)
    active = cluster.start("rp-active", "recording-processor")
    cluster.start("rp-backup", "recording-processor", "--set", "recording_processor.role=backup")
    first = [await cluster.record(seconds=0.05) for _ in range(20)]
    async with aiohttp.ClientSession() as session:
        await wait_for(lambda: _count_is(session, cluster.ws_ports[0], 20), 20, "the first recordings")
        assert len(cluster.posted("rp-active", 201)) == 20
        assert cluster.posted("rp-backup", 201) == []  # stood by while the active one lived
        cluster.kill(active)
        second = [await cluster.record(seconds=0.05) for _ in range(20)]
        await wait_for(
            lambda: _count_is(session, cluster.ws_ports[0], 40), 20, "the recordings after the kill"
        )
        ids = await list_ids(session, cluster.ws_ports[0])
    assert sorted(ids) == sorted(e["id"] for e in [*first, *second])
    assert sorted(cluster.posted("rp-backup", 201)) == sorted(e["id"] for e in second)
    assert "no active processor is alive" in (cluster.tmp / "log" / "rp-backup.log").read_text()

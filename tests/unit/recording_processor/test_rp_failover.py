"""Recording Processor across several Web Services instances, and the active/backup gate."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from services import config as config_mod
from services.recording_processor.daemon import ActiveGate, Outcome, RecordingProcessor
from services.storage.queue import EventQueue

EVENT = {
    "id": "r1",
    "tenant": "acme",
    "call_id": "c1",
    "start": "2024-05-01T08:00:00Z",
    "end": "2024-05-01T08:00:05Z",
    "storage": {"kind": "disk", "key": "acme/2024/05/01/r1.wav"},
}


class Instance:
    """A scripted Web Services instance."""

    def __init__(self, status: int) -> None:
        self.status = status
        self.posts = 0
        app = web.Application()
        app.router.add_post("/api/v1/internal/recordings", self.handle)
        self.server = TestServer(app)

    async def handle(self, request: web.Request) -> web.Response:
        self.posts += 1
        return web.json_response({"error": {"message": f"scripted {self.status}"}}, status=self.status)

    @property
    def url(self) -> str:
        return str(self.server.make_url("/"))


@pytest.fixture
async def instances() -> AsyncIterator[list[Instance]]:
    out = [Instance(201), Instance(201)]
    for i in out:
        await i.server.start_server()
    try:
        yield out
    finally:
        for i in out:
            await i.server.close()


async def test_next_instance_on_5xx_and_on_connection_failure(
    instances: list[Instance], tmp_path: Path
) -> None:
    a, b = instances
    queue = EventQueue(tmp_path / "q")
    async with aiohttp.ClientSession() as session:
        rp = RecordingProcessor(
            queue, session, url=[a.url, b.url], token="t", consumer="rp1", poll_interval=0.01
        )
        a.status = 503
        await queue.put(EVENT)
        assert await rp.process_pending() is Outcome.DONE  # posted to b at once
        assert (a.posts, b.posts) == (1, 1) and rp.url.startswith(b.url.rstrip("/"))
        assert not list(queue.directory.rglob("*.json"))
        # b goes away: back to a, which answers again
        a.status = 201
        await b.server.close()
        await queue.put({**EVENT, "id": "r2"})
        assert await rp.process_pending() is Outcome.DONE
        assert a.posts == 2 and rp.url.startswith(a.url.rstrip("/"))
        # every instance failing: the event waits in the queue
        a.status = 500
        await queue.put({**EVENT, "id": "r3"})
        assert await rp.process_pending() is Outcome.RETRY
        assert [p.name for p in queue.directory.glob("*.json")] == ["r3.json"]
        # a 4xx is an answer, not a reason to switch
        a.status = 400
        assert await rp.process_pending() is Outcome.DONE
        assert [p.name for p in (queue.directory / "bad").glob("*.json")] == ["r3.json"]


def test_urls_come_from_the_config() -> None:
    cfg = config_mod.from_dict(
        {
            "recording_processor": {
                "web_services_url": "http://a:8080/",
                "web_services_urls": ["http://b:8081", "http://a:8080"],
            }
        },
        environ={},
    )
    assert cfg.recording_processor.urls() == ["http://a:8080", "http://b:8081"]
    for rp, field in [
        ({"role": "standby"}, "recording_processor.role"),
        ({"web_services_urls": ["ftp://x"]}, r"recording_processor.web_services_urls\[0\]"),
        ({"web_services_url": "localhost:8080"}, "recording_processor.web_services_url"),
    ]:
        with pytest.raises(config_mod.ConfigError, match=field):
            config_mod.from_dict({"recording_processor": rp}, environ={})


def test_active_gate(tmp_path: Path) -> None:
    active, other_active, backup = ActiveGate(tmp_path), ActiveGate(tmp_path), ActiveGate(tmp_path)
    assert backup.no_active()
    active.hold_shared()
    other_active.hold_shared()  # actives share the lock
    assert not backup.no_active()
    active.release()
    assert not backup.no_active()
    other_active.release()
    assert backup.no_active()
    active.hold_shared()  # the backup's check does not keep the lock
    active.release()

"""Recording Processor decisions per Web Services answer, against a scripted aiohttp server."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from services.recording_processor.daemon import (
    Outcome,
    RecordingProcessor,
    build_document,
    consumer_name,
    local_consumer_dead,
)
from services.storage.metadata import DocumentError
from services.storage.queue import EventQueue

EVENT = {
    "id": "r1",
    "tenant": "acme",
    "call_id": "c1",
    "start": "2024-05-01T08:00:00Z",
    "end": "2024-05-01T08:00:05Z",
    "storage": {"kind": "disk", "key": "acme/2024/05/01/r1.wav"},
}


class FakeWebServices:
    def __init__(self) -> None:
        self.status = 201
        self.posts: list[dict[str, Any]] = []
        self.auth: list[str | None] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.posts.append(await request.json())
        self.auth.append(request.headers.get("Authorization"))
        return web.json_response({"error": {"message": f"scripted {self.status}"}}, status=self.status)


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[tuple[RecordingProcessor, FakeWebServices, EventQueue]]:
    fake = FakeWebServices()
    app = web.Application()
    app.router.add_post("/api/v1/internal/recordings", fake.handle)
    server = TestServer(app)
    await server.start_server()
    queue = EventQueue(tmp_path / "q")
    async with aiohttp.ClientSession() as session:
        rp = RecordingProcessor(
            queue, session, url=str(server.make_url("/")), token="tok", consumer="rp1", poll_interval=0.01
        )
        try:
            yield rp, fake, queue
        finally:
            await server.close()


async def test_created_is_acked(rig: tuple[RecordingProcessor, FakeWebServices, EventQueue]) -> None:
    rp, fake, queue = rig
    await queue.put(EVENT)
    assert await rp.process_pending() is Outcome.DONE
    assert fake.posts[0]["start"] == "2024-05-01T08:00:00.000000Z" and fake.auth == ["Bearer tok"]
    assert not list(queue.directory.rglob("*.json"))


@pytest.mark.parametrize("status", [200, 409, 410])
async def test_duplicates_count_as_done(
    rig: tuple[RecordingProcessor, FakeWebServices, EventQueue], status: int
) -> None:
    rp, fake, queue = rig
    fake.status = status
    await queue.put(EVENT)
    assert await rp.process_pending() is Outcome.DONE
    assert not list(queue.directory.rglob("*.json"))


@pytest.mark.parametrize("status", [500, 503, 401, 403, 404])
async def test_retry_returns_event_to_queue(
    rig: tuple[RecordingProcessor, FakeWebServices, EventQueue], status: int
) -> None:
    rp, fake, queue = rig
    fake.status = status
    await queue.put(EVENT)
    await queue.put({**EVENT, "id": "r2"})
    assert await rp.process_pending() is Outcome.RETRY
    assert len(fake.posts) == 1  # stops at the first failure
    assert sorted(p.name for p in await queue.pending()) == ["r1.json", "r2.json"]
    fake.status = 201
    assert await rp.process_pending() is Outcome.DONE
    assert await queue.pending() == []


@pytest.mark.parametrize("status", [400, 413, 422])
async def test_refused_goes_to_bad(
    rig: tuple[RecordingProcessor, FakeWebServices, EventQueue], status: int
) -> None:
    rp, fake, queue = rig
    fake.status = status
    await queue.put(EVENT)
    assert await rp.process_pending() is Outcome.DONE
    assert (queue.bad_dir / "r1.json").exists()
    assert f"scripted {status}" in (queue.bad_dir / "r1.json.reason").read_text()


async def test_invalid_event_never_posted(
    rig: tuple[RecordingProcessor, FakeWebServices, EventQueue],
) -> None:
    rp, fake, queue = rig
    await queue.put({**EVENT, "end": "2024-05-01T07:00:00Z"})
    assert await rp.process_pending() is Outcome.DONE
    assert fake.posts == [] and (queue.bad_dir / "r1.json").exists()


async def test_connection_refused_is_retry(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    queue = EventQueue(tmp_path)
    await queue.put(EVENT)
    async with aiohttp.ClientSession() as session:
        rp = RecordingProcessor(queue, session, url=f"http://127.0.0.1:{port}", token="t", consumer="rp1")
        assert await rp.process_pending() is Outcome.RETRY
    assert [p.name for p in await queue.pending()] == ["r1.json"]


def test_build_document_keeps_unknown_fields_under_extra() -> None:
    doc = build_document({**EVENT, "siprec": {"x": 1}, "extra": {"a": 2}})
    assert doc["extra"] == {"a": 2, "siprec": {"x": 1}}
    with pytest.raises(DocumentError):
        build_document({**EVENT, "siprec": 1, "extra": [1]})


def test_consumer_name() -> None:
    assert consumer_name("rp 1/x") == "rp_1_x"
    assert consumer_name(None)
    assert consumer_name("...").startswith("rp-")


async def test_claims_of_a_dead_local_process_are_released_at_once(tmp_path: Path) -> None:
    import subprocess
    import sys

    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, check=True
    )
    dead_pid = int(child.stdout)
    dead = consumer_name(None).rsplit("-", 1)[0] + f"-{dead_pid}"
    alive = consumer_name(None)  # this process
    queue = EventQueue(tmp_path)
    assert await queue.claim(await queue.put({**EVENT, "id": "d1"}), dead)
    assert await queue.claim(await queue.put({**EVENT, "id": "a1"}), alive)
    assert await queue.claim(await queue.put({**EVENT, "id": "n1"}), "named-rp")
    assert (
        local_consumer_dead(dead) and not local_consumer_dead(alive) and not local_consumer_dead("named-rp")
    )
    assert await queue.release_stale(3600, local_consumer_dead) == 1
    assert [p.name for p in await queue.pending()] == ["d1.json"]

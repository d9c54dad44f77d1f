"""EventQueue: durable puts, ordering, claims, stale claims, corrupt events."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from pathlib import Path

import pytest

from services.storage.queue import EventQueue, QueueCorruptError, event_name


async def test_put_pending_load_ack(tmp_path: Path) -> None:
    q = EventQueue(tmp_path / "q")
    assert await q.pending() == []
    p1 = await q.put({"id": "a1", "x": 1})
    p2 = await q.put({"id": "b2", "x": 2})
    assert p1.name == "a1.json" and p2.name == "b2.json"
    os.utime(p1, ns=(time.time_ns(), time.time_ns() + 10**9))  # a1 is now the newest
    assert await q.pending() == [p2, p1]
    assert await q.load(p1) == {"id": "a1", "x": 1}
    await q.ack(p1)
    await q.ack(p1)
    assert await q.pending() == [p2]


async def test_put_rejects_bad_ids(tmp_path: Path) -> None:
    q = EventQueue(tmp_path)
    for bad in ({"x": 1}, {"id": "../x"}, {"id": ""}, {"id": 5}):
        with pytest.raises(ValueError):
            await q.put(bad)


async def test_pending_ignores_temp_files_and_dirs(tmp_path: Path) -> None:
    q = EventQueue(tmp_path)
    await q.put({"id": "r1"})
    (tmp_path / ".r2.json.abc.tmp").write_text("{")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "dir.json").mkdir()
    assert [p.name for p in await q.pending()] == ["r1.json"]
    os.utime(tmp_path / ".r2.json.abc.tmp", (0, 0))
    assert await q.purge_temp(60) == 1
    assert not (tmp_path / ".r2.json.abc.tmp").exists()


async def test_no_temp_file_left_after_put(tmp_path: Path) -> None:
    q = EventQueue(tmp_path)
    for i in range(20):
        await q.put({"id": f"r{i}", "n": i})
    assert sorted(os.listdir(tmp_path)) == sorted(f"r{i}.json" for i in range(20))


async def test_corrupt_event_moves_to_bad(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    q = EventQueue(tmp_path)
    (tmp_path / "broken.json").write_bytes(b'{"id": "broken", ')
    (tmp_path / "list.json").write_text("[1, 2]")
    with caplog.at_level(logging.ERROR, "callvault.storage.queue"):
        for name in ("broken.json", "list.json"):
            with pytest.raises(QueueCorruptError) as info:
                await q.load(tmp_path / name)
            assert info.value.moved_to == tmp_path / "bad" / name
            assert (tmp_path / "bad" / f"{name}.reason").read_text().strip()
    assert "broken.json" in caplog.text
    assert await q.pending() == []


async def test_claim_is_exclusive(tmp_path: Path) -> None:
    q = EventQueue(tmp_path)
    p = await q.put({"id": "r1"})
    results = await asyncio.gather(*(q.claim(p, f"rp{i}") for i in range(8)))
    won = [r for r in results if r is not None]
    assert len(won) == 1
    assert event_name(won[0]) == "r1.json"
    assert await q.pending() == []
    assert await q.load(won[0]) == {"id": "r1"}
    await q.ack(won[0])
    assert not won[0].exists()


async def test_unclaim_and_release(tmp_path: Path) -> None:
    q = EventQueue(tmp_path)
    for i in range(3):
        await q.put({"id": f"r{i}"})
    claimed = [await q.claim(p, "rp1") for p in await q.pending()]
    assert all(claimed) and await q.pending() == []
    assert await q.claimed("rp1") == claimed
    back = await q.unclaim(claimed[0])  # type: ignore[arg-type]
    assert back == tmp_path / "r0.json"
    assert await q.release("rp1") == 2
    assert {p.name for p in await q.pending()} == {"r0.json", "r1.json", "r2.json"}


async def test_release_stale_returns_old_claims_only(tmp_path: Path) -> None:
    q = EventQueue(tmp_path)
    p_old = await q.claim(await q.put({"id": "old"}), "dead")
    p_new = await q.claim(await q.put({"id": "new"}), "alive")
    assert p_old and p_new
    stale = p_old.with_name(f"{time.time_ns() - 120 * 10**9}~old.json")
    os.rename(p_old, stale)
    assert await q.release_stale(60) == 1
    assert [p.name for p in await q.pending()] == ["old.json"]
    assert await q.claimed("alive") == [p_new]
    await q.ack(p_new)


async def test_reject_keeps_event_and_reason(tmp_path: Path) -> None:
    q = EventQueue(tmp_path)
    p = await q.claim(await q.put({"id": "r9"}), "rp")
    assert p
    moved = await q.reject(p, "start: is required")
    assert moved == tmp_path / "bad" / "r9.json"
    assert json.loads(moved.read_text()) == {"id": "r9"}
    # a second bad event with the same id does not overwrite the first
    p2 = await q.put({"id": "r9", "v": 2})
    moved2 = await q.reject(p2, "again")
    assert moved2 and moved2 != moved and moved.exists()

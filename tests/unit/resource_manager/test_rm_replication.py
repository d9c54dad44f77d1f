"""Affinity replication between two RMs (services/resource_manager/replication.py): the codec on
its own, then two replicators on loopback: changes both ways, snapshot on (re)connect, garbage."""

from __future__ import annotations

import asyncio
import json

import pytest

from services.resource_manager.affinity import AffinityEntry, DialogRef, InMemoryAffinityStore
from services.resource_manager.replication import LinkCodec, Peer, ReplicationError, Replicator


def test_codec_round_trip_and_snapshot_merge() -> None:
    a, b = InMemoryAffinityStore(), InMemoryAffinityStore()
    a.place("s1", DialogRef("c1", "t1", "mcp1"), tenant="acme", now=10.0)
    b.place("s2", DialogRef("c2", "t2", "mcp2"), tenant="acme", now=5.0)
    b.place("s1", DialogRef("c9", "t9", "mcp2"), tenant="acme", now=1.0)  # older than a's s1
    assert LinkCodec.apply(b, LinkCodec.decode(LinkCodec.snapshot(a))) == 1
    s1 = b.get("s1")
    assert s1 is not None and s1.mcp == "mcp1" and [d.call_id for d in s1.dialogs] == ["c1"]
    assert b.get("s2") is not None  # kept: placed here, unknown to the peer
    assert b.by_call_id("c1") is not None and b.by_call_id("c9") is None
    changes: list[tuple[str, dict]] = []
    a.listeners.append(changes.append)
    a.end("c1", 11.0)
    for change in changes:
        LinkCodec.apply(b, LinkCodec.decode(LinkCodec.change(change)))
    assert b.get("s1") is None


@pytest.mark.parametrize(
    "line",
    [
        b"not json\n",
        b"[1,2]\n",
        b'{"t": "nope"}\n',
        b'{"t": "put"}\n',
        b'{"t": "put", "entry": {"mcp": 1}}\n',
    ],
)
def test_codec_refuses_garbage(line: bytes) -> None:
    store = InMemoryAffinityStore()
    with pytest.raises(ReplicationError):
        LinkCodec.apply(store, LinkCodec.decode(line))
    assert len(store) == 0


async def _pair(
    store_a: InMemoryAffinityStore, store_b: InMemoryAffinityStore, port_b: int = 0
) -> tuple[Replicator, Replicator]:
    b = Replicator("rm2", store_b, host="127.0.0.1", port=port_b, peers=[Peer("rm1", "127.0.0.1", 0)])
    await b.start()
    a = Replicator("rm1", store_a, host="127.0.0.1", port=0, peers=[Peer("rm2", "127.0.0.1", b.port)])
    await a.start()
    b.peers[0].port = a.port  # rm2 never connects out (rm1 < rm2), but probes rm1 when it starts
    return a, b


async def until(cond, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "condition never met"
        await asyncio.sleep(0.01)


async def test_changes_both_ways_and_resync_after_restart() -> None:
    store_a, store_b = InMemoryAffinityStore(), InMemoryAffinityStore()
    store_a.place("before", DialogRef("c0", "t0", "mcp2"), tenant="acme", now=1.0)
    a, b = await _pair(store_a, store_b)
    try:
        assert await b.wait_synced(5.0) == ["rm1"] and await a.wait_synced(5.0) == ["rm2"]
        assert store_b.get("before") is not None
        store_a.place("s1", DialogRef("c1", "t1", "mcp1"), tenant="acme", now=2.0)
        store_b.place("s2", DialogRef("c2", "t2", "mcp2"), tenant="acme", now=2.0)
        await until(lambda: store_b.get("s1") is not None and store_a.get("s2") is not None)
        store_b.confirm("c1", "mcp-tag", 3.0)
        await until(lambda: (e := store_a.get("s1")) is not None and e.dialogs[0].confirmed)
        # rm2 dies; rm1 goes on placing; a new rm2 with an empty store resynchronises.
        port_b = b.port
        await b.close()
        store_a.place("s3", DialogRef("c3", "t3", "mcp1"), tenant="acme", now=4.0)
        fresh = InMemoryAffinityStore()
        b = Replicator("rm2", fresh, host="127.0.0.1", port=port_b, peers=[Peer("rm1", "127.0.0.1", a.port)])
        await b.start()
        assert await b.wait_synced(5.0) == ["rm1"]
        assert {e.session_id for e in fresh.entries()} == {"before", "s1", "s2", "s3"}
        entry = fresh.get("s1")
        assert isinstance(entry, AffinityEntry) and entry.dialogs[0].to_tag == "mcp-tag"
    finally:
        await a.close()
        await b.close()


async def test_garbage_from_a_peer_drops_only_that_link() -> None:
    store_a, store_b = InMemoryAffinityStore(), InMemoryAffinityStore()
    a, b = await _pair(store_a, store_b)
    try:
        await b.wait_synced(5.0)
        reader, writer = await asyncio.open_connection("127.0.0.1", b.port)
        writer.write(b'{"t": "hello", "name": "rm1"}\n{"t": "put", "entry": 42}\n')
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), 5.0) is not None  # closed by rm2
        writer.close()
        # The real link is re-established (the intruder's hello replaced it) and works.
        await until(lambda: "rm1" in b._queues)
        store_a.place("s9", DialogRef("c9", "t9", "mcp1"), tenant="acme", now=1.0)
        await until(lambda: store_b.get("s9") is not None)
        assert json.loads(LinkCodec.hello("x"))["name"] == "x"
    finally:
        await a.close()
        await b.close()


async def test_an_mcp_found_dead_is_reported_to_the_peer() -> None:
    store_a, store_b = InMemoryAffinityStore(), InMemoryAffinityStore()
    a, b = await _pair(store_a, store_b)
    reports: list[tuple[str, str]] = []
    b.on_mcp_down = lambda mcp, peer: reports.append((mcp, peer))
    try:
        await b.wait_synced(5.0)
        store_a.place("s1", DialogRef("c1", "t1", "mcp1"), tenant="acme", now=1.0)
        store_a.end("c1", 2.0)
        a.mcp_down("mcp1")
        await until(lambda: reports == [("mcp1", "rm1")])
        assert store_b.get("s1") is None  # the affinity changes came first, on the same link
    finally:
        await a.close()
        await b.close()


async def test_an_absent_peer_is_not_waited_for() -> None:
    lone = Replicator(
        "rm2", InMemoryAffinityStore(), host="127.0.0.1", port=0, peers=[Peer("rm1", "127.0.0.1", 9)]
    )
    await lone.start()
    try:
        started = asyncio.get_running_loop().time()
        assert await lone.wait_synced(5.0) == []
        assert asyncio.get_running_loop().time() - started < 1.5
    finally:
        await lone.close()

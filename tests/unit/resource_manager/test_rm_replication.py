"""Affinity replication between two RMs (services/resource_manager/replication.py): the codec and
its authentication on their own, then two replicators on loopback: changes both ways, snapshot on
(re)connect, garbage, strangers without the secret."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest

from services import ha_auth
from services.resource_manager.affinity import AffinityEntry, DialogRef, InMemoryAffinityStore
from services.resource_manager.replication import LinkCodec, Peer, ReplicationError, Replicator

SECRET = b"rm-pair-secret-0123456789"


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
    b = Replicator(
        "rm2", store_b, host="127.0.0.1", port=port_b, peers=[Peer("rm1", "127.0.0.1", 0)], secret=SECRET
    )
    await b.start()
    a = Replicator(
        "rm1", store_a, host="127.0.0.1", port=0, peers=[Peer("rm2", "127.0.0.1", b.port)], secret=SECRET
    )
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
        b = Replicator(
            "rm2",
            fresh,
            host="127.0.0.1",
            port=port_b,
            peers=[Peer("rm1", "127.0.0.1", a.port)],
            secret=SECRET,
        )
        await b.start()
        assert await b.wait_synced(5.0) == ["rm1"]
        assert {e.session_id for e in fresh.entries()} == {"before", "s1", "s2", "s3"}
        entry = fresh.get("s1")
        assert isinstance(entry, AffinityEntry) and entry.dialogs[0].to_tag == "mcp-tag"
    finally:
        await a.close()
        await b.close()


async def _intrude(port: int, lines: list[bytes]) -> list[bytes]:
    """A stranger's connection to a replication port: send ``lines`` (the first one once the RM's
    hello arrived), return every line the RM sent before closing it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    received = [await asyncio.wait_for(reader.readline(), 5.0)]
    writer.write(b"".join(lines))
    await writer.drain()
    while line := await asyncio.wait_for(reader.readline(), 5.0):
        received.append(line)
    writer.close()
    return received


async def test_strangers_are_refused_and_the_real_link_stays(caplog: pytest.LogCaptureFixture) -> None:
    store_a, store_b = InMemoryAffinityStore(), InMemoryAffinityStore()
    store_b.place("private", DialogRef("c0", "t0", "mcp2"), tenant="acme", now=1.0)
    a, b = await _pair(store_a, store_b)
    forged = json.dumps({"t": "put", "entry": {"session_id": "evil", "mcp": "mcp9"}}).encode() + b"\n"
    nonce = ha_auth.new_nonce()
    hello = LinkCodec.hello("rm1", nonce)
    try:
        await b.wait_synced(5.0)
        await until(lambda: "rm1" in b._queues)
        real_link = b._queues["rm1"]
        caplog.set_level(logging.WARNING, "callvault.rm.replication")
        attempts = [
            [forged],  # the old protocol: straight to a put
            [LinkCodec.hello("rm1"), forged],  # a hello without a nonce
            [hello, forged],  # no auth
            [hello, json.dumps({"t": "auth"}).encode() + b"\n", forged],  # auth without a MAC
            [hello, LinkCodec.auth(b"another secret!!", "x" * 32, "rm1", "dial"), forged],  # bad MAC
            [hello, b'{"t": "put", "entry": 42}\n'],  # garbage
        ]
        for lines in attempts:
            received = await _intrude(b.port, lines)
            # rm2 sent its hello (and, to a well-formed hello, its auth), never its affinity
            assert len(received) <= 2 and all(b"private" not in line for line in received), received
        assert b.auth_failures == len(attempts)
        refused = [r for r in caplog.records if "refused" in r.getMessage()]
        assert len(refused) == len(attempts) and all(r.levelno == logging.WARNING for r in refused)
        assert all("127.0.0.1" in r.getMessage() for r in refused)  # the stranger's address
        assert store_b.get("evil") is None and store_a.get("evil") is None
        # The real link was never replaced nor dropped, and still works.
        assert b._queues.get("rm1") is real_link
        store_a.place("s9", DialogRef("c9", "t9", "mcp1"), tenant="acme", now=1.0)
        await until(lambda: store_b.get("s9") is not None)
    finally:
        await a.close()
        await b.close()


async def test_a_peer_with_another_secret_never_syncs() -> None:
    store_a, store_b = InMemoryAffinityStore(), InMemoryAffinityStore()
    store_a.place("s1", DialogRef("c1", "t1", "mcp1"), tenant="acme", now=1.0)
    b = Replicator(
        "rm2", store_b, host="127.0.0.1", port=0, peers=[Peer("rm1", "127.0.0.1", 0)], secret=b"x" * 16
    )
    await b.start()
    a = Replicator(
        "rm1", store_a, host="127.0.0.1", port=0, peers=[Peer("rm2", "127.0.0.1", b.port)], secret=SECRET
    )
    await a.start()
    try:
        await until(lambda: a.auth_failures >= 2 and b.auth_failures >= 2)  # rm1 keeps retrying
        assert len(store_b) == 0 and store_a.get("s1") is not None and not b.synced["rm1"].is_set()
    finally:
        await a.close()
        await b.close()


async def _as_rm1(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, ha_auth.Sealer]:
    """The test dials rm2 as rm1 would (it knows the secret): hello, auth, then sealed lines."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    theirs = LinkCodec.decode(await asyncio.wait_for(reader.readline(), 5.0))
    nonce = ha_auth.new_nonce()
    writer.write(LinkCodec.hello("rm1", nonce) + LinkCodec.auth(SECRET, theirs["nonce"], "rm1", "dial"))
    answer = LinkCodec.decode(await asyncio.wait_for(reader.readline(), 5.0))
    LinkCodec.verify_auth(SECRET, nonce, "rm2", "accept", answer)
    sealer, _ = LinkCodec.session(
        SECRET, "rm1", "rm2", dialled=True, my_nonce=nonce, peer_nonce=theirs["nonce"]
    )
    return reader, writer, sealer


def _put(session_id: str) -> bytes:
    return LinkCodec.change(("put", AffinityEntry(session_id, "mcp1", "acme", [], 1.0, 1.0).to_dict()))


async def test_lines_with_a_bad_mac_on_an_established_link_are_refused() -> None:
    store_b = InMemoryAffinityStore()
    b = Replicator(
        "rm2", store_b, host="127.0.0.1", port=0, peers=[Peer("rm1", "127.0.0.1", 9)], secret=SECRET
    )
    await b.start()
    try:
        for attack in ("replay", "tamper", "unsealed", "truncated"):
            reader, writer, sealer = await _as_rm1(b.port)
            good = sealer.seal(_put(f"ok-{attack}"))
            bad = {
                "replay": good,  # the same line again: its sequence number is past
                "tamper": good.replace(b"ok-", b"ev-"),
                "unsealed": _put(f"ev-{attack}"),
                "truncated": good[:-20] + b"\n",
            }[attack]
            writer.write(good + bad + sealer.seal(_put(f"after-{attack}")))
            await writer.drain()
            while await asyncio.wait_for(reader.readline(), 5.0):  # rm2's snapshot, then its close
                pass
            writer.close()
            assert store_b.get(f"ok-{attack}") is not None, attack
            assert store_b.get(f"ev-{attack}") is None and store_b.get(f"after-{attack}") is None, attack
        assert b.auth_failures == 4
    finally:
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
        "rm2",
        InMemoryAffinityStore(),
        host="127.0.0.1",
        port=0,
        peers=[Peer("rm1", "127.0.0.1", 9)],
        secret=SECRET,
    )
    await lone.start()
    try:
        started = asyncio.get_running_loop().time()
        assert await lone.wait_synced(5.0) == []
        assert asyncio.get_running_loop().time() - started < 1.5
    finally:
        await lone.close()


# -- the handshake, sans-I/O -------------------------------------------------------------------------
def test_auth_good_bad_missing_truncated_replayed_and_reflected() -> None:
    mine = ha_auth.new_nonce()
    good = LinkCodec.decode(LinkCodec.auth(SECRET, mine, "rm1", "dial"))
    LinkCodec.verify_auth(SECRET, mine, "rm1", "dial", good)
    rejected = {
        "other secret": LinkCodec.decode(LinkCodec.auth(b"not the pair's secret", mine, "rm1", "dial")),
        "missing": {"t": "auth"},
        "not a string": {"t": "auth", "mac": 12},
        "truncated": {"t": "auth", "mac": good["mac"][:32]},
        "not auth": {"t": "put", "mac": good["mac"]},
        # an answer recorded on an earlier connection: another nonce
        "replayed": LinkCodec.decode(LinkCodec.auth(SECRET, ha_auth.new_nonce(), "rm1", "dial")),
        # what rm1 answers when a stranger dials it with our nonce: the role differs
        "relayed": LinkCodec.decode(LinkCodec.auth(SECRET, mine, "rm1", "accept")),
    }
    for what, msg in rejected.items():
        with pytest.raises(ha_auth.AuthError):
            LinkCodec.verify_auth(SECRET, mine, "rm1", "dial", msg)
        assert what
    with pytest.raises(ha_auth.AuthError):  # the right MAC for another name
        LinkCodec.verify_auth(SECRET, mine, "rm3", "dial", good)


def test_sealed_lines_both_ways() -> None:
    n1, n2 = ha_auth.new_nonce(), ha_auth.new_nonce()
    seal1, open1 = LinkCodec.session(SECRET, "rm1", "rm2", dialled=True, my_nonce=n1, peer_nonce=n2)
    seal2, open2 = LinkCodec.session(SECRET, "rm2", "rm1", dialled=False, my_nonce=n2, peer_nonce=n1)
    for i in range(3):
        assert open2.open(seal1.seal(_put(f"s{i}"))) == _put(f"s{i}")
        assert open1.open(seal2.seal(_put(f"r{i}"))) == _put(f"r{i}")
    line = seal1.seal(_put("x"))
    with pytest.raises(ha_auth.AuthError):
        open1.open(line)  # reflected to its sender
    # another connection (other nonces) has another key: a line recorded here is worth nothing there
    _, other = LinkCodec.session(
        SECRET, "rm2", "rm1", dialled=False, my_nonce=ha_auth.new_nonce(), peer_nonce=n1
    )
    with pytest.raises(ha_auth.AuthError):
        other.open(line)
    assert open2.open(line) == _put("x")

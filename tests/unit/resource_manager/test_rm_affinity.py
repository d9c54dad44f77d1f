"""The affinity store: plain-data entries, dialog bookkeeping, TTL, change feed for a peer RM."""

from __future__ import annotations

import json

import pytest

from services.resource_manager.affinity import AffinityEntry, DialogRef, InMemoryAffinityStore


def test_place_and_lookup_by_session_and_call_id() -> None:
    store = InMemoryAffinityStore()
    entry = store.place("s1", DialogRef("c1", "ft1", "mcp1"), tenant="acme", now=100.0)
    assert entry.mcp == "mcp1" and entry.tenant == "acme"
    assert store.get("s1") == entry
    assert store.by_call_id("c1") == entry
    assert store.get("nope") is None and store.by_call_id("nope") is None


def test_second_part_joins_the_session_and_moves_its_mcp() -> None:
    store = InMemoryAffinityStore()
    store.place("s1", DialogRef("c1", "a", "mcp1"), tenant="acme", now=1.0)
    store.place("s1", DialogRef("c2", "b", "mcp2"), tenant="acme", now=2.0)
    entry = store.get("s1")
    assert entry is not None
    assert entry.mcp == "mcp2"  # later parts follow the latest placement
    assert [d.call_id for d in entry.dialogs] == ["c1", "c2"]
    assert store.active_dialogs() == {"mcp1": 1, "mcp2": 1}
    assert [e.session_id for e in store.sessions_on("mcp1")] == ["s1"]


def test_entry_disappears_with_its_last_dialog() -> None:
    store = InMemoryAffinityStore()
    store.place("s1", DialogRef("c1", "a", "mcp1"), tenant="t", now=1.0)
    store.place("s1", DialogRef("c2", "b", "mcp1"), tenant="t", now=1.0)
    store.confirm("c1", "tt", now=2.0)
    assert store.get("s1").dialogs[0].confirmed  # type: ignore[union-attr]
    remaining = store.end("c1", now=3.0)
    assert remaining is not None and [d.call_id for d in remaining.dialogs] == ["c2"]
    assert store.get("s1") is not None
    store.end("c2", now=4.0)
    assert store.get("s1") is None and store.by_call_id("c2") is None
    assert store.end("c2", now=5.0) is None
    assert len(store) == 0


def test_returned_entries_are_copies() -> None:
    store = InMemoryAffinityStore()
    entry = store.place("s1", DialogRef("c1", "a", "mcp1"), tenant="t", now=1.0)
    entry.mcp = "changed"
    entry.dialogs.clear()
    assert store.get("s1").mcp == "mcp1"  # type: ignore[union-attr]
    assert store.active_dialogs() == {"mcp1": 1}


def test_ttl_counts_from_the_last_activity() -> None:
    store = InMemoryAffinityStore()
    store.place("s1", DialogRef("c1", "a", "mcp1"), tenant="t", now=0.0)
    store.place("s2", DialogRef("c2", "a", "mcp1"), tenant="t", now=0.0)
    store.touch("c2", now=50.0)  # an in-dialog request (session refresh) keeps s2 alive
    expired = store.expire(now=100.0, ttl=60.0)
    assert [e.session_id for e in expired] == ["s1"]
    assert store.get("s2") is not None
    assert store.by_call_id("c1") is None


def test_snapshot_is_json_and_restores() -> None:
    store = InMemoryAffinityStore()
    store.place("s1", DialogRef("c1", "a", "mcp1"), tenant="t", now=1.0)
    store.confirm("c1", "b", now=2.0)
    snapshot = json.loads(json.dumps(store.snapshot()))
    other = InMemoryAffinityStore()
    other.restore(snapshot)
    assert other.entries() == store.entries()
    assert other.by_call_id("c1") is not None


def test_changes_replicate_to_a_peer_store() -> None:
    primary, peer = InMemoryAffinityStore(), InMemoryAffinityStore()
    changes: list = []
    primary.listeners.append(changes.append)
    primary.listeners.append(lambda change: peer.apply(json.loads(json.dumps(change))))
    primary.place("s1", DialogRef("c1", "a", "mcp1"), tenant="t", now=1.0)
    primary.place("s1", DialogRef("c2", "b", "mcp2"), tenant="t", now=2.0)
    assert peer.entries() == primary.entries()
    primary.end("c1", now=3.0)
    primary.end("c2", now=3.0)
    assert peer.entries() == [] and changes[-1] == ("remove", {"session_id": "s1"})
    with pytest.raises(ValueError):
        peer.apply(("frobnicate", {}))


def test_a_failing_listener_does_not_break_routing() -> None:
    store = InMemoryAffinityStore()

    def broken(change: object) -> None:
        raise RuntimeError("replication link down")

    store.listeners.append(broken)
    store.place("s1", DialogRef("c1", "a", "mcp1"), tenant="t", now=1.0)
    assert store.get("s1") is not None


def test_a_call_id_reused_by_another_session_moves() -> None:
    store = InMemoryAffinityStore()
    store.place("s1", DialogRef("c1", "a", "mcp1"), tenant="t", now=1.0)
    store.place("s2", DialogRef("c1", "a", "mcp2"), tenant="t", now=2.0)
    assert store.get("s1") is None
    assert store.by_call_id("c1").session_id == "s2"  # type: ignore[union-attr]


def test_entry_round_trip() -> None:
    entry = AffinityEntry("s", "m", "t", [DialogRef("c", "f", "m", "tt", True)], 1.0, 2.0)
    assert AffinityEntry.from_dict(entry.to_dict()) == entry

"""services/rewrap.py in one process: a real SQLite metadata store and disk objects, a fake Crypto
Server client holding private keys. Counts, idempotence, resuming after a crash, refusals, bad
objects, and the command line's bad input."""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from services import config as config_mod
from services import rewrap
from services.lab import to_toml
from services.storage import envelope
from services.storage.disk import DiskWriter, recording_key
from services.web_services.crypto_client import UnwrapRefused
from services.web_services.store import SqliteMetadataStore
from tests.helpers.certs import CertPair, make_cert

T0 = datetime(2024, 6, 3, 9, 30, tzinfo=UTC)
CHUNK = 1024


class FakeCrypto:
    """Unwraps like the Crypto Server: the first candidate whose key the tenant holds."""

    def __init__(self, keys: dict[str, CertPair]) -> None:
        self.keys = keys
        self.calls = 0

    async def unwrap(self, tenant: str, candidates: list[tuple[str, bytes]], recording_id: str = "") -> bytes:
        self.calls += 1
        for kid, wrapped in candidates:
            if kid in self.keys:
                private = envelope.load_private_key(self.keys[kid].key_pem)
                try:
                    return envelope.unwrap_with_private_key(wrapped, private)
                except envelope.EnvelopeError:
                    raise UnwrapRefused("unwrap_failed", "the key does not unwrap") from None
        raise UnwrapRefused("unknown_key", f"tenant {tenant!r} holds none of the keys")


@dataclass
class World:
    dir: Path
    config: config_mod.ClusterConfig
    store: SqliteMetadataStore
    disk: DiskWriter
    a: CertPair
    b: CertPair

    async def record(
        self, *pairs: CertPair, days: int = 0, size: int = 5 * CHUNK + 3
    ) -> tuple[dict[str, Any], bytes]:
        rid = uuid.uuid4().hex
        plain = os.urandom(size)
        src, dst = self.dir / f"{rid}.wav", self.dir / f"{rid}.enc"
        src.write_bytes(plain)
        paths = [str(p.write(self.dir / "certs", p.key_id[:8])[0]) for p in pairs]
        meta = envelope.encrypt_file(src, dst, paths, chunk_size=CHUNK)
        start = T0 + timedelta(days=days)
        stored = await self.disk.store(dst, recording_key("acme", start, rid))
        doc = {
            "id": rid, "tenant": "acme", "start": start.strftime("%Y-%m-%dT%H:%M:%S.%fZ"), "call_id": rid,
            "storage": stored.to_dict(), "encryption": meta, "size": len(plain),
        }  # fmt: skip
        await self.store.put(doc)
        return doc, plain

    def plan(self, add: list[CertPair] = (), drop: set[str] = frozenset(), **kw: Any) -> rewrap.Plan:  # type: ignore[assignment]
        return rewrap.Plan(
            "acme", tuple(envelope.load_certificate(p.cert_pem) for p in add), frozenset(drop), **kw
        )

    async def run(self, plan: rewrap.Plan, crypto: FakeCrypto) -> rewrap.Report:
        objects = rewrap.ObjectStore(self.config)
        return await rewrap.Rewrapper(plan, self.store, objects, crypto).run()  # type: ignore[arg-type]

    def open(self, doc: dict[str, Any], pair: CertPair) -> bytes:
        out = self.dir / "out.wav"
        path = self.disk.path(doc["storage"]["key"])
        with open(path, "rb") as f:
            h = envelope.read_header(f)
        key = envelope.unwrap_with_private_key(
            h.wrapped_keys[pair.key_id], envelope.load_private_key(pair.key_pem)
        )
        envelope.decrypt_file(path, out, key)
        return out.read_bytes()


@pytest.fixture
async def world(tmp_path: Path) -> Any:
    data = {
        "storage": {"disk_root": "storage"},
        "web_services": {"database": "meta.sqlite3"},
        "tenants": [{"id": "acme", "api_key": "acme-api-key-0123456789"}],
    }
    (tmp_path / "c.toml").write_text(to_toml(data))
    config = config_mod.load(tmp_path / "c.toml", environ={})
    store = SqliteMetadataStore(config.path("meta.sqlite3"))
    await store.open()
    try:
        yield World(
            tmp_path, config, store, DiskWriter(config.path("storage")), make_cert("a"), make_cert("b")
        )
    finally:
        await store.close()


async def test_rotation_then_idempotent(world: World) -> None:
    a, b = world.a, world.b
    recs = [await world.record(a) for _ in range(3)]
    plain_doc, _ = await world.record(a)
    await world.store.put({**plain_doc, "id": "unencrypted", "encryption": None})
    before = {d["id"]: world.disk.path(d["storage"]["key"]).read_bytes() for d, _ in recs}
    crypto = FakeCrypto({a.key_id: a, b.key_id: b})
    report = await world.run(world.plan([b], {a.key_id}), crypto)
    assert report.counts == {"rewrapped": 4, "not_encrypted": 1}, report.summary(False)
    for doc, plain in recs:
        new = await world.store.get("acme", doc["id"])
        assert new is not None and new["encryption"]["key_ids"] == [b.key_id]
        raw = world.disk.path(doc["storage"]["key"]).read_bytes()
        assert new["storage"]["size"] == len(raw) and new["storage"]["sha256"] != doc["storage"]["sha256"]
        old_raw = before[doc["id"]]
        h_old = envelope.parse_header(old_raw[: envelope.header_size(old_raw)])
        h_new = envelope.parse_header(raw[: envelope.header_size(raw)])
        assert raw[h_new.data_offset :] == old_raw[h_old.data_offset :]  # chunks unchanged
        assert world.open(new, b) == plain
        with pytest.raises(KeyError):
            world.open(new, a)
    assert not list(world.disk.root.rglob("*.rewrap.tmp"))
    # the second run reads headers only: no unwrap, nothing written
    calls = crypto.calls
    again = await world.run(world.plan([b], {a.key_id}), crypto)
    assert again.counts == {"already_done": 4, "not_encrypted": 1} and crypto.calls == calls


async def test_resumes_a_run_that_died_before_the_metadata(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = world.a, world.b
    doc, plain = await world.record(a)
    crypto = FakeCrypto({a.key_id: a, b.key_id: b})

    async def crash(*args: Any) -> bool:
        raise SystemExit("killed")

    monkeypatch.setattr(rewrap, "replace_document", crash)
    with pytest.raises(SystemExit):
        await world.run(world.plan([b]), crypto)
    monkeypatch.undo()
    stale = await world.store.get("acme", doc["id"])
    assert stale == doc  # the object has both keys, the metadata does not know yet
    assert world.open(doc, b) == plain
    report = await world.run(world.plan([b]), crypto)
    assert report.counts == {"metadata_repaired": 1}
    fixed = await world.store.get("acme", doc["id"])
    assert fixed is not None and fixed["encryption"]["key_ids"] == [a.key_id, b.key_id]
    assert fixed["storage"]["size"] == world.disk.path(doc["storage"]["key"]).stat().st_size
    assert (await world.run(world.plan([b]), crypto)).counts == {"already_done": 1}


async def test_a_crash_before_the_rename_leaves_the_old_object(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = world.a, world.b
    doc, _plain = await world.record(a)
    path = world.disk.path(doc["storage"]["key"])
    old = path.read_bytes()

    def no_replace(src: Any, dst: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(rewrap.os, "replace", no_replace)
    report = await world.run(world.plan([b]), FakeCrypto({a.key_id: a}))
    assert report.counts == {"failed": 1} and "No space left" in report.failures[0][1]
    assert path.read_bytes() == old and not list(path.parent.glob(".*"))
    assert await world.store.get("acme", doc["id"]) == doc


async def test_never_drops_the_last_usable_key(world: World) -> None:
    a, b = world.a, world.b
    only_a, _ = await world.record(a)
    both, _ = await world.record(a, b)
    # dropping A without adding anything: refused where A is the only key; where B remains, the
    # Crypto Server must hold B (here it holds A only): refused too
    report = await world.run(world.plan([], {a.key_id}), FakeCrypto({a.key_id: a}))
    assert report.counts == {"failed": 2}
    reasons = dict(report.failures)
    assert "last key" in reasons[only_a["id"]]
    assert "refusing to drop" in reasons[both["id"]] and "unknown_key" in reasons[both["id"]]
    # the Crypto Server holds B: the two-key recording loses A, the other is still refused
    report = await world.run(world.plan([], {a.key_id}), FakeCrypto({a.key_id: a, b.key_id: b}))
    assert report.counts == {"failed": 1, "rewrapped": 1}
    after = await world.store.get("acme", both["id"])
    assert after is not None and after["encryption"]["key_ids"] == [b.key_id]


async def test_bad_recordings_fail_alone(world: World) -> None:
    a, b = world.a, world.b
    good, plain = await world.record(a)
    corrupt, _ = await world.record(a)
    missing, _ = await world.record(a)
    foreign, _ = await world.record(b)  # a key the Crypto Server does not hold
    truncated, _ = await world.record(a)
    cpath = world.disk.path(corrupt["storage"]["key"])
    cpath.write_bytes(b"RIFF" + cpath.read_bytes()[4:])
    world.disk.path(missing["storage"]["key"]).unlink()
    tpath = world.disk.path(truncated["storage"]["key"])
    tpath.write_bytes(tpath.read_bytes()[:-5])
    c = make_cert("c")
    report = await world.run(world.plan([c]), FakeCrypto({a.key_id: a}))
    assert report.counts == {"rewrapped": 1, "failed": 4}
    reasons = dict(report.failures)
    assert "bad magic" in reasons[corrupt["id"]]
    assert "missing" in reasons[missing["id"]]
    assert "unknown_key" in reasons[foreign["id"]]
    assert "truncated or padded" in reasons[truncated["id"]]
    assert world.open((await world.store.get("acme", good["id"])) or {}, c) == plain


async def test_a_wrong_data_key_is_never_wrapped(world: World) -> None:
    """A wrapped key pasted from another recording unwraps, but does not open this audio."""
    a, b = world.a, world.b
    doc, _ = await world.record(a)
    other, _ = await world.record(a)
    path, opath = world.disk.path(doc["storage"]["key"]), world.disk.path(other["storage"]["key"])
    with open(path, "rb") as f:
        h = envelope.read_header(f)
    with open(opath, "rb") as f:
        foreign = envelope.read_header(f).wrapped_keys
    raw = path.read_bytes()
    path.write_bytes(envelope.encode_header(h, dict(foreign)) + raw[h.data_offset :])
    report = await world.run(world.plan([b], since=T0), FakeCrypto({a.key_id: a}))
    assert report.counts == {"failed": 1, "rewrapped": 1}
    assert "does not open the audio" in dict(report.failures)[doc["id"]]


async def test_since_and_dry_run(world: World) -> None:
    a, b = world.a, world.b
    old, _ = await world.record(a, days=-10)
    _new, _ = await world.record(a, days=0)
    crypto = FakeCrypto({a.key_id: a})
    dry = await world.run(world.plan([b], dry_run=True), crypto)
    assert dry.counts == {"rewrapped": 2} and crypto.calls == 0
    assert (await world.store.get("acme", old["id"])) == old
    report = await world.run(world.plan([b], since=T0 - timedelta(days=1)), crypto)
    assert report.counts == {"rewrapped": 1}
    assert (await world.store.get("acme", old["id"])) == old


def _args(config: Path, **kw: Any) -> SimpleNamespace:
    base = dict(config=str(config), tenant="acme", add_cert=[], profile=False, drop_key=[], since=None,
                dry_run=False, work_dir=None, json=False, overrides={})  # fmt: skip
    return SimpleNamespace(**{**base, **kw})


def test_command_line_bad_input(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = world.dir / "c.toml"
    cases = [
        (dict(tenant="nobody"), "unknown tenant 'nobody' (known: acme)"),
        (dict(), "nothing to do"),
        (dict(drop_key=["abc"]), "is not a key id"),
        (dict(add_cert=["0" * 64]), "admin_token"),
        (dict(add_cert=[str(world.dir / "none.crt")]), "cannot be read"),
        (dict(add_cert=["x"], since="yesterday"), "--since 'yesterday'"),
        (dict(drop_key=["a" * 64], since="yesterday"), "--since 'yesterday'"),
        (dict(drop_key=["a" * 64]), "internal_token is not set"),
    ]
    for kw, message in cases:
        assert rewrap.main(_args(cfg, **kw)) == 2, kw
        assert message in capsys.readouterr().err, kw


async def test_a_recording_deleted_meanwhile_is_not_revived(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = world.a, world.b
    doc, _ = await world.record(a)
    objects = rewrap.ObjectStore(world.config)
    real_rewrite = objects.rewrite

    async def rewrite_then_retention(*args: Any) -> tuple[int, str]:
        out = await real_rewrite(*args)
        await world.store.delete("acme", doc["id"])  # the retention job ran in between
        return out

    monkeypatch.setattr(objects, "rewrite", rewrite_then_retention)
    report = await rewrap.Rewrapper(world.plan([b]), world.store, objects, FakeCrypto({a.key_id: a})).run()  # type: ignore[arg-type]
    assert report.counts == {"failed": 1} and "deleted meanwhile" in report.failures[0][1]
    assert not world.disk.path(doc["storage"]["key"]).exists()

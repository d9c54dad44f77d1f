"""Re-wrapping an envelope's key table (sans-I/O, on bytes): the audio chunks stay byte-identical,
the new certificate's private key opens the recording, dropped keys are gone, tampering is still
detected, and doing it twice changes nothing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from services.storage import envelope
from services.storage.envelope import EnvelopeError, Header
from tests.helpers.certs import CertPair, make_cert

CHUNK = 1024


@pytest.fixture(scope="module")
def certs() -> dict[str, CertPair]:
    return {"a": make_cert("a"), "b": make_cert("b"), "c": make_cert("c")}


def sealed(tmp_path: Path, plain: bytes, *pairs: CertPair) -> bytes:
    paths = [str(p.write(tmp_path / "certs", f"c{i}")[0]) for i, p in enumerate(pairs)]
    src, dst = tmp_path / "in.wav", tmp_path / "out.enc"
    src.write_bytes(plain)
    envelope.encrypt_file(src, dst, paths, chunk_size=CHUNK)
    return dst.read_bytes()


def cert(pair: CertPair):
    return envelope.load_certificate(pair.cert_pem)


def open_with(blob: bytes, pair: CertPair) -> bytes:
    """Decrypt a whole envelope held in memory with one private key (as the Crypto Server would)."""
    h = envelope.parse_header(blob[: envelope.header_size(blob)])
    if len(blob) != h.total_size:
        raise EnvelopeError("truncated or padded")
    key = envelope.unwrap_with_private_key(
        h.wrapped_keys[pair.key_id], envelope.load_private_key(pair.key_pem)
    )
    out = []
    for i in range(h.chunk_count):
        start = h.chunk_offset(i)
        out.append(envelope.decrypt_chunk(h, key, i, blob[start : start + h.chunk_plain_size(i) + 16]))
    return b"".join(out)


def rewrap(
    blob: bytes, holder: CertPair, add: list[CertPair], drop: set[str] = frozenset()
) -> tuple[Header, bytes]:  # type: ignore[assignment]
    h = envelope.parse_header(blob[: envelope.header_size(blob)])
    key = envelope.unwrap_with_private_key(
        h.wrapped_keys[holder.key_id], envelope.load_private_key(holder.key_pem)
    )
    keys = envelope.rewrapped_keys(h, key, [cert(p) for p in add], drop)
    return h, envelope.encode_header(h, keys) + blob[h.data_offset :]


def test_added_certificate_opens_the_same_plaintext_with_identical_chunks(tmp_path: Path, certs) -> None:
    plain = b"RIFF" + os.urandom(5 * CHUNK + 77)
    old = sealed(tmp_path, plain, certs["a"])
    h, new = rewrap(old, certs["a"], [certs["b"]])
    nh = envelope.parse_header(new[: envelope.header_size(new)])
    assert list(nh.wrapped_keys) == [certs["a"].key_id, certs["b"].key_id]
    assert nh.wrapped_keys[certs["a"].key_id] == h.wrapped_keys[certs["a"].key_id]  # kept byte for byte
    assert nh.fixed == h.fixed and nh.plaintext_size == len(plain)
    assert new[nh.data_offset :] == old[h.data_offset :]  # the audio chunks are not re-encrypted
    assert len(new) == nh.total_size == len(old) + 34 + len(nh.wrapped_keys[certs["b"].key_id])
    assert open_with(new, certs["b"]) == plain
    assert open_with(new, certs["a"]) == plain


def test_dropping_the_old_key_leaves_only_the_new_one(tmp_path: Path, certs) -> None:
    plain = os.urandom(3 * CHUNK)
    old = sealed(tmp_path, plain, certs["a"])
    _, new = rewrap(old, certs["a"], [certs["b"]], {certs["a"].key_id})
    nh = envelope.parse_header(new[: envelope.header_size(new)])
    assert list(nh.wrapped_keys) == [certs["b"].key_id]
    assert open_with(new, certs["b"]) == plain
    with pytest.raises(KeyError):
        open_with(new, certs["a"])


def test_twice_changes_nothing(tmp_path: Path, certs) -> None:
    old = sealed(tmp_path, os.urandom(2 * CHUNK + 5), certs["a"], certs["b"])
    h, new = rewrap(old, certs["a"], [certs["b"]])
    assert new == old  # B is there already: same table, same bytes
    _, dropped = rewrap(old, certs["b"], [certs["b"]], {certs["a"].key_id})
    _, again = rewrap(dropped, certs["b"], [certs["b"]], {certs["a"].key_id})
    assert again == dropped
    # the header of an untouched table encodes to the original bytes
    assert envelope.encode_header(h, dict(h.wrapped_keys)) == old[: h.data_offset]


def test_empty_recording(tmp_path: Path, certs) -> None:
    old = sealed(tmp_path, b"", certs["a"])
    _, new = rewrap(old, certs["a"], [certs["c"]], {certs["a"].key_id})
    assert open_with(new, certs["c"]) == b""


def test_tampering_is_still_detected(tmp_path: Path, certs) -> None:
    plain = os.urandom(4 * CHUNK)
    _, new = rewrap(sealed(tmp_path, plain, certs["a"]), certs["a"], [certs["b"]])
    nh = envelope.parse_header(new[: envelope.header_size(new)])
    # a flipped byte in every chunk
    for i in range(nh.chunk_count):
        bad = bytearray(new)
        bad[nh.chunk_offset(i) + 3] ^= 1
        with pytest.raises(EnvelopeError, match=f"chunk {i} fails authentication"):
            open_with(bytes(bad), certs["b"])
    # the fixed header (plaintext size) is still authenticated
    bad = bytearray(new)
    bad[20] ^= 1
    with pytest.raises(EnvelopeError):
        open_with(bytes(bad), certs["b"])
    # a tampered new wrapped key does not unwrap
    table = dict(nh.wrapped_keys)
    w = bytearray(table[certs["b"].key_id])
    w[10] ^= 1
    table[certs["b"].key_id] = bytes(w)
    forged = envelope.encode_header(nh, table) + new[nh.data_offset :]
    with pytest.raises(EnvelopeError, match="does not unwrap"):
        open_with(forged, certs["b"])
    # chunks swapped
    c0, c1 = nh.chunk_offset(0), nh.chunk_offset(1)
    size = CHUNK + 16
    swapped = new[:c0] + new[c1 : c1 + size] + new[c0 : c0 + size] + new[c1 + size :]
    with pytest.raises(EnvelopeError, match="chunk 0 fails"):
        open_with(swapped, certs["b"])


def test_wrong_data_key_wraps_garbage_that_does_not_open_the_audio(tmp_path: Path, certs) -> None:
    """rewrapped_keys trusts its caller to have checked the key (the tool opens chunk 0 first)."""
    old = sealed(tmp_path, os.urandom(CHUNK), certs["a"])
    h = envelope.parse_header(old[: envelope.header_size(old)])
    keys = envelope.rewrapped_keys(h, os.urandom(32), [cert(certs["b"])], {certs["a"].key_id})
    new = envelope.encode_header(h, keys) + old[h.data_offset :]
    with pytest.raises(EnvelopeError, match="fails authentication"):
        open_with(new, certs["b"])


def test_refusals(tmp_path: Path, certs) -> None:
    old = sealed(tmp_path, os.urandom(100), certs["a"])
    h = envelope.parse_header(old[: envelope.header_size(old)])
    key = os.urandom(32)
    with pytest.raises(EnvelopeError, match="would leave no key"):
        envelope.rewrapped_keys(h, key, [], {certs["a"].key_id})
    with pytest.raises(EnvelopeError, match="both added and dropped"):
        envelope.rewrapped_keys(h, key, [cert(certs["b"])], {certs["b"].key_id})
    with pytest.raises(EnvelopeError, match="32"):
        envelope.rewrapped_keys(h, b"short", [cert(certs["b"])])
    with pytest.raises(EnvelopeError, match="1 to 16"):
        envelope.encode_header(h, {})
    with pytest.raises(EnvelopeError, match="64 hex"):
        envelope.encode_header(h, {"zz": b"x"})
    with pytest.raises(EnvelopeError, match="1 to 16"):
        envelope.encode_header(h, {f"{i:064x}": b"x" for i in range(17)})

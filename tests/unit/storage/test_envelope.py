"""Envelope encryption: round trips, ranges, tampering, wrong keys, rotation, bad certificates."""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services import config
from services.storage import envelope
from services.storage.envelope import CertificateError, EnvelopeError
from tests.helpers.certs import CertPair, make_cert

CHUNK = 1024  # small chunks so that a few KiB span many of them


@pytest.fixture(scope="module")
def cert_a() -> CertPair:
    return make_cert("a")


@pytest.fixture(scope="module")
def cert_b() -> CertPair:
    return make_cert("b")


def write_certs(tmp_path: Path, *certs: CertPair) -> list[str]:
    return [str(c.write(tmp_path / "certs", f"c{i}")[0]) for i, c in enumerate(certs)]


def encrypt(tmp_path: Path, plain: bytes, certs: list[str], chunk_size: int = CHUNK) -> tuple[Path, dict]:
    src, dst = tmp_path / "in.wav", tmp_path / "out.enc"
    src.write_bytes(plain)
    meta = envelope.encrypt_file(src, dst, certs, chunk_size=chunk_size)
    return dst, meta


def data_key(path: Path, cert: CertPair) -> bytes:
    with open(path, "rb") as f:
        header = envelope.read_header(f)
    private = envelope.load_private_key(cert.key_pem)
    return envelope.unwrap_with_private_key(header.wrapped_keys[cert.key_id], private)


def decrypt_all(path: Path, key: bytes, tmp_path: Path) -> bytes:
    out = tmp_path / "plain.out"
    envelope.decrypt_file(path, out, key)
    return out.read_bytes()


def test_round_trip_metadata_and_no_plaintext(tmp_path: Path, cert_a: CertPair) -> None:
    plain = b"RIFF" + os.urandom(10_000) + b"the secret words of the caller" * 50
    path, meta = encrypt(tmp_path, plain, write_certs(tmp_path, cert_a))
    assert meta == {
        "algorithm": envelope.ALGORITHM,
        "version": 1,
        "chunk_size": CHUNK,
        "key_ids": [cert_a.key_id],
        "plaintext_size": len(plain),
        "plaintext_sha256": hashlib.sha256(plain).hexdigest(),
    }
    stored = path.read_bytes()
    assert not stored.startswith(b"RIFF") and b"secret words" not in stored
    key = data_key(path, cert_a)
    assert key not in stored and key.hex() not in str(meta)
    assert decrypt_all(path, key, tmp_path) == plain
    with open(path, "rb") as f:
        header = envelope.read_header(f)
    assert header.total_size == len(stored)


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK])
def test_sizes_at_chunk_boundaries(tmp_path: Path, cert_a: CertPair, size: int) -> None:
    plain = os.urandom(size)
    path, meta = encrypt(tmp_path, plain, write_certs(tmp_path, cert_a))
    assert meta["plaintext_size"] == size
    assert decrypt_all(path, data_key(path, cert_a), tmp_path) == plain


def test_default_chunk_size_is_64_kib(tmp_path: Path, cert_a: CertPair) -> None:
    plain = os.urandom(200_000)
    src, dst = tmp_path / "in", tmp_path / "out"
    src.write_bytes(plain)
    meta = envelope.encrypt_file(src, dst, write_certs(tmp_path, cert_a))
    assert meta["chunk_size"] == 65536
    assert dst.stat().st_size < len(plain) + 1024  # 4 tags + a header with one 256-byte wrapped key
    assert decrypt_all(dst, data_key(dst, cert_a), tmp_path) == plain


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_any_range_matches_the_plaintext(
    tmp_path_factory: pytest.TempPathFactory, data: st.DataObject
) -> None:
    tmp_path = tmp_path_factory.mktemp("range")
    cert = make_cert("a")
    plain = os.urandom(data.draw(st.integers(1, 5 * CHUNK + 7)))
    path, _ = encrypt(tmp_path, plain, write_certs(tmp_path, cert))
    key = data_key(path, cert)
    first = data.draw(st.integers(0, len(plain) - 1))
    last = data.draw(st.integers(first, len(plain) - 1))
    with open(path, "rb") as f:
        got = b"".join(envelope.decrypt_range(f, key, first, last))
    assert got == plain[first : last + 1]


def test_chunk_span_reads_only_the_covering_chunks(tmp_path: Path, cert_a: CertPair) -> None:
    plain = os.urandom(4 * CHUNK + 10)
    path, _ = encrypt(tmp_path, plain, write_certs(tmp_path, cert_a))
    with open(path, "rb") as f:
        h = envelope.read_header(f)
    c0, c1, start, end = h.chunk_span(CHUNK + 5, 2 * CHUNK + 1)
    assert (c0, c1) == (1, 2)
    assert start == h.data_offset + (CHUNK + 16)
    assert end == h.data_offset + 3 * (CHUNK + 16) - 1
    c0, c1, start, end = h.chunk_span(4 * CHUNK, 4 * CHUNK + 9)
    assert (c0, c1) == (4, 4) and end == path.stat().st_size - 1
    with pytest.raises(EnvelopeError, match="outside the plaintext"):
        h.chunk_span(0, len(plain))


# --- tampering --------------------------------------------------------------------------------------


@pytest.fixture
def sealed(tmp_path: Path, cert_a: CertPair) -> tuple[Path, bytes, bytes, envelope.Header]:
    plain = os.urandom(4 * CHUNK + 100)
    path, _ = encrypt(tmp_path, plain, write_certs(tmp_path, cert_a))
    with open(path, "rb") as f:
        header = envelope.read_header(f)
    return path, plain, data_key(path, cert_a), header


def chunks_of(path: Path, h: envelope.Header) -> tuple[bytes, list[bytes]]:
    raw = path.read_bytes()
    out = [
        raw[h.chunk_offset(i) : h.chunk_offset(i) + h.chunk_plain_size(i) + 16] for i in range(h.chunk_count)
    ]
    return raw[: h.data_offset], out


def test_flipped_byte_in_any_chunk_is_detected(tmp_path: Path, sealed) -> None:
    path, _, key, h = sealed
    for i in range(h.chunk_count):
        raw = bytearray(path.read_bytes())
        raw[h.chunk_offset(i) + 7] ^= 0x01
        bad = tmp_path / f"flip{i}"
        bad.write_bytes(raw)
        with pytest.raises(EnvelopeError, match=f"chunk {i} fails authentication"):
            decrypt_all(bad, key, tmp_path)


def test_flipped_tag_or_fixed_header_is_detected(tmp_path: Path, sealed) -> None:
    path, _, key, _ = sealed
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x80  # last tag
    (tmp_path / "t").write_bytes(raw)
    with pytest.raises(EnvelopeError, match="fails authentication"):
        decrypt_all(tmp_path / "t", key, tmp_path)
    raw = bytearray(path.read_bytes())
    raw[28] ^= 0x01  # nonce prefix, part of the associated data
    (tmp_path / "n").write_bytes(raw)
    with pytest.raises(EnvelopeError, match="chunk 0 fails authentication"):
        decrypt_all(tmp_path / "n", key, tmp_path)


def test_reordered_chunks_are_detected(tmp_path: Path, sealed) -> None:
    path, _, key, h = sealed
    head, chunks = chunks_of(path, h)
    chunks[1], chunks[2] = chunks[2], chunks[1]
    (tmp_path / "r").write_bytes(head + b"".join(chunks))
    with pytest.raises(EnvelopeError, match="chunk 1 fails authentication"):
        decrypt_all(tmp_path / "r", key, tmp_path)


def test_dropped_chunk_is_detected(tmp_path: Path, sealed) -> None:
    path, _, key, h = sealed
    head, chunks = chunks_of(path, h)
    del chunks[2]
    (tmp_path / "d").write_bytes(head + b"".join(chunks))
    with pytest.raises(EnvelopeError):
        decrypt_all(tmp_path / "d", key, tmp_path)


def test_truncation_at_a_chunk_boundary_is_detected_even_with_a_forged_size(tmp_path: Path, sealed) -> None:
    path, _, key, h = sealed
    head, chunks = chunks_of(path, h)
    (tmp_path / "cut").write_bytes(head + b"".join(chunks[:3]))
    with pytest.raises(EnvelopeError, match="truncated"):
        decrypt_all(tmp_path / "cut", key, tmp_path)
    # the attacker also rewrites plaintext_size to 3 chunks: chunk 2 was not sealed as the last one,
    # and the fixed header (with the size) is bound into every chunk anyway
    forged = bytearray(head)
    struct.pack_into(">Q", forged, 16, 3 * CHUNK)
    (tmp_path / "forged").write_bytes(bytes(forged) + b"".join(chunks[:3]))
    with pytest.raises(EnvelopeError, match="chunk 0 fails authentication"):
        decrypt_all(tmp_path / "forged", key, tmp_path)


def test_truncated_inside_a_chunk_and_trailing_bytes_are_detected(tmp_path: Path, sealed) -> None:
    path, _, key, _ = sealed
    raw = path.read_bytes()
    (tmp_path / "short").write_bytes(raw[:-5])
    with pytest.raises(EnvelopeError, match="truncated"):
        decrypt_all(tmp_path / "short", key, tmp_path)
    (tmp_path / "long").write_bytes(raw + b"extra")
    with pytest.raises(EnvelopeError, match="after its last chunk"):
        decrypt_all(tmp_path / "long", key, tmp_path)


def test_chunk_from_another_file_is_detected(tmp_path: Path, sealed, cert_a: CertPair) -> None:
    path, plain, key, h = sealed
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    other, _ = encrypt(other_dir, plain, write_certs(other_dir, cert_a))
    with open(other, "rb") as f:
        oh = envelope.read_header(f)
    head, chunks = chunks_of(path, h)
    _, ochunks = chunks_of(other, oh)
    chunks[1] = ochunks[1]
    (tmp_path / "mix").write_bytes(head + b"".join(chunks))
    with pytest.raises(EnvelopeError, match="chunk 1 fails authentication"):
        decrypt_all(tmp_path / "mix", key, tmp_path)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda raw: b"RIFF" + raw[4:], "bad magic"),
        (lambda raw: raw[:8] + b"\x09" + raw[9:], "version 9 is not supported"),
        (lambda raw: raw[:9] + b"\x07" + raw[10:], "algorithm 7 is not supported"),
        (lambda raw: raw[:20], "too short"),
        (lambda raw: raw[:40], "truncated"),
    ],
)
def test_malformed_headers_are_clear_errors(tmp_path: Path, sealed, mutate, message: str) -> None:
    path, *_ = sealed
    bad = tmp_path / "bad"
    bad.write_bytes(mutate(path.read_bytes()))
    with open(bad, "rb") as f, pytest.raises(EnvelopeError, match=message):
        envelope.read_header(f)


def test_wrong_data_key_fails(tmp_path: Path, sealed) -> None:
    path, *_ = sealed
    with pytest.raises(EnvelopeError, match="fails authentication"):
        decrypt_all(path, os.urandom(32), tmp_path)
    with pytest.raises(EnvelopeError, match="cannot decrypt"):
        decrypt_all(path, b"short", tmp_path)


# --- keys and certificates ------------------------------------------------------------------------


def test_wrong_private_key_does_not_unwrap(tmp_path: Path, cert_a: CertPair, cert_b: CertPair) -> None:
    path, meta = encrypt(tmp_path, b"x" * 3000, write_certs(tmp_path, cert_a))
    assert cert_b.key_id not in meta["key_ids"]
    with open(path, "rb") as f:
        header = envelope.read_header(f)
    assert list(header.wrapped_keys) == [cert_a.key_id]
    wrong = envelope.load_private_key(cert_b.key_pem)
    with pytest.raises(EnvelopeError, match="does not unwrap"):
        envelope.unwrap_with_private_key(header.wrapped_keys[cert_a.key_id], wrong)
    tampered = bytearray(header.wrapped_keys[cert_a.key_id])
    tampered[10] ^= 1
    right = envelope.load_private_key(cert_a.key_pem)
    with pytest.raises(EnvelopeError, match="does not unwrap"):
        envelope.unwrap_with_private_key(bytes(tampered), right)


def test_rotation_two_certificates_either_key_opens(
    tmp_path: Path, cert_a: CertPair, cert_b: CertPair
) -> None:
    plain = os.urandom(5000)
    path, meta = encrypt(tmp_path, plain, write_certs(tmp_path, cert_a, cert_b))
    assert meta["key_ids"] == [cert_a.key_id, cert_b.key_id]
    key_a, key_b = data_key(path, cert_a), data_key(path, cert_b)
    assert key_a == key_b
    assert decrypt_all(path, key_b, tmp_path) == plain
    # the same certificate twice wraps once
    _, meta = encrypt(tmp_path, plain, write_certs(tmp_path, cert_a, cert_a))
    assert meta["key_ids"] == [cert_a.key_id]


def test_each_recording_gets_its_own_data_key(tmp_path: Path, cert_a: CertPair) -> None:
    certs = write_certs(tmp_path, cert_a)
    p1, _ = encrypt(tmp_path, b"same audio" * 100, certs)
    k1, c1 = data_key(p1, cert_a), p1.read_bytes()
    p2, _ = encrypt(tmp_path, b"same audio" * 100, certs)
    assert data_key(p2, cert_a) != k1 and p2.read_bytes() != c1


def test_pem_text_is_accepted_as_well_as_a_path(tmp_path: Path, cert_a: CertPair) -> None:
    _, meta = encrypt(tmp_path, b"abc", [cert_a.cert_pem.decode()])
    assert meta["key_ids"] == [cert_a.key_id]


@pytest.mark.parametrize(
    ("cert", "message"),
    [
        (lambda: make_cert("weak", bits=1024), "1024 bits, at least 2048"),
        (lambda: make_cert("a", days=-1, not_before_days=-10), "expired on"),
        (lambda: make_cert("a", not_before_days=5), "not valid before"),
        (lambda: make_cert("ec", ec_key=True), "must be RSA"),
    ],
)
def test_bad_certificates_are_refused(tmp_path: Path, cert, message: str) -> None:
    (crt,) = write_certs(tmp_path, cert())
    with pytest.raises(CertificateError, match=message):
        envelope.encrypt_file(crt, tmp_path / "out", [crt])
    assert not (tmp_path / "out").exists()


def test_unreadable_certificates_are_refused(tmp_path: Path) -> None:
    (tmp_path / "junk.pem").write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    with pytest.raises(CertificateError, match=r"not an X\.509 PEM certificate"):
        envelope.load_certificate(tmp_path / "junk.pem")
    with pytest.raises(CertificateError, match="cannot be read"):
        envelope.load_certificate(tmp_path / "missing.pem")
    with pytest.raises(CertificateError, match="at least one certificate"):
        envelope.encrypt_file(tmp_path / "junk.pem", tmp_path / "out", [])


def test_private_key_matching(cert_a: CertPair, cert_b: CertPair) -> None:
    cert = envelope.load_certificate(cert_a.cert_pem)
    assert envelope.key_id(cert) == cert_a.key_id
    assert envelope.private_key_matches(envelope.load_private_key(cert_a.key_pem), cert)
    assert not envelope.private_key_matches(envelope.load_private_key(cert_b.key_pem), cert)
    with pytest.raises(EnvelopeError, match="not a readable PEM private key"):
        envelope.load_private_key(b"nope")


# --- configuration ---------------------------------------------------------------------------------

TENANT = """
[[tenants]]
id = "acme"
api_key = "0123456789abcdef"
[tenants.profile]
certificates = {certs}
"""


def test_config_resolves_and_checks_profile_certificates(tmp_path: Path, cert_a: CertPair) -> None:
    cert_a.write(tmp_path / "keys", "acme")
    path = tmp_path / "c.toml"
    path.write_text(TENANT.format(certs='["keys/acme.crt"]'))
    cfg = config.load(path, environ={})
    assert cfg.tenants[0].profile.certificates == [str((tmp_path / "keys/acme.crt").resolve())]
    path.write_text(TENANT.format(certs="[]"))
    assert config.load(path, environ={}).tenants[0].profile.certificates == []


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (None, r"tenants\[0\].profile.certificates\[0\]: .*cannot be read"),
        (lambda: make_cert("weak", bits=1024), r"tenants\[0\].profile.certificates\[0\]: .*at least 2048"),
        (
            lambda: make_cert("a", days=-1, not_before_days=-10),
            r"tenants\[0\].profile.certificates\[0\]: .*expired",
        ),
    ],
)
def test_config_rejects_bad_certificates_naming_the_field(tmp_path: Path, make, message: str) -> None:
    if make is not None:
        make().write(tmp_path / "keys", "acme")
    path = tmp_path / "c.toml"
    path.write_text(TENANT.format(certs='["keys/acme.crt"]'))
    with pytest.raises(config.ConfigError, match=message):
        config.load(path, environ={})


# --- the metadata document's "encryption" ---------------------------------------------------------


def test_envelope_metadata_is_a_valid_document_field(tmp_path: Path, cert_a: CertPair) -> None:
    from services.storage.metadata import DocumentError, validate_document

    _, meta = encrypt(tmp_path, b"RIFF" + os.urandom(3000), write_certs(tmp_path, cert_a))
    base = {
        "id": "r1", "tenant": "acme", "session_id": "s1", "part": 1, "call_id": "c1", "start": "2024-06-03T09:30:00Z",
        "end": "2024-06-03T09:30:01Z", "codec": "PCMU", "format": "wav", "channels": 1, "sample_rate": 8000,
        "size": meta["plaintext_size"], "sha256": meta["plaintext_sha256"], "mcp": "mcp1",
        "storage": {"kind": "disk", "key": "acme/2024/06/03/r1.wav"},
    }  # fmt: skip
    assert validate_document({**base, "encryption": meta})["encryption"] == meta
    for field, bad, message in [
        ("key_ids", [], "encryption.key_ids"),
        ("key_ids", ["abc"], "encryption.key_ids"),
        ("plaintext_sha256", "x", "encryption.plaintext_sha256"),
        ("chunk_size", 0, "encryption.chunk_size"),
        ("algorithm", None, "encryption.algorithm"),
        ("data_key", "00" * 32, "encryption.data_key: is not allowed"),
    ]:
        with pytest.raises(DocumentError, match=message):
            validate_document({**base, "encryption": {**meta, field: bad}})

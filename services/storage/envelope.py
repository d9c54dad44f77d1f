"""Envelope encryption of recordings at rest: chunked AES-256-GCM, data key wrapped with RSA-OAEP.

Every recording gets its own random 256-bit data key. The audio is cut into fixed-size plaintext
chunks (64 KiB by default) and each chunk is sealed with AES-256-GCM, so that playback can decrypt
any byte range by reading only the chunks that cover it. The data key itself is never stored: it is
wrapped (RSA-OAEP, MGF1 and SHA-256) with the public key of each of the tenant's certificates and
the wrapped copies go into the file's header; only the holder of a matching private key (the Crypto
Server) can unwrap it.

File layout (all integers big-endian)::

    fixed header, 32 bytes (authenticated as part of every chunk's associated data)
      magic          8  b"CVENVLP\\x00"
      version        1  1
      algorithm      1  1 = AES-256-GCM in chunks, data key wrapped with RSA-OAEP-SHA256
      reserved       2  0
      chunk_size     4  plaintext bytes per chunk (the last chunk may be shorter)
      plaintext_size 8
      nonce_prefix   8  random per file
    key table
      table_length   4  bytes that follow in the table
      key_count      2
      key_count x:   key_id (32, SHA-256 of the certificate's DER) | wrapped_length (2) | wrapped key
    chunks: for i in 0..n-1, ciphertext of chunk i followed by its 16-byte GCM tag

Chunk ``i`` uses the nonce ``nonce_prefix || i`` (4 bytes) and the associated data
``fixed header || i (8 bytes) || last (1 byte)``. A flipped byte, a chunk moved, dropped or replaced
by another file's chunk, a file cut at a chunk boundary (the new last chunk lacks the ``last`` flag)
or a changed plaintext size all fail authentication. The key table is outside the associated data
so that an operator can re-wrap a recording's key for a new certificate without re-encrypting it;
a tampered wrapped key simply fails to unwrap. An empty recording is one empty chunk.

Everything here is synchronous and free of asyncio: callers run it in a worker thread.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from cryptography import x509
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

MAGIC = b"CVENVLP\x00"
VERSION = 1
ALGORITHM_ID = 1
ALGORITHM = "AES-256-GCM-CHUNKED+RSA-OAEP-SHA256"
DEFAULT_CHUNK_SIZE = 64 * 1024
TAG_SIZE = 16
KEY_SIZE = 32
MIN_RSA_BITS = 2048
MAX_CHUNK_SIZE = 16 * 1024 * 1024
MAX_KEYS = 16

_FIXED = struct.Struct(">8sBBHIQ8s")
FIXED_SIZE = _FIXED.size  # 32
_TABLE_HEAD = struct.Struct(">IH")
_MAX_TABLE = MAX_KEYS * (32 + 2 + 1024)


class EnvelopeError(ValueError):
    """An envelope is malformed, tampered with, or cannot be opened with the key given."""


class CertificateError(EnvelopeError):
    """A certificate is unreadable, not RSA, too weak, or outside its validity period."""


def _oaep() -> padding.OAEP:
    return padding.OAEP(mgf=padding.MGF1(algorithm=hashes.SHA256()), algorithm=hashes.SHA256(), label=None)


# --- certificates ---------------------------------------------------------------------------------


def load_certificate(source: str | bytes | Path, *, now: datetime | None = None) -> x509.Certificate:
    """Parse and check an X.509 PEM certificate: RSA of >= 2048 bits, valid at ``now``.

    ``source`` is PEM text (str or bytes starting with ``-----BEGIN``) or the path of a PEM file.
    Raises CertificateError with the reason.
    """
    if isinstance(source, bytes):
        pem = source
        name = "certificate"
    elif isinstance(source, str) and source.lstrip().startswith("-----BEGIN"):
        pem = source.encode()
        name = "certificate"
    else:
        name = str(source)
        try:
            pem = Path(source).read_bytes()
        except OSError as exc:
            raise CertificateError(f"{name}: cannot be read ({exc.strerror or exc})") from None
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise CertificateError(f"{name}: not an X.509 PEM certificate ({exc})") from None
    key = cert.public_key()
    if not isinstance(key, rsa.RSAPublicKey):
        raise CertificateError(f"{name}: the public key must be RSA, not {type(key).__name__}")
    if key.key_size < MIN_RSA_BITS:
        raise CertificateError(f"{name}: the RSA key has {key.key_size} bits, at least {MIN_RSA_BITS} needed")
    moment = now or datetime.now(UTC)
    if moment > cert.not_valid_after_utc:
        raise CertificateError(f"{name}: expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC")
    if moment < cert.not_valid_before_utc:
        raise CertificateError(f"{name}: not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M:%S} UTC")
    return cert


def key_id(cert: x509.Certificate) -> str:
    """The key id of a certificate: the SHA-256 fingerprint of its DER encoding, lower-case hex."""
    return cert.fingerprint(hashes.SHA256()).hex()


def wrap_key(data_key: bytes, cert: x509.Certificate) -> bytes:
    """The data key encrypted with the certificate's RSA public key (OAEP, SHA-256)."""
    public = cert.public_key()
    assert isinstance(public, rsa.RSAPublicKey)  # load_certificate checked it
    return public.encrypt(data_key, _oaep())


def load_private_key(pem: bytes, password: bytes | None = None) -> rsa.RSAPrivateKey:
    """Parse an RSA private key (PEM, PKCS#8 or PKCS#1); raises EnvelopeError."""
    try:
        key = serialization.load_pem_private_key(pem, password=password)
    except (ValueError, TypeError) as exc:
        raise EnvelopeError(f"not a readable PEM private key ({exc})") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise EnvelopeError(f"the private key must be RSA, not {type(key).__name__}")
    return key


def private_key_matches(private: rsa.RSAPrivateKey, cert: x509.Certificate) -> bool:
    """True when ``private`` is the key of ``cert``'s public key."""
    public = cert.public_key()
    return (
        isinstance(public, rsa.RSAPublicKey)
        and public.public_numbers() == private.public_key().public_numbers()
    )


def unwrap_with_private_key(wrapped: bytes, private: rsa.RSAPrivateKey) -> bytes:
    """Recover a data key wrapped by :func:`wrap_key`; raises EnvelopeError if it does not unwrap."""
    try:
        data_key = private.decrypt(wrapped, _oaep())
    except ValueError:
        raise EnvelopeError("the wrapped data key does not unwrap with this private key") from None
    if len(data_key) != KEY_SIZE:
        raise EnvelopeError(f"the unwrapped data key has {len(data_key)} bytes, not {KEY_SIZE}")
    return data_key


# --- header ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Header:
    """The parsed header of an encrypted recording."""

    version: int
    algorithm: int
    chunk_size: int
    plaintext_size: int
    nonce_prefix: bytes
    wrapped_keys: dict[str, bytes]  # key id (hex) -> wrapped data key
    fixed: bytes  # the 32 fixed bytes, part of every chunk's associated data
    data_offset: int  # where chunk 0 starts

    @property
    def chunk_count(self) -> int:
        return max(1, -(-self.plaintext_size // self.chunk_size))

    @property
    def total_size(self) -> int:
        """The size the whole encrypted file must have."""
        return self.data_offset + self.plaintext_size + self.chunk_count * TAG_SIZE

    def chunk_offset(self, index: int) -> int:
        return self.data_offset + index * (self.chunk_size + TAG_SIZE)

    def chunk_plain_size(self, index: int) -> int:
        if index == self.chunk_count - 1:
            return self.plaintext_size - index * self.chunk_size
        return self.chunk_size

    def chunk_span(self, first: int, last: int) -> tuple[int, int, int, int]:
        """For plaintext bytes ``first..last`` (inclusive): first and last chunk index, and the
        ciphertext byte range ``start..end`` (inclusive) that holds those chunks."""
        if not 0 <= first <= last < self.plaintext_size:
            raise EnvelopeError(
                f"range {first}-{last} is outside the plaintext of {self.plaintext_size} bytes"
            )
        c0, c1 = first // self.chunk_size, last // self.chunk_size
        end = self.chunk_offset(c1) + self.chunk_plain_size(c1) + TAG_SIZE - 1
        return c0, c1, self.chunk_offset(c0), end


def _build_header(
    chunk_size: int, plaintext_size: int, nonce_prefix: bytes, wrapped: list[tuple[bytes, bytes]]
) -> tuple[bytes, bytes]:
    fixed = _FIXED.pack(MAGIC, VERSION, ALGORITHM_ID, 0, chunk_size, plaintext_size, nonce_prefix)
    table = b"".join(kid + struct.pack(">H", len(w)) + w for kid, w in wrapped)
    return fixed, fixed + _TABLE_HEAD.pack(len(table) + 2, len(wrapped)) + table


def parse_header(data: bytes) -> Header:
    """Parse a header from the first bytes of an encrypted file (at least :func:`header_size`)."""
    if len(data) < FIXED_SIZE + _TABLE_HEAD.size:
        raise EnvelopeError("the file is too short to be an encrypted recording")
    magic, version, algorithm, _reserved, chunk_size, plaintext_size, prefix = _FIXED.unpack_from(data)
    if magic != MAGIC:
        raise EnvelopeError("not an encrypted recording (bad magic)")
    if version != VERSION:
        raise EnvelopeError(f"envelope version {version} is not supported (only {VERSION})")
    if algorithm != ALGORITHM_ID:
        raise EnvelopeError(f"envelope algorithm {algorithm} is not supported")
    if not 16 <= chunk_size <= MAX_CHUNK_SIZE:
        raise EnvelopeError(f"chunk size {chunk_size} is out of range")
    table_len, count = _TABLE_HEAD.unpack_from(data, FIXED_SIZE)
    if table_len > _MAX_TABLE or not 1 <= count <= MAX_KEYS:
        raise EnvelopeError(f"key table of {table_len} bytes / {count} keys is out of range")
    end = FIXED_SIZE + 4 + table_len
    if len(data) < end:
        raise EnvelopeError("the header is truncated")
    pos = FIXED_SIZE + _TABLE_HEAD.size
    keys: dict[str, bytes] = {}
    for _ in range(count):
        if pos + 34 > end:
            raise EnvelopeError("the key table is truncated")
        kid = data[pos : pos + 32]
        (wlen,) = struct.unpack_from(">H", data, pos + 32)
        pos += 34
        if pos + wlen > end:
            raise EnvelopeError("the key table is truncated")
        keys[kid.hex()] = bytes(data[pos : pos + wlen])
        pos += wlen
    if pos != end:
        raise EnvelopeError("the key table has trailing bytes")
    return Header(version, algorithm, chunk_size, plaintext_size, prefix, keys, bytes(data[:FIXED_SIZE]), end)


def header_size(prefix: bytes) -> int:
    """Given at least the first 36 bytes of a file, the number of bytes its whole header takes."""
    if len(prefix) < FIXED_SIZE + 4:
        raise EnvelopeError("the file is too short to be an encrypted recording")
    if prefix[:8] != MAGIC:
        raise EnvelopeError("not an encrypted recording (bad magic)")
    (table_len,) = struct.unpack_from(">I", prefix, FIXED_SIZE)
    if table_len > _MAX_TABLE:
        raise EnvelopeError(f"key table of {table_len} bytes is out of range")
    return FIXED_SIZE + 4 + table_len


def read_header(f: BinaryIO) -> Header:
    """Read and parse the header at the start of an open encrypted file."""
    f.seek(0)
    head = f.read(FIXED_SIZE + 4)
    size = header_size(head)
    rest = f.read(size - len(head))
    return parse_header(head + rest)


# --- chunks ---------------------------------------------------------------------------------------


def _aad(fixed: bytes, index: int, last: bool) -> bytes:
    return fixed + struct.pack(">QB", index, 1 if last else 0)


def _nonce(prefix: bytes, index: int) -> bytes:
    return prefix + struct.pack(">I", index)


def decrypt_chunk(header: Header, data_key: bytes, index: int, sealed: bytes) -> bytes:
    """Open chunk ``index`` (ciphertext + tag as stored); raises EnvelopeError if it does not
    authenticate (tampered, moved, from another file, or the wrong key)."""
    if not 0 <= index < header.chunk_count:
        raise EnvelopeError(f"chunk {index} does not exist (the file has {header.chunk_count})")
    expected = header.chunk_plain_size(index) + TAG_SIZE
    if len(sealed) != expected:
        raise EnvelopeError(
            f"chunk {index} is {len(sealed)} bytes, {expected} expected: the file is truncated"
        )
    last = index == header.chunk_count - 1
    try:
        return AESGCM(data_key).decrypt(
            _nonce(header.nonce_prefix, index), sealed, _aad(header.fixed, index, last)
        )
    except InvalidTag:
        raise EnvelopeError(
            f"chunk {index} fails authentication (tampered, reordered or wrong key)"
        ) from None
    except ValueError as exc:  # a data key of the wrong length
        raise EnvelopeError(f"cannot decrypt chunk {index}: {exc}") from None


def decrypt_range(
    f: BinaryIO, data_key: bytes, first: int, last: int, header: Header | None = None
) -> Iterator[bytes]:
    """Yield plaintext bytes ``first..last`` (inclusive) of an open encrypted file, chunk by chunk.

    Only the chunks covering the range are read and authenticated; ``header`` saves re-reading it.
    Raises EnvelopeError on any authentication failure or truncation.
    """
    h = header or read_header(f)
    if h.plaintext_size == 0 and first == 0 and last == -1:
        decrypt_chunk(h, data_key, 0, _read_exact(f, h.chunk_offset(0), TAG_SIZE))
        return
    c0, c1, _, _ = h.chunk_span(first, last)
    for index in range(c0, c1 + 1):
        sealed = _read_exact(f, h.chunk_offset(index), h.chunk_plain_size(index) + TAG_SIZE)
        plain = decrypt_chunk(h, data_key, index, sealed)
        base = index * h.chunk_size
        lo = max(first - base, 0)
        hi = min(last - base, len(plain) - 1)
        yield plain[lo : hi + 1]


def _read_exact(f: BinaryIO, offset: int, size: int) -> bytes:
    f.seek(offset)
    data = f.read(size)
    if len(data) != size:
        raise EnvelopeError(f"the file is truncated at byte {offset + len(data)}")
    return data


def decrypt_file(src: Path, dst: Path, data_key: bytes) -> Header:
    """Decrypt a whole file (checking every chunk and that nothing follows the last one)."""
    with open(src, "rb") as f, open(dst, "wb") as out:
        h = read_header(f)
        for piece in decrypt_range(f, data_key, 0, h.plaintext_size - 1, h):
            out.write(piece)
        f.seek(0, os.SEEK_END)
        if f.tell() != h.total_size:
            raise EnvelopeError(f"the file has {f.tell() - h.total_size} bytes after its last chunk")
    return h


# --- encryption -----------------------------------------------------------------------------------


def encrypt_file(
    src: Path, dst: Path, certificates: list[str], *, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> dict[str, object]:
    """Encrypt ``src`` into ``dst`` for the holders of the private keys of ``certificates``.

    ``certificates`` are PEM file paths (or PEM texts); each must pass :func:`load_certificate`.
    ``dst`` is written, flushed and fsynced; it is removed again if anything fails. Returns the
    metadata of the envelope (it never contains the data key)::

        {"algorithm", "version", "chunk_size", "key_ids", "plaintext_size", "plaintext_sha256"}
    """
    if not certificates:
        raise CertificateError("at least one certificate is needed to encrypt")
    if not 16 <= chunk_size <= MAX_CHUNK_SIZE:
        raise EnvelopeError(f"chunk size {chunk_size} is out of range")
    if len(certificates) > MAX_KEYS:
        raise CertificateError(f"at most {MAX_KEYS} certificates can wrap one recording")
    certs = [load_certificate(c) for c in certificates]
    data_key = AESGCM.generate_key(bit_length=256)
    wrapped: list[tuple[bytes, bytes]] = []
    for cert in certs:
        kid = cert.fingerprint(hashes.SHA256())
        if any(kid == k for k, _ in wrapped):
            continue
        wrapped.append((kid, wrap_key(data_key, cert)))
    prefix = os.urandom(8)
    plaintext_size = os.stat(src).st_size
    fixed, header = _build_header(chunk_size, plaintext_size, prefix, wrapped)
    aead = AESGCM(data_key)
    digest = hashlib.sha256()
    count = max(1, -(-plaintext_size // chunk_size))
    try:
        with open(src, "rb") as fin, open(dst, "wb") as fout:
            fout.write(header)
            for index in range(count):
                plain = fin.read(chunk_size)
                expected = min(chunk_size, plaintext_size - index * chunk_size)
                if len(plain) != expected:
                    raise EnvelopeError(f"{src} changed size while being encrypted")
                digest.update(plain)
                last = index == count - 1
                fout.write(aead.encrypt(_nonce(prefix, index), plain, _aad(fixed, index, last)))
            if fin.read(1):
                raise EnvelopeError(f"{src} grew while being encrypted")
            fout.flush()
            os.fsync(fout.fileno())
    except BaseException:
        Path(dst).unlink(missing_ok=True)
        raise
    return {
        "algorithm": ALGORITHM,
        "version": VERSION,
        "chunk_size": chunk_size,
        "key_ids": [kid.hex() for kid, _ in wrapped],
        "plaintext_size": plaintext_size,
        "plaintext_sha256": digest.hexdigest(),
    }


# --- re-wrapping (key rotation) -------------------------------------------------------------------


def encode_header(header: Header, wrapped_keys: dict[str, bytes]) -> bytes:
    """The bytes of ``header`` with its key table replaced by ``wrapped_keys`` (key id hex -> wrapped).

    The fixed 32 bytes are kept as they are, so every chunk still authenticates: only the key
    table, which is outside the associated data, changes. Raises EnvelopeError for an empty or
    oversized table or a malformed key id.
    """
    if not 1 <= len(wrapped_keys) <= MAX_KEYS:
        raise EnvelopeError(f"a key table holds 1 to {MAX_KEYS} wrapped keys, not {len(wrapped_keys)}")
    table: list[tuple[bytes, bytes]] = []
    for kid, wrapped in wrapped_keys.items():
        try:
            raw = bytes.fromhex(kid)
        except ValueError:
            raw = b""
        if len(raw) != 32:
            raise EnvelopeError(f"key id {kid!r} is not 64 hex digits")
        if not 1 <= len(wrapped) <= 1024:
            raise EnvelopeError(f"the wrapped key of {kid} has {len(wrapped)} bytes (1 to 1024 allowed)")
        table.append((raw, wrapped))
    body = b"".join(kid + struct.pack(">H", len(w)) + w for kid, w in table)
    return header.fixed + _TABLE_HEAD.pack(len(body) + 2, len(table)) + body


def rewrapped_keys(
    header: Header,
    data_key: bytes,
    certificates: list[x509.Certificate],
    drop: frozenset[str] | set[str] = frozenset(),
) -> dict[str, bytes]:
    """The key table ``header`` should have: its wrapped keys minus the key ids in ``drop``, plus
    ``data_key`` wrapped for each certificate whose key id is not in the table yet.

    Pure and idempotent: a table that already holds every certificate and none of ``drop`` comes
    back unchanged (existing wrapped keys are kept byte for byte; RSA-OAEP is randomised, so
    wrapping again would change them for nothing). The caller must have checked that ``data_key``
    is the recording's (it opens a chunk). Raises EnvelopeError when nothing would remain to open
    the recording with, or when the table would exceed MAX_KEYS.
    """
    if len(data_key) != KEY_SIZE:
        raise EnvelopeError(f"the data key has {len(data_key)} bytes, not {KEY_SIZE}")
    keys = {kid: w for kid, w in header.wrapped_keys.items() if kid not in drop}
    for cert in certificates:
        kid = key_id(cert)
        if kid in drop:
            raise EnvelopeError(f"key {kid} is both added and dropped")
        if kid not in keys:
            keys[kid] = wrap_key(data_key, cert)
    if not keys:
        raise EnvelopeError(
            "dropping "
            + ", ".join(sorted(header.wrapped_keys))
            + " would leave no key that opens the recording"
        )
    if len(keys) > MAX_KEYS:
        raise EnvelopeError(f"the key table would hold {len(keys)} wrapped keys, at most {MAX_KEYS} allowed")
    return keys

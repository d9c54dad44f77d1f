"""The Crypto Server's file keystore: tenants' RSA private keys with their certificates.

Layout: ``<keystore_dir>/<tenant>/<key_id>.pem``, one file per key, holding the private key (PKCS#8
PEM, unencrypted) followed by its X.509 certificate; ``key_id`` is the SHA-256 fingerprint of the
certificate (services/storage/envelope.py), so a recording's header names the file that opens it.

Every directory and file must belong to the daemon's user and give no permission at all to group or
others (0700 / 0600): :meth:`Keystore.check` refuses anything else with an error that says what to
fix, and every later read of a key file checks its file again (the other Crypto Server instance may
have added it). Keys are written atomically (temporary file with mode 0600, fsync, rename, fsync of
the directory), so two active instances sharing the directory never see half a key.

All methods block (file I/O, RSA): the daemon calls them in worker threads.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import stat
import threading
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from services.storage import envelope
from services.storage.disk import fsync_dir
from services.storage.envelope import EnvelopeError

log = logging.getLogger("callvault.crypto_server.keystore")

_TENANT_RE = re.compile(r"[a-z0-9][a-z0-9_\-]{0,62}")
_KEY_ID_RE = re.compile(r"[0-9a-f]{64}")
_PEM_RE = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n.*?-----END \1-----\r?\n?", re.S)
MAX_KEY_FILE = 64 * 1024
GENERATE_BITS = (2048, 3072, 4096)


class KeystoreError(Exception):
    """The keystore (or one file in it) is unsafe or unreadable; the message says what to fix."""


class UnknownKey(KeystoreError):
    """The tenant holds no key with this id."""


@dataclass(frozen=True)
class KeyInfo:
    """What may be said about a stored key: everything but the private key."""

    key_id: str
    certificate_pem: str
    subject: str
    not_valid_before: datetime
    not_valid_after: datetime
    bits: int

    def to_dict(self) -> dict[str, object]:
        return {
            "key_id": self.key_id,
            "subject": self.subject,
            "not_valid_before": self.not_valid_before.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "not_valid_after": self.not_valid_after.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "bits": self.bits,
            "certificate": self.certificate_pem,
        }


def valid_tenant(tenant: str) -> bool:
    return isinstance(tenant, str) and _TENANT_RE.fullmatch(tenant) is not None


def valid_key_id(key_id: str) -> bool:
    return isinstance(key_id, str) and _KEY_ID_RE.fullmatch(key_id) is not None


def _check_mode(path: Path, st: os.stat_result, kind: str) -> None:
    if st.st_uid != os.geteuid():
        raise KeystoreError(
            f"{kind} {path} belongs to uid {st.st_uid}, not to this daemon's uid {os.geteuid()}"
        )
    if stat.S_IMODE(st.st_mode) & 0o077:
        want = "700" if kind.endswith("directory") else "600"
        raise KeystoreError(
            f"{kind} {path} is accessible by group or others (mode {stat.S_IMODE(st.st_mode):03o}): chmod {want} {path}"
        )


def _split_pem(data: bytes) -> tuple[bytes, bytes]:
    """The private key block and the certificate block of a key file."""
    key = cert = b""
    for m in _PEM_RE.finditer(data):
        label = m.group(1)
        if label.endswith(b"PRIVATE KEY") and not key:
            key = m.group(0)
        elif label == b"CERTIFICATE" and not cert:
            cert = m.group(0)
    if not key or not cert:
        raise KeystoreError("a key file must hold a PEM private key and a PEM certificate")
    return key, cert


@dataclass
class _Loaded:
    private: rsa.RSAPrivateKey
    info: KeyInfo
    stamp: tuple[int, int, int]  # (inode, size, mtime_ns) of the file it came from


class Keystore:
    """Tenants' private keys under one directory (see the module docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._cache: dict[tuple[str, str], _Loaded] = {}
        self._lock = threading.Lock()

    # --- safety ---------------------------------------------------------------------------------

    def ensure_root(self) -> None:
        """Create the keystore directory (mode 0700) if it does not exist yet."""
        if not self.root.exists():
            self.root.mkdir(mode=0o700, parents=True)
            self.root.chmod(0o700)  # mkdir's mode is masked by the umask
            log.info("created the keystore directory %s (mode 700)", self.root)

    def check(self) -> int:
        """Check the whole keystore (owner, modes, every key file readable and consistent).

        Returns the number of keys; raises KeystoreError naming the first problem.
        """
        try:
            st = os.stat(self.root)
        except FileNotFoundError:
            raise KeystoreError(f"keystore directory {self.root} does not exist") from None
        if not stat.S_ISDIR(st.st_mode):
            raise KeystoreError(f"keystore {self.root} is not a directory")
        _check_mode(self.root, st, "keystore directory")
        count = 0
        for entry in sorted(self.root.iterdir()):
            if entry.name.startswith("."):
                continue
            est = os.lstat(entry)
            if not stat.S_ISDIR(est.st_mode) or not valid_tenant(entry.name):
                raise KeystoreError(f"{entry} is not a tenant directory (expected <tenant id>/ only)")
            _check_mode(entry, est, "tenant directory")
            for key_file in sorted(entry.iterdir()):
                if key_file.name.startswith("."):
                    continue
                if key_file.suffix != ".pem" or not valid_key_id(key_file.stem):
                    raise KeystoreError(f"{key_file} is not named <key id>.pem (64 hex digits)")
                self._load(entry.name, key_file.stem)
                count += 1
        return count

    def _path(self, tenant: str, key_id: str) -> Path:
        if not valid_tenant(tenant):
            raise UnknownKey(f"tenant {tenant!r} is not a valid tenant id")
        if not valid_key_id(key_id):
            raise UnknownKey(f"key id {key_id!r} is not 64 lower-case hex digits")
        return self.root / tenant / f"{key_id}.pem"

    def _load(self, tenant: str, key_id: str) -> _Loaded:
        path = self._path(tenant, key_id)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            raise UnknownKey(f"tenant {tenant!r} holds no key {key_id}") from None
        except OSError as exc:
            raise KeystoreError(f"key file {path} cannot be opened: {exc.strerror}") from None
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
            with self._lock:
                cached = self._cache.get((tenant, key_id))
            if cached is not None and cached.stamp == stamp:
                _check_mode(path, st, "key file")
                return cached
            if not stat.S_ISREG(st.st_mode):
                raise KeystoreError(f"key file {path} is not a regular file")
            _check_mode(path, st, "key file")
            data = f.read(MAX_KEY_FILE + 1)
        if len(data) > MAX_KEY_FILE:
            raise KeystoreError(f"key file {path} is larger than {MAX_KEY_FILE} bytes")
        try:
            key_pem, cert_pem = _split_pem(data)
            private = envelope.load_private_key(key_pem)
            # an expired certificate still opens the recordings made while it was valid
            cert = x509.load_pem_x509_certificate(cert_pem)
        except (KeystoreError, EnvelopeError, ValueError) as exc:
            raise KeystoreError(f"key file {path}: {exc}") from None
        if envelope.key_id(cert) != key_id:
            raise KeystoreError(f"key file {path} holds the certificate of key {envelope.key_id(cert)}")
        if not envelope.private_key_matches(private, cert):
            raise KeystoreError(f"key file {path}: the private key does not belong to the certificate")
        loaded = _Loaded(private, _info(cert), stamp)
        with self._lock:
            self._cache[(tenant, key_id)] = loaded
        return loaded

    # --- use ------------------------------------------------------------------------------------

    def unwrap(self, tenant: str, key_id: str, wrapped: bytes) -> bytes:
        """The data key ``wrapped`` with the tenant's key ``key_id``.

        Raises UnknownKey (the tenant has no such key), KeystoreError (the key file is unsafe or
        unreadable) or EnvelopeError (the wrapped key does not open with it).
        """
        loaded = self._load(tenant, key_id)
        return envelope.unwrap_with_private_key(wrapped, loaded.private)

    def unwrap_first(self, tenant: str, candidates: list[tuple[str, bytes]]) -> tuple[str, bytes]:
        """Unwrap with the first of ``candidates`` (key id, wrapped key) whose key the tenant holds.

        A held key that does not open its wrapped key does not stop the search; when nothing
        unwraps, that EnvelopeError is raised, else UnknownKey.
        """
        failure: EnvelopeError | None = None
        for key_id, wrapped in candidates:
            try:
                return key_id, self.unwrap(tenant, key_id, wrapped)
            except UnknownKey:
                continue
            except EnvelopeError as exc:
                failure = failure or exc
        if failure is not None:
            raise failure
        raise UnknownKey(f"tenant {tenant!r} holds none of the {len(candidates)} keys")

    def list(self, tenant: str) -> list[KeyInfo]:
        """The tenant's keys (certificates only), oldest validity first."""
        if not valid_tenant(tenant):
            raise UnknownKey(f"tenant {tenant!r} is not a valid tenant id")
        directory = self.root / tenant
        if not directory.is_dir():
            return []
        _check_mode(directory, os.stat(directory), "tenant directory")
        infos = [
            self._load(tenant, p.stem).info
            for p in sorted(directory.glob("*.pem"))
            if valid_key_id(p.stem) and not p.name.startswith(".")
        ]
        return sorted(infos, key=lambda i: (i.not_valid_before, i.key_id))

    def add(self, tenant: str, certificate_pem: bytes, private_key_pem: bytes) -> tuple[KeyInfo, bool]:
        """Store a certificate and its private key for ``tenant``; returns (info, created).

        The certificate must pass :func:`envelope.load_certificate` (RSA >= 2048, currently valid)
        and the private key must be its key. Adding a key that is already there changes nothing.
        """
        cert = envelope.load_certificate(certificate_pem)
        private = envelope.load_private_key(private_key_pem)
        if not envelope.private_key_matches(private, cert):
            raise EnvelopeError("the private key does not belong to the certificate")
        key_id = envelope.key_id(cert)
        path = self._path(tenant, key_id)
        with contextlib.suppress(UnknownKey):
            return self._load(tenant, key_id).info, False
        key_bytes = private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        cert_bytes = cert.public_bytes(serialization.Encoding.PEM)
        self._write(path, key_bytes + cert_bytes)
        log.info("stored key %s of tenant %s (%s)", key_id, tenant, cert.subject.rfc4514_string())
        return self._load(tenant, key_id).info, True

    def generate(self, tenant: str, *, bits: int = 3072, days: int = 825, common_name: str = "") -> KeyInfo:
        """Create a new RSA key pair and a self-signed certificate for ``tenant`` (key rotation)."""
        if bits not in GENERATE_BITS:
            raise EnvelopeError(f"bits must be one of {', '.join(map(str, GENERATE_BITS))}, not {bits!r}")
        if not 1 <= days <= 3650:
            raise EnvelopeError(f"days must be between 1 and 3650, not {days!r}")
        if not valid_tenant(tenant):
            raise UnknownKey(f"tenant {tenant!r} is not a valid tenant id")
        private = rsa.generate_private_key(public_exponent=65537, key_size=bits)
        now = datetime.now(UTC)
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "callvault"),
                x509.NameAttribute(
                    NameOID.COMMON_NAME, (common_name or f"{tenant} recordings {now:%Y-%m-%d}")[:64]
                ),
            ]
        )
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(private.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=days))
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=True,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(private, hashes.SHA256())
        )
        key_pem = private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        info, _ = self.add(tenant, cert.public_bytes(serialization.Encoding.PEM), key_pem)
        return info

    def _write(self, path: Path, data: bytes) -> None:
        self.ensure_root()
        directory = path.parent
        if not directory.exists():
            with contextlib.suppress(FileExistsError):
                directory.mkdir(mode=0o700)
                directory.chmod(0o700)
                fsync_dir(self.root)
        _check_mode(directory, os.stat(directory), "tenant directory")
        tmp = directory / f".tmp-{path.name}.{uuid.uuid4().hex}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(directory)


def _info(cert: x509.Certificate) -> KeyInfo:
    public = cert.public_key()
    bits = public.key_size if isinstance(public, rsa.RSAPublicKey) else 0
    return KeyInfo(
        key_id=envelope.key_id(cert),
        certificate_pem=cert.public_bytes(serialization.Encoding.PEM).decode(),
        subject=cert.subject.rfc4514_string(),
        not_valid_before=cert.not_valid_before_utc,
        not_valid_after=cert.not_valid_after_utc,
        bits=bits,
    )

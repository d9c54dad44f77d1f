"""Test certificates: self-signed RSA X.509 certificates and their private keys, made with `cryptography`.

RSA key generation takes ~50-200 ms per 2048-bit key, so keys are cached per process by label.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID


@dataclass(frozen=True)
class CertPair:
    """A certificate and its private key, both PEM."""

    cert_pem: bytes
    key_pem: bytes

    @property
    def key_id(self) -> str:
        cert = x509.load_pem_x509_certificate(self.cert_pem)
        return cert.fingerprint(hashes.SHA256()).hex()

    def write(self, directory: Path, name: str) -> tuple[Path, Path]:
        """Write ``name.crt`` and ``name.key`` (mode 0600) into ``directory``."""
        directory.mkdir(parents=True, exist_ok=True)
        crt, key = directory / f"{name}.crt", directory / f"{name}.key"
        crt.write_bytes(self.cert_pem)
        key.write_bytes(self.key_pem)
        key.chmod(0o600)
        return crt, key


@functools.cache
def _rsa_key(label: str, bits: int) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def make_cert(
    label: str = "a",
    *,
    bits: int = 2048,
    days: int = 365,
    not_before_days: int = -1,
    ec_key: bool = False,
) -> CertPair:
    """A self-signed certificate for ``label`` (same label and bits = same RSA key in this process)."""
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
    key = ec.generate_private_key(ec.SECP256R1()) if ec_key else _rsa_key(label, bits)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"callvault test {label}")])
    now = datetime.now(UTC)
    start = now + timedelta(days=not_before_days)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + timedelta(days=days) if days > 0 else now + timedelta(days=days))
        .sign(key, hashes.SHA256())
    )
    return CertPair(
        cert.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
    )

"""A self-signed TLS certificate for ``edge-gateway demo``, made with ``cryptography``.

The demo serves wss on this machine without any set-up, so it makes its own certificate
(an EC P-256 key; valid for ``localhost``, ``127.0.0.1`` and ``::1``) once and reuses it, so
that a browser or a client told to trust it keeps trusting it across demo runs. A
certificate that expires within 30 days, or that cannot be read, is made again.

Not for production: there the certificate comes from the plant's PKI (docs/configuration.md).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificatePublicKeyTypes,
    PublicKeyTypes,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CERT_FILE = "demo-cert.pem"
KEY_FILE = "demo-key.pem"
VALIDITY = datetime.timedelta(days=825)
RENEW_BEFORE = datetime.timedelta(days=30)
NAMES = ("localhost",)
ADDRESSES = ("127.0.0.1", "::1")


def demo_certificate(directory: Path) -> tuple[Path, Path, bool]:
    """``(cert, key, made)``: the demo's certificate and key files in ``directory``, made
    now (``made``) unless a usable pair is there already. Raises ``OSError``."""
    cert, key = directory / CERT_FILE, directory / KEY_FILE
    if _usable(cert, key):
        return cert, key, False
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    private_key = ec.generate_private_key(ec.SECP256R1())
    _write(
        key,
        private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        mode=0o600,
    )
    _write(cert, _certificate(private_key).public_bytes(serialization.Encoding.PEM), mode=0o644)
    return cert, key, True


def _certificate(key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edge-gateway demo")])
    now = datetime.datetime.now(datetime.UTC)
    public = key.public_key()
    alternatives: list[x509.GeneralName] = [x509.DNSName(n) for n in NAMES]
    alternatives += [x509.IPAddress(ipaddress.ip_address(a)) for a in ADDRESSES]
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.SubjectAlternativeName(alternatives), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )


def _usable(cert: Path, key: Path) -> bool:
    """Whether both files can be read, the key is the certificate's, and the certificate is
    valid for more than ``RENEW_BEFORE``."""
    try:
        loaded = x509.load_pem_x509_certificate(cert.read_bytes())
        private = serialization.load_pem_private_key(key.read_bytes(), password=None)
    except (OSError, ValueError, TypeError):
        return False
    if _public(loaded.public_key()) != _public(private.public_key()):
        return False  # one of the pair was replaced: a server could not use them together
    left = loaded.not_valid_after_utc - datetime.datetime.now(datetime.UTC)
    return left > RENEW_BEFORE


def _public(key: CertificatePublicKeyTypes | PublicKeyTypes) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _write(path: Path, data: bytes, *, mode: int) -> None:
    temporary = path.with_name(path.name + ".new")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(temporary, path)

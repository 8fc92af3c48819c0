"""The demo's self-signed certificate: made once, reused while usable, made again otherwise."""

from __future__ import annotations

from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.selfsigned import demo_certificate


def test_a_usable_pair_is_reused(tmp_path: Path) -> None:
    cert, key, made = demo_certificate(tmp_path)
    assert made
    before = cert.read_bytes(), key.read_bytes()
    assert demo_certificate(tmp_path) == (cert, key, False)
    assert (cert.read_bytes(), key.read_bytes()) == before


def test_a_key_that_is_not_the_certificates_makes_a_new_pair(tmp_path: Path) -> None:
    cert, key, _ = demo_certificate(tmp_path)
    old_cert = cert.read_bytes()
    other = ec.generate_private_key(ec.SECP256R1())
    key.write_bytes(
        other.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    assert demo_certificate(tmp_path) == (cert, key, True)
    assert cert.read_bytes() != old_cert
    loaded = x509.load_pem_x509_certificate(cert.read_bytes())
    private = serialization.load_pem_private_key(key.read_bytes(), password=None)
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    assert loaded.public_key().public_bytes(*spki) == private.public_key().public_bytes(*spki)
    assert demo_certificate(tmp_path)[2] is False


def test_an_unreadable_pair_is_made_again(tmp_path: Path) -> None:
    cert = demo_certificate(tmp_path)[0]
    cert.write_text("not a certificate")
    assert demo_certificate(tmp_path)[2] is True

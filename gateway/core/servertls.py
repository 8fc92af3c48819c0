"""TLS for the gateway's servers (the wss device plane, the HTTPS API): one way to build the
server context from a config section's certificate, key and optional client CA, and one set
of checks that turn what is wrong with those files into config errors.

Depends on the standard library and ``gateway.core.configtypes`` only.
"""

from __future__ import annotations

import ipaddress
import ssl
from collections.abc import Iterator, Sequence
from typing import Protocol

from gateway.core.configtypes import Secret


class TlsFiles(Protocol):
    """What a server section holds for TLS."""

    @property
    def tls_cert_file(self) -> Secret | None: ...

    @property
    def tls_key_file(self) -> Secret | None: ...

    @property
    def client_ca_file(self) -> Secret | None: ...


class EncryptedKey(ValueError):
    """The TLS key file asks for a passphrase."""


class ClientCaError(ValueError):
    """``client_ca_file`` holds no usable CA certificate."""


def _no_passphrase() -> str:
    # Without a callback OpenSSL would prompt on the terminal, and a service has none.
    raise EncryptedKey("the key has a passphrase")


def server_context(files: TlsFiles, *, alpn: Sequence[str] = ()) -> ssl.SSLContext:
    """The server's TLS context (TLS 1.2 or newer). With ``client_ca_file``, every client
    must present a certificate that CA signed (mTLS).

    Reads the certificate and key from their files, so a new context picks up a rotated
    certificate. Raises ``ssl.SSLError`` / ``OSError``, ``EncryptedKey``, ``ClientCaError``."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # No renegotiation (a denial-of-service lever, and gone in TLS 1.3): so a write never has
    # to wait for the peer (gateway/fastsend.py relies on it).
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    if alpn:
        context.set_alpn_protocols(list(alpn))
    load_certificate(context, files)
    if files.client_ca_file is not None:
        try:
            context.load_verify_locations(cadata=files.client_ca_file.reveal())
        except (ssl.SSLError, ValueError) as e:
            raise ClientCaError(getattr(e, "reason", None) or str(e)) from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def load_certificate(context: ssl.SSLContext, files: TlsFiles) -> None:
    """Load the certificate and key into ``context`` (again, on a reload)."""
    if files.tls_cert_file is None or files.tls_key_file is None:
        raise ValueError("TLS needs tls_cert_file and tls_key_file")
    context.load_cert_chain(
        files.tls_cert_file.source, files.tls_key_file.source, password=_no_passphrase
    )


def plain_or_tls_problems(
    files: TlsFiles, *, plain: bool, scheme: str, missing: str
) -> Iterator[tuple[str, str]]:
    """``plain`` with TLS files set (which would be ignored), or TLS without its files;
    ``scheme`` is the plain one (``ws``, ``http``), ``missing`` the message for a missing
    certificate or key."""
    keys = ("tls_cert_file", "tls_key_file", "client_ca_file")
    if plain:
        for key in keys:
            if getattr(files, key) is not None:
                yield (
                    key,
                    f"is set, but plain = true serves {scheme}:// without TLS: remove one of them",
                )
    else:
        for key in keys[:2]:
            if getattr(files, key) is None:
                yield key, missing


def tls_problems(files: TlsFiles, *, ca_signs: str) -> Iterator[tuple[str, str]]:
    """What is wrong with the certificate, key and client CA, as ``(key, message)`` pairs;
    ``ca_signs`` says whose certificates the client CA signs (for its message)."""
    if files.tls_cert_file is None or files.tls_key_file is None:
        return
    if "-----BEGIN CERTIFICATE-----" not in files.tls_cert_file.reveal():
        yield (
            "tls_cert_file",
            "holds no PEM certificate (-----BEGIN CERTIFICATE-----): give the server "
            "certificate in PEM form, followed by its chain",
        )
        return
    if "PRIVATE KEY-----" not in files.tls_key_file.reveal():
        yield (
            "tls_key_file",
            "holds no PEM private key (-----BEGIN PRIVATE KEY-----): give the private "
            "key of tls_cert_file in PEM form",
        )
        return
    try:
        server_context(files)
    except EncryptedKey:
        yield (
            "tls_key_file",
            "is encrypted (has a passphrase): the gateway starts unattended; store the key "
            "without one (openssl pkey -in key.pem -out plain.pem) with mode 0600",
        )
    except ClientCaError as e:
        yield (
            "client_ca_file",
            f"is not a PEM CA certificate ({e}): give the CA that signs {ca_signs}",
        )
    except ssl.SSLError as e:
        if e.reason == "KEY_VALUES_MISMATCH":
            yield (
                "tls_key_file",
                "is not the private key of tls_cert_file: give the key the certificate "
                "was issued for",
            )
        else:
            yield (
                "tls_cert_file",
                f"cannot be loaded with tls_key_file ({e.reason or e}): give the server "
                "certificate (PEM, with its chain) and its own private key (PEM)",
            )
    except OSError as e:
        yield "tls_cert_file", f"cannot be read: {e.strerror or e}"


def ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """``text`` as an IP address, or None when it is not one (a host name)."""
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def host_port(host: str, port: int) -> str:
    """``host:port``, with an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

"""STARTTLS: the server's SSL context from a configured certificate, or a self-signed one
generated for local use, and what a session negotiated."""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
from pathlib import Path
from typing import Any


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    # TLS 1.0/1.1 are broken and deprecated (RFC 8996); mail servers all speak 1.2+.
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert), str(key))
    # Clients present no certificate to a submission/relay port; aiosmtpd warns otherwise.
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def client_context(verify: bool, ca_file: str = "") -> ssl.SSLContext:
    """The relay's context for STARTTLS to a next hop. ``verify``: the certificate must
    chain to ``ca_file`` (else the system's CAs) and name the host; otherwise any
    certificate is taken (encryption without authentication, RFC 7435)."""
    if verify:
        ctx = ssl.create_default_context(cafile=ca_file or None)
    else:
        if ca_file:
            raise ValueError(
                "MAILMETA_RELAY_TLS_CA_FILE is set but MAILMETA_RELAY_TLS_VERIFY is off: "
                "set MAILMETA_RELAY_TLS_VERIFY=true to verify next hops against it"
            )
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def self_signed(directory: Path, hostname: str) -> tuple[Path, Path]:
    """A self-signed EC certificate for ``hostname`` in ``directory`` (reused when present)."""
    cert_path, key_path = directory / "selfsigned.crt", directory / "selfsigned.key"
    if cert_path.exists() and key_path.exists():
        return cert_path, key_path
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname[:64] or "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    alt: list[x509.GeneralName] = [x509.DNSName(hostname or "localhost"), x509.DNSName("localhost")]
    alt.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_bytes = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # The key is written owner-only from the start, never world-readable for a moment.
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key_bytes)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def tls_info(ssl_extra: Any) -> tuple[str | None, str | None]:
    """(version, cipher) of a session's TLS layer (aiosmtpd's ``session.ssl``), or Nones."""
    if not isinstance(ssl_extra, dict):
        return None, None
    obj = ssl_extra.get("ssl_object")
    if obj is None:
        return None, None
    version = obj.version()
    cipher = obj.cipher()
    return (str(version) if version else None), (str(cipher[0]) if cipher else None)

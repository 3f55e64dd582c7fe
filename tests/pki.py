"""A throwaway certificate authority for the TLS tests, made with `cryptography`: a CA, a server
certificate for localhost and 127.0.0.1, and a client certificate, written as PEM files.

The server certificate may also be used as a client's (serverAuth and clientAuth): etcd's JSON
gateway connects to etcd's own client port with it, so an etcd that requires client certificates
answers through its gateway only with such a certificate. A second client certificate has no
CommonName: while etcd's auth is on, etcd 3.4's gateway refuses a client certificate with one
(gRPC clients are authenticated as their certificate's CommonName; the gateway would ignore it).
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def certificate(subject: str | None, key, issuer_name, issuer_key, *, ca: bool, usage) -> x509.Certificate:
    """Signed by `issuer_key` (itself when `issuer_name` is None); `subject` None: no CommonName at all."""
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)] if subject is not None else [])
    builder = (x509.CertificateBuilder()
               .subject_name(name)
               .issuer_name(issuer_name or name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=subject is None)  # the only name of a certificate with an empty subject (RFC 5280)
        builder = builder.add_extension(x509.ExtendedKeyUsage(usage), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def write_pki(directory: Path, ca_name: str = "test-ca") -> dict:
    """{"ca": (cert, key), "server": (...), "client": (...), "anonymous_client": (...), "dir": directory}:
    PEM files' paths; the anonymous client's certificate has no CommonName."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = certificate(ca_name, ca_key, None, ca_key, ca=True, usage=[])
    files: dict = {}

    def write(name: str, cert: x509.Certificate, key) -> None:
        (directory / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (directory / f"{name}.key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        files[name] = (str(directory / f"{name}.crt"), str(directory / f"{name}.key"))

    write("ca", ca, ca_key)
    for name, subject, usage in (
            ("server", "server", [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            ("client", "client", [ExtendedKeyUsageOID.CLIENT_AUTH]),
            ("anonymous_client", None, [ExtendedKeyUsageOID.CLIENT_AUTH])):
        key = ec.generate_private_key(ec.SECP256R1())
        write(name, certificate(subject, key, ca.subject, ca_key, ca=False, usage=usage), key)
    files["dir"] = directory
    return files

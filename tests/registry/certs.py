"""Test PKI made with ``cryptography``: a CA, a server certificate for
127.0.0.1/localhost, and a token-signing certificate."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write(path: Path, key: rsa.RSAPrivateKey, cert: x509.Certificate) -> tuple[Path, Path]:
    cert_path, key_path = path.with_suffix(".crt"), path.with_suffix(".key")
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


def _builder(subject: str, issuer: x509.Name, public_key) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
    )


@dataclass
class Pem:
    cert_path: Path
    key_path: Path
    key: rsa.RSAPrivateKey
    cert: x509.Certificate


def make_ca(directory: Path, name: str = "crfs test CA") -> Pem:
    key = _key()
    cert = (
        _builder(name, _name(name), key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
        .sign(key, hashes.SHA256())
    )
    return Pem(*_write(directory / "ca", key, cert), key, cert)


def make_server_cert(directory: Path, ca: Pem, hosts: tuple[str, ...] = ("127.0.0.1", "localhost")) -> Pem:
    """A server certificate for ``hosts`` (IPs or DNS names) signed by ``ca``."""
    key = _key()
    names: list[x509.GeneralName] = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    cert = (
        _builder(hosts[0], ca.cert.subject, key.public_key())
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    return Pem(*_write(directory / "server", key, cert), key, cert)


def make_signing_cert(directory: Path, name: str = "crfs test token signer") -> Pem:
    """A self-signed certificate whose key signs tokens; it goes in the
    registry's rootcertbundle and in each token's ``x5c`` header."""
    key = _key()
    cert = _builder(name, _name(name), key.public_key()).sign(key, hashes.SHA256())
    return Pem(*_write(directory / "token-signer", key, cert), key, cert)

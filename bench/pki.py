"""A throwaway PKI for etcd with TLS, as production runs it: one CA, a server and a client pair.

``make_pki(directory, hosts)`` writes PEM files and returns their paths::

    {"ca": ".../ca.pem", "ca_key": ".../ca-key.pem",
     "server": ".../server.pem", "server_key": ".../server-key.pem",
     "client": ".../client.pem", "client_key": ".../client-key.pem"}

Keys are ECDSA P-256 (what ``cfssl`` makes by default for etcd), certificates are signed by the CA
and valid for two days. The server certificate names every host given (IP addresses and DNS names)
plus 127.0.0.1 and localhost, and is good for both server and client auth (etcd peers use it both
ways). Private keys are written 0600.
"""
from __future__ import annotations

import datetime
import ipaddress
import os
from typing import Iterable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALIDITY = datetime.timedelta(days=2)
CLOCK_SKEW = datetime.timedelta(hours=1)
DEFAULT_HOSTS = ("127.0.0.1", "localhost")


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "weft test PKI"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _san(hosts: Iterable[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    seen = set()
    for host in hosts:
        if not host or host in seen:
            continue
        seen.add(host)
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _write(path: str, data: bytes, private: bool = False) -> str:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _leaf(ca_cert, ca_key, cn: str, usages, hosts: Iterable[str] | None, now):
    key = _key()
    builder = (x509.CertificateBuilder()
               .subject_name(_name(cn))
               .issuer_name(ca_cert.subject)
               .public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - CLOCK_SKEW)
               .not_valid_after(now + VALIDITY)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=True,
                                            content_commitment=False, data_encipherment=False,
                                            key_agreement=False, key_cert_sign=False,
                                            crl_sign=False, encipher_only=False,
                                            decipher_only=False), critical=True)
               .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                              critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                   ca_key.public_key()), critical=False))
    if hosts is not None:
        builder = builder.add_extension(_san(hosts), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def make_pki(directory: str, hosts: Iterable[str] = (), client_cn: str = "weft-client") -> dict:
    """Write a CA, a server pair (SANs: ``hosts`` + 127.0.0.1 + localhost) and a client pair."""
    os.makedirs(directory, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = _key()
    ca_name = _name("weft test CA")
    ca_cert = (x509.CertificateBuilder()
               .subject_name(ca_name)
               .issuer_name(ca_name)
               .public_key(ca_key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - CLOCK_SKEW)
               .not_valid_after(now + VALIDITY)
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False,
                                            content_commitment=False, data_encipherment=False,
                                            key_agreement=False, key_cert_sign=True,
                                            crl_sign=True, encipher_only=False,
                                            decipher_only=False), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                              critical=False)
               .sign(ca_key, hashes.SHA256()))
    server_hosts = list(hosts) + list(DEFAULT_HOSTS)
    server_cert, server_key = _leaf(
        ca_cert, ca_key, "weft-etcd-server",
        [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH], server_hosts, now)
    client_cert, client_key = _leaf(ca_cert, ca_key, client_cn,
                                    [ExtendedKeyUsageOID.CLIENT_AUTH], None, now)
    j = lambda name: os.path.join(directory, name)  # noqa: E731
    return {
        "ca": _write(j("ca.pem"), _cert_pem(ca_cert)),
        "ca_key": _write(j("ca-key.pem"), _key_pem(ca_key), private=True),
        "server": _write(j("server.pem"), _cert_pem(server_cert)),
        "server_key": _write(j("server-key.pem"), _key_pem(server_key), private=True),
        "client": _write(j("client.pem"), _cert_pem(client_cert)),
        "client_key": _write(j("client-key.pem"), _key_pem(client_key), private=True),
    }

"""A private CA and per-host certificates for the migration stream's mutual TLS.

Created on first use so a fresh clone needs no setup; every host agent on one machine shares one
PKI directory, and the CA is the only trust root either side accepts. Two processes may call this
at once: a lock file serialises creation and every file is written to a temporary name and renamed.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import ipaddress
import os
import re
import secrets
import ssl
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_VALIDITY = dt.timedelta(days=3650)
HOST_VALIDITY = dt.timedelta(days=825)
RENEW_BEFORE = dt.timedelta(days=30)  # reissue a host certificate this close to expiry
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_NAME = re.compile(rf"^{_LABEL}(?:\.{_LABEL})*$")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write via a temporary file in the same directory and rename: readers never see half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp)
        raise


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    fmt = serialization.PrivateFormat.PKCS8
    return key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())


def _same_key(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> bool:
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return cert.public_key().public_bytes(*fmt) == key.public_key().public_bytes(*fmt)


@dataclass(frozen=True)
class Pki:
    """The CA in `directory` (ca.pem, ca.key) and the host certificates it issued (NAME.pem, NAME.key)."""

    directory: Path
    ca_cert: x509.Certificate
    ca_key: ec.EllipticCurvePrivateKey

    @property
    def ca_path(self) -> Path:
        return self.directory / "ca.pem"

    def issue(self, name: str, extra_ips: Iterable[str] = ()) -> tuple[Path, Path]:
        """Certificate and key paths for host `name`; reused when valid, signed by this CA and for the same IPs."""
        if not _NAME.match(name) or name.lower() == "ca":
            raise ValueError(f"host name {name!r} must be a DNS name (letters, digits, '-', '.') and not 'ca'")
        ips = sorted({ipaddress.ip_address("127.0.0.1"), *(ipaddress.ip_address(i) for i in extra_ips)}, key=str)
        cert_path, key_path = self.directory / f"{name}.pem", self.directory / f"{name}.key"
        with _locked(self.directory):
            if self._reusable(cert_path, key_path, name, ips):
                return cert_path, key_path
            key = ec.generate_private_key(ec.SECP256R1())
            now = _now()
            san = [x509.DNSName(name), *([x509.DNSName("localhost")] if name != "localhost" else [])]
            san += [x509.IPAddress(ip) for ip in ips]
            ca_ski = self.ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
            cert = (
                x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                .issuer_name(self.ca_cert.subject)
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5))
                .not_valid_after(min(now + HOST_VALIDITY, self.ca_cert.not_valid_after_utc))
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(
                    x509.KeyUsage(
                        digital_signature=True, content_commitment=False, key_encipherment=False,
                        data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                        encipher_only=False, decipher_only=False,
                    ),
                    critical=True,
                )
                .add_extension(
                    x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                    critical=False,
                )
                .add_extension(x509.SubjectAlternativeName(san), critical=False)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
                .sign(self.ca_key, hashes.SHA256())
            )
            # key first: a crash between the two leaves a cert that does not match, which is reissued
            _write_atomic(key_path, _key_pem(key), 0o600)
            _write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        return cert_path, key_path

    def _reusable(self, cert_path: Path, key_path: Path, name: str, ips: list) -> bool:
        try:
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            cert.verify_directly_issued_by(self.ca_cert)
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except (OSError, ValueError, TypeError, InvalidSignature, x509.ExtensionNotFound):
            return False
        return (
            isinstance(key, ec.EllipticCurvePrivateKey)
            and _same_key(cert, key)
            and cert.not_valid_after_utc - RENEW_BEFORE > _now()
            and name in san.get_values_for_type(x509.DNSName)
            and sorted(san.get_values_for_type(x509.IPAddress), key=str) == ips
        )


def ensure_pki(directory: str | os.PathLike) -> Pki:
    """Load the CA in `directory`, creating it (EC P-256, self-signed, 10 years) on first use."""
    d = Path(directory)
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    with _locked(d):
        ca_pem, ca_key = d / "ca.pem", d / "ca.key"
        try:
            cert = x509.load_pem_x509_certificate(ca_pem.read_bytes())
            key = serialization.load_pem_private_key(ca_key.read_bytes(), password=None)
            if isinstance(key, ec.EllipticCurvePrivateKey) and _same_key(cert, key):
                return Pki(d, cert, key)
        except (OSError, ValueError, TypeError):
            pass  # missing or half-created: make a new CA (host certificates from an old one get reissued)
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        subject = x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "nvme-lm"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"nvme-lm migration CA {secrets.token_hex(4)}"),
        ])
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + CA_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                    encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        _write_atomic(ca_key, _key_pem(key), 0o600)
        _write_atomic(ca_pem, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        return Pki(d, cert, key)


def _context(purpose: int, pki: Pki, name: str, extra_ips: Iterable[str] = ()) -> ssl.SSLContext:
    ctx = ssl.SSLContext(purpose)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=str(pki.ca_path))  # the only trust root: no system CAs
    cert, key = pki.issue(name, extra_ips)
    ctx.load_cert_chain(str(cert), str(key))
    return ctx


def server_context(pki: Pki, name: str, extra_ips: Iterable[str] = ()) -> ssl.SSLContext:
    """TLS >= 1.2 server context for host `name` that requires a client certificate from our CA.
    `extra_ips`: as for `Pki.issue` (the same on every call for a host, or its certificate is reissued)."""
    return _context(ssl.PROTOCOL_TLS_SERVER, pki, name, extra_ips)


def client_context(pki: Pki, name: str, extra_ips: Iterable[str] = ()) -> ssl.SSLContext:
    """TLS >= 1.2 client context for host `name`: presents its certificate, verifies the server's (name included)."""
    ctx = _context(ssl.PROTOCOL_TLS_CLIENT, pki, name, extra_ips)
    ctx.check_hostname = True
    return ctx

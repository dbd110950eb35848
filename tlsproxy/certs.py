"""Certificates: checking a cert/key pair and generating a private CA + leaf."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# CA/Browser Forum and Apple cap leaf lifetimes well below this; strict clients
# refuse longer ones, so gen-cert never issues more.
MAX_LEAF_DAYS = 366


class CertificateError(Exception):
    pass


@dataclass(frozen=True, slots=True)
class CertInfo:
    subject: str
    not_after: dt.datetime
    names: tuple[str, ...] = ()  # DNS names of the SAN, lower case, as SNI matches them


def load_chain(cert_path: Path) -> list[x509.Certificate]:
    try:
        data = Path(cert_path).read_bytes()
    except OSError as exc:
        raise CertificateError(f"key 'cert': cannot read {cert_path}: {exc.strerror or exc}") from None
    try:
        chain = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise CertificateError(f"key 'cert': {cert_path} holds no PEM certificate") from None
    return chain


def check_pair(cert_path: Path, key_path: Path) -> CertInfo:
    """Check that both files load and that the key belongs to the first
    certificate; return what the metrics need to know about it."""
    chain = load_chain(cert_path)
    try:
        key_data = Path(key_path).read_bytes()
    except OSError as exc:
        raise CertificateError(f"key 'key': cannot read {key_path}: {exc.strerror or exc}") from None
    try:
        key = serialization.load_pem_private_key(key_data, password=None)
    except (ValueError, TypeError) as exc:
        raise CertificateError(f"key 'key': {key_path} is not an unencrypted PEM private key ({exc})") from None
    pub = chain[0].public_key()
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(serialization.Encoding.DER, spki) != pub.public_bytes(
        serialization.Encoding.DER, spki
    ):
        raise CertificateError(f"key 'key': {key_path} does not match the certificate in {cert_path}")
    leaf = chain[0]
    return CertInfo(
        subject=leaf.subject.rfc4514_string(), not_after=leaf.not_valid_after_utc, names=_dns_names(leaf)
    )


def _dns_names(cert: x509.Certificate) -> tuple[str, ...]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    return tuple(dict.fromkeys(name.lower() for name in san.get_values_for_type(x509.DNSName)))


def sni_index(infos: list[CertInfo]) -> dict[str, int]:
    """Server name (exact or ``*.domain``) -> index of the certificate that
    serves it. Two certificates claiming one name is an error: which one a
    client gets must not depend on file order."""
    index: dict[str, int] = {}
    for i, info in enumerate(infos):
        if not info.names:
            raise CertificateError(f"tls.certificates[{i}]: no DNS name in the SAN to select it by")
        for name in info.names:
            if name in index:
                first = f"tls.certificates[{index[name]}]"
                raise CertificateError(f"tls.certificates[{i}]: {name!r} is already served by {first}")
            index[name] = i
    return index


def load_ca_file(path: Path) -> None:
    """Check that a CA bundle (client_ca) holds at least one PEM certificate."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise CertificateError(f"key 'client_ca': cannot read {path}: {exc.strerror or exc}") from None
    try:
        x509.load_pem_x509_certificates(data)
    except ValueError:
        raise CertificateError(f"key 'client_ca': {path} holds no PEM certificate") from None


# ---------------------------------------------------------------- generation


@dataclass(frozen=True, slots=True)
class GeneratedFiles:
    cert: Path  # leaf then CA: what a server presents
    key: Path
    ca_cert: Path  # what a client trusts


def _new_key(kind: str):
    if kind == "ecdsa":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raise ValueError(f"unknown key type {kind!r} (ecdsa or rsa)")


def _write_private(path: Path, data: bytes) -> None:
    # Created 0600 from the start: no window where the key is world-readable.
    # An existing file keeps its mode through O_CREAT: narrow it before the
    # new key is written, not after.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(data)


def _san(hostname: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(hostname))
    except ValueError:
        return x509.DNSName(hostname)


def generate(
    out_dir: Path, hostname: str | list[str], key_type: str = "ecdsa", days: int = 365, usage: str = "server"
) -> GeneratedFiles:
    """Write a private CA and a leaf for ``hostname`` (one name or several:
    the first is the subject CN, all go in the SAN) signed by it:
    ``cert.pem`` (leaf + CA), ``key.pem`` (leaf key, 0600), ``ca.pem``,
    ``ca-key.pem`` (0600). ``usage="client"`` makes a client certificate
    (extended key usage clientAuth) for mTLS."""
    if not 1 <= days <= MAX_LEAF_DAYS:
        raise ValueError(f"days must be 1-{MAX_LEAF_DAYS}")
    eku = {"server": ExtendedKeyUsageOID.SERVER_AUTH, "client": ExtendedKeyUsageOID.CLIENT_AUTH}[usage]
    names = [hostname] if isinstance(hostname, str) else list(hostname)
    hostname = names[0]
    out_dir.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)  # clock skew

    ca_key = _new_key(key_type)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"tlsproxy private CA for {hostname}")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    leaf_key = _new_key(key_type)
    is_rsa = key_type == "rsa"
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)]))
        .issuer_name(ca_name)
        .public_key(leaf_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            # RSA key exchange is never offered, but TLS 1.2 RSA certs still
            # sign; keyEncipherment is kept for old clients that insist on it.
            x509.KeyUsage(True, False, is_rsa, False, False, False, False, False, False), critical=True
        )
        .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        .add_extension(x509.SubjectAlternativeName([_san(n) for n in names]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(leaf_key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )

    pem = serialization.Encoding.PEM
    pkcs8 = serialization.PrivateFormat.PKCS8
    files = GeneratedFiles(out_dir / "cert.pem", out_dir / "key.pem", out_dir / "ca.pem")
    files.cert.write_bytes(leaf.public_bytes(pem) + ca_cert.public_bytes(pem))
    files.ca_cert.write_bytes(ca_cert.public_bytes(pem))
    nocrypt = serialization.NoEncryption()
    _write_private(files.key, leaf_key.private_bytes(pem, pkcs8, nocrypt))
    _write_private(out_dir / "ca-key.pem", ca_key.private_bytes(pem, pkcs8, nocrypt))
    return files

"""TLS policy: one place builds every server-side SSLContext.

Defaults follow Mozilla's "intermediate" profile tightened to forward-secret
AEAD suites: TLS 1.2 minimum; on TLS 1.2 only ECDHE with AES-GCM or
ChaCha20-Poly1305; key exchange groups X25519, P-256, P-384; no compression;
no renegotiation.
"""

from __future__ import annotations

import ctypes
import os
import ssl
import weakref
from functools import partial
from pathlib import Path

from cryptography import x509

from .certs import CertInfo, CertificateError, check_pair, sni_index
from .config import TlsSettings

TLS12_CIPHERS = ":".join(
    [
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    ]
)
GROUPS = "X25519:P-256:P-384"
_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


def server_context(settings: TlsSettings) -> ssl.SSLContext:
    """A server context for one listener: the default certificate, plus an SNI
    callback that switches the connection to the context of the certificate
    naming the requested server. Raises CertificateError/ssl.SSLError/OSError
    when the files do not load (config validation has normally caught that)."""
    _, infos = served_certificates(settings)
    contexts = [_context(settings, pair.cert, pair.key) for pair in settings.certificates]
    by_name = {name: contexts[i] for name, i in sni_index(infos).items()}
    default = _context(settings, settings.cert, settings.key)
    default.sni_callback = partial(_select_certificate, by_name)
    return default


def served_certificates(settings: TlsSettings) -> tuple[CertInfo, list[CertInfo]]:
    """The default certificate and the SNI ones, checked pair by pair (for
    the expiry metrics); raises CertificateError."""
    default = check_pair(settings.cert, settings.key)
    infos = []
    for i, pair in enumerate(settings.certificates):
        try:
            infos.append(check_pair(pair.cert, pair.key))
        except CertificateError as exc:
            raise CertificateError(f"tls.certificates[{i}]: {exc}") from None
    return default, infos


def _context(settings: TlsSettings, cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = _VERSIONS[settings.min_version]
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.options |= (
        ssl.OP_NO_COMPRESSION
        | ssl.OP_NO_RENEGOTIATION
        | ssl.OP_CIPHER_SERVER_PREFERENCE
        | ssl.OP_SINGLE_ECDH_USE
    )
    ctx.load_cert_chain(str(cert), str(key))
    if settings.client_ca is not None:
        # Every context of a listener verifies alike: after an SNI switch the
        # connection keeps the verify mode of the context it started with.
        ctx.load_verify_locations(cafile=str(settings.client_ca))
        ctx.verify_mode = ssl.CERT_OPTIONAL if settings.client_auth == "optional" else ssl.CERT_REQUIRED
    _set_groups(ctx, GROUPS)
    return ctx


# The server name each connection asked for, kept beside (not on) the ssl
# module's object and dropped with it.
_requested_names: "weakref.WeakKeyDictionary[ssl.SSLObject, str]" = weakref.WeakKeyDictionary()


def _select_certificate(
    by_name: dict[str, ssl.SSLContext], conn: ssl.SSLObject, server_name: str | None, _: ssl.SSLContext
) -> None:
    if server_name is None:
        return  # no SNI: the default certificate
    name = server_name.lower().rstrip(".")
    _requested_names[conn] = name
    # An exact name wins; "*.example.com" covers exactly one more label.
    chosen = by_name.get(name) or by_name.get("*." + name.partition(".")[2])
    if chosen is not None:
        conn.context = chosen


def requested_server_name(stream) -> str | None:
    """The SNI a client sent (lower case), None without SNI; the name was
    recorded against the stream's ssl object during the handshake."""
    return _requested_names.get(stream.ssl_object)


def client_certificate_subject(stream) -> str | None:
    """RFC 4514 subject of the client certificate the handshake verified
    (mTLS), None when the client sent none."""
    der = stream.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der).subject.rfc4514_string() if der else None


def watched_files(settings: TlsSettings) -> list[Path]:
    """Every file a listener's contexts are built from."""
    paths = [settings.cert, settings.key]
    for pair in settings.certificates:
        paths += [pair.cert, pair.key]
    if settings.client_ca is not None:
        paths.append(settings.client_ca)
    return paths


def files_state(paths: list[Path]) -> tuple:
    """A fingerprint that changes when any file is rewritten or replaced:
    inode, size and mtime of the target, and where symlinks lead (certbot
    repoints live/ links; cert-manager swaps a ..data link)."""
    state = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError as exc:
            state.append((str(path), exc.errno))
        else:
            state.append((os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(state)


def _set_groups(ctx: ssl.SSLContext, groups: str) -> None:
    """Limit key-exchange groups. The ssl module exposes no API for this before
    Python 3.15, so call OpenSSL's SSL_CTX_set1_groups_list on the context the
    ssl module owns (the SSL_CTX pointer is the first field after the object
    header). Tests check the effect with openssl s_client -groups."""
    setter = getattr(ctx, "set_groups", None)
    if setter is not None:  # Python >= 3.15
        setter(groups)
        return
    lib = ctypes.CDLL(ssl._ssl.__file__)  # type: ignore[attr-defined]
    ctrl = lib.SSL_CTX_ctrl
    ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_char_p]
    ctrl.restype = ctypes.c_long
    ssl_ctx = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
    SSL_CTRL_SET_GROUPS_LIST = 92
    if ctrl(ssl_ctx, SSL_CTRL_SET_GROUPS_LIST, 0, groups.encode()) != 1:
        raise ssl.SSLError(f"OpenSSL refused the group list {groups!r}")


def describe(conn) -> tuple[str, str]:
    """(version, cipher) of an established session, for metrics labels."""
    cipher = conn.cipher()
    return conn.version() or "unknown", cipher[0] if cipher else "unknown"

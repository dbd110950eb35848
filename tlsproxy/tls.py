"""TLS policy: one place builds every server-side SSLContext.

Defaults follow Mozilla's "intermediate" profile tightened to forward-secret
AEAD suites: TLS 1.2 minimum; on TLS 1.2 only ECDHE with AES-GCM or
ChaCha20-Poly1305; key exchange groups X25519, P-256, P-384; no compression;
no renegotiation.
"""

from __future__ import annotations

import ctypes
import ssl

import trio

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
    """A server context for one listener; raises ssl.SSLError/OSError when the
    files do not load (config validation has normally caught that)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = _VERSIONS[settings.min_version]
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.options |= (
        ssl.OP_NO_COMPRESSION
        | ssl.OP_NO_RENEGOTIATION
        | ssl.OP_CIPHER_SERVER_PREFERENCE
        | ssl.OP_SINGLE_ECDH_USE
    )
    ctx.load_cert_chain(str(settings.cert), str(settings.key))
    _set_groups(ctx, GROUPS)
    return ctx


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


def describe(conn: ssl.SSLObject | trio.SSLStream) -> tuple[str, str]:
    """(version, cipher) of an established session, for metrics labels."""
    cipher = conn.cipher()
    return conn.version() or "unknown", cipher[0] if cipher else "unknown"

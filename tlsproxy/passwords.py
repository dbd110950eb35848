"""Salted password hashes for the metrics endpoint's basic auth.

Format (self-describing, so the cost can be raised later without breaking
old configs): ``scrypt$<n>$<r>$<p>$<salt, base64>$<hash, base64>``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
from dataclasses import dataclass

# scrypt's interactive-login cost (n=2^14, r=8: 16 MiB, tens of ms per check).
DEFAULT_N, DEFAULT_R, DEFAULT_P = 2**14, 8, 1
SALT_BYTES = 16
HASH_BYTES = 32
# A config file must not be able to make every request allocate gigabytes.
MAX_MEMORY = 256 * 1024 * 1024


class PasswordHashError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class PasswordHash:
    n: int
    r: int
    p: int
    salt: bytes
    digest: bytes

    def __str__(self) -> str:
        b64 = lambda b: base64.b64encode(b).decode("ascii")  # noqa: E731
        return f"scrypt${self.n}${self.r}${self.p}${b64(self.salt)}${b64(self.digest)}"

    def matches(self, password: str) -> bool:
        """Constant-time in the password's content (not its length)."""
        candidate = _scrypt(password.encode("utf-8"), self.salt, self.n, self.r, self.p, len(self.digest))
        return hmac.compare_digest(candidate, self.digest)


def _memory(n: int, r: int, p: int) -> int:
    return 128 * r * (n + p + 2)


def _scrypt(password: bytes, salt: bytes, n: int, r: int, p: int, size: int) -> bytes:
    # maxmem: OpenSSL's default (32 MiB) is below what n=2^15, r=8 needs.
    return hashlib.scrypt(password, salt=salt, n=n, r=r, p=p, dklen=size, maxmem=_memory(n, r, p) + 1024 * 1024)


def hash_password(password: str) -> PasswordHash:
    salt = os.urandom(SALT_BYTES)
    digest = _scrypt(password.encode("utf-8"), salt, DEFAULT_N, DEFAULT_R, DEFAULT_P, HASH_BYTES)
    return PasswordHash(DEFAULT_N, DEFAULT_R, DEFAULT_P, salt, digest)


def parse_password_hash(text: str) -> PasswordHash:
    """Parse and bound-check a stored hash; PasswordHashError says what is wrong."""
    parts = text.split("$")
    if len(parts) != 6 or parts[0] != "scrypt":
        raise PasswordHashError("expected scrypt$n$r$p$salt$hash (make one with `tlsproxy hash-password`)")
    try:
        n, r, p = (int(x) for x in parts[1:4])
        salt = base64.b64decode(parts[4], validate=True)
        digest = base64.b64decode(parts[5], validate=True)
    except (ValueError, binascii.Error):
        raise PasswordHashError("n, r, p must be integers and salt, hash base64") from None
    if n < 2 or n & (n - 1) or r < 1 or p < 1 or _memory(n, r, p) > MAX_MEMORY or p > 16:
        raise PasswordHashError(f"scrypt parameters out of range (n={n}, r={r}, p={p})")
    if len(salt) < 8 or len(digest) < 16:
        raise PasswordHashError("salt or hash too short")
    return PasswordHash(n, r, p, salt, digest)

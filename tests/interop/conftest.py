"""Fixtures for the interop suite: real Dovecot and Postfix started once per
session in a temporary directory, and the proxy (in-process, per test) with a
STARTTLS, an implicit-TLS and a require_tls STARTTLS listener per protocol in
front of them, plus two SMTP listeners in front of a Postfix service that
advertises its own STARTTLS.

Set TLSPROXY_INTEROP_KEEP=1 to keep the servers' directory (configs, logs,
Maildirs) after the run; its path is printed at the end.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import itertools
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
import trio

from tests.conftest import listener, port_of, start_proxy
from tlsproxy.certs import GeneratedFiles, generate
from tlsproxy.server.proxy import Proxy

from .servers import Dovecot, Postfix

PASSWORD = "interop-secret"  # every test user's password


@pytest.fixture(scope="session")
def interop_root() -> Iterator[Path]:
    # Not under pytest's tmp_path: that tree is 0700 root, and Dovecot's and
    # Postfix's unprivileged processes (dovenull, postfix, mail) must reach
    # their sockets, queue and Maildirs.
    root = Path(tempfile.mkdtemp(prefix="tlsproxy-interop-"))
    root.chmod(0o755)
    try:
        yield root
    finally:
        if os.environ.get("TLSPROXY_INTEROP_KEEP"):
            print(f"\ninterop servers' files kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


# Dovecot re-reads its passwd-file at most once a second, so users are
# created up front, before it starts, and handed out one per test.
USER_POOL = 300


@pytest.fixture(scope="session")
def dovecot(interop_root: Path) -> Iterator[Dovecot]:
    server = Dovecot(interop_root / "dovecot")
    server.root.mkdir(parents=True)
    suffix = uuid.uuid4().hex[:6]
    for i in range(1, USER_POOL + 1):
        server.add_user(f"user{i}-{suffix}", PASSWORD)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def backend_tls(interop_root: Path) -> GeneratedFiles:
    """The certificate of the Postfix service that offers its own STARTTLS:
    from a CA of its own, so a client can tell it from the proxy's. RSA, so
    that Postfix's default cipher list includes RSA key exchange: the
    scanners' control target then shows suites without forward secrecy."""
    return generate(interop_root / "backend-tls", ["backend.invalid"], key_type="rsa")


@pytest.fixture(scope="session")
def postfix(interop_root: Path, dovecot: Dovecot, backend_tls: GeneratedFiles) -> Iterator[Postfix]:
    server = Postfix(
        interop_root / "postfix",
        sasl_socket=dovecot.auth_socket,
        tls_cert=backend_tls.cert,
        tls_key=backend_tls.key,
    )
    try:
        server.start()
        yield server
    finally:
        server.stop()


_user_numbers = itertools.count(1)


@dataclass(frozen=True)
class MailUser:
    name: str
    password: str


def _next_user(dovecot: Dovecot) -> MailUser:
    n = next(_user_numbers)
    assert n <= USER_POOL, "raise USER_POOL"
    line = dovecot.passwd_file.read_text().splitlines()[n - 1]
    return MailUser(line.split(":", 1)[0], PASSWORD)


@pytest.fixture
def mail_user(dovecot: Dovecot) -> MailUser:
    """A Dovecot user no other test uses: an empty mailbox, a name unique in
    the logs."""
    return _next_user(dovecot)


@pytest.fixture
def control_user(dovecot: Dovecot) -> MailUser:
    """A second unused user, for the controls that talk to a server directly.

    Controls log in with the right password: a failed login from 127.0.0.1
    makes Dovecot's anvil delay every later login from there by seconds."""
    return _next_user(dovecot)


@pytest.fixture
def rcpt_tag() -> str:
    """A unique address extension: mail to rcpt+TAG@example.com."""
    return uuid.uuid4().hex[:12]


@dataclass
class InteropProxy:
    proxy: Proxy

    def port(self, name: str) -> int:
        return port_of(self.proxy, name)

    def backend_ports(self, name: str) -> list[int]:
        """The local ports of the proxy's live connections to the backend of
        listener ``name``: how the servers' log lines of a session are found."""
        return [
            s.backend.socket.getsockname()[1]
            for s in self.proxy.listener(name).sessions
            if s.backend is not None
        ]


# A test client that waits for a reply that never comes is cut off by the
# proxy after this long instead of hanging for the default 5 minutes.
IDLE_TIMEOUT = 60.0
# Every client here comes from 127.0.0.1, and the scanners open many
# connections at once: the per-address limit (default 50) is not under test.
MAX_CONNECTIONS_PER_IP = 10_000

LISTENERS = [
    # (name, protocol, mode, require_tls, backend)
    ("smtp-starttls", "smtp", "starttls", False, "postfix"),
    ("smtp-implicit", "smtp", "implicit", False, "postfix"),
    ("smtp-require", "smtp", "starttls", True, "postfix"),
    ("smtp-tlsbackend-starttls", "smtp", "starttls", False, "postfix-tls"),
    ("smtp-tlsbackend-implicit", "smtp", "implicit", False, "postfix-tls"),
    ("imap-starttls", "imap", "starttls", False, "imap"),
    ("imap-implicit", "imap", "implicit", False, "imap"),
    ("imap-require", "imap", "starttls", True, "imap"),
    ("pop3-starttls", "pop3", "starttls", False, "pop3"),
    ("pop3-implicit", "pop3", "implicit", False, "pop3"),
    ("pop3-require", "pop3", "starttls", True, "pop3"),
]


@pytest.fixture
async def interop_proxy(
    nursery: trio.Nursery, certs: GeneratedFiles, dovecot: Dovecot, postfix: Postfix
) -> InteropProxy:
    backends = {
        "postfix": postfix.port,
        "postfix-tls": postfix.tls_port,
        "imap": dovecot.imap_port,
        "pop3": dovecot.pop3_port,
    }
    proxy = await start_proxy(
        nursery,
        *(
            listener(
                name, protocol, mode, backends[backend], certs, require_tls=require, idle_timeout=IDLE_TIMEOUT,
                max_connections_per_ip=MAX_CONNECTIONS_PER_IP,
            )
            for name, protocol, mode, require, backend in LISTENERS
        ),
    )
    return InteropProxy(proxy)


# PROXY protocol: listeners that read a header from the test client (which
# claims an address; loopback is trusted) and/or send one to the PROXY
# protocol ports of Postfix (smtpd_upstream_proxy_protocol) and Dovecot
# (haproxy = yes).
PROXY_PROTOCOL_TRUSTED = "127.0.0.0/8"
PROXY_PROTOCOL_LISTENERS = [
    # (name, protocol, mode, header from the client, header to the backend, backend)
    ("pp-smtp-starttls", "smtp", "starttls", True, "v1", "postfix-proxy"),
    ("pp-smtp-implicit", "smtp", "implicit", True, "v2", "postfix-proxy"),
    ("pp-smtp-outbound-only", "smtp", "starttls", False, "v2", "postfix-proxy"),
    ("pp-imap-starttls", "imap", "starttls", True, "v2", "imap-proxy"),
    ("pp-imap-implicit", "imap", "implicit", True, "v1", "imap-proxy"),
    ("pp-pop3-starttls", "pop3", "starttls", True, "v1", "pop3-proxy"),
]


@pytest.fixture
async def proxy_protocol_proxy(
    nursery: trio.Nursery, certs: GeneratedFiles, dovecot: Dovecot, postfix: Postfix
) -> InteropProxy:
    backends = {
        "postfix-proxy": postfix.proxy_port,
        "imap-proxy": dovecot.imap_haproxy_port,
        "pop3-proxy": dovecot.pop3_haproxy_port,
    }
    trusted = (ipaddress.ip_network(PROXY_PROTOCOL_TRUSTED),)
    configs = [
        dataclasses.replace(
            listener(name, protocol, mode, backends[backend], certs, idle_timeout=IDLE_TIMEOUT),
            proxy_protocol=inbound,
            proxy_trusted_networks=trusted if inbound else (),
            backend_proxy_protocol=outbound,
        )
        for name, protocol, mode, inbound, outbound, backend in PROXY_PROTOCOL_LISTENERS
    ]
    return InteropProxy(await start_proxy(nursery, *configs))

"""Transparent mode: its config keys, the pure decisions in
tlsproxy/server/transparent.py, and the socket helpers on real loopback
sockets (we run as root, so IP_TRANSPARENT and SO_MARK are allowed). The
firewall set-ups themselves are tested across namespaces in tests/netns/."""

from __future__ import annotations

import errno
import socket
import struct
import tomllib
from pathlib import Path

import pytest
import trio

from tlsproxy.certs import generate
from tlsproxy.config import Address, ConfigError, parse
from tlsproxy.server import transparent as tp

BASE = """\
[tls]
cert = "cert.pem"
key = "key.pem"

[[listeners]]
name = "smtp"
protocol = "smtp"
mode = "starttls"
listen = "0.0.0.0:10025"
"""
LST = 'listeners[0] "smtp"'
REDIRECT = 'transparent = "redirect"\n'
PORTS = "[listeners.original_ports]\n"


@pytest.fixture(scope="module")
def certdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("transparent-certs")
    generate(root, ["localhost"])
    return root


def load(certdir: Path, extra: str, backend: str = "original"):
    return parse(tomllib.loads(BASE + f'backend = "{backend}"\n' + extra), base_dir=certdir).listeners[0]


# ---------------------------------------------------------------- config


def test_plain_listener_has_transparent_mode_off(certdir: Path) -> None:
    lst = load(certdir, "", backend="127.0.0.1:25")
    assert (lst.transparent, lst.original_ports) == (None, ())
    assert (lst.backend_source, lst.backend_mark) == ("proxy", None)
    assert lst.backend == Address("127.0.0.1", 25)
    assert tp.capability_note(lst) is None


def test_transparent_keys_parse(certdir: Path) -> None:
    lst = load(certdir, """transparent = "tproxy"
backend_source = "client"
backend_mark = 7
[listeners.original_ports]
"587" = "10.0.0.5:2525"
"25" = "[2001:db8::5]:25"
""")
    assert lst.transparent == "tproxy" and lst.backend is None
    assert lst.original_ports == ((25, Address("2001:db8::5", 25)), (587, Address("10.0.0.5", 2525)))
    assert (lst.backend_source, lst.backend_mark) == ("client", 7)
    note = tp.capability_note(lst)
    assert note is not None and "CAP_NET_ADMIN" in note
    assert "tproxy" in note and "backend_source" in note and "backend_mark = 7" in note


def test_client_source_without_transparent_capture_is_allowed(certdir: Path) -> None:
    """Like HAProxy's usesrc clientip: preserving the source needs no diversion."""
    lst = load(certdir, 'backend_source = "client"\n', backend="127.0.0.1:25")
    assert lst.backend_source == "client" and lst.transparent is None


@pytest.mark.parametrize(
    ("extra", "backend", "key", "words"),
    [
        ("", "original", "backend", "needs transparent"),
        (PORTS + '"25" = "127.0.0.1:2525"\n', "127.0.0.1:25", "original_ports", "needs transparent"),
        ('transparent = "nat"\n', "original", "transparent", "redirect, tproxy"),
        (REDIRECT + PORTS + '"0" = "127.0.0.1:25"\n', "original", "0", "1-65535"),
        (REDIRECT + PORTS + '"smtp" = "127.0.0.1:25"\n', "original", "smtp", "1-65535"),
        (REDIRECT + PORTS + '"25" = "127.0.0.1"\n', "original", "25", "host:port"),
        (REDIRECT + PORTS + '"25" = 2525\n', "original", "25", "a string"),
        ('backend_source = "server"\n', "127.0.0.1:25", "backend_source", "proxy, client"),
        ("backend_mark = 0\n", "127.0.0.1:25", "backend_mark", "at least 1"),
        ("backend_mark = 4294967296\n", "127.0.0.1:25", "backend_mark", "32 bits"),
        ('backend_mark = "7"\n', "127.0.0.1:25", "backend_mark", "an integer"),
    ],
)
def test_bad_transparent_keys_name_the_key(
    certdir: Path, extra: str, backend: str, key: str, words: str
) -> None:
    with pytest.raises(ConfigError) as err:
        load(certdir, extra, backend=backend)
    assert LST in str(err.value)
    assert f"key '{key}'" in str(err.value)
    assert words in str(err.value)


# ---------------------------------------------------------------- pure decisions


def test_parse_sockaddr_ipv4_and_ipv6() -> None:
    v4 = struct.pack("=H", socket.AF_INET) + struct.pack("!H4s8x", 25, socket.inet_aton("198.18.2.2"))
    assert tp.parse_sockaddr(v4, socket.AF_INET) == Address("198.18.2.2", 25)
    v6 = struct.pack("=H", socket.AF_INET6) + struct.pack(
        "!HI16sI", 143, 0, socket.inet_pton(socket.AF_INET6, "2001:db8::2"), 0
    )
    assert tp.parse_sockaddr(v6, socket.AF_INET6) == Address("2001:db8::2", 143)
    mapped = struct.pack("=H", socket.AF_INET6) + struct.pack(
        "!HI16sI", 110, 0, socket.inet_pton(socket.AF_INET6, "::ffff:198.18.2.2"), 0
    )
    assert tp.parse_sockaddr(mapped, socket.AF_INET6) == Address("198.18.2.2", 110)


def test_choose_backend_mapping_then_fixed_then_original(certdir: Path) -> None:
    mapped = load(certdir, 'transparent = "redirect"\n[listeners.original_ports]\n"587" = "10.0.0.5:2525"\n')
    assert tp.choose_backend(mapped, Address("198.18.2.2", 587)) == Address("10.0.0.5", 2525)
    assert tp.choose_backend(mapped, Address("198.18.2.2", 25)) == Address("198.18.2.2", 25)
    fixed = load(certdir, 'transparent = "redirect"\n', backend="10.0.0.9:25")
    assert tp.choose_backend(fixed, Address("198.18.2.2", 25)) == Address("10.0.0.9", 25)
    with pytest.raises(tp.TransparentError) as err:
        tp.choose_backend(mapped, None)
    assert err.value.reason == "no_original_destination"


def test_is_loop() -> None:
    local = {"198.18.1.1", "127.0.0.1"}.__contains__
    wildcard = Address("0.0.0.0", 10025)
    assert tp.is_loop(Address("198.18.1.1", 10025), wildcard, local)
    assert tp.is_loop(Address("::ffff:127.0.0.1", 10025), wildcard, local)
    assert not tp.is_loop(Address("198.18.2.2", 10025), wildcard, local)  # someone else's port 10025
    assert not tp.is_loop(Address("198.18.1.1", 25), wildcard, local)
    bound = Address("198.18.1.1", 10025)
    assert tp.is_loop(Address("198.18.1.1", 10025), bound, lambda host: False)
    assert not tp.is_loop(Address("127.0.0.1", 10025), bound, local)


def test_source_errors_say_what_to_fix() -> None:
    target = Address("198.18.2.2", 25)
    denied = tp.source_error(PermissionError(errno.EPERM, "Operation not permitted"), "198.18.1.2", target)
    assert denied.reason == "source_not_permitted"
    assert "CAP_NET_ADMIN" in str(denied) and "198.18.1.2" in str(denied) and "198.18.2.2:25" in str(denied)
    unsupported = OSError(errno.EAFNOSUPPORT, "Address family not supported")
    family = tp.source_error(unsupported, "2001:db8::1", target)
    assert family.reason == "source_unusable" and "address family" in str(family)


def test_timeouts_point_at_the_return_route_only_for_client_sources(certdir: Path) -> None:
    target = Address("198.18.2.2", 25)
    assert tp.no_reply_error(load(certdir, "", backend="127.0.0.1:25"), target) is None
    error = tp.no_reply_error(load(certdir, 'backend_source = "client"\n', backend="127.0.0.1:25"), target)
    assert error is not None and error.reason == "source_no_reply"
    assert "ip rule/ip route" in str(error) and "198.18.2.2:25" in str(error)


def test_is_local_address() -> None:
    assert tp.is_local_address("127.0.0.1")
    assert not tp.is_local_address("198.18.255.254")  # the benchmarking range is nobody's here
    assert not tp.is_local_address("localhost")  # names are never resolved here


# ---------------------------------------------------------------- real sockets


async def _pair(listen_host: str = "127.0.0.1"):
    listener = trio.socket.socket()
    await listener.bind((listen_host, 0))
    listener.listen()
    return listener, Address(listen_host, listener.getsockname()[1])


async def test_tproxy_original_destination_is_the_local_address_and_direct_is_a_loop(certdir: Path) -> None:
    config = load(certdir, 'transparent = "tproxy"\n')
    listener, bound = await _pair()
    with listener, trio.socket.socket() as client:
        await client.connect(("127.0.0.1", bound.port))
        accepted, _ = await listener.accept()
        with accepted:
            assert tp.original_destination(accepted, "tproxy") == bound
            with pytest.raises(tp.TransparentError) as err:
                tp.accepted_destination(config, accepted, Address("0.0.0.0", bound.port))
            assert err.value.reason == "loop" and "is this listener" in str(err.value)


async def test_connect_from_the_clients_address_with_a_mark(certdir: Path) -> None:
    """IP_TRANSPARENT lets the backend socket bind the client's address even
    if this host does not own it (on loopback: any 127/8 address); the
    backend sees that address as its peer."""
    config = load(certdir, 'backend_source = "client"\nbackend_mark = 7\n', backend="127.0.0.1:1")
    listener, bound = await _pair()
    backend = await tp.open_backend(config, bound, "127.0.0.77:40000")
    accepted_backend, peer = await listener.accept()
    with listener, accepted_backend:
        assert peer[0] == "127.0.0.77"
        assert backend.socket.getsockopt(socket.SOL_SOCKET, tp.SO_MARK) == 7
        # The backend connection's own end is recognised if it ever comes back
        # to a transparent listener (rules that catch our own traffic)...
        assert tp.is_own_connection(Address(*peer[:2]))
        tproxy = load(certdir, 'transparent = "tproxy"\n')
        with pytest.raises(tp.TransparentError) as err:
            tp.accepted_destination(tproxy, accepted_backend, Address("0.0.0.0", 1))
        assert err.value.reason == "loop" and "own backend socket" in str(err.value)
        await backend.aclose()
        # ...and forgotten once closed.
        assert not tp.is_own_connection(Address(*peer[:2]))


async def test_client_source_with_an_unknown_client_is_refused(certdir: Path) -> None:
    config = load(certdir, 'backend_source = "client"\n', backend="127.0.0.1:1")
    with pytest.raises(tp.TransparentError) as err:
        await tp.open_backend(config, Address("127.0.0.1", 1), "unknown")
    assert err.value.reason == "client_gone"

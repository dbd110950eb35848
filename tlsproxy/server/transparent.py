"""Transparent mode: original destinations, loop checks, client-source connects.

A transparent listener receives connections the kernel diverted to it:
iptables/nftables REDIRECT rewrites the destination (the original one is read
back with SO_ORIGINAL_DST from conntrack), TPROXY keeps it (the accepted
socket's local address *is* the original destination, and the listening socket
needs IP_TRANSPARENT). With ``backend_source = "client"`` the backend socket is
bound to the client's address before connecting (IP_TRANSPARENT lets a socket
bind an address that is not local); the backend's replies must then be routed
back to this host, see docs/transparent.md.

The decisions (which backend, is it a loop, what an error means) are pure
functions; the socket calls are thin wrappers around them.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct
import weakref
from typing import Callable

import trio

from ..config import Address, ListenerConfig
from .connection import Connection, connect_socket, open_connection

# Linux values (<linux/netfilter_ipv4.h>, <linux/in.h>, <linux/in6.h>); Python
# 3.11's socket module lacks most of them.
SO_ORIGINAL_DST = 80
IP6T_SO_ORIGINAL_DST = 80
IP_TRANSPARENT = 19
IPV6_TRANSPARENT = 75
IP_FREEBIND = 15
IPV6_FREEBIND = 78
SO_MARK = 36

_SOCKADDR_IN = struct.Struct("!2xH4s8x")  # family (host order, skipped), port, address
_SOCKADDR_IN6 = struct.Struct("!2xHI16sI")  # family, port, flowinfo, address, scope


# Local ends of our open backend connections: a connection accepted from one
# of them is our own traffic diverted back to us (a firewall rule that does
# not exclude backend_mark), which the original destination cannot reveal.
_own_connections: "weakref.WeakValueDictionary[tuple[str, int], socket.socket]" = (
    weakref.WeakValueDictionary()
)


class TransparentError(Exception):
    """A transparent-mode failure; ``reason`` is a bounded metric label."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


# ---------------------------------------------------------------- pure parts


def parse_sockaddr(raw: bytes, family: int) -> Address:
    """Decode the ``struct sockaddr_in``/``sockaddr_in6`` getsockopt returns."""
    if family == socket.AF_INET6:
        port, _flow, packed, _scope = _SOCKADDR_IN6.unpack(raw[: _SOCKADDR_IN6.size])
        host = ipaddress.IPv6Address(packed)
        # A dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d.
        return Address(str(host.ipv4_mapped or host), port)
    port, packed = _SOCKADDR_IN.unpack(raw[: _SOCKADDR_IN.size])
    return Address(str(ipaddress.IPv4Address(packed)), port)


def plain_ip(host: str) -> str:
    """``::ffff:198.18.0.1`` -> ``198.18.0.1``; anything else unchanged."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    mapped = getattr(ip, "ipv4_mapped", None)
    return str(mapped or ip)


def choose_backend(config: ListenerConfig, original: Address | None) -> Address:
    """Where a connection goes: a per-original-port mapping first, then the
    fixed backend, or the original destination when ``backend = "original"``."""
    if original is not None:
        for port, mapped in config.original_ports:
            if port == original.port:
                return mapped
    if config.backend is not None:
        return config.backend
    if original is None:
        raise TransparentError("no_original_destination", "no original destination known")
    return original


def is_loop(target: Address, bound: Address, is_local: Callable[[str], bool]) -> bool:
    """True when connecting to ``target`` would reach this listener itself
    (``bound`` is its bound address; a wildcard bind matches every local
    address). A connection that was not redirected has its own listener as
    original destination, so this also catches clients that bypass the rules."""
    if target.port != bound.port:
        return False
    host = plain_ip(target.host)
    if not bound.is_wildcard:
        return host == plain_ip(bound.host)
    return is_local(host)


def source_error(exc: OSError, source: str, target: Address) -> TransparentError:
    """Turn a failed bind/setsockopt for ``backend_source = "client"`` into a
    message that says what to fix."""
    if exc.errno == errno.EPERM:
        return TransparentError(
            "source_not_permitted",
            f"cannot connect to {target} from the client's address {source}: IP_TRANSPARENT "
            "needs CAP_NET_ADMIN (run as root or grant AmbientCapabilities=CAP_NET_ADMIN)",
        )
    if exc.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT, errno.EINVAL):
        return TransparentError(
            "source_unusable",
            f"cannot bind the client's address {source} to connect to {target}: {exc.strerror} "
            "(client and backend must be the same address family)",
        )
    return TransparentError("source_unusable", f"binding {source} for {target} failed: {exc}")


# ---------------------------------------------------------------- socket parts


def original_destination(sock: trio.socket.SocketType, capture: str) -> Address:
    """The address an accepted, diverted connection was originally sent to."""
    if capture == "tproxy":
        host, port = sock.getsockname()[:2]
        return Address(plain_ip(host), port)
    try:
        if sock.family == socket.AF_INET6:
            # A dual-stack socket carrying IPv4 has its conntrack entry in IPv4.
            local = ipaddress.IPv6Address(sock.getsockname()[0].split("%")[0])
            if local.ipv4_mapped is None:
                raw = sock.getsockopt(socket.IPPROTO_IPV6, IP6T_SO_ORIGINAL_DST, _SOCKADDR_IN6.size)
                return parse_sockaddr(raw, socket.AF_INET6)
        raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, _SOCKADDR_IN.size)
    except OSError as exc:
        raise TransparentError(
            "no_original_destination",
            f"SO_ORIGINAL_DST failed ({exc.strerror}): no conntrack entry for this connection; "
            "is the REDIRECT rule in place and conntrack available?",
        ) from None
    return parse_sockaddr(raw, socket.AF_INET)


def is_local_address(host: str) -> bool:
    """Whether the IP address ``host`` is one of this network namespace's own:
    binding it succeeds only then (no IP_FREEBIND/IP_TRANSPARENT here). A host
    name is not resolved (that would block): configured names are not ours."""
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        return False
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, 0))
        except OSError:
            return False
    return True


def make_listener_transparent(sock: trio.socket.SocketType) -> None:
    """TPROXY hands a listener only connections for addresses that are not
    its own if the listening socket has IP_TRANSPARENT (needs CAP_NET_ADMIN)."""
    try:
        if sock.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
        sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
    except PermissionError:
        raise PermissionError(
            errno.EPERM, 'transparent = "tproxy" needs CAP_NET_ADMIN (IP_TRANSPARENT on the listener)'
        ) from None


async def connect(target: Address, source: str | None, mark: int | None) -> Connection:
    """Connect to ``target``, optionally from the non-local address ``source``
    and with SO_MARK ``mark`` (so the firewall can tell our own traffic apart)."""
    info = await trio.socket.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
    if source is not None:
        source = plain_ip(source)
        want = socket.AF_INET6 if ":" in source else socket.AF_INET
        info = [i for i in info if i[0] == want] or info
    family, _, _, _, sockaddr = info[0]

    def prepare(sock: socket.socket) -> None:
        if mark is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
            except PermissionError:
                raise TransparentError(
                    "mark_not_permitted", f"setting backend_mark {mark} (SO_MARK) needs CAP_NET_ADMIN"
                ) from None
        if source is not None:
            try:
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
                    sock.setsockopt(socket.IPPROTO_IPV6, IPV6_FREEBIND, 1)
                else:
                    sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
                    # Also bindable before the address's route exists.
                    sock.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
                sock.bind((source, 0))
            except OSError as exc:
                raise source_error(exc, source, target) from None

    return await connect_socket(family, sockaddr, prepare)


async def open_backend(config: ListenerConfig, target: Address, peer: str) -> Connection:
    """The backend connection for one session, as the listener's
    ``backend_source``/``backend_mark`` ask (a host name keeps trio's
    happy-eyeballs path). ``peer`` is the session's client as "host:port" or
    "[v6]:port" (behind a PROXY protocol balancer, the client it names)."""
    if config.backend_source != "client" and config.backend_mark is None:
        stream = await open_connection(target.host, target.port)
    else:
        source = None
        if config.backend_source == "client":
            source = peer.rpartition(":")[0].strip("[]")
            if not source:
                raise TransparentError("client_gone", f"client address unknown ({peer!r})")
        stream = await connect(target, source, config.backend_mark)
    host, port = stream.socket.getsockname()[:2]
    _own_connections[(plain_ip(host), port)] = stream.socket
    return stream


def is_own_connection(peer: Address) -> bool:
    """Whether ``peer`` is the local end of one of our open backend sockets."""
    sock = _own_connections.get((plain_ip(peer.host), peer.port))
    return sock is not None and sock.fileno() != -1


def accepted_destination(
    config: ListenerConfig, sock: trio.socket.SocketType, bound: Address,
    is_local: Callable[[str], bool] = is_local_address,
) -> Address:
    """The original destination of a connection accepted on a transparent
    listener bound to ``bound``; a TransparentError if it cannot be known or
    following it would loop back into this listener."""
    try:
        host, port = sock.getpeername()[:2]
    except OSError as exc:
        raise TransparentError("client_gone", f"client went away before it was served: {exc}") from None
    if is_own_connection(Address(host, port)):
        raise TransparentError(
            "loop",
            f"connection from our own backend socket {Address(plain_ip(host), port)}: the firewall "
            "diverts tlsproxy's own traffic back to it; exclude backend_mark from the rules",
        )
    original = original_destination(sock, config.transparent or "redirect")
    for what, addr in (("original destination", original), ("backend", choose_backend(config, original))):
        if is_loop(addr, bound, is_local):
            raise TransparentError(
                "loop",
                f"{what} {addr} is this listener ({bound}): the connection was not diverted to "
                "us, or the firewall diverts tlsproxy's own traffic (see backend_mark)",
            )
    return original


def capability_note(config: ListenerConfig) -> str | None:
    """What ``check-config`` says about privileges a listener needs."""
    needs = []
    if config.transparent == "tproxy":
        needs.append('transparent = "tproxy" (IP_TRANSPARENT on the listener)')
    if config.backend_source == "client":
        needs.append('backend_source = "client" (IP_TRANSPARENT on backend sockets)')
    if config.backend_mark is not None:
        needs.append(f"backend_mark = {config.backend_mark} (SO_MARK)")
    if not needs:
        return None
    return "needs CAP_NET_ADMIN for " + ", ".join(needs) + "; firewall and routing: docs/transparent.md"


def no_reply_error(config: ListenerConfig, target: Address) -> TransparentError | None:
    """Why a backend connect may have timed out: with ``backend_source =
    "client"`` the usual cause is replies routed to the real client instead of
    back to us. None when nothing transparent-specific explains it."""
    if config.backend_source != "client":
        return None
    return TransparentError(
        "source_no_reply",
        f"no answer from {target} to a connection from the client's address within "
        f"connect_timeout: are the replies routed back to tlsproxy (ip rule/ip route, "
        "docs/transparent.md)? Or the backend is down",
    )

"""PROXY protocol v1 and v2 (HAProxy's spec, proxy-protocol.txt), sans-IO.

``parse(buffer)`` looks at the bytes a connection started with and returns
``NEED_MORE`` (a valid prefix, read more), or ``Parsed(header, rest)`` where
``rest`` is what followed the header (the client's first bytes: replay them);
anything else raises ``ProxyProtocolError`` with a short reason. Any chunking
of the same bytes gives the same answer once they are all in, and the buffer
a caller keeps is bounded: a v1 line by 107 bytes, a v2 header by
``V2_MAX_PAYLOAD`` plus its 16-byte prefix.

``encode_v1`` and ``encode_v2`` write a header for a TCP connection.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from typing import Final, Union

V1_PREFIX: Final = b"PROXY "
V1_MAX_LENGTH: Final = 107  # the spec's worst case, CRLF included
V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED_LENGTH: Final = 16  # signature, version/command, family, length
# The spec allows 65535 bytes of addresses and TLVs; real senders send tens of
# bytes (a few hundred with TLS TLVs). More is refused, not buffered.
V2_MAX_PAYLOAD: Final = 4096

_V2_VERSION = 0x20
_V2_LOCAL = 0x00
_V2_PROXY = 0x01
_V2_UNSPEC = 0x00
_V2_TCP4 = 0x11
_V2_TCP6 = 0x21
_V2_ADDRESS_LENGTH = {_V2_TCP4: 12, _V2_TCP6: 36}


class ProxyProtocolError(ValueError):
    """Not a valid PROXY protocol header; ``reason`` says why (short, fixed text)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


HostPort = tuple[str, int]


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """What the sender said. ``source`` and ``destination`` are None for v1
    UNKNOWN, v2 LOCAL and v2 UNSPEC: the receiver then keeps the socket's own
    addresses (a health check from the balancer itself, say)."""

    version: int  # 1 or 2
    source: HostPort | None
    destination: HostPort | None


@dataclass(frozen=True, slots=True)
class Parsed:
    header: ProxyHeader
    rest: bytes  # bytes after the header: the client's own first bytes


class _NeedMore:
    def __repr__(self) -> str:
        return "NEED_MORE"


NEED_MORE: Final = _NeedMore()
Result = Union[_NeedMore, Parsed]


def parse(data: bytes) -> Result:
    """Parse a header at the start of ``data`` (see the module docstring)."""
    if data.startswith(V2_SIGNATURE):
        return _parse_v2(data)
    if data.startswith(V1_PREFIX):
        return _parse_v1(data)
    n = min(len(data), len(V2_SIGNATURE))
    if data[:n] == V2_SIGNATURE[:n] or data[: len(V1_PREFIX)] == V1_PREFIX[: len(data)]:
        return NEED_MORE
    raise ProxyProtocolError("no PROXY protocol header")


# ---------------------------------------------------------------- v1


def _parse_v1(data: bytes) -> Result:
    end = data.find(b"\r\n", 0, V1_MAX_LENGTH)
    if end < 0:
        if len(data) >= V1_MAX_LENGTH:
            raise ProxyProtocolError("v1 header too long")
        if b"\n" in data or b"\r" in data[:-1]:
            raise ProxyProtocolError("v1 header not ended by CRLF")
        return NEED_MORE
    line, rest = data[:end], data[end + 2 :]
    if b"\r" in line or b"\n" in line:
        raise ProxyProtocolError("v1 header not ended by CRLF")
    if not line.isascii():
        raise ProxyProtocolError("v1 header not ASCII")
    parts = line.decode("ascii").split(" ")
    if parts[1:2] == ["UNKNOWN"]:
        # The spec lets the sender put anything after UNKNOWN; the receiver ignores it.
        return Parsed(ProxyHeader(1, None, None), rest)
    if len(parts) != 6 or parts[1] not in ("TCP4", "TCP6"):
        raise ProxyProtocolError("v1 header malformed")
    version = 4 if parts[1] == "TCP4" else 6
    source = _v1_address(parts[2], parts[4], version)
    destination = _v1_address(parts[3], parts[5], version)
    return Parsed(ProxyHeader(1, source, destination), rest)


def _v1_address(host: str, port: str, version: int) -> HostPort:
    try:
        ip = ipaddress.IPv4Address(host) if version == 4 else ipaddress.IPv6Address(host)
    except ValueError:
        raise ProxyProtocolError("v1 address invalid") from None
    if getattr(ip, "scope_id", None):
        raise ProxyProtocolError("v1 address invalid")
    # Decimal, no sign, no leading zeros (the spec's form; int() would take "+1", "٣").
    if not (port.isascii() and port.isdigit()) or (port != "0" and port.startswith("0")) or int(port) > 65535:
        raise ProxyProtocolError("v1 port invalid")
    return str(ip), int(port)


def encode_v1(source: HostPort | None, destination: HostPort | None) -> bytes:
    """A v1 line; UNKNOWN when either address is None."""
    if source is None or destination is None:
        return b"PROXY UNKNOWN\r\n"
    src, dst = _same_family(source[0], destination[0])
    family = "TCP4" if src.version == 4 else "TCP6"
    return f"PROXY {family} {src} {dst} {source[1]} {destination[1]}\r\n".encode("ascii")


# ---------------------------------------------------------------- v2


def _parse_v2(data: bytes) -> Result:
    if len(data) < V2_FIXED_LENGTH:
        return NEED_MORE
    version_command, family, length = struct.unpack_from("!BBH", data, len(V2_SIGNATURE))
    if version_command & 0xF0 != _V2_VERSION:
        raise ProxyProtocolError("v2 version unsupported")
    command = version_command & 0x0F
    if command not in (_V2_LOCAL, _V2_PROXY):
        raise ProxyProtocolError("v2 command unsupported")
    if length > V2_MAX_PAYLOAD:
        raise ProxyProtocolError("v2 header too long")
    end = V2_FIXED_LENGTH + length
    if len(data) < end:
        return NEED_MORE
    payload, rest = data[V2_FIXED_LENGTH:end], data[end:]
    if command == _V2_LOCAL or family == _V2_UNSPEC:
        # LOCAL: the balancer's own connection (health check); the address
        # block, if any, is to be ignored.
        return Parsed(ProxyHeader(2, None, None), rest)
    if family not in _V2_ADDRESS_LENGTH:
        raise ProxyProtocolError("v2 address family unsupported")
    if length < _V2_ADDRESS_LENGTH[family]:
        raise ProxyProtocolError("v2 address block too short")
    # Bytes beyond the addresses are TLVs (ALPN, authority, SSL, ...): not needed here.
    if family == _V2_TCP4:
        src_ip, dst_ip, src_port, dst_port = struct.unpack_from("!4s4sHH", payload)
        src, dst = ipaddress.IPv4Address(src_ip), ipaddress.IPv4Address(dst_ip)
    else:
        src_ip, dst_ip, src_port, dst_port = struct.unpack_from("!16s16sHH", payload)
        src, dst = ipaddress.IPv6Address(src_ip), ipaddress.IPv6Address(dst_ip)
    return Parsed(ProxyHeader(2, (str(src), src_port), (str(dst), dst_port)), rest)


def encode_v2(source: HostPort | None, destination: HostPort | None) -> bytes:
    """A v2 PROXY header; a LOCAL one when either address is None."""
    if source is None or destination is None:
        return V2_SIGNATURE + struct.pack("!BBH", _V2_VERSION | _V2_LOCAL, _V2_UNSPEC, 0)
    src, dst = _same_family(source[0], destination[0])
    family = _V2_TCP4 if src.version == 4 else _V2_TCP6
    addresses = src.packed + dst.packed + struct.pack("!HH", source[1], destination[1])
    return V2_SIGNATURE + struct.pack("!BBH", _V2_VERSION | _V2_PROXY, family, len(addresses)) + addresses


IP = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]


def _same_family(source: str, destination: str) -> tuple[IP, IP]:
    """Both addresses in one family, as a header has one: a v4 address next
    to a v6 one becomes v4-mapped v6 (::ffff:a.b.c.d)."""
    src, dst = ipaddress.ip_address(source), ipaddress.ip_address(destination)
    if src.version != dst.version:
        src, dst = (ipaddress.IPv6Address(f"::ffff:{a}") if a.version == 4 else a for a in (src, dst))
    return src, dst


def encode(version: str, source: HostPort | None, destination: HostPort | None) -> bytes:
    """``version`` "v1" or "v2" (the config's ``backend_proxy_protocol``)."""
    return (encode_v1 if version == "v1" else encode_v2)(source, destination)

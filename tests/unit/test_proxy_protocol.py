"""PROXY protocol parser and encoder (tlsproxy/proxy_protocol.py).

Known-good headers (from the spec's examples and HAProxy's byte layout) parse
to the right addresses; malformed ones are refused with the module's error and
a reason; hypothesis checks the round trip, that chunking never changes the
answer, and that random bytes never raise anything but ProxyProtocolError.
"""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tlsproxy.proxy_protocol import (
    NEED_MORE,
    V1_MAX_LENGTH,
    V2_MAX_PAYLOAD,
    V2_SIGNATURE,
    Parsed,
    ProxyHeader,
    ProxyProtocolError,
    encode,
    encode_v1,
    encode_v2,
    parse,
)


def parsed(data: bytes) -> Parsed:
    result = parse(data)
    assert isinstance(result, Parsed), result
    return result


def refused(data: bytes) -> str:
    with pytest.raises(ProxyProtocolError) as info:
        parse(data)
    return info.value.reason


# ---------------------------------------------------------------- v1


def test_v1_tcp4_with_following_bytes() -> None:
    p = parsed(b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\nEHLO x\r\n")
    assert p.header == ProxyHeader(1, ("192.0.2.1", 56324), ("198.51.100.2", 443))
    assert p.rest == b"EHLO x\r\n"


def test_v1_tcp6_is_normalised() -> None:
    p = parsed(b"PROXY TCP6 2001:db8:0:0::1 2001:db8::2 1 65535\r\n")
    assert p.header == ProxyHeader(1, ("2001:db8::1", 1), ("2001:db8::2", 65535))
    assert p.rest == b""


@pytest.mark.parametrize("line", [b"PROXY UNKNOWN\r\n", b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n"])
def test_v1_unknown_has_no_addresses(line: bytes) -> None:
    assert parsed(line + b"\x16\x03").header == ProxyHeader(1, None, None)


@pytest.mark.parametrize(
    "prefix", [b"", b"P", b"PROXY", b"PROXY ", b"PROXY TCP4 1.2.3.4", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r"]
)
def test_v1_prefix_needs_more(prefix: bytes) -> None:
    assert parse(prefix) is NEED_MORE


@pytest.mark.parametrize(
    "line, reason",
    [
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "v1 header not ended by CRLF"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r2\r\n", "v1 header not ended by CRLF"),
        (b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", "v1 header malformed"),
        (b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n", "v1 header malformed"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n", "v1 header malformed"),
        (b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n", "v1 address invalid"),
        (b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", "v1 address invalid"),
        (b"PROXY TCP4 1.2.3.04 5.6.7.8 1 2\r\n", "v1 address invalid"),
        (b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", "v1 address invalid"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n", "v1 port invalid"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n", "v1 port invalid"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", "v1 port invalid"),
        ("PROXY TCP4 1.2.3.4 5.6.7.8 ٣ 2\r\n".encode(), "v1 header not ASCII"),
        (b"PROXY TCP4 " + b"1" * V1_MAX_LENGTH, "v1 header too long"),
        (b"EHLO client.example\r\n", "no PROXY protocol header"),
        (b"\x16\x03\x01\x02\x00", "no PROXY protocol header"),
    ],
)
def test_v1_malformed(line: bytes, reason: str) -> None:
    assert refused(line) == reason


def test_v1_longest_valid_line_fits_and_one_more_byte_does_not() -> None:
    line = encode_v1(("ffff:" * 7 + "ffff", 65535), ("ffff:" * 7 + "fffe", 65535))
    assert len(line) == 104  # ffff:... is the longest text an IPv6Address prints
    padded = b"PROXY UNKNOWN " + b"x" * (V1_MAX_LENGTH - len(b"PROXY UNKNOWN ") - 2) + b"\r\n"
    assert len(padded) == V1_MAX_LENGTH
    assert parsed(padded).header.source is None
    assert refused(padded[:-2] + b"x\r\n") == "v1 header too long"


# ---------------------------------------------------------------- v2


def v2(command: int, family: int, payload: bytes) -> bytes:
    return V2_SIGNATURE + struct.pack("!BBH", 0x20 | command, family, len(payload)) + payload


def test_v2_tcp4_skips_tlvs() -> None:
    addresses = bytes([192, 0, 2, 1, 198, 51, 100, 2]) + struct.pack("!HH", 56324, 465)
    tlvs = b"\x01\x00\x02h2" + b"\x04\x00\x00"  # ALPN "h2", NOOP
    p = parsed(v2(1, 0x11, addresses + tlvs) + b"\x16\x03\x01")
    assert p.header == ProxyHeader(2, ("192.0.2.1", 56324), ("198.51.100.2", 465))
    assert p.rest == b"\x16\x03\x01"


def test_v2_tcp6() -> None:
    src, dst = ipaddress.IPv6Address("2001:db8::1"), ipaddress.IPv6Address("::ffff:10.1.2.3")
    p = parsed(v2(1, 0x21, src.packed + dst.packed + struct.pack("!HH", 1, 993)))
    assert p.header == ProxyHeader(2, ("2001:db8::1", 1), ("::ffff:a01:203", 993))


@pytest.mark.parametrize("command, family", [(0, 0x11), (0, 0x00), (1, 0x00)])
def test_v2_local_and_unspec_have_no_addresses(command: int, family: int) -> None:
    # LOCAL with an address block: the block is ignored, as the spec says.
    p = parsed(v2(command, family, bytes(12)) + b"A1 NOOP\r\n")
    assert p.header == ProxyHeader(2, None, None)
    assert p.rest == b"A1 NOOP\r\n"


@pytest.mark.parametrize(
    "data, reason",
    [
        (V2_SIGNATURE + b"\x11\x11\x00\x0c" + bytes(12), "v2 version unsupported"),
        (v2(2, 0x11, bytes(12)), "v2 command unsupported"),
        (v2(1, 0x12, bytes(12)), "v2 address family unsupported"),  # UDP over IPv4
        (v2(1, 0x31, bytes(216)), "v2 address family unsupported"),  # unix stream
        (v2(1, 0x11, bytes(11)), "v2 address block too short"),
        (v2(1, 0x21, bytes(35)), "v2 address block too short"),
        (V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", V2_MAX_PAYLOAD + 1), "v2 header too long"),
        (V2_SIGNATURE[:5] + b"X", "no PROXY protocol header"),
    ],
)
def test_v2_malformed(data: bytes, reason: str) -> None:
    assert refused(data) == reason


def test_v2_needs_the_whole_declared_length() -> None:
    header = v2(1, 0x11, bytes(12) + bytes(100))
    for cut in (1, 12, 15, 16, 27, len(header) - 1):
        assert parse(header[:cut]) is NEED_MORE, cut
    assert parsed(header).rest == b""


def test_v2_largest_allowed_header() -> None:
    header = v2(1, 0x11, bytes(12) + b"\x04" + struct.pack("!H", V2_MAX_PAYLOAD - 15) + bytes(V2_MAX_PAYLOAD - 15))
    assert parsed(header + b"x").rest == b"x"


def test_encoders_exact_bytes() -> None:
    assert encode_v1(("192.0.2.1", 5), ("10.0.0.1", 25)) == b"PROXY TCP4 192.0.2.1 10.0.0.1 5 25\r\n"
    assert encode_v1(None, None) == b"PROXY UNKNOWN\r\n"
    assert encode_v2(("192.0.2.1", 5), ("10.0.0.1", 25)) == (
        b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c\xc0\x00\x02\x01\x0a\x00\x00\x01\x00\x05\x00\x19"
    )
    assert encode_v2(None, None) == b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00"
    assert encode("v1", ("::1", 1), ("::2", 2)) == b"PROXY TCP6 ::1 ::2 1 2\r\n"


def test_mixed_families_become_v4_mapped_v6() -> None:
    assert encode_v1(("192.0.2.1", 5), ("::1", 25)) == b"PROXY TCP6 ::ffff:c000:201 ::1 5 25\r\n"
    assert parsed(encode_v2(("::1", 5), ("10.0.0.1", 25))).header.destination == ("::ffff:a00:1", 25)


# ---------------------------------------------------------------- properties

ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
ports = st.integers(0, 65535)
endpoints = st.one_of(
    st.tuples(st.tuples(ipv4, ports), st.tuples(ipv4, ports)),
    st.tuples(st.tuples(ipv6, ports), st.tuples(ipv6, ports)),
)


@given(endpoints, st.sampled_from(["v1", "v2"]), st.binary(max_size=64))
def test_round_trip(addresses, version: str, rest: bytes) -> None:
    source, destination = addresses
    p = parsed(encode(version, source, destination) + rest)
    assert p.header == ProxyHeader(int(version[1]), source, destination)
    assert p.rest == rest


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)])]


def feed(chunks: list[bytes]):
    """What a reader does: append each chunk and parse until an answer; the
    leftover plus whatever the client sends next is the stream it replays."""
    buffer = b""
    for i, chunk in enumerate(chunks):
        buffer += chunk
        try:
            result = parse(buffer)
        except ProxyProtocolError as exc:
            return ("error", exc.reason)
        if isinstance(result, Parsed):
            return Parsed(result.header, result.rest + b"".join(chunks[i + 1 :]))
    return NEED_MORE


@given(endpoints, st.sampled_from(["v1", "v2"]), st.binary(max_size=32), st.lists(st.integers(0, 200)))
def test_any_chunking_gives_the_same_header(addresses, version: str, rest: bytes, cuts: list[int]) -> None:
    data = encode(version, *addresses) + rest
    result = feed(split(data, cuts))
    assert isinstance(result, Parsed)
    assert result.header == parsed(data).header
    assert result.rest == rest  # nothing lost, nothing duplicated, whatever the chunks


garbage = st.one_of(
    st.binary(max_size=300),
    st.binary(max_size=200).map(lambda b: b"PROXY " + b),
    st.binary(max_size=200).map(lambda b: V2_SIGNATURE + b),
    st.lists(st.sampled_from([b"PROXY", b" ", b"TCP4", b"TCP6", b"UNKNOWN", b"1.2.3.4", b"::1", b"99999", b"\r\n", b"\r", b"\n", b"0"]), max_size=12).map(b"".join),
)


@given(garbage, st.lists(st.integers(0, 400)))
def test_garbage_only_raises_the_modules_error(data: bytes, cuts: list[int]) -> None:
    try:
        whole = parse(data)
    except ProxyProtocolError as exc:
        whole = ("error", exc.reason)
    chunked = feed(split(data, cuts))
    # A prefix may already be refused where the whole is too (same reason
    # class), and a prefix can never succeed where the whole does not.
    if isinstance(whole, Parsed):
        assert chunked == whole
    elif whole is NEED_MORE:
        assert chunked is NEED_MORE
    else:
        assert isinstance(chunked, tuple) and chunked[0] == "error"
    if isinstance(whole, Parsed):
        assert len(data) - len(whole.rest) <= max(V1_MAX_LENGTH, 16 + V2_MAX_PAYLOAD)

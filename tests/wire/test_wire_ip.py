"""Version-independent IP: dispatch, fragments, routing fast path and address conversions."""

from __future__ import annotations

import contextlib
from ipaddress import IPv4Address, IPv6Address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from embedmesh.errors import ParseError
from embedmesh.wire.checksum import checksum
from embedmesh.wire.ip import (
    PROTO_ICMP,
    PROTO_ICMPV6,
    PROTO_TCP,
    PROTO_UDP,
    IpPacket,
    address_to_bytes,
    build_ip,
    bytes_to_address,
    destination_of,
    ip_version,
    parse_ip,
)
from embedmesh.wire.ipv4 import build_ipv4
from embedmesh.wire.ipv6 import build_ipv6

SRC4, DST4 = bytes([100, 64, 0, 1]), bytes([100, 64, 0, 2])
SRC6 = bytes.fromhex("fd7a115ca1e0ab12480000000000000a")
DST6 = bytes.fromhex("fd7a115ca1e0ab12480000000000000b")


def test_protocol_numbers() -> None:
    assert (PROTO_ICMP, PROTO_TCP, PROTO_UDP, PROTO_ICMPV6) == (1, 6, 17, 58)


def test_parse_ip_v4_and_v6() -> None:
    packet = parse_ip(build_ip(SRC4, DST4, PROTO_UDP, b"four", ttl=9))
    assert packet == IpPacket(4, SRC4, DST4, PROTO_UDP, 9, memoryview(b"four"))
    packet = parse_ip(build_ip(SRC6, DST6, PROTO_TCP, b"six", ttl=10))
    assert packet == IpPacket(6, SRC6, DST6, PROTO_TCP, 10, memoryview(b"six"))


def test_parse_ip_skips_ipv6_extension_headers() -> None:
    data = build_ipv6(SRC6, DST6, 60, bytes([PROTO_UDP, 0, 1, 4, 0, 0, 0, 0]) + b"udp")
    packet = parse_ip(data)
    assert packet.protocol == PROTO_UDP and bytes(packet.payload) == b"udp"


@pytest.mark.parametrize("flags_offset", [0x2000, 0x0001, 0x4001, 0x3FFF])
def test_parse_ip_refuses_ipv4_fragments(flags_offset: int) -> None:
    packet = bytearray(build_ipv4(SRC4, DST4, PROTO_UDP, bytes(16)))
    packet[6:8] = flags_offset.to_bytes(2, "big")
    packet[10:12] = b"\x00\x00"
    packet[10:12] = checksum(packet[:20]).to_bytes(2, "big")
    with pytest.raises(ParseError, match="fragmented IPv4 not supported"):
        parse_ip(packet)


def test_parse_ip_refuses_ipv6_fragments() -> None:
    with pytest.raises(ParseError, match="fragmented IPv6 not supported"):
        parse_ip(build_ipv6(SRC6, DST6, 44, bytes([PROTO_UDP, 0, 0, 0, 0, 0, 0, 1])))


@pytest.mark.parametrize(
    ("data", "message"), [(b"", "empty"), (b"\x50" + bytes(40), "version 5"), (bytes(40), "version 0")]
)
def test_version_errors(data: bytes, message: str) -> None:
    with pytest.raises(ParseError, match=message):
        ip_version(data)
    with pytest.raises(ParseError, match=message):
        parse_ip(data)
    with pytest.raises(ParseError, match=message):
        destination_of(data)


def test_ip_version() -> None:
    assert ip_version(b"\x45") == 4 and ip_version(bytearray(b"\x60")) == 6


def test_parse_ip_propagates_layer_errors() -> None:
    with pytest.raises(ParseError, match="IPv4 header checksum"):
        parse_ip(b"\x45\x00\x00\x14" + bytes(16))
    with pytest.raises(ParseError, match="IPv6 packet too short"):
        parse_ip(b"\x60" + bytes(19))


def test_build_ip_rejects_other_address_lengths() -> None:
    with pytest.raises(ValueError, match="4 or 16 bytes"):
        build_ip(bytes(5), bytes(5), PROTO_UDP, b"")
    with pytest.raises(ValueError):
        build_ip(SRC4, DST6, PROTO_UDP, b"")


def test_destination_of() -> None:
    assert destination_of(build_ip(SRC4, DST4, PROTO_UDP, b"")) == DST4
    assert destination_of(memoryview(build_ip(SRC6, DST6, PROTO_UDP, b""))) == DST6
    # The fast path deliberately skips the checksum.
    assert destination_of(b"\x45" + bytes(15) + DST4) == DST4
    with pytest.raises(ParseError, match="too short"):
        destination_of(b"\x45" + bytes(18))
    with pytest.raises(ParseError, match="too short"):
        destination_of(b"\x60" + bytes(38))


def test_address_conversions() -> None:
    assert address_to_bytes("100.64.0.1") == SRC4
    assert address_to_bytes(IPv4Address("100.64.0.2")) == DST4
    assert address_to_bytes("fd7a:115c:a1e0:ab12:4800::a") == SRC6
    assert address_to_bytes(IPv6Address("fd7a:115c:a1e0:ab12:4800::b")) == DST6
    assert bytes_to_address(SRC4) == IPv4Address("100.64.0.1")
    assert bytes_to_address(DST6) == IPv6Address("fd7a:115c:a1e0:ab12:4800::b")
    with pytest.raises(ValueError):
        address_to_bytes("not an address")
    with pytest.raises(ValueError, match="4 or 16 bytes"):
        bytes_to_address(bytes(5))


@given(
    address=st.one_of(st.binary(min_size=4, max_size=4), st.binary(min_size=16, max_size=16)),
)
def test_property_address_round_trip(address: bytes) -> None:
    assert address_to_bytes(bytes_to_address(address)) == address
    assert address_to_bytes(str(bytes_to_address(address))) == address


@given(
    v6=st.booleans(),
    data=st.data(),
    protocol=st.sampled_from([PROTO_ICMP, PROTO_TCP, PROTO_UDP, PROTO_ICMPV6]),
    payload=st.binary(max_size=300),
    ttl=st.integers(0, 255),
)
def test_property_round_trip(v6: bool, data: st.DataObject, protocol: int, payload: bytes, ttl: int) -> None:
    size = 16 if v6 else 4
    src = data.draw(st.binary(min_size=size, max_size=size))
    dst = data.draw(st.binary(min_size=size, max_size=size))
    raw = build_ip(src, dst, protocol, payload, ttl=ttl)
    assert parse_ip(raw) == IpPacket(6 if v6 else 4, src, dst, protocol, ttl, memoryview(payload))
    assert destination_of(raw) == dst


@given(st.binary(max_size=80))
def test_property_arbitrary_bytes_raise_only_parse_error(data: bytes) -> None:
    for function in (ip_version, parse_ip, destination_of):
        with contextlib.suppress(ParseError):
            function(data)

"""Packets captured from a real stack, and our checksums against a plain RFC 1071 reference.

The captures come from Linux 6.18 (x86_64): a TUN device ``tun0`` (10.0.0.1/24, fd00::1/64) in a fresh
network namespace, read from the TUN file descriptor. A TUN device without offloads makes the kernel
finish every checksum in software, so these are the bytes a real peer puts on the wire (loopback
captures would show partial, offloaded UDP checksums instead). Each capture is decoded field by field
below, checked against the reference checksum, parsed, and rebuilt byte for byte by our builders.
"""

from __future__ import annotations

from ipaddress import ip_address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from embedmesh.wire.checksum import checksum
from embedmesh.wire.icmp import (
    ICMPV4_PORT_UNREACHABLE,
    ICMPV6_PORT_UNREACHABLE,
    build_icmpv4_echo,
    build_icmpv4_unreachable,
    build_icmpv6_echo,
    build_icmpv6_unreachable,
    parse_icmpv4,
    parse_icmpv6,
)
from embedmesh.wire.ip import PROTO_ICMP, PROTO_ICMPV6, PROTO_UDP, parse_ip
from embedmesh.wire.ipv4 import build_ipv4, parse_ipv4
from embedmesh.wire.ipv6 import build_ipv6, parse_ipv6
from embedmesh.wire.udp import build_udp, parse_udp


def rfc1071_checksum(data: bytes) -> int:
    """The Internet checksum the slow, obvious way (RFC 1071 §4.1): add 16-bit words, fold carries,
    complement."""
    if len(data) % 2:
        data += b"\x00"
    total = 0
    for i in range(0, len(data), 2):
        total += data[i] << 8 | data[i + 1]
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def pseudo_v4(src: bytes, dst: bytes, protocol: int, length: int) -> bytes:
    return src + dst + bytes([0, protocol]) + length.to_bytes(2, "big")


def pseudo_v6(src: bytes, dst: bytes, protocol: int, length: int) -> bytes:
    return src + dst + length.to_bytes(4, "big") + bytes([0, 0, 0, protocol])


A4, B4 = ip_address("10.0.0.1").packed, ip_address("10.0.0.2").packed
A6, B6 = ip_address("fd00::1").packed, ip_address("fd00::2").packed

# UDP 10.0.0.1:40000 -> 10.0.0.2:5353, b"hello embedmesh\n": IPv4 ident 0xac39, DF, TTL 64, header
# checksum 0x7a85; UDP length 24, checksum 0xfce1.
UDP4 = bytes.fromhex(
    "4500002cac39400040117a850a0000010a0000029c4014e90018fce168656c6c6f20656d6265646d6573680a"
)
# UDP [fd00::1]:40001 -> [fd00::2]:5354, b"hello embedmesh v6\n": flow label 0xe176f, hop limit 64;
# UDP length 27, checksum 0x968b.
UDP6 = bytes.fromhex(
    "600e176f001b1140fd000000000000000000000000000001fd000000000000000000000000000002"
    "9c4114ea001b968b"
    "68656c6c6f20656d6265646d6573682076360a"
)
# `ping -c1 10.0.0.2` (iputils): echo request ident 0x0839, sequence 1, ICMP checksum 0x3ceb, 56
# data bytes: a 16-byte struct timeval, then the pattern 0x10, 0x11, ..., 0x37.
PING4 = bytes.fromhex(
    "45000054c59740004001610f0a0000010a000002"
    "08003ceb08390001"
    "c83a076b000000001a620a0000000000101112131415161718191a1b1c1d1e1f"
    "202122232425262728292a2b2c2d2e2f3031323334353637"
)
# `ping -6 -c1 fd00::2`: echo request ident 0x083b, sequence 1, checksum 0x2ff7, the same data layout.
PING6 = bytes.fromhex(
    "600dd56500403a40fd000000000000000000000000000001fd000000000000000000000000000002"
    "80002ff7083b0001"
    "c93a076b00000000b8d4050000000000101112131415161718191a1b1c1d1e1f"
    "202122232425262728292a2b2c2d2e2f3031323334353637"
)
# Written into tun0: UDP 10.0.0.2:40002 -> 10.0.0.1:9 (closed), b"probe\n". The kernel answered
# UNREACH4: TOS 0xc0 (internetwork control), DF clear, type 3 code 3, checksum 0x111f, quoting all 34
# bytes of the probe.
PROBE4 = bytes.fromhex("4500002212344000401114950a0000020a0000019c420009000e0aa570726f62650a")
UNREACH4 = bytes.fromhex("45c0003ec5e200004001a01a0a0000010a0000020303111f00000000") + PROBE4
# The same over IPv6 ([fd00::2]:40003 -> [fd00::1]:9); the kernel answered type 1 code 4, checksum
# 0x934f, quoting all 54 bytes.
PROBE6 = bytes.fromhex(
    "60000000000e1140fd000000000000000000000000000002fd000000000000000000000000000001"
    "9c430009000e24a270726f62650a"
)
UNREACH6 = (
    bytes.fromhex("600e1137003e3a40fd000000000000000000000000000001fd000000000000000000000000000002")
    + bytes.fromhex("0104934f00000000")
    + PROBE6
)
# tun0 coming up: a Router Solicitation (type 133) from a link-local address to ff02::2, hop limit 255.
ROUTER_SOLICITATION = bytes.fromhex(
    "6000000000083afffe80000000000000acf2044766286379ff0200000000000000000000000000028500025c00000000"
)


def test_rfc1071_example() -> None:
    # RFC 1071 §3's worked example: the words sum to 0xddf2, so the checksum is its complement.
    data = bytes.fromhex("0001f203f4f5f6f7")
    assert rfc1071_checksum(data) == checksum(data) == ~0xDDF2 & 0xFFFF


@given(st.binary(max_size=300), st.binary(max_size=40))
def test_checksum_matches_reference(data: bytes, prefix: bytes) -> None:
    assert checksum(data) == rfc1071_checksum(data)
    assert checksum(memoryview(prefix + data)[len(prefix) :]) == rfc1071_checksum(data)


@pytest.mark.parametrize("packet", [UDP4, PING4, PROBE4, UNREACH4])
def test_ipv4_header_checksums_match_reference(packet: bytes) -> None:
    header = bytearray(packet[:20])
    stated = header[10:12]
    header[10:12] = b"\x00\x00"
    assert rfc1071_checksum(bytes(header)).to_bytes(2, "big") == stated


def test_udp4_capture() -> None:
    assert (
        rfc1071_checksum(pseudo_v4(A4, B4, PROTO_UDP, 24) + UDP4[20:26] + b"\x00\x00" + UDP4[28:]) == 0xFCE1
    )
    header, payload = parse_ipv4(UDP4)
    assert (header.ident, header.dont_fragment, header.ttl, header.protocol) == (0xAC39, True, 64, PROTO_UDP)
    datagram = parse_udp(payload, header.src, header.dst)
    assert (datagram.src_port, datagram.dst_port) == (40000, 5353)
    assert bytes(datagram.payload) == b"hello embedmesh\n"
    udp = build_udp(A4, B4, 40000, 5353, b"hello embedmesh\n")
    assert build_ipv4(A4, B4, PROTO_UDP, udp, ident=0xAC39) == UDP4


def test_udp6_capture() -> None:
    assert (
        rfc1071_checksum(pseudo_v6(A6, B6, PROTO_UDP, 27) + UDP6[40:46] + b"\x00\x00" + UDP6[48:]) == 0x968B
    )
    header, protocol, payload = parse_ipv6(UDP6)
    assert (header.flow_label, header.hop_limit, protocol) == (0xE176F, 64, PROTO_UDP)
    datagram = parse_udp(payload, header.src, header.dst)
    assert (datagram.src_port, datagram.dst_port, bytes(datagram.payload)) == (
        40001,
        5354,
        b"hello embedmesh v6\n",
    )
    udp = build_udp(A6, B6, 40001, 5354, b"hello embedmesh v6\n")
    assert build_ipv6(A6, B6, PROTO_UDP, udp, flow_label=0xE176F) == UDP6


def test_ping4_capture() -> None:
    assert rfc1071_checksum(PING4[20:22] + b"\x00\x00" + PING4[24:]) == 0x3CEB
    packet = parse_ip(PING4)
    assert packet.protocol == PROTO_ICMP
    message = parse_icmpv4(packet.payload)
    assert (message.type, message.code, message.ident, message.sequence) == (8, 0, 0x0839, 1)
    assert bytes(message.payload[16:]) == bytes(range(0x10, 0x38))
    assert build_icmpv4_echo(8, 0x0839, 1, message.payload) == PING4[20:]
    # The reply a stack sends back differs only in type and checksum (RFC 1624 incremental update).
    reply = build_icmpv4_echo(0, 0x0839, 1, message.payload)
    assert reply[0] == 0 and int.from_bytes(reply[2:4], "big") == 0x3CEB + 0x0800


def test_ping6_capture() -> None:
    assert (
        rfc1071_checksum(pseudo_v6(A6, B6, PROTO_ICMPV6, 64) + PING6[40:42] + b"\x00\x00" + PING6[44:])
        == 0x2FF7
    )
    packet = parse_ip(PING6)
    message = parse_icmpv6(packet.payload, packet.src, packet.dst)
    assert (message.type, message.code, message.ident, message.sequence) == (128, 0, 0x083B, 1)
    assert build_icmpv6_echo(A6, B6, 128, 0x083B, 1, message.payload) == PING6[40:]


def test_ipv4_port_unreachable_matches_the_kernel() -> None:
    packet = parse_ip(UNREACH4)
    message = parse_icmpv4(packet.payload)
    assert (message.type, message.code, bytes(message.payload)) == (3, 3, PROBE4)
    assert build_icmpv4_unreachable(ICMPV4_PORT_UNREACHABLE, PROBE4) == UNREACH4[20:]


def test_ipv6_port_unreachable_matches_the_kernel() -> None:
    packet = parse_ip(UNREACH6)
    message = parse_icmpv6(packet.payload, packet.src, packet.dst)
    assert (message.type, message.code, bytes(message.payload)) == (1, 4, PROBE6)
    assert build_icmpv6_unreachable(A6, B6, ICMPV6_PORT_UNREACHABLE, PROBE6) == UNREACH6[40:]


def test_router_solicitation_parses_as_generic_icmpv6() -> None:
    packet = parse_ip(ROUTER_SOLICITATION)
    assert (packet.ttl, packet.protocol) == (255, PROTO_ICMPV6)
    message = parse_icmpv6(packet.payload, packet.src, packet.dst)
    assert (message.type, message.code, len(message.payload)) == (133, 0, 0)

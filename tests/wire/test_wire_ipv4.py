"""IPv4 header: known vectors, round trips, every validation error, and properties."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from embedmesh.errors import ParseError
from embedmesh.wire.checksum import checksum
from embedmesh.wire.ip import PROTO_TCP, PROTO_UDP
from embedmesh.wire.ipv4 import (
    FLAG_DF,
    FLAG_MF,
    IPv4Header,
    build_ipv4,
    build_ipv4_summed,
    header_partial_sum,
    parse_ipv4,
)

SRC = bytes([192, 168, 0, 1])
DST = bytes([192, 168, 0, 199])

addresses = st.binary(min_size=4, max_size=4)
bytes8 = st.integers(0, 0xFF)
bytes16 = st.integers(0, 0xFFFF)


def raw_header(
    *,
    version_ihl: int = 0x45,
    total_length: int = 20,
    flags_offset: int = 0x4000,
    options: bytes = b"",
    fix_checksum: bool = True,
) -> bytearray:
    """A hand-built header (any field value, valid checksum unless told otherwise)."""
    header = bytearray(
        struct.pack("!BBHHHBBH4s4s", version_ihl, 0, total_length, 1, flags_offset, 64, 17, 0, SRC, DST)
    )
    header += options
    if fix_checksum:
        header[10:12] = checksum(header).to_bytes(2, "big")
    return header


def test_wikipedia_header_checksum_example() -> None:
    # The worked example of https://en.wikipedia.org/wiki/Internet_checksum: checksum 0xB861.
    header = bytes.fromhex("450000730000400040110000c0a80001c0a800c7")
    assert checksum(header) == 0xB861
    packet = header[:10] + b"\xb8\x61" + header[12:] + bytes(0x73 - 20)
    parsed, payload = parse_ipv4(packet)
    assert parsed == IPv4Header(
        src=SRC,
        dst=DST,
        protocol=PROTO_UDP,
        ttl=64,
        ident=0,
        flags=FLAG_DF,
        fragment_offset=0,
        tos=0,
        header_length=20,
        total_length=0x73,
    )
    assert len(payload) == 0x73 - 20
    assert build_ipv4(SRC, DST, PROTO_UDP, payload) == packet


def test_round_trip_and_zero_copy() -> None:
    packet = bytearray(build_ipv4(SRC, DST, PROTO_TCP, b"payload", ttl=7, ident=0x1234, tos=0xB8))
    header, payload = parse_ipv4(packet)
    assert (header.src, header.dst, header.protocol, header.ttl) == (SRC, DST, PROTO_TCP, 7)
    assert (header.ident, header.tos, header.total_length) == (0x1234, 0xB8, 27)
    assert header.dont_fragment and not header.more_fragments and not header.is_fragment
    assert isinstance(payload, memoryview) and payload.obj is packet
    assert bytes(payload) == b"payload"


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_accepts_any_buffer(kind: type) -> None:
    header, payload = parse_ipv4(kind(build_ipv4(SRC, DST, 1, b"x")))
    assert header.src == SRC and bytes(payload) == b"x"


def test_dont_fragment_off() -> None:
    header, _ = parse_ipv4(build_ipv4(SRC, DST, 1, b"", dont_fragment=False))
    assert header.flags == 0 and not header.dont_fragment


def test_trailing_padding_is_not_payload() -> None:
    # WireGuard pads plaintext to 16 bytes; Ethernet pads to 60. Total Length decides.
    header, payload = parse_ipv4(build_ipv4(SRC, DST, 1, b"abc") + bytes(13))
    assert bytes(payload) == b"abc" and header.total_length == 23


def test_options_are_skipped() -> None:
    options = b"\x01\x01\x01\x00"  # NOP NOP NOP EOL (RFC 791)
    packet = raw_header(version_ihl=0x46, total_length=28, options=options) + b"data"
    header, payload = parse_ipv4(packet)
    assert header.header_length == 24 and bytes(payload) == b"data"


def test_fragment_fields() -> None:
    packet = raw_header(total_length=28, flags_offset=FLAG_MF << 13 | 185) + bytes(8)
    header, _ = parse_ipv4(packet)
    assert header.more_fragments and header.is_fragment and not header.dont_fragment
    assert header.fragment_offset == 185 * 8


@pytest.mark.parametrize(
    ("packet", "message"),
    [
        (b"", "too short"),
        (bytes(19), "too short"),
        (raw_header(version_ihl=0x65), "version 6"),
        (raw_header(version_ihl=0x44), "below the minimum"),
        (raw_header(total_length=19), "shorter than its header"),
        (raw_header(version_ihl=0x4F, total_length=60), "exceeds"),
        (raw_header(total_length=21), "exceeds the 20 bytes"),
        (raw_header(fix_checksum=False), "checksum"),
    ],
)
def test_parse_errors(packet: bytes, message: str) -> None:
    with pytest.raises(ParseError, match=message):
        parse_ipv4(packet)


def test_corrupted_header_fails_checksum() -> None:
    packet = bytearray(build_ipv4(SRC, DST, 1, b""))
    packet[8] ^= 0x01  # TTL
    with pytest.raises(ParseError, match="checksum"):
        parse_ipv4(packet)


@pytest.mark.parametrize(
    ("kwargs", "payload"),
    [
        ({"src": b"\x00" * 16}, b""),
        ({"dst": b"\x00" * 3}, b""),
        ({}, bytes(65516)),
        ({"ttl": 256}, b""),
        ({"ident": -1}, b""),
        ({"tos": 300}, b""),
    ],
)
def test_build_rejects_bad_fields(kwargs: dict[str, object], payload: bytes) -> None:
    args: dict[str, object] = {"src": SRC, "dst": DST, "protocol": 1, "payload": payload, **kwargs}
    with pytest.raises(ValueError):
        build_ipv4(**args)  # type: ignore[arg-type]


def test_build_largest_payload() -> None:
    header, payload = parse_ipv4(build_ipv4(SRC, DST, 1, bytes(65515)))
    assert header.total_length == 65535 and len(payload) == 65515


@given(
    src=addresses,
    dst=addresses,
    protocol=bytes8,
    payload=st.binary(max_size=1500),
    ttl=bytes8,
    ident=bytes16,
    tos=bytes8,
    dont_fragment=st.booleans(),
)
def test_property_round_trip(
    src: bytes, dst: bytes, protocol: int, payload: bytes, ttl: int, ident: int, tos: int, dont_fragment: bool
) -> None:
    packet = build_ipv4(
        src, dst, protocol, payload, ttl=ttl, ident=ident, tos=tos, dont_fragment=dont_fragment
    )
    header, parsed_payload = parse_ipv4(packet)
    assert header == IPv4Header(
        src, dst, protocol, ttl, ident, FLAG_DF if dont_fragment else 0, 0, tos, 20, 20 + len(payload)
    )
    assert parsed_payload == payload


@given(st.binary(max_size=80))
def test_property_arbitrary_bytes_raise_only_parse_error(data: bytes) -> None:
    try:
        header, payload = parse_ipv4(data)
    except ParseError:
        return
    assert len(payload) == header.total_length - header.header_length


@given(st.binary(min_size=20, max_size=80).map(lambda b: bytes([0x40 | (b[0] & 0x0F)]) + b[1:]))
def test_property_version_4_garbage_raises_only_parse_error(data: bytes) -> None:
    with contextlib.suppress(ParseError):
        parse_ipv4(data)


@given(payload=st.binary(max_size=64), ident=bytes16, data=st.data())
def test_property_header_bit_flip_is_detected(payload: bytes, ident: int, data: st.DataObject) -> None:
    packet = bytearray(build_ipv4(SRC, DST, PROTO_UDP, payload, ident=ident))
    original = parse_ipv4(bytes(packet))
    bit = data.draw(st.integers(0, 20 * 8 - 1))
    packet[bit // 8] ^= 0x80 >> (bit % 8)
    try:
        flipped = parse_ipv4(packet)
    except ParseError:
        return
    # A single flipped bit changes the one's-complement sum, so only a reinterpreted header (a
    # different header length) could pass; then a field differs.
    assert flipped[0] != original[0]


@given(
    st.binary(min_size=4, max_size=4),
    st.binary(min_size=4, max_size=4),
    st.integers(0, 255),
    st.integers(1, 255),
    st.binary(max_size=1500),
)
def test_build_ipv4_summed_is_build_ipv4(
    src: bytes, dst: bytes, protocol: int, ttl: int, payload: bytes
) -> None:
    partial = header_partial_sum(src, dst, protocol, ttl=ttl)
    packet = build_ipv4_summed(partial, src, dst, protocol, payload, ttl=ttl)
    assert packet == build_ipv4(src, dst, protocol, payload, ttl=ttl)
    header, body = parse_ipv4(packet)
    assert bytes(body) == payload and header.total_length == 20 + len(payload)

"""UDP over IPv4 and IPv6: round trips, checksum rules, every validation error and properties."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from embedmesh.errors import ParseError
from embedmesh.wire.checksum import ones_sum, pseudo_header_sum
from embedmesh.wire.ip import PROTO_UDP
from embedmesh.wire.udp import UdpDatagram, build_udp, parse_udp

SRC4, DST4 = bytes([100, 64, 0, 1]), bytes([100, 64, 0, 2])
SRC6 = bytes.fromhex("fd7a115ca1e0ab12480000000000000a")
DST6 = bytes.fromhex("fd7a115ca1e0ab12480000000000000b")
PAIRS = [(SRC4, DST4), (SRC6, DST6)]


@pytest.mark.parametrize(("src", "dst"), PAIRS)
def test_round_trip_and_zero_copy(src: bytes, dst: bytes) -> None:
    data = bytearray(build_udp(src, dst, 40000, 53, b"query"))
    assert data[:6] == bytes.fromhex("9c400035000d")
    datagram = parse_udp(data, src, dst)
    assert datagram == UdpDatagram(40000, 53, memoryview(b"query"))
    assert datagram.payload.obj is data


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_accepts_any_buffer(kind: type) -> None:
    assert bytes(parse_udp(kind(build_udp(SRC4, DST4, 1, 2, b"x")), SRC4, DST4).payload) == b"x"


def test_ipv4_zero_checksum_means_none() -> None:
    data = bytearray(build_udp(SRC4, DST4, 1, 2, b"unchecked"))
    data[6:8] = b"\x00\x00"
    data[-1] ^= 0xFF  # not covered by any checksum any more
    assert parse_udp(data, SRC4, DST4).src_port == 1


def test_ipv6_zero_checksum_is_invalid() -> None:
    data = bytearray(build_udp(SRC6, DST6, 1, 2, b"x"))
    data[6:8] = b"\x00\x00"
    with pytest.raises(ParseError, match="zero checksum"):
        parse_udp(data, SRC6, DST6)
    assert parse_udp(data, SRC6, DST6, verify_checksum=False).dst_port == 2


def test_verify_checksum_false_skips_verification() -> None:
    data = bytearray(build_udp(SRC4, DST4, 1, 2, b"x"))
    data[-1] ^= 1
    with pytest.raises(ParseError, match="UDP checksum mismatch"):
        parse_udp(data, SRC4, DST4)
    assert bytes(parse_udp(data, SRC4, DST4, verify_checksum=False).payload) == b"y"


def test_checksum_covers_the_pseudo_header() -> None:
    data = build_udp(SRC4, DST4, 1, 2, b"x")
    with pytest.raises(ParseError, match="checksum mismatch"):
        parse_udp(data, SRC4, bytes([100, 64, 0, 3]))


def test_bytes_past_the_length_field_are_ignored() -> None:
    data = build_udp(SRC4, DST4, 1, 2, b"abc")
    datagram = parse_udp(data + b"pad", SRC4, DST4)
    assert bytes(datagram.payload) == b"abc"


def payload_with_zero_checksum(src: bytes, dst: bytes) -> bytes:
    """A 2-byte payload chosen so that the computed checksum is 0 (the sum is exactly 0xFFFF)."""
    partial = ones_sum(b"\x00\x00", pseudo_header_sum(src, dst, PROTO_UDP, 10) + 1 + 2 + 10)
    return (0xFFFF - partial).to_bytes(2, "big")


@pytest.mark.parametrize(("src", "dst"), PAIRS)
def test_computed_zero_is_sent_as_all_ones(src: bytes, dst: bytes) -> None:
    payload = payload_with_zero_checksum(src, dst)
    data = build_udp(src, dst, 1, 2, payload)
    assert data[6:8] == b"\xff\xff"  # RFC 768: zero would mean "no checksum"
    assert bytes(parse_udp(data, src, dst).payload) == payload


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "too short"),
        (bytes(7), "too short"),
        (bytes.fromhex("0001000200070000"), "shorter than the header"),
        (bytes.fromhex("0001000200000000"), "shorter than the header"),
        (bytes.fromhex("0001000200090000"), "exceeds the 8 bytes"),
        (build_udp(SRC4, DST4, 1, 2, b"abc")[:-1], "exceeds"),
    ],
)
def test_parse_errors(data: bytes, message: str) -> None:
    with pytest.raises(ParseError, match=message):
        parse_udp(data, SRC4, DST4)


@pytest.mark.parametrize(
    "args",
    [
        (SRC4, DST6, 1, 2, b""),
        (bytes(5), bytes(5), 1, 2, b""),
        (SRC4, DST4, -1, 2, b""),
        (SRC4, DST4, 1, 65536, b""),
        (SRC6, DST6, 1, 2, bytes(65528)),
    ],
)
def test_build_rejects_bad_arguments(args: tuple[bytes, bytes, int, int, bytes]) -> None:
    with pytest.raises(ValueError):
        build_udp(*args)


def test_largest_datagram() -> None:
    data = build_udp(SRC6, DST6, 1, 2, bytes(65527))
    assert len(parse_udp(data, SRC6, DST6).payload) == 65527


pairs = st.one_of(
    st.tuples(st.binary(min_size=4, max_size=4), st.binary(min_size=4, max_size=4)),
    st.tuples(st.binary(min_size=16, max_size=16), st.binary(min_size=16, max_size=16)),
)
ports = st.integers(0, 0xFFFF)


@given(addresses=pairs, src_port=ports, dst_port=ports, payload=st.binary(max_size=1500))
def test_property_round_trip(
    addresses: tuple[bytes, bytes], src_port: int, dst_port: int, payload: bytes
) -> None:
    src, dst = addresses
    data = build_udp(src, dst, src_port, dst_port, payload)
    assert data[6:8] != b"\x00\x00"
    assert parse_udp(data, src, dst) == UdpDatagram(src_port, dst_port, memoryview(payload))


@given(data=st.binary(max_size=100), addresses=pairs, verify=st.booleans())
def test_property_arbitrary_bytes_raise_only_parse_error(
    data: bytes, addresses: tuple[bytes, bytes], verify: bool
) -> None:
    try:
        datagram = parse_udp(data, *addresses, verify_checksum=verify)
    except ParseError:
        return
    assert len(datagram.payload) <= len(data) - 8


@given(addresses=pairs, payload=st.binary(max_size=64), data=st.data())
def test_property_bit_flip_is_detected(
    addresses: tuple[bytes, bytes], payload: bytes, data: st.DataObject
) -> None:
    src, dst = addresses
    datagram = bytearray(build_udp(src, dst, 4242, 53, payload))
    original = parse_udp(bytes(datagram), src, dst)
    bit = data.draw(st.integers(0, len(datagram) * 8 - 1))
    datagram[bit // 8] ^= 0x80 >> (bit % 8)
    try:
        flipped = parse_udp(datagram, src, dst)
    except ParseError:
        return
    # The only undetectable flip: on IPv4 a checksum turned into 0 now means "no checksum".
    assert len(src) == 4 and datagram[6:8] == b"\x00\x00"
    assert flipped == original

"""ICMPv4 and ICMPv6: echo and destination unreachable, quoting limits, errors and properties."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from embedmesh.errors import ParseError
from embedmesh.wire.icmp import (
    ICMPV4_DEST_UNREACH,
    ICMPV4_ECHO_REPLY,
    ICMPV4_ECHO_REQUEST,
    ICMPV4_FRAGMENTATION_NEEDED,
    ICMPV4_PORT_UNREACHABLE,
    ICMPV6_DEST_UNREACH,
    ICMPV6_ECHO_REPLY,
    ICMPV6_ECHO_REQUEST,
    ICMPV6_PORT_UNREACHABLE,
    IcmpMessage,
    build_icmpv4_echo,
    build_icmpv4_unreachable,
    build_icmpv6_echo,
    build_icmpv6_unreachable,
    parse_icmpv4,
    parse_icmpv6,
)
from embedmesh.wire.ip import PROTO_UDP, build_ip, parse_ip
from embedmesh.wire.ipv4 import build_ipv4
from embedmesh.wire.ipv6 import build_ipv6

SRC4, DST4 = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])
SRC6 = bytes.fromhex("fd000000000000000000000000000001")
DST6 = bytes.fromhex("fd000000000000000000000000000002")


def test_constants() -> None:
    assert (ICMPV4_ECHO_REPLY, ICMPV4_DEST_UNREACH, ICMPV4_ECHO_REQUEST, ICMPV4_PORT_UNREACHABLE) == (
        0,
        3,
        8,
        3,
    )
    assert (ICMPV6_DEST_UNREACH, ICMPV6_ECHO_REQUEST, ICMPV6_ECHO_REPLY, ICMPV6_PORT_UNREACHABLE) == (
        1,
        128,
        129,
        4,
    )


def test_icmpv4_echo_round_trip_and_zero_copy() -> None:
    data = bytearray(build_icmpv4_echo(ICMPV4_ECHO_REQUEST, 0x1234, 7, b"ping!"))
    message = parse_icmpv4(data)
    assert message == IcmpMessage(8, 0, 0x1234, 7, memoryview(b"ping!"))
    assert message.payload.obj is data


def test_icmpv6_echo_round_trip() -> None:
    data = build_icmpv6_echo(SRC6, DST6, ICMPV6_ECHO_REPLY, 1, 65535, b"odd")
    assert parse_icmpv6(data, SRC6, DST6) == IcmpMessage(129, 0, 1, 65535, memoryview(b"odd"))


def test_icmpv6_checksum_covers_the_addresses() -> None:
    data = build_icmpv6_echo(SRC6, DST6, ICMPV6_ECHO_REQUEST, 1, 1, b"")
    with pytest.raises(ParseError, match="ICMPv6 checksum mismatch"):
        parse_icmpv6(data, DST6, SRC6[:-1] + b"\x03")


def test_checksum_field_may_be_zero() -> None:
    # Unlike UDP, ICMP has no "no checksum" value: 0x0800 + 0xF7FF sums to 0xFFFF, so the checksum is
    # 0x0000 and must verify.
    data = build_icmpv4_echo(ICMPV4_ECHO_REQUEST, 0xF7FF, 0, b"")
    assert data[2:4] == b"\x00\x00"
    assert parse_icmpv4(data).ident == 0xF7FF


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "too short"),
        (bytes(7), "too short"),
        (bytes(8), "checksum mismatch"),
        (build_icmpv4_echo(8, 1, 2, b"abc")[:-1], "checksum mismatch"),
        (build_icmpv4_echo(8, 1, 2, b"abc") + b"\x00\x01", "checksum mismatch"),
    ],
)
def test_icmpv4_parse_errors(data: bytes, message: str) -> None:
    with pytest.raises(ParseError, match=message):
        parse_icmpv4(data)


@pytest.mark.parametrize(
    ("data", "message"),
    [(bytes(7), "too short"), (build_icmpv6_echo(SRC6, DST6, 128, 1, 2, b"ab")[:-1], "checksum mismatch")],
)
def test_icmpv6_parse_errors(data: bytes, message: str) -> None:
    with pytest.raises(ParseError, match=message):
        parse_icmpv6(data, SRC6, DST6)


def test_icmpv4_and_icmpv6_checksums_differ() -> None:
    # ICMPv6 includes the pseudo-header (RFC 4443 §2.3), ICMPv4 does not.
    with pytest.raises(ParseError):
        parse_icmpv4(build_icmpv6_echo(SRC6, DST6, 128, 1, 1, b""))


@pytest.mark.parametrize(
    "call",
    [
        lambda: build_icmpv4_echo(3, 1, 1, b""),
        lambda: build_icmpv4_echo(8, 1 << 16, 1, b""),
        lambda: build_icmpv4_echo(8, 1, -1, b""),
        lambda: build_icmpv6_echo(SRC6, DST6, 8, 1, 1, b""),
        lambda: build_icmpv6_echo(SRC4, DST4, 128, 1, 1, b""),
        lambda: build_icmpv4_unreachable(256, b""),
        lambda: build_icmpv6_unreachable(SRC4, DST6, 4, b""),
    ],
)
def test_build_rejects_bad_arguments(call: object) -> None:
    with pytest.raises(ValueError):
        call()  # type: ignore[operator]


def test_icmpv4_unreachable_quotes_whole_small_datagram() -> None:
    original = build_ip(DST4, SRC4, PROTO_UDP, b"\x9c\x40\x00\x35\x00\x0cXXabcd")
    message = parse_icmpv4(build_icmpv4_unreachable(ICMPV4_PORT_UNREACHABLE, original))
    assert (message.type, message.code, message.ident, message.sequence) == (3, 3, 0, 0)
    assert bytes(message.payload) == original


def test_icmpv4_unreachable_quote_is_limited_to_576_bytes() -> None:
    original = build_ipv4(DST4, SRC4, PROTO_UDP, bytes(1400))
    data = build_icmpv4_unreachable(ICMPV4_PORT_UNREACHABLE, original)
    # RFC 1812 §4.3.2.3: the whole ICMP datagram, with a 20-byte IP header, fits in 576 bytes.
    assert 20 + len(data) == 576
    assert bytes(parse_icmpv4(data).payload) == original[:548]


def test_icmpv4_unreachable_does_not_quote_padding() -> None:
    original = build_ipv4(DST4, SRC4, PROTO_UDP, bytes(10))
    message = parse_icmpv4(build_icmpv4_unreachable(ICMPV4_PORT_UNREACHABLE, original + bytes(2)))
    assert bytes(message.payload) == original


def test_icmpv4_unreachable_quotes_garbage_as_given() -> None:
    # A Total Length below 20 is not believable; the quote is then whatever the caller passed.
    message = parse_icmpv4(build_icmpv4_unreachable(1, b"\x45\x00\x00\x05junk"))
    assert bytes(message.payload) == b"\x45\x00\x00\x05junk"
    assert len(parse_icmpv4(build_icmpv4_unreachable(1, b"\x45")).payload) == 1


def test_icmpv4_fragmentation_needed_carries_next_hop_mtu() -> None:
    original = build_ipv4(DST4, SRC4, PROTO_UDP, bytes(1400))
    message = parse_icmpv4(build_icmpv4_unreachable(ICMPV4_FRAGMENTATION_NEEDED, original, next_hop_mtu=1420))
    assert (message.code, message.ident, message.sequence) == (4, 0, 1420)


def test_icmpv6_unreachable_quote_is_limited_to_1280_bytes() -> None:
    original = build_ipv6(DST6, SRC6, PROTO_UDP, bytes(1400))
    data = build_icmpv6_unreachable(SRC6, DST6, ICMPV6_PORT_UNREACHABLE, original)
    assert 40 + len(data) == 1280
    message = parse_icmpv6(data, SRC6, DST6)
    assert (message.type, message.code, message.ident, message.sequence) == (1, 4, 0, 0)
    assert bytes(message.payload) == original[:1232]
    whole = parse_ip(build_ip(SRC6, DST6, 58, data))
    assert len(whole.payload) == len(data)


def test_icmpv6_unreachable_quotes_small_datagram_without_padding() -> None:
    original = build_ipv6(DST6, SRC6, PROTO_UDP, bytes(10))
    message = parse_icmpv6(build_icmpv6_unreachable(SRC6, DST6, 4, original + bytes(6)), SRC6, DST6)
    assert bytes(message.payload) == original
    assert len(parse_icmpv6(build_icmpv6_unreachable(SRC6, DST6, 4, b"\x60"), SRC6, DST6).payload) == 1


@given(
    type_=st.sampled_from([ICMPV4_ECHO_REQUEST, ICMPV4_ECHO_REPLY]),
    ident=st.integers(0, 0xFFFF),
    sequence=st.integers(0, 0xFFFF),
    payload=st.binary(max_size=300),
)
def test_property_icmpv4_echo_round_trip(type_: int, ident: int, sequence: int, payload: bytes) -> None:
    assert parse_icmpv4(build_icmpv4_echo(type_, ident, sequence, payload)) == IcmpMessage(
        type_, 0, ident, sequence, memoryview(payload)
    )


@given(
    src=st.binary(min_size=16, max_size=16),
    dst=st.binary(min_size=16, max_size=16),
    type_=st.sampled_from([ICMPV6_ECHO_REQUEST, ICMPV6_ECHO_REPLY]),
    ident=st.integers(0, 0xFFFF),
    sequence=st.integers(0, 0xFFFF),
    payload=st.binary(max_size=300),
)
def test_property_icmpv6_echo_round_trip(
    src: bytes, dst: bytes, type_: int, ident: int, sequence: int, payload: bytes
) -> None:
    data = build_icmpv6_echo(src, dst, type_, ident, sequence, payload)
    assert parse_icmpv6(data, src, dst) == IcmpMessage(type_, 0, ident, sequence, memoryview(payload))


@given(code=st.integers(0, 15), original=st.binary(max_size=2000))
def test_property_unreachable_round_trip(code: int, original: bytes) -> None:
    message = parse_icmpv4(build_icmpv4_unreachable(code, original))
    assert (message.type, message.code) == (ICMPV4_DEST_UNREACH, code)
    assert original.startswith(bytes(message.payload)) and len(message.payload) <= 548
    message = parse_icmpv6(build_icmpv6_unreachable(SRC6, DST6, code, original), SRC6, DST6)
    assert (message.type, message.code) == (ICMPV6_DEST_UNREACH, code)
    assert original.startswith(bytes(message.payload)) and len(message.payload) <= 1232


@given(st.binary(max_size=100))
def test_property_arbitrary_bytes_raise_only_parse_error(data: bytes) -> None:
    for parse in (parse_icmpv4, lambda d: parse_icmpv6(d, SRC6, DST6)):
        with contextlib.suppress(ParseError):
            parse(data)


@given(v6=st.booleans(), payload=st.binary(max_size=64), ident=st.integers(0, 0xFFFF), data=st.data())
def test_property_bit_flip_is_detected(v6: bool, payload: bytes, ident: int, data: st.DataObject) -> None:
    if v6:
        message = bytearray(build_icmpv6_echo(SRC6, DST6, ICMPV6_ECHO_REQUEST, ident, 1, payload))
    else:
        message = bytearray(build_icmpv4_echo(ICMPV4_ECHO_REQUEST, ident, 1, payload))
    bit = data.draw(st.integers(0, len(message) * 8 - 1))
    message[bit // 8] ^= 0x80 >> (bit % 8)
    # The checksum covers every byte, and one flipped bit always changes a one's-complement sum.
    with pytest.raises(ParseError, match="checksum mismatch"):
        if v6:
            parse_icmpv6(message, SRC6, DST6)
        else:
            parse_icmpv4(message)

"""IPv6 header and extension headers: round trips, every validation error, and properties."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from embedmesh.errors import ParseError
from embedmesh.wire.ip import PROTO_ICMPV6, PROTO_UDP
from embedmesh.wire.ipv6 import IPv6Header, build_ipv6, parse_ipv6

SRC = bytes.fromhex("fd000000000000000000000000000001")
DST = bytes.fromhex("fd000000000000000000000000000002")

HOP_BY_HOP, ROUTING, FRAGMENT, NO_NEXT, DEST_OPTS = 0, 43, 44, 59, 60


def ext(next_header: int, body: bytes) -> bytes:
    """An extension header: Next Header, Hdr Ext Len (8-octet units beyond the first), ``body``."""
    assert (len(body) + 2) % 8 == 0
    return bytes([next_header, (len(body) + 2) // 8 - 1]) + body


def packet(next_header: int, payload: bytes) -> bytes:
    return build_ipv6(SRC, DST, next_header, payload)


def test_round_trip_and_zero_copy() -> None:
    data = bytearray(
        build_ipv6(SRC, DST, PROTO_UDP, b"hello", hop_limit=3, traffic_class=0xB8, flow_label=0xABCDE)
    )
    assert data[:4] == bytes.fromhex("6b8abcde")
    header, protocol, payload = parse_ipv6(data)
    assert header == IPv6Header(SRC, DST, PROTO_UDP, 3, 5, 0xB8, 0xABCDE)
    assert protocol == PROTO_UDP and bytes(payload) == b"hello"
    assert isinstance(payload, memoryview) and payload.obj is data


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_accepts_any_buffer(kind: type) -> None:
    _, protocol, payload = parse_ipv6(kind(packet(PROTO_UDP, b"x")))
    assert protocol == PROTO_UDP and bytes(payload) == b"x"


def test_trailing_bytes_are_not_payload() -> None:
    _, _, payload = parse_ipv6(packet(PROTO_UDP, b"abc") + bytes(13))
    assert bytes(payload) == b"abc"


def test_extension_header_chain_is_skipped() -> None:
    hop_by_hop = ext(ROUTING, b"\x01\x04\x00\x00\x00\x00")  # PadN of 4
    routing = ext(DEST_OPTS, b"\x04\x00\x00\x00\x00\x00")  # type 4 (SRH), segments left 0
    # Pad1, an unknown option whose action bits are 00 (skip), then PadN; 14 bytes of options.
    dest_opts = ext(PROTO_UDP, b"\x00\x1e\x02\xaa\xbb\x01\x07" + bytes(7))
    header, protocol, payload = parse_ipv6(packet(HOP_BY_HOP, hop_by_hop + routing + dest_opts + b"udp"))
    assert header.next_header == HOP_BY_HOP and header.payload_length == 8 + 8 + 16 + 3
    assert protocol == PROTO_UDP and bytes(payload) == b"udp"


def test_no_next_header_ignores_what_follows() -> None:
    _, protocol, payload = parse_ipv6(packet(DEST_OPTS, ext(NO_NEXT, bytes(6)) + b"ignored"))
    assert protocol == NO_NEXT and len(payload) == 0
    _, protocol, payload = parse_ipv6(packet(NO_NEXT, b"ignored"))
    assert protocol == NO_NEXT and len(payload) == 0


def test_unknown_next_header_is_returned_as_protocol() -> None:
    # ESP (50) is for the caller to refuse; the parser hands it up with its payload.
    _, protocol, payload = parse_ipv6(packet(50, b"esp"))
    assert protocol == 50 and bytes(payload) == b"esp"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "too short"),
        (bytes(39), "too short"),
        (b"\x40" + bytes(39), "version 4"),
        (build_ipv6(SRC, DST, PROTO_UDP, b"abcd")[:-1], "exceeds"),
        (packet(FRAGMENT, bytes([PROTO_UDP, 0, 0, 0, 0, 0, 0, 1]) + b"x"), "fragmented IPv6 not supported"),
        (packet(DEST_OPTS, ext(FRAGMENT, bytes(6))), "fragmented IPv6 not supported"),
        (packet(HOP_BY_HOP, b"\x11"), "truncated"),
        (packet(HOP_BY_HOP, b""), "truncated"),
        (packet(HOP_BY_HOP, bytes([PROTO_UDP, 1]) + bytes(6)), "overruns the payload"),
        (packet(ROUTING, ext(PROTO_UDP, b"\x04\x02" + bytes(4))), "2 segments left"),
        (packet(DEST_OPTS, ext(HOP_BY_HOP, bytes(6)) + ext(PROTO_UDP, bytes(6))), "not directly after"),
        (packet(DEST_OPTS, ext(PROTO_UDP, b"\x00\x00\x00\x00\x00\x01")), "option 0x01 truncated"),
        (packet(DEST_OPTS, ext(PROTO_UDP, b"\x01\x05\x00\x00\x00\x00")), "overruns its extension header"),
        # Jumbo Payload (0xC2, action 11) and an experiment (0x5E, action 01): discard (RFC 8200 §4.2).
        (packet(HOP_BY_HOP, ext(PROTO_UDP, b"\xc2\x04\x00\x01\x00\x00")), "0xc2 requires discarding"),
        (packet(DEST_OPTS, ext(PROTO_UDP, b"\x5e\x04\x00\x00\x00\x00")), "0x5e requires discarding"),
    ],
)
def test_parse_errors(data: bytes, message: str) -> None:
    with pytest.raises(ParseError, match=message):
        parse_ipv6(data)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"src": bytes(4)},
        {"dst": bytes(15)},
        {"payload": bytes(65536)},
        {"hop_limit": 256},
        {"traffic_class": 256},
        {"flow_label": 1 << 20},
        {"next_header": -1},
    ],
)
def test_build_rejects_bad_fields(kwargs: dict[str, object]) -> None:
    args: dict[str, object] = {"src": SRC, "dst": DST, "next_header": PROTO_UDP, "payload": b"", **kwargs}
    with pytest.raises(ValueError):
        build_ipv6(**args)  # type: ignore[arg-type]


addresses = st.binary(min_size=16, max_size=16)
upper_layer = st.integers(0, 255).filter(
    lambda n: n not in (HOP_BY_HOP, ROUTING, FRAGMENT, NO_NEXT, DEST_OPTS)
)


@given(
    src=addresses,
    dst=addresses,
    next_header=upper_layer,
    payload=st.binary(max_size=1500),
    hop_limit=st.integers(0, 255),
    traffic_class=st.integers(0, 255),
    flow_label=st.integers(0, 0xFFFFF),
)
def test_property_round_trip(
    src: bytes,
    dst: bytes,
    next_header: int,
    payload: bytes,
    hop_limit: int,
    traffic_class: int,
    flow_label: int,
) -> None:
    data = build_ipv6(
        src,
        dst,
        next_header,
        payload,
        hop_limit=hop_limit,
        traffic_class=traffic_class,
        flow_label=flow_label,
    )
    header, protocol, parsed = parse_ipv6(data)
    assert header == IPv6Header(src, dst, next_header, hop_limit, len(payload), traffic_class, flow_label)
    assert protocol == next_header and parsed == payload


@given(st.binary(max_size=120))
def test_property_arbitrary_bytes_raise_only_parse_error(data: bytes) -> None:
    with contextlib.suppress(ParseError):
        parse_ipv6(data)


@given(
    first=st.sampled_from([HOP_BY_HOP, ROUTING, DEST_OPTS, FRAGMENT, NO_NEXT, PROTO_ICMPV6]),
    body=st.lists(
        st.tuples(
            st.sampled_from([HOP_BY_HOP, ROUTING, DEST_OPTS, FRAGMENT, NO_NEXT, PROTO_UDP]),
            st.binary(max_size=30),
        ),
        max_size=4,
    ),
)
def test_property_garbage_extension_headers_raise_only_parse_error(
    first: int, body: list[tuple[int, bytes]]
) -> None:
    # Plausible chains (right next-header values, random lengths and options) reach deeper code than
    # random bytes do.
    payload = b"".join(bytes([next_header]) + rest for next_header, rest in body)
    data = packet(first, payload)
    try:
        _, _, parsed = parse_ipv6(data)
    except ParseError:
        return
    assert len(parsed) <= len(payload)
    assert struct.unpack_from("!H", data, 4)[0] == len(payload)

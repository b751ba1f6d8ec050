"""wire/tcp.py: parse → repr → emit round trips, option encodings, malformed input."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from embedmesh.errors import ParseError
from embedmesh.wire.checksum import checksum, pseudo_header_sum
from embedmesh.wire.tcp import ACK, FIN, PSH, SYN, build_tcp, flags_repr, parse_tcp, pseudo_base

A4 = bytes([10, 0, 0, 1])
B4 = bytes([10, 0, 0, 2])
A6 = bytes(15) + b"\x01"
B6 = bytes(15) + b"\x02"


@pytest.mark.parametrize(("src", "dst"), [(A4, B4), (A6, B6)])
def test_round_trip_all_options(src: bytes, dst: bytes) -> None:
    raw = build_tcp(
        src, dst, 1234, 80, 0xFFFFFFF0, 77, SYN | ACK, 65535,
        mss=1220, wscale=7, sack_permitted=True, timestamp=(1, 2), payload=b"hello",
    )  # fmt: skip
    seg = parse_tcp(raw, src, dst)
    assert (seg.src_port, seg.dst_port, seg.seq, seg.ack) == (1234, 80, 0xFFFFFFF0, 77)
    assert seg.flags == SYN | ACK and seg.window == 65535
    assert (seg.mss, seg.wscale, seg.sack_permitted, seg.timestamp) == (1220, 7, True, (1, 2))
    assert bytes(seg.payload) == b"hello"
    assert len(raw) % 4 == 1  # header is a multiple of 4, then 5 payload bytes
    assert checksum(raw, pseudo_header_sum(src, dst, 6, len(raw))) == 0


def test_plain_and_timestamp_fast_paths() -> None:
    raw = build_tcp(A4, B4, 1, 2, 3, 4, ACK, 100, payload=b"x" * 11)
    assert len(raw) == 31
    seg = parse_tcp(raw, A4, B4)
    assert seg.timestamp is None and seg.mss is None and bytes(seg.payload) == b"x" * 11
    raw = build_tcp(A4, B4, 1, 2, 3, 4, ACK | PSH, 100, timestamp=(0xFFFFFFFF, 5), payload=b"abc")
    assert len(raw) == 35
    seg = parse_tcp(raw, A4, B4, pseudo_sum=pseudo_base(A4, B4))
    assert seg.timestamp == (0xFFFFFFFF, 5) and bytes(seg.payload) == b"abc"


def test_sack_blocks_fit_in_option_space() -> None:
    blocks = [(i * 100, i * 100 + 50) for i in range(1, 6)]
    raw = build_tcp(A4, B4, 1, 2, 3, 4, ACK, 100, sack_blocks=blocks, timestamp=(9, 9))
    seg = parse_tcp(raw, A4, B4)
    assert seg.sack_blocks == tuple(blocks[:3])  # 40 - 12 (ts) - 4 = 24 bytes: 3 blocks
    raw = build_tcp(A4, B4, 1, 2, 3, 4, ACK, 100, sack_blocks=blocks)
    assert parse_tcp(raw, A4, B4).sack_blocks == tuple(blocks[:4])


def test_bad_checksum_rejected_unless_not_verified() -> None:
    raw = bytearray(build_tcp(A4, B4, 1, 2, 3, 4, ACK, 100, payload=b"data"))
    raw[-1] ^= 0xFF
    with pytest.raises(ParseError):
        parse_tcp(raw, A4, B4)
    assert parse_tcp(raw, A4, B4, verify_checksum=False).dst_port == 2
    with pytest.raises(ParseError):
        parse_tcp(bytes(build_tcp(A4, B4, 1, 2, 3, 4, ACK, 100)), A4, B6)  # wrong pseudo header


def _with_options(options: bytes) -> bytes:
    hlen = 20 + len(options)
    hdr = struct.pack("!HHIIBBHHH", 1, 2, 3, 4, (hlen // 4) << 4, ACK, 100, 0, 0) + options
    csum = checksum(hdr, pseudo_header_sum(A4, B4, 6, len(hdr)))
    return hdr[:16] + struct.pack("!H", csum) + hdr[18:]


@pytest.mark.parametrize(
    "options",
    [
        b"\x02\x03\x05\xb4",  # MSS with length 3
        b"\x03\x04\x07\x00",  # wscale with length 4
        b"\x08\x01\x00\x00",  # length below 2
        b"\x05\x0b" + bytes(10),  # SACK length not 2+8n
        b"\x01\x01\x01\x08",  # kind without length byte at the end
        b"\x08\x0a\x00\x00",  # timestamp running past the header
    ],
)
def test_illegal_option_lengths(options: bytes) -> None:
    with pytest.raises(ParseError):
        parse_tcp(_with_options(options), A4, B4)


def test_unknown_option_skipped_and_eol_stops() -> None:
    seg = parse_tcp(_with_options(b"\x1e\x04\xaa\xbb\x02\x04\x05\x00"), A4, B4)
    assert seg.mss == 0x500
    seg = parse_tcp(_with_options(b"\x00\x02\x03\x05"), A4, B4)
    assert seg.mss is None


def test_bad_data_offset_and_short() -> None:
    with pytest.raises(ParseError):
        parse_tcp(b"\x00" * 19, A4, B4)
    raw = bytearray(build_tcp(A4, B4, 1, 2, 3, 4, ACK, 100))
    raw[12] = 0x40
    with pytest.raises(ParseError):
        parse_tcp(raw, A4, B4, verify_checksum=False)
    raw[12] = 0xF0
    with pytest.raises(ParseError):
        parse_tcp(raw, A4, B4, verify_checksum=False)


def test_repr_and_flags() -> None:
    seg = parse_tcp(build_tcp(A4, B4, 1, 2, 3, 4, SYN | ACK | FIN, 100, mss=536), A4, B4)
    assert flags_repr(seg.flags) == "FSA"
    assert "mss=536" in repr(seg) and flags_repr(0) == "."


@given(
    st.integers(0, 65535), st.integers(0, 2**32 - 1), st.integers(0, 255),
    st.binary(max_size=64), st.none() | st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)),
    st.lists(st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)), max_size=3),
)  # fmt: skip
def test_round_trip_property(port, seq, flags, payload, ts, blocks) -> None:  # type: ignore[no-untyped-def]
    raw = build_tcp(
        A6, B6, port, 443, seq, seq ^ 0x5555, flags, 1000, timestamp=ts, sack_blocks=blocks, payload=payload
    )
    seg = parse_tcp(raw, A6, B6)
    assert (seg.src_port, seg.seq, seg.ack, seg.flags) == (port, seq, seq ^ 0x5555, flags)
    assert seg.timestamp == ts and bytes(seg.payload) == payload
    assert list(seg.sack_blocks) == blocks[: 3 if ts else 4]


u32 = st.integers(0, 0xFFFFFFFF)
u16 = st.integers(0, 0xFFFF)


@given(
    st.sampled_from([(A4, B4), (A6, B6)]),
    u16,
    u16,
    u32,
    u32,
    st.sampled_from([ACK, ACK | PSH, ACK | PSH | FIN]),
    u16,
    st.one_of(st.just(-1), u32),
    u32,
    st.binary(max_size=1500),
    st.booleans(),
)
def test_fast_and_burst_builders_match_build_tcp(  # type: ignore[no-untyped-def]
    addrs, sport, dport, seq, ack, flags, window, tsval, tsecr, payload, as_bytearray
) -> None:
    from embedmesh.wire.tcp import build_tcp_burst, build_tcp_fast, burst_sum

    src, dst = addrs
    body = bytearray(payload) if as_bytearray else payload
    pseudo = pseudo_base(src, dst)
    timestamp = (tsval, tsecr) if tsval >= 0 else None
    reference = build_tcp(
        src, dst, sport, dport, seq, ack, flags, window, timestamp=timestamp, payload=payload
    )
    fast = build_tcp_fast(pseudo, sport, dport, seq, ack, flags, window, tsval, tsecr, body)
    shared = burst_sum(pseudo, sport, dport, ack, flags, window, tsval, tsecr)
    burst = build_tcp_burst(shared, sport, dport, seq, ack, flags, window, tsval, tsecr, body)
    assert fast == burst == reference
    assert parse_tcp(burst, src, dst).payload == payload  # the checksum verifies

"""The DNS wire parsers of the query path: valid queries, and every way a hostile one can be bad."""

from __future__ import annotations

import struct

import pytest
from tests.dns.dns_harness import query

from embedmesh.dns.message import (
    MAX_POINTER_HOPS,
    QueryFormatError,
    encode_name,
    name_to_text,
    parse_message,
    parse_query,
    read_name,
    text_to_name,
)
from embedmesh.errors import ParseError


def header(
    qd: int = 1, an: int = 0, ns: int = 0, ar: int = 0, flags: int = 0x0100, ident: int = 0x1234
) -> bytes:
    return struct.pack("!HHHHHH", ident, flags, qd, an, ns, ar)


def test_parses_a_dnspython_query_with_edns() -> None:
    q = parse_query(query("Db.Mesh.Internal", "AAAA", edns=0, payload=4096, want_dnssec=True))
    assert q.question.name == (b"Db", b"Mesh", b"Internal")
    assert q.question.qtype == 28 and q.question.qclass == 1
    assert q.recursion_desired and q.edns is not None and q.edns.version == 0
    assert q.dnssec_ok and q.edns.payload_size == 4096
    assert q.max_udp_size() == 1232  # capped at what we advertise


def test_without_edns_udp_answers_are_512_bytes() -> None:
    q = parse_query(query("db", "A"))
    assert q.edns is None and q.max_udp_size() == 512
    assert parse_query(query("db", "A", edns=0, payload=100)).max_udp_size() == 512


def test_too_short_for_a_header_is_a_plain_parse_error() -> None:
    with pytest.raises(ParseError) as info:
        parse_query(b"\x00" * 11)
    assert not isinstance(info.value, QueryFormatError)


@pytest.mark.parametrize(
    "data",
    [
        header(qd=0),
        header(qd=2) + encode_name((b"a",)) + b"\x00\x01\x00\x01" * 2,
        header(an=1) + encode_name((b"a",)) + b"\x00\x01\x00\x01",
        header() + b"\x05abc",  # label runs past the end
        header() + encode_name((b"a",)) + b"\x00\x01",  # question tail cut
        header() + b"\x40abc\x00\x00\x01\x00\x01",  # extended label type
        header(ar=1) + encode_name((b"a",)) + b"\x00\x01\x00\x01",  # missing additional record
        header(ar=2)
        + encode_name((b"a",))
        + b"\x00\x01\x00\x01"
        + (b"\x00\x00\x29\x04\xd0\x00\x00\x00\x00\x00\x00") * 2,
        header(ar=1)
        + encode_name((b"a",))
        + b"\x00\x01\x00\x01"
        + b"\x01x\x00\x00\x29\x04\xd0\x00\x00\x00\x00\x00\x00",
        header(ar=1)
        + encode_name((b"a",))
        + b"\x00\x01\x00\x01"
        + b"\x00\x00\x29\x04\xd0\x00\x00\x00\x00\x00\x03abc",
        header(ar=0xFFFF) + encode_name((b"a",)) + b"\x00\x01\x00\x01",
    ],
    ids=[
        "no-question",
        "two-questions",
        "answer-in-query",
        "label-past-end",
        "short-question",
        "extended-label",
        "missing-additional",
        "two-opt",
        "opt-not-root",
        "bad-edns-option",
        "huge-arcount",
    ],
)
def test_malformed_queries_are_format_errors_with_the_header(data: bytes) -> None:
    with pytest.raises(QueryFormatError) as info:
        parse_query(data)
    assert info.value.header.id == 0x1234


def test_compression_loop_is_refused() -> None:
    # A name at 12 that is a label followed by a pointer back to itself: a loop.
    data = header() + b"\x01a\xc0\x0c" + b"\x00\x01\x00\x01"
    with pytest.raises(QueryFormatError):
        parse_query(data)


def test_pointer_to_itself_and_forward_pointers_are_refused() -> None:
    with pytest.raises(ParseError):
        read_name(b"\xc0\x00", 0)
    with pytest.raises(ParseError):
        read_name(b"\xc0\x02\x00", 0)


def test_long_pointer_chains_stop_at_the_hop_limit() -> None:
    # Each pointer points to the previous one: a chain of pointers that never ends in labels would
    # recurse in a naive decoder; here it ends after MAX_POINTER_HOPS.
    data = bytearray(b"\x00")
    for i in range(MAX_POINTER_HOPS + 5):
        data += struct.pack("!H", 0xC000 | (1 + 2 * (i - 1) if i else 0))
    name, _ = read_name(bytes(data), 1 + 2 * 10)  # a short chain is fine
    assert name == ()
    with pytest.raises(ParseError):
        read_name(bytes(data), len(data) - 2)


def test_names_longer_than_255_bytes_are_refused() -> None:
    long_name = b"".join(b"\x3f" + b"a" * 63 for _ in range(4)) + b"\x00"  # 257 bytes
    with pytest.raises(ParseError):
        read_name(long_name, 0)
    with pytest.raises(ValueError):
        encode_name((b"a" * 63,) * 4)
    with pytest.raises(ValueError):
        text_to_name("a" * 64 + ".example")


def test_a_65k_message_of_pointers_parses_in_bounded_time() -> None:
    # The largest TCP message: a question followed by thousands of records whose owner names are
    # pointer chains. The scanner bounds each name, so this is linear.
    body = bytearray(header(qd=1, an=4000, flags=0x8180)) + encode_name((b"x",)) + b"\x00\x01\x00\x01"
    for _ in range(4000):
        body += b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + b"\x01\x02\x03\x04"
    message = parse_message(bytes(body))
    assert len(body) > 60000 and len(message.records) == 4000


def test_name_text_round_trip_escapes_odd_bytes() -> None:
    assert name_to_text((b"a.b", b"c\\d", b"\x00")) == "a\\046b.c\\092d.\\000"
    assert text_to_name("Db.Mesh.Internal.") == (b"Db", b"Mesh", b"Internal")
    assert text_to_name(".") == ()

"""The STUN codec and responder: RFC 5769's test vectors, Go's exact bytes, round trips, hostile input."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from embedmesh.errors import ParseError
from embedmesh.tailscale import disco, stun
from embedmesh.tailscale.stunserver import StunResponder

TXID = bytes.fromhex("b7e7a701bc34d686fa87dfae")
# RFC 5769 section 2.1: a request with SOFTWARE, PRIORITY, ICE-CONTROLLED, USERNAME,
# MESSAGE-INTEGRITY and FINGERPRINT.
RFC5769_REQUEST = bytes.fromhex(
    "000100582112a442b7e7a701bc34d686fa87dfae802200105354554e207465737420636c69656e74"
    "002400046e0001ff80290008932ff9b151263b36000600096576746a3a6836765920202000080014"
    "9aeaa70cbfd8cb56781ef2b5b2d3f249c1b571a280280004e57a3bcf"
)
# Sections 2.2 and 2.3: success responses for 192.0.2.1:32853 and [2001:db8:1234:5678:11:2233:4455:6677]:32853.
RFC5769_RESPONSE_V4 = bytes.fromhex(
    "0101003c2112a442b7e7a701bc34d686fa87dfae8022000b7465737420766563746f7220002000080001a147"
    "e112a643000800142b91f599fd9e90c38c7489f92af9ba53f06be7d780280004c07d4c96"
)
RFC5769_RESPONSE_V6 = bytes.fromhex(
    "010100482112a442b7e7a701bc34d686fa87dfae8022000b7465737420766563746f7220002000140002a147"
    "0113a9faa5d3f179bc25f4b5bed2b9d900080014a382954e4be67bf11784c97c8292c275bfe3ed41"
    "80280004c8fb0b4c"
)
# Go's stun.Request(TxID{0, 1, ..., 11}) and stun.Response(TxID{}, 1.2.3.4:5678) (net/stun v1.102.5).
GO_REQUEST = bytes.fromhex("000100142112a442000102030405060708090a0b802200087461696c6e6f6465802800048aabad90")
GO_RESPONSE = bytes.fromhex("0101000c2112a442000000000000000000000000002000080001373c2010a746")


def test_rfc5769_request() -> None:
    request = stun.parse_binding_request(RFC5769_REQUEST)
    assert request.txid == TXID
    assert request.software == "STUN test client"
    assert request.fingerprint and not request.from_tailscale
    kinds = [kind for kind, _ in request.attributes]
    assert kinds == [stun.ATTR_SOFTWARE, 0x0024, 0x8029, 0x0006, 0x0008]  # FINGERPRINT is not listed
    assert dict(request.attributes)[0x0006] == b"evtj:h6vY"  # USERNAME, without its padding


def test_rfc5769_responses() -> None:
    v4 = stun.parse_binding_response(RFC5769_RESPONSE_V4)
    assert v4 == stun.BindingResponse(TXID, (ipaddress.ip_address("192.0.2.1"), 32853))
    v6 = stun.parse_binding_response(RFC5769_RESPONSE_V6)
    assert v6.address == (ipaddress.ip_address("2001:db8:1234:5678:11:2233:4455:6677"), 32853)


def test_request_and_response_are_gos_bytes() -> None:
    assert stun.binding_request(bytes(range(12))) == GO_REQUEST
    assert stun.binding_response(bytes(12), ("1.2.3.4", 5678)) == GO_RESPONSE
    assert stun.parse_binding_request(GO_REQUEST).from_tailscale
    assert disco.classify(GO_REQUEST) is disco.PacketKind.STUN
    assert disco.classify(GO_RESPONSE) is disco.PacketKind.STUN


def test_mapped_address_fallback_and_preference() -> None:
    plain = b"\x00\x01" + struct.pack("!H", 3478) + ipaddress.ip_address("198.51.100.7").packed
    only_plain = stun.encode_message(
        stun.StunMessage(stun.BINDING_SUCCESS, TXID, ((stun.ATTR_MAPPED_ADDRESS, plain),))
    )
    assert stun.parse_binding_response(only_plain).address == (ipaddress.ip_address("198.51.100.7"), 3478)
    # With both, XOR-MAPPED-ADDRESS wins (a NAT that rewrites addresses in payloads misses it).
    xored = stun.parse_message(stun.binding_response(TXID, ("203.0.113.9", 41641))).attributes[0][1]
    both = stun.encode_message(
        stun.StunMessage(
            stun.BINDING_SUCCESS,
            TXID,
            ((stun.ATTR_MAPPED_ADDRESS, plain), (stun.ATTR_XOR_MAPPED_ADDRESS_ALT, xored)),
        )
    )
    assert stun.parse_binding_response(both).address == (ipaddress.ip_address("203.0.113.9"), 41641)


def test_ipv4_mapped_source_is_answered_as_ipv4() -> None:
    response = stun.binding_response(TXID, ("::ffff:192.0.2.5", 9))
    assert len(response) == 32
    assert stun.parse_binding_response(response).address == (ipaddress.ip_address("192.0.2.5"), 9)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "not_stun"),
        (GO_REQUEST[:19], "not_stun"),
        (b"\xc0" + GO_REQUEST[1:], "not_stun"),
        (GO_REQUEST[:4] + b"\x00\x00\x00\x00" + GO_REQUEST[8:], "not_stun"),
        (GO_REQUEST[:3] + b"\x15" + GO_REQUEST[4:], "malformed"),  # length not a multiple of 4
        (GO_REQUEST[:3] + b"\x18" + GO_REQUEST[4:], "malformed"),  # longer than the datagram
        (GO_REQUEST[:-1] + bytes([GO_REQUEST[-1] ^ 1]), "bad_fingerprint"),
        (GO_REQUEST[:22] + b"\x00\x14" + GO_REQUEST[24:], "malformed"),  # attribute past the end
        (GO_RESPONSE, "wrong_type"),
    ],
)
def test_bad_requests_raise_stun_errors(data: bytes, reason: str) -> None:
    with pytest.raises(stun.StunError) as caught:
        stun.parse_binding_request(data)
    assert caught.value.reason == reason
    assert isinstance(caught.value, ParseError)


def test_bad_responses() -> None:
    with pytest.raises(stun.StunError, match="not a Binding success") as caught:
        stun.parse_binding_response(GO_REQUEST)
    assert caught.value.reason == "wrong_type"
    empty = stun.encode_message(stun.StunMessage(stun.BINDING_SUCCESS, TXID))
    with pytest.raises(stun.StunError) as caught:
        stun.parse_binding_response(empty)
    assert caught.value.reason == "no_address"
    bad_family = stun.encode_message(
        stun.StunMessage(
            stun.BINDING_SUCCESS, TXID, ((stun.ATTR_XOR_MAPPED_ADDRESS, b"\x00\x03\x00\x01" + bytes(4)),)
        )
    )
    with pytest.raises(stun.StunError, match="family"):
        stun.parse_binding_response(bad_family)
    short = stun.encode_message(
        stun.StunMessage(
            stun.BINDING_SUCCESS, TXID, ((stun.ATTR_XOR_MAPPED_ADDRESS, b"\x00\x02\x00\x01" + bytes(4)),)
        )
    )
    with pytest.raises(stun.StunError, match="too short"):
        stun.parse_binding_response(short)
    # A FINGERPRINT (valid) followed by another attribute.
    head = GO_REQUEST[:2] + struct.pack("!H", 24) + GO_REQUEST[4:32]
    after_fingerprint = (
        head + struct.pack("!HHI", stun.ATTR_FINGERPRINT, 4, stun.fingerprint(head)) + b"\x80\x22\x00\x00"
    )
    with pytest.raises(stun.StunError, match="last attribute"):
        stun.parse_message(after_fingerprint)


def test_trailing_bytes_after_the_message_are_ignored() -> None:
    assert stun.parse_binding_response(GO_RESPONSE + b"junk").address[1] == 5678


def test_encoder_rejects_what_cannot_be_sent() -> None:
    with pytest.raises(ValueError):
        stun.binding_request(b"short")
    with pytest.raises(ValueError):
        stun.encode_message(stun.StunMessage(0x4001, TXID))
    with pytest.raises(ValueError):
        stun.binding_response(TXID, ("1.2.3.4", 70000))
    with pytest.raises(ValueError):
        stun.binding_response(TXID, ("not an ip", 1))


def test_responder_answers_and_counts_junk() -> None:
    responder = StunResponder()
    answer = responder.answer(GO_REQUEST, ("203.0.113.1", 41641))
    assert answer is not None
    assert stun.parse_binding_response(answer) == stun.BindingResponse(
        bytes(range(12)), (ipaddress.ip_address("203.0.113.1"), 41641)
    )
    answer6 = responder.answer(RFC5769_REQUEST, ("2001:db8::2", 1))
    assert answer6 is not None and len(answer6) == 44
    assert responder.answer(b"\x01\x00\x00\x00 wireguard", ("203.0.113.1", 1)) is None
    assert responder.answer(GO_RESPONSE, ("203.0.113.1", 1)) is None
    assert responder.answer(GO_REQUEST[:-1] + b"\x00", ("203.0.113.1", 1)) is None
    assert responder.counters == {
        "success": 2,
        "ipv4": 1,
        "ipv6": 1,
        "drop_not_stun": 1,
        "drop_wrong_type": 1,
        "drop_bad_fingerprint": 1,
    }
    strict = StunResponder(tailscale_only=True)
    assert strict.answer(RFC5769_REQUEST, ("203.0.113.1", 1)) is None
    assert strict.answer(stun.binding_request(TXID, with_fingerprint=False), ("203.0.113.1", 1)) is None
    assert strict.answer(GO_REQUEST, ("203.0.113.1", 1)) is not None
    assert strict.counters["drop_not_tailscale"] == 2


# -- properties ---------------------------------------------------------------------------------

txids = st.binary(min_size=12, max_size=12)
addresses = st.one_of(
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).filter(lambda a: a.ipv4_mapped is None).map(str),
)
attributes = st.lists(
    st.tuples(st.integers(0, 0xFFFF).filter(lambda t: t != stun.ATTR_FINGERPRINT), st.binary(max_size=40)),
    max_size=6,
).map(tuple)
messages = st.builds(stun.StunMessage, st.integers(0, 0x3FFF), txids, attributes, st.booleans())


@given(txids, addresses, st.integers(0, 0xFFFF))
def test_response_round_trip(txid: bytes, address: str, port: int) -> None:
    parsed = stun.parse_binding_response(stun.binding_response(txid, (address, port)))
    assert parsed == stun.BindingResponse(txid, (ipaddress.ip_address(address), port))


@given(txids, st.one_of(st.none(), st.text(max_size=30)), st.booleans())
def test_request_round_trip(txid: bytes, software: str | None, with_fingerprint: bool) -> None:
    request = stun.parse_binding_request(
        stun.binding_request(txid, software=software, with_fingerprint=with_fingerprint)
    )
    assert (request.txid, request.software, request.fingerprint) == (txid, software, with_fingerprint)


@given(messages)
def test_message_round_trip(message: stun.StunMessage) -> None:
    encoded = stun.encode_message(message)
    assert len(encoded) % 4 == 0
    assert stun.parse_message(encoded) == message


truncated = messages.map(stun.encode_message).flatmap(lambda b: st.integers(0, len(b)).map(lambda n: b[:n]))


@settings(max_examples=300)
@given(st.one_of(st.binary(max_size=120), truncated))
def test_hostile_bytes_raise_only_stun_errors(data: bytes) -> None:
    for parse in (stun.parse_message, stun.parse_binding_request, stun.parse_binding_response):
        try:
            parse(data)
        except stun.StunError:
            pass
    answer = StunResponder().answer(data, ("192.0.2.1", 1))
    if answer is not None:  # only a well-formed request earns one, with its transaction ID
        assert stun.parse_binding_response(answer).txid == data[8:20]


@given(messages.map(stun.encode_message), st.integers(0, 400), st.integers(0, 255))
def test_one_flipped_byte_never_crashes(encoded: bytes, where: int, value: int) -> None:
    data = bytearray(encoded)
    data[where % len(data)] = value
    try:
        message = stun.parse_message(bytes(data))
    except stun.StunError:
        return
    # Whatever parses re-encodes to something that parses to the same message.
    assert stun.parse_message(stun.encode_message(message)) == message

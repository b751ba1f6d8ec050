"""Disco packets and the one-socket demultiplexer, checked against Go's disco package."""

from __future__ import annotations

import base64
import ipaddress
import json
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from embedmesh.errors import ParseError
from embedmesh.tailscale import disco
from embedmesh.tailscale.keys import DiscoPrivate, NodePublic
from tests.tailscale.make_vectors import message_from_json

VECTORS = json.loads((Path(__file__).resolve().parent / "vectors" / "disco.json").read_text())
GO = DiscoPrivate.from_text(VECTORS["go_private"])
OURS = DiscoPrivate.from_text(VECTORS["python_private"])


def _endpoint_text(endpoint: disco.Endpoint) -> str:
    ip, port = endpoint
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


def to_json(message: disco.Message) -> dict[str, Any]:
    """tsvectors' JSON form of a message (as its fromGo writes it)."""
    if isinstance(message, disco.Ping):
        out: dict[str, Any] = {"type": "ping", "tx_id": message.tx_id.hex()}
        if not message.node_key.is_zero:
            out["node_key"] = message.node_key.to_text()
        if message.padding:
            out["padding"] = message.padding
        return out
    if isinstance(message, disco.Pong):
        return {"type": "pong", "tx_id": message.tx_id.hex(), "src": _endpoint_text(message.src)}
    out = {"type": "call_me_maybe"}
    if message.endpoints:
        out["endpoints"] = [_endpoint_text(e) for e in message.endpoints]
    return out


def test_keys_agree_with_go() -> None:
    assert GO.public().to_text() == VECTORS["go_public"]


@pytest.mark.parametrize("case", VECTORS["messages"], ids=lambda c: c["message"]["type"])
def test_packets_both_ways_and_cleartext_match_go(case: dict[str, Any]) -> None:
    message = message_from_json(case["message"])
    box = disco.DiscoBox(OURS, GO.public())
    # Go sealed this one to us: we open it and read the same message.
    go_packet = base64.b64decode(case["go_sealed"])
    assert disco.classify(go_packet) is disco.PacketKind.DISCO
    assert disco.sender_of(go_packet) == GO.public()
    assert box.open(go_packet) == message
    # Our packet, sealed with the recorded nonce, is byte for byte the one Go opened.
    ours = base64.b64decode(case["python_sealed"])
    assert box.seal(message, ours[disco.HEADER_SIZE : disco.WRAPPER_SIZE]) == ours
    assert case["go_opened"]["ok"] and case["go_opened"]["sender"] == OURS.public().to_text()
    assert case["go_opened"]["message"] == to_json(message)
    assert disco.encode_message(message) == base64.b64decode(case["go_marshaled"])


@pytest.mark.parametrize("case", VECTORS["parse"], ids=lambda c: c["name"])
def test_parse_agrees_with_go(case: dict[str, Any]) -> None:
    cleartext = base64.b64decode(case["cleartext"])
    if case["go"]["ok"]:
        assert to_json(disco.parse_message(cleartext)) == case["go"]["message"]
    else:
        with pytest.raises(disco.DiscoError):
            disco.parse_message(cleartext)


def test_relay_messages_are_unsupported_not_unknown() -> None:
    for kind in range(4, 10):
        with pytest.raises(disco.UnsupportedMessage) as info:
            disco.parse_message(bytes([kind, 0]) + bytes(100))
        assert info.value.kind == kind


def test_packets_from_others_or_tampered_do_not_open() -> None:
    a, b, c = (DiscoPrivate.generate(os.urandom(32)) for _ in range(3))
    packet = disco.DiscoBox(a, b.public()).seal(disco.Ping(bytes(12)), os.urandom(24))
    assert disco.DiscoBox(b, a.public()).open(packet) == disco.Ping(bytes(12))
    with pytest.raises(disco.DiscoError, match="another"):
        disco.DiscoBox(b, c.public()).open(packet)
    with pytest.raises(disco.DiscoError, match="did not open"):
        disco.DiscoBox(c, a.public()).open(packet)  # sealed to b, not c
    tampered = bytearray(packet)
    tampered[-1] ^= 1
    with pytest.raises(disco.DiscoError):
        disco.DiscoBox(b, a.public()).open(bytes(tampered))
    for short in (packet[: disco.WRAPPER_SIZE - 1], packet[: disco.WRAPPER_SIZE + 15]):
        with pytest.raises(disco.DiscoError):
            disco.DiscoBox(b, a.public()).open(short)
    with pytest.raises(disco.DiscoError, match="low-order"):
        disco.DiscoBox(a, disco.DiscoPublic.zero())


def test_classify_in_magicsocks_order() -> None:
    stun = b"\x00\x01\x00\x00" + disco.STUN_MAGIC_COOKIE + bytes(12)
    assert disco.classify(stun) is disco.PacketKind.STUN
    # A STUN binding *response* (method 0x0101) is still "binding": byte 1 is 0x01.
    assert disco.classify(b"\x01\x01\x00\x00" + disco.STUN_MAGIC_COOKIE + bytes(12)) is disco.PacketKind.STUN
    # Not a binding method, or too short: WireGuard gets it (and drops it).
    assert disco.classify(b"\x00\x03\x00\x00" + disco.STUN_MAGIC_COOKIE + bytes(12)) is disco.PacketKind.WIREGUARD
    assert disco.classify(stun[:19]) is disco.PacketKind.WIREGUARD
    packet = disco.DiscoBox(OURS, GO.public()).seal(disco.Ping(bytes(12)), bytes(24))
    assert disco.classify(packet) is disco.PacketKind.DISCO
    assert disco.classify(packet[: disco.HEADER_SIZE]) is disco.PacketKind.DISCO
    assert disco.classify(packet[: disco.HEADER_SIZE - 1]) is disco.PacketKind.WIREGUARD
    geneve = bytes([0, 0]) + disco.GENEVE_PROTOCOL_DISCO.to_bytes(2, "big") + b"\x00\x00\x01\x00"
    assert disco.classify(geneve + packet) is disco.PacketKind.GENEVE_DISCO
    assert disco.classify(geneve + b"junk") is disco.PacketKind.WIREGUARD
    geneve_wg = bytes([0, 0]) + disco.GENEVE_PROTOCOL_WIREGUARD.to_bytes(2, "big") + b"\x00\x00\x01\x00"
    assert disco.classify(geneve_wg + b"\x04\x00\x00\x00") is disco.PacketKind.GENEVE_WIREGUARD
    # WireGuard messages: type 1-4 and three zero bytes; a zero byte 7 makes no difference.
    for kind in (1, 2, 3, 4):
        assert disco.classify(bytes([kind, 0, 0, 0, 1, 2, 3, 0]) + bytes(140)) is disco.PacketKind.WIREGUARD
    assert disco.classify(b"") is disco.PacketKind.WIREGUARD


def test_messages_validate_their_fields() -> None:
    with pytest.raises(ValueError):
        disco.Ping(b"short")
    with pytest.raises(ValueError):
        disco.Pong(bytes(12), (ipaddress.ip_address("1.2.3.4"), 70000))
    with pytest.raises(ValueError):
        disco.DiscoBox(OURS, GO.public()).seal(disco.Ping(bytes(12)), b"short nonce")


_ips = st.one_of(
    st.ip_addresses(v=4),
    st.ip_addresses(v=6).filter(lambda ip: ip.ipv4_mapped is None),
)
_endpoints = st.tuples(_ips, st.integers(min_value=0, max_value=0xFFFF))
_messages = st.one_of(
    st.builds(
        disco.Ping,
        st.binary(min_size=12, max_size=12),
        st.binary(min_size=32, max_size=32).filter(any).map(NodePublic),
        st.integers(min_value=0, max_value=1500),
    ),
    st.builds(disco.Ping, st.binary(min_size=12, max_size=12), st.just(NodePublic.zero()), st.integers(0, 31)),
    st.builds(disco.Pong, st.binary(min_size=12, max_size=12), _endpoints),
    st.builds(disco.CallMeMaybe, st.lists(_endpoints, max_size=8).map(tuple)),
)


@settings(max_examples=150, deadline=None)
@given(_messages, st.binary(min_size=24, max_size=24))
def test_round_trip(message: disco.Message, nonce: bytes) -> None:
    packet = disco.DiscoBox(OURS, GO.public()).seal(message, nonce)
    assert disco.classify(packet) is disco.PacketKind.DISCO
    assert disco.DiscoBox(GO, OURS.public()).open(packet) == message
    assert disco.parse_message(disco.encode_message(message)) == message


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.booleans())
def test_garbage_raises_only_parse_errors(data: bytes, with_magic: bool) -> None:
    if with_magic:
        data = disco.MAGIC + data
    assert isinstance(disco.classify(data), disco.PacketKind)
    try:
        disco.parse_message(data)
    except ParseError:
        pass
    try:
        disco.DiscoBox(GO, OURS.public()).open(data)
    except ParseError:
        pass
    try:
        disco.sender_of(data)
    except ParseError:
        pass

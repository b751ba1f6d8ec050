"""The Noise_IK control channel and the message codec, driven directly: no network."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
from control_strategies import client_messages, netmaps, ops, server_messages
from hypothesis import given, settings
from hypothesis import strategies as st

from embedmesh.control.errors import ControlProtocolError, HandshakeRejectedError, NetmapDesyncError
from embedmesh.control.messages import (
    DeltaMessage,
    EndpointsUpdate,
    FullMap,
    Ping,
    RegisterRequest,
    encode_client_message,
    encode_server_message,
    parse_client_message,
    parse_endpoint,
    parse_server_message,
)
from embedmesh.control.netmap import MapDelta, NetworkMap, PeerChange, PeerRemoved
from embedmesh.control.noise import FRAME_TRANSPORT, PROTOCOL_VERSION
from embedmesh.control.protocol import ClientSession, ServerSession, check_handshake_freshness
from embedmesh.control.store import Store
from embedmesh.errors import ParseError
from embedmesh.wireguard.crypto import generate_private_key, public_key

SERVER = generate_private_key(bytes(range(32)))
MACHINE = generate_private_key(bytes(range(1, 33)))
NOW = 1_700_000_000.0


def _key(seed: int) -> bytes:
    return generate_private_key(bytes([seed]) * 32)


def _pair(timestamp: float = NOW, ephemeral: int = 7) -> tuple[ClientSession, ServerSession]:
    client = ClientSession(MACHINE, public_key(SERVER), _key(ephemeral))
    server = ServerSession(SERVER)
    initiation = server.receive_initiation(client.initiation(int(timestamp * 1e9)))
    assert initiation.machine_key == public_key(MACHINE)
    assert initiation.timestamp_ns == int(timestamp * 1e9)
    client.receive_response(server.respond(_key(8)))
    assert client.server_version == PROTOCOL_VERSION
    return client, server


def test_handshake_then_messages_both_ways() -> None:
    client, server = _pair()
    assert server.receive(client.send(Ping(5))) == Ping(5)
    assert server.receive(client.send(EndpointsUpdate(("1.2.3.4:5",)))) == EndpointsUpdate(("1.2.3.4:5",))
    delta = DeltaMessage(MapDelta((PeerRemoved(3),)))
    assert client.receive(server.send(delta)) == delta


def test_wrong_server_key_fails_the_handshake() -> None:
    client = ClientSession(MACHINE, public_key(_key(99)), _key(7))
    server = ServerSession(SERVER)
    with pytest.raises(ControlProtocolError, match="authentication"):
        server.receive_initiation(client.initiation(int(NOW * 1e9)))


def test_tampered_message_fails_and_kills_the_session() -> None:
    client, server = _pair()
    frame = bytearray(client.send(Ping(1)))
    frame[-1] ^= 1
    with pytest.raises(ControlProtocolError, match="tampered"):
        server.receive(bytes(frame))
    # Even the genuine next message is refused now: the session is dead.
    with pytest.raises(ControlProtocolError):
        server.receive(client.send(Ping(2)))


def test_replayed_message_is_rejected() -> None:
    client, server = _pair()
    frame = client.send(Ping(1))
    assert server.receive(frame) == Ping(1)
    with pytest.raises(ControlProtocolError):
        server.receive(frame)


def test_reordered_messages_are_rejected() -> None:
    client, server = _pair()
    first, second = client.send(Ping(1)), client.send(Ping(2))
    with pytest.raises(ControlProtocolError):
        server.receive(second)
    with pytest.raises(ControlProtocolError):
        server.receive(first)


def test_dropped_message_breaks_the_stream() -> None:
    client, server = _pair()
    frame = server.send(DeltaMessage(MapDelta((PeerRemoved(1),))))
    del frame  # never delivered
    with pytest.raises(ControlProtocolError):
        client.receive(server.send(DeltaMessage(MapDelta((PeerRemoved(2),)))))


def test_messages_from_one_session_fail_in_another() -> None:
    client_a, _ = _pair(ephemeral=1)
    _, server_b = _pair(ephemeral=2)
    with pytest.raises(ControlProtocolError):
        server_b.receive(client_a.send(Ping(1)))


def test_garbage_frames() -> None:
    for frame in (b"", bytes([FRAME_TRANSPORT]), b"\x07" + bytes(40), bytes([FRAME_TRANSPORT]) + bytes(15)):
        fresh = _pair()[1]
        with pytest.raises(ControlProtocolError):
            fresh.receive(frame)
    with pytest.raises(ControlProtocolError):
        ServerSession(SERVER).receive_initiation(b"\x01\x01" + bytes(10))
    bad_version = bytearray(ClientSession(MACHINE, public_key(SERVER), _key(7)).initiation(1))
    bad_version[1] = 9
    with pytest.raises(ControlProtocolError, match="version 9"):
        ServerSession(SERVER).receive_initiation(bytes(bad_version))
    # A message before the handshake is an error too.
    with pytest.raises(ControlProtocolError):
        ServerSession(SERVER).receive(b"\x03" + bytes(32))


def test_replayed_handshake_is_rejected_by_timestamp() -> None:
    """The server accepts a machine key's handshake only with a fresh, strictly newer timestamp."""
    store = Store(None)
    client = ClientSession(MACHINE, public_key(SERVER), _key(7))
    initiation_frame = client.initiation(int(NOW * 1e9))
    first = ServerSession(SERVER).receive_initiation(initiation_frame)
    check_handshake_freshness(first.timestamp_ns, NOW + 1)
    assert store.advance_handshake_timestamp(first.machine_key, first.timestamp_ns)
    # The same bytes again (an attacker replaying the capture) authenticate, but are not newer.
    replay = ServerSession(SERVER).receive_initiation(initiation_frame)
    check_handshake_freshness(replay.timestamp_ns, NOW + 2)
    assert not store.advance_handshake_timestamp(replay.machine_key, replay.timestamp_ns)
    # A replay much later fails freshness regardless of the store.
    with pytest.raises(HandshakeRejectedError, match="clock"):
        check_handshake_freshness(replay.timestamp_ns, NOW + 121)
    with pytest.raises(HandshakeRejectedError):
        check_handshake_freshness(int((NOW + 500) * 1e9), NOW)


def test_auth_key_is_not_in_repr_and_only_inside_the_channel() -> None:
    secret = "emk-001122334455-" + "ab" * 24
    request = RegisterRequest(bytes(32), bytes(32), "web", auth_key=secret)
    assert secret not in repr(request)
    client, server = _pair()
    frame = client.send(request)
    assert secret.encode() not in frame
    assert server.receive(frame) == request


@given(client_messages)
def test_client_messages_round_trip(message: object) -> None:
    assert parse_client_message(encode_client_message(message)) == message  # type: ignore[arg-type]


@settings(max_examples=60, deadline=None)
@given(server_messages)
def test_server_messages_round_trip(message: object) -> None:
    assert parse_server_message(encode_server_message(message)) == message  # type: ignore[arg-type]


@given(st.binary(max_size=300))
def test_parsers_raise_only_parse_errors_on_bytes(data: bytes) -> None:
    for parse in (parse_client_message, parse_server_message):
        try:
            parse(data)
        except ParseError:
            pass


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
types = st.sampled_from(
    ["register", "endpoints", "logout", "ping", "registered", "map", "delta", "pong", "error"]
)


@settings(max_examples=60)
@given(
    types,
    st.dictionaries(
        st.sampled_from(["node_key", "ops", "netmap", "endpoints", "id", "code", "x"]), json_values
    ),
)
def test_parsers_raise_only_parse_errors_on_json(kind: str, fields: dict[str, object]) -> None:
    data = json.dumps({"type": kind, **fields}).encode()
    for parse in (parse_client_message, parse_server_message):
        try:
            parse(data)
        except ParseError:
            pass


def test_strict_validation_examples() -> None:
    good = json.loads(encode_client_message(RegisterRequest(bytes(32), bytes(32), "web")))
    for field, value in [
        ("node_key", "AAAA"),
        ("tags", ["nope"]),
        ("tags", ["tag:a", "tag:a"]),
        ("ephemeral", 1),
        ("endpoints", ["1.2.3.4"]),
        ("endpoints", ["[1.2.3.4]:5"]),
        ("endpoints", ["1.2.3.4:0"]),
        ("endpoints", ["::1:5"]),
        ("hostname", "a\x00b"),
        ("extra", 1),
    ]:
        bad = dict(good, **{field: value})
        with pytest.raises(ControlProtocolError):
            parse_client_message(json.dumps(bad).encode())
    with pytest.raises(ControlProtocolError):
        parse_client_message(b'{"type":"ping","id":NaN}')
    with pytest.raises(ControlProtocolError):
        parse_client_message(b"[" * 100_000)
    assert parse_endpoint("[::1]:80")[1] == 80


@settings(max_examples=50, deadline=None)
@given(netmaps(), st.lists(ops, max_size=8))
def test_apply_matches_a_model_and_survives_encoding(netmap: NetworkMap, op_list: list[object]) -> None:
    """apply() is pure and equals a step-by-step model; a delta survives the wire unchanged."""
    delta = MapDelta(tuple(op_list))  # type: ignore[arg-type]
    wire = parse_server_message(encode_server_message(DeltaMessage(delta)))
    assert wire == DeltaMessage(delta)
    before = dict(netmap.peers)
    model = dict(netmap.peers)
    ok = True
    for op in delta.ops:
        if isinstance(op, PeerChange) and op.id not in model:
            ok = False
            break
        if isinstance(op, PeerChange):
            model[op.id] = dataclasses.replace(model[op.id], **op.changes())  # type: ignore[arg-type]
        elif getattr(op, "op", "") == "add":
            model[op.peer.id] = op.peer  # type: ignore[union-attr]
        elif isinstance(op, PeerRemoved):
            model.pop(op.id, None)
    if not ok:
        with pytest.raises(NetmapDesyncError):
            netmap.apply(delta)
        return
    after = netmap.apply(delta)
    assert dict(after.peers) == model
    assert dict(netmap.peers) == before  # the original map is untouched
    assert parse_server_message(encode_server_message(FullMap(after))) == FullMap(after)


def test_fresh_randomness_gives_distinct_sessions() -> None:
    a = ClientSession(MACHINE, public_key(SERVER), generate_private_key(os.urandom(32)))
    b = ClientSession(MACHINE, public_key(SERVER), generate_private_key(os.urandom(32)))
    assert a.initiation(1) != b.initiation(1)

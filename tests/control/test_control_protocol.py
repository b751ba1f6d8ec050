"""The coordinator's stream messages and their codec, driven directly: no network.

(Nodes never see these bytes any more: :mod:`embedmesh.control.tsapi` renders them as Tailscale's
MapResponses. The codec still carries every change from the coordinator to the streams.)"""

from __future__ import annotations

import dataclasses
import json

import pytest
from control_strategies import netmaps, ops, server_messages
from hypothesis import given, settings
from hypothesis import strategies as st

from embedmesh.control.errors import ControlProtocolError, NetmapDesyncError
from embedmesh.control.messages import (
    DeltaMessage,
    FullMap,
    RegisterRequest,
    encode_server_message,
    parse_endpoint,
    parse_server_message,
)
from embedmesh.control.netmap import MapDelta, NetworkMap, PeerChange, PeerRemoved
from embedmesh.errors import ParseError


def test_auth_key_is_not_in_repr() -> None:
    secret = "emk-001122334455-" + "ab" * 24
    request = RegisterRequest(bytes(32), bytes(32), "web", auth_key=secret)
    assert secret not in repr(request)


@settings(max_examples=60, deadline=None)
@given(server_messages)
def test_server_messages_round_trip(message: object) -> None:
    assert parse_server_message(encode_server_message(message)) == message  # type: ignore[arg-type]


@given(st.binary(max_size=300))
def test_parsers_raise_only_parse_errors_on_bytes(data: bytes) -> None:
    try:
        parse_server_message(data)
    except ParseError:
        pass


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
types = st.sampled_from(["registered", "map", "delta", "logged_out", "error", "register"])


@settings(max_examples=60)
@given(
    types,
    st.dictionaries(
        st.sampled_from(["node_id", "state", "ops", "netmap", "message", "code", "x"]), json_values
    ),
)
def test_parsers_raise_only_parse_errors_on_json(kind: str, fields: dict[str, object]) -> None:
    data = json.dumps({"type": kind, **fields}).encode()
    try:
        parse_server_message(data)
    except ParseError:
        pass


def test_strict_validation_examples() -> None:
    good = json.loads(encode_server_message(DeltaMessage(MapDelta((PeerRemoved(3),)))))
    for field, value in [("ops", "nope"), ("ops", [{"op": "remove", "id": -1}]), ("extra", 1)]:
        with pytest.raises(ControlProtocolError):
            parse_server_message(json.dumps(dict(good, **{field: value})).encode())
    with pytest.raises(ControlProtocolError):
        parse_server_message(b'{"type":"error","code":"x","message":NaN}')
    with pytest.raises(ControlProtocolError):
        parse_server_message(b"[" * 100_000)
    for bad in ("1.2.3.4", "[1.2.3.4]:5", "1.2.3.4:0", "::1:5"):
        with pytest.raises(ControlProtocolError):
            parse_endpoint(bad)
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

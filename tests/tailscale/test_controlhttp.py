"""The HTTP steps around ts2021 (controlhttp): the /key answer and the upgrade, both sides."""

from __future__ import annotations

import base64
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from embedmesh.errors import ParseError
from embedmesh.tailscale import controlbase, controlhttp
from embedmesh.tailscale.keys import MachinePrivate, MachinePublic

SERVER = MachinePrivate.generate(bytes(range(32)))


def _initiation() -> bytes:
    client = controlbase.ClientConnection(
        MachinePrivate.generate(os.urandom(32)), SERVER.public(), 130, os.urandom(32)
    )
    return client.initiation


def test_key_answers_as_tailscale_and_headscale_write_them() -> None:
    public = SERVER.public()
    assert controlhttp.parse_key_response(controlhttp.key_response(public)) == public
    # headscale sends only publicKey; Go matches field names in any case.
    assert controlhttp.parse_key_response(f'{{"PUBLICKEY": "{public.to_text()}"}}'.encode()) == public
    for body, message in (
        (b'{"legacyPublicKey": "mkey:' + b"0" * 64 + b'"}', "no publicKey"),
        (b'{"publicKey": "mkey:' + b"0" * 64 + b'"}', "too old"),
        (b"<html>", "not JSON"),
        (b"[]", "not a JSON object"),
        (b'{"publicKey": "nodekey:' + b"1" * 64 + b'"}', "mkey"),
    ):
        with pytest.raises(ParseError, match=message):
            controlhttp.parse_key_response(body)


def test_the_upgrade_request_is_what_the_server_checks() -> None:
    initiation = _initiation()
    client = controlhttp.UpgradeClient("control.example:8080", initiation)
    head, _, body = client.request.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == "POST /ts2021 HTTP/1.1" and body == b""
    headers = [
        (k.strip().lower().encode(), v.strip().encode())
        for k, v in (line.split(":", 1) for line in lines[1:])
    ]
    assert dict(headers)[b"upgrade"] == b"tailscale-control-protocol"
    assert controlhttp.check_upgrade_request("POST", headers).initiation == initiation


def test_the_client_reads_a_101_and_keeps_what_follows() -> None:
    client = controlhttp.UpgradeClient("h", _initiation())
    answer = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: tailscale-control-protocol\r\nConnection: upgrade\r\n\r\n"
    assert client.receive_data(answer[:20]) is None
    assert client.receive_data(answer[20:] + b"\x02\x00\x30noise") == b"\x02\x00\x30noise"


def test_a_refused_upgrade_says_what_the_server_said() -> None:
    client = controlhttp.UpgradeClient("h", _initiation())
    answer = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 29\r\n\r\nno tailscale handshake header"
    with pytest.raises(controlhttp.UpgradeRefusedError, match="HTTP 400: no tailscale handshake header"):
        client.receive_data(answer)
    switched = controlhttp.UpgradeClient("h", _initiation())
    with pytest.raises(ParseError, match="websocket"):
        switched.receive_data(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n")
    closed = controlhttp.UpgradeClient("h", _initiation())
    with pytest.raises(ParseError, match="closed"):
        closed.receive_data(b"")


def test_the_server_refuses_bad_upgrades_with_a_reason() -> None:
    good = base64.b64encode(_initiation())
    for method, headers, message in (
        ("POST", [(b"x-tailscale-handshake", good)], "Upgrade"),
        ("POST", [(b"upgrade", b"websocket"), (b"x-tailscale-handshake", good)], "Upgrade"),
        ("POST", [(b"upgrade", b"tailscale-control-protocol")], "no tailscale handshake"),
        ("POST", [(b"upgrade", b"tailscale-control-protocol"), (b"x-tailscale-handshake", b"!!")], "base64"),
        (
            "POST",
            [(b"upgrade", b"tailscale-control-protocol"), (b"x-tailscale-handshake", b"AAAA")],
            "length",
        ),
        ("DELETE", [(b"upgrade", b"tailscale-control-protocol"), (b"x-tailscale-handshake", good)], "DELETE"),
    ):
        with pytest.raises(controlhttp.ControlHTTPError, match=message):
            controlhttp.check_upgrade_request(method, headers)


@given(st.binary(max_size=2048))
def test_any_answer_to_the_upgrade_is_a_result_or_a_parse_error(data: bytes) -> None:
    client = controlhttp.UpgradeClient("h", bytes(controlbase.INITIATION_SIZE))
    try:
        client.receive_data(data)
        client.receive_data(b"")
    except ParseError:
        pass


@given(st.binary(max_size=512))
def test_any_key_answer_is_a_key_or_a_parse_error(data: bytes) -> None:
    try:
        assert isinstance(controlhttp.parse_key_response(data), MachinePublic)
    except ParseError:
        pass


_header_names = st.sampled_from([b"upgrade", b"Upgrade", b"x-tailscale-handshake", b"X-TAILSCALE-HANDSHAKE", b"connection"])


@given(
    st.sampled_from(["POST", "GET", "PUT", "post", ""]),
    st.lists(st.tuples(st.one_of(_header_names, st.binary(max_size=20)), st.binary(max_size=200)), max_size=8),
)
def test_any_upgrade_request_is_accepted_or_a_parse_error(method: str, headers: list[tuple[bytes, bytes]]) -> None:
    try:
        request = controlhttp.check_upgrade_request(method, headers)
    except ParseError:
        return
    assert len(request.initiation) == controlbase.INITIATION_SIZE


@given(st.binary(min_size=controlbase.INITIATION_SIZE, max_size=controlbase.INITIATION_SIZE), st.booleans())
def test_every_initiation_survives_the_upgrade_request(initiation: bytes, upper: bool) -> None:
    def name(text: bytes) -> bytes:
        return text.upper() if upper else text

    headers = [
        (name(b"upgrade"), b"Tailscale-Control-Protocol"),
        (name(b"x-tailscale-handshake"), base64.b64encode(initiation)),
    ]
    assert controlhttp.check_upgrade_request("POST", headers).initiation == initiation

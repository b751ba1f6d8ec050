"""Fuzz target: the control protocol's parsers and its Noise framing.

The first byte picks what the rest is fed to:

* 0: ``parse_client_message`` (what the server parses from nodes);
* 1: ``parse_server_message`` (what nodes parse), and any delta applied to a small map;
* 2: a Noise handshake initiation, as the server reads it;
* 3: a transport frame on an established session, as the server reads it;
* 4: a handshake response, as the node reads it.

Only ParseError subclasses may escape; a message that parses must survive re-encoding unchanged.
"""

from __future__ import annotations

import sys

from embedmesh.control.messages import (
    DeltaMessage,
    encode_client_message,
    encode_server_message,
    parse_client_message,
    parse_server_message,
)
from embedmesh.control.netmap import NetworkMap, PeerInfo
from embedmesh.control.protocol import ClientSession, ServerSession
from embedmesh.errors import ParseError
from embedmesh.wireguard.crypto import generate_private_key, public_key

SERVER = generate_private_key(bytes(range(32)))
MACHINE = generate_private_key(bytes(range(1, 33)))
EPHEMERAL_CLIENT = generate_private_key(bytes(range(2, 34)))
EPHEMERAL_SERVER = generate_private_key(bytes(range(3, 35)))
BASE_MAP = NetworkMap(
    PeerInfo(1, bytes(32), bytes(32), "self", "self", "self.mesh.internal", (), ()),
    {2: PeerInfo(2, bytes([2]) * 32, bytes(32), "peer", "peer", "peer.mesh.internal", (), ())},
)


def _established() -> tuple[ClientSession, ServerSession]:
    client = ClientSession(MACHINE, public_key(SERVER), EPHEMERAL_CLIENT)
    server = ServerSession(SERVER)
    server.receive_initiation(client.initiation(1))
    client.receive_response(server.respond(EPHEMERAL_SERVER))
    return client, server


def TestOneInput(data: bytes) -> None:
    if not data:
        return
    mode, body = data[0] % 5, data[1:]
    try:
        if mode == 0:
            message = parse_client_message(body)
            assert parse_client_message(encode_client_message(message)) == message
        elif mode == 1:
            reply = parse_server_message(body)
            assert parse_server_message(encode_server_message(reply)) == reply
            if isinstance(reply, DeltaMessage):
                BASE_MAP.apply(reply.delta)
        elif mode == 2:
            ServerSession(SERVER).receive_initiation(body)
        elif mode == 3:
            _, server = _established()
            server.receive(body)
        else:
            client = ClientSession(MACHINE, public_key(SERVER), EPHEMERAL_CLIENT)
            client.initiation(1)
            client.receive_response(body)
    except ParseError:
        pass


if __name__ == "__main__":
    from harness import run

    run(TestOneInput)
    sys.exit(0)

"""Fuzz target: Tailscale's ts2021 transport (``embedmesh.tailscale.controlbase``) and key texts.

The first byte picks what the rest is fed to, split into pieces whose size the second byte picks:

* 0: the key parsers (every public type, ``privkey:``, bare hex);
* 1: a fresh ``ServerConnection`` (the initiation, then records);
* 2: a ``ClientConnection`` that sent its initiation (the response or an error frame, then records);
* 3: an established server (records);
* 4: an established server, fed our own authentic records of the input, then the input raw;
* 5: the client's ``EarlyPayloadReader`` and ``parse_early_noise``.

Only ParseError subclasses may escape. Parsed keys re-encode to the input (lower-cased); authentic
records always come back as the plaintext that went in.
"""

from __future__ import annotations

import sys

from embedmesh.errors import ParseError
from embedmesh.tailscale import controlbase as cb
from embedmesh.tailscale.keys import (
    ChallengePublic,
    DiscoPublic,
    MachinePrivate,
    MachinePublic,
    NodePrivate,
    NodePublic,
)

SERVER = MachinePrivate.generate(bytes(range(32)))
MACHINE = MachinePrivate.generate(bytes(range(1, 33)))
CLIENT_EPHEMERAL = bytes(range(2, 34))
SERVER_EPHEMERAL = bytes(range(3, 35))


def _client() -> cb.ClientConnection:
    return cb.ClientConnection(MACHINE, SERVER.public(), 130, CLIENT_EPHEMERAL)


def _established() -> tuple[cb.ClientConnection, cb.ServerConnection]:
    client = _client()
    server = cb.ServerConnection(SERVER, SERVER_EPHEMERAL)
    server.receive_data(client.initiation)
    client.receive_data(server.data_to_send())
    return client, server


def _pieces(body: bytes, size: int) -> list[bytes]:
    size = size or len(body) or 1
    return [body[i : i + size] for i in range(0, len(body), size)] or [b""]


def _keys(body: bytes) -> None:
    for kind in (MachinePublic, NodePublic, DiscoPublic, ChallengePublic, NodePrivate):
        try:
            key = kind.from_text(body)
        except ParseError:
            continue
        assert key.to_text().encode() == body[: len(kind.PREFIX)] + body[len(kind.PREFIX) :].lower()
    try:
        MachinePublic.from_untyped_hex(body)
    except ParseError:
        pass


def TestOneInput(data: bytes) -> None:
    if len(data) < 2:
        return
    mode, size, body = data[0] % 6, data[1], data[2:]
    try:
        if mode == 0:
            _keys(body)
        elif mode == 1:
            server = cb.ServerConnection(SERVER, SERVER_EPHEMERAL)
            for piece in _pieces(body, size):
                server.receive_data(piece)
        elif mode == 2:
            client = _client()
            for piece in _pieces(body, size):
                client.receive_data(piece)
        elif mode == 3:
            _, server = _established()
            for piece in _pieces(body, size):
                server.receive_data(piece)
        elif mode == 4:
            client, server = _established()
            wire = client.send_record(b"") + client.send(body)
            got = b"".join(server.receive_data(piece) for piece in _pieces(wire, size))
            assert got == body
            server.receive_data(body)
        else:
            reader = cb.EarlyPayloadReader()
            for piece in _pieces(body, size):
                reader.receive(piece)
            cb.parse_early_noise(body)
    except ParseError:
        pass


if __name__ == "__main__":
    from harness import run

    run(TestOneInput)
    sys.exit(0)

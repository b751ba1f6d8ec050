"""Fuzz target: disco packets and the one-socket demultiplexer (``embedmesh.tailscale.disco``).

The first byte picks the mode:

* 0: the rest is a datagram: ``classify`` it, and if it is disco, open it with the box of a fixed
  key pair (its sender key is overwritten with the peer's, so mutations reach the box);
* 1: the rest is a message cleartext for ``parse_message``, also sealed and opened again;
* 2: the rest is a datagram opened by a box whose peer key is the datagram's own sender key.

Only ParseError may escape; ``classify`` never raises; a parsed message re-encodes and parses to
itself, and survives a seal/open round trip.
"""

from __future__ import annotations

import sys

from embedmesh.errors import ParseError
from embedmesh.tailscale import disco
from embedmesh.tailscale.keys import DiscoPrivate

OURS = DiscoPrivate.generate(bytes(range(32)))
PEER = DiscoPrivate.generate(bytes(range(1, 33)))
RECEIVE = disco.DiscoBox(OURS, PEER.public())
SEND = disco.DiscoBox(PEER, OURS.public())
NONCE = bytes(range(24))


def TestOneInput(data: bytes) -> None:
    if not data:
        return
    mode, body = data[0] % 3, data[1:]
    try:
        if mode == 0:
            kind = disco.classify(body)
            if kind is disco.PacketKind.DISCO and len(body) >= disco.WRAPPER_SIZE:
                patched = body[: len(disco.MAGIC)] + PEER.public().raw + body[disco.HEADER_SIZE :]
                RECEIVE.open(patched)
        elif mode == 1:
            message = disco.parse_message(body)
            encoded = disco.encode_message(message)
            assert disco.parse_message(encoded) == message
            assert RECEIVE.open(SEND.seal(message, NONCE)) == message
        else:
            sender = disco.sender_of(body)
            disco.DiscoBox(OURS, sender).open(body)
    except ParseError:
        pass


if __name__ == "__main__":
    from harness import run

    run(TestOneInput)
    sys.exit(0)

"""Fuzz target: the WireGuard device's receive path, with a live session to a known peer.

The first byte picks which of the device's real messages (initiation, response, transport,
cookie reply) the rest of the input is spliced into, so mutations reach deep into each handler.
Nothing may raise, and no input may make the device allocate state for an unauthenticated sender.
"""

from __future__ import annotations

import random
import sys

from embedmesh.wireguard import crypto
from embedmesh.wireguard.device import WireGuardDevice
from embedmesh.wireguard.messages import (
    INITIATION_MAC1_OFFSET,
    INITIATION_SIZE,
    RESPONSE_MAC1_OFFSET,
    RESPONSE_SIZE,
)

_rng = random.Random(1234)
_A_EP = ("198.18.0.1", 51820)
_B_EP = ("198.18.0.2", 51820)


def _pair() -> tuple[WireGuardDevice, WireGuardDevice, list[bytes]]:
    a = WireGuardDevice(
        crypto.generate_private_key(_rng.randbytes(32)), random_bytes=_rng.randbytes, rng=_rng
    )
    b = WireGuardDevice(
        crypto.generate_private_key(_rng.randbytes(32)), random_bytes=_rng.randbytes, rng=_rng
    )
    a.add_peer(b.public_key, allowed_ips=["100.64.0.2/32"], endpoint=_B_EP)
    b.add_peer(a.public_key, allowed_ips=["100.64.0.1/32"], endpoint=_A_EP)
    seen: list[bytes] = []
    packet = bytes.fromhex("4500001c000000004001f0ea644000016440000208000000000000000000")[:28]
    a.send_packet(packet, 0.0)
    for _ in range(4):
        for src, dst, ep in ((a, b, _A_EP), (b, a, _B_EP)):
            for data, _ in src.datagrams_to_send():
                seen.append(data)
                dst.receive_datagram(data, ep, 0.0)
    return a, b, seen


_A, _B, _MESSAGES = _pair()
_MAX_INDICES = len(_B._indices)


def _fix_mac1(message: bytes) -> bytes:
    """Recompute mac1 so a mutated handshake message gets past the first check into the Noise code."""
    offset = {INITIATION_SIZE: INITIATION_MAC1_OFFSET, RESPONSE_SIZE: RESPONSE_MAC1_OFFSET}.get(len(message))
    if offset is None:
        return message
    mac1 = crypto.mac(_B.identity.mac1_key, message[:offset])
    return message[:offset] + mac1 + message[offset + 16 :]


def TestOneInput(data: bytes) -> None:
    if data and _MESSAGES:
        selector = data[0]
        template = _MESSAGES[selector % len(_MESSAGES)]
        body = data[1:]
        data = body + template[len(body) :] if len(body) < len(template) else body
        if selector & 0x80:
            data = _fix_mac1(data)
    _B.receive_datagram(data, ("198.18.9.9", 4242), 1.0)
    _B.datagrams_to_send()
    # An unauthenticated datagram must never add an index or a peer.
    assert len(_B._indices) <= _MAX_INDICES + 1
    assert len(_B.peers) == 1


if __name__ == "__main__":
    from harness import run

    run(TestOneInput)
    sys.exit(0)

"""Fuzz target: STUN messages (``embedmesh.tailscale.stun``) and the STUN server's responder.

The first byte picks the mode:

* 0: the rest is a datagram for the responder (``StunResponder.answer``) and for each parser;
* 1: the rest is a datagram that a netcheck run receives as the answer to its first request (its
  transaction ID is patched in, so mutations reach the address parsing and the report).

Only ParseError may escape the parsers and nothing at all the responder or netcheck; whatever
parses as a message re-encodes and parses to itself; an answer is a response to the request.
"""

from __future__ import annotations

import sys

from embedmesh.errors import ParseError
from embedmesh.netcheck import NetcheckCore
from embedmesh.tailscale import stun
from embedmesh.tailscale.derpmap import parse_derp_map
from embedmesh.tailscale.stunserver import StunResponder

RESPONDER = StunResponder()
DERP_MAP = parse_derp_map(
    {
        "Regions": {
            "1": {
                "RegionID": 1,
                "RegionCode": "a",
                "Nodes": [{"Name": "1a", "RegionID": 1, "HostName": "a", "IPv4": "192.0.2.1"}],
            },
            "2": {
                "RegionID": 2,
                "RegionCode": "b",
                "Nodes": [{"Name": "2a", "RegionID": 2, "HostName": "b", "IPv4": "192.0.2.2"}],
            },
        }
    }
)


class _Counter:
    """Deterministic transaction IDs, a new one each call (a fuzz run must be reproducible)."""

    def __init__(self) -> None:
        self.n = 0

    def __call__(self, size: int) -> bytes:
        self.n += 1
        return self.n.to_bytes(size, "big")


def TestOneInput(data: bytes) -> None:
    if not data:
        return
    mode, body = data[0] % 2, data[1:]
    if mode == 0:
        answer = RESPONDER.answer(body, ("192.0.2.7", 41641))
        if answer is not None:
            assert stun.parse_binding_response(answer).txid == body[8:20]
        try:
            message = stun.parse_message(body)
            assert stun.parse_message(stun.encode_message(message)) == message
            stun.parse_binding_request(body)
        except ParseError:
            pass
        try:
            stun.parse_binding_response(body)
        except ParseError:
            pass
        return
    core = NetcheckCore(DERP_MAP, random_bytes=_Counter())
    core.start(0.0)
    sent = core.datagrams_to_send()
    request, target = sent[0]
    patched = body[:8] + request[8:20] + body[20:] if len(body) >= 20 else body
    core.receive(patched, target, 0.01)
    core.handle_timeout(10.0)
    assert not core.running and core.report is not None


if __name__ == "__main__":
    from harness import run

    run(TestOneInput)
    sys.exit(0)

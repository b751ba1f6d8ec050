"""Fuzz target: the SOCKS5 handshake parser (greeting and request, fed in pieces)."""

from __future__ import annotations

import sys

from embedmesh.errors import ParseError
from embedmesh.gateway.socks5 import Socks5Handshake


def TestOneInput(data: bytes) -> None:
    handshake = Socks5Handshake()
    step = (data[0] % 7 + 1) if data else 1
    try:
        for i in range(1, len(data), step):
            handshake.feed(data[i : i + step])
    except ParseError:
        return
    if handshake.request is not None:
        assert 0 <= handshake.request.port < 65536


if __name__ == "__main__":
    from harness import run

    run(TestOneInput)
    sys.exit(0)

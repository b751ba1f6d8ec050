"""Fuzz target: DERP over WebSocket (``embedmesh.tailscale.derpws``).

The first byte picks the mode, the second the piece size the stream is fed in:

* 0: the rest is what a client sends to the server's framing (masked frames expected);
* 1: the rest is what a server sends to the client's framing;
* 2: the rest is an upgrade request's header lines (``name: value``), checked by ``accept_websocket``;
* 3: the rest is a server's 101 header lines, checked by ``check_handshake_response``.

Only ParseError may escape the handshake checks; the framing never raises (a broken stream is a
close code), never yields DERP bytes after it closed, and answers with bytes the peer's framing reads.
"""

from __future__ import annotations

import sys

from embedmesh.errors import ParseError
from embedmesh.tailscale import derpws

NONCE = bytes(range(16))


def _header_lines(body: bytes) -> list[tuple[bytes, bytes]]:
    headers = []
    for line in body.split(b"\n"):
        name, _, value = line.partition(b":")
        headers.append((name.strip().lower(), value.strip()))
    return headers


def TestOneInput(data: bytes) -> None:
    if len(data) < 2:
        return
    mode, piece, body = data[0] % 4, data[1] % 64 + 1, data[2:]
    try:
        if mode in (0, 1):
            framing = derpws.WebSocketFraming(client=mode == 1)
            peer = derpws.WebSocketFraming(client=mode != 1)
            for i in range(0, len(body), piece):
                closed_before = framing.closed is not None
                payload = framing.receive_data(body[i : i + piece])
                assert not (closed_before and payload)
                # What the framing answers (Pongs, a close) is valid WebSocket for the peer.
                peer.receive_data(framing.data_to_send())
            framing.receive_data(None)
            assert framing.closed is not None
        elif mode == 2:
            accept = derpws.accept_websocket(b"GET", _header_lines(body))
            assert accept.response.startswith(b"HTTP/1.1 101 ")
        else:
            derpws.check_handshake_response(NONCE, _header_lines(body))
    except ParseError:
        pass


if __name__ == "__main__":
    from harness import run

    run(TestOneInput)
    sys.exit(0)

"""Fuzz target: the control server's side of ts2021 after the upgrade (``noiseserver.Ts2021Protocol``).

Each input is one connection to a fresh protocol (its peer did a valid ``POST /ts2021``), on a
transport that records writes, with a small echo app behind the bridge. The first byte picks
what the input is: below 128 the raw bytes the socket delivers after the upgrade (not necessarily
Noise); from 128 the plaintext a real client sends inside Noise records after a valid handshake
(with HTTP/2's client preface first when bit 6 is set, so the frames themselves are reached). The
input arrives in pieces of ``1 + (byte 0 % 32) * 97`` bytes; then the socket closes.

Invariants: nothing escapes ``data_received``/``connection_lost`` (asyncio would only log it, so
it is checked here); everything the server writes after its 101 is Noise records our client opens;
once the connection is lost no task of it is left running.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import MutableMapping
from typing import Any

from embedmesh.tailscale import controlbase
from embedmesh.tailscale.keys import MachinePrivate
from embedmesh.tailscale.noiseserver import SWITCHING, Ts2021Protocol

SERVER_KEY = MachinePrivate.generate(bytes(range(32)))
CLIENT_KEY = MachinePrivate.generate(bytes(range(32, 64)))
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_loop = asyncio.new_event_loop()


async def echo_app(scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
    body = b""
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return
        body += message.get("body", b"")
        if not message.get("more_body", False):
            break
    await send({"type": "http.response.start", "status": 200, "headers": [(b"x-path", scope["path"].encode())]})
    await send({"type": "http.response.body", "body": body * 2, "more_body": True})
    await send({"type": "http.response.body", "body": b"end"})


class RecordingTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.closing = False
        self.protocol: Ts2021Protocol | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self.closing:
            self.written += data

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            protocol = self.protocol
            if protocol is not None:
                asyncio.get_running_loop().call_soon(protocol.connection_lost, None)

    def is_closing(self) -> bool:
        return self.closing

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


async def _connection(data: bytes) -> None:
    control, body = data[0], data[1:]
    piece = 1 + (control % 32) * 97
    client = controlbase.ClientConnection(CLIENT_KEY, SERVER_KEY.public(), 130, bytes(32))
    transport = RecordingTransport()
    protocol = Ts2021Protocol(
        echo_app, SERVER_KEY, client.initiation, client=("192.0.2.1", 1), server=("192.0.2.2", 80),
        random_bytes=lambda n: bytes(n),
    )
    transport.protocol = protocol
    before = asyncio.all_tasks()
    protocol.connection_made(transport)
    assert transport.written.startswith(SWITCHING)
    read = len(SWITCHING)
    if control >= 128:
        client.receive_data(bytes(transport.written[read:]))
        read = len(transport.written)
        assert client.established
        plaintext = (PREFACE if control & 0x40 else b"") + body
        stream = client.send(plaintext) if plaintext else b""
    else:
        stream = body
    for start in range(0, len(stream), piece):
        if transport.closing:
            break
        protocol.data_received(stream[start : start + piece])
        for _ in range(3):
            await asyncio.sleep(0)
    for _ in range(5):
        await asyncio.sleep(0)
    if control >= 128:
        # Whatever the server answered is Noise records that open (a ParseError here would be
        # the server writing garbage, so it is not caught).
        client.receive_data(bytes(transport.written[read:]))
    transport.close()
    for _ in range(5):
        await asyncio.sleep(0)
    left = [t for t in asyncio.all_tasks() - before if t is not asyncio.current_task() and not t.done()]
    assert not left, f"tasks left after the connection closed: {left}"


def TestOneInput(data: bytes) -> None:
    if not data:
        return
    _loop.run_until_complete(_connection(data))


if __name__ == "__main__":
    from harness import run

    run(TestOneInput)
    sys.exit(0)

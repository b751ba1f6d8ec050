"""noiseclient against a hostile control server: a real Noise handshake, then HTTP/2 that is
garbage or breaks the protocol. Every request fails with ControlTransportError (an embedmesh
error), nothing else escapes connect_control, and nothing hangs."""

from __future__ import annotations

import os

import anyio
import anyio.abc
import h2.config
import h2.connection
import h2.events
import pytest

from embedmesh.tailscale import controlbase, controlhttp, noiseclient
from embedmesh.tailscale.keys import ChallengePublic, MachinePrivate

SERVER_KEY = MachinePrivate.generate(os.urandom(32))
SWITCHING = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: tailscale-control-protocol\r\nConnection: upgrade\r\n\r\n"


def _h2_server() -> h2.connection.H2Connection:
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    conn.initiate_connection()
    return conn


def _garbage() -> bytes:
    # Not a server preface: a SETTINGS frame on stream 1, then random bytes.
    return b"\x00\x00\x00\x04\x00\x00\x00\x00\x01" + os.urandom(64)


def _headers_for_a_stream_never_opened() -> bytes:
    conn = _h2_server()
    preface = conn.data_to_send()
    # A HEADERS frame on stream 2 (server-initiated without PUSH_PROMISE): a protocol error.
    return preface + b"\x00\x00\x01\x01\x05\x00\x00\x00\x02\x88"


def _non_utf8_status() -> bytes:
    conn = _h2_server()
    preface = conn.data_to_send()
    # HEADERS on stream 1 with a literal ":status" of bytes that are no number and no UTF-8.
    block = b"\x0f\x00\x03\xff\xfe\xfd"  # literal without indexing, name index 8 (:status)
    return preface + len(block).to_bytes(3, "big") + b"\x01\x05\x00\x00\x00\x01" + block


def _status_not_a_number() -> bytes:
    conn = _h2_server()
    preface = conn.data_to_send()
    block = b"\x0f\x00\x03abc"  # ":status: abc"
    return preface + len(block).to_bytes(3, "big") + b"\x01\x05\x00\x00\x00\x01" + block


def _goaway() -> bytes:
    conn = _h2_server()
    conn.close_connection()
    return conn.data_to_send()


async def _serve(stream: anyio.abc.SocketStream, answer: bytes) -> None:
    async with stream:
        data = b""
        while b"\r\n\r\n" not in data:
            data += await stream.receive()
        head = data.partition(b"\r\n\r\n")[0].decode().split("\r\n")
        headers = [(k.strip().lower().encode(), v.strip().encode()) for k, v in (h.split(":", 1) for h in head[1:])]
        upgrade = controlhttp.check_upgrade_request("POST", headers)
        noise = controlbase.ServerConnection(SERVER_KEY, os.urandom(32))
        response = noise.accept_initiation(upgrade.initiation)
        early = controlbase.encode_early_payload(ChallengePublic(os.urandom(32)))
        await stream.send(SWITCHING + response + noise.send(early) + noise.send(answer))
        try:
            while await stream.receive():
                pass
        except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
            pass


@pytest.mark.parametrize(
    "answer", [_garbage, _headers_for_a_stream_never_opened, _non_utf8_status, _status_not_a_number, _goaway], ids=lambda f: f.__name__
)
def test_a_broken_server_fails_requests_with_our_error(answer: object) -> None:
    make = answer
    assert callable(make)

    async def body() -> None:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
        port = listener.extra(anyio.abc.SocketAttribute.local_port)
        async with listener, anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, lambda s: _serve(s, make()))
            with anyio.fail_after(10), pytest.raises(noiseclient.ControlTransportError):
                # The broken HTTP/2 may come with the handshake (connect_control raises) or
                # after it (the request does): either way our error, by itself.
                async with noiseclient.connect_control(
                    f"http://127.0.0.1:{port}", MachinePrivate.generate(os.urandom(32)), 130,
                    server_key=SERVER_KEY.public(),
                ) as conn:
                    await conn.request("GET", "/whoami")
            tg.cancel_scope.cancel()

    anyio.run(body)

"""Our ts2021 client transport (noiseclient) against Tailscale's own Go server side.

tsvectors' ``h2-server`` mode is Go's ``controlhttpserver.AcceptHTTP`` with headscale's early
payload, then ``golang.org/x/net/http2``'s server inside the Noise conn, as headscale and
Tailscale's control run it. Everything crosses a real loopback TCP connection: the ``/key`` fetch,
the upgrade, Noise, HTTP/2 with its flow control, several streams at once, resets.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager

import anyio
import pytest

from embedmesh.tailscale import noiseclient
from embedmesh.tailscale.keys import ChallengePublic, MachinePrivate
from tests.tailscale.gobuild import tsvectors

pytestmark = pytest.mark.interop

CAPVER = 130


def stream_bytes(start: int, length: int) -> bytes:
    """What tsvectors' /stream sends at ``start`` (byte i is i % 251)."""
    return bytes((start + i) % 251 for i in range(length))


class GoServer:
    def __init__(self, process: subprocess.Popen[bytes], port: int, key: MachinePrivate, challenge: ChallengePublic):
        self.process = process
        self.url = f"http://127.0.0.1:{port}"
        self.key = key
        self.challenge = challenge


@pytest.fixture
def go_server() -> Iterator[GoServer]:
    key = MachinePrivate.generate(os.urandom(32))
    challenge = ChallengePublic(os.urandom(32))
    process = subprocess.Popen(
        [str(tsvectors()), "h2-server", "-key", key.raw.hex(), "-challenge", challenge.raw.hex()],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline().decode()
        assert line.startswith("PORT "), (line, process.stderr.read() if process.stderr else b"")
        yield GoServer(process, int(line.split()[1]), key, challenge)
    finally:
        # Closing its stdin ends the Go program (it never outlives the test).
        assert process.stdin is not None
        process.stdin.close()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        for pipe in (process.stdout, process.stderr):
            if pipe is not None:
                pipe.close()


@asynccontextmanager
async def _connect(server: GoServer, client: MachinePrivate) -> AsyncIterator[noiseclient.ControlConnection]:
    async with noiseclient.connect_control(server.url, client, CAPVER) as conn:
        yield conn


def _run(test: Callable[[], Awaitable[None]]) -> None:
    async def bounded() -> None:
        with anyio.fail_after(60):
            await test()

    anyio.run(bounded)


def test_our_client_speaks_http2_in_noise_with_go(go_server: GoServer) -> None:
    client = MachinePrivate.generate(os.urandom(32))

    async def body() -> None:
        # No server key given: the client fetches it from Go's /key first.
        async with _connect(go_server, client) as conn:
            assert conn.early_payload is not None
            assert conn.early_payload.node_key_challenge == go_server.challenge
            whoami = await conn.request("GET", "/whoami")
            assert whoami.status == 200
            assert json.loads(whoami.body) == {"peer": client.public().to_text(), "version": CAPVER, "proto": "HTTP/2.0"}
            # 3 MB up: more than Go's per-stream receive window (1 MB), so our sender must wait
            # for its window updates; and back down in one response.
            upload = os.urandom(3 << 20)
            echoed = await conn.request(
                "POST", "/echo", upload, headers={"X-Echo": "hello", "Content-Type": "application/json"}
            )
            assert echoed.status == 200
            assert echoed.headers["x-echo"] == "hello" and echoed.headers["x-method"] == "POST"
            assert echoed.headers["content-type"] == "application/json"
            assert echoed.body == upload
            missing = await conn.request("GET", "/no-such-route")
            assert missing.status == 404

    _run(body)


def test_concurrent_streams_and_a_multi_megabyte_stream(go_server: GoServer) -> None:
    client = MachinePrivate.generate(os.urandom(32))
    size = 9 << 20  # over two of our 4 MiB stream windows
    results: dict[str, object] = {}

    async def body() -> None:
        async with _connect(go_server, client) as conn:

            async def streamed(name: str) -> None:
                async with conn.stream("GET", f"/stream?bytes={size}&chunk=65536") as response:
                    assert response.status == 200
                    received = 0
                    async for chunk in response:
                        assert chunk == stream_bytes(received, len(chunk))
                        received += len(chunk)
                results[name] = received

            async def echo(i: int) -> None:
                text = f"echo {i} ".encode() * (i * 300 + 1)
                reply = await conn.request("POST", "/echo", text, headers={"X-Echo": str(i)})
                results[f"echo{i}"] = reply.status == 200 and reply.body == text and reply.headers["x-echo"] == str(i)

            async with anyio.create_task_group() as tg:
                tg.start_soon(streamed, "a")
                tg.start_soon(streamed, "b")
                for i in range(12):
                    tg.start_soon(echo, i)

    _run(body)
    assert results.pop("a") == results.pop("b") == size
    assert results == {f"echo{i}": True for i in range(12)}


def test_concurrent_uploads_share_the_connection_window(go_server: GoServer) -> None:
    """Four 2.5 MB bodies at once through Go's 1 MB connection window: every sender waits for
    window updates at the same time, and each must be woken (not only the last to wait)."""
    client = MachinePrivate.generate(os.urandom(32))
    bodies = [os.urandom(5 << 19) for _ in range(4)]
    echoed: dict[int, bool] = {}

    async def body() -> None:
        async with _connect(go_server, client) as conn:

            async def upload(i: int) -> None:
                reply = await conn.request("POST", "/echo", bodies[i])
                echoed[i] = reply.status == 200 and reply.body == bodies[i]

            with anyio.fail_after(30):
                async with anyio.create_task_group() as tg:
                    for i in range(len(bodies)):
                        tg.start_soon(upload, i)

    _run(body)
    assert echoed == {i: True for i in range(len(bodies))}


def test_a_slow_reader_holds_the_go_server_back(go_server: GoServer) -> None:
    """Flow control: unread data is not acknowledged, so Go's handler blocks at our window."""
    client = MachinePrivate.generate(os.urandom(32))

    async def body() -> None:
        async with _connect(go_server, client) as conn:
            async with conn.stream("GET", "/stream?bytes=67108864&chunk=16384&tag=slow") as response:
                iterator = response.__aiter__()
                first = await iterator.__anext__()
                assert first == stream_bytes(0, len(first))
                await anyio.sleep(0.7)
                progress = json.loads((await conn.request("GET", "/progress?tag=slow")).body)["written"]
                # Our window per stream, plus what Go's writer buffers around it (one chunk and
                # its 4 KiB frame buffer), not the 64 MiB the handler wants to write.
                assert 0 < progress <= noiseclient.STREAM_WINDOW + len(first) + (64 << 10), progress
            # Leaving the block early reset the stream; the connection goes on.
            again = await conn.request("GET", "/whoami")
            assert again.status == 200

    _run(body)


def test_a_reset_stream_fails_only_that_request(go_server: GoServer) -> None:
    client = MachinePrivate.generate(os.urandom(32))

    async def body() -> None:
        async with _connect(go_server, client) as conn:
            with pytest.raises(noiseclient.ControlTransportError, match="reset"):
                await conn.request("GET", "/reset")
            assert (await conn.request("GET", "/whoami")).status == 200

    _run(body)


def test_the_wrong_server_key_fails_with_a_protocol_error(go_server: GoServer) -> None:
    client = MachinePrivate.generate(os.urandom(32))
    other = MachinePrivate.generate(os.urandom(32)).public()

    async def body() -> None:
        # Go's server cannot open an initiation sealed to another key: it hangs up.
        with pytest.raises(noiseclient.ControlTransportError, match="during the Noise handshake"):
            async with noiseclient.connect_control(go_server.url, client, CAPVER, server_key=other):
                pass

    _run(body)

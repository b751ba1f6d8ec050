"""The control server's ts2021 transport (the /ts2021 upgrade, Noise, HTTP/2 bridged to ASGI).

The server runs for real (uvicorn on loopback, its own h11 protocol doing the upgrade); the Noise
app is replaced by a small test app (whoami, echo, streams), because what is tested here is the
transport, not the register/map handlers. Peers: embedmesh's own client (noiseclient), Tailscale's
Go client (ts2021.Client in tsvectors, interop), raw sockets for hostile input.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import anyio
import httpx
import pytest
from control_harness import start_server
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from embedmesh.control.server import RunningServer
from embedmesh.tailscale import controlbase, noiseclient, noiseserver
from embedmesh.tailscale.keys import MachinePrivate

CAPVER = 130


def stream_bytes(start: int, length: int) -> bytes:
    """Byte i of every /stream body is i % 251 (as in tsvectors)."""
    return bytes((start + i) % 251 for i in range(length))


def transport_app(progress: dict[str, int]) -> Starlette:
    """The routes tsvectors' h2-server serves, as an ASGI app behind our bridge."""

    async def whoami(request: Request) -> JSONResponse:
        tailscale = request.scope["extensions"]["tailscale"]
        return JSONResponse(
            {
                "peer": tailscale["machine_key"].to_text(),
                "version": tailscale["version"],
                "proto": "HTTP/" + request.scope["http_version"],
            }
        )

    async def echo(request: Request) -> Response:
        body = await request.body()
        return Response(
            body,
            headers={
                "x-echo": request.headers.get("x-echo", ""),
                "x-method": request.method,
                "content-type": request.headers.get("content-type", "application/octet-stream"),
            },
        )

    async def stream(request: Request) -> StreamingResponse:
        size = int(request.query_params["bytes"])
        chunk = int(request.query_params.get("chunk", 16384))
        tag = request.query_params.get("tag", "")

        async def body() -> AsyncIterator[bytes]:
            sent = 0
            while sent < size:
                n = min(chunk, size - sent)
                yield stream_bytes(sent, n)
                sent += n
                if tag:
                    progress[tag] = sent

        return StreamingResponse(body(), media_type="application/octet-stream")

    async def fail_midway(request: Request) -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            yield b"first part"
            raise RuntimeError("the app broke in the middle of its answer")

        return StreamingResponse(body())

    async def latin1(request: Request) -> Response:
        # Not UTF-8: header bytes must cross the bridge as they are, and not break the client.
        return Response(b"", headers={"x-odd": "\xff\xfe"})

    async def written(request: Request) -> JSONResponse:
        return JSONResponse({"written": progress.get(request.query_params["tag"], -1)})

    async def quiet(request: Request) -> StreamingResponse:
        # A map long poll's shape: a stream that stays open and sends now and then.
        parts = int(request.query_params["parts"])
        pause = float(request.query_params["pause"])

        async def body() -> AsyncIterator[bytes]:
            for i in range(parts):
                yield f"part {i}\n".encode()
                await anyio.sleep(pause)

        return StreamingResponse(body(), media_type="text/plain")

    return Starlette(
        routes=[
            Route("/whoami", whoami),
            Route("/echo", echo, methods=["POST"]),
            Route("/stream", stream),
            Route("/fail-midway", fail_midway),
            Route("/progress", written),
            Route("/latin1", latin1),
            Route("/quiet", quiet),
        ]
    )


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[RunningServer, dict[str, int]]]:
    progress: dict[str, int] = {}
    with start_server(tmp_path / "server", first_request_timeout=0.5) as running:
        running.server.tsapi = transport_app(progress)
        yield running, progress


def _run(test: Callable[[], Awaitable[None]]) -> None:
    async def bounded() -> None:
        with anyio.fail_after(60):
            await test()

    anyio.run(bounded)


def _machine() -> MachinePrivate:
    return MachinePrivate.generate(os.urandom(32))


def test_our_client_against_our_server(server: tuple[RunningServer, dict[str, int]]) -> None:
    running, _ = server
    client = _machine()

    async def body() -> None:
        async with noiseclient.connect_control(running.url, client, CAPVER) as conn:
            # headscale's early payload: a fresh node-key challenge per connection.
            assert conn.early_payload is not None
            assert not conn.early_payload.node_key_challenge.is_zero
            whoami = await conn.request("GET", "/whoami")
            assert json.loads(whoami.body) == {
                "peer": client.public().to_text(),
                "version": CAPVER,
                "proto": "HTTP/2",
            }
            # 1 MiB up (the server's cap, and 16 times HTTP/2's default window) and back.
            upload = os.urandom(1 << 20)
            echoed = await conn.request(
                "POST", "/echo", upload, headers={"X-Echo": "hi", "Content-Type": "x/y"}
            )
            assert (echoed.status, echoed.headers["x-echo"], echoed.headers["content-type"]) == (
                200,
                "hi",
                "x/y",
            )
            assert echoed.body == upload
            # One byte more is refused: that stream is reset, the connection goes on.
            with pytest.raises(noiseclient.ControlTransportError, match="reset"):
                await conn.request("POST", "/echo", upload + b"!")
            assert (await conn.request("GET", "/no-such-route")).status == 404
            odd = await conn.request("GET", "/latin1")
            assert (odd.status, odd.headers["x-odd"]) == (200, "\xff\xfe")

    _run(body)


def test_concurrent_streams_and_multi_megabyte_responses(
    server: tuple[RunningServer, dict[str, int]],
) -> None:
    running, _ = server
    size = 9 << 20
    results: dict[str, object] = {}

    async def body() -> None:
        async with noiseclient.connect_control(running.url, _machine(), CAPVER) as conn:

            async def streamed(name: str) -> None:
                async with conn.stream("GET", f"/stream?bytes={size}&chunk=50000") as response:
                    received = 0
                    async for chunk in response:
                        assert chunk == stream_bytes(received, len(chunk))
                        received += len(chunk)
                results[name] = received

            async def echo(i: int) -> None:
                text = f"echo {i} ".encode() * (i * 300 + 1)
                reply = await conn.request("POST", "/echo", text, headers={"X-Echo": str(i)})
                results[f"echo{i}"] = reply.body == text and reply.headers["x-echo"] == str(i)

            async with anyio.create_task_group() as tg:
                tg.start_soon(streamed, "a")
                tg.start_soon(streamed, "b")
                for i in range(12):
                    tg.start_soon(echo, i)

    _run(body)
    assert results.pop("a") == results.pop("b") == size
    assert results == {f"echo{i}": True for i in range(12)}


def test_a_slow_reader_holds_the_app_back(server: tuple[RunningServer, dict[str, int]]) -> None:
    """Backpressure: the app's send() waits for the client's window, so memory stays bounded."""
    running, progress = server

    async def body() -> None:
        async with noiseclient.connect_control(running.url, _machine(), CAPVER) as conn:
            async with conn.stream("GET", "/stream?bytes=67108864&chunk=16384&tag=slow") as response:
                iterator = response.__aiter__()
                first = await iterator.__anext__()
                await anyio.sleep(0.7)
                written = json.loads((await conn.request("GET", "/progress?tag=slow")).body)["written"]
                assert 0 < written <= noiseclient.STREAM_WINDOW + 2 * 16384, written
                assert first == stream_bytes(0, len(first))
            # The client cancelled the stream: the app stops producing, the connection goes on.
            await anyio.sleep(0.2)
            stopped = progress["slow"]
            await anyio.sleep(0.3)
            assert progress["slow"] == stopped
            assert (await conn.request("GET", "/whoami")).status == 200

    _run(body)


def test_an_app_failing_midway_resets_its_stream(server: tuple[RunningServer, dict[str, int]]) -> None:
    running, _ = server

    async def body() -> None:
        async with noiseclient.connect_control(running.url, _machine(), CAPVER) as conn:
            with anyio.fail_after(5):
                with pytest.raises(noiseclient.ControlTransportError, match="reset"):
                    await conn.request("GET", "/fail-midway")
            assert (await conn.request("GET", "/whoami")).status == 200

    _run(body)


def test_a_noise_connection_outlives_the_first_request_timer(
    server: tuple[RunningServer, dict[str, int]],
) -> None:
    running, _ = server

    async def body() -> None:
        async with noiseclient.connect_control(running.url, _machine(), CAPVER) as conn:
            # The server closes idle sockets after 0.5 s without a request; the upgrade was one.
            await anyio.sleep(1.2)
            assert (await conn.request("GET", "/whoami")).status == 200
            assert len(running.server.limiter) == 1

    _run(body)
    deadline = time.monotonic() + 5
    while len(running.server.limiter) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(running.server.limiter) == 0  # connection_lost reached the limiter


# ---------------------------------------------------------------------- hostile input


def _raw(running: RunningServer, data: bytes, *, wait_close: bool = True) -> bytes:
    """Send ``data`` on a fresh connection; everything the server answers until it closes."""
    port = int(running.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(data)
        answer = b""
        while wait_close:
            piece = sock.recv(65536)
            if not piece:
                break
            answer += piece
        return answer


def _upgrade(initiation: bytes, headers: str = "") -> bytes:
    return (
        "POST /ts2021 HTTP/1.1\r\nHost: x\r\nUpgrade: tailscale-control-protocol\r\nConnection: upgrade\r\n"
        f"X-Tailscale-Handshake: {base64.b64encode(initiation).decode()}\r\nContent-Length: 0\r\n{headers}\r\n"
    ).encode()


def _still_serving(running: RunningServer) -> None:
    assert (
        httpx.get(running.url + "/key?v=130", timeout=5).json()["publicKey"]
        == running.server.machine_key.public().to_text()
    )

    async def body() -> None:
        async with noiseclient.connect_control(running.url, _machine(), CAPVER) as conn:
            assert (await conn.request("GET", "/whoami")).status == 200

    _run(body)


@pytest.mark.parametrize(
    ("request_bytes", "text"),
    [
        (
            b"POST /ts2021 HTTP/1.1\r\nHost: x\r\nUpgrade: tailscale-control-protocol\r\nConnection: upgrade\r\n"
            b"Content-Length: 0\r\n\r\n",
            b"no tailscale handshake header",
        ),
        (
            b"POST /ts2021 HTTP/1.1\r\nHost: x\r\nUpgrade: tailscale-control-protocol\r\nConnection: upgrade\r\n"
            b"X-Tailscale-Handshake: %%%\r\nContent-Length: 0\r\n\r\n",
            b"not valid base64",
        ),
        (
            b"POST /ts2021 HTTP/1.1\r\nHost: x\r\nUpgrade: tailscale-control-protocol\r\nConnection: upgrade\r\n"
            b"X-Tailscale-Handshake: AAAA\r\nContent-Length: 0\r\n\r\n",
            b"wrong length",
        ),
        (
            b"POST /elsewhere HTTP/1.1\r\nHost: x\r\nUpgrade: tailscale-control-protocol\r\nConnection: upgrade\r\n"
            b"X-Tailscale-Handshake: AAAA\r\nContent-Length: 0\r\n\r\n",
            b"/ts2021",
        ),
    ],
)
def test_bad_upgrade_requests_get_400_and_the_reason(
    server: tuple[RunningServer, dict[str, int]], request_bytes: bytes, text: bytes
) -> None:
    running, _ = server
    answer = _raw(running, request_bytes)
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
    assert text in answer
    _still_serving(running)


def test_garbage_instead_of_noise_closes_only_that_connection(
    server: tuple[RunningServer, dict[str, int]],
) -> None:
    running, _ = server
    client = controlbase.ClientConnection(
        _machine(), running.server.machine_key.public(), CAPVER, os.urandom(32)
    )
    # A valid upgrade, then bytes that are no controlbase record.
    answer = _raw(running, _upgrade(client.initiation) + b"\x07garbage" * 50)
    assert answer.startswith(b"HTTP/1.1 101 ")
    _still_serving(running)


@contextlib.contextmanager
def _noise_socket(running: RunningServer) -> Iterator[tuple[socket.socket, controlbase.ClientConnection]]:
    """A raw connection upgraded to ts2021, the Noise handshake done, nothing else sent yet."""
    port = int(running.url.rsplit(":", 1)[1])
    client = controlbase.ClientConnection(
        _machine(), running.server.machine_key.public(), CAPVER, os.urandom(32)
    )
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(_upgrade(client.initiation))
        received = b""
        while b"\r\n\r\n" not in received:
            received += sock.recv(65536)
        leftover = received.partition(b"\r\n\r\n")[2]
        client.receive_data(leftover)
        while not client.established:
            client.receive_data(sock.recv(65536))
        yield sock, client


def _seconds_until_closed(sock: socket.socket, started: float) -> float:
    """Read (and drop) what the server sends until it closes; seconds since ``started``."""
    while sock.recv(65536):
        pass
    return time.monotonic() - started


def test_garbage_inside_noise_closes_only_that_connection(
    server: tuple[RunningServer, dict[str, int]],
) -> None:
    running, _ = server
    with _noise_socket(running) as (sock, client):
        # Authentic Noise records whose plaintext is not HTTP/2 (no client preface).
        sock.sendall(client.send(b"GET / HTTP/1.1\r\n\r\n" + os.urandom(3000)))
        while sock.recv(65536):
            pass
    _still_serving(running)


def test_a_handshake_for_another_server_key_is_refused(server: tuple[RunningServer, dict[str, int]]) -> None:
    running, _ = server
    client = controlbase.ClientConnection(_machine(), _machine().public(), CAPVER, os.urandom(32))
    answer = _raw(running, _upgrade(client.initiation))
    # As Go's controlhttpserver (the 101 is out before controlbase.Server reads the initiation,
    # which it cannot open): the 101, then the connection closes with nothing more.
    head, _, rest = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101 ") and rest == b""
    _still_serving(running)


# ---------------------------------------------------------------------- TLS


def test_the_transport_over_tls(tmp_path: Path) -> None:
    from test_control_tls import _self_signed

    cert, key = _self_signed(tmp_path)
    progress: dict[str, int] = {}
    with start_server(tmp_path / "server", tls_cert=cert, tls_key=key) as running:
        running.server.tsapi = transport_app(progress)
        context = ssl.create_default_context(cafile=str(cert))

        async def body() -> None:
            async with noiseclient.connect_control(
                running.url, _machine(), CAPVER, ssl_context=context
            ) as conn:
                async with conn.stream("GET", f"/stream?bytes={5 << 20}") as response:
                    data = await response.read()
                assert data == stream_bytes(0, 5 << 20)

        _run(body)


# ---------------------------------------------------------------------- Tailscale's Go client


@pytest.mark.interop
def test_tailscales_go_client_against_our_server(server: tuple[RunningServer, dict[str, int]]) -> None:
    from tests.tailscale.gobuild import tsvectors

    running, _ = server
    client = _machine()
    result = subprocess.run(
        [
            str(tsvectors()),
            "ts2021-client",
            "-key",
            client.raw.hex(),
            "-server",
            running.server.machine_key.public().raw.hex(),
            "-url",
            running.url,
            "-version",
            str(CAPVER),
            "-echo-bytes",
            str(1 << 20),
            "-stream-bytes",
            str(9 << 20),
            "-concurrent",
            "12",
        ],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["proto"] == "HTTP/2.0"
    assert json.loads(report["whoami"]) == {
        "peer": client.public().to_text(),
        "version": CAPVER,
        "proto": "HTTP/2",
    }
    assert report["echo_bytes"] == 1 << 20 and report["echo_header"] == "tsvectors"
    assert report["stream_bytes"] == 9 << 20
    assert report["concurrent_ok"] == 12
    assert report["not_found_status"] == 404


# ---------------------------------------------------------------------- connection limits


def test_unregistered_noise_connections_count_against_their_source(tmp_path: Path) -> None:
    """Anyone can make machine keys: a Noise handshake alone must not lift the per-source cap,
    while registered nodes' connections (many nodes behind one NAT) no longer count."""
    from control_harness import Admin

    from embedmesh.errors import EmbedmeshError
    from embedmesh.tailscale.client import TailscaleControlClient

    with start_server(tmp_path / "server", max_connections_per_source=3) as running:
        admin = Admin(running)
        auth_key = admin.key(reusable=True)
        admin.http.close()
        limiter = running.server.limiter
        server_key = running.server.machine_key.public()

        def nodes(name: str) -> TailscaleControlClient:
            return TailscaleControlClient(
                running.url,
                machine_key=os.urandom(32),
                node_key=os.urandom(32),
                disco_key=os.urandom(32),
                hostname=name,
                auth_key=auth_key,
            )

        async def settle(count: int) -> None:
            with anyio.fail_after(5):
                while len(limiter) != count:
                    await anyio.sleep(0.02)

        async def body() -> None:
            # Three registered nodes, each polling its map on its own Noise connection.
            async with nodes("a"), nodes("b"), nodes("c"):
                await settle(3)
                async with contextlib.AsyncExitStack() as stack:
                    for _ in range(3):
                        conn = await stack.enter_async_context(
                            noiseclient.connect_control(
                                running.url, _machine(), CAPVER, server_key=server_key
                            )
                        )
                        assert conn.early_payload is not None
                    await settle(6)
                    # The source's three unregistered places are taken, by started (not idle)
                    # connections that are not evicted: the fourth is refused.
                    with pytest.raises(EmbedmeshError):
                        async with noiseclient.connect_control(
                            running.url, _machine(), CAPVER, server_key=server_key, timeout=5
                        ):
                            pass
            await settle(0)

        _run(body)


# ---------------------------------------------------------------------- idle connections

#: The client's connection preface: the magic, then (as every client sends it) an empty SETTINGS.
H2_MAGIC = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
EMPTY_SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def _settle(running: RunningServer, count: int) -> None:
    deadline = time.monotonic() + 5
    while len(running.server.limiter) != count and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(running.server.limiter) == count


def test_an_upgraded_connection_that_never_starts_http2_is_closed(
    server: tuple[RunningServer, dict[str, int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    running, _ = server
    monkeypatch.setattr(noiseserver, "PREFACE_TIMEOUT", 0.6)
    # Silent after the handshake.
    with _noise_socket(running) as (sock, _client):
        elapsed = _seconds_until_closed(sock, time.monotonic())
    assert 0.3 <= elapsed < 4, elapsed
    # The magic in a trickle, and never the SETTINGS that must follow it: the same deadline
    # from the upgrade, not from the last byte.
    with _noise_socket(running) as (sock, client):
        started = time.monotonic()
        for i in range(0, len(H2_MAGIC), 6):
            sock.sendall(client.send(H2_MAGIC[i : i + 6]))
            time.sleep(0.15)
        elapsed = _seconds_until_closed(sock, started)
    assert 0.3 <= elapsed < 4, elapsed
    # A client that does start HTTP/2 in time keeps its connection past that deadline.
    with _noise_socket(running) as (sock, client):
        sock.sendall(client.send(H2_MAGIC + EMPTY_SETTINGS))
        sock.settimeout(1.5)
        with pytest.raises(TimeoutError):
            _seconds_until_closed(sock, time.monotonic())
    _settle(running, 0)  # every one of them left the source's cap
    _still_serving(running)


def test_a_connection_with_no_open_stream_is_ended_with_goaway(
    server: tuple[RunningServer, dict[str, int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    running, _ = server
    # The default must outlast Tailscale's 2-minute "recent dial" window, or its client redials
    # only HTTPS:443 after our GOAWAY (see noiseserver.IDLE_TIMEOUT).
    assert noiseserver.IDLE_TIMEOUT > 120
    monkeypatch.setattr(noiseserver, "IDLE_TIMEOUT", 0.6)

    async def body() -> None:
        async with noiseclient.connect_control(running.url, _machine(), CAPVER) as conn:
            # Requests more often than the idle timeout: idle is time with no stream open,
            # counted from the last one's end, so this connection lives far longer than 0.6 s.
            started = time.monotonic()
            while time.monotonic() - started < 1.8:
                assert (await conn.request("GET", "/whoami")).status == 200
                await anyio.sleep(0.25)
            await anyio.sleep(1.5)
            # The server said goodbye with GOAWAY (no error), not a bare close.
            with pytest.raises(noiseclient.ControlTransportError, match=r"ended the connection.*NO_ERROR"):
                await conn.request("GET", "/whoami")

    _run(body)
    _settle(running, 0)


def test_an_open_stream_is_never_cut_however_quiet(
    server: tuple[RunningServer, dict[str, int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    running, _ = server
    monkeypatch.setattr(noiseserver, "IDLE_TIMEOUT", 0.4)
    monkeypatch.setattr(noiseserver, "PREFACE_TIMEOUT", 0.4)

    async def body() -> None:
        async with noiseclient.connect_control(running.url, _machine(), CAPVER) as conn:
            # Silent twice as long as the idle timeout between parts, for eight times it.
            async with conn.stream("GET", "/quiet?parts=4&pause=0.8") as response:
                data = await response.read()
            assert data == b"".join(f"part {i}\n".encode() for i in range(4))
            # The connection is still the same, working one.
            assert (await conn.request("GET", "/whoami")).status == 200
            assert len(running.server.limiter) == 1

    _run(body)


def test_a_nodes_map_poll_outlives_the_idle_timeout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real register and map handlers: a node's long poll is one stream that stays open, so
    its connection is never ended, while an unused connection beside it is."""
    from control_harness import Admin

    from embedmesh.tailscale.client import TailscaleControlClient

    monkeypatch.setattr(noiseserver, "IDLE_TIMEOUT", 0.5)
    with start_server(tmp_path / "server") as running:
        admin = Admin(running)
        client = TailscaleControlClient(
            running.url,
            machine_key=os.urandom(32),
            node_key=os.urandom(32),
            disco_key=os.urandom(32),
            hostname="poller",
            auth_key=admin.key(preapproved=True),
        )

        async def body() -> None:
            async with client:
                async with noiseclient.connect_control(running.url, _machine(), CAPVER) as unused:
                    await anyio.sleep(3)
                    with pytest.raises(noiseclient.ControlTransportError, match="NO_ERROR"):
                        await unused.request("GET", "/key")
                assert client.connected and client.reconnects == 0
                (node,) = await anyio.to_thread.run_sync(admin.nodes)
                assert node["name"] == "poller" and node["online"]

        _run(body)
        admin.http.close()

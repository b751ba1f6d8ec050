"""Gateways for non-Python programs: SOCKS5 into the mesh (with real curl), port forwards."""

from __future__ import annotations

import shutil
from typing import Any

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st

from embedmesh.errors import ParseError
from embedmesh.gateway.forward import forward_local, serve_local
from embedmesh.gateway.socks5 import ConnectRequest, Socks5Handshake, serve_socks5, tailnet_dialer
from tests.test_asgi import app
from tests.test_sockets import two_nodes


def test_handshake_parses_split_input() -> None:
    h = Socks5Handshake()
    message = bytes([5, 1, 0]) + bytes([5, 1, 0, 3, 3]) + b"web" + (8080).to_bytes(2, "big")
    out = b""
    for i in range(len(message)):
        out += h.feed(message[i : i + 1])
    assert out == bytes([5, 0])
    assert h.request == ConnectRequest("web", 8080)


def test_handshake_refuses_bind_and_bad_versions() -> None:
    h = Socks5Handshake()
    h.feed(bytes([5, 1, 0, 5, 2, 0, 1, 1, 2, 3, 4, 0, 80]))
    assert h.request is None and h.refusal == 7
    with pytest.raises(ParseError):
        Socks5Handshake().feed(bytes([4, 1, 0, 80]))
    h = Socks5Handshake()
    h.feed(bytes([5, 1, 0, 5, 1, 0, 9, 1, 2, 3, 4, 0, 80]))  # address type 9
    assert h.request is None and h.refusal == 8


@pytest.mark.parametrize("methods", [[2], [1], [1, 2], [0x80, 0xFE]])
def test_handshake_answers_05_ff_when_no_method_is_acceptable(methods: list[int]) -> None:
    """GSSAPI (1), username/password (2) or private methods only: X'FF', then the end."""
    h = Socks5Handshake()
    assert h.feed(bytes([5, len(methods), *methods])) == bytes([5, 0xFF])
    assert h.method_refused and h.finished and h.request is None
    assert h.feed(bytes([5, 1, 0, 1, 1, 2, 3, 4, 0, 80])) == b""  # nothing after a refusal


@given(st.binary(max_size=300))
def test_handshake_raises_only_parse_error(data: bytes) -> None:
    h = Socks5Handshake()
    try:
        h.feed(data)
    except ParseError:
        pass


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed (apt-get install curl)")
def test_curl_through_socks5_reaches_an_asgi_app_on_another_node() -> None:
    async def main() -> None:
        async with two_nodes() as (a, b):
            await b.serve_asgi(app, ":80")
            local = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
            port = local.extra(anyio.abc.SocketAttribute.local_port)

            async with anyio.create_task_group() as tg:
                tg.start_soon(serve_socks5, local, tailnet_dialer(a, timeout=5))
                for flag in ("--socks5", "--socks5-hostname"):
                    result = await anyio.run_process(
                        ["curl", "-sS", "--max-time", "10", flag, f"127.0.0.1:{port}", "http://100.64.0.2/"],
                        check=False,
                    )
                    assert result.returncode == 0, result.stderr
                    assert result.stdout == b"hello from the mesh, 100.64.0.1"
                refused = await anyio.run_process(
                    [
                        "curl",
                        "-sS",
                        "--max-time",
                        "10",
                        "--socks5",
                        f"127.0.0.1:{port}",
                        "http://100.64.0.2:81/",
                    ],
                    check=False,
                )
                assert refused.returncode != 0
                tg.cancel_scope.cancel()

    anyio.run(main)


def test_forward_and_serve_local() -> None:
    """A local port leads to a mesh port which leads to a local service: a full loop."""

    async def main() -> None:
        async with two_nodes() as (a, b):
            # The "local service" on this host.
            service = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
            service_port = service.extra(anyio.abc.SocketAttribute.local_port)

            async def echo_upper(stream: Any) -> None:
                async for chunk in stream:
                    await stream.send(chunk.upper())

            # b exposes it on mesh port 8000; a's local port forwards to b:8000.
            mesh = await b.listen("tcp", ":8000")
            front = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
            front_port = front.extra(anyio.abc.SocketAttribute.local_port)

            async def dial_peer() -> Any:
                return await a.dial("tcp", "100.64.0.2:8000")

            async with anyio.create_task_group() as tg:
                tg.start_soon(service.serve, echo_upper)
                tg.start_soon(serve_local, mesh, "127.0.0.1", service_port)
                tg.start_soon(forward_local, front, dial_peer, "forward")
                client = await anyio.connect_tcp("127.0.0.1", front_port)
                await client.send(b"through the mesh and back")
                assert await client.receive() == b"THROUGH THE MESH AND BACK"
                await client.aclose()
                tg.cancel_scope.cancel()

    anyio.run(main)

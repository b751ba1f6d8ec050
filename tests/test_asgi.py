"""node.serve_asgi: a Starlette app served on the mesh, spoken to over a mesh TCP stream."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import anyio
import h11
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route

from tests.test_sockets import two_nodes

events: list[str] = []


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
    events.append("startup")
    yield {"greeting": "hello from the mesh"}
    events.append("shutdown")


async def hello(request: Request) -> PlainTextResponse:
    return PlainTextResponse(f"{request.state.greeting}, {request.client.host if request.client else '?'}")


async def upload(request: Request) -> JSONResponse:
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
    return JSONResponse({"received": size})


async def stream(request: Request) -> StreamingResponse:
    async def numbers() -> AsyncIterator[bytes]:
        for i in range(100):
            yield f"{i}\n".encode()

    return StreamingResponse(numbers())


async def boom(request: Request) -> PlainTextResponse:
    raise RuntimeError("broken handler")


app = Starlette(
    routes=[
        Route("/", hello),
        Route("/upload", upload, methods=["POST"]),
        Route("/stream", stream),
        Route("/boom", boom),
    ],
    lifespan=lifespan,
)


async def request(
    stream: Any, conn: h11.Connection, method: str, target: str, body: bytes = b""
) -> tuple[int, bytes]:
    headers = [("host", "web"), ("content-length", str(len(body)))]
    data = conn.send(h11.Request(method=method, target=target, headers=headers))
    data += conn.send(h11.Data(data=body)) if body else b""
    data += conn.send(h11.EndOfMessage())
    await stream.send(data)
    status, chunks = 0, []
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive())
            continue
        if isinstance(event, h11.Response):
            status = event.status_code
        elif isinstance(event, h11.Data):
            chunks.append(bytes(event.data))
        elif isinstance(event, h11.EndOfMessage):
            conn.start_next_cycle()
            return status, b"".join(chunks)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_starlette_app_on_the_mesh(backend: str) -> None:
    events.clear()

    async def main() -> None:
        async with two_nodes() as (a, b):
            listener = await b.serve_asgi(app, ":80")
            assert events == ["startup"]
            stream = await a.dial("tcp", "100.64.0.2:80")
            conn = h11.Connection(h11.CLIENT)
            # Several requests on one keep-alive connection.
            assert await request(stream, conn, "GET", "/") == (200, b"hello from the mesh, 100.64.0.1")
            status, body = await request(stream, conn, "POST", "/upload", b"x" * 1_000_000)
            assert (status, body) == (200, b'{"received":1000000}')
            status, body = await request(stream, conn, "GET", "/stream")
            assert status == 200 and body.splitlines()[-1] == b"99"
            assert (await request(stream, conn, "GET", "/boom"))[0] == 500
            await stream.aclose()
            await listener.aclose()
        assert events == ["startup", "shutdown"]

    anyio.run(main, backend=backend)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_node_close_runs_the_lifespan_shutdown_of_every_app(backend: str) -> None:
    """Closing the node (not the listeners) is how most programs stop: each app's shutdown runs."""
    recorded: list[str] = []

    def make_app(label: str) -> Starlette:
        @contextlib.asynccontextmanager
        async def life(app: Starlette) -> AsyncIterator[None]:
            recorded.append(f"{label} startup")
            yield
            await anyio.sleep(0.01)  # a shutdown that awaits, as closing a database pool does
            recorded.append(f"{label} shutdown")

        return Starlette(routes=[], lifespan=life)

    async def main() -> None:
        async with two_nodes() as (_, b):
            await b.serve_asgi(make_app("first"), ":80")
            await b.serve_asgi(make_app("second"), ":81")
            assert recorded == ["first startup", "second startup"]
        assert sorted(recorded[2:]) == ["first shutdown", "second shutdown"]

    anyio.run(main, backend=backend)


async def _status_line(stream: Any, head: bytes) -> bytes:
    await stream.send(head)
    data = b""
    while b"\r\n" not in data:
        data += await stream.receive()
    return data.split(b"\r\n", 1)[0]


def test_responses_carry_the_reason_phrase() -> None:
    """The status line on the wire, as curl -v and proxies show it: ``HTTP/1.1 200 OK``."""

    async def teapot(request: Request) -> PlainTextResponse:
        return PlainTextResponse("short and stout", status_code=418)

    async def odd(request: Request) -> PlainTextResponse:
        return PlainTextResponse("no phrase for this one", status_code=599)

    async def ok(request: Request) -> PlainTextResponse:
        return PlainTextResponse("fine")

    plain = Starlette(
        routes=[Route("/", ok), Route("/teapot", teapot), Route("/odd", odd), Route("/upload", upload, methods=["POST"])]
    )

    async def main() -> None:
        async with two_nodes() as (a, b):
            await b.serve_asgi(plain, ":80")
            for target, line in [
                (b"/", b"HTTP/1.1 200 OK"),
                (b"/missing", b"HTTP/1.1 404 Not Found"),
                (b"/teapot", b"HTTP/1.1 418 I'm a Teapot"),
                (b"/odd", b"HTTP/1.1 599 "),
            ]:
                async with await a.dial("tcp", "100.64.0.2:80") as stream:
                    head = b"GET " + target + b" HTTP/1.1\r\nhost: web\r\nconnection: close\r\n\r\n"
                    assert await _status_line(stream, head) == line
            # The server's own answers too: a request h11 cannot parse, and 100 Continue.
            async with await a.dial("tcp", "100.64.0.2:80") as stream:
                assert await _status_line(stream, b"GET / HTTP/1.1\r\nbad header\r\n\r\n") == (
                    b"HTTP/1.1 400 Bad Request"
                )
            async with await a.dial("tcp", "100.64.0.2:80") as stream:
                head = (
                    b"POST /upload HTTP/1.1\r\nhost: web\r\ncontent-length: 2\r\n"
                    b"expect: 100-continue\r\n\r\n"
                )
                assert await _status_line(stream, head) == b"HTTP/1.1 100 Continue"

    anyio.run(main)

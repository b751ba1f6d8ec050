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

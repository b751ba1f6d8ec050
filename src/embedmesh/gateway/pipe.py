"""Copy bytes both ways between two anyio byte streams, with half-close."""

from __future__ import annotations

import anyio
import anyio.abc

CHUNK = 65536


async def _copy(source: anyio.abc.ByteReceiveStream, sink: anyio.abc.ByteStream) -> None:
    try:
        while True:
            data = await source.receive(CHUNK)
            await sink.send(data)
    except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
        pass
    try:
        await sink.send_eof()
    except (anyio.BrokenResourceError, anyio.ClosedResourceError):
        pass


async def pipe(a: anyio.abc.ByteStream, b: anyio.abc.ByteStream) -> None:
    """Relay until both directions have ended; each side's EOF is passed on as a half-close."""
    async with anyio.create_task_group() as tg:
        tg.start_soon(_copy, a, b)
        tg.start_soon(_copy, b, a)

"""Tailscale's own DERP client (derphttp, tailscale.com v1.102.5, tsvectors ``derp-client``) against
our DERP server: two Go clients relay packets through it, ping it, and hear PeerGone; the same over
WebSocket (derphttp's dialer, compiled in with the ``ts_debug_websockets`` tag and switched on with
``TS_DEBUG_DERP_WS_CLIENT``), beside a Go client on plain DERP."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.abc
import pytest

from embedmesh.tailscale.derpserver import DerpServer
from embedmesh.tailscale.keys import NodePrivate, NodePublic
from tests.tailscale.gobuild import tsvectors

pytestmark = pytest.mark.interop


class GoDerpClient:
    """One tsvectors ``derp-client`` process: commands on stdin, events as JSON lines on stdout."""

    def __init__(self, process: anyio.abc.Process, ready: dict[str, Any]) -> None:
        self.process = process
        self.key = NodePublic.from_text(ready["key"])
        self.server = NodePublic.from_text(ready["server"])
        self._buffer = b""

    async def command(self, line: str) -> None:
        assert self.process.stdin is not None
        await self.process.stdin.send(line.encode() + b"\n")

    async def send(self, dst: NodePublic, data: bytes) -> None:
        await self.command(f"send {dst.to_text()} {data.hex()}")

    async def event(self, kind: str, timeout: float = 10.0) -> dict[str, Any]:
        """The next event of ``kind`` (others are skipped)."""
        with anyio.fail_after(timeout):
            while True:
                event = await _read_json(self.process, self)
                if event["event"] == kind:
                    return event
                assert event["event"] != "error", event


async def _read_json(process: anyio.abc.Process, holder: GoDerpClient | None = None) -> dict[str, Any]:
    assert process.stdout is not None
    buffer = holder._buffer if holder is not None else b""
    while b"\n" not in buffer:
        chunk = await process.stdout.receive()
        buffer += chunk
    line, buffer = buffer.split(b"\n", 1)
    if holder is not None:
        holder._buffer = buffer
    return json.loads(line)  # type: ignore[no-any-return]


WEBSOCKET_TAGS = ("ts_debug_websockets",)


@asynccontextmanager
async def go_client(url: str, *, websocket: bool = False) -> AsyncIterator[GoDerpClient]:
    if websocket:
        env = dict(os.environ, TS_DEBUG_DERP_WS_CLIENT="true")
        process = await anyio.open_process([str(tsvectors(WEBSOCKET_TAGS)), "derp-client", url], env=env)
    else:
        process = await anyio.open_process([str(tsvectors()), "derp-client", url])
    try:
        client = GoDerpClient(process, {"key": NodePublic.zero().to_text(), "server": NodePublic.zero().to_text()})
        with anyio.fail_after(20):
            ready = await _read_json(process, client)
        assert ready["event"] == "ready", ready
        client.key = NodePublic.from_text(ready["key"])
        client.server = NodePublic.from_text(ready["server"])
        yield client
    finally:
        with anyio.CancelScope(shield=True):
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
            await process.aclose()


@asynccontextmanager
async def our_server() -> AsyncIterator[DerpServer]:
    server = DerpServer(NodePrivate.generate(os.urandom(32)))
    async with anyio.create_task_group() as tg:
        await tg.start(server.serve, "127.0.0.1", 0)
        yield server
        tg.cancel_scope.cancel()


def test_go_clients_relay_through_our_server() -> None:
    tsvectors()  # skip (with the reason) before starting anything when Go is missing

    async def main() -> None:
        async with our_server() as server:
            url = f"http://127.0.0.1:{server.port}/derp"
            async with go_client(url) as alice, go_client(url) as bob:
                assert alice.server == server.public_key
                # Both are logged in (the ServerInfo box opened in Go) before anything is sent.
                await alice.event("serverinfo")
                await bob.event("serverinfo")
                await alice.send(bob.key, b"hello bob")
                got = await bob.event("packet")
                assert (NodePublic.from_text(got["src"]), bytes.fromhex(got["data"])) == (alice.key, b"hello bob")
                big = os.urandom(64 << 10)  # the largest packet DERP carries
                await bob.send(alice.key, big)
                got = await alice.event("packet")
                assert bytes.fromhex(got["data"]) == big
                # derphttp.Client.Ping: a round trip answered by our server's Pong.
                await alice.command("ping")
                await alice.event("pong")
                await alice.command("preferred")
                # Bob received from Alice: when she leaves he hears PeerGone(disconnected).
                await alice.command("close")
                gone = await bob.event("peergone")
                assert (NodePublic.from_text(gone["peer"]), gone["reason"]) == (alice.key, 0)
            assert server.stats.accepted == 2

    anyio.run(main)


def test_go_client_hears_health_and_restarting() -> None:
    tsvectors()

    async def main() -> None:
        async with our_server() as server, go_client(f"http://127.0.0.1:{server.port}/derp") as alice:
            await alice.event("serverinfo")
            server.set_health("disk on fire")
            assert (await alice.event("health"))["problem"] == "disk on fire"
            await server.restart_notice(reconnect_in_ms=250, try_for_ms=4000)
            restarting = await alice.event("restarting")
            assert (restarting["reconnect_ms"], restarting["try_ms"]) == (250, 4000)

    anyio.run(main)


def test_a_go_client_over_websocket_and_one_over_plain_derp() -> None:
    tsvectors()
    tsvectors(WEBSOCKET_TAGS)

    async def main() -> None:
        async with our_server() as server:
            url = f"http://127.0.0.1:{server.port}/derp"
            async with go_client(url, websocket=True) as alice, go_client(url) as bob:
                await alice.event("serverinfo")
                await bob.event("serverinfo")
                assert server.stats.websocket == 1 and server.stats.accepted == 2
                assert alice.server == server.public_key
                big = os.urandom(64 << 10)
                await alice.send(bob.key, big)
                assert bytes.fromhex((await bob.event("packet"))["data"]) == big
                # Go reads at most 32 KiB in one WebSocket message: a full packet comes in three.
                await bob.send(alice.key, big[::-1])
                assert bytes.fromhex((await alice.event("packet"))["data"]) == big[::-1]
                await bob.send(alice.key, b"back over the websocket")
                got = await alice.event("packet")
                assert (NodePublic.from_text(got["src"]), bytes.fromhex(got["data"])) == (bob.key, b"back over the websocket")
                await alice.command("ping")
                await alice.event("pong")
                # A graceful restart reaches the WebSocket client too.
                await server.restart_notice(reconnect_in_ms=100, try_for_ms=3000)
                restarting = await alice.event("restarting")
                assert (restarting["reconnect_ms"], restarting["try_ms"]) == (100, 3000)

    anyio.run(main)

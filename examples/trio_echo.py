"""A trio program on the tailnet: an echo service, and a client that talks to one by name.

embedmesh's API is anyio's, so it runs unchanged under trio: ``Node``, its listeners and streams
work inside a trio nursery, with trio's cancellation and timeouts.

    # serve: each line sent to port 7 comes back
    EMBEDMESH_CONTROL_URL=http://127.0.0.1:8080 EMBEDMESH_AUTH_KEY=emk-... \\
        EMBEDMESH_HOSTNAME=echo python examples/trio_echo.py serve

    # talk to it from another machine (or process) by its MagicDNS name
    EMBEDMESH_CONTROL_URL=... EMBEDMESH_AUTH_KEY=... python examples/trio_echo.py send echo "hi there"

Environment:
    EMBEDMESH_CONTROL_URL   the coordination server (required)
    EMBEDMESH_AUTH_KEY      a pre-auth key
    EMBEDMESH_HOSTNAME      the name to ask for (default: trio-echo)
    EMBEDMESH_LISTEN_HOST   bind the underlay UDP socket to this address only
"""

from __future__ import annotations

import os
import signal
import sys

import anyio
import trio
from anyio.abc import ByteStream, SocketAttribute
from anyio.streams.buffered import BufferedByteReceiveStream

from embedmesh import EmbedmeshError, Node

PORT = 7  # the echo protocol's port (RFC 862): the overlay has no privileged ports


def make_node() -> Node:
    # No state_dir: the keys live in memory and the node is ephemeral, so each run leaves the
    # tailnet when it exits instead of accumulating offline entries.
    return Node(
        control_url=os.environ["EMBEDMESH_CONTROL_URL"],
        hostname=os.environ.get("EMBEDMESH_HOSTNAME", "trio-echo"),
        listen_host=os.environ.get("EMBEDMESH_LISTEN_HOST"),
    )


async def echo(stream: ByteStream, node: Node) -> None:
    async with stream:
        host = stream.extra(SocketAttribute.remote_address)[0]
        who = node.whois(host)
        print(f"{who.name if who else host} connected", flush=True)
        lines = BufferedByteReceiveStream(stream)
        try:
            while True:
                await stream.send(await lines.receive_until(b"\n", max_bytes=4096) + b"\n")
        except (anyio.EndOfStream, anyio.IncompleteRead, anyio.DelimiterNotFound, anyio.BrokenResourceError):
            pass  # the caller hung up, reset, or sent an over-long line


async def serve() -> None:
    async with make_node() as node:
        await node.up(timeout=60)
        listener = await node.listen("tcp", f":{PORT}")
        print(f"echo on {node.fqdn}:{PORT}", flush=True)
        async with trio.open_nursery() as nursery:

            async def stop_on_signal() -> None:
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for signum in signals:
                        print(f"{signal.Signals(signum).name}: stopping", flush=True)
                        nursery.cancel_scope.cancel()

            nursery.start_soon(stop_on_signal)
            async with listener:
                while True:
                    nursery.start_soon(echo, await listener.accept(), node)


async def send(peer: str, text: str) -> int:
    async with make_node() as node:
        await node.up(timeout=60)
        with trio.move_on_after(20) as deadline:  # trio's own timeouts bound embedmesh calls
            stream = await node.dial("tcp", f"{peer}:{PORT}")
            async with stream:
                await stream.send(text.encode() + b"\n")
                reply = await BufferedByteReceiveStream(stream).receive_until(b"\n", max_bytes=4096)
            print(reply.decode(errors="replace"), flush=True)
        if deadline.cancelled_caught:
            print(f"{peer}: no answer within 20 s", file=sys.stderr)
            return 1
        return 0


def main() -> None:
    args = sys.argv[1:]
    try:
        if args == ["serve"]:
            trio.run(serve)
        elif len(args) == 3 and args[0] == "send":
            sys.exit(trio.run(send, args[1], args[2]))
        else:
            sys.exit(f"usage: {sys.argv[0]} serve | send PEER TEXT")
    except (EmbedmeshError, OSError) as exc:  # refused key, unreachable server, unknown peer ...
        sys.exit(f"embedmesh: {exc}")


if __name__ == "__main__":
    main()

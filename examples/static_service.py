"""A service in an unprivileged container, on a plain WireGuard network (static mode).

The container gets a wg-quick file (a mounted secret) and needs no root, no NET_ADMIN and no
/dev/net/tun: embedmesh speaks WireGuard on an ordinary UDP socket and serves the port from its
own userspace IP stack, so the host's (or the container's) interfaces and routes stay untouched.
No coordination server is involved; the peers are the ones the file lists.

    python examples/static_service.py /run/secrets/wg0.conf
    # from a WireGuard peer:  nc 10.0.0.5 7000

The service itself is a line echo (each line comes back upper-cased): replace ``handle``.

Environment:
    WG_CONFIG               the wg-quick file, when not given as the argument
    PORT                    the overlay TCP port to serve (default: 7000)
    EMBEDMESH_LISTEN_HOST   bind the WireGuard UDP socket to this address only (default: all)

The UDP port is the file's ListenPort (publish it: `docker run -p 51820:51820/udp`); without
one the OS picks a port, and peers reach the service once it has sent them a handshake.
"""

from __future__ import annotations

import os
import signal
import stat
import sys
from pathlib import Path

import anyio
from anyio.abc import ByteStream, SocketAttribute
from anyio.streams.buffered import BufferedByteReceiveStream

from embedmesh import EmbedmeshError, Node


async def handle(stream: ByteStream) -> None:
    """One connection: upper-case each line back to the caller."""
    async with stream:
        caller = stream.extra(SocketAttribute.remote_address)
        lines = BufferedByteReceiveStream(stream)
        try:
            while True:
                line = await lines.receive_until(b"\n", max_bytes=4096)  # bounded: a peer can't fill memory
                await stream.send(line.upper() + b"\n")
        except (anyio.EndOfStream, anyio.IncompleteRead, anyio.DelimiterNotFound, anyio.BrokenResourceError):
            pass  # the caller hung up, or sent an over-long line
        print(f"{caller[0]} disconnected", flush=True)


async def serve(config_path: Path, port: int) -> None:
    # The file holds a private key: say so when others can read it, as wg-quick does.
    if config_path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        print(f"warning: {config_path} is accessible to other users (chmod 600 it)", file=sys.stderr)
    node = Node(
        wireguard_config=config_path.read_text(encoding="utf-8"),
        listen_host=os.environ.get("EMBEDMESH_LISTEN_HOST"),
    )
    # As PID 1 in a container, a process that installs no SIGTERM handler ignores `docker stop`
    # until the runtime kills it 10 s later; this one stops at once, and cleanly.
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with node, anyio.create_task_group() as tasks:
            await node.up()
            listener = await node.listen("tcp", f":{port}")
            tasks.start_soon(listener.serve, handle)
            addresses = ", ".join(str(ip) for ip in node.ips)
            print(
                f"serving TCP port {port} on {addresses}; WireGuard on UDP port {node.listen_port}",
                flush=True,
            )
            async for signum in signals:
                print(f"{signal.Signals(signum).name}: stopping", flush=True)
                tasks.cancel_scope.cancel()
                break


def main() -> None:
    path = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("WG_CONFIG")
    if not path:
        sys.exit(f"usage: {sys.argv[0]} WG_QUICK_FILE   (or set WG_CONFIG)")
    try:
        anyio.run(serve, Path(path), int(os.environ.get("PORT", "7000")))
    except (EmbedmeshError, OSError) as exc:  # a bad file (the message names the line), a busy port
        sys.exit(f"{path}: {exc}")


if __name__ == "__main__":
    main()

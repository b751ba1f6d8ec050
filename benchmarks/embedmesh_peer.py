"""One embedmesh node in its own process, for ``bench_throughput.py``.

The wg-quick configuration arrives on standard input (so no key is ever on a command line); every
result leaves as one JSON object per line on standard output (logs go to standard error). The first
line of a server is ``{"event": "ready", "listen_port": P}``: the parent then starts the client with
``Endpoint = 127.0.0.1:P``.

    python benchmarks/embedmesh_peer.py --role server [--mode bulk|conns] < server.conf
    python benchmarks/embedmesh_peer.py --role client --bytes N [--mode bulk|conns] < client.conf

Protocol on the control port (the first byte of a connection says what it is, as in the gonetstack
reference peer): ``B`` + 8-byte length, then the data, then EOF (the server answers the 8-byte count
it received); ``P`` (answered ``p``: a warm-tunnel dial probe); ``M`` + 8-byte count (the server waits
until it has accepted that many idle connections on the idle port, then answers its memory as a JSON
line); ``Q`` (answered ``q``; the server exits).

Modes:

* ``bulk``: the client dials (the first dial includes the WireGuard handshake), pings 20 times, runs
  20 dial probes, then sends ``--bytes`` in 64 KiB chunks as fast as ``send`` accepts them. The server
  reports MB/s from the first byte to EOF, and both report VmRSS and VmHWM afterwards.
* ``conns``: the client opens ``--conns`` idle connections to the idle port and both report the RSS
  growth per connection.

Any stall ends in a ``{"event": "error"}`` line and exit status 2 after ``--timeout`` seconds.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import statistics
import struct
import sys
import time
from typing import Any

import anyio
from anyio import EndOfStream

from embedmesh import Node
from embedmesh.sockets import TcpStream

CONTROL_PORT = 9000
IDLE_PORT = 9001
SERVER_ADDRESS = "100.64.0.2"
CHUNK = 64 * 1024
_u64 = struct.Struct("!Q")


def emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def memory_kb() -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of this process, in KiB, from /proc/self/status."""
    out: dict[str, int] = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out["rss_kb" if key == "VmRSS" else "hwm_kb"] = int(value.split()[0])
    return out


def interesting_counters(node: Node) -> dict[str, int]:
    """The counters that explain a slow transfer: retransmissions, drops, packet totals."""
    words = ("retrans", "drop", "dup", "sack", "timeout", "rto", "packets", "full", "overflow", "gso", "gro")
    return {k: v for k, v in sorted(node.status().counters.items()) if any(w in k for w in words)}


async def read_exactly(stream: TcpStream, size: int, buffer: bytearray) -> bytes:
    while len(buffer) < size:
        buffer += await stream.receive(CHUNK)
    out = bytes(buffer[:size])
    del buffer[:size]
    return out


# ---------------------------------------------------------------------------------------------- server


async def serve(node: Node, args: argparse.Namespace) -> None:
    control = await node.listen("tcp", f":{CONTROL_PORT}")
    idle_listener = await node.listen("tcp", f":{IDLE_PORT}", backlog=4096)
    idle: list[TcpStream] = []
    quit_event = anyio.Event()

    async def accept_idle() -> None:
        while True:
            idle.append(await idle_listener.accept())

    async def handle(stream: TcpStream) -> None:
        pending = bytearray()
        mode = await read_exactly(stream, 1, pending)
        if mode == b"B":
            first = time.perf_counter()
            expected = _u64.unpack(await read_exactly(stream, 8, pending))[0]
            received = len(pending)
            try:
                while True:
                    received += len(await stream.receive(CHUNK))
            except EndOfStream:
                pass
            seconds = time.perf_counter() - first
            await stream.send(_u64.pack(received))
            gc.collect()
            emit(
                "bulk",
                bytes=received,
                expected=expected,
                ok=received == expected,
                seconds=seconds,
                MBps=received / seconds / 1e6,
                counters=interesting_counters(node),
                **memory_kb(),
            )
        elif mode == b"P":
            await stream.send(b"p")
        elif mode == b"M":
            count = _u64.unpack(await read_exactly(stream, 8, pending))[0]
            with anyio.fail_after(args.timeout):
                while len(idle) < count:
                    await anyio.sleep(0.05)
            gc.collect()
            await stream.send(json.dumps({"accepted": len(idle), **memory_kb()}).encode() + b"\n")
        elif mode == b"Q":
            await stream.send(b"q")
            quit_event.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(control.serve, handle)
        tg.start_soon(accept_idle)
        gc.collect()
        emit("ready", listen_port=node.listen_port, **memory_kb())
        await quit_event.wait()
        await anyio.sleep(0.05)  # let the 'q' leave before the node closes
        tg.cancel_scope.cancel()


# ---------------------------------------------------------------------------------------------- client


async def dial(node: Node, port: int = CONTROL_PORT) -> TcpStream:
    return await node.dial("tcp", f"{SERVER_ADDRESS}:{port}")


async def request(node: Node, message: bytes, answer_size: int) -> bytes:
    stream = await dial(node)
    async with stream:
        await stream.send(message)
        return await read_exactly(stream, answer_size, bytearray())


async def run_bulk(node: Node, args: argparse.Namespace) -> None:
    started = time.perf_counter()
    stream = await dial(node)
    first_dial = time.perf_counter() - started

    rtts = [await node.ping(SERVER_ADDRESS, payload_size=56) for _ in range(args.pings)]
    probes = []
    for _ in range(args.probes):
        started = time.perf_counter()
        probe = await dial(node)
        probes.append(time.perf_counter() - started)
        async with probe:
            await probe.send(b"P")
            await read_exactly(probe, 1, bytearray())

    chunk = memoryview(bytes(range(256)) * (CHUNK // 256))
    total = args.bytes
    emit("transfer", bytes=total)
    started = time.perf_counter()
    await stream.send(b"B" + _u64.pack(total))
    sent = 0
    while sent < total:
        piece = chunk if total - sent >= CHUNK else chunk[: total - sent]
        await stream.send(piece)
        sent += len(piece)
    await stream.send_eof()
    acked = _u64.unpack(await read_exactly(stream, 8, bytearray()))[0]
    seconds = time.perf_counter() - started
    await stream.aclose()
    gc.collect()
    emit(
        "bulk",
        bytes=sent,
        acked=acked,
        ok=acked == sent,
        seconds=seconds,
        MBps=sent / seconds / 1e6,
        first_dial_ms=first_dial * 1e3,
        warm_dial_ms=statistics.median(probes) * 1e3 if probes else None,
        ping_ms=statistics.median(rtts) * 1e3 if rtts else None,
        ping_range_ms=[min(rtts) * 1e3, max(rtts) * 1e3] if rtts else None,
        mtu=node.mtu,
        counters=interesting_counters(node),
        **memory_kb(),
    )


async def server_memory(node: Node, idle_count: int) -> dict[str, int]:
    """The server's memory once it has accepted ``idle_count`` idle connections."""
    stream = await dial(node)
    async with stream:
        await stream.send(b"M" + _u64.pack(idle_count))
        pending = bytearray()
        while not pending.endswith(b"\n"):
            pending += await stream.receive(CHUNK)
    result: dict[str, int] = json.loads(pending)
    return result


async def run_conns(node: Node, args: argparse.Namespace) -> None:
    # A warm tunnel and warm allocators on both sides before the baselines.
    await request(node, b"P", 1)
    server_before = await server_memory(node, 0)
    idle: list[TcpStream] = []
    gc.collect()
    before = memory_kb()
    started = time.perf_counter()
    limiter = anyio.Semaphore(args.dial_concurrency)

    async def open_one() -> None:
        async with limiter:
            idle.append(await dial(node, IDLE_PORT))

    async with anyio.create_task_group() as tg:
        for _ in range(args.conns):
            tg.start_soon(open_one)
    seconds = time.perf_counter() - started
    gc.collect()
    after = memory_kb()
    server_after = await server_memory(node, len(idle))
    emit(
        "conns",
        conns=len(idle),
        open_seconds=seconds,
        conns_per_second=len(idle) / seconds,
        client_rss_before_kb=before["rss_kb"],
        client_rss_after_kb=after["rss_kb"],
        client_bytes_per_conn=(after["rss_kb"] - before["rss_kb"]) * 1024 / len(idle),
        server_rss_before_kb=server_before["rss_kb"],
        server_rss_after_kb=server_after["rss_kb"],
        server_bytes_per_conn=(server_after["rss_kb"] - server_before["rss_kb"]) * 1024 / len(idle),
        server_accepted=server_after["accepted"],
    )


async def client(node: Node, args: argparse.Namespace) -> None:
    try:
        if args.mode == "bulk":
            await run_bulk(node, args)
        else:
            await run_conns(node, args)
    finally:
        if not args.keep_server:
            with anyio.move_on_after(5, shield=True):
                await request(node, b"Q", 1)


# ---------------------------------------------------------------------------------------------- main


def _node(args: argparse.Namespace) -> Node:
    """Static mode (the wg-quick file on stdin) or, with --control-url, a tailnet node."""
    global SERVER_ADDRESS
    if args.control_url is None:
        return Node(wireguard_config=sys.stdin.read(), listen_host="127.0.0.1")
    if args.server:
        SERVER_ADDRESS = args.server
    import os
    import tempfile

    # The auth key comes from $EMBEDMESH_AUTH_KEY, never from the command line.
    return Node(
        control_url=args.control_url,
        hostname=args.hostname,
        listen_host=args.listen_host,
        state_dir=tempfile.mkdtemp(prefix=f"embedmesh-peer-{args.hostname}-"),
        auth_key=os.environ["EMBEDMESH_AUTH_KEY"],
    )


async def main(args: argparse.Namespace) -> int:
    try:
        with anyio.fail_after(args.timeout):
            async with _node(args) as node:
                await node.up()
                if args.role == "server":
                    await serve(node, args)
                else:
                    await client(node, args)
    except TimeoutError:
        emit("error", error=f"{args.role} timed out after {args.timeout:g} s", **memory_kb())
        return 2
    except Exception as exc:  # report, do not hang the parent
        emit("error", error=f"{args.role}: {type(exc).__name__}: {exc}")
        return 2
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--role", choices=("server", "client"), required=True)
    parser.add_argument("--mode", choices=("bulk", "conns"), default="bulk")
    parser.add_argument("--bytes", type=int, default=200_000_000, help="client, bulk: bytes to send")
    parser.add_argument("--pings", type=int, default=20, help="client, bulk: pings before the transfer")
    parser.add_argument("--probes", type=int, default=20, help="client, bulk: warm dial probes")
    parser.add_argument("--conns", type=int, default=10_000, help="client, conns: idle connections")
    parser.add_argument("--dial-concurrency", type=int, default=128, help="client, conns: dials in flight")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds before giving up")
    parser.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio")
    parser.add_argument("--control-url", default=None, help="join this tailnet (key: $EMBEDMESH_AUTH_KEY)")
    parser.add_argument("--hostname", default="em-peer", help="tailnet mode: this node's name")
    parser.add_argument("--listen-host", default=None, help="tailnet mode: the address of the UDP socket")
    parser.add_argument("--server", default=None, help="tailnet mode, client: the server's name or address")
    parser.add_argument("--keep-server", action="store_true", help="client: leave the server running")
    return parser.parse_args(argv)


if __name__ == "__main__":
    arguments = parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    sys.exit(anyio.run(main, arguments, backend=arguments.backend))

"""Coordination server cost with many nodes holding streams: memory, CPU, bytes and latency of one
endpoint change fanned out to every peer.

Two ways to drive the server, both printed:

* ``core``: the server's fan-out core in this process, no sockets. N nodes are registered in a
  :class:`Coordinator`, each holds a :class:`Stream` and a real Noise transport session (handshake
  done), so a change costs what it costs the server: queueing one shared op per viewer, building the
  delta message per stream and encrypting it per stream. Initial full maps are skipped (a cold start
  of N nodes is N maps of N peers whatever the design; see "full map" for one map's cost). Runs at
  1,000 and 10,000 nodes.
* ``ws``: the real server (uvicorn, Starlette, wsproto) in a subprocess and N raw WebSocket clients in
  this process (one asyncio loop; each client decrypts every frame and parses deltas, full maps are
  only decrypted). Measures the time from a node sending its new endpoints until all N-1 others have
  decrypted and parsed the delta, and the server process's RSS and CPU from /proc. Runs at 1,000 nodes
  by default (10,000 real streams would first need 10,000 full maps of up to 10,000 peers, ~24 GB).

Run: ``python benchmarks/bench_control.py [--nodes 1000 10000] [--ws-nodes 1000] [--changes 20]``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from embedmesh.control.coordinator import Coordinator, CoordinatorConfig
from embedmesh.control.messages import EndpointsUpdate, Ping, RegisterRequest, parse_server_message
from embedmesh.control.protocol import ClientSession, ServerSession
from embedmesh.control.store import Store
from embedmesh.wireguard.crypto import generate_private_key, public_key


def rss_bytes(pid: int | str = "self") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def cpu_seconds(pid: int | str = "self") -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def _keys(rng: random.Random) -> bytes:
    return generate_private_key(rng.randbytes(32))


# ------------------------------------------------------------------------------------------------ core


def bench_core(nodes: int, changes: int, seed: int = 1) -> dict[str, float]:
    rng = random.Random(seed)
    gc.collect()
    rss_before = rss_bytes()
    coordinator = Coordinator(
        Store(None), CoordinatorConfig(), now=time.time(), random_bytes=lambda n: rng.randbytes(n)
    )
    _, key = coordinator.create_auth_key(reusable=True, now=time.time())
    server_private = _keys(rng)
    server_public = public_key(server_private)
    streams = []
    start = time.perf_counter()
    machines = []
    for index in range(nodes):
        machine = _keys(rng)
        endpoint = f"10.{index >> 16 & 255}.{index >> 8 & 255}.{index & 255}:41641"
        request = RegisterRequest(
            public_key(_keys(rng)), rng.randbytes(32), f"n{index}", auth_key=key, endpoints=(endpoint,)
        )
        coordinator.register(public_key(machine), request, time.time())
        machines.append(machine)
    for index, node in enumerate(list(coordinator.nodes())):
        client = ClientSession(machines[index], server_public, _keys(rng))
        session = ServerSession(server_private)
        session.receive_initiation(client.initiation(time.time_ns()))
        client.receive_response(session.respond(_keys(rng)))
        stream = coordinator.attach(node.id, lambda: None, time.time())
        # Skip the initial full map (see the module docstring); keep the registered message.
        stream.needs_full_map = False
        streams.append((stream, session))
    # Stand in for the writers, which drain the "n is online" deltas as they come.
    for queued, _ in streams:
        queued.ops.clear()
        queued.outbox.clear()
        queued.cursor = coordinator.log_end
    del machines
    setup = time.perf_counter() - start
    gc.collect()
    rss_after = rss_bytes()

    # One full map, for scale (the first one also encodes every peer's cached JSON fragment).
    t = time.perf_counter()
    full = coordinator._full_map_payload(coordinator.node(streams[0][0].node_id))
    cold_map_seconds = time.perf_counter() - t
    t = time.perf_counter()
    full = coordinator._full_map_payload(coordinator.node(streams[1][0].node_id))
    full_map_seconds = time.perf_counter() - t

    latencies, cpu, sent = [], [], []
    for change in range(changes):
        source, _ = streams[rng.randrange(nodes)]
        endpoints = (f"192.0.2.{change % 250}:{40000 + change}",)
        wall, proc = time.perf_counter(), time.process_time()
        coordinator.update_endpoints(source, endpoints, time.time())
        total = 0
        for stream, session in streams:
            for payload in coordinator.take(stream):
                total += len(session.send_encoded(payload))
        latencies.append(time.perf_counter() - wall)
        cpu.append(time.process_time() - proc)
        sent.append(total)
    # A burst: many nodes change at once (a network flap, a mass reconnect), then every writer runs.
    burst = min(nodes, 1000)
    wall, proc = time.perf_counter(), time.process_time()
    for change in range(burst):
        stream, _ = streams[change]
        coordinator.update_endpoints(stream, (f"203.0.113.{change % 250}:{30000 + change}",), time.time())
    burst_bytes = 0
    for stream, session in streams:
        for payload in coordinator.take(stream):
            burst_bytes += len(session.send_encoded(payload))
    burst_seconds = time.perf_counter() - wall
    burst_cpu = time.process_time() - proc
    return {
        "nodes": nodes,
        "setup_s": setup,
        "burst_changes": burst,
        "burst_all_s": burst_seconds,
        "burst_cpu_us_per_change_per_viewer": burst_cpu / burst / (nodes - 1) * 1e6,
        "burst_bytes_per_op": burst_bytes / burst / (nodes - 1),
        "rss_per_node_kib": (rss_after - rss_before) / nodes / 1024,
        "rss_mib": (rss_after - rss_before) / 2**20,
        "full_map_kib": len(full) / 1024,
        "full_map_ms": full_map_seconds * 1000,
        "first_full_map_ms": cold_map_seconds * 1000,
        "change_all_ms_median": statistics.median(latencies) * 1000,
        "change_all_ms_max": max(latencies) * 1000,
        "change_cpu_ms": statistics.median(cpu) * 1000,
        "cpu_us_per_viewer": statistics.median(cpu) / (nodes - 1) * 1e6,
        "bytes_per_change": statistics.median(sent),
        "bytes_per_viewer": statistics.median(sent) / (nodes - 1),
    }


# ------------------------------------------------------------------------------------------------ ws


async def bench_ws(nodes: int, changes: int) -> dict[str, float]:
    import anyio
    import httpx

    from embedmesh.control.websocket import WebSocket

    state = Path(tempfile.mkdtemp(prefix="bench-control-"))
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "embedmesh.cli.control",
            "serve",
            "--listen",
            f"127.0.0.1:{port}",
            "--state-dir",
            str(state),
        ],
        stdout=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                await anyio.sleep(0.05)
        token = (state / "admin-token").read_text().strip()
        key = httpx.post(
            f"{url}/admin/v1/authkeys", json={"reusable": True}, headers={"authorization": f"Bearer {token}"}
        ).json()["key"]
        server_public = __import__("base64").b64decode(httpx.get(f"{url}/key").json()["public_key"])
        rss_idle = rss_bytes(server.pid)
        rng = random.Random(2)
        received: dict[int, float] = {}
        marker: list[bytes] = [b"\x00"]
        frame_bytes = [0]
        conns: list[tuple[WebSocket, ClientSession]] = []
        locks: list[anyio.Lock] = []

        async def reader(index: int, ws: WebSocket, session: ClientSession) -> None:
            from embedmesh.control.noise import read_transport_frame

            keys = session._keys
            assert keys is not None
            while True:
                frame = await ws.receive()
                payload = read_transport_frame(keys, frame)
                if payload.startswith(b'{"type":"delta"'):
                    parse_server_message(payload)
                    if marker[0] in payload and index not in received:
                        received[index] = time.perf_counter()
                        frame_bytes[0] += len(frame)

        async def connect(index: int, tg: anyio.abc.TaskGroup) -> None:
            machine = _keys(rng)
            ws = await WebSocket.connect(url, "/control/v1", max_message_size=64 * 2**20)
            session = ClientSession(machine, server_public, _keys(rng))
            await ws.send(session.initiation(time.time_ns()))
            session.receive_response(await ws.receive())
            request = RegisterRequest(public_key(_keys(rng)), rng.randbytes(32), f"n{index}", auth_key=key)
            await ws.send(session.send(request))
            session.receive(await ws.receive())  # registered
            conns.append((ws, session))
            lock = anyio.Lock()
            locks.append(lock)
            tg.start_soon(reader, len(conns) - 1, ws, session)
            tg.start_soon(pinger, ws, session, lock)

        async def pinger(ws: WebSocket, session: ClientSession, lock: anyio.Lock) -> None:
            # The server closes streams that stay silent for a minute, as real clients ping.
            ping_id = 0
            while True:
                await anyio.sleep(15 + rng.random() * 5)
                ping_id += 1
                async with lock:
                    await ws.send(session.send(Ping(ping_id)))

        started = time.perf_counter()
        async with anyio.create_task_group() as tg:
            limiter = anyio.CapacityLimiter(64)

            async def limited(index: int) -> None:
                async with limiter:
                    await connect(index, tg)

            async with anyio.create_task_group() as joins:
                for index in range(nodes):
                    joins.start_soon(limited, index)
            join_seconds = time.perf_counter() - started
            await anyio.sleep(2)  # let the initial maps drain
            rss_streams = rss_bytes(server.pid)
            latencies, cpu, sizes = [], [], []
            for change in range(changes):
                index = rng.randrange(nodes)
                ws, session = conns[index]
                marker[0] = f"198.51.100.{change % 250}:{50000 + change}".encode()
                received.clear()
                frame_bytes[0] = 0
                cpu_before = cpu_seconds(server.pid)
                t0 = time.perf_counter()
                async with locks[index]:
                    await ws.send(session.send(EndpointsUpdate((marker[0].decode(),))))
                with anyio.fail_after(60):
                    while len(received) < nodes - 1:
                        await anyio.sleep(0.001)
                latencies.append(max(received.values()) - t0)
                await anyio.sleep(0.2)
                cpu.append(cpu_seconds(server.pid) - cpu_before)
                sizes.append(frame_bytes[0])
            tg.cancel_scope.cancel()
        return {
            "nodes": nodes,
            "join_s": join_seconds,
            "server_rss_idle_mib": rss_idle / 2**20,
            "server_rss_mib": rss_streams / 2**20,
            "server_rss_per_stream_kib": (rss_streams - rss_idle) / nodes / 1024,
            "change_all_ms_median": statistics.median(latencies) * 1000,
            "change_all_ms_max": max(latencies) * 1000,
            "server_cpu_ms_per_change": statistics.median(cpu) * 1000,
            "bytes_per_change": statistics.median(sizes),
            "bytes_per_viewer": statistics.median(sizes) / (nodes - 1),
        }
    finally:
        server.kill()
        server.wait()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nodes", type=int, nargs="*", default=[1000, 10000], help="core-mode sizes")
    parser.add_argument("--ws-nodes", type=int, nargs="*", default=[1000], help="real-WebSocket sizes")
    parser.add_argument("--changes", type=int, default=20)
    args = parser.parse_args()
    results = []
    for n in args.nodes:
        results.append(("core", bench_core(n, args.changes)))
        print(json.dumps({"mode": "core", **results[-1][1]}, indent=None), flush=True)
    for n in args.ws_nodes:
        results.append(("ws", asyncio.run(bench_ws(n, min(args.changes, 10)))))
        print(json.dumps({"mode": "ws", **results[-1][1]}, indent=None), flush=True)
    print()
    print(
        f"{'mode':<5} {'nodes':>6} {'all have it (median/max ms)':>28} {'server CPU ms/change':>21} "
        f"{'bytes/viewer':>12} {'memory':>22}"
    )
    for mode, r in results:
        memory = (
            f"{r['rss_per_node_kib']:.1f} KiB/node"
            if mode == "core"
            else f"{r['server_rss_mib']:.0f} MiB ({r['server_rss_per_stream_kib']:.0f} KiB/stream)"
        )
        cpu = r["change_cpu_ms"] if mode == "core" else r["server_cpu_ms_per_change"]
        print(
            f"{mode:<5} {r['nodes']:>6} {r['change_all_ms_median']:>14.1f} / {r['change_all_ms_max']:<11.1f} "
            f"{cpu:>21.1f} {r['bytes_per_viewer']:>12.0f} {memory:>22}"
        )


if __name__ == "__main__":
    main()

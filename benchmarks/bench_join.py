"""Time from ``Node()`` to the first byte received from a peer, on a fresh tailnet on loopback.

A coordination server (SQLite in a temporary folder) and one peer serving TCP are started first;
then, several times, a brand-new node is created, joins with an auth key, dials the peer by name
and reads its first byte. Prints each phase and the median (goal: under 0.5 s).

    python benchmarks/bench_join.py [--runs 7]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

from embedmesh import Node
from embedmesh.control.server import ControlServer, ServerConfig


async def main(runs: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        server = ControlServer(ServerConfig(state_dir=Path(tmp) / "control")).start_in_thread("127.0.0.1", 0)
        try:
            key = server.call(
                lambda: server.server.coordinator.create_auth_key(reusable=True, now=time.time())[1]
            )
            async with Node(
                hostname="web", control_url=server.url, auth_key=key, listen_host="127.0.0.1"
            ) as web:
                await web.up()
                listener = await web.listen("tcp", ":7")

                async def greet(stream: Any) -> None:
                    await stream.send(b"!")

                async with anyio.create_task_group() as tg:
                    tg.start_soon(listener.serve, greet)
                    totals, phases = [], []
                    for i in range(runs):
                        t0 = time.perf_counter()
                        node = Node(
                            hostname=f"client{i}",
                            control_url=server.url,
                            auth_key=key,
                            listen_host="127.0.0.1",
                        )
                        async with node:
                            t1 = time.perf_counter()
                            await node.up()
                            with anyio.fail_after(10):
                                while node.netmap is None or not any(
                                    p.name == "web" for p in node.netmap.peers.values()
                                ):
                                    await anyio.sleep(0.001)
                            t2 = time.perf_counter()
                            stream = await node.dial("tcp", "web:7")
                            first = await stream.receive(1)
                            t3 = time.perf_counter()
                            assert first == b"!"
                            await stream.aclose()
                        totals.append(t3 - t0)
                        phases.append((t1 - t0, t2 - t1, t3 - t2))
                        print(
                            f"run {i + 1}: start {1000 * (t1 - t0):6.1f} ms, up+map {1000 * (t2 - t1):6.1f} ms, "
                            f"dial+first byte {1000 * (t3 - t2):6.1f} ms, total {1000 * (t3 - t0):6.1f} ms"
                        )
                    tg.cancel_scope.cancel()
            print(
                f"median Node() -> first byte from a peer: {1000 * statistics.median(totals):.1f} ms "
                f"(min {1000 * min(totals):.1f}, max {1000 * max(totals):.1f}; goal < 500 ms)"
            )
        finally:
            server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    anyio.run(main, parser.parse_args().runs)

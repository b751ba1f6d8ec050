"""Tailscale-protocol control plane, same run: embedmesh's server against headscale.

N control-only clients speak Tailscale's protocol (ts2021 Noise, HTTP/2, register with a pre-auth
key, the zstd map long poll) to each server in turn, all in this process on one asyncio loop
(embedmesh's :class:`TailscaleControlClient`, the same code a Node uses to join headscale). Each
server runs in a subprocess on loopback with its state in a temporary folder. Printed per server
and N:

* ``register``: seconds until all N clients are registered and hold their first map;
* ``change``: seconds from one client sending new endpoints (a "lite" map request) until every
  other client's map shows them, median of ``--changes`` changes;
* the server process's CPU seconds over the whole run and its RSS at the end (from /proc);

and the ratio headscale / embedmesh for each figure (above 1: embedmesh is ahead).

The clients share two cores with the server, so absolute figures include client cost; the ratio
is what to compare. headscale is tests/interop/gopeers.py's build (v0.29.2), built on first use.

Run: ``python benchmarks/bench_control_tailscale.py [--nodes 50 200] [--changes 5]``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import anyio
import anyio.abc
import httpx

from embedmesh.tailscale.client import TailscaleControlClient

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "interop"))


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited with {process.returncode}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise SystemExit(f"no answer from {url}")


@contextmanager
def embedmesh_server(folder: Path) -> Iterator[tuple[str, str, subprocess.Popen[bytes]]]:
    port = free_port()
    state = folder / "embedmesh"
    process = subprocess.Popen(
        [sys.executable, "-m", "embedmesh.cli.main", "control", "serve", "--listen", f"127.0.0.1:{port}",
         "--state-dir", str(state), "--max-connections-per-source", "100000"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/health", process)
        token = (state / "admin-token").read_text().strip()
        reply = httpx.post(f"{url}/admin/v1/authkeys", json={"reusable": True},
                           headers={"authorization": f"Bearer {token}"}, timeout=10)
        yield url, str(reply.json()["key"]), process
    finally:
        process.terminate()
        process.wait(20)


@contextmanager
def headscale_server(folder: Path) -> Iterator[tuple[str, str, subprocess.Popen[bytes]]]:
    import gopeers

    binary = gopeers.headscale()
    port, metrics, grpc, stun = free_port(), free_port(), free_port(), free_port()
    d = folder / "headscale"
    d.mkdir()
    url = f"http://127.0.0.1:{port}"
    config = {
        "server_url": url, "listen_addr": f"127.0.0.1:{port}", "metrics_listen_addr": f"127.0.0.1:{metrics}",
        "grpc_listen_addr": f"127.0.0.1:{grpc}", "grpc_allow_insecure": False,
        "noise": {"private_key_path": str(d / "noise.key")},
        "prefixes": {"v4": "100.64.0.0/10", "v6": "fd7a:115c:a1e0::/48", "allocation": "sequential"},
        "derp": {"server": {"enabled": True, "region_id": 999, "region_code": "b", "region_name": "b",
                            "verify_clients": True, "stun_listen_addr": f"127.0.0.1:{stun}",
                            "private_key_path": str(d / "derp.key"),
                            "automatically_add_embedded_derp_region": True, "ipv4": "127.0.0.1"},
                 "urls": [], "paths": [], "auto_update_enabled": False},
        "disable_check_updates": True,
        "database": {"type": "sqlite", "sqlite": {"path": str(d / "db.sqlite"), "write_ahead_log": True}},
        "log": {"level": "warn", "format": "text"}, "policy": {"mode": "file", "path": ""},
        "dns": {"magic_dns": True, "base_domain": "bench.test", "override_local_dns": False,
                "nameservers": {"global": [], "split": {}}, "search_domains": [], "extra_records": []},
        "unix_socket": str(d / "hs.sock"), "unix_socket_permission": "0770",
        "logtail": {"enabled": False}, "taildrop": {"enabled": False},
    }
    (d / "config.yaml").write_text(json.dumps(config))
    env = {**os.environ, "TS_NO_LOGS_NO_SUPPORT": "true"}
    process = subprocess.Popen([str(binary), "--config", str(d / "config.yaml"), "serve"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        wait_http(f"{url}/key?v=130", process)
        cli = [str(binary), "--config", str(d / "config.yaml")]
        deadline = time.monotonic() + 20
        while not (d / "hs.sock").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        user = json.loads(subprocess.run([*cli, "users", "create", "bench", "-o", "json"], capture_output=True,
                                         text=True, check=True, env=env).stdout)
        key = json.loads(subprocess.run([*cli, "preauthkeys", "create", "--user", str(user["id"]), "--reusable",
                                         "--expiration", "1h", "-o", "json"], capture_output=True, text=True,
                                        check=True, env=env).stdout)["key"]
        yield url, str(key), process
    finally:
        process.terminate()
        process.wait(20)


async def measure(url: str, key: str, nodes: int, changes: int) -> tuple[float, list[float]]:
    clients = [
        TailscaleControlClient(url, machine_key=os.urandom(32), node_key=os.urandom(32),
                               disco_key=os.urandom(32), hostname=f"b{i}", auth_key=key,
                               endpoints=["192.0.2.1:41641"])
        for i in range(nodes)
    ]
    done = anyio.Event()

    async def hold(client: TailscaleControlClient, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        async with client:
            task_status.started()
            await done.wait()

    async with anyio.create_task_group() as tg:
        started = time.monotonic()
        # Join in waves of 25 at once (a fleet starting), each client's first map included.
        for first in range(0, nodes, 25):
            async with anyio.create_task_group() as wave:
                for client in clients[first : first + 25]:
                    wave.start_soon(tg.start, hold, client)
        for client in clients:
            await client.wait_for_netmap(lambda m: len(m.peers) >= nodes - 1, timeout=120)
        registered = time.monotonic() - started
        latencies = []
        for n in range(changes):
            mover = clients[n % nodes]
            endpoint = f"198.51.100.{n + 1}:41641"
            assert mover.node_id is not None
            mover_id = mover.node_id
            t0 = time.monotonic()
            await mover.update_endpoints([endpoint])
            for client in clients:
                if client is not mover:
                    await client.wait_for_netmap(
                        lambda m, i=mover_id, e=endpoint: i in m.peers and e in m.peers[i].endpoints, timeout=60
                    )
            latencies.append(time.monotonic() - t0)
        done.set()
    return registered, latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[50, 200])
    parser.add_argument("--changes", type=int, default=5)
    args = parser.parse_args()
    rows: dict[tuple[str, int], tuple[float, float, float, int]] = {}
    for nodes in args.nodes:
        for name, server in (("embedmesh", embedmesh_server), ("headscale", headscale_server)):
            with tempfile.TemporaryDirectory() as tmp, server(Path(tmp)) as (url, key, process):
                cpu_before = cpu_seconds(process.pid)
                registered, latencies = anyio.run(measure, url, key, nodes, args.changes)
                cpu = cpu_seconds(process.pid) - cpu_before
                rss = rss_bytes(process.pid)
            change = statistics.median(latencies)
            rows[(name, nodes)] = (registered, change, cpu, rss)
            print(f"{name:9} N={nodes:5}: register {registered:6.2f} s, change to all {change * 1000:7.1f} ms "
                  f"(median of {len(latencies)}), server CPU {cpu:6.2f} s, RSS {rss / 2**20:6.1f} MiB", flush=True)
        em, hs = rows[("embedmesh", nodes)], rows[("headscale", nodes)]
        print(f"ratio headscale/embedmesh N={nodes}: register {hs[0] / em[0]:.2f}x, change {hs[1] / em[1]:.2f}x, "
              f"CPU {hs[2] / max(em[2], 1e-9):.2f}x, RSS {hs[3] / em[3]:.2f}x", flush=True)


if __name__ == "__main__":
    main()

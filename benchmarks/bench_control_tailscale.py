"""Tailscale-protocol control plane, same run: embedmesh's server against headscale.

N control-only Tailscale clients (``tsload.py``: per client a ts2021 Noise + HTTP/2 connection,
``/machine/register`` with a pre-auth key, then the streaming zstd ``/machine/map``) in one or more
load processes, against each server in turn. Each server runs in a subprocess on loopback with its
state in a temporary folder. Printed per server and N:

* ``register``: seconds until all N clients are registered and hold their first map;
* ``all peers known``: seconds until every client knows all N - 1 peers;
* ``change``: seconds from one client sending new endpoints (a "lite" map request) until every
  other client has them, median of ``--changes`` changes;
* the server process's CPU seconds for the join and per change, its RSS at the end and its peak
  (from /proc), and the load processes' CPU;

and the ratio headscale / embedmesh for each figure (above 1: embedmesh is ahead).

The clients share the machine's cores with the server, so absolute figures include their cost;
the ratio is what to compare. headscale is tests/interop/gopeers.py's build (v0.29.2), built on
first use. This is a benchmark, not a test: it asserts nothing about speed.

Run: ``python benchmarks/bench_control_tailscale.py [--nodes 100 1000] [--changes 5] [--profile DIR]``.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "interop"))
sys.path.insert(0, str(HERE))


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def hwm_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
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
        [
            sys.executable,
            "-m",
            "embedmesh.cli.main",
            "control",
            "serve",
            "--listen",
            f"127.0.0.1:{port}",
            "--state-dir",
            str(state),
            "--max-connections-per-source",
            "100000",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/health", process)
        token = (state / "admin-token").read_text().strip()
        reply = httpx.post(
            f"{url}/admin/v1/authkeys",
            json={"reusable": True},
            headers={"authorization": f"Bearer {token}"},
            timeout=10,
        )
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
    config = gopeers.headscale_config(
        d,
        server_url=url,
        listen=f"127.0.0.1:{port}",
        ip="127.0.0.1",
        metrics=f"127.0.0.1:{metrics}",
        grpc=f"127.0.0.1:{grpc}",
        stun=f"127.0.0.1:{stun}",
        base_domain="bench.test",
        log_level="warn",
    )
    (d / "config.yaml").write_text(json.dumps(config))
    env = {**os.environ, "TS_NO_LOGS_NO_SUPPORT": "true"}
    process = subprocess.Popen(
        [str(binary), "--config", str(d / "config.yaml"), "serve"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    try:
        wait_http(f"{url}/key?v=130", process)
        cli = [str(binary), "--config", str(d / "config.yaml")]
        deadline = time.monotonic() + 20
        while not (d / "headscale.sock").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        user = json.loads(
            subprocess.run(
                [*cli, "users", "create", "bench", "-o", "json"],
                capture_output=True,
                text=True,
                check=True,
                env=env,
            ).stdout
        )
        key = json.loads(
            subprocess.run(
                [
                    *cli,
                    "preauthkeys",
                    "create",
                    "--user",
                    str(user["id"]),
                    "--reusable",
                    "--expiration",
                    "1h",
                    "-o",
                    "json",
                ],
                capture_output=True,
                text=True,
                check=True,
                env=env,
            ).stdout
        )["key"]
        yield url, str(key), process
    finally:
        process.terminate()
        process.wait(20)


class Workers:
    """The load client processes (tsload.py), their events in one queue."""

    def __init__(self, url: str, key: str, nodes: int, processes: int, concurrency: int) -> None:
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.procs: list[subprocess.Popen[str]] = []
        self.backlog: list[dict[str, Any]] = []
        self.stats: list[dict[str, Any]] | None = None
        per = -(-nodes // processes)
        for first in range(0, nodes, per):
            count = min(per, nodes - first)
            proc = subprocess.Popen(
                [
                    sys.executable,
                    str(HERE / "tsload.py"),
                    "--url",
                    url,
                    "--auth-key",
                    key,
                    "--first",
                    str(first),
                    "--count",
                    str(count),
                    "--total",
                    str(nodes),
                    "--concurrency",
                    str(concurrency),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                bufsize=1,
            )
            self.procs.append(proc)
            threading.Thread(target=self._read, args=(proc,), daemon=True).start()

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self.events.put(json.loads(line))
        self.events.put({"event": "exit", "code": proc.wait()})

    def send(self, **command: Any) -> None:
        for proc in self.procs:
            assert proc.stdin is not None
            proc.stdin.write(json.dumps(command) + "\n")
            proc.stdin.flush()

    def wait(self, kind: str, timeout: float, **match: Any) -> list[dict[str, Any]]:
        """One ``kind`` event from every process (other events stay queued for later waits)."""
        got: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        while len(got) < len(self.procs):
            for event in list(self.backlog):
                if event["event"] == kind and all(event.get(k) == v for k, v in match.items()):
                    self.backlog.remove(event)
                    got.append(event)
            if len(got) >= len(self.procs):
                break
            try:
                event = self.events.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"no {kind} from every load process within {timeout:.0f} s") from None
            if event["event"] == "exit":
                raise RuntimeError(f"a load process exited with {event['code']} (see its stderr)")
            self.backlog.append(event)
        return got

    def close(self) -> list[dict[str, Any]]:
        if self.stats is not None:
            return self.stats
        stats: list[dict[str, Any]] = []
        try:
            self.send(cmd="stop")
            stats = self.wait("stats", 60)
        except (OSError, RuntimeError, TimeoutError):
            pass
        for proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.stats = stats
        return stats


class Spy:
    """py-spy attached to the embedmesh server for one phase (``--profile DIR``)."""

    def __init__(self, args: argparse.Namespace, name: str, nodes: int, phase: str, pid: int) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.path = Path(args.profile or ".") / f"{name}-n{nodes}-{phase}.txt"
        if args.profile and name == "embedmesh":
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.proc = subprocess.Popen(
                [
                    "py-spy",
                    "record",
                    "--format",
                    "raw",
                    "--function",
                    "--idle",
                    "--rate",
                    "100",
                    "-o",
                    str(self.path),
                    "--pid",
                    str(pid),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.path.exists():
            from bench_throughput import summarize_profile

            print(summarize_profile(self.path, top=25), flush=True)


def measure(
    url: str,
    key: str,
    nodes: int,
    changes: int,
    args: argparse.Namespace,
    process: subprocess.Popen[bytes],
    name: str,
) -> Result:
    workers = Workers(url, key, nodes, max(1, min(args.processes, nodes // 50)), args.concurrency)
    try:
        timeout = args.timeout
        workers.wait("ready", 60)
        spy = Spy(args, name, nodes, "join", process.pid)
        cpu0 = cpu_seconds(process.pid)
        started = time.monotonic()
        workers.send(cmd="go")
        registered = max(e["t"] for e in workers.wait("registered", timeout)) - started
        converged = max(e["t"] for e in workers.wait("converged", timeout)) - started
        spy.stop()
        cpu_join = cpu_seconds(process.pid) - cpu0
        rss_join = rss_bytes(process.pid)
        # Let the last batches drain before timing single changes.
        time.sleep(args.settle)
        spy = Spy(args, name, nodes, "changes", process.pid)
        cpu1 = cpu_seconds(process.pid)
        latencies = []
        for n in range(changes):
            endpoint = f"198.51.{100 + n // 250}.{n % 250 + 1}:41641"
            mover = (n * 7919) % nodes
            workers.send(cmd="change", client=mover, endpoint=endpoint)
            seen = workers.wait("seen", 120, endpoint=endpoint)
            sent = next(e["sent"] for e in seen if e["sent"] is not None)
            latencies.append(max(e["t"] for e in seen) - sent)
            time.sleep(0.2)
        cpu_change = (cpu_seconds(process.pid) - cpu1) / max(1, changes)
        spy.stop()
        rss = rss_bytes(process.pid)
    except (RuntimeError, TimeoutError) as exc:
        raise RuntimeError(f"{exc}; load processes: {workers.close()}") from None
    finally:
        stats = workers.close()
    return Result(
        registered,
        converged,
        latencies,
        cpu_join,
        cpu_change,
        rss_join,
        rss,
        hwm_bytes(process.pid),
        sum(s["cpu"] for s in stats),
    )


@dataclass
class Result:
    registered: float
    converged: float
    latencies: list[float]
    cpu_join: float
    cpu_per_change: float
    rss_joined: int
    rss: int
    hwm: int
    client_cpu: float

    @property
    def change(self) -> float:
        return statistics.median(self.latencies)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--changes", type=int, default=5)
    parser.add_argument(
        "--servers", nargs="+", default=["embedmesh", "headscale"], choices=["embedmesh", "headscale"]
    )
    parser.add_argument(
        "--processes", type=int, default=2, help="load client processes (at most one per 50 clients)"
    )
    parser.add_argument(
        "--concurrency", type=int, default=32, help="registrations in flight per load process"
    )
    parser.add_argument(
        "--settle", type=float, default=2.0, help="seconds between convergence and the changes"
    )
    parser.add_argument(
        "--timeout", type=float, default=1800.0, help="seconds for registration and convergence"
    )
    parser.add_argument(
        "--profile", metavar="DIR", help="py-spy the embedmesh server (join, changes) into DIR"
    )
    args = parser.parse_args()
    # Each server holds a socket per client, each load process its share.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, max(args.nodes) * 2 + 4096)), hard))
    servers = {"embedmesh": embedmesh_server, "headscale": headscale_server}
    rows: dict[tuple[str, int], Result] = {}
    for nodes in args.nodes:
        for name in args.servers:
            with tempfile.TemporaryDirectory() as tmp, servers[name](Path(tmp)) as (url, key, process):
                try:
                    result = measure(url, key, nodes, args.changes, args, process, name)
                except (RuntimeError, TimeoutError) as exc:
                    print(
                        f"{name:9} N={nodes:5}: FAILED: {exc} (server RSS {rss_bytes(process.pid) / 2**20:.1f} MiB)",
                        flush=True,
                    )
                    continue
            rows[(name, nodes)] = result
            print(
                f"{name:9} N={nodes:5}: register {result.registered:7.2f} s, all peers known {result.converged:7.2f} s, "
                f"change to all {result.change * 1000:7.1f} ms (median of {len(result.latencies)}: "
                f"{', '.join(f'{x * 1000:.0f}' for x in result.latencies)}), "
                f"server CPU {result.cpu_join:7.2f} s to converge + {result.cpu_per_change * 1000:.0f} ms per change, "
                f"RSS {result.rss / 2**20:7.1f} MiB (peak {result.hwm / 2**20:.1f}), load clients' CPU "
                f"{result.client_cpu:.1f} s",
                flush=True,
            )
        em, hs = rows.get(("embedmesh", nodes)), rows.get(("headscale", nodes))
        if em is not None and hs is not None:
            print(
                f"ratio headscale/embedmesh N={nodes}: register {hs.registered / em.registered:.2f}x, "
                f"all peers known {hs.converged / em.converged:.2f}x, change {hs.change / em.change:.2f}x, "
                f"CPU {hs.cpu_join / max(em.cpu_join, 1e-9):.2f}x, "
                f"CPU per change {hs.cpu_per_change / max(em.cpu_per_change, 1e-9):.2f}x, "
                f"RSS {hs.rss / em.rss:.2f}x",
                flush=True,
            )


if __name__ == "__main__":
    main()

"""DERP relays: embedmesh's DERP server against Tailscale's derper (tailscale.com v1.102.5), same run.

    python benchmarks/bench_derp.py [--seconds S] [--rounds K] [--clients N] [--mesh] [--profile FILE]

Both servers run as processes of their own on loopback, plain HTTP (``embedmesh derp serve`` from
this repository's ``src``; ``derper -a 127.0.0.1:PORT -http-port -1``), so the CPU each one uses is
read from ``/proc/<pid>/stat``. The load comes from ``tests/interop/go/derpload``, built on
Tailscale's own DERP client, the same for both servers:

* bulk: two clients pump packets of 1,280 bytes through the server (a window of 32 in flight,
  acknowledged through the relay); MB/s delivered, server CPU seconds per MB, and the share of the
  packets sent that arrived (the relays drop from the head of a full queue, they never push back);
* pps: ``--clients`` connected clients (default 1,000) in pairs, each answering every small packet
  (64 bytes) from its partner with another (4 in flight per client); packets per second delivered
  and server CPU µs per packet;
* ``--mesh``: bulk between two meshed servers of each kind (sender on one, receiver on the other,
  so every packet is a ForwardPacket), CPU of both servers.

Rounds interleave the servers, so a noisy machine hurts both alike; the medians are printed with
the ratio embedmesh/derper per metric. "Per core" figures divide by the server's CPU seconds, not
wall time: derper may use both cores, embedmesh's server is one Python thread.

``--profile FILE`` runs py-spy (``pip install py-spy``) on embedmesh's server during one more bulk
run, writes the collapsed stacks to FILE and prints the functions with the most samples.

Needs Go (derper and derpload are built on first use into ~/.cache/embedmesh-interop).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "tests" / "interop"))

import gopeers  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (fields 14 and 15 of /proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode} before listening on {port}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise SystemExit(f"server did not listen on {port} in {timeout:g} s")


@dataclass
class Server:
    kind: str
    url: str
    proc: subprocess.Popen[bytes]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def start_server(kind: str, workdir: Path, *, mesh_key: Path | None = None, mesh_with: str = "", port: int = 0) -> Server:
    port = port or free_port()
    if kind == "embedmesh":
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
        # --no-stun: derp serve runs STUN on 3478 by default, which two servers (--mesh) cannot share.
        argv = [sys.executable, "-m", "embedmesh.cli.main", "derp", "serve", "--listen", f"127.0.0.1:{port}", "--no-stun"]
        if mesh_key is not None:
            argv += ["--mesh-key-file", str(mesh_key), "--mesh-with", mesh_with]
    else:
        config = workdir / f"derper-{port}.json"
        env = {**os.environ, "TS_NO_LOGS_NO_SUPPORT": "true", "TS_DEBUG_USE_DERP_HTTP": "1"}
        argv = [str(gopeers.derper()), "-a", f"127.0.0.1:{port}", "-http-port", "-1", "-stun=false", "-c", str(config)]
        if mesh_key is not None:
            argv += ["--mesh-psk-file", str(mesh_key), "--mesh-with", mesh_with]
    log = open(workdir / f"{kind}-{port}.log", "wb")  # noqa: SIM115 (the process keeps it)
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
    wait_port(port, proc)
    return Server(kind, f"http://127.0.0.1:{port}/derp", proc)


def run_load(argv: list[str], pids: list[int], timeout: float, on_start: list[object] | None = None) -> dict[str, float]:
    """derpload's "done" figures plus the servers' CPU seconds between its "start" and "done"."""
    proc = subprocess.Popen([str(gopeers.go_program("derpload")), *argv], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    cpu0: float | None = None
    deadline = time.monotonic() + timeout
    try:
        for line in proc.stdout:
            event = json.loads(line)
            if event["event"] == "start":
                cpu0 = sum(cpu_seconds(pid) for pid in pids)
                if on_start is not None:
                    on_start.append(time.monotonic())
            elif event["event"] == "done":
                assert cpu0 is not None
                event["server_cpu"] = sum(cpu_seconds(pid) for pid in pids) - cpu0
                return dict(event)
            if time.monotonic() > deadline:
                break
        raise SystemExit(f"derpload {' '.join(argv)} ended without figures (exit {proc.poll()})")
    finally:
        proc.kill()
        proc.wait()


def bulk(urls: list[str], pids: list[int], seconds: float) -> dict[str, float]:
    figures = run_load(["bulk", "-size", "1280", "-seconds", str(seconds), *urls], pids, seconds + 60)
    mb = figures["bytes"] / 1e6
    return {
        "MB/s": mb / figures["seconds"],
        "server CPU s/MB": figures["server_cpu"] / mb if mb else float("inf"),
        "MB per CPU s": mb / figures["server_cpu"] if figures["server_cpu"] else float("inf"),
        "delivered": figures["packets"] / figures["sent"] if figures["sent"] else 0.0,
        "server CPU share": figures["server_cpu"] / figures["seconds"],
    }


def pps(url: str, pid: int, seconds: float, clients: int) -> dict[str, float]:
    argv = ["pps", "-clients", str(clients), "-size", "64", "-seconds", str(seconds), "-warmup", "2", url]
    figures = run_load(argv, [pid], seconds + 180)
    return {
        "packets/s": figures["packets"] / figures["seconds"],
        "server CPU µs/packet": 1e6 * figures["server_cpu"] / figures["packets"] if figures["packets"] else float("inf"),
        "packets per CPU s": figures["packets"] / figures["server_cpu"] if figures["server_cpu"] else float("inf"),
        "server CPU share": figures["server_cpu"] / figures["seconds"],
    }


def meshed_bulk(kind: str, workdir: Path, mesh_key: Path, seconds: float) -> dict[str, float]:
    ports = [free_port(), free_port()]
    region = ",".join(f"127.0.0.1:{port}" for port in ports)
    servers = [start_server(kind, workdir, mesh_key=mesh_key, mesh_with=region, port=port) for port in ports]
    try:
        time.sleep(6)  # derper's mesh links retry every 5 s until the other server listens
        return bulk([s.url for s in servers], [s.proc.pid for s in servers], seconds)
    finally:
        for server in servers:
            server.stop()


def profile(workdir: Path, out: Path, seconds: float) -> None:
    server = start_server("embedmesh", workdir)
    try:
        starts: list[object] = []
        spy = subprocess.Popen(
            ["py-spy", "record", "--format", "raw", "-o", str(out), "-r", "200", "-d", str(int(seconds) + 2), "-p", str(server.proc.pid)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        figures = run_load(["bulk", "-size", "1280", "-seconds", str(seconds), server.url], [server.proc.pid], seconds + 60, starts)
        spy.wait(60)
    finally:
        server.stop()
    print(f"profiled bulk run: {figures['bytes'] / 1e6 / figures['seconds']:.1f} MB/s; stacks in {out}")
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in out.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        total += int(count)
        own[frames[-1]] += int(count)
    print("  most samples (own time):")
    for frame, count in own.most_common(20):
        print(f"  {100 * count / total:5.1f} %  {frame}")


def fmt(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 100 else f"{value:,.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds measured per run")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds per server")
    parser.add_argument("--clients", type=int, default=1000, help="connected clients in the pps run")
    parser.add_argument("--mesh", action="store_true", help="also bulk through two meshed servers of each kind")
    parser.add_argument("--skip-pps", action="store_true", help="only the bulk runs")
    parser.add_argument("--profile", type=Path, help="py-spy our server during a bulk run; collapsed stacks to FILE")
    args = parser.parse_args()
    gopeers.derper(), gopeers.go_program("derpload")  # build before timing anything

    results: dict[str, dict[str, list[float]]] = {"bulk": {}, "pps": {}, "mesh bulk": {}}
    kinds = ("embedmesh", "derper")
    with tempfile.TemporaryDirectory(prefix="bench-derp-") as tmp:
        workdir = Path(tmp)
        mesh_key = workdir / "mesh.key"
        mesh_key.write_text(os.urandom(32).hex())
        for round_ in range(args.rounds):
            for kind in kinds if round_ % 2 == 0 else kinds[::-1]:
                server = start_server(kind, workdir)
                try:
                    time.sleep(0.5)
                    figures = {"bulk": bulk([server.url], [server.proc.pid], args.seconds)}
                    if not args.skip_pps:
                        figures["pps"] = pps(server.url, server.proc.pid, args.seconds, args.clients)
                finally:
                    server.stop()
                if args.mesh:
                    figures["mesh bulk"] = meshed_bulk(kind, workdir, mesh_key, args.seconds)
                for test, values in figures.items():
                    for metric, value in values.items():
                        results[test].setdefault(f"{kind}|{metric}", []).append(value)
                    print(f"round {round_ + 1} {kind:9} {test:9}: " + ", ".join(f"{m} {fmt(v)}" for m, v in values.items()), flush=True)
        if args.profile is not None:
            profile(workdir, args.profile, args.seconds)

    print(f"\nmedians of {args.rounds} rounds, {args.seconds:g} s each ({args.clients} clients for pps):")
    for test, series in results.items():
        metrics = dict.fromkeys(key.split("|", 1)[1] for key in series)
        for metric in metrics:
            ours = statistics.median(series[f"embedmesh|{metric}"])
            theirs = statistics.median(series[f"derper|{metric}"])
            ratio = ours / theirs if theirs else float("inf")
            print(f"  {test:9} {metric:22} embedmesh {fmt(ours):>10}  derper {fmt(theirs):>10}  ratio {ratio:.2f}")


if __name__ == "__main__":
    main()

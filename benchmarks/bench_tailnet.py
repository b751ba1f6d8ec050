"""Bulk TCP in one embedmesh tailnet: two embedmesh nodes against two tsnet nodes, same run.

    python benchmarks/bench_tailnet.py [--bytes N] [--runs K]

An embedmesh control server (with a derper in its DERP map, as Tailscale's clients need) runs in a
network namespace of the interop rig (``tests/interop/tailnet.py``: hosts behind a dead-end hub,
nothing leaves the machine). Per round, interleaved so a noisy machine hurts both alike:

* embedmesh: ``benchmarks/embedmesh_peer.py`` as server and client, two processes in the root
  namespace on the rig's veth, joined with an auth key; the client dials the server by MagicDNS
  name and sends ``--bytes`` in 64 KiB chunks; MB/s from the first byte to the server's count;
* tsnet: ``tests/interop/go/tsnetpeer`` (tailscale.com/tsnet v1.102.5) as a ``-discard`` sink and a
  ``-dial ... -send N`` client, each in a namespace of its own; MB/s over the transfer (its total
  time minus the dial).

Both pairs use MTU 1280 (Tailscale's and embedmesh's default). Printed: MB/s per round, medians,
the ratio embedmesh/tsnet, first dial (embedmesh: dial including the WireGuard handshake; tsnet:
its connect time), and the RSS of an idle server node (after the transfers). Needs root and the
Go peers (built on first use into ~/.cache/embedmesh-interop).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "interop"))

import gopeers  # noqa: E402
from netns import NetnsRig, wait_for  # noqa: E402
from tailnet import EmbedmeshControl, TailnetRig, TailscaleBins  # noqa: E402


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def events(proc: subprocess.Popen[str], want: str, timeout: float) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise SystemExit(f"peer exited ({proc.poll()}) before {want}")
        if line.startswith("{"):
            event = json.loads(line)
            if event.get("event") == "error":
                raise SystemExit(f"peer failed: {event}")
            if event.get("event") == want:
                return dict(event)
    raise SystemExit(f"no {want} in {timeout} s")


def embedmesh_round(url: str, key: str, root_ip: str, size: int) -> tuple[float, float]:
    env = {**os.environ, "EMBEDMESH_AUTH_KEY": key}
    client = subprocess.Popen(
        [
            sys.executable,
            str(HERE / "embedmesh_peer.py"),
            "--role",
            "client",
            "--bytes",
            str(size),
            "--control-url",
            url,
            "--hostname",
            f"em-client-{time.monotonic_ns() % 100000}",
            "--listen-host",
            root_ip,
            "--server",
            "em-server.mesh.internal",
            "--pings",
            "5",
            "--probes",
            "5",
            "--keep-server",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    try:
        result = events(client, "bulk", 300)
    finally:
        client.wait(30)
    return float(result["MBps"]), float(result["first_dial_ms"])  # type: ignore[arg-type]


def tsnet_round(trig: TailnetRig, binary: Path, url: str, key: str, size: int, n: int) -> tuple[float, float]:
    client = trig.tsnet(
        binary,
        f"ts-client-{n}",
        url,
        key,
        "-dial",
        "ts-server.mesh.internal:9000",
        "-send",
        str(size),
        "-peers",
        "1",
        "-timeout",
        "300s",
    )
    event = client.wait_event("dialed", timeout=300)
    client.process.wait(30)
    total_ms, connect_ms = float(event["total_ms"]), float(event["connect_ms"])  # type: ignore[arg-type]
    assert int(str(event["sent"])) == size, event
    return size / ((total_ms - connect_ms) / 1000) / 1e6, connect_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bytes", type=int, default=100_000_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    bins = TailscaleBins(gopeers.tailscaled(), gopeers.tailscale_cli(), gopeers.derper())
    tsnetpeer = gopeers.go_program("tsnetpeer")
    with NetnsRig() as rig:
        trig = TailnetRig(rig)
        root_ip = trig.attach_root()
        control = EmbedmeshControl(trig, bins)
        key = control.key(reusable=True, ephemeral=True)
        env = {**os.environ, "EMBEDMESH_AUTH_KEY": key}
        server = subprocess.Popen(
            [
                sys.executable,
                str(HERE / "embedmesh_peer.py"),
                "--role",
                "server",
                "--control-url",
                control.url,
                "--hostname",
                "em-server",
                "--listen-host",
                root_ip,
                "--timeout",
                "3600",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        sink = trig.tsnet(tsnetpeer, "ts-server", control.url, key, "-discard", "9000")
        sink.wait_event("serving", timeout=60)
        wait_for(
            lambda: "em-server" in control.nodes(), timeout=60, interval=0.2, what="the embedmesh server node"
        )
        em, ts, em_dial, ts_dial = [], [], [], []
        try:
            for n in range(args.runs):
                mbps, dial = embedmesh_round(control.url, key, root_ip, args.bytes)
                em.append(mbps)
                em_dial.append(dial)
                mbps, dial = tsnet_round(trig, tsnetpeer, control.url, key, args.bytes, n)
                ts.append(mbps)
                ts_dial.append(dial)
                print(f"round {n + 1}: embedmesh {em[-1]:7.1f} MB/s, tsnet {ts[-1]:7.1f} MB/s", flush=True)
            em_rss, ts_rss = rss_mib(server.pid), rss_mib(sink.process.pid)
        finally:
            server.terminate()
            server.wait(30)
            control.admin.close()
    print(f"bulk TCP, MTU 1280, {args.bytes / 1e6:.0f} MB x {args.runs}:")
    print(
        f"  embedmesh -> embedmesh: median {statistics.median(em):7.1f} MB/s (range {min(em):.1f}-{max(em):.1f})"
    )
    print(
        f"  tsnet     -> tsnet:     median {statistics.median(ts):7.1f} MB/s (range {min(ts):.1f}-{max(ts):.1f})"
    )
    print(f"  ratio embedmesh/tsnet: {statistics.median(em) / statistics.median(ts):.2f}")
    print(
        f"  first dial: embedmesh {statistics.median(em_dial):.1f} ms, tsnet connect {statistics.median(ts_dial):.1f} ms"
    )
    print(f"  RSS of the server node after the transfers: embedmesh {em_rss:.1f} MiB, tsnet {ts_rss:.1f} MiB")


if __name__ == "__main__":
    main()

"""Bulk TCP throughput of embedmesh against reference data planes, measured in one run.

    python benchmarks/bench_throughput.py [--bytes N] [--mtu 1280 1420] [--runs K]
        [--skip-wireguard-go] [--skip-gonetstack] [--conns 10000] [--timeout 120] [--profile]

Configurations, each measured ``--runs`` times per MTU, interleaved round by round so that a noisy
machine hurts every configuration alike (only ratios from one run mean anything):

1. embedmesh → embedmesh: two processes (``benchmarks/embedmesh_peer.py``), each a ``Node``, over
   WireGuard on loopback UDP; the client writes 64 KiB chunks as fast as ``send`` takes them, the
   server counts to EOF and reports MB/s from the first byte. The client also reports the first dial
   (it includes the WireGuard handshake), a warm dial, the median RTT of 20 pings with a 64-byte ICMP
   message, and both report VmRSS after the transfer and VmHWM. One more process pair opens
   ``--conns`` idle connections and reports the RSS growth per connection.
2. wireguard-go + kernel TCP: two network namespaces joined by a veth (198.18.0.0/15), stock
   ``wireguard-go`` in each (configured with ``wg``), ``iperf3`` over the wg interfaces (100.64.0.0/10);
   MB/s as the receiver counts it. Needs root, wireguard-go, wg and iperf3; reuses the interop rig
   (``tests/interop/netns.py``), which removes everything it made.
3. gonetstack: wireguard-go with gVisor's TCP/IP stack and no TUN, as Tailscale's tsnet (built at run
   time by ``../shared/anchors/gonetstack/build.sh``; skipped with a message when ``../shared`` is
   absent), with ``-bind own -sockbuf 7340032`` and with ``-bind default``, on loopback UDP.

Then a table: MB/s (median and range), µs per 1,280-byte packet, and the ratios of embedmesh to each
reference at each MTU. ``--profile`` adds one more embedmesh transfer with py-spy attached to both
peers and prints their hottest functions. Every transfer is bounded by ``--timeout``: a stall is
reported as a failure, never a hang.
"""

from __future__ import annotations

import argparse
import base64
import collections
import datetime
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from embedmesh.wireguard import crypto

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PEER = HERE / "embedmesh_peer.py"
INTEROP = REPO / "tests" / "interop"
GONETSTACK_BUILD = REPO.parent / "shared" / "anchors" / "gonetstack" / "build.sh"

CLIENT_V4, SERVER_V4 = "100.64.0.1", "100.64.0.2"
IPERF_PORT = 5201
PACKET = 1280  # the per-packet cost is quoted per 1,280-byte packet, whatever the MTU
STARTUP_SLACK = 30.0  # seconds a process pair may take beyond --timeout (start-up, handshake, exit)

# Collapsed stacks aggregated per function, idle time included (so the waiting share shows).
PY_SPY = ["py-spy", "record", "--format", "raw", "--function", "--idle", "--rate", "100"]

EMBEDMESH = "embedmesh → embedmesh"
WIREGUARD_GO = "wireguard-go + kernel TCP"
GONET_OWN = "gonetstack -bind own"
GONET_DEFAULT = "gonetstack -bind default"
CONFIGURATIONS = (EMBEDMESH, WIREGUARD_GO, GONET_OWN, GONET_DEFAULT)


class BenchFailure(Exception):
    """One measurement failed (timeout, crash, short transfer); the run goes on."""


# ---------------------------------------------------------------------------------------------- processes


class Child:
    """A subprocess whose stdout lines are collected by a thread and whose peak RSS is sampled.

    It gets its own session so that ``stop()`` reaches anything it forked; every Child still alive at
    the end of the benchmark is stopped by ``stop_all()``.
    """

    alive: list[Child] = []

    def __init__(self, argv: list[str], name: str, *, stdin_text: str | None = None) -> None:
        self.name = name
        self.lines: list[str] = []
        self.peak_kb = 0
        self._changed = threading.Condition()
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the process; stop() closes it
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE if stdin_text is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            start_new_session=True,
        )
        Child.alive.append(self)
        if stdin_text is not None:
            assert self.proc.stdin is not None
            self.proc.stdin.write(stdin_text)
            self.proc.stdin.close()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    @classmethod
    def sample_all(cls) -> None:
        for child in cls.alive:
            child.sample_memory()

    def sample_memory(self) -> None:
        with suppress(OSError, ValueError):
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    self.peak_kb = max(self.peak_kb, int(line.split()[1]))

    def wait_line(self, predicate: Callable[[str], bool], deadline: float) -> str:
        """The first stdout line satisfying predicate; BenchFailure on exit or at the deadline."""
        seen = 0
        while True:
            with self._changed:
                for line in self.lines[seen:]:
                    if predicate(line):
                        return line
                seen = len(self.lines)
                if self.proc.poll() is not None and not self._reader.is_alive():
                    raise BenchFailure(f"{self.name} exited ({self.proc.returncode}) early: {self.tail()}")
                if time.monotonic() >= deadline:
                    raise BenchFailure(f"{self.name} timed out: {self.tail()}")
                self._changed.wait(0.05)
            Child.sample_all()

    def wait(self, deadline: float) -> int:
        """Wait for the exit (sampling memory meanwhile); BenchFailure at the deadline."""
        while self.proc.poll() is None:
            Child.sample_all()
            if time.monotonic() >= deadline:
                raise BenchFailure(f"{self.name} did not finish in time: {self.tail()}")
            time.sleep(0.05)
        self._reader.join(5)
        return self.proc.returncode

    def json_events(self) -> dict[str, dict[str, Any]]:
        events = {}
        for line in self.lines:
            with suppress(ValueError):
                item = json.loads(line)
                if isinstance(item, dict) and "event" in item:
                    events[item["event"]] = item
        return events

    def tail(self, lines: int = 6) -> str:
        self._stderr.seek(0)
        err = self._stderr.read().decode(errors="replace").strip().splitlines()
        out = (self.lines + err)[-lines:]
        return " | ".join(out) if out else "(no output)"

    def stop(self) -> None:
        if self.proc.poll() is None:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                with suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.pid, sig)
                try:
                    self.proc.wait(3)
                    break
                except subprocess.TimeoutExpired:
                    continue
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)  # anything it left in its session
        if self in Child.alive:
            Child.alive.remove(self)
        self._stderr.close()

    @classmethod
    def stop_all(cls) -> None:
        for child in list(cls.alive):
            child.stop()


@contextmanager
def children() -> Iterator[list[Child]]:
    """Collects the Childs of one measurement and stops them all when it ends, however it ends."""
    started: list[Child] = []
    try:
        yield started
    finally:
        for child in started:
            child.stop()


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# ---------------------------------------------------------------------------------------------- results


@dataclass
class Results:
    """MB/s per (configuration, MTU), one entry per round (None: that round failed)."""

    mbps: dict[tuple[str, int], list[float | None]] = field(
        default_factory=lambda: collections.defaultdict(list)
    )
    failures: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    details: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: collections.defaultdict(list))

    def record(self, config: str, mtu: int, value: float | None, detail: dict[str, Any]) -> None:
        self.mbps[(config, mtu)].append(value)
        self.details[config].append({"mtu": mtu, **detail})

    def values(self, config: str, mtu: int) -> list[float]:
        return [v for v in self.mbps.get((config, mtu), []) if v is not None]

    def detail_values(self, config: str, key: str, mtu: int | None = None) -> list[float]:
        return [
            d[key]
            for d in self.details.get(config, [])
            if d.get(key) is not None and (mtu is None or d["mtu"] == mtu)
        ]


def median_range(values: list[float], fmt: str = "{:.1f}") -> str:
    if not values:
        return "n/a"
    med = fmt.format(statistics.median(values))
    if len(values) == 1:
        return med
    return f"{med} [{fmt.format(min(values))}–{fmt.format(max(values))}]"


def measure(results: Results, config: str, mtu: int, run: Callable[[], dict[str, Any]]) -> None:
    started = time.monotonic()
    try:
        detail = run()
    except BenchFailure as exc:
        message = f"{config} MTU {mtu}: FAILED: {exc}"
        print(f"  {message}", flush=True)
        results.failures.append(message)
        results.record(config, mtu, None, {"error": str(exc)})
        return
    mbps = detail["MBps"]
    print(f"  {config:<28} MTU {mtu}: {mbps:8.1f} MB/s  ({time.monotonic() - started:.1f} s)", flush=True)
    results.record(config, mtu, mbps, detail)


# ---------------------------------------------------------------------------------------------- embedmesh


def embedmesh_configs(mtu: int) -> tuple[str, str]:
    """wg-quick texts for the server (100.64.0.2) and the client (100.64.0.1, Endpoint left to fill)."""
    server_key = crypto.generate_private_key(os.urandom(32))
    client_key = crypto.generate_private_key(os.urandom(32))

    def b64(key: bytes) -> str:
        return base64.b64encode(key).decode()

    server = (
        f"[Interface]\nPrivateKey = {b64(server_key)}\nAddress = {SERVER_V4}/32\nMTU = {mtu}\n\n"
        f"[Peer]\nPublicKey = {b64(crypto.public_key(client_key))}\nAllowedIPs = {CLIENT_V4}/32\n"
    )
    client = (
        f"[Interface]\nPrivateKey = {b64(client_key)}\nAddress = {CLIENT_V4}/32\nMTU = {mtu}\n\n"
        f"[Peer]\nPublicKey = {b64(crypto.public_key(server_key))}\nAllowedIPs = {SERVER_V4}/32\n"
        "Endpoint = 127.0.0.1:{port}\n"
    )
    return server, client


def run_embedmesh_pair(
    mtu: int, args: argparse.Namespace, mode: str, client_args: list[str], profile_dir: Path | None = None
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Path]]:
    """Start a server and a client peer; return their result events (and py-spy outputs)."""
    server_conf, client_conf = embedmesh_configs(mtu)
    common = [sys.executable, str(PEER), "--mode", mode, "--timeout", str(args.timeout)]
    deadline = time.monotonic() + args.timeout + STARTUP_SLACK
    profiles: dict[str, Path] = {}
    with children() as started:
        server = Child([*common, "--role", "server"], "embedmesh server", stdin_text=server_conf)
        started.append(server)
        ready = json.loads(server.wait_line(lambda line: '"ready"' in line, time.monotonic() + 30))
        client = Child(
            [*common, "--role", "client", *client_args],
            "embedmesh client",
            stdin_text=client_conf.replace("{port}", str(ready["listen_port"])),
        )
        started.append(client)
        spies: list[Child] = []
        if profile_dir is not None:
            # Attach once the bulk transfer starts, so imports and set-up stay out of the profile.
            client.wait_line(lambda line: '"transfer"' in line, deadline)
            for role, peer in (("server", server), ("client", client)):
                profiles[role] = profile_dir / f"embedmesh-{role}-mtu{mtu}.txt"
                spy = Child(
                    [*PY_SPY, "-o", str(profiles[role]), "--pid", str(peer.pid)],
                    f"py-spy {role}",
                )
                started.append(spy)
                spies.append(spy)
        client_status = client.wait(deadline)
        # The client's last act is to tell the server to quit: it has no reason to linger.
        server_status = server.wait(min(deadline, time.monotonic() + 15))
        for spy in spies:
            spy.wait(time.monotonic() + 30)
        client_events, server_events = client.json_events(), server.json_events()
        errors = []
        for role, status, events, peer in (
            ("server", server_status, server_events, server),
            ("client", client_status, client_events, client),
        ):
            if "error" in events:
                errors.append(events["error"]["error"])
            elif status != 0 or (mode not in events and (role == "client" or mode == "bulk")):
                errors.append(f"embedmesh {role} exited with {status}: {peer.tail()}")
        if errors:
            raise BenchFailure("; ".join(errors))
        return client_events[mode], server_events.get(mode, {}), profiles


def embedmesh_bulk(mtu: int, args: argparse.Namespace, profile_dir: Path | None = None) -> dict[str, Any]:
    client, server, profiles = run_embedmesh_pair(
        mtu, args, "bulk", ["--bytes", str(args.bytes)], profile_dir=profile_dir
    )
    if not (client.get("ok") and server.get("ok")):
        raise BenchFailure(f"short transfer: sent {client.get('bytes')}, server got {server.get('bytes')}")
    return {
        "MBps": server["MBps"],
        "sender_MBps": client["MBps"],
        "first_dial_ms": client["first_dial_ms"],
        "warm_dial_ms": client["warm_dial_ms"],
        "ping_ms": client["ping_ms"],
        "client_rss_kb": client["rss_kb"],
        "client_hwm_kb": client["hwm_kb"],
        "server_rss_kb": server["rss_kb"],
        "server_hwm_kb": server["hwm_kb"],
        "client_counters": client.get("counters", {}),
        "server_counters": server.get("counters", {}),
        "profiles": {role: str(path) for role, path in profiles.items()},
    }


def embedmesh_idle_connections(args: argparse.Namespace) -> dict[str, Any]:
    client, _, _ = run_embedmesh_pair(args.mtu[0], args, "conns", ["--conns", str(args.conns)])
    return client


# ---------------------------------------------------------------------------------------------- wireguard-go


class WireGuardGoPair:
    """Two namespaces joined by a veth, wireguard-go in each, iperf3 server on one side."""

    def __init__(self, mtu: int) -> None:
        if str(INTEROP) not in sys.path:
            sys.path.insert(0, str(INTEROP))
        import netns  # tests/interop/netns.py: the interop rig, which cleans up after itself

        reason = netns.wireguard_unavailable_reason()
        if reason is None and shutil.which("iperf3") is None:
            reason = "iperf3 not installed: apt-get install iperf3"
        if reason:
            raise BenchFailure(reason)
        self.rig = netns.NetnsRig()
        try:
            self.client_ns = self.rig.add_namespace("benchc")
            self.server_ns = self.rig.add_namespace("benchs")
            link = self.rig.veth_between(self.client_ns, self.server_ns)
            client_keys, server_keys = netns.generate_keypair(), netns.generate_keypair()
            self.wireguards = [
                self.rig.start_wireguard(ns, keys, 51820, [f"{address}/24"], mtu=mtu, log_level="error")
                for ns, keys, address in (
                    (self.client_ns, client_keys, CLIENT_V4),
                    (self.server_ns, server_keys, SERVER_V4),
                )
            ]
            self.wireguards[0].add_peer(server_keys.public, [f"{SERVER_V4}/32"], endpoint=(link.b.ip, 51820))
            self.wireguards[1].add_peer(client_keys.public, [f"{CLIENT_V4}/32"], endpoint=(link.a.ip, 51820))
            self.server_ns.popen(
                ["iperf3", "-s", "-B", SERVER_V4, "-p", str(IPERF_PORT)], log_name="iperf3-s"
            )
            netns.wait_for(
                lambda: f":{IPERF_PORT}" in self.server_ns.run(["ss", "-Hltn"]).stdout,
                10,
                what="iperf3 -s listening",
            )
        except BaseException:
            self.close()
            raise

    def set_mtu(self, mtu: int) -> None:
        for wg in self.wireguards:
            wg.ns.ip("link", "set", "dev", wg.ifname, "mtu", str(mtu))

    def ping_ms(self, count: int = 20) -> float:
        out = self.client_ns.run(
            ["ping", "-n", "-c", str(count), "-i", "0.05", "-s", "56", "-W", "2", SERVER_V4], check=False
        ).stdout
        times = [float(t) for t in re.findall(r"time=([\d.]+) ms", out)]
        if not times:
            raise BenchFailure(f"kernel ping over wireguard-go failed: {out.strip()[-200:]}")
        return statistics.median(times)

    def iperf(self, nbytes: int, timeout: float) -> dict[str, Any]:
        import netns

        argv = ["iperf3", "-c", SERVER_V4, "-p", str(IPERF_PORT), "-n", str(nbytes), "-J"]
        overflows_before = self.udp_receive_buffer_errors()
        try:
            proc = self.client_ns.run([*argv, "--connect-timeout", "5000"], check=False, timeout=timeout)
        except netns.RigError as exc:
            raise BenchFailure(str(exc)) from None
        try:
            report = json.loads(proc.stdout)
            received = report["end"]["sum_received"]
        except (ValueError, KeyError):
            raise BenchFailure(f"iperf3 failed: {(proc.stdout + proc.stderr).strip()[-300:]}") from None
        return {
            "MBps": received["bits_per_second"] / 8 / 1e6,
            "retransmits": report["end"].get("sum_sent", {}).get("retransmits"),
            "udp_rcvbuf_errors": self.udp_receive_buffer_errors() - overflows_before,
            "wireguard_go_hwm_kb": max(self.peak_kb()),
        }

    def udp_receive_buffer_errors(self) -> int:
        """Underlay datagrams the kernel dropped on a full socket buffer, both namespaces together
        (this wireguard-go keeps the kernel's default buffer size)."""
        total = 0
        for ns in (self.client_ns, self.server_ns):
            out = ns.run(["nstat", "-asz", "UdpRcvbufErrors"], check=False).stdout
            found = re.search(r"UdpRcvbufErrors\s+(\d+)", out)
            total += int(found.group(1)) if found else 0
        return total

    def peak_kb(self) -> list[int]:
        peaks = []
        for wg in self.wireguards:
            try:
                status = Path(f"/proc/{wg.process.pid}/status").read_text()
                peaks.append(int(re.search(r"VmHWM:\s+(\d+)", status).group(1)))  # type: ignore[union-attr]
            except (OSError, AttributeError):
                peaks.append(0)
        return peaks

    def close(self) -> None:
        self.rig.close(raise_errors=False)


# ---------------------------------------------------------------------------------------------- gonetstack


def build_gonetstack() -> str:
    """The wgnet binary's path (built on first use), or BenchFailure saying why it is absent."""
    if not GONETSTACK_BUILD.exists():
        raise BenchFailure(f"{GONETSTACK_BUILD.parent} not found (../shared is absent)")
    print("building gonetstack (may apt-get install golang on first use) ...", flush=True)
    proc = subprocess.run(["bash", str(GONETSTACK_BUILD)], capture_output=True, text=True, timeout=900)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines or not os.access(lines[-1], os.X_OK):
        raise BenchFailure(f"gonetstack build failed: {(proc.stdout + proc.stderr).strip()[-400:]}")
    return lines[-1]


def gonetstack_bulk(binary: str, mtu: int, bind: str, args: argparse.Namespace) -> dict[str, Any]:
    keys = []
    for _ in range(2):
        out = subprocess.run([binary, "-genkey"], capture_output=True, text=True, timeout=30, check=True)
        keys.append(out.stdout.split())
    (server_priv, server_pub), (client_priv, client_pub) = keys
    server_port = client_port = free_udp_port()
    while client_port == server_port:
        client_port = free_udp_port()
    bind_args = ["-bind", bind] + (["-sockbuf", "7340032"] if bind == "own" else [])
    common = [binary, *bind_args, "-mtu", str(mtu)]
    deadline = time.monotonic() + args.timeout + STARTUP_SLACK
    with children() as started:
        server_argv = [*common, "-role", "server", "-priv", server_priv, "-peerpub", client_pub]
        server_argv += ["-listen", str(server_port), "-peer", f"127.0.0.1:{client_port}"]
        server = Child(server_argv, f"gonetstack server ({bind})")
        started.append(server)
        server.wait_line(lambda line: line.startswith("READY"), time.monotonic() + 30)
        client_argv = [*common, "-role", "client", "-priv", client_priv, "-peerpub", server_pub]
        client_argv += ["-listen", str(client_port), "-peer", f"127.0.0.1:{server_port}"]
        client_argv += ["-bytes", str(args.bytes), "-conns", "20"]
        client = Child(client_argv, f"gonetstack client ({bind})")
        started.append(client)
        client.wait(deadline)
        server.wait(min(deadline, time.monotonic() + 15))
        text = "\n".join(server.lines + client.lines)
        bulk = re.search(r"server bulk: recv_bytes=(\d+) secs=\S+ MBps=([\d.]+)", text)
        if bulk is None or int(bulk.group(1)) != args.bytes:
            raise BenchFailure(f"no complete transfer: {client.tail()} / {server.tail()}")
        first = re.search(r"first_dial_ms=([\d.]+)", text)
        warm = re.search(r"client probes: n=\d+ dial_ms p50=([\d.]+)", text)
        return {
            "MBps": float(bulk.group(2)),
            "first_dial_ms": float(first.group(1)) if first else None,
            "warm_dial_ms": float(warm.group(1)) if warm else None,
            "server_hwm_kb": server.peak_kb,
            "client_hwm_kb": client.peak_kb,
        }


# ---------------------------------------------------------------------------------------------- profile


def summarize_profile(path: Path, top: int = 15) -> str:
    """Top functions of a py-spy raw (collapsed-stack) file: by own samples, and inclusive in embedmesh."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [re.sub(r":\d+\)$", ")", frame) for frame in stack.split(";")]
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            if "embedmesh/" in frame or "(embedmesh" in frame:
                inclusive[frame] += count
    if not total:
        return f"{path}: no samples"
    rows = [f"{path.name}: {total} samples at 100 Hz (idle threads included: 'select' is waiting)"]
    rows.append(f"  top {top} by own time:")
    rows += [f"    {100 * n / total:5.1f}%  {frame}" for frame, n in own.most_common(top)]
    rows.append(f"  top {top} embedmesh functions by inclusive time:")
    rows += [f"    {100 * n / total:5.1f}%  {frame}" for frame, n in inclusive.most_common(top)]
    return "\n".join(rows)


# ---------------------------------------------------------------------------------------------- report


def print_report(results: Results, args: argparse.Namespace, load_before: tuple[float, ...]) -> None:
    print("\n" + "=" * 100)
    print(
        f"bulk TCP, {args.bytes / 1e6:g} MB per transfer, {args.runs} round(s), receiver-measured MB/s; "
        f"{os.cpu_count()} CPUs, load average {load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after"
    )
    for config, reason in results.skipped.items():
        print(f"skipped {config}: {reason}")
    print(f"\n{'configuration':<28} {'MTU':>5}  {'MB/s median [min–max]':<26} {'µs per 1,280-B packet':>22}")
    for config in CONFIGURATIONS:
        for mtu in args.mtu:
            values = results.values(config, mtu)
            runs = results.mbps.get((config, mtu), [])
            if not runs:
                continue
            failed = len(runs) - len(values)
            note = f"  ({failed} failed)" if failed else ""
            cost = f"{PACKET / statistics.median(values):.1f}" if values else "n/a"
            print(f"{config:<28} {mtu:>5}  {median_range(values):<26} {cost:>22}{note}")

    print("\nratios in this run (ratio of medians; range: ratios of the same round)")
    for mtu in args.mtu:
        mine = results.mbps.get((EMBEDMESH, mtu), [])
        for reference in (WIREGUARD_GO, GONET_OWN, GONET_DEFAULT):
            theirs = results.mbps.get((reference, mtu), [])
            a, b = results.values(EMBEDMESH, mtu), results.values(reference, mtu)
            if not a or not b:
                continue
            paired = [x / y for x, y in zip(mine, theirs, strict=False) if x and y]
            ratio = statistics.median(a) / statistics.median(b)
            spread = f" [{min(paired):.3f}–{max(paired):.3f}]" if len(paired) > 1 else ""
            print(f"  MTU {mtu}: embedmesh / {reference:<26} = {ratio:.3f}{spread}")

    print("\nconnection setup and latency (medians over rounds)")
    for config in (EMBEDMESH, GONET_OWN, GONET_DEFAULT):
        first = results.detail_values(config, "first_dial_ms")
        warm = results.detail_values(config, "warm_dial_ms")
        if first:
            print(
                f"  {config:<28} first dial (incl. WireGuard handshake) {median_range(first, '{:.2f}')} ms, "
                f"warm dial {median_range(warm, '{:.2f}')} ms"
            )
    ping = results.detail_values(EMBEDMESH, "ping_ms")
    if ping:
        print(f"  {EMBEDMESH:<28} ping RTT (64-byte ICMP, median of 20) {median_range(ping, '{:.3f}')} ms")
    kernel_ping = results.detail_values(WIREGUARD_GO, "ping_ms")
    if kernel_ping:
        print(f"  {WIREGUARD_GO:<28} kernel ping RTT (median of 20) {median_range(kernel_ping, '{:.3f}')} ms")

    print("\nmemory (MiB)")
    for key, label in (
        ("server_rss_kb", "embedmesh server VmRSS after transfer"),
        ("server_hwm_kb", "embedmesh server VmHWM (peak)"),
        ("client_rss_kb", "embedmesh client VmRSS after transfer"),
        ("client_hwm_kb", "embedmesh client VmHWM (peak)"),
    ):
        values = [v / 1024 for v in results.detail_values(EMBEDMESH, key)]
        if values:
            print(f"  {label:<44} {median_range(values)}")
    for config in (GONET_OWN, GONET_DEFAULT):
        values = [
            v / 1024 for k in ("server_hwm_kb", "client_hwm_kb") for v in results.detail_values(config, k)
        ]
        if values:
            print(f"  {config + ' peak RSS':<44} {median_range(values)}")
    values = [v / 1024 for v in results.detail_values(WIREGUARD_GO, "wireguard_go_hwm_kb")]
    if values:
        print(f"  {'wireguard-go peak RSS (kernel TCP not counted)':<44} {max(values):.1f}")
    idle = results.details.get("idle connections")
    if idle:
        item = idle[0]
        if "error" in item:
            print(f"  idle connections: FAILED: {item['error']}")
        else:
            print(
                f"  idle connections: {item['conns']} opened in {item['open_seconds']:.1f} s "
                f"({item['conns_per_second']:.0f}/s); RSS per connection: "
                f"server {item['server_bytes_per_conn'] / 1024:.2f} KiB, "
                f"client {item['client_bytes_per_conn'] / 1024:.2f} KiB"
            )

    retransmits = results.detail_values(WIREGUARD_GO, "retransmits")
    if retransmits:
        overflows = results.detail_values(WIREGUARD_GO, "udp_rcvbuf_errors")
        print(
            f"\nwireguard-go pair per iperf3 run: kernel TCP retransmits {median_range(retransmits, '{:.0f}')}, "
            f"underlay UDP receive-buffer drops {median_range(overflows, '{:.0f}')}"
        )
    if results.failures:
        print("\nfailures:")
        for failure in results.failures:
            print(f"  {failure}")


# ---------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bytes", type=int, default=150_000_000, help="bytes per transfer (default 150 MB)")
    parser.add_argument(
        "--mtu", type=int, nargs="+", default=[1280, 1420], help="overlay MTUs (default 1280 1420)"
    )
    parser.add_argument("--runs", type=int, default=3, help="rounds per configuration and MTU (default 3)")
    parser.add_argument("--conns", type=int, default=10_000, help="idle connections to open (0: skip)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds allowed per transfer")
    parser.add_argument("--skip-wireguard-go", action="store_true", help="skip the namespace pair")
    parser.add_argument("--skip-gonetstack", action="store_true", help="skip the Go tsnet-like data plane")
    parser.add_argument("--skip-embedmesh", action="store_true", help="measure only the references")
    parser.add_argument("--profile", action="store_true", help="one more embedmesh transfer under py-spy")
    parser.add_argument(
        "--profile-dir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "embedmesh-profile",
        help="py-spy output",
    )
    parser.add_argument("--json", type=Path, help="also write every measurement to this file")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> Results:
    results = Results()
    wireguard_go: WireGuardGoPair | None = None
    gonetstack: str | None = None
    try:
        if not args.skip_wireguard_go:
            try:
                wireguard_go = WireGuardGoPair(args.mtu[0])
                results.details[WIREGUARD_GO].append({"mtu": 0, "ping_ms": wireguard_go.ping_ms()})
            except Exception as exc:  # a missing tool or no root: say so and go on
                results.skipped[WIREGUARD_GO] = str(exc)
                wireguard_go = None
        else:
            results.skipped[WIREGUARD_GO] = "--skip-wireguard-go"
        if not args.skip_gonetstack:
            try:
                gonetstack = build_gonetstack()
            except (BenchFailure, subprocess.SubprocessError, OSError) as exc:
                results.skipped["gonetstack"] = str(exc)
        else:
            results.skipped["gonetstack"] = "--skip-gonetstack"
        for config, reason in results.skipped.items():
            print(f"skipping {config}: {reason}", flush=True)

        for round_number in range(1, args.runs + 1):
            print(f"round {round_number}/{args.runs}", flush=True)
            for mtu in args.mtu:
                if not args.skip_embedmesh:
                    measure(results, EMBEDMESH, mtu, partial(embedmesh_bulk, mtu, args))
                if wireguard_go is not None:
                    wireguard_go.set_mtu(mtu)
                    measure(results, WIREGUARD_GO, mtu, partial(wireguard_go.iperf, args.bytes, args.timeout))
                if gonetstack is not None:
                    for config, bind in ((GONET_OWN, "own"), (GONET_DEFAULT, "default")):
                        measure(results, config, mtu, partial(gonetstack_bulk, gonetstack, mtu, bind, args))

        if args.conns > 0 and not args.skip_embedmesh:
            print(f"idle connections: opening {args.conns} ...", flush=True)
            try:
                results.details["idle connections"].append(embedmesh_idle_connections(args))
            except BenchFailure as exc:
                results.details["idle connections"].append({"error": str(exc)})
                results.failures.append(f"idle connections: {exc}")

        if args.profile:
            run_profile(args, results)
    finally:
        if wireguard_go is not None:
            wireguard_go.close()
        Child.stop_all()
    return results


def run_profile(args: argparse.Namespace, results: Results) -> None:
    if shutil.which("py-spy") is None:
        results.failures.append("--profile: py-spy not installed (pip install py-spy)")
        return
    args.profile_dir.mkdir(parents=True, exist_ok=True)
    mtu = args.mtu[0]
    print(f"profiling one embedmesh transfer at MTU {mtu} with py-spy ...", flush=True)
    try:
        detail = embedmesh_bulk(mtu, args, profile_dir=args.profile_dir)
    except BenchFailure as exc:
        results.failures.append(f"profiled transfer: {exc}")
        return
    print(f"profiled transfer (not in the table): {detail['MBps']:.1f} MB/s")
    for role, path in detail["profiles"].items():
        if Path(path).exists():
            print(f"\n[{role}] " + summarize_profile(Path(path)))
    results.details["profile"].append(detail)


def source_revision() -> str:
    """The commit the peers run, and whether the tree differs from it (others may be editing)."""
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no", "src"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown revision"
    return f"{head or 'unknown revision'}{' + uncommitted changes in src/' if dirty else ''}"


def main() -> int:
    args = parse_args()
    # SIGTERM unwinds like Ctrl-C so that namespaces, veths and processes are removed.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    load_before = os.getloadavg()
    started = time.monotonic()
    print(
        f"{datetime.datetime.now().isoformat(timespec='seconds')} {platform.node()} "
        f"Python {platform.python_version()}, {os.cpu_count()} CPUs, load average {load_before[0]:.2f}, "
        f"embedmesh at {source_revision()}",
        flush=True,
    )
    results = run(args)
    print_report(results, args, load_before)
    print(f"\ntotal time {time.monotonic() - started:.0f} s")
    if args.json:
        payload = {
            "when": datetime.datetime.now().isoformat(timespec="seconds"),
            "load_before": load_before,
            "load_after": os.getloadavg(),
            "revision": source_revision(),
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "mbps": {f"{config} @ {mtu}": values for (config, mtu), values in results.mbps.items()},
            "details": results.details,
            "skipped": results.skipped,
            "failures": results.failures,
        }
        args.json.write_text(json.dumps(payload, indent=1, default=str))
    return 1 if results.failures else 0


if __name__ == "__main__":
    sys.exit(main())

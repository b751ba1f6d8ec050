"""Helpers for putting embedmesh's userspace TCP/UDP face to face with the Linux kernel's.

* :class:`StackHost`: a :class:`~embedmesh.netstack.stack.Netstack` on a TUN device whose kernel
  side lives in a rig namespace, driven in this process by the real runtime (``DataPlane`` +
  ``SocketLayer``), with the same ``listen`` / ``dial`` / ``listen_packet`` calls as a ``Node``.
  Every overlay packet is recorded to a pcap (:class:`embedmesh.pcap.PcapLink`).
* :func:`capture_node`: the same recording for a ``Node`` (its WireGuard link, in clear).
* :func:`overlay_pcap_path` and :func:`explain_failure`: where captures go (``EMBEDMESH_PCAP_DIR``
  keeps them; otherwise the rig's temp folder), and ``tshark -q -z expert`` of them when a test
  fails, with the files copied somewhere that outlives the rig.
* :func:`serve_http`: a tiny HTTP/1.1 server over any anyio ``ByteStream`` (GET returns N
  deterministic random bytes; POST/PUT return the SHA-256 of the body), for curl to talk to.
* Kernel-side tools run in a namespace: :func:`curl`, :func:`socat_server`, :func:`sha256_file`.

Blocking calls (``ns.run``, waiting for processes) go through ``anyio.to_thread`` so the stack
keeps running while curl or socat talk to it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from ipaddress import ip_address, ip_interface
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
from anyio import EndOfStream
from netns import Namespace, NetnsRig, VethLink, generate_keypair

from embedmesh.netstack.stack import Netstack
from embedmesh.netstack.tcp.config import TcpConfig
from embedmesh.node import Node, split_host_port
from embedmesh.pcap import PcapLink, PcapWriter
from embedmesh.runtime.dataplane import DataPlane
from embedmesh.runtime.tun import TunLink, open_tun
from embedmesh.sockets import SocketLayer, TcpListener, TcpStream, UdpSocket

PCAP_ENV = "EMBEDMESH_PCAP_DIR"
MB = 1 << 20
HTTP_PORT = 8080
#: Where explain_failure() copies the captures of a failed test when EMBEDMESH_PCAP_DIR is unset
#: (the rig's temp folder is removed when the rig closes).
FAILED_PCAP_DIR = Path(tempfile.gettempdir()) / "embedmesh-failed-pcaps"

# The TUN link's addresses: the stack on one end, the kernel (in the namespace) on the other.
STACK_V4, KERNEL_V4 = "100.64.1.1", "100.64.1.2"
STACK_V6, KERNEL_V6 = "fd7a:115c:a1e0:1::1", "fd7a:115c:a1e0:1::2"
# A Node and its wireguard-go peer (wireguard_peer()).
NODE_V4, PEER_V4 = "100.64.0.1", "100.64.0.2"
NODE_V6, PEER_V6 = "fd7a:115c:a1e0::1", "fd7a:115c:a1e0::2"
NODE_PORT = 51902


# --------------------------------------------------------------------------------------------------
# captures


def overlay_pcap_path(rig: NetnsRig, name: str) -> Path:
    """Where a test's overlay capture goes: EMBEDMESH_PCAP_DIR (kept) or the rig's temp folder."""
    folder = Path(os.environ[PCAP_ENV]) if os.environ.get(PCAP_ENV) else rig.tmpdir
    folder.mkdir(parents=True, exist_ok=True)
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
    return folder / f"overlay-{safe}-{rig.run_id}.pcap"


def tshark_expert(path: Path) -> str:
    """tshark's expert summary (notes and up: retransmissions, dup ACKs, zero windows, resets,
    malformed packets) and its TCP conversation table for a capture."""
    if shutil.which("tshark") is None:
        return "(tshark not installed: apt-get install tshark)"
    proc = subprocess.run(
        ["tshark", "-r", str(path), "-q", "-z", "expert,note", "-z", "conv,tcp"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    lines = (proc.stdout + proc.stderr).splitlines()
    return "\n".join(line for line in lines if "This could be dangerous" not in line).strip()


@contextlib.contextmanager
def explain_failure(*paths: Path) -> Iterator[None]:
    """On an exception, print the tshark expert summary of each capture and keep a copy of it."""
    try:
        yield
    except BaseException:
        keep = Path(os.environ[PCAP_ENV]) if os.environ.get(PCAP_ENV) else FAILED_PCAP_DIR
        for path in paths:
            if not path.exists():
                print(f"no capture at {path}")
                continue
            kept = path
            if path.parent != keep:
                keep.mkdir(parents=True, exist_ok=True)
                kept = keep / path.name
                shutil.copyfile(path, kept)
            print(
                f"===== overlay capture {kept} ({path.stat().st_size} bytes): tshark -q -z expert,note -z conv,tcp"
            )
            print(tshark_expert(kept))
        raise


def capture_node(node: Node, writer: PcapWriter) -> PcapLink:
    """Record a Node's overlay packets (in clear, as WireGuard delivers and takes them).

    Call before ``node.start()``. Node has no public hook for this yet, so this rewires its data
    plane: the data plane reads from and the stack sends to a PcapLink around the WireGuard link.
    """
    dataplane = node._dataplane
    link = PcapLink(dataplane.link, writer)
    dataplane.link = link
    node._stack.transmit = link.send
    return link


# --------------------------------------------------------------------------------------------------
# a Node peered with wireguard-go

NODE_V4, PEER_V4 = "100.64.0.1", "100.64.0.2"
NODE_V6, PEER_V6 = "fd7a:115c:a1e0::1", "fd7a:115c:a1e0::2"


def wireguard_peer(rig: NetnsRig) -> tuple[str, Any, VethLink]:
    """wireguard-go in a namespace, peered with a node whose wg-quick text is returned."""
    ns = rig.add_namespace("wg")
    link = rig.veth_to_root(ns)
    wg = rig.start_wireguard(ns, addresses=[f"{PEER_V4}/24", f"{PEER_V6}/64"], listen_port=51820)
    me = generate_keypair()
    wg.add_peer(me.public, [f"{NODE_V4}/32", f"{NODE_V6}/128"], endpoint=(link.a.ip, NODE_PORT))
    config = "\n".join(
        [
            "[Interface]",
            f"PrivateKey = {me.private}",
            f"ListenPort = {NODE_PORT}",
            f"Address = {NODE_V4}/32, {NODE_V6}/128",
            "",
            "[Peer]",
            f"PublicKey = {wg.public_key}",
            f"AllowedIPs = {PEER_V4}/32, {PEER_V6}/128",
            f"Endpoint = {link.b.ip}:51820",
        ]
    )
    return config + "\n", ns, link


# --------------------------------------------------------------------------------------------------
# the stack on a TUN device


class StackHost:
    """An embedmesh Netstack whose link is a TUN device; the kernel side sits in ``ns``.

    Synchronous part (the constructor): create the TUN device in the root namespace, move it into
    ``ns``, give the kernel's end ``kernel_addresses`` (with their prefixes: the connected routes
    lead to the stack) and ``mtu``, bring it up. Asynchronous part (``async with host.running()``):
    the stack, the data plane and the sockets. ``close()`` (or the ``with`` block) closes the
    descriptor, which deletes the device.
    """

    def __init__(
        self,
        rig: NetnsRig,
        ns: Namespace,
        *,
        stack_addresses: tuple[str, ...] = (STACK_V4, STACK_V6),
        kernel_addresses: tuple[str, ...] = (f"{KERNEL_V4}/24", f"{KERNEL_V6}/64"),
        mtu: int = 1500,
        tcp_config: TcpConfig | None = None,
        pcap_name: str | None = "tun",
        snaplen: int = 65535,
    ) -> None:
        self.rig = rig
        self.ns = ns
        self.stack_addresses = stack_addresses
        self.mtu = mtu
        self.tcp_config = tcp_config
        # Named like the rig's interfaces: em<kind><n><runid>.
        self.ifname = f"emt{rig._next()}{rig.run_id}"
        fd = open_tun(self.ifname)
        try:
            rig.root.ip("link", "set", "dev", self.ifname, "netns", ns.name or "")
            for cidr in kernel_addresses:
                extra = ["nodad"] if ip_interface(cidr).version == 6 else []
                ns.ip("addr", "add", cidr, "dev", self.ifname, *extra)
            ns.ip("link", "set", "dev", self.ifname, "mtu", str(mtu), "up")
        except BaseException:
            os.close(fd)
            raise
        self.tun = TunLink(fd, self.ifname)
        self.pcap_path: Path | None = None
        self.link: TunLink | PcapLink = self.tun
        if pcap_name is not None:
            self.pcap_path = overlay_pcap_path(rig, pcap_name)
            self.link = PcapLink(self.tun, PcapWriter(self.pcap_path, snaplen=snaplen))
        self.stack: Netstack | None = None
        self.dataplane: DataPlane | None = None
        self.sockets: SocketLayer | None = None

    def __enter__(self) -> StackHost:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.link.close()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[StackHost]:
        """Run the stack on the TUN device for the duration of the block."""
        self.stack = Netstack(
            [ip_address(a).packed for a in self.stack_addresses],
            self.link.send,
            mtu=self.mtu,
            tcp_config=self.tcp_config,
        )
        self.dataplane = DataPlane(self.stack, self.link)
        self.sockets = SocketLayer(self.stack, self.dataplane.kick)
        self.dataplane.after_activity.append(self.sockets.dispatch)
        async with anyio.create_task_group() as tg:
            await tg.start(self.dataplane.run)
            try:
                yield self
            finally:
                tg.cancel_scope.cancel()

    # Node's socket calls, so a test runs unchanged on a StackHost or a Node.
    def _layer(self) -> SocketLayer:
        if self.sockets is None:
            raise RuntimeError("the stack is not running: use 'async with host.running():'")
        return self.sockets

    def _local(self, address: str) -> tuple[bytes | None, int]:
        host, port = split_host_port(address)
        return (ip_address(host).packed if host else None), port

    async def listen(self, network: str, address: str, *, backlog: int = 128) -> TcpListener:
        local, port = self._local(address)
        return self._layer().listen_tcp(local, port, backlog)

    async def dial(self, network: str, address: str, *, timeout: float | None = 30.0) -> TcpStream:
        host, port = split_host_port(address)
        return await self._layer().dial_tcp(ip_address(host).packed, port, timeout)

    async def listen_packet(self, network: str, address: str) -> UdpSocket:
        local, port = self._local(address)
        return self._layer().bind_udp(local, port)

    def counters(self) -> dict[str, int]:
        """The stack's and the TUN device's counters, prefixed like Node.status()."""
        out: dict[str, int] = {f"tun_{k}": v for k, v in self.tun.counters.items()}
        if self.stack is not None:
            out.update({f"ip_{k}": v for k, v in self.stack.interface.counters.items()})
            out.update({f"tcp_{k}": v for k, v in self.stack.tcp.counters.items()})
            out.update({f"udp_{k}": v for k, v in self.stack.udp.counters.items()})
        return out


# --------------------------------------------------------------------------------------------------
# an HTTP/1.1 server for curl


def blob(size: int, seed: int) -> bytes:
    """The deterministic random bytes GET /bytes/<size>?seed=<seed> returns."""
    return random.Random(seed).randbytes(size)


async def _respond(stream: anyio.abc.ByteStream, status: str, body: bytes, close: bool) -> None:
    head = (
        f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\nContent-Type: application/octet-stream\r\n"
        f"X-Content-SHA256: {hashlib.sha256(body).hexdigest()}\r\n"
        + ("Connection: close\r\n" if close else "")
        + "\r\n"
    ).encode()
    if len(body) < 65536:
        await stream.send(head + body)
    else:
        await stream.send(head)
        await stream.send(body)


async def serve_http(stream: anyio.abc.ByteStream) -> None:
    """Serve HTTP/1.1 requests on one connection (keep-alive) until the client closes it.

    ``GET /bytes/<n>?seed=<s>`` answers :func:`blob` (n, s); ``POST``/``PUT`` of any path read
    ``Content-Length`` bytes (answering ``Expect: 100-continue``) and answer their SHA-256 in hex.
    """
    buffer = bytearray()
    while True:
        while b"\r\n\r\n" not in buffer:
            if len(buffer) > 65536:
                await _respond(stream, "431 Request Header Fields Too Large", b"", True)
                return
            try:
                buffer += await stream.receive()
            except EndOfStream:
                return
        head, _, rest = bytes(buffer).partition(b"\r\n\r\n")
        buffer = bytearray(rest)
        request_line, *lines = head.decode("latin-1").split("\r\n")
        method, target, _version = request_line.split(" ", 2)
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        close = headers.get("connection", "").lower() == "close"
        if method == "GET":
            m = re.fullmatch(r"/bytes/(\d+)(?:\?seed=(\d+))?", target)
            if not m:
                await _respond(stream, "404 Not Found", b"try /bytes/<n>?seed=<s>\n", close)
            else:
                await _respond(stream, "200 OK", blob(int(m.group(1)), int(m.group(2) or 0)), close)
        elif method in ("POST", "PUT"):
            if "content-length" not in headers:
                await _respond(stream, "411 Length Required", b"", True)
                return
            remaining = int(headers["content-length"])
            if headers.get("expect", "").lower() == "100-continue":
                await stream.send(b"HTTP/1.1 100 Continue\r\n\r\n")
            digest = hashlib.sha256()
            take = buffer[:remaining]
            digest.update(take)
            remaining -= len(take)
            buffer = buffer[len(take) :]
            while remaining > 0:
                try:
                    chunk = await stream.receive()
                except EndOfStream:
                    return
                if len(chunk) > remaining:
                    buffer += chunk[remaining:]
                    chunk = chunk[:remaining]
                digest.update(chunk)
                remaining -= len(chunk)
            await _respond(stream, "200 OK", (digest.hexdigest() + "\n").encode(), close)
        else:
            await _respond(stream, "405 Method Not Allowed", b"", True)
            return
        if close:
            return


async def serve_http_forever(listener: TcpListener, task_group: anyio.abc.TaskGroup) -> None:
    """Accept connections and serve each with :func:`serve_http` in ``task_group``."""
    await listener.serve(serve_http, task_group)


# --------------------------------------------------------------------------------------------------
# the kernel side: curl, socat, files


def url_host(address: str) -> str:
    return f"[{address}]" if ":" in address else address


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class CurlResult:
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    bytes_per_second: float


def curl(ns: Namespace, *args: str, timeout: float = 60.0) -> CurlResult:
    """Run curl in ``ns``; stdout gets the response body unless -o is given. The transfer rate
    (curl's own speed_download/speed_upload) is parsed from a last ``-w`` line."""
    marker = "\n@@curl %{time_total} %{speed_download} %{speed_upload}\n"
    started = time.monotonic()
    proc = ns.run(
        ["curl", "-sS", "--globoff", "--max-time", str(int(timeout)), "-w", marker, *args],
        check=False,
        timeout=timeout + 10,
    )
    seconds = time.monotonic() - started
    stdout, speed = proc.stdout, 0.0
    m = re.search(r"\n@@curl ([\d.]+) ([\d.]+) ([\d.]+)\n$", stdout)
    if m:
        stdout = stdout[: m.start()]
        seconds = float(m.group(1))
        speed = max(float(m.group(2)), float(m.group(3)))
    return CurlResult(proc.returncode, stdout, proc.stderr, seconds, speed)


def socat_server(
    ns: Namespace, port: int, version: int, *, send: Path | None = None, receive: Path | None = None
) -> Any:
    """Start a one-connection socat TCP server in ``ns``: it sends ``send`` (then closes) or writes
    what it receives into ``receive``. Returns the Popen (the rig kills it on close)."""
    listen = f"TCP{version}-LISTEN:{port},reuseaddr"
    if send is not None:
        argv = ["socat", "-u", f"OPEN:{send},rdonly", listen]
    elif receive is not None:
        argv = ["socat", "-u", listen, f"OPEN:{receive},creat,trunc,wronly"]
    else:
        raise ValueError("give send= or receive=")
    return ns.popen(argv, log_name=f"socat-{port}")


async def dial_when_listening(host: Any, address: str, timeout: float = 10.0) -> TcpStream:
    """Dial ``address`` from ``host`` (a StackHost or a Node), retrying while it is refused (a
    server process that has not bound its port yet answers RST)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            stream: TcpStream = await host.dial("tcp", address, timeout=timeout)
            return stream
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            await anyio.sleep(0.05)


async def wait_process(proc: Any, timeout: float = 30.0) -> int:
    """Wait for a Popen without blocking the event loop; returns its exit code."""
    returncode: int = await anyio.to_thread.run_sync(lambda: proc.wait(timeout))
    return returncode


async def send_all_then_eof(stream: TcpStream, data: bytes) -> None:
    """Send ``data``, half-close, and wait for the peer's FIN (it has everything by then)."""
    await stream.send(data)
    await stream.send_eof()
    with contextlib.suppress(EndOfStream):
        while True:
            await stream.receive()


async def receive_all(stream: TcpStream) -> bytes:
    out = bytearray()
    with contextlib.suppress(EndOfStream):
        while True:
            out += await stream.receive()
    return bytes(out)


def rate(nbytes: int, seconds: float) -> str:
    return (
        f"{nbytes / max(seconds, 1e-9) / 1e6:.1f} MB/s ({nbytes * 8 / max(seconds, 1e-9) / 1e6:.0f} Mbit/s)"
    )


# --------------------------------------------------------------------------------------------------
# transfers, each checked with SHA-256 and its rate printed


async def curl_get(ns: Namespace, stack_ip: str, size: int, seed: int, out: Path, label: str) -> None:
    url = f"http://{url_host(stack_ip)}:{HTTP_PORT}/bytes/{size}?seed={seed}"
    result = await anyio.to_thread.run_sync(lambda: curl(ns, "--fail", "-o", str(out), url))
    assert result.returncode == 0, f"curl GET {url}: exit {result.returncode}: {result.stderr}"
    assert out.stat().st_size == size
    assert sha256_file(out) == hashlib.sha256(blob(size, seed)).hexdigest(), (
        f"curl GET {url}: SHA-256 differs"
    )
    print(f"{label}: kernel curl GET {size} B from embedmesh: {rate(size, result.seconds)}")


async def curl_put(ns: Namespace, stack_ip: str, path: Path, method: str, label: str) -> None:
    url = f"http://{url_host(stack_ip)}:{HTTP_PORT}/upload"
    flag = ["-T", str(path)] if method == "PUT" else ["--data-binary", f"@{path}"]
    result = await anyio.to_thread.run_sync(lambda: curl(ns, "--fail", *flag, url))
    assert result.returncode == 0, f"curl {method} {url}: exit {result.returncode}: {result.stderr}"
    assert result.stdout.strip() == sha256_file(path), f"curl {method}: SHA-256 differs: {result.stdout!r}"
    size = path.stat().st_size
    print(f"{label}: kernel curl {method} {size} B to embedmesh: {rate(size, result.seconds)}")


def connection_summary(stream: TcpStream) -> str:
    """Loss-recovery figures of a finished connection, for the test log."""
    conn = stream.connection
    stats = conn.stats.as_dict()
    keys = (
        "segments_sent",
        "retransmits",
        "fast_recoveries",
        "rto_timeouts",
        "dsacks_received",
        "spurious_undos",
    )
    text = " ".join(f"{k}={stats[k]}" for k in keys if k in stats)
    return f"{text} cwnd={conn.cwnd} mss={conn.mss}"


async def socat_upload(
    host: Any, ns: Namespace, peer_ip: str, version: int, port: int, data: bytes, into: Path, label: str
) -> None:
    """embedmesh dials a socat server in the namespace and sends ``data``; socat writes it to a file."""
    server = socat_server(ns, port, version, receive=into)
    stream = await dial_when_listening(host, f"{url_host(peer_ip)}:{port}")
    started = time.monotonic()
    async with stream:
        await send_all_then_eof(stream, data)
    seconds = time.monotonic() - started
    assert await wait_process(server) == 0, Path(server.log_path).read_text()
    assert into.stat().st_size == len(data)
    assert sha256_file(into) == hashlib.sha256(data).hexdigest(), "socat received different bytes"
    print(f"{label}: embedmesh sends {len(data)} B to kernel socat: {rate(len(data), seconds)}")
    print(f"{label}:   sender {connection_summary(stream)}")


async def socat_download(
    host: Any, ns: Namespace, peer_ip: str, version: int, port: int, source: Path, label: str
) -> None:
    """embedmesh dials a socat server in the namespace that sends a file, and reads to EOF."""
    server = socat_server(ns, port, version, send=source)
    stream = await dial_when_listening(host, f"{url_host(peer_ip)}:{port}")
    started = time.monotonic()
    async with stream:
        data = await receive_all(stream)
    seconds = time.monotonic() - started
    assert await wait_process(server) == 0, Path(server.log_path).read_text()
    assert len(data) == source.stat().st_size
    assert hashlib.sha256(data).hexdigest() == sha256_file(source), (
        "embedmesh received different bytes from socat"
    )
    print(f"{label}: embedmesh receives {len(data)} B from kernel socat: {rate(len(data), seconds)}")

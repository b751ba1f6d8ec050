"""The whole data plane of two nodes in one process, no sockets: CPU µs per segment on each side.

Two WireGuard devices with their overlay stacks (interface, TCP) exchange a bulk TCP transfer through
memory, in batches the way the runtime moves them (``runtime/dataplane.py``: a batch of datagrams
from one read, the stack over the whole batch, then the batch's output). The sender's application
writes 64 KiB chunks whenever the send buffer has room; the receiver's application reads everything
after each batch. CPU time (``time.thread_time``) is charged to the side doing the work, so the two
figures are what each process of ``bench_throughput.py`` spends per segment in Python, without the
socket calls and the event loop.

    python benchmarks/bench_dataplane.py [--bytes 50000000] [--batch 64] [--runs 3] [--mtu 1280]
        [--no-batch-acks] [--profile]

Prints, per run and best of the runs: data segments, ACKs (and ACKs per 100 data segments), CPU µs per
data segment for the sender (segmentation, checksums, IPv4, encryption, and the ACKs it processes) and
for the receiver (decryption, parsing, checksum verification, TCP, the ACKs it builds), and the MB/s
that would follow with one core per side (limited by the slower side) and with both on one core.
``--profile`` runs one more transfer under cProfile and prints the top functions by own time.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import random
import time
from dataclasses import dataclass
from functools import partial

from embedmesh.netstack.stack import Netstack
from embedmesh.netstack.tcp.connection import TcpConnection
from embedmesh.wireguard import crypto
from embedmesh.wireguard.device import WireGuardDevice

A_EP = ("198.18.0.1", 51820)
B_EP = ("198.18.0.2", 51820)
A_IP = bytes([100, 64, 0, 1])
B_IP = bytes([100, 64, 0, 2])
PORT = 9000
CHUNK = 64 * 1024
_thread_time = time.thread_time


class Clock:
    """The virtual time both sides read (the runtime's link reads a real clock per packet sent)."""

    now = 0.0


@dataclass
class Side:
    """One node: a WireGuard device and its overlay stack, as the runtime's WireGuardLink wires them."""

    device: WireGuardDevice
    stack: Netstack
    endpoint: tuple[str, int]
    cpu: float = 0.0
    batch_acks: bool = True

    def deliver(
        self, datagrams: list[tuple[bytes, tuple[str, int]]], source: tuple[str, int], now: float
    ) -> None:
        """One batch: every datagram through the device and the stack, then the end of the batch."""
        receive_datagram = self.device.receive_datagram
        receive = self.stack.receive
        if self.batch_acks:
            self.stack.begin_batch()
        for data, _ in datagrams:
            packet = receive_datagram(data, source, now)
            if packet is not None:
                receive(packet, now)
        if self.batch_acks:
            self.stack.end_batch(now)


def make_pair(mtu: int, rng: random.Random) -> tuple[Side, Side]:
    sides = []
    for address, endpoint in ((A_IP, A_EP), (B_IP, B_EP)):
        device = WireGuardDevice(
            crypto.generate_private_key(rng.randbytes(32)), mtu=mtu, random_bytes=rng.randbytes, rng=rng
        )
        stack = Netstack([address], partial(_send, device), mtu=mtu, rng=rng)
        sides.append(Side(device, stack, endpoint))
    a, b = sides
    a.device.add_peer(b.device.public_key, allowed_ips=["100.64.0.2/32"], endpoint=B_EP)
    b.device.add_peer(a.device.public_key, allowed_ips=["100.64.0.1/32"], endpoint=A_EP)
    return a, b


def _send(device: WireGuardDevice, packet: bytes) -> None:
    device.send_packet(packet, Clock.now)


def transfer(total: int, batch: int, mtu: int, seed: int = 1, batch_acks: bool = True) -> dict[str, float]:
    rng = random.Random(seed)
    a, b = make_pair(mtu, rng)
    a.batch_acks = b.batch_acks = batch_acks
    now = 1.0
    Clock.now = now
    listener = b.stack.tcp.listen(None, PORT)
    client = a.stack.tcp.connect(A_IP, B_IP, PORT, now)
    server: TcpConnection | None = None

    def exchange(src: Side, dst: Side, charge: bool) -> int:
        """Move src's pending datagrams to dst in batches; return how many moved."""
        out = src.device.datagrams_to_send()
        for i in range(0, len(out), batch):
            start = _thread_time()
            dst.deliver(out[i : i + batch], src.endpoint, now)
            if charge:
                dst.cpu += _thread_time() - start
        return len(out)

    # Handshake and connection set-up, not timed.
    for _ in range(20):
        exchange(a, b, False)
        exchange(b, a, False)
        if server is None:
            server = listener.accept()
    assert server is not None and client.established
    a.stack.tcp.handle_timeout(now)
    b.stack.tcp.handle_timeout(now)
    a.device.datagrams_to_send()
    b.device.datagrams_to_send()

    chunk = memoryview(os.urandom(CHUNK))
    sent = received = 0
    data_segments = acks = 0
    start_a = a.cpu
    rounds = 0
    while received < total:
        rounds += 1
        now += 0.0002
        Clock.now = now
        # Sender application: 64 KiB writes while the buffer takes them (as embedmesh_peer.py does).
        start = _thread_time()
        while sent < total and client.writable:
            n = client.send(chunk[: min(CHUNK, total - sent)], now)
            sent += n
            if n == 0:
                break
        a.stack.tcp.handle_timeout(now)
        a.device.handle_timeout(now)
        a.cpu += _thread_time() - start
        data_segments += exchange(a, b, True)
        # Receiver application: read everything after the batch.
        start = _thread_time()
        while server.readable:
            received += len(server.receive(CHUNK, now))
        b.stack.tcp.handle_timeout(now)
        b.device.handle_timeout(now)
        b.cpu += _thread_time() - start
        acks += exchange(b, a, True)
        if rounds > 10_000_000:
            raise RuntimeError("transfer stalled")
    assert received == total
    return {
        "data_segments": data_segments,
        "acks": acks,
        "sender_us": (a.cpu - start_a) / data_segments * 1e6,
        "receiver_us": b.cpu / data_segments * 1e6,
        "bytes": total,
        "sender_s": a.cpu - start_a,
        "receiver_s": b.cpu,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bytes", type=int, default=50_000_000)
    parser.add_argument("--batch", type=int, default=64, help="datagrams per batch (one GRO read: up to 64)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--mtu", type=int, default=1280)
    parser.add_argument("--profile", action="store_true", help="one more run under cProfile")
    parser.add_argument(
        "--no-batch-acks", action="store_true", help="no TCP batch mode: an ACK per two segments"
    )
    args = parser.parse_args()
    best: dict[str, float] | None = None
    for run in range(args.runs):
        r = transfer(args.bytes, args.batch, args.mtu, seed=run + 1, batch_acks=not args.no_batch_acks)
        print(
            f"run {run + 1}: {r['data_segments']:.0f} data segments, {r['acks']:.0f} ACKs "
            f"({100 * r['acks'] / r['data_segments']:.1f} per 100), sender {r['sender_us']:.2f} µs/segment, "
            f"receiver {r['receiver_us']:.2f} µs/segment"
        )
        if best is None or r["sender_us"] + r["receiver_us"] < best["sender_us"] + best["receiver_us"]:
            best = r
    assert best is not None
    slower = max(best["sender_s"], best["receiver_s"])
    both = best["sender_s"] + best["receiver_s"]
    print(
        f"best: sender {best['sender_us']:.2f} µs/segment, receiver {best['receiver_us']:.2f} µs/segment, "
        f"ACKs per 100 segments {100 * best['acks'] / best['data_segments']:.1f}; "
        f"{best['bytes'] / slower / 1e6:.1f} MB/s with a core per side, {best['bytes'] / both / 1e6:.1f} MB/s on one core"
    )
    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        transfer(args.bytes // 2, args.batch, args.mtu, seed=99, batch_acks=not args.no_batch_acks)
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()

"""TCP on the simulated link, in virtual time: Python cost per segment, loss behaviour, memory.

    python benchmarks/bench_tcp_sim.py            # everything (about a minute)
    python benchmarks/bench_tcp_sim.py --quick    # smaller transfers, fewer seeds

1. Bulk transfer on a clean link: CPU µs of Python per segment (both ends plus the tiny sim:
   one build + checksum on the sender, one parse + processing on the receiver, ACKs counted as
   segments too) and MB/s of pure stack work, with and without receive-checksum verification.
2. 1 % random loss, 20 ms RTT, and 0.1 % loss, 100 ms RTT, each over a 100 Mbit/s bottleneck with a
   1-BDP drop-tail queue: goodput of NewReno and CUBIC over several seeds (the figures behind the
   default controller).
3. Memory per idle established connection, 10,000 of them (tracemalloc, both ends' objects counted
   for the side holding them).
"""

from __future__ import annotations

import os
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "tcp"))

from simlink import Impairment, SimLink, Transfer

from embedmesh.netstack.tcp import TcpConfig, TcpState


def bulk(size: int, verify: bool, runs: int) -> tuple[float, float, int]:
    best = float("inf")
    segments = 0
    for _ in range(runs):
        cfg = TcpConfig(verify_checksum=verify)
        link = SimLink(1, impairment=Impairment(delay=0.001), config_a=cfg, config_b=cfg)
        tr = Transfer(link, os.urandom(size))
        # CPU time of this process: the 2-core machine is shared, and wall clock swings with load.
        start = time.process_time()
        tr.run()
        wall = time.process_time() - start
        tr.check()
        fwd, back = link.stats
        segments = fwd.packets + back.packets
        best = min(best, wall)
    return best / segments * 1e6, size / best / 1e6, segments


def lossy(
    controller: str, size: int, seeds: list[int], *, rtt: float = 0.02, loss: float = 0.01
) -> list[float]:
    rates = []
    for seed in seeds:
        cfg = TcpConfig(congestion=controller)
        bdp = int(12.5e6 * rtt)
        imp = Impairment(delay=rtt / 2, loss=loss, bandwidth=12.5e6, queue_limit=bdp)
        link = SimLink(seed, impairment=imp, reverse=Impairment(delay=rtt / 2), config_a=cfg, config_b=cfg)
        tr = Transfer(link, os.urandom(size))
        tr.run()
        tr.check()
        assert tr.server.done_at is not None
        rates.append(size / tr.server.done_at / 1e6)
    return rates


def reordering(size: int) -> dict[str, int]:
    imp = Impairment(delay=0.01, reorder=0.03, reorder_delay=0.002, bandwidth=12.5e6)
    link = SimLink(21, impairment=imp)
    tr = Transfer(link, os.urandom(size))
    tr.run()
    tr.check()
    assert tr.client.conn is not None and tr.server.conn is not None
    return {
        "segments": tr.client.conn.stats.segments_sent,
        "retransmits": tr.client.conn.stats.retransmits,
        "spurious (duplicates at receiver)": tr.server.conn.stats.dup_segments_received,
        "reordered by the link": link.stats[0].reordered,
    }


def idle_memory(count: int) -> float:
    link = SimLink(2, impairment=Impairment(delay=0.0005))
    listener = link.b.listen(None, 80, count)
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    conns = []
    for _ in range(count):
        conns.append(link.a.connect(link.addr_a, link.addr_b, 80, link.now))
    link.run()
    accepted = []
    while (conn := listener.accept()) is not None:
        accepted.append(conn)
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    assert len(accepted) == count and all(c.state is TcpState.ESTABLISHED for c in conns)
    total = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    return total / (2 * count)


def main() -> None:
    quick = "--quick" in sys.argv
    size = 4_000_000 if quick else 20_000_000
    print("## bulk transfer, clean link (CPU time, both ends + sim)")
    for verify in (True, False):
        us, mbs, segs = bulk(size, verify, 1 if quick else 3)
        label = "verify checksums" if verify else "skip RX checksum"
        print(f"  {label:18}: {us:5.1f} µs/segment  {mbs:6.1f} MB/s  ({segs} segments)")
    print("## 1% loss, 20 ms RTT, 100 Mbit/s, 1-BDP queue: goodput MB/s")
    seeds = [1, 2, 3] if quick else [1, 2, 3, 4, 5, 6]
    loss_size = 4_000_000 if quick else 10_000_000
    for controller in ("newreno", "cubic"):
        rates = lossy(controller, loss_size, seeds)
        print(
            f"  {controller:8}: mean {statistics.mean(rates):5.2f}  min {min(rates):5.2f}  max {max(rates):5.2f}"
        )
    print("## 0.1% loss, 100 ms RTT, 100 Mbit/s, 1-BDP queue: goodput MB/s")
    for controller in ("newreno", "cubic"):
        rates = lossy(controller, loss_size, seeds, rtt=0.1, loss=0.001)
        print(
            f"  {controller:8}: mean {statistics.mean(rates):5.2f}  min {min(rates):5.2f}  max {max(rates):5.2f}"
        )
    print("## reordering 3% by 2 ms at 100 Mbit/s, no loss")
    print("  ", reordering(4_000_000))
    count = 2000 if quick else 10_000
    print(f"## memory per idle established connection ({count} connections)")
    print(f"  {idle_memory(count):.0f} bytes")


if __name__ == "__main__":
    main()

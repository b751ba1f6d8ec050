"""One regression test per known bug of other userspace stacks (research/tcpip.md §4).

The window-scale leak (smoltcp #518) and the final ACK without timestamps (gVisor #11536) live in
test_tcp_options.py; these are the ones that need traffic or many connections.
"""

from __future__ import annotations

import os
import random

from simlink import Impairment, SimLink, Transfer
from tcp_harness import REMOTE_ISS, Harness

from embedmesh.netstack.tcp import TcpConfig, TcpState
from embedmesh.wire.tcp import ACK, PSH, RST, SYN, build_tcp

R1 = REMOTE_ISS + 1


def test_challenge_ack_loop_is_bounded() -> None:
    """smoltcp #29: two stacks answering each other's unacceptable ACKs forever."""
    h = Harness(timestamps=False, sack=False, window_scaling=False)
    conn, synack = h.accept()
    una = synack.seq + 1
    replies = 0
    t = 1.0
    for _ in range(1000):  # a peer that answers each of our ACKs with an ACK of unsent data
        h.send(t, ACK, R1, una + 5000)
        replies += len(h.recv())
        t += 0.001
    assert replies <= 3  # one per 0.5 s over one second of virtual time
    for _ in range(1000):  # and in-window RSTs
        h.send(t, RST, R1 + 10)
        replies += len(h.recv())
        t += 0.001
    assert replies <= 6
    assert conn.state is TcpState.ESTABLISHED


def test_rate_limit_never_eats_acks_for_data() -> None:
    """smoltcp PR #1162: the challenge-ACK limit also swallowed ACKs for retransmitted data."""
    h = Harness(timestamps=False, sack=False, window_scaling=False)
    conn, synack = h.accept()
    una = synack.seq + 1
    h.send(1.0, SYN, R1 + 100)  # uses up the challenge ACK budget
    assert len(h.recv()) == 1
    h.send(1.0, ACK | PSH, R1, una, payload=b"x" * 100)
    h.tick(1.1)
    h.recv()
    # Our ACKs get lost; the peer retransmits the same data again and again, quickly.
    for i in range(20):
        h.send(1.2 + i * 0.01, ACK | PSH, R1, una, payload=b"x" * 100)
        ack = h.recv_one()
        assert ack.ack == R1 + 100
    assert conn.receive() == b"x" * 100


def test_challenge_acks_do_not_starve_data_on_a_lossy_link() -> None:
    link = SimLink(11, impairment=Impairment(delay=0.01, loss=0.05, duplicate=0.05))
    tr = Transfer(link, os.urandom(200_000), os.urandom(50_000))
    tr.run()
    tr.check()
    assert link.now < 30  # no crawl at one exchange per rate-limit interval


def test_no_spurious_rto_with_large_buffers() -> None:
    """smoltcp #949/#1018: the RTO was not restarted on ACKs; with big windows it fired spuriously."""
    imp = Impairment(delay=0.05, bandwidth=12.5e6)
    link = SimLink(5, impairment=imp)
    tr = Transfer(link, os.urandom(8_000_000))
    tr.run()
    tr.check()
    c = tr.client.conn
    assert c is not None
    assert c.stats.rto_timeouts == 0 and c.stats.retransmits == 0
    assert tr.server.done_at is not None and tr.server.done_at < 1.5  # 0.64 s of serialization, 100 ms RTT


def test_reordering_is_not_read_as_loss() -> None:
    """Tailscale #20893: with RACK off, reordering looked like loss (8 of 9 retransmits spurious)."""
    imp = Impairment(delay=0.01, jitter=0.0, reorder=0.03, reorder_delay=0.002, bandwidth=12.5e6)
    link = SimLink(21, impairment=imp)
    tr = Transfer(link, os.urandom(4_000_000))
    tr.run()
    tr.check()
    client, server = tr.client.conn, tr.server.conn
    assert client is not None and server is not None
    spurious = server.stats.dup_segments_received  # no loss on this link: every duplicate is spurious
    sent = client.stats.segments_sent
    assert spurious <= 0.005 * sent, (spurious, sent, client.stats.as_dict())
    assert client.stats.rto_timeouts == 0


def test_mss_black_hole_avoided() -> None:
    """A peer's MSS of 1460 over a 1280-byte overlay: segments must never exceed the MTU."""
    for ipv6 in (False, True):
        link = SimLink(3, impairment=Impairment(delay=0.005), mtu=1280, ipv6=ipv6)
        big = TcpConfig(mtu=1500)  # the far end believes its link is 1500 bytes
        link.b = type(link.b)(link._from_b, rng=random.Random(1), config=big)
        tr = Transfer(link, os.urandom(300_000), os.urandom(300_000))
        tr.run()
        tr.check()
        fwd, back = link.stats
        assert fwd.mtu_dropped == 0 and fwd.max_ip_size <= 1280
        # b advertised 1460/1440 but clamps its own sends to a's MSS (1240/1220): nothing dropped.
        assert back.mtu_dropped == 0 and back.max_ip_size <= 1280


def test_syn_flood_keeps_listener_bounded_and_usable() -> None:
    for cookies in (True, False):
        cfg = TcpConfig(syn_backlog=64, syn_cookies=cookies)
        link = SimLink(4, impairment=Impairment(delay=0.01), config_b=cfg)
        listener = link.b.listen(None, 80, 16)
        rng = random.Random(99)
        for i in range(10_000):
            src = bytes([198, 18, rng.randrange(256), rng.randrange(256)])
            syn = build_tcp(
                src, link.addr_b, rng.randrange(1024, 65536), 80, rng.getrandbits(32), 0, SYN, 65535, mss=1460
            )
            link.b.segment_received(src, link.addr_b, syn, i * 1e-5)
        assert listener.pending <= 64
        assert link.b.connection_count <= 64
        link._events.clear()  # SYN-ACKs to the spoofed sources go nowhere
        tr = Transfer(link, b"hello through the flood", b"ok", listener=listener)
        tr.run(until=30)
        assert bytes(tr.server.received) == b"hello through the flood"
        assert bytes(tr.client.received) == b"ok"


def test_time_wait_table_is_bounded() -> None:
    """lwIP/unikraft: TIME-WAIT pcbs piled up; here the table evicts its oldest entries."""
    cfg = TcpConfig(max_time_wait=100)
    link = SimLink(8, impairment=Impairment(delay=0.001), config_a=cfg, config_b=cfg)
    listener = link.b.listen(None, 80, 64)
    for _i in range(2000):
        conn = link.a.connect(link.addr_a, link.addr_b, 80, link.now)
        link.run(stop=lambda: listener.readable > 0)
        server = listener.accept()
        assert server is not None
        conn.close(now=link.now)  # the client closes first: it holds TIME-WAIT
        link.run(stop=lambda s=server: s.state is TcpState.CLOSE_WAIT)  # type: ignore[misc]
        server.close(now=link.now)
        link.run(stop=lambda s=server: s.state is TcpState.CLOSED)  # type: ignore[misc]
        assert conn.state is TcpState.TIME_WAIT or link.a.counters["time_wait_evicted"]
        assert link.a.time_wait_count <= 100
    assert link.a.connection_count <= 100 and link.b.connection_count == 0
    assert link.a.counters["time_wait_evicted"] == 1900

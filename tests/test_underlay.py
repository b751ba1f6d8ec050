"""The UDP underlay on loopback: GSO batches on send, GRO splitting on receive, and the fallbacks."""

from __future__ import annotations

import select

from embedmesh.runtime.underlay import UdpUnderlay


def _pair() -> tuple[UdpUnderlay, UdpUnderlay]:
    a, b = UdpUnderlay(), UdpUnderlay()
    a.open(0, "127.0.0.1")
    b.open(0, "127.0.0.1")
    return a, b


def _receive_all(u: UdpUnderlay, expected: int) -> list[tuple[bytes, tuple[str, int]]]:
    got: list[tuple[bytes, tuple[str, int]]] = []
    sock = u.sockets[0]
    while len(got) < expected:
        ready, _, _ = select.select([sock], [], [], 2.0)
        assert ready, f"only {len(got)} of {expected} datagrams arrived"
        got.extend(u.drain(sock))
    return got


def test_equal_size_runs_go_out_as_gso_batches_and_arrive_split_in_order() -> None:
    a, b = _pair()
    try:
        to_b = ("127.0.0.1", b.port)
        datagrams = [(bytes([i % 256]) * 1312, to_b) for i in range(100)] + [(b"short tail", to_b)]
        a.send(datagrams)
        got = _receive_all(b, len(datagrams))
        assert [d for d, _ in got] == [d for d, _ in datagrams]
        assert all(src == ("127.0.0.1", a.port) for _, src in got)
        if a.gso:
            # 100 x 1,312 bytes plus a short one: 49 fit in 64 KiB, so batches of 49, 49 and 2 + 1.
            assert a.counters["gso_batches"] == 3
    finally:
        a.close()
        b.close()


def test_mixed_sizes_and_endpoints_keep_their_order() -> None:
    a, b = _pair()
    c = UdpUnderlay()
    c.open(0, "127.0.0.1")
    try:
        to_b, to_c = ("127.0.0.1", b.port), ("127.0.0.1", c.port)
        sizes = [100, 100, 300, 300, 300, 50, 300, 300, 20, 20]
        datagrams = [(bytes([i]) * n, to_b if i % 3 else to_c) for i, n in enumerate(sizes)]
        a.send(datagrams)
        expect_b = [d for d, ep in datagrams if ep == to_b]
        expect_c = [d for d, ep in datagrams if ep == to_c]
        assert [d for d, _ in _receive_all(b, len(expect_b))] == expect_b
        assert [d for d, _ in _receive_all(c, len(expect_c))] == expect_c
    finally:
        a.close()
        b.close()
        c.close()


def test_without_gso_every_datagram_is_sent_alone() -> None:
    a, b = _pair()
    try:
        a.gso = False
        to_b = ("127.0.0.1", b.port)
        datagrams = [(bytes(1000), to_b)] * 20
        a.send(datagrams)
        assert len(_receive_all(b, 20)) == 20
        assert a.counters["gso_batches"] == 0
    finally:
        a.close()
        b.close()

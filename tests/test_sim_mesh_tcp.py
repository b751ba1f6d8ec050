"""TCP over WireGuard over a lossy simulated underlay, end to end on virtual time: the same cores
the real node runs, deterministic from the seed."""

from __future__ import annotations

import hashlib

from hypothesis import given, settings
from hypothesis import strategies as st

from embedmesh.sim.network import LinkConditions
from tests.wireguard.simpair import make_pair


def transfer(seed: int, link: LinkConditions, size: int, until: float = 300.0) -> tuple[bytes, bytes, float]:
    p = make_pair(seed, link)
    payload = hashlib.shake_256(seed.to_bytes(8, "big")).digest(size)
    listener = p.b.stack.tcp.listen(None, 80)
    client = p.a.stack.tcp.connect(bytes([100, 64, 0, 1]), bytes([100, 64, 0, 2]), 80, p.net.now)
    received = bytearray()
    server = None
    offset = 0
    t = 0.0
    while t < until:
        t += 0.05
        p.net.run(t)
        if server is None:
            server = listener.accept()
        if client.established and offset < len(payload):
            offset += client.send(memoryview(payload)[offset:], p.net.now)
            if offset == len(payload):
                client.shutdown(p.net.now)
        if server is not None:
            while chunk := server.receive(1 << 20, p.net.now):
                received += chunk
            if server.at_eof:
                break
        p.net.flush()
    return payload, bytes(received), t


def test_bulk_transfer_over_wireguard_clean_link() -> None:
    payload, received, _ = transfer(1, LinkConditions(delay=0.01), 2_000_000)
    assert received == payload


@settings(max_examples=8, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    loss=st.floats(0, 0.05),
    duplicate=st.floats(0, 0.05),
    reorder=st.floats(0, 0.1),
)
def test_transfer_survives_loss_duplication_and_reordering(
    seed: int, loss: float, duplicate: float, reorder: float
) -> None:
    link = LinkConditions(
        delay=0.02, jitter=0.005, loss=loss, duplicate=duplicate, reorder=reorder, reorder_delay=0.01
    )
    payload, received, t = transfer(seed, link, 300_000)
    assert received == payload, f"seed={seed} {link}: {len(received)}/{len(payload)} bytes by t={t:.1f}"

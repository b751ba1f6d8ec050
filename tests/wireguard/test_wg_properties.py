"""Hypothesis on the simulated underlay: handshakes converge under loss, duplication and reordering,
from either side or both at once, and data flows afterwards."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from embedmesh.sim.network import LinkConditions
from tests.wireguard.simpair import make_pair

conditions = st.builds(
    LinkConditions,
    delay=st.floats(0.0001, 0.2),
    jitter=st.floats(0.0, 0.05),
    loss=st.floats(0.0, 0.5),
    duplicate=st.floats(0.0, 0.3),
    reorder=st.floats(0.0, 0.5),
    reorder_delay=st.floats(0.001, 0.3),
)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), link=conditions, who=st.sampled_from(["a", "b", "both"]))
def test_handshake_converges_and_data_flows(seed: int, link: LinkConditions, who: str) -> None:
    p = make_pair(seed, link)
    senders = [p.a, p.b] if who == "both" else [p.a if who == "a" else p.b]
    # Impaired phase: a ping a second from each sender for a minute.
    seq = 0
    for second in range(60):
        for node in senders:
            seq += 1
            p.ping(node, seq)
        p.net.run(float(second + 1))
    # Then a clean network: the very next pings in both directions must get through quickly.
    p.net.conditions = LinkConditions(delay=link.delay)
    base = p.net.now
    p.ping(p.a, 60_001)
    p.ping(p.b, 60_002)
    p.net.run(base + REPAIR_WINDOW)
    assert 60_001 in p.replies(p.a), f"seed={seed} {link}"
    assert 60_002 in p.replies(p.b), f"seed={seed} {link}"
    for node, other in ((p.a, p.b), (p.b, p.a)):
        assert node.device.counters["drop_source_not_allowed"] == 0
        peer = node.device.peers[other.public_key]
        assert peer.current is not None


# Worst case: a handshake just failed and the retransmit timer (5 s + jitter) runs before the
# next initiation; the delivery itself takes at most a few RTTs.
REPAIR_WINDOW = 12.0


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), drops=st.lists(st.booleans(), min_size=1, max_size=12))
def test_duplicated_and_replayed_handshake_messages_never_break_a_session(
    seed: int, drops: list[bool]
) -> None:
    """Every handshake message is delivered twice (and some a third time much later)."""
    p = make_pair(seed, LinkConditions(duplicate=1.0, reorder=0.5, reorder_delay=2.0))
    for i, drop in enumerate(drops):
        p.ping(p.a if drop else p.b, i)
        p.net.run(p.net.now + 3.0)
    p.net.conditions = LinkConditions()
    p.ping(p.a, 999)
    p.net.run(p.net.now + REPAIR_WINDOW)
    assert 999 in p.replies(p.a), f"seed={seed}"

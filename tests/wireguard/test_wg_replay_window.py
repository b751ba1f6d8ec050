from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from embedmesh.wireguard.replay import REJECT_AFTER_MESSAGES, ReplayWindow


def test_in_order_and_duplicates() -> None:
    w = ReplayWindow(size=64)
    assert all(w.accept(i) for i in range(200))
    assert not w.accept(199)
    assert not w.accept(150)
    assert not w.would_accept(150)


def test_window_edges() -> None:
    w = ReplayWindow(size=64)
    assert w.accept(1000)
    # 1000 - 63 is the oldest counter still inside the window; 1000 - 64 is outside.
    assert w.would_accept(1000 - 63)
    assert w.accept(1000 - 63)
    assert not w.would_accept(1000 - 64)
    assert not w.accept(1000 - 64)
    # A jump further than the window forgets everything older.
    assert w.accept(5000)
    assert not w.accept(1000)
    assert w.accept(4999)


def test_reject_after_messages() -> None:
    w = ReplayWindow()
    assert not w.would_accept(REJECT_AFTER_MESSAGES)
    assert not w.accept(REJECT_AFTER_MESSAGES)
    assert w.accept(REJECT_AFTER_MESSAGES - 1)


def test_default_window_is_at_least_2048() -> None:
    w = ReplayWindow()
    assert w.accept(10_000)
    assert w.accept(10_000 - 2047)


@given(st.lists(st.integers(min_value=0, max_value=600), max_size=300), st.sampled_from([64, 128, 2048]))
def test_accepts_exactly_the_fresh_counters(counters: list[int], size: int) -> None:
    """Model: a counter is accepted iff never accepted before and within `size` of the newest."""
    w = ReplayWindow(size=size)
    seen: set[int] = set()
    greatest = -1
    for c in counters:
        expected = c not in seen and c > greatest - size
        assert w.would_accept(c) == expected
        assert w.accept(c) == expected
        if expected:
            seen.add(c)
            greatest = max(greatest, c)


@given(
    st.lists(
        st.one_of(st.integers(0, 3), st.integers(0, 80), st.integers(0, 5000)),
        max_size=400,
    ),
    st.sampled_from([8, 64, 72, 2048]),
)
def test_ring_tracks_jumps_wraps_and_old_counters(steps: list[int], size: int) -> None:
    """The same model with counters that mostly advance, by small and large jumps (the ring wraps and
    clears partial and whole bytes), plus replays of recent and old counters."""
    w = ReplayWindow(size=size)
    seen: set[int] = set()
    greatest = -1
    counter = 0
    for i, step in enumerate(steps):
        counter = counter + step if i % 3 else max(0, counter - step)
        expected = counter not in seen and counter > greatest - size
        assert w.would_accept(counter) == expected, (counter, greatest)
        assert w.accept(counter) == expected, (counter, greatest)
        if expected:
            seen.add(counter)
            greatest = max(greatest, counter)

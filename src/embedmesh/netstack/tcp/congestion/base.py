"""The interface between a connection's loss recovery and its congestion controller.

The connection decides *when* something happened (new data acknowledged, loss detected, timeout,
recovery over, a reduction found spurious); the controller only does the window arithmetic. All
windows are in bytes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

# Keeps the arithmetic sane on any input (gVisor #11632: cwnd overflow under CUBIC).
MAX_CWND = 1 << 30


def initial_window(mss: int) -> int:
    """RFC 6928: min(10*MSS, max(2*MSS, 14600))."""
    return min(10 * mss, max(2 * mss, 14600))


class CongestionController(ABC):
    """cwnd/ssthresh bookkeeping; subclasses implement the congestion-avoidance growth."""

    name: ClassVar[str] = ""

    def __init__(self, mss: int) -> None:
        self.mss = mss
        self.cwnd = initial_window(mss)
        self.ssthresh = MAX_CWND

    @property
    def in_slow_start(self) -> bool:
        return self.cwnd < self.ssthresh

    def set_mss(self, mss: int) -> None:
        """Called once the handshake fixed the segment size (before any data)."""
        self.mss = mss
        self.cwnd = initial_window(mss)

    def slow_start(self, acked: int) -> int:
        """RFC 5681 slow start with RFC 3465 byte counting (L = 2*SMSS); returns bytes left over."""
        cap = 2 * self.mss
        inc = acked if acked < cap else cap
        room = self.ssthresh - self.cwnd
        if inc > room:
            self.cwnd = self.ssthresh
            return acked - room
        self.cwnd += inc
        return 0

    @abstractmethod
    def on_ack(self, acked: int, now: float, rtt: float) -> None:
        """New data was cumulatively acknowledged outside recovery; grow the window."""

    @abstractmethod
    def on_congestion(self, now: float, flight: int) -> None:
        """Loss found by duplicate ACKs or SACK: set ssthresh and the window for recovery."""

    def on_recovery_end(self, now: float) -> None:
        """Fast recovery is over (RFC 6582 §3.2 step 3: deflate to ssthresh)."""
        self.cwnd = max(self.ssthresh, 2 * self.mss)

    @abstractmethod
    def on_timeout(self, now: float, flight: int) -> None:
        """The retransmission timer expired: collapse to the loss window (RFC 5681 §3.1)."""

    def snapshot(self) -> dict[str, Any]:
        """State to restore if the reduction turns out spurious."""
        return {name: getattr(self, name) for name in self._undo_fields()}

    def restore(self, state: dict[str, Any]) -> None:
        for name, value in state.items():
            setattr(self, name, value)

    def _undo_fields(self) -> tuple[str, ...]:
        return ("cwnd", "ssthresh")

"""Reno/NewReno window arithmetic (RFC 5681, RFC 6582); the recovery logic lives in the connection."""

from __future__ import annotations

from embedmesh.netstack.tcp.congestion.base import MAX_CWND, CongestionController


class NewReno(CongestionController):
    name = "newreno"

    def __init__(self, mss: int) -> None:
        super().__init__(mss)
        self._acked_in_ca = 0

    def on_ack(self, acked: int, now: float, rtt: float) -> None:
        if self.cwnd < self.ssthresh:
            acked = self.slow_start(acked)
            if not acked:
                return
        # Congestion avoidance by byte counting (RFC 5681 §3.1, RFC 3465): one SMSS per cwnd acked.
        self._acked_in_ca += acked
        if self._acked_in_ca >= self.cwnd:
            self._acked_in_ca -= self.cwnd
            if self.cwnd < MAX_CWND:
                self.cwnd += self.mss

    def on_congestion(self, now: float, flight: int) -> None:
        self.ssthresh = max(flight // 2, 2 * self.mss)
        self.cwnd = self.ssthresh
        self._acked_in_ca = 0

    def on_timeout(self, now: float, flight: int) -> None:
        self.ssthresh = max(flight // 2, 2 * self.mss)
        self.cwnd = self.mss
        self._acked_in_ca = 0

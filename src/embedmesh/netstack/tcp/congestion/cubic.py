"""CUBIC (RFC 9438) window arithmetic, with the Reno-friendly region and fast convergence."""

from __future__ import annotations

from embedmesh.netstack.tcp.congestion.base import MAX_CWND, CongestionController

_C = 0.4
_BETA = 0.7
_ALPHA = 3 * (1 - _BETA) / (1 + _BETA)  # RFC 9438 §4.3


class Cubic(CongestionController):
    name = "cubic"

    def __init__(self, mss: int) -> None:
        super().__init__(mss)
        self.w_max = 0.0  # segments
        self.k = 0.0
        self.epoch_start: float | None = None
        self.w_est = 0.0  # segments
        self.cwnd_epoch = 0.0

    def _undo_fields(self) -> tuple[str, ...]:
        return ("cwnd", "ssthresh", "w_max", "k", "epoch_start", "w_est", "cwnd_epoch")

    def on_ack(self, acked: int, now: float, rtt: float) -> None:
        if self.cwnd < self.ssthresh:
            acked = self.slow_start(acked)
            if not acked:
                return
        mss = self.mss
        cwnd_seg = self.cwnd / mss
        if self.epoch_start is None:
            self.epoch_start = now
            self.cwnd_epoch = cwnd_seg
            self.w_est = cwnd_seg
            if self.w_max <= cwnd_seg:
                # No previous loss above us (or after slow start): start at the plateau.
                self.k = 0.0
                self.w_max = cwnd_seg
            else:
                self.k = ((self.w_max - cwnd_seg) / _C) ** (1 / 3)
        segs = acked / mss
        # Reno-friendly estimate (RFC 9438 §4.3).
        self.w_est += _ALPHA * segs / cwnd_seg
        t = now - self.epoch_start + rtt
        target = _C * (t - self.k) ** 3 + self.w_max
        if target < cwnd_seg:
            target = cwnd_seg
        elif target > 1.5 * cwnd_seg:
            target = 1.5 * cwnd_seg
        if self.w_est > target:
            target = self.w_est
        inc = (target - cwnd_seg) / cwnd_seg * segs * mss
        new = self.cwnd + int(inc)
        if new > MAX_CWND:
            new = MAX_CWND
        self.cwnd = new

    def _reduce(self) -> None:
        cwnd_seg = self.cwnd / self.mss
        # Fast convergence (RFC 9438 §4.7).
        self.w_max = cwnd_seg * (1 + _BETA) / 2 if cwnd_seg < self.w_max else cwnd_seg
        self.ssthresh = max(int(self.cwnd * _BETA), 2 * self.mss)
        self.epoch_start = None

    def on_congestion(self, now: float, flight: int) -> None:
        self._reduce()
        self.cwnd = self.ssthresh

    def on_timeout(self, now: float, flight: int) -> None:
        self._reduce()
        self.cwnd = self.mss

"""Round-trip time estimation and the retransmission timeout (RFC 6298).

Karn's rule (no samples from retransmitted segments) is the caller's job: a connection either times one
segment that has not been retransmitted, or uses RFC 7323 timestamp echoes, which are unambiguous.
"""

from __future__ import annotations

_ALPHA = 0.125
_BETA = 0.25


class RttEstimator:
    """SRTT/RTTVAR/RTO with exponential backoff.

    ``min_rto`` defaults to 200 ms like Linux and gVisor rather than RFC 6298's conservative 1 s;
    ``max_rto`` bounds the backed-off value (RFC 6298 §2.5 allows a maximum of at least 60 s).
    """

    __slots__ = (
        "_rto",
        "backoffs",
        "granularity",
        "latest",
        "max_rto",
        "min_rto",
        "min_rtt",
        "rttvar",
        "srtt",
    )

    def __init__(
        self,
        initial_rto: float = 1.0,
        min_rto: float = 0.2,
        max_rto: float = 60.0,
        granularity: float = 0.001,
    ) -> None:
        self.min_rto = min_rto
        self.max_rto = max_rto
        self.granularity = granularity
        self.srtt: float | None = None
        self.rttvar = 0.0
        self.latest = 0.0
        self.min_rtt = float("inf")
        self._rto = initial_rto
        self.backoffs = 0

    @property
    def rto(self) -> float:
        """The current timeout, backoff included, clamped to ``[min_rto, max_rto]``."""
        value = self._rto * (1 << self.backoffs) if self.backoffs else self._rto
        return value if value < self.max_rto else self.max_rto

    @property
    def base_rto(self) -> float:
        """The timeout without backoff."""
        return self._rto

    def sample(self, rtt: float) -> None:
        """Fold in one measurement (RFC 6298 §2.2–2.4); a new sample also clears the backoff (§5.7)."""
        if rtt < 0.0:
            return
        self.latest = rtt
        if rtt < self.min_rtt:
            self.min_rtt = rtt
        srtt = self.srtt
        if srtt is None:
            srtt = rtt
            self.rttvar = rtt / 2
        else:
            delta = srtt - rtt
            self.rttvar = (1 - _BETA) * self.rttvar + _BETA * (delta if delta >= 0 else -delta)
            srtt = (1 - _ALPHA) * srtt + _ALPHA * rtt
        self.srtt = srtt
        var = 4 * self.rttvar
        rto = srtt + (var if var > self.granularity else self.granularity)
        if rto < self.min_rto:
            rto = self.min_rto
        elif rto > self.max_rto:
            rto = self.max_rto
        self._rto = rto
        self.backoffs = 0

    def backoff(self) -> None:
        """Double the timeout after it expired (RFC 6298 §5.5), up to ``max_rto``."""
        if self._rto * (1 << self.backoffs) < self.max_rto:
            self.backoffs += 1

    def reset_backoff(self) -> None:
        self.backoffs = 0

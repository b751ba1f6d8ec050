"""Selective acknowledgments (RFC 2018, RFC 2883 D-SACK) for both directions.

Receiver side: :func:`receiver_blocks` picks the blocks to advertise from the out-of-order queue, the
block holding the most recently received segment first (RFC 2018 §4), preceded by a D-SACK block when
the segment that triggered the ACK was a duplicate.

Sender side: :class:`SackScoreboard` remembers which bytes above ``snd_una`` the peer holds, in absolute
sequence numbers, as sorted disjoint ranges. The connection uses it for RFC 6675 loss recovery: the
holes below the highest SACKed byte are the candidates for retransmission, and the amount of data in
flight ("pipe") discounts what the peer already holds.
"""

from __future__ import annotations

from bisect import bisect_right

from embedmesh.netstack.tcp.buffers import ReceiveBuffer


def receiver_blocks(
    queue: ReceiveBuffer, recent: list[int], dsack: tuple[int, int] | None, limit: int = 4
) -> list[tuple[int, int]]:
    """SACK blocks (absolute sequence numbers) to send, most recent first, D-SACK block leading.

    ``recent`` lists the start sequence numbers of recently received out-of-order segments, newest
    first; stale ones (already delivered or merged) are pruned in place.
    """
    out: list[tuple[int, int]] = []
    if dsack is not None:
        out.append(dsack)
    if not queue.has_ooo:
        recent.clear()
        return out
    kept: list[int] = []
    for seq in recent:
        block = queue.block_containing(seq)
        if block is None:
            continue
        kept.append(seq)
        if block not in out:
            out.append(block)
            if len(out) >= limit:
                break
    recent[:] = kept[:limit]
    if len(out) < limit:
        for block in queue.ooo_blocks():
            if block not in out:
                out.append(block)
                if len(out) >= limit:
                    break
    return out


class SackScoreboard:
    """Ranges ``[left, right)`` above ``snd_una`` that the receiver reported holding."""

    __slots__ = ("_lefts", "_rights", "sacked_bytes")

    def __init__(self) -> None:
        self._lefts: list[int] = []
        self._rights: list[int] = []
        self.sacked_bytes = 0

    def __bool__(self) -> bool:
        return bool(self._lefts)

    @property
    def highest(self) -> int:
        """The right edge of the highest SACKed range (the "forward-most" byte, FACK); 0 when empty."""
        return self._rights[-1] if self._rights else 0

    def ranges(self) -> list[tuple[int, int]]:
        return list(zip(self._lefts, self._rights, strict=True))

    def clear(self) -> None:
        self._lefts.clear()
        self._rights.clear()
        self.sacked_bytes = 0

    def add(self, left: int, right: int) -> int:
        """Record ``[left, right)`` as held by the receiver; return how many bytes were new."""
        lefts = self._lefts
        rights = self._rights
        i = bisect_right(rights, left - 1)  # first range ending at or after left
        if i < len(lefts) and lefts[i] <= left and right <= rights[i]:
            return 0
        j = i
        old = 0
        while j < len(lefts) and lefts[j] <= right:
            old += rights[j] - lefts[j]
            j += 1
        if j > i:
            left = min(left, lefts[i])
            right = max(right, rights[j - 1])
        lefts[i:j] = [left]
        rights[i:j] = [right]
        new = (right - left) - old
        self.sacked_bytes += new
        return new

    def advance(self, snd_una: int) -> None:
        """Forget everything below the cumulative acknowledgment."""
        lefts = self._lefts
        rights = self._rights
        while lefts and lefts[0] < snd_una:
            if rights[0] <= snd_una:
                self.sacked_bytes -= rights[0] - lefts[0]
                del lefts[0]
                del rights[0]
            else:
                self.sacked_bytes -= snd_una - lefts[0]
                lefts[0] = snd_una
                break

    def is_sacked(self, seq: int) -> bool:
        i = bisect_right(self._lefts, seq) - 1
        return i >= 0 and seq < self._rights[i]

    def sacked_end(self, seq: int) -> int:
        """If ``seq`` lies in a SACKed range, that range's right edge; else ``seq`` itself."""
        i = bisect_right(self._lefts, seq) - 1
        if i >= 0 and seq < self._rights[i]:
            return self._rights[i]
        return seq

    def next_sacked(self, seq: int) -> int | None:
        """The left edge of the first SACKed range starting after ``seq``, if any."""
        i = bisect_right(self._lefts, seq)
        return self._lefts[i] if i < len(self._lefts) else None

    def next_hole(self, seq: int, limit: int) -> tuple[int, int] | None:
        """The first un-SACKed range ``[a, b)`` with ``seq <= a < limit``, clipped to ``limit``."""
        lefts = self._lefts
        rights = self._rights
        i = bisect_right(lefts, seq) - 1
        if i >= 0 and seq < rights[i]:
            seq = rights[i]
        if seq >= limit:
            return None
        k = bisect_right(lefts, seq)
        end = lefts[k] if k < len(lefts) else limit
        return seq, (end if end < limit else limit)

    def sacked_between(self, left: int, right: int) -> int:
        """How many bytes of ``[left, right)`` are SACKed."""
        total = 0
        for lo, hi in zip(self._lefts, self._rights, strict=True):
            if hi <= left:
                continue
            if lo >= right:
                break
            total += min(hi, right) - max(lo, left)
        return total

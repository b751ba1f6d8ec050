"""Sliding-window replay protection for transport counters (whitepaper §5.4.6, RFC 6479's idea).

A ring of ``size`` bits (a ``bytearray``): counter ``c`` within the window owns bit ``c % size``, set
once ``c`` was accepted. Advancing the window clears the bits of the counters it passes over (none for
the in-order case, the common one), so accepting a packet touches one byte. (A Python integer used as
a shifting bitmap costs about 0.9 µs per packet for an 8,192-bit window, as every shift and mask
allocates a new 1 KiB integer; this ring costs about 0.25 µs.)
"""

from __future__ import annotations

#: Counters this far behind the newest accepted one are rejected (the Linux kernel uses 2,048 minus
#: a word; wireguard-go 8,128). A larger window tolerates more reordering on multi-path underlays.
WINDOW_SIZE = 8192
#: REJECT_AFTER_MESSAGES (whitepaper §6.1): 2**64 - 2**13 - 1.
REJECT_AFTER_MESSAGES = (1 << 64) - (1 << 13) - 1


class ReplayWindow:
    """Accepts each counter at most once, and none older than the window."""

    __slots__ = ("_bits", "greatest", "size")

    def __init__(self, size: int = WINDOW_SIZE) -> None:
        if size <= 0 or size % 8:
            raise ValueError("the window size is a positive multiple of 8")
        self.size = size
        self.greatest = -1
        self._bits = bytearray(size >> 3)

    def would_accept(self, counter: int) -> bool:
        """Whether ``counter`` is fresh; checked before decrypting, so replays cost no cipher work."""
        if counter >= REJECT_AFTER_MESSAGES:
            return False
        behind = self.greatest - counter
        if behind < 0:
            return True
        if behind >= self.size:
            return False
        slot = counter % self.size
        return not (self._bits[slot >> 3] >> (slot & 7)) & 1

    def accept(self, counter: int) -> bool:
        """Record ``counter`` after its packet authenticated; False if it was a replay after all."""
        if counter >= REJECT_AFTER_MESSAGES:
            return False
        size = self.size
        bits = self._bits
        greatest = self.greatest
        behind = greatest - counter
        if behind < 0:
            if behind != -1:
                # The counters between the old and the new newest were never seen: their slots
                # still hold flags of counters that have now left the window.
                self._clear(greatest + 1, counter)
            slot = counter % size
            bits[slot >> 3] |= 1 << (slot & 7)
            self.greatest = counter
            return True
        if behind >= size:
            return False
        slot = counter % size
        index = slot >> 3
        byte = bits[index]
        bit = 1 << (slot & 7)
        if byte & bit:
            return False
        bits[index] = byte | bit
        return True

    def _clear(self, start: int, end: int) -> None:
        """Clear the slots of counters ``start`` up to (not including) ``end``."""
        size = self.size
        bits = self._bits
        if end - start >= size:
            bits[:] = bytes(len(bits))
            return
        first = start % size
        last = first + (end - start)
        ranges = ((first, last),) if last <= size else ((first, size), (0, last - size))
        for lo, hi in ranges:
            while lo < hi and lo & 7:
                bits[lo >> 3] &= ~(1 << (lo & 7)) & 0xFF
                lo += 1
            full_end = hi & ~7
            if lo < full_end:
                bits[lo >> 3 : full_end >> 3] = bytes((full_end - lo) >> 3)
                lo = full_end
            while lo < hi:
                bits[lo >> 3] &= ~(1 << (lo & 7)) & 0xFF
                lo += 1

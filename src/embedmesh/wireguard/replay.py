"""Sliding-window replay protection for transport counters (whitepaper §5.4.6, RFC 6479's idea).

Bit ``i`` of :attr:`ReplayWindow.bitmap` records whether counter ``greatest - i`` was accepted. A
Python integer is the bitmap: advancing the window is one shift and one mask in C, which for the
in-order case costs about as much as the ring-of-words layout that C implementations use.
"""

from __future__ import annotations

#: Counters this far behind the newest accepted one are rejected (the Linux kernel uses 2,048 minus
#: a word; wireguard-go 8,128). A larger window tolerates more reordering on multi-path underlays.
WINDOW_SIZE = 8192
#: REJECT_AFTER_MESSAGES (whitepaper §6.1): 2**64 - 2**13 - 1.
REJECT_AFTER_MESSAGES = (1 << 64) - (1 << 13) - 1


class ReplayWindow:
    """Accepts each counter at most once, and none older than the window."""

    __slots__ = ("bitmap", "greatest", "mask", "size")

    def __init__(self, size: int = WINDOW_SIZE) -> None:
        self.size = size
        self.greatest = -1
        self.bitmap = 0
        self.mask = (1 << size) - 1

    def would_accept(self, counter: int) -> bool:
        """Whether ``counter`` is fresh; checked before decrypting, so replays cost no cipher work."""
        if counter >= REJECT_AFTER_MESSAGES:
            return False
        behind = self.greatest - counter
        if behind < 0:
            return True
        if behind >= self.size:
            return False
        return not (self.bitmap >> behind) & 1

    def accept(self, counter: int) -> bool:
        """Record ``counter`` after its packet authenticated; False if it was a replay after all."""
        if counter >= REJECT_AFTER_MESSAGES:
            return False
        behind = self.greatest - counter
        if behind < 0:
            ahead = -behind
            if ahead >= self.size:
                self.bitmap = 1
            else:
                self.bitmap = ((self.bitmap << ahead) | 1) & self.mask
            self.greatest = counter
            return True
        if behind >= self.size:
            return False
        bit = 1 << behind
        if self.bitmap & bit:
            return False
        self.bitmap |= bit
        return True

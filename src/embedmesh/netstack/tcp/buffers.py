"""Bounded send and receive buffers.

Both are a ``bytearray`` used as a FIFO: appends go to the end and consumed bytes are deleted from the
front, which CPython implements by moving the array's start pointer (amortized O(1), no copy of the
remainder), so neither side copies more than once per byte. The receive side also holds the
out-of-order blocks (absolute sequence numbers, merged on insertion); they only ever lie inside the
advertised window, and their count is capped too, so a peer sending tiny scattered segments cannot make
the queue grow beyond ``max_blocks``.
"""

from __future__ import annotations

from bisect import bisect_right

Buffer = bytes | bytearray | memoryview


class SendBuffer:
    """Bytes the application queued and the peer has not acknowledged yet."""

    __slots__ = ("_buf", "capacity")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._buf = bytearray()

    def __len__(self) -> int:
        return len(self._buf)

    @property
    def free(self) -> int:
        return self.capacity - len(self._buf)

    def write(self, data: Buffer) -> int:
        """Append as much of ``data`` as fits; return the number of bytes taken."""
        room = self.capacity - len(self._buf)
        n = len(data)
        if n > room:
            n = room if room > 0 else 0
            if n:
                with memoryview(data) as view:
                    self._buf += view[:n]
            return n
        self._buf += data
        return n

    def peek(self, offset: int, size: int) -> bytearray:
        """A copy of ``size`` bytes starting ``offset`` bytes after the oldest unacknowledged byte."""
        return self._buf[offset : offset + size]

    def consume(self, n: int) -> None:
        """Drop the ``n`` oldest bytes (they were acknowledged)."""
        if n >= len(self._buf):
            self._buf = bytearray()
        else:
            del self._buf[:n]

    def release(self) -> None:
        """Free the memory (the connection is gone)."""
        self._buf = bytearray()


class ReceiveBuffer:
    """In-order bytes waiting for the application, plus the out-of-order blocks behind a hole."""

    __slots__ = ("_buf", "_ooo_data", "_ooo_ends", "_ooo_starts", "capacity", "max_blocks", "ooo_bytes")

    def __init__(self, capacity: int, max_blocks: int = 256) -> None:
        self.capacity = capacity
        self.max_blocks = max_blocks
        self._buf = bytearray()
        # Parallel sorted lists: block i covers [starts[i], ends[i]) and holds data[i].
        self._ooo_starts: list[int] = []
        self._ooo_ends: list[int] = []
        self._ooo_data: list[bytearray] = []
        self.ooo_bytes = 0

    def __len__(self) -> int:
        return len(self._buf)

    @property
    def free(self) -> int:
        return self.capacity - len(self._buf)

    def append(self, data: Buffer) -> None:
        self._buf += data

    def read(self, max_bytes: int) -> bytes:
        buf = self._buf
        if max_bytes >= len(buf):
            out = bytes(buf)
            self._buf = bytearray()
            return out
        out = bytes(buf[:max_bytes])
        del buf[:max_bytes]
        return out

    def release(self) -> None:
        self._buf = bytearray()
        self._ooo_starts = []
        self._ooo_ends = []
        self._ooo_data = []
        self.ooo_bytes = 0

    # -- out-of-order queue --------------------------------------------------------------------------

    @property
    def has_ooo(self) -> bool:
        return bool(self._ooo_starts)

    @property
    def ooo_count(self) -> int:
        return len(self._ooo_starts)

    def ooo_blocks(self) -> list[tuple[int, int]]:
        return list(zip(self._ooo_starts, self._ooo_ends, strict=True))

    def block_containing(self, seq: int) -> tuple[int, int] | None:
        i = bisect_right(self._ooo_starts, seq) - 1
        if i >= 0 and seq < self._ooo_ends[i]:
            return self._ooo_starts[i], self._ooo_ends[i]
        return None

    def insert(self, start: int, data: Buffer) -> tuple[int, int] | None:
        """Queue ``data`` that starts at absolute sequence ``start`` (beyond the next expected byte).

        Returns the part that was already queued, as ``(left, right)``, if the whole segment was a
        duplicate (the receiver reports it as a D-SACK, RFC 2883), else ``None``. Bytes already held win
        over the new copy. A segment that would need a block beyond ``max_blocks`` is dropped.
        """
        end = start + len(data)
        starts = self._ooo_starts
        ends = self._ooo_ends
        blocks = self._ooo_data
        # First block that ends at or after start (may touch or overlap).
        i = bisect_right(ends, start - 1)
        if i < len(starts) and starts[i] <= start and end <= ends[i]:
            return start, end
        if i == len(starts) or end < starts[i]:
            # No overlap or contact with any block: a new one.
            if len(starts) >= self.max_blocks:
                return None
            starts.insert(i, start)
            ends.insert(i, end)
            blocks.insert(i, bytearray(data))
            self.ooo_bytes += end - start
            return None
        # Merge [start, end) with blocks i..j-1, which it overlaps or touches.
        j = i
        while j < len(starts) and starts[j] <= end:
            j += 1
        new_start = min(start, starts[i])
        new_end = max(end, ends[j - 1])
        view = memoryview(data)
        merged = bytearray()
        if start < starts[i]:
            merged += view[: starts[i] - start]
        cursor = starts[i]
        old = 0
        for k in range(i, j):
            if starts[k] > cursor:
                merged += view[cursor - start : starts[k] - start]
            merged += blocks[k]
            old += ends[k] - starts[k]
            cursor = ends[k]
        if end > cursor:
            merged += view[cursor - start :]
        view.release()
        starts[i:j] = [new_start]
        ends[i:j] = [new_end]
        blocks[i:j] = [merged]
        self.ooo_bytes += (new_end - new_start) - old
        return None

    def pull(self, rcv_nxt: int) -> int:
        """Move queued blocks that now start at or before ``rcv_nxt`` into the in-order buffer.

        Returns the new ``rcv_nxt``.
        """
        starts = self._ooo_starts
        while starts and starts[0] <= rcv_nxt:
            start = starts.pop(0)
            end = self._ooo_ends.pop(0)
            data = self._ooo_data.pop(0)
            self.ooo_bytes -= end - start
            if end > rcv_nxt:
                if start == rcv_nxt:
                    self._buf += data
                else:
                    with memoryview(data) as view:
                        self._buf += view[rcv_nxt - start :]
                rcv_nxt = end
        return rcv_nxt

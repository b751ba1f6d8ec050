"""Bounded send and receive buffers.

Each byte is copied into a buffer once and out of it once, whatever the traffic does:

- :class:`SendBuffer` is a ring (a ``bytearray`` written and read by slice assignment and slicing,
  which never resizes it): consuming acknowledged bytes moves an index. A ``bytearray`` FIFO (append
  at the end, ``del`` at the front) looks O(1) but is not: CPython re-copies everything it holds
  whenever it grows with a consumed prefix or shrinks below half its allocation, which cost a bulk
  sender about 8 % of its time (py-spy, ``benchmarks/results.md``). The ring grows by doubling up to
  the capacity and is dropped when it empties, so an idle connection holds no memory.
- :class:`ReceiveBuffer` keeps in-order data as the chunks it arrived in: a segment's payload that is
  a view of an immutable ``bytes`` packet (what the IP layer hands over) is kept without a copy, and
  :meth:`ReceiveBuffer.read` joins chunks into the bytes the application gets. The receive side also
  holds the out-of-order blocks (absolute sequence numbers, merged on insertion); they only ever lie
  inside the advertised window, and their count is capped too, so a peer sending tiny scattered
  segments cannot make the queue grow beyond ``max_blocks``.
"""

from __future__ import annotations

from bisect import bisect_right

Buffer = bytes | bytearray | memoryview

#: The first ring a send buffer allocates (it doubles from there up to the capacity).
_MIN_RING = 16 * 1024


class SendBuffer:
    """Bytes the application queued and the peer has not acknowledged yet (a ring, see the module)."""

    __slots__ = ("_head", "_ring", "_size", "capacity")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._ring = bytearray()
        self._head = 0  # ring index of the oldest unacknowledged byte
        self._size = 0

    def __len__(self) -> int:
        return self._size

    @property
    def free(self) -> int:
        return self.capacity - self._size

    def write(self, data: Buffer) -> int:
        """Append as much of ``data`` as fits; return the number of bytes taken."""
        size = self._size
        n = len(data)
        room = self.capacity - size
        if n > room:
            n = room if room > 0 else 0
        if not n:
            return 0
        ring = self._ring
        cap = len(ring)
        if size + n > cap:
            ring = self._grow(size + n)
            cap = len(ring)
        tail = self._head + size
        if tail >= cap:
            tail -= cap
        with memoryview(data) as view:
            first = cap - tail
            if n <= first:
                ring[tail : tail + n] = view[:n] if n < len(view) else view
            else:
                ring[tail:] = view[:first]
                ring[: n - first] = view[first:n]
        self._size = size + n
        return n

    def _grow(self, need: int) -> bytearray:
        cap = len(self._ring)
        new_cap = cap * 2 if cap else _MIN_RING
        while new_cap < need:
            new_cap *= 2
        if new_cap > self.capacity:
            new_cap = max(self.capacity, need)
        ring = bytearray(new_cap)
        size = self._size
        if size:
            ring[:size] = self.peek(0, size)
        self._ring = ring
        self._head = 0
        return ring

    def peek(self, offset: int, size: int) -> bytes | bytearray:
        """A copy of ``size`` bytes (fewer if fewer are held) starting ``offset`` bytes after the oldest
        unacknowledged byte."""
        if offset + size > self._size:
            size = self._size - offset if offset < self._size else 0
        ring = self._ring
        cap = len(ring)
        start = self._head + offset
        if start >= cap:
            start -= cap
        end = start + size
        if end <= cap:
            return ring[start:end]
        return ring[start:] + ring[: end - cap]

    def consume(self, n: int) -> None:
        """Drop the ``n`` oldest bytes (they were acknowledged)."""
        if n >= self._size:
            self.release()
            return
        head = self._head + n
        cap = len(self._ring)
        self._head = head - cap if head >= cap else head
        self._size -= n

    def release(self) -> None:
        """Free the memory (everything was acknowledged, or the connection is gone)."""
        self._ring = bytearray()
        self._head = 0
        self._size = 0


class ReceiveBuffer:
    """In-order bytes waiting for the application, plus the out-of-order blocks behind a hole."""

    __slots__ = (
        "_chunks",
        "_head",
        "_ooo_data",
        "_ooo_ends",
        "_ooo_starts",
        "_size",
        "capacity",
        "max_blocks",
        "ooo_bytes",
    )

    def __init__(self, capacity: int, max_blocks: int = 256) -> None:
        self.capacity = capacity
        self.max_blocks = max_blocks
        # In-order chunks from index _head on (a list, not a deque: an idle connection's empty
        # list costs 56 bytes, an empty deque over 600).
        self._chunks: list[Buffer] = []
        self._head = 0
        self._size = 0
        # Parallel sorted lists: block i covers [starts[i], ends[i]) and holds data[i].
        self._ooo_starts: list[int] = []
        self._ooo_ends: list[int] = []
        self._ooo_data: list[bytearray] = []
        self.ooo_bytes = 0

    def __len__(self) -> int:
        return self._size

    @property
    def free(self) -> int:
        return self.capacity - self._size

    def append(self, data: Buffer) -> None:
        """Queue in-order bytes. A view of a ``bytes`` object is kept as it is (it cannot change)."""
        if data.__class__ is memoryview:
            if data.obj.__class__ is not bytes:
                data = bytes(data)
        elif data.__class__ is not bytes:
            data = bytes(data)
        if data:
            self._chunks.append(data)
            self._size += len(data)

    def read(self, max_bytes: int) -> bytes:
        chunks = self._chunks
        head = self._head
        size = self._size
        if max_bytes >= size:
            if len(chunks) - head == 1:
                only = chunks[head]
                out = only if only.__class__ is bytes else bytes(only)
            else:
                out = b"".join(chunks[head:] if head else chunks)
            self._chunks = []
            self._head = 0
            self._size = 0
            return out
        parts: list[Buffer] = []
        taken = 0
        while taken < max_bytes:
            chunk = chunks[head]
            room = max_bytes - taken
            if len(chunk) > room:
                view = chunk if chunk.__class__ is memoryview else memoryview(chunk)
                parts.append(view[:room])
                chunks[head] = view[room:]
                taken = max_bytes
            else:
                parts.append(chunk)
                taken += len(chunk)
                head += 1
        if head > 64 and 2 * head > len(chunks):
            del chunks[:head]
            head = 0
        self._head = head
        self._size = size - taken
        return b"".join(parts)

    def release(self) -> None:
        self._chunks = []
        self._head = 0
        self._size = 0
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
                # The block is ours alone (insert copied it): queue it, or its tail, without a copy.
                chunk = data if start == rcv_nxt else memoryview(data)[rcv_nxt - start :]
                self._chunks.append(chunk)
                self._size += len(chunk)
                rcv_nxt = end
        return rcv_nxt

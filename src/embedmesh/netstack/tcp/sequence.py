"""32-bit sequence-number arithmetic (RFC 9293 §3.4) and unwrapping to absolute numbers.

On the wire, sequence numbers are compared modulo 2**32 (``seq_lt``, ``seq_diff``). Inside a connection
every sequence number is kept *unwrapped*: an unbounded Python int that starts at the ISN and only
grows, so comparisons are plain ``<`` and no arithmetic anywhere can wrap. :func:`unwrap` turns a
32-bit field from a segment into the absolute number closest to a reference the connection already
knows (``snd_una`` for acknowledgments, ``rcv_nxt`` for sequence numbers); anything within 2**31 of the
reference lands on the right side, which is far more than any window (at most 2**30, RFC 7323 §2.3).

The connection's per-segment paths inline these expressions (see the note in ``connection.py``):
a Python call there costs measurably; the rest of the stack calls them.
"""

from __future__ import annotations

MASK = 0xFFFFFFFF
HALF = 0x80000000


def seq_lt(a: int, b: int) -> bool:
    """``a`` precedes ``b`` modulo 2**32."""
    return ((a - b) & MASK) >= HALF


def seq_diff(a: int, b: int) -> int:
    """The signed distance ``a - b`` modulo 2**32, in ``[-2**31, 2**31)``."""
    return ((a - b + HALF) & MASK) - HALF


def unwrap(wire: int, reference: int) -> int:
    """The absolute sequence number whose low 32 bits are ``wire`` and that is closest to ``reference``."""
    return reference + (((wire - reference + HALF) & MASK) - HALF)

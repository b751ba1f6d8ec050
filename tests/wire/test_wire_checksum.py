"""The fast Internet checksum against the plain RFC 1071 definition, on every shape of input.

:func:`ones_sum` reads the buffer as integers (in two halves from ``SPLIT_FROM`` bytes on) and reduces
modulo 0xFFFF; these properties pin it to the word-by-word end-around-carry sum, including the corner
cases of that shortcut: odd lengths (the pad byte), all-zero buffers (0, not 0xFFFF), nonzero sums that
are multiples of 0xFFFF (0xFFFF, not 0), large ``initial`` values, and buffers that are views.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from embedmesh.wire.checksum import SPLIT_FROM, checksum, ones_sum


def rfc1071_ones_sum(data: bytes, initial: int = 0) -> int:
    """RFC 1071 §4.1 done the obvious way: 16-bit big-endian words, end-around carry, no complement."""
    if len(data) % 2:
        data += b"\x00"
    total = initial
    for i in range(0, len(data), 2):
        total += data[i] << 8 | data[i + 1]
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


sizes = st.one_of(
    st.integers(0, 64),
    st.integers(SPLIT_FROM - 4, SPLIT_FROM + 4),
    st.integers(SPLIT_FROM, 2000),
    st.sampled_from([1228, 1240, 1259, 1260, 1280, 1380, 1400, 9000, 65515]),
)


@st.composite
def buffers(draw: st.DrawFn) -> bytes:
    size = draw(sizes)
    kind = draw(st.sampled_from(["random", "zeros", "ones", "sparse"]))
    if kind == "zeros":
        return bytes(size)
    if kind == "ones":
        return b"\xff" * size
    if kind == "sparse":
        data = bytearray(size)
        for index in draw(st.lists(st.integers(0, max(size - 1, 0)), max_size=4)) if size else []:
            data[index] = draw(st.integers(0, 255))
        return bytes(data)
    return draw(st.binary(min_size=size, max_size=size))


initials = st.one_of(st.just(0), st.integers(0, 0xFFFF), st.integers(0, 1 << 40))


@given(buffers(), initials)
def test_ones_sum_is_rfc1071(data: bytes, initial: int) -> None:
    expected = rfc1071_ones_sum(data, initial)
    assert ones_sum(data, initial) == expected
    assert ones_sum(bytearray(data), initial) == expected
    assert ones_sum(memoryview(b"\x01\x02\x03" + data + b"\x04")[3:-1], initial) == expected
    assert checksum(data, initial) == ~expected & 0xFFFF


@given(buffers())
def test_multiples_of_0xffff_are_negative_zero(data: bytes) -> None:
    # Append the word that makes the sum a multiple of 0xFFFF: one's complement says 0xFFFF unless
    # every byte is zero.
    if len(data) % 2:
        data += b"\x00"
    total = rfc1071_ones_sum(data)
    completed = data + (~total & 0xFFFF).to_bytes(2, "big")
    expected = 0 if not any(completed) else 0xFFFF
    assert ones_sum(completed) == expected == rfc1071_ones_sum(completed)


def test_edge_values() -> None:
    assert ones_sum(b"") == 0
    assert ones_sum(b"", 5) == 5
    assert ones_sum(b"", 0xFFFF) == 0xFFFF
    assert ones_sum(bytes(SPLIT_FROM)) == 0
    assert ones_sum(b"\xff\xff" * SPLIT_FROM) == 0xFFFF
    assert ones_sum(b"\x01") == 0x0100
    assert ones_sum(b"\x00" * (SPLIT_FROM + 1) + b"\x01") == 0x0001
    assert ones_sum(b"\x00" * SPLIT_FROM + b"\x01") == 0x0100

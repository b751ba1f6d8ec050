"""Map stream framing and zstd: Go's frames decode, ours are Go-shaped, limits hold."""

from __future__ import annotations

import base64
import hashlib
import json
import struct
from pathlib import Path

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from embedmesh.errors import ParseError
from embedmesh.tailscale import mapframe as mf
from tests.tailscale.make_vectors import map_bodies

VECTORS = json.loads((Path(__file__).resolve().parent / "vectors" / "mapframe.json").read_text())


def test_go_frames_decode_to_the_bodies() -> None:
    bodies = map_bodies()
    assert len(bodies) == len(VECTORS["bodies"])
    for body, case in zip(bodies, VECTORS["bodies"], strict=True):
        assert hashlib.sha256(body).hexdigest() == case["body_sha256"]
        for key in ("go_default", "go_fastest"):
            frame = base64.b64decode(case[key])
            assert mf.decompress(frame) == body
            reader = mf.MapStreamReader()
            assert reader.receive_data(struct.pack("<I", len(frame)) + frame) == [body]
        assert case["go_decoded_python_frame"], "Go could not decode our frame when the vectors were made"


def test_our_frames_are_shaped_like_gos() -> None:
    """Go's zstdframe writes one single-segment frame with its content size and a checksum."""
    for body in map_bodies():
        wire = mf.MapFrameEncoder().encode(body)
        (length,) = struct.unpack_from("<I", wire)
        frame = wire[4:]
        assert length == len(frame)
        params = zstandard.get_frame_parameters(frame)
        assert params.content_size == len(body) and params.has_checksum
        assert mf.decompress(frame) == body
    assert mf.MapFrameEncoder(compress=False).encode(mf.KEEPALIVE_JSON) == b"\x12\x00\x00\x00" + mf.KEEPALIVE_JSON


@pytest.mark.parametrize("case", VECTORS["hostile"], ids=lambda c: c["name"])
def test_hostile_zstd_gets_gos_verdict(case: dict[str, object]) -> None:
    data = base64.b64decode(str(case["input"]))
    if case["go_ok"]:
        mf.decompress(data)
    else:
        with pytest.raises(mf.MapFrameError):
            mf.decompress(data)


def test_length_prefix_over_the_limit_is_refused_before_the_body_arrives() -> None:
    reader = mf.MapStreamReader(max_message_size=1000)
    with pytest.raises(mf.MapFrameError, match="exceeds"):
        reader.receive_data(struct.pack("<I", 1001))
    with pytest.raises(mf.MapFrameError, match="broken"):
        reader.receive_data(b"")


def test_decompression_bombs_are_refused() -> None:
    bomb = zstandard.ZstdCompressor(level=1).compress(bytes(8 << 20))
    assert len(bomb) < 1024
    with pytest.raises(mf.MapFrameError, match="declares"):
        mf.decompress(bomb, max_decoded_size=1 << 20)
    # A frame that does not declare its size is stopped while decoding.
    streamed = zstandard.ZstdCompressor(level=1, write_content_size=False).compress(bytes(8 << 20))
    assert zstandard.get_frame_parameters(streamed).content_size == zstandard.CONTENTSIZE_UNKNOWN
    with pytest.raises(mf.MapFrameError):
        mf.decompress(streamed, max_decoded_size=1 << 20)
    assert mf.decompress(streamed, max_decoded_size=8 << 20) == bytes(8 << 20)
    # Many small frames add up to the same limit.
    small = zstandard.ZstdCompressor(level=1).compress(bytes(600 << 10))
    with pytest.raises(mf.MapFrameError):
        mf.decompress(small + small, max_decoded_size=1 << 20)
    reader = mf.MapStreamReader(max_decoded_size=1 << 20)
    with pytest.raises(mf.MapFrameError):
        reader.receive_data(struct.pack("<I", len(bomb)) + bomb)


def test_good_messages_before_a_bad_one_are_delivered() -> None:
    encoder = mf.MapFrameEncoder()
    reader = mf.MapStreamReader()
    wire = encoder.encode(b"{}") + struct.pack("<I", 3) + b"bad"
    assert reader.receive_data(wire) == [b"{}"]
    with pytest.raises(mf.MapFrameError):
        reader.receive_data(b"")


def test_uncompressed_stream_and_partial_messages() -> None:
    encoder = mf.MapFrameEncoder(compress=False)
    reader = mf.MapStreamReader(compressed=False)
    wire = encoder.encode(b'{"a":1}') + encoder.encode(b"")
    got: list[bytes] = []
    for byte in wire:
        got += reader.receive_data(bytes([byte]))
    assert got == [b'{"a":1}', b""] and reader.pending == 0


@settings(max_examples=40, deadline=None)
@given(st.lists(st.binary(max_size=3000), max_size=5), st.integers(min_value=1, max_value=700), st.booleans())
def test_round_trip_with_any_chunking(bodies: list[bytes], piece: int, compress: bool) -> None:
    encoder = mf.MapFrameEncoder(compress=compress)
    wire = b"".join(encoder.encode(b) for b in bodies)
    reader = mf.MapStreamReader(compressed=compress)
    got: list[bytes] = []
    for i in range(0, len(wire), piece):
        got += reader.receive_data(wire[i : i + piece])
    assert got == bodies and reader.pending == 0


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), st.sampled_from([b"", b"\x28\xb5\x2f\xfd", b"\x50\x2a\x4d\x18"]))
def test_garbage_raises_only_parse_errors(data: bytes, prefix: bytes) -> None:
    try:
        out = mf.decompress(prefix + data, max_decoded_size=1 << 16)
        assert len(out) <= 1 << 16
    except ParseError:
        pass
    reader = mf.MapStreamReader(max_message_size=1 << 12, max_decoded_size=1 << 16)
    try:
        reader.receive_data(data)
    except ParseError:
        pass


def test_a_declared_size_its_blocks_cannot_hold_is_refused_before_allocation() -> None:
    # Header: magic, descriptor (single segment, 4-byte content size), size = 200 MiB, then one
    # last raw block of 1 byte. zstandard would allocate 200 MiB first.
    frame = b"\x28\xb5\x2f\xfd" + b"\xa0" + (200 << 20).to_bytes(4, "little") + b"\x09\x00\x00" + b"x"
    with pytest.raises(mf.MapFrameError, match="blocks"):
        mf.decompress(frame)

"""Fuzz target: the ``/machine/map`` stream framing and zstd decoding (``embedmesh.tailscale.mapframe``).

The first byte picks the mode and the piece size:

* even: the input is a map stream for ``MapStreamReader`` (compressed when bit 1 is set), fed in
  pieces of ``1 + (byte >> 2)`` bytes;
* odd: the input is a zstd body for ``decompress``.

Limits are small (4 KiB messages, 64 KiB decoded) so the target stays fast. Only ParseError may
escape; no output exceeds the limits, and an accepted body re-encodes and decodes to itself.
"""

from __future__ import annotations

import sys

from embedmesh.errors import ParseError
from embedmesh.tailscale import mapframe as mf

MAX_MESSAGE = 4 << 10
MAX_DECODED = 64 << 10


def TestOneInput(data: bytes) -> None:
    if not data:
        return
    control, body = data[0], data[1:]
    try:
        if control & 1:
            out = mf.decompress(body, MAX_DECODED)
            assert len(out) <= MAX_DECODED
            assert mf.decompress(mf.MapFrameEncoder().encode(out)[4:], MAX_DECODED) == out
            return
        compressed = bool(control & 2)
        piece = 1 + (control >> 2)
        reader = mf.MapStreamReader(compressed=compressed, max_message_size=MAX_MESSAGE, max_decoded_size=MAX_DECODED)
        for start in range(0, len(body), piece):
            for message in reader.receive_data(body[start : start + piece]):
                assert len(message) <= MAX_DECODED
    except ParseError:
        pass


if __name__ == "__main__":
    from harness import run

    run(TestOneInput)
    sys.exit(0)

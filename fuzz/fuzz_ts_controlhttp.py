"""Fuzz target: the HTTP steps around ts2021 (``embedmesh.tailscale.controlhttp``).

The first byte picks the mode: 0-85 the client's reading of the server's answer to the upgrade
(fed in pieces of ``1 + byte % 16``, then end of stream), 86-170 the ``/key`` answer, 171-255
the server's check of an upgrade request (the rest is ``name: value`` header lines). Only
ParseError may escape; an accepted upgrade leaves bytes that the input contained.
"""

from __future__ import annotations

import sys

from embedmesh.errors import ParseError
from embedmesh.tailscale import controlhttp
from embedmesh.tailscale.controlbase import INITIATION_SIZE


def TestOneInput(data: bytes) -> None:
    if not data:
        return
    control, body = data[0], data[1:]
    try:
        if control <= 85:
            client = controlhttp.UpgradeClient("fuzz", bytes(INITIATION_SIZE))
            piece = 1 + control % 16
            for start in range(0, len(body), piece):
                leftover = client.receive_data(body[start : start + piece])
                if leftover is not None:
                    assert leftover in body
                    return
            client.receive_data(b"")
        elif control <= 170:
            controlhttp.parse_key_response(body)
        else:
            headers = []
            for line in body.split(b"\n"):
                name, _, value = line.partition(b":")
                headers.append((name.strip(), value.strip()))
            request = controlhttp.check_upgrade_request("POST", headers)
            assert len(request.initiation) == INITIATION_SIZE
    except ParseError:
        pass


if __name__ == "__main__":
    from harness import run

    run(TestOneInput)
    sys.exit(0)

"""Fuzz target: Tailscale control messages (``embedmesh.tailscale.tailcfg``) and the client's map
session (``embedmesh.tailscale.mapsession``).

The first byte picks the message: even a MapResponse (applied to a session that already holds
headscale's recorded first map, then rendered as a network map), odd a RegisterResponse. Only
ParseError may escape.
"""

from __future__ import annotations

import sys
from pathlib import Path

from embedmesh.errors import ParseError
from embedmesh.tailscale import tailcfg
from embedmesh.tailscale.mapsession import MapSession

_FIRST_MAP = (
    Path(__file__).resolve().parent.parent
    / "tests"
    / "tailscale"
    / "vectors"
    / "headscale-v0.29.2-first-map.json"
)
_BASE = tailcfg.parse_map_response(_FIRST_MAP.read_bytes())


def TestOneInput(data: bytes) -> None:
    if not data:
        return
    try:
        if data[0] & 1:
            tailcfg.parse_register_response(data[1:])
            return
        session = MapSession()
        session.apply(_BASE, 0.0)
        session.apply(tailcfg.parse_map_response(data[1:]), 1.0)
        session.network_map(1.0)
    except ParseError:
        pass


if __name__ == "__main__":
    from harness import run

    run(TestOneInput)
    sys.exit(0)

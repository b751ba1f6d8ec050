"""Fuzz target: Tailscale's DERP map (``embedmesh.tailscale.derpmap``) as a node reads it from a
network map (Go-style JSON decoding), then everything the node and netcheck derive from it: the
URLs and dial addresses, pinned certificates and STUN targets. Only ParseError may escape.
"""

from __future__ import annotations

import sys

from embedmesh.errors import ParseError
from embedmesh.netcheck import hostnames_to_resolve
from embedmesh.tailscale import gojson
from embedmesh.tailscale.derpmap import parse_derp_map


def TestOneInput(data: bytes) -> None:
    try:
        derp_map = parse_derp_map(gojson.loads(data, "DERP map"))
    except ParseError:
        return
    hostnames_to_resolve(derp_map)
    for region in derp_map.regions.values():
        for node in region.nodes:
            node.derp_url(plain_http=False)
            node.derp_url(plain_http=True)
            node.dial_host()
            node.stun_targets()
            assert node.pinned_cert_sha256 is None or node.cert_name.startswith("sha256-raw:")


if __name__ == "__main__":
    from harness import run

    run(TestOneInput)
    sys.exit(0)

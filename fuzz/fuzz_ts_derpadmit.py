"""Fuzz target: DERP admission JSON (``embedmesh.tailscale.derpadmit``).

The first byte picks the parser: even, a ``DERPAdmitClientRequest`` (what the control server's
``/derp/admit`` reads from anyone); odd, a ``DERPAdmitClientResponse`` (what a DERP server reads
from its admission controller). Only ParseError may escape; a parsed request re-encodes to JSON
that parses to itself.
"""

from __future__ import annotations

import sys

from embedmesh.errors import ParseError
from embedmesh.tailscale.derpadmit import AdmitRequest, parse_admit_response


def TestOneInput(data: bytes) -> None:
    if not data:
        return
    body = data[1:]
    try:
        if data[0] % 2 == 0:
            request = AdmitRequest.from_json(body)
            assert AdmitRequest.from_json(request.to_json()) == request
        else:
            assert isinstance(parse_admit_response(body), bool)
    except ParseError:
        pass


if __name__ == "__main__":
    from harness import run

    run(TestOneInput)
    sys.exit(0)

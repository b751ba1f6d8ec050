"""The control server as a DERP admission controller: ``POST /derp/admit``.

A DERP server run with ``--verify-client-url https://control.example/derp/admit`` (derper's flag,
and ``embedmesh derp serve``'s) asks here about every client before relaying for it; the answer is
``{"Allow": true}`` exactly for the node keys of this tailnet's nodes that are approved and whose
key has not expired (see :mod:`embedmesh.tailscale.derpadmit` for the JSON).
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from embedmesh.control.coordinator import Coordinator
from embedmesh.tailscale.derpadmit import (
    MAX_ADMIT_REQUEST,
    AdmitRequest,
    DerpAdmitError,
    encode_admit_response,
)

#: Where the control server answers admission requests.
ADMIT_PATH = "/derp/admit"


def admits(coordinator: Coordinator, node_key: bytes, now: float) -> bool:
    """Whether the node with this (raw, 32-byte) node key may use the tailnet's DERP relays: it is
    registered, approved, and its key has not expired (also between two expiry sweeps)."""
    node = coordinator.node_by_node_key(node_key)
    if node is None or not node.in_mesh:
        return False
    return node.rec.key_expiry is None or node.rec.key_expiry > now


async def admit_endpoint(coordinator: Coordinator, request: Request, now: float) -> Response:
    """Answer one ``tailcfg.DERPAdmitClientRequest``: 200 with the verdict, 400 for a bad body."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_ADMIT_REQUEST:
            return PlainTextResponse("admission request too large\n", status_code=413)
    try:
        admit = AdmitRequest.from_json(bytes(body))
    except DerpAdmitError as exc:
        return PlainTextResponse(f"{exc}\n", status_code=400)
    allow = not admit.node.is_zero and admits(coordinator, admit.node.raw, now)
    return Response(encode_admit_response(allow), media_type="application/json")


__all__ = ["ADMIT_PATH", "admit_endpoint", "admits"]

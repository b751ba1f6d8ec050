"""A FastAPI app on the tailnet that greets each caller by name.

The app asks for no password or token: every request reached it through a WireGuard session
with the calling node's key, so the caller's overlay address (the ASGI ``client``) already says
who is calling. ``node.whois()`` turns that address into the node's name, user and tags.

    EMBEDMESH_CONTROL_URL=http://127.0.0.1:8080 EMBEDMESH_AUTH_KEY=emk-... \\
        python examples/fastapi_whois.py
    # then, from another node:  curl --socks5-hostname 127.0.0.1:1080 http://hello/

Environment:
    EMBEDMESH_CONTROL_URL   the coordination server (required)
    EMBEDMESH_AUTH_KEY      a pre-auth key (first start only when EMBEDMESH_STATE_DIR is set)
    EMBEDMESH_HOSTNAME      the name to ask for (default: hello)
    EMBEDMESH_STATE_DIR     keep the node's keys, so a restart keeps its name and addresses
    EMBEDMESH_LISTEN_HOST   bind the underlay UDP socket to this address only
    PORT                    the tailnet port to serve (default: 80)

Stops on Ctrl-C or SIGTERM (docker stop, systemd); an ephemeral node then logs out.
"""

from __future__ import annotations

import os
import signal
from typing import Annotated

import anyio
from fastapi import Depends, FastAPI, HTTPException, Request

from embedmesh import Node
from embedmesh.node import WhoIs

app = FastAPI(title="hello")


def caller(request: Request) -> WhoIs:
    """The calling node, as a FastAPI dependency: any route that takes it is tailnet-only."""
    node: Node = request.app.state.node
    who = node.whois(request.client.host) if request.client else None
    if who is None:  # an address no tailnet node owns: refuse rather than guess
        raise HTTPException(status_code=403, detail="callers must be tailnet nodes")
    return who


@app.get("/")
async def hello(who: Annotated[WhoIs, Depends(caller)]) -> dict[str, object]:
    # Authorize by mesh identity here if needed, e.g. `if "tag:ci" not in who.tags: raise ...`.
    return {"greeting": f"Hello, {who.name}!", "user": who.user, "tags": list(who.tags)}


async def main() -> None:
    port = int(os.environ.get("PORT", "80"))
    node = Node(
        control_url=os.environ["EMBEDMESH_CONTROL_URL"],
        hostname=os.environ.get("EMBEDMESH_HOSTNAME", "hello"),
        state_dir=os.environ.get("EMBEDMESH_STATE_DIR"),  # None: in-memory keys, an ephemeral node
        listen_host=os.environ.get("EMBEDMESH_LISTEN_HOST"),
    )  # the auth key comes from $EMBEDMESH_AUTH_KEY, so it never shows in `ps`
    # Open the signal receiver first: a SIGTERM that arrives while joining still closes cleanly.
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with node:
            await node.up(timeout=60)  # waits while an admin has yet to approve the node
            app.state.node = node
            await node.serve_asgi(app, f":{port}")  # port 80 is fine: it is the node's, not the host's
            print(f"serving http://{node.fqdn}:{port}/ ({', '.join(map(str, node.ips))})", flush=True)
            async for signum in signals:
                print(f"{signal.Signals(signum).name}: stopping", flush=True)
                break
        # Leaving `async with` closed the node: an ephemeral one is already gone from the tailnet.


if __name__ == "__main__":
    anyio.run(main)

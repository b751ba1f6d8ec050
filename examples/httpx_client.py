"""Call a service on the tailnet by its MagicDNS name with httpx.

``node.http_client()`` is an ordinary ``httpx.AsyncClient``: its connections go over the tailnet
from this process's own userspace stack, and names like ``web`` or ``web.mesh.internal`` resolve
through MagicDNS, so code written for httpx needs no proxy, no root and no /etc/hosts entries.

    EMBEDMESH_CONTROL_URL=http://127.0.0.1:8080 EMBEDMESH_AUTH_KEY=emk-... \\
        python examples/httpx_client.py http://web/status

Environment:
    EMBEDMESH_CONTROL_URL   the coordination server (required)
    EMBEDMESH_AUTH_KEY      a pre-auth key
    EMBEDMESH_HOSTNAME      the name to ask for (default: httpx-client)
    EMBEDMESH_LISTEN_HOST   bind the underlay UDP socket to this address only

Prints the response; exits 1 with a one-line message when the request fails.
"""

from __future__ import annotations

import os
import sys

import anyio
import httpx

from embedmesh import EmbedmeshError, Node


async def fetch(url: str) -> int:
    # Without a state_dir the node's keys live in memory: it is ephemeral, and leaves the
    # tailnet (the server deletes it) when the `async with` block ends.
    async with Node(
        control_url=os.environ["EMBEDMESH_CONTROL_URL"],
        hostname=os.environ.get("EMBEDMESH_HOSTNAME", "httpx-client"),
        listen_host=os.environ.get("EMBEDMESH_LISTEN_HOST"),
    ) as node:
        await node.up(timeout=60)
        # Everything httpx offers works as usual: timeouts, headers, auth, streaming, ...
        async with node.http_client(timeout=10, headers={"user-agent": "embedmesh-example"}) as http:
            try:
                response = await http.get(url)
                response.raise_for_status()
            except httpx.HTTPError as exc:  # refused, timed out, unknown name, 4xx/5xx
                print(f"{url}: {exc}", file=sys.stderr)
                return 1
        print(response.status_code, response.headers.get("content-type", ""))
        print(response.text)
        return 0


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} URL   (e.g. http://web/status)")
    try:
        sys.exit(anyio.run(fetch, sys.argv[1]))
    except EmbedmeshError as exc:  # a bad auth key, an unreachable server, ...
        sys.exit(f"embedmesh: {exc}")


if __name__ == "__main__":
    main()

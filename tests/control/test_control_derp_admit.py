"""The control server as DERP admission controller (``POST /derp/admit``): approved nodes with live
keys are allowed, pending, expired and unknown keys are not; a DERP server pointed at it with
``url_admitter`` relays for the tailnet's nodes only."""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import anyio
import httpx
import pytest
from control_harness import start_server

from embedmesh.control.coordinator import Coordinator, CoordinatorConfig
from embedmesh.control.derpadmit import admits
from embedmesh.control.messages import RegisterRequest
from embedmesh.control.store import Store
from embedmesh.tailscale.derpadmit import url_admitter
from embedmesh.tailscale.derpclient import DerpConnectError, connect_derp
from embedmesh.tailscale.derpserver import DerpServer
from embedmesh.tailscale.keys import NodePrivate

T0 = 1_700_000_000.0


def _coordinator(**config: object) -> Coordinator:
    rng = random.Random(1)
    return Coordinator(
        Store(None),
        CoordinatorConfig(**config),  # type: ignore[arg-type]
        now=T0,
        random_bytes=lambda n: bytes(rng.randrange(256) for _ in range(n)),
    )


def test_only_approved_nodes_with_live_keys_are_admitted() -> None:
    c = _coordinator(approval_required=True, key_expiry=3600.0)
    _, key = c.create_auth_key(reusable=True, preapproved=True, now=T0)
    member = c.register(b"m" * 32, RegisterRequest(b"\x01" * 32, b"\x02" * 32, "member", auth_key=key), T0)
    pending = c.register(b"p" * 32, RegisterRequest(b"\x03" * 32, b"\x04" * 32, "pending"), T0)
    assert admits(c, b"\x01" * 32, T0)
    assert not admits(c, b"\x03" * 32, T0)  # waits for an admin
    assert not admits(c, b"\x09" * 32, T0)  # nobody's key
    c.approve(pending.id, T0)
    assert admits(c, b"\x03" * 32, T0)
    # The key's expiry counts at once, before the sweep marks the node expired...
    assert not admits(c, b"\x01" * 32, T0 + 3601)
    # ...and an admin's expire too.
    c.expire(member.id, T0 + 10)
    assert not admits(c, b"\x01" * 32, T0 + 10)


def test_the_admit_route_and_a_derp_server_that_asks_it(tmp_path: Path) -> None:
    node = NodePrivate.generate(os.urandom(32))
    stranger = NodePrivate.generate(os.urandom(32))
    with start_server(tmp_path / "state") as running:
        coordinator = running.server.coordinator

        def register() -> None:
            _, key = coordinator.create_auth_key(now=time.time())
            request = RegisterRequest(node.public().raw, b"\x02" * 32, "member", auth_key=key)
            coordinator.register(b"m" * 32, request, time.time())

        running.call(register)
        admit_url = f"{running.url}/derp/admit"
        answer = httpx.post(admit_url, json={"NodePublic": node.public().to_text(), "Source": "192.0.2.1"})
        assert answer.status_code == 200 and answer.json() == {"Allow": True}
        answer = httpx.post(admit_url, json={"NodePublic": stranger.public().to_text(), "Source": "192.0.2.1"})
        assert answer.json() == {"Allow": False}
        assert httpx.post(admit_url, json={}).json() == {"Allow": False}  # the zero key
        assert httpx.post(admit_url, content=b"{nope").status_code == 400
        assert httpx.post(admit_url, content=b"{" + b" " * 5000 + b"}").status_code == 413
        assert httpx.get(admit_url).status_code == 405

        async def main() -> None:
            server = DerpServer(NodePrivate.generate(os.urandom(32)), admit=url_admitter(admit_url))
            async with anyio.create_task_group() as tg:
                port = await tg.start(server.serve, "127.0.0.1", 0)
                url = f"http://127.0.0.1:{port}/derp"
                async with connect_derp(url, node) as client:
                    await client.send(client.public_key, b"member")
                    with anyio.fail_after(5):
                        assert await anext(client.packets()) == (node.public(), b"member")
                with pytest.raises(DerpConnectError):
                    async with connect_derp(url, stranger, timeout=5):
                        pass
                assert (server.stats.accepted, server.stats.refused) == (1, 1)
                tg.cancel_scope.cancel()

        anyio.run(main)

"""Node in a tailnet: a coordination server on loopback and nodes joining it with auth keys."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from embedmesh import Node
from tests.control.control_harness import Admin, start_server


@pytest.fixture
def control(tmp_path: Path) -> Iterator[tuple[Any, Admin]]:
    running = start_server(tmp_path / "control")
    try:
        yield running, Admin(running)
    finally:
        running.stop()


def node(url: str, name: str, key: str | None, state_dir: Path | None = None, **kw: Any) -> Node:
    return Node(
        hostname=name, control_url=url, auth_key=key, state_dir=state_dir, listen_host="127.0.0.1", **kw
    )


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_nodes_join_and_reach_each_other_by_name(
    control: tuple[Any, Admin], tmp_path: Path, backend: str
) -> None:
    running, admin = control
    key = admin.key(reusable=True)

    async def main() -> None:
        async with node(running.url, "web", key, tmp_path / "web") as web, node(running.url, "db", key) as db:
            await web.up(timeout=10)
            await db.up(timeout=10)
            assert str(web.ips[0]).startswith("100.") and web.ips[1].version == 6
            assert web.fqdn == "web.mesh.internal"
            with anyio.fail_after(10):
                while db.netmap is None or not db.netmap.peers:
                    await anyio.sleep(0.05)
            assert await db.ping("web", timeout=5) > 0
            listener = await web.listen("tcp", ":8080")
            async with anyio.create_task_group() as tg:

                async def hello(stream: Any) -> None:
                    caller = web.whois(stream.extra(anyio.abc.SocketAttribute.remote_address)[0])
                    await stream.send(f"hello {caller.name if caller else '?'}".encode())

                tg.start_soon(listener.serve, hello)
                stream = await db.dial("tcp", "web.mesh.internal:8080")
                assert await stream.receive() == b"hello db"
                tg.cancel_scope.cancel()
            status = db.status()
            assert status.name == "db" and status.state == "authorized" and status.control_connected
            (peer,) = status.peers
            assert peer.name == "web" and peer.last_handshake_ago is not None

    anyio.run(main, backend=backend)


def test_restart_from_state_dir_keeps_addresses_without_a_key(
    control: tuple[Any, Admin], tmp_path: Path
) -> None:
    running, admin = control
    key = admin.key()  # one-off

    async def main() -> None:
        async with node(running.url, "keeper", key, tmp_path / "keeper") as first:
            await first.up(timeout=10)
            addresses = first.ips
        async with node(running.url, "keeper", None, tmp_path / "keeper") as again:
            await again.up(timeout=10)
            assert again.ips == addresses
            assert again.name == "keeper"

    anyio.run(main)


def test_ephemeral_node_without_state_vanishes_on_close(control: tuple[Any, Admin]) -> None:
    running, admin = control
    key = admin.key(reusable=True)

    async def main() -> None:
        async with node(running.url, "ci-job", key) as job:
            await job.up(timeout=10)
            assert job.ephemeral
            assert any(n["name"] == "ci-job" for n in admin.nodes())
        assert not any(n["name"] == "ci-job" for n in admin.nodes())

    anyio.run(main)

"""`embedmesh status`: the node by name, FQDN and state in its header; peers by MagicDNS name."""

from __future__ import annotations

import sys
from pathlib import Path

import anyio

from embedmesh import Node
from embedmesh.localapi import serve_local_api
from tests.control.control_harness import Admin, start_server

EMBEDMESH = [sys.executable, "-m", "embedmesh.cli.main"]


def test_status_shows_the_node_and_its_peers_by_name(tmp_path: Path) -> None:
    running = start_server(tmp_path / "control")
    admin = Admin(running)
    key = admin.key(reusable=True)

    def node(name: str) -> Node:
        # With a state_dir, a node that goes away stays in the map, offline, with its last-seen time.
        return Node(
            hostname=name,
            control_url=running.url,
            auth_key=key,
            state_dir=tmp_path / name,
            listen_host="127.0.0.1",
        )

    async def status(state_dir: Path) -> str:
        result = await anyio.run_process([*EMBEDMESH, "status", "--state-dir", str(state_dir)], check=False)
        assert result.returncode == 0, result.stderr.decode()
        return result.stdout.decode()

    async def main() -> None:
        laptop_state = tmp_path / "laptop-api"
        async with node("laptop") as laptop, anyio.create_task_group() as tg:
            await laptop.up(timeout=10)
            await tg.start(serve_local_api, laptop, laptop_state)
            async with node("web") as web, node("db") as db:
                await web.up(timeout=10)
                await db.up(timeout=10)
                with anyio.fail_after(10):
                    while len(laptop.status().peers) < 2:
                        await anyio.sleep(0.05)
                assert await laptop.ping("web", timeout=10) > 0
                with anyio.fail_after(10):
                    while not any(p.name == "web" and p.path == "direct" for p in laptop.status().peers):
                        await anyio.sleep(0.05)
                await db.close()
                with anyio.fail_after(10):
                    while not any(p.name == "db" and p.online is False for p in laptop.status().peers):
                        await anyio.sleep(0.05)
                text = await status(laptop_state)
            tg.cancel_scope.cancel()
        lines = text.splitlines()
        header = lines[0]
        assert header.startswith("laptop (laptop.mesh.internal)  authorized  100.64."), header
        rows = {line.split()[1]: line for line in lines if line.startswith("│") and line.split()[1] != "│"}
        assert set(rows) == {"web", "db"}, text
        assert str(web.ips[0]) in rows["web"] and " yes " in rows["web"] and "ago" in rows["web"], text
        # The path column words it as `tailscale status` does.
        assert f"direct 127.0.0.1:{web.listen_port}" in rows["web"], text
        assert (
            str(db.ips[0]) in rows["db"]
            and "no, last seen" in rows["db"]
            and "no handshake yet" in rows["db"]
        ), text
        assert laptop.public_key[:12] not in text and web.public_key[:12] not in text

    try:
        anyio.run(main)
    finally:
        running.stop()

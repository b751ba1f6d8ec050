"""MagicDNS in a tailnet of nodes: names in resolve, dial, listen and ping, the local DNS port,
renames and removals within one network-map update, and HTTP by name through node.http_client()."""

from __future__ import annotations

import json
from collections.abc import Iterator
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import dns.asyncquery
import dns.message
import dns.rcode
import dns.reversename
import httpx
import pytest
from tests.control.control_harness import Admin, start_server
from tests.dns.dns_harness import TestUpstream, answers, zone_handler

from embedmesh import Node
from embedmesh.errors import NameResolutionError


@pytest.fixture
def control(tmp_path: Path) -> Iterator[tuple[Any, Admin]]:
    running = start_server(tmp_path / "control")
    try:
        yield running, Admin(running)
    finally:
        running.stop()


def make(url: str, name: str, key: str, **kw: Any) -> Node:
    # No host resolvers unless a test brings its own: tests never ask a real DNS server.
    kw.setdefault("dns_upstreams", [])
    return Node(hostname=name, control_url=url, auth_key=key, listen_host="127.0.0.1", **kw)


async def wait_for_peers(*nodes: Node, count: int) -> None:
    with anyio.fail_after(10):
        while any(n.netmap is None or len(n.netmap.peers) < count for n in nodes):
            await anyio.sleep(0.02)


async def ask(port: int, name: str, rdtype: str = "A") -> dns.message.Message:
    return await dns.asyncquery.udp(dns.message.make_query(name, rdtype), "127.0.0.1", port=port, timeout=3)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_names_in_resolve_dial_listen_and_ping(control: tuple[Any, Admin], backend: str) -> None:
    running, admin = control
    key = admin.key(reusable=True)

    async def main() -> None:
        async with make(running.url, "db", key) as db, make(running.url, "app", key) as app:
            await db.up(timeout=10)
            await app.up(timeout=10)
            await wait_for_peers(db, app, count=1)
            assert await app.resolve("db") == db.ips
            assert await app.resolve("DB.mesh.internal") == db.ips
            assert await app.resolve("db", family=6) == [db.ips[1]]
            assert await app.resolve("app") == app.ips  # its own name too
            listener = await db.listen("tcp", "db:5432")  # its own name (its IPv4 address)
            listener6 = await db.listen("tcp6", "db.mesh.internal:5432")
            async with anyio.create_task_group() as tg:

                async def greet(stream: Any) -> None:
                    await stream.send(b"hello from db")

                tg.start_soon(listener.serve, greet)
                tg.start_soon(listener6.serve, greet)
                stream = await app.dial("tcp", "db:5432")
                assert await stream.receive() == b"hello from db"
                await stream.aclose()
                stream6 = await app.dial("tcp6", "db.mesh.internal:5432")
                assert stream6.extra(anyio.abc.SocketAttribute.remote_address)[0] == str(db.ips[1])
                await stream6.aclose()
                tg.cancel_scope.cancel()
            assert await app.ping("db") > 0
            with pytest.raises(NameResolutionError):
                await app.dial("tcp", "nobody.mesh.internal:80")
            with pytest.raises(OSError):
                await app.listen("tcp", "db:80")  # not this node's name

    anyio.run(main, backend=backend)


def test_local_port_follows_renames_and_removals(control: tuple[Any, Admin]) -> None:
    running, admin = control
    key = admin.key(reusable=True)

    async def main() -> None:
        async with make(running.url, "me", key) as me, make(running.url, "db", key) as db:
            await me.up(timeout=10)
            await db.up(timeout=10)
            await wait_for_peers(me, count=1)
            _, port = await me.serve_dns("127.0.0.1:0")
            assert answers(await ask(port, "db")) == [f"db. A {db.ips[0]}"]
            assert answers(await ask(port, "db.mesh.internal", "AAAA")) == [
                f"db.mesh.internal. AAAA {db.ips[1]}"
            ]
            assert answers(await ask(port, "me.mesh.internal")) == [f"me.mesh.internal. A {me.ips[0]}"]
            node_id = db._control.node_id  # type: ignore[union-attr]
            maps_before = me.netmap
            admin.post(f"/nodes/{node_id}/rename", name="postgres")
            with anyio.fail_after(10):
                while (
                    me.netmap is maps_before
                    or me.netmap is None
                    or me.netmap.peers[node_id].name != "postgres"
                ):
                    await anyio.sleep(0.01)
            # The very map that renamed it answers: no stale name, the new one at once.
            assert (await ask(port, "db.mesh.internal")).rcode() == dns.rcode.NXDOMAIN
            assert answers(await ask(port, "postgres")) == [f"postgres. A {db.ips[0]}"]
            ptr = await ask(port, dns.reversename.from_address(str(db.ips[0])).to_text(), "PTR")
            assert answers(ptr)[0].endswith("PTR postgres.mesh.internal.")
            admin.delete(node_id)
            with anyio.fail_after(10):
                while me.netmap is None or node_id in me.netmap.peers:
                    await anyio.sleep(0.01)
            assert (await ask(port, "postgres.mesh.internal")).rcode() == dns.rcode.NXDOMAIN
            assert me.status().counters["dns_local"] >= 6
            with pytest.raises(NameResolutionError):
                await me.resolve("postgres.mesh.internal")

    anyio.run(main)


def test_forwarding_through_the_node_to_its_upstream(control: tuple[Any, Admin]) -> None:
    running, admin = control
    key = admin.key(reusable=True)
    upstream = TestUpstream(zone_handler({("example.com", "A"): ["93.184.216.34"]}))

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            up_port = await tg.start(upstream.run)
            async with make(running.url, "me", key, dns_upstreams=[f"127.0.0.1:{up_port}"]) as me:
                await me.up(timeout=10)
                _, port = await me.serve_dns("127.0.0.1:0")
                assert answers(await ask(port, "example.com")) == ["example.com. A 93.184.216.34"]
                assert (await ask(port, "missing.example.com")).rcode() == dns.rcode.NXDOMAIN
                assert await me.resolve("example.com") == [
                    __import__("ipaddress").ip_address("93.184.216.34")
                ]
                with pytest.raises(OSError, match="no peer of this node routes"):
                    await me.dial("tcp", "example.com:80")
            tg.cancel_scope.cancel()

    anyio.run(main)


def test_http_client_reaches_an_asgi_app_by_name(control: tuple[Any, Admin]) -> None:
    running, admin = control
    key = admin.key(reusable=True)

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        payload = json.dumps(
            {"path": scope["path"], "method": scope["method"], "body": body.decode()}
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": payload})

    async def main() -> None:
        async with make(running.url, "web", key) as web, make(running.url, "laptop", key) as laptop:
            await web.up(timeout=10)
            await laptop.up(timeout=10)
            await web.serve_asgi(app, ":80")
            await wait_for_peers(laptop, count=1)
            async with laptop.http_client(timeout=10) as client:
                response = await client.get("http://web/hello")
                assert response.status_code == 200
                assert response.json() == {"path": "/hello", "method": "GET", "body": ""}
                posted = await client.post("http://web.mesh.internal/submit", content=b"x" * 100_000)
                assert posted.json()["body"] == "x" * 100_000
                # Keep-alive: the pool reuses the connection for the same host.
                again = await client.get("http://web/again")
                assert again.json()["path"] == "/again"
                with pytest.raises(httpx.ConnectError):
                    await client.get("http://nobody/")
                with pytest.raises(httpx.ConnectError):
                    await client.get("http://web:81/")  # refused: nobody listens there

    anyio.run(main)


def test_admin_dns_settings_reach_the_nodes(control: tuple[Any, Admin]) -> None:
    """Extra records and split DNS set through the coordination server's admin API."""
    running, admin = control
    key = admin.key(reusable=True)
    lab = TestUpstream(zone_handler({("nas.lab.example", "A"): ["100.64.7.7"]}))

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            lab_port = await tg.start(lab.run)
            async with make(running.url, "me", key) as me:
                await me.up(timeout=10)
                _, port = await me.serve_dns("127.0.0.1:0")
                before = me.netmap
                response = admin.http.put(
                    "/admin/v1/dns",
                    json={
                        "extra_records": [["grafana", "A", "100.64.0.99"], ["status", "TXT", "all good"]],
                        "split_dns": {"lab.example": [f"127.0.0.1:{lab_port}"]},
                    },
                )
                assert response.status_code == 200, response.text
                with anyio.fail_after(10):
                    while me.netmap is before or me.netmap is None or not me.netmap.dns.split_dns:
                        await anyio.sleep(0.01)
                assert answers(await ask(port, "grafana")) == ["grafana. A 100.64.0.99"]
                assert answers(await ask(port, "status.mesh.internal", "TXT")) == [
                    'status.mesh.internal. TXT "all good"'
                ]
                assert answers(await ask(port, "nas.lab.example")) == ["nas.lab.example. A 100.64.7.7"]
                assert await me.resolve("grafana.mesh.internal") == [ip_address("100.64.0.99")]
                assert lab.queries == [("udp", "nas.lab.example.", "A")]
            tg.cancel_scope.cancel()

    anyio.run(main)

"""Tags are granted, never claimed: a node carries only tags its auth key grants (issue 8).

Peers authorize callers by the tags whois shows, so a tag a node could simply ask for would be
worth nothing. The coordinator's rules are checked on their own (explicit clock, in-memory store);
the end-to-end tests go through the real server, a ``Node`` and ``embedmesh up``.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import anyio
import pytest
from click.testing import CliRunner
from control_harness import Admin, Identity, start_server

import embedmesh.errors
from embedmesh.control.coordinator import Coordinator, CoordinatorConfig
from embedmesh.control.errors import ControlError, TagNotPermittedError
from embedmesh.control.messages import RegisterRequest
from embedmesh.control.store import Store
from embedmesh.node import Node

T0 = 1_700_000_000.0


def _coordinator(store: Store | None = None, **config: object) -> Coordinator:
    rng = random.Random(7)
    return Coordinator(
        store or Store(None),
        CoordinatorConfig(**config),  # type: ignore[arg-type]
        now=T0,
        random_bytes=lambda n: bytes(rng.randrange(256) for _ in range(n)),
    )


def _request(n: int, key: str | None = None, tags: tuple[str, ...] = ()) -> RegisterRequest:
    return RegisterRequest(bytes([n, 1]) * 16, bytes([n, 2]) * 16, f"n{n}", auth_key=key, tags=tags)


def test_the_error_is_an_embedmesh_error_and_a_control_error() -> None:
    assert issubclass(TagNotPermittedError, embedmesh.errors.TagNotPermittedError)
    assert issubclass(TagNotPermittedError, ControlError)
    from embedmesh.control.errors import error_from_code

    assert type(error_from_code("tags_not_permitted", "x")) is TagNotPermittedError


def test_a_node_carries_only_the_tags_its_key_grants() -> None:
    c = _coordinator()
    _, plain = c.create_auth_key(reusable=True, now=T0)
    _, prod = c.create_auth_key(reusable=True, tags=("tag:prod", "tag:web"), now=T0)
    # A key that grants no tags: asking for one is refused, and nothing is stored or used up.
    with pytest.raises(TagNotPermittedError, match=r"tag:prod not permitted: auth key \w+ grants no tags"):
        c.register(b"a" * 32, _request(1, plain, ("tag:prod",)), T0)
    assert len(c) == 0 and all(k.uses == 0 for k in c.store.list_auth_keys())
    # A key that grants some: only those.
    with pytest.raises(TagNotPermittedError, match=r"tag:db not permitted: .* grants only tag:prod, tag:web"):
        c.register(b"b" * 32, _request(2, prod, ("tag:prod", "tag:db")), T0)
    # Asking for a subset gives that subset; asking for nothing gives everything the key grants.
    subset = c.register(b"c" * 32, _request(3, prod, ("tag:web",)), T0)
    assert subset.rec.tags == ("tag:web",) and subset.rec.user == "tagged-devices"
    everything = c.register(b"d" * 32, _request(4, prod), T0)
    assert everything.rec.tags == ("tag:prod", "tag:web")
    untagged = c.register(b"e" * 32, _request(5, plain), T0)
    assert untagged.rec.tags == () and untagged.rec.user == "default"
    # What peers see (whois reads this) is the granted set.
    assert c.peer_info(subset).tags == ("tag:web",)


def test_a_keyless_node_carries_no_tags() -> None:
    c = _coordinator(approval_required=True)
    with pytest.raises(TagNotPermittedError, match="without an auth key carries no tags"):
        c.register(b"a" * 32, _request(1, None, ("tag:prod",)), T0)
    assert len(c) == 0
    pending = c.register(b"a" * 32, _request(1), T0)
    assert pending.rec.tags == ()
    # It cannot add a tag later either, by coming back with a new node key and no auth key.
    with pytest.raises(TagNotPermittedError):
        c.register(b"a" * 32, _request(2, None, ("tag:prod",)), T0 + 1)


def test_a_restart_keeps_its_tags_and_cannot_add_any() -> None:
    c = _coordinator()
    _, key = c.create_auth_key(tags=("tag:ci",), now=T0)
    node = c.register(b"a" * 32, _request(1, key), T0)
    assert node.rec.tags == ("tag:ci",)
    assert c.register(b"a" * 32, _request(1, None, ("tag:ci",)), T0 + 1) is node
    assert c.register(b"a" * 32, _request(1), T0 + 2).rec.tags == ("tag:ci",)
    with pytest.raises(TagNotPermittedError, match=f"node {node.id} carries tag:ci"):
        c.register(b"a" * 32, _request(1, None, ("tag:ci", "tag:prod")), T0 + 3)
    assert node.rec.tags == ("tag:ci",)


def test_reauthentication_takes_the_new_keys_grant() -> None:
    c = _coordinator()
    _, first = c.create_auth_key(tags=("tag:ci",), now=T0)
    node = c.register(b"a" * 32, _request(1, first), T0)
    c.expire(node.id, T0 + 1)
    _, second = c.create_auth_key(tags=("tag:web",), now=T0)
    with pytest.raises(TagNotPermittedError):
        c.register(b"a" * 32, _request(2, second, ("tag:ci",)), T0 + 2)
    assert c.register(b"a" * 32, _request(2, second), T0 + 3).rec.tags == ("tag:web",)


def test_tags_claimed_before_grants_existed_are_dropped_on_load(tmp_path: Path) -> None:
    """A database from an embedmesh that let nodes claim tags: the claims go when it is opened."""
    store = Store(tmp_path / "control.db")
    c = _coordinator(store)
    _, key = c.create_auth_key(reusable=True, tags=("tag:ci",), now=T0)
    granted = c.register(b"a" * 32, _request(1, key), T0)
    claimed = c.register(b"b" * 32, _request(2, key), T0)
    # What the old coordinator stored: the key's tags plus whatever the node asked for.
    store.update_node(granted.id, tags=("tag:ci", "tag:prod"))
    store.update_node(claimed.id, tags=("tag:admin",), user="tagged-devices")
    store.close()
    store = Store(tmp_path / "control.db")
    reloaded = _coordinator(store)
    assert reloaded.node(granted.id).rec.tags == ("tag:ci",)
    assert reloaded.node(claimed.id).rec.tags == () and reloaded.node(claimed.id).rec.user == "default"
    assert [n.tags for n in store.load_nodes()] == [("tag:ci",), ()]
    store.close()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_whois_and_status_show_only_granted_tags(tmp_path: Path) -> None:
    with start_server(tmp_path / "server") as running:
        admin = Admin(running)
        plain = admin.key(reusable=True)
        tagged = admin.key(reusable=True, tags=["tag:web"])
        # Asking for a tag the key does not grant fails start() with the clear error.
        refused = Node(control_url=running.url, auth_key=plain, hostname="x", tags=["tag:prod"])
        with pytest.raises(embedmesh.errors.TagNotPermittedError, match="grants no tags"):
            await refused.start()
        await refused.close()
        async with (
            Node(control_url=running.url, auth_key=tagged, hostname="web") as web,
            Node(control_url=running.url, auth_key=plain, hostname="client") as client,
        ):
            await web.up(timeout=10)
            await client.up(timeout=10)
            with anyio.fail_after(10):
                while not client.status().peers or not client.status().peers[0].tags or not web.status().peers:
                    await anyio.sleep(0.05)
            caller = web.whois(client.ips[0])
            assert caller is not None and caller.tags == ()
            callee = client.whois(web.ips[0])
            assert callee is not None and callee.tags == ("tag:web",) and callee.user == "tagged-devices"
            assert client.status().peers[0].tags == ("tag:web",)
            assert sorted((n["name"], tuple(n["tags"])) for n in admin.nodes()) == [
                ("client", ()),
                ("web", ("tag:web",)),
            ]


def test_up_with_tags_the_key_does_not_grant_is_one_line(tmp_path: Path) -> None:
    with start_server(tmp_path / "server") as running:
        key = Admin(running).key()
        # A process, so the test sees what a user sees (stderr, exit status, no traceback); the
        # key comes through the environment, as a CI job passes it.
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "embedmesh.cli.main",
                "up",
                "--control-url",
                running.url,
                "--tags",
                "tag:prod",
            ],
            env={**os.environ, "EMBEDMESH_AUTH_KEY": key},
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert result.returncode == 1, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: tags tag:prod not permitted: auth key ")
    assert "grants no tags" in lines[0] and "authkey create --tags tag:prod" in lines[0]
    assert "up:" not in result.stdout and key not in result.stdout + result.stderr


def test_control_cli_creates_keys_that_grant_tags(tmp_path: Path) -> None:
    from embedmesh.cli.control import control

    state = tmp_path / "server"
    with start_server(state) as running:
        output = (
            CliRunner()
            .invoke(control, ["authkey", "create", "--state-dir", str(state), "--tags", "tag:prod,tag:web"])
            .output
        )
        key = output.strip().splitlines()[-1]
        assert "tags tag:prod,tag:web" in output

        async def join() -> tuple[str, ...]:
            async with Identity.new().client(running.url, "svc", auth_key=key, tags=("tag:prod",)) as c:
                assert c.netmap is not None
                return c.netmap.self_node.tags

        assert anyio.run(join) == ("tag:prod",)

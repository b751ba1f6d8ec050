"""`embedmesh control ...`: the admin commands through click's CliRunner against a live server."""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import pytest
from click.testing import CliRunner
from control_harness import Identity, start_server

from embedmesh.cli.control import control, parse_duration


def _run(*args: str) -> str:
    result = CliRunner().invoke(control, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def _fail(*args: str) -> str:
    result = CliRunner().invoke(control, list(args), catch_exceptions=False)
    assert result.exit_code != 0, result.output
    return result.output


def test_parse_duration() -> None:
    assert parse_duration("90s") == 90
    assert parse_duration("1h30m") == 5400
    assert parse_duration("180d") == 180 * 86400
    assert parse_duration("never") is None
    assert parse_duration("15") == 15
    with pytest.raises(Exception, match="not a duration"):
        parse_duration("soon")


def test_admin_commands(tmp_path: Path) -> None:
    state = tmp_path / "server"
    with start_server(state, approval_required=True) as running:
        sd = ("--state-dir", str(state))
        output = _run("authkey", "create", *sd, "--reusable", "--tags", "tag:ci", "--expiry", "1h")
        key = output.strip().splitlines()[-1]
        assert key.startswith("emk-") and "reusable" in output and "tag:ci" in output
        one_off = json.loads(_run("authkey", "create", *sd, "--json"))
        assert one_off["key"].startswith("emk-") and not one_off["authkey"]["reusable"]
        listing = _run("authkey", "list", *sd)
        assert one_off["authkey"]["id"] in listing and "valid" in listing
        assert key.split("-")[2] not in listing and key.split("-")[2] not in _run(
            "authkey", "list", *sd, "--json"
        )
        assert "revoked" in _run("authkey", "revoke", one_off["authkey"]["id"], *sd)
        assert json.loads(_run("authkey", "list", *sd, "--json"))["authkeys"][1]["state"] == "revoked"

        async def join() -> int:
            async with Identity.new().client(running.url, "ci-runner", auth_key=key) as client:
                assert client.waiting_for_approval
                _run("nodes", "approve", str(client.node_id), *sd)
                await client.wait_for_approval(timeout=5)
                return client.node_id or 0

        node_id = anyio.run(join)
        table = _run("nodes", "list", *sd)
        assert "ci-runner" in table and "100.64.0.1" in table and "tag:ci" in table
        nodes = json.loads(_run("nodes", "list", *sd, "--json"))["nodes"]
        assert nodes[0]["id"] == node_id and nodes[0]["state"] == "authorized" and not nodes[0]["online"]
        assert "runner.mesh.internal" in _run("nodes", "rename", str(node_id), "runner", *sd)
        assert "key expired" in _run("nodes", "expire", str(node_id), *sd)
        # Errors say what to do.
        assert "not a valid name" in _fail("nodes", "rename", str(node_id), "Bad_Name", *sd)
        assert "deleted" in _run("nodes", "delete", str(node_id), *sd)
        assert "no node with id 99" in _fail("nodes", "approve", "99", *sd)
        assert "tag:<lowercase-name>" in _fail("authkey", "create", *sd, "--tags", "ci")
        assert "not a duration" in _fail("authkey", "create", *sd, "--expiry", "soon")
        (state / "admin-token").write_text("wrong\n")
        assert "admin token" in _fail("nodes", "list", *sd)
    assert "is `embedmesh control serve --state-dir" in _fail("nodes", "list", *sd)
    assert "no server.json" in _fail("nodes", "list", "--state-dir", str(tmp_path / "elsewhere"))


def test_users_own_the_untagged_nodes_that_join_with_their_keys(tmp_path: Path) -> None:
    state = tmp_path / "server"
    with start_server(state) as running:
        sd = ("--state-dir", str(state))
        assert "user 2 alice@example.com created" in _run(
            "users", "create", "alice@example.com", "--display-name", "Alice Liddell", *sd
        )
        assert "exists already" in _fail("users", "create", "alice@example.com", *sd)
        assert "not a valid user name" in _fail("users", "create", "Bad Name", *sd)
        assert "not a valid user name" in _fail("users", "create", "tagged-devices", *sd)
        assert "no user 'bob'" in _fail("authkey", "create", "--user", "bob", *sd)
        alice_key = _run("authkey", "create", "--user", "alice@example.com", "--reusable", *sd)
        assert "user alice@example.com" in alice_key
        alice_key = alice_key.strip().splitlines()[-1]
        tagged_key = _run("authkey", "create", "--user", "alice@example.com", "--tags", "tag:ci", *sd)
        tagged_key = tagged_key.strip().splitlines()[-1]
        plain_key = _run("authkey", "create", *sd).strip().splitlines()[-1]

        async def join() -> None:
            async with (
                Identity.new().client(running.url, "laptop", auth_key=alice_key) as laptop,
                Identity.new().client(running.url, "runner", auth_key=tagged_key),
                Identity.new().client(running.url, "box", auth_key=plain_key),
            ):
                netmap = await laptop.wait_for_netmap(lambda m: len(m.peers) == 2, timeout=5)
                owners = {p.name: p.user for p in netmap.peers.values()}
                assert netmap.self_node.user == "alice@example.com"
                # Tags replace the user's identity, as in Tailscale.
                assert owners == {"runner": "tagged-devices", "box": "default"}
                users = {u["name"]: u for u in json.loads(_run("users", "list", "--json", *sd))["users"]}
                assert users["alice@example.com"]["nodes"] == 1 and users["default"]["nodes"] == 1
                assert users["alice@example.com"]["display_name"] == "Alice Liddell"
                listed = {n["name"]: n["user"] for n in json.loads(_run("nodes", "list", "--json", *sd))["nodes"]}
                assert listed == {"laptop": "alice@example.com", "runner": "tagged-devices", "box": "default"}
                assert "still owns nodes" in _fail("users", "delete", "alice@example.com", *sd)

        anyio.run(join)
        for node in json.loads(_run("nodes", "list", "--json", *sd))["nodes"]:
            if node["user"] == "alice@example.com":
                _run("nodes", "delete", str(node["id"]), *sd)
        assert "still has usable auth keys" in _fail("users", "delete", "alice@example.com", *sd)
        for key in json.loads(_run("authkey", "list", "--json", *sd))["authkeys"]:
            if key["user"] == "alice@example.com" and key["state"] == "valid":
                _run("authkey", "revoke", key["id"], *sd)
        assert "user alice@example.com deleted" in _run("users", "delete", "alice@example.com", *sd)
        assert "cannot be deleted" in _fail("users", "delete", "default", *sd)
        assert [u["name"] for u in json.loads(_run("users", "list", "--json", *sd))["users"]] == ["default"]
        # The deleted user's spent keys stay listed, now without a user.
        assert {k["user"] for k in json.loads(_run("authkey", "list", "--json", *sd))["authkeys"]} == {"default"}

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

"""Admin DNS settings: extra records and split-DNS routes, persisted and pushed as one delta."""

from __future__ import annotations

from pathlib import Path

import anyio
import httpx
import pytest
from click.testing import CliRunner
from tests.control.control_harness import Admin, Identity, start_server

from embedmesh.cli.control import control


def put_dns(admin: Admin, body: dict[str, object]) -> httpx.Response:
    return admin.http.put("/admin/v1/dns", json=body)


def test_dns_settings_reach_nodes_and_survive_a_restart(tmp_path: Path) -> None:
    state = tmp_path / "server"
    running = start_server(state)
    try:
        admin = Admin(running)
        key = admin.key(reusable=True)

        async def main() -> None:
            async with Identity.new().client(running.url, "a", auth_key=key) as client:
                assert client.netmap is not None and client.netmap.dns.extra_records == ()
                response = put_dns(
                    admin,
                    {
                        "extra_records": [
                            ["printer", "A", "192.0.2.9"],
                            ["wiki.corp.example.", "CNAME", "web"],
                        ],
                        "split_dns": {"corp.example": ["127.0.0.1:5353"]},
                    },
                )
                assert response.status_code == 200, response.text
                netmap = await client.wait_for_netmap(lambda m: m.dns.extra_records != (), timeout=5)
                assert netmap.dns.extra_records == (
                    ("printer", "A", "192.0.2.9"),
                    ("wiki.corp.example", "CNAME", "web"),
                )
                assert netmap.dns.split_dns == (("corp.example", ("127.0.0.1:5353",)),)

        anyio.run(main)
    finally:
        running.stop()
    # The settings are in the store: a restarted server hands them out in the first map.
    running = start_server(state)
    try:
        admin = Admin(running)
        assert admin.http.get("/admin/v1/dns").json()["dns"]["split_dns"] == {
            "corp.example": ["127.0.0.1:5353"]
        }
    finally:
        running.stop()


@pytest.mark.parametrize(
    "body",
    [
        {"extra_records": [["x", "A"]]},
        {"extra_records": [["x", "a lowercase type", "1.2.3.4"]]},
        {"split_dns": {"corp.example": ["not an endpoint"]}},
        {"split_dns": ["corp.example"]},
        {"other": 1},
    ],
)
def test_bad_dns_settings_are_refused_clearly(tmp_path: Path, body: dict[str, object]) -> None:
    running = start_server(tmp_path / "server")
    try:
        response = put_dns(Admin(running), body)
        assert response.status_code == 400
        assert response.json()["error"]
    finally:
        running.stop()


def test_dns_cli(tmp_path: Path) -> None:
    state = tmp_path / "server"
    running = start_server(state)
    try:
        runner = CliRunner()
        result = runner.invoke(
            control,
            [
                "dns",
                "set",
                "--state-dir",
                str(state),
                "--record",
                "printer A 192.0.2.9",
                "--split-dns",
                "corp.example=127.0.0.1:5353",
            ],
        )
        assert result.exit_code == 0, result.output
        result = runner.invoke(control, ["dns", "show", "--state-dir", str(state)])
        assert "printer" in result.output and "corp.example" in result.output
        result = runner.invoke(control, ["dns", "set", "--state-dir", str(state), "--record", "oops"])
        assert result.exit_code != 0 and "NAME TYPE VALUE" in result.output
    finally:
        running.stop()

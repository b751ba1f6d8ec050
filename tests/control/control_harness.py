"""Shared pieces of the control tests: a server on its own thread, node keys, an admin client."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from embedmesh.control.server import ControlServer, RunningServer, ServerConfig
from embedmesh.tailscale.client import TailscaleControlClient
from embedmesh.wireguard.crypto import generate_private_key, public_key


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def start_server(state_dir: Path, port: int = 0, **config: Any) -> RunningServer:
    config.setdefault("ephemeral_timeout", 0.5)
    return ControlServer(ServerConfig(state_dir=state_dir, **config)).start_in_thread("127.0.0.1", port)


@dataclass
class Identity:
    """One node's keys (what a Node would keep in its state directory); its client speaks
    Tailscale's control protocol, as every node does."""

    machine: bytes
    node: bytes
    disco: bytes
    state_dir: Path | None = None

    @classmethod
    def new(cls, state_dir: Path | None = None) -> Identity:
        return cls(
            generate_private_key(os.urandom(32)),
            generate_private_key(os.urandom(32)),
            public_key(generate_private_key(os.urandom(32))),
            state_dir,
        )

    def client(self, url: str, hostname: str, **kw: Any) -> TailscaleControlClient:
        kw.setdefault("state_dir", self.state_dir)
        kw.setdefault("reconnect_min", 0.05)
        kw.setdefault("reconnect_max", 0.3)
        kw.setdefault("connect_timeout", 5.0)
        return TailscaleControlClient(
            url, machine_key=self.machine, node_key=self.node, disco_key=self.disco, hostname=hostname, **kw
        )


class Admin:
    """The admin API over HTTP, as the CLI uses it."""

    def __init__(self, running: RunningServer) -> None:
        self.http = httpx.Client(
            base_url=running.url,
            headers={"authorization": f"Bearer {running.server.admin_token}"},
            timeout=10,
        )

    def key(self, **options: Any) -> str:
        response = self.http.post("/admin/v1/authkeys", json=options)
        assert response.status_code == 201, response.text
        return str(response.json()["key"])

    def post(self, path: str, **body: Any) -> dict[str, Any]:
        response = self.http.post(f"/admin/v1{path}", json=body)
        assert response.status_code == 200, response.text
        return dict(response.json())

    def nodes(self) -> list[dict[str, Any]]:
        return list(self.http.get("/admin/v1/nodes").json()["nodes"])

    def delete(self, node_id: int) -> None:
        response = self.http.delete(f"/admin/v1/nodes/{node_id}")
        assert response.status_code == 200, response.text

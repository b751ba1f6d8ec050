"""The coordination server's embedded DERP relay: its certificate, its region in the map, a client
that checks the pinned certificate (HTTPS) or speaks plain HTTP on the same port, and admission:
only the tailnet's nodes are served unless verification is turned off."""

from __future__ import annotations

import datetime
import json
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from cryptography import x509
from tests.control.control_harness import start_server

from embedmesh.control.embeddedderp import (
    CERT_FILE,
    CERT_KEY_FILE,
    KEY_FILE,
    REGION_ID,
    certificate_sha256,
    self_signed_certificate,
)
from embedmesh.control.messages import RegisterRequest
from embedmesh.errors import ConfigError
from embedmesh.tailscale import derp
from embedmesh.tailscale.derpclient import DerpConnectError, connect_derp
from embedmesh.tailscale.keys import NodePrivate


@pytest.fixture
def running(tmp_path: Path) -> Iterator[Any]:
    server = start_server(tmp_path / "control")
    try:
        yield server
    finally:
        server.stop()


def test_the_map_publishes_the_embedded_region(running: Any, tmp_path: Path) -> None:
    relay = running.server.embedded_derp
    region = running.server.derp_map_json()["Regions"][str(REGION_ID)]
    (node,) = region["Nodes"]
    assert region["RegionCode"] == "embedmesh"
    assert node["HostName"] == node["IPv4"] == "127.0.0.1" and node["DERPPort"] == relay.port > 0
    assert node["CertName"] == "sha256-raw:" + certificate_sha256(tmp_path / "control" / CERT_FILE)
    for name in (KEY_FILE, CERT_FILE, CERT_KEY_FILE):
        assert stat.S_IMODE((tmp_path / "control" / name).stat().st_mode) == 0o600


def _register(running: Any, *keys: NodePrivate) -> None:
    """Make ``keys`` the node keys of registered nodes: the relay serves only the tailnet's nodes."""
    coordinator = running.server.coordinator

    def register() -> None:
        _, auth = coordinator.create_auth_key(reusable=True, now=time.time())
        for i, key in enumerate(keys):
            request = RegisterRequest(key.public().raw, bytes([i + 1]) * 32, f"node{i}", auth_key=auth)
            coordinator.register(bytes([i + 1]) * 32, request, time.time())

    running.call(register)


def test_clients_reach_it_over_pinned_https_and_plain_http(running: Any) -> None:
    relay = running.server.embedded_derp
    url = f"https://127.0.0.1:{relay.port}/derp"
    a, b = NodePrivate.generate(os.urandom(32)), NodePrivate.generate(os.urandom(32))
    _register(running, a, b)

    async def main() -> None:
        async with (
            connect_derp(url, a, pinned_cert_sha256=relay.cert_sha256) as ca,
            connect_derp(f"http://127.0.0.1:{relay.port}/derp", b) as cb,
        ):
            assert ca.server_key == cb.server_key == relay.server.public_key
            with anyio.fail_after(5):
                while not relay.server.core.is_connected(b.public()):
                    await anyio.sleep(0.01)
            await ca.send(b.public(), b"over https, to a plain-http client")
            with anyio.fail_after(5):
                event = await cb.receive()
                while not isinstance(event, derp.PacketReceived):
                    event = await cb.receive()
            assert event.src == a.public() and event.packet == b"over https, to a plain-http client"
        # Any other certificate is refused, with the reason.
        with pytest.raises(DerpConnectError, match="pins"):
            async with connect_derp(url, a, pinned_cert_sha256="00" * 32):
                pass

    anyio.run(main)


def test_it_serves_only_the_tailnet_s_nodes(running: Any, tmp_path: Path) -> None:
    relay = running.server.embedded_derp
    member, stranger = NodePrivate.generate(os.urandom(32)), NodePrivate.generate(os.urandom(32))
    _register(running, member)
    url = f"http://127.0.0.1:{relay.port}/derp"

    async def main() -> None:
        async with connect_derp(url, member):
            pass
        with pytest.raises(DerpConnectError):
            async with connect_derp(url, stranger, timeout=5):
                pass
        assert relay.server.stats.refused == 1

    anyio.run(main)
    # Turned off, it serves anyone who reaches it.
    open_relay = start_server(tmp_path / "open", derp_verify_clients=False)
    try:
        port = open_relay.server.embedded_derp.port

        async def anyone() -> None:
            async with connect_derp(f"http://127.0.0.1:{port}/derp", stranger):
                pass

        anyio.run(anyone)
    finally:
        open_relay.stop()


def test_the_certificate_is_kept_and_renewed(tmp_path: Path) -> None:
    cert, key = self_signed_certificate(tmp_path, "relay.example.com")
    first = certificate_sha256(cert)
    assert self_signed_certificate(tmp_path, "relay.example.com") == (cert, key)
    assert certificate_sha256(cert) == first  # restarts keep the pin
    loaded = x509.load_pem_x509_certificate(cert.read_bytes())
    names = loaded.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["relay.example.com"]
    # A new host name, or a certificate near its end, gets a new one.
    self_signed_certificate(tmp_path, "203.0.113.5")
    assert certificate_sha256(cert) != first
    second = certificate_sha256(cert)
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=340)
    self_signed_certificate(tmp_path, "203.0.113.5", now=later)
    assert certificate_sha256(cert) != second


def test_a_derp_map_file_may_not_take_the_embedded_region(tmp_path: Path) -> None:
    path = tmp_path / "map.json"
    path.write_text(json.dumps({"Regions": {str(REGION_ID): {"RegionID": REGION_ID, "Nodes": []}}}))
    with pytest.raises(ConfigError, match="999"):
        start_server(tmp_path / "control", derp_map=path)
    # Without the embedded relay the region is the file's.
    server = start_server(tmp_path / "control2", derp_map=path, embedded_derp=False)
    try:
        assert server.server.embedded_derp is None
        assert list(server.server.derp_map_json()["Regions"]) == [str(REGION_ID)]
    finally:
        server.stop()

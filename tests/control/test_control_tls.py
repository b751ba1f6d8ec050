"""`control serve --tls-cert/--tls-key`: the server over HTTPS, Tailscale's protocol inside it,
the admin CLI trusting the server's own certificate, and clear errors for bad TLS settings."""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import ssl
from pathlib import Path

import anyio
import httpx
import pytest
from click.testing import CliRunner
from control_harness import start_server
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from embedmesh.cli.control import control
from embedmesh.errors import ConfigError
from embedmesh.tailscale.client import TailscaleControlClient
from embedmesh.tailscale.keys import MachinePrivate
from embedmesh.tailscale.noiseclient import connect_control


def _self_signed(folder: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "embedmesh test control")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "tls.crt", folder / "tls.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    os.chmod(key_path, 0o600)
    return cert_path, key_path


def test_the_server_speaks_https_and_tailscale_inside_it(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    state = tmp_path / "server"
    with start_server(state, tls_cert=cert, tls_key=key) as running:
        assert running.url.startswith("https://127.0.0.1:")
        context = ssl.create_default_context(cafile=str(cert))
        assert httpx.get(f"{running.url}/health", verify=context).json() == {"ok": True}
        with pytest.raises(httpx.HTTPError):
            httpx.get(running.url.replace("https://", "http://") + "/health", timeout=3)
        # The admin CLI finds the URL and trusts the certificate through server.json.
        result = CliRunner().invoke(control, ["authkey", "create", "--state-dir", str(state), "--json"])
        assert result.exit_code == 0, result.output
        auth_key = json.loads(result.output)["key"]

        async def join() -> None:
            machine = MachinePrivate.generate(os.urandom(32))
            async with connect_control(running.url, machine, 130, ssl_context=context) as conn:
                assert conn.early_payload is not None
            client = TailscaleControlClient(
                running.url,
                machine_key=os.urandom(32),
                node_key=os.urandom(32),
                disco_key=os.urandom(32),
                hostname="tls",
                auth_key=auth_key,
                ssl_context=context,
            )
            async with client:
                assert client.netmap is not None and client.netmap.self_node.name == "tls"

        anyio.run(join)


def test_bad_tls_settings_are_one_line_errors(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    with pytest.raises(ConfigError, match="both a certificate"):
        start_server(tmp_path / "a", tls_cert=cert)
    with pytest.raises(ConfigError, match="PEM certificate chain"):
        start_server(tmp_path / "b", tls_cert=key, tls_key=key)

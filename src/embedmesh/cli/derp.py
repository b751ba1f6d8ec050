"""`embedmesh derp serve`: run a DERP relay server (see docs/derp.md)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import click

from embedmesh.errors import ConfigError
from embedmesh.hostport import join_host_port, split_host_port
from embedmesh.tailscale.keys import KeyFormatError, NodePrivate


@click.group()
def derp() -> None:
    """DERP relays: Tailscale's relay protocol for nodes that cannot reach each other directly."""


def _load_or_create_key(path: Path | None) -> NodePrivate:
    if path is None:
        return NodePrivate.generate(os.urandom(32))
    if path.exists():
        # derper's config file format ({"PrivateKey": "privkey:..."}), so one file serves both.
        try:
            doc = json.loads(path.read_text())
            return NodePrivate.from_text(doc["PrivateKey"])
        except (OSError, ValueError, KeyError, TypeError, KeyFormatError) as exc:
            raise ConfigError(f"cannot read the DERP key file {path}: {exc}; delete it to make a new key") from None
    key = NodePrivate.generate(os.urandom(32))
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as file:
        json.dump({"PrivateKey": key.to_text()}, file)
    return key


def _read_mesh_key(path: Path) -> bytes:
    from embedmesh.tailscale.derp import parse_mesh_key

    try:
        return parse_mesh_key(path.read_bytes())
    except OSError as exc:
        raise ConfigError(f"cannot read the mesh key file {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise ConfigError(f"{path}: {exc}") from None


@derp.command("serve")
@click.option("--listen", default="127.0.0.1:3340", show_default=True, help="HOST:PORT to serve DERP on.")
@click.option("--tls-cert", type=click.Path(path_type=Path), help="Serve HTTPS with this PEM certificate chain (with --tls-key).")
@click.option("--tls-key", type=click.Path(path_type=Path), help="The private key of --tls-cert (PEM).")
@click.option(
    "--key-file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="The server's DERP key, as derper's config file; created (mode 0600) if missing. Default: a new key each start.",
)
@click.option(
    "--mesh-with",
    default="",
    metavar="HOST:PORT,...",
    help="The other DERP servers of this region, comma-separated (derper's --mesh-with: HOST[:PORT][/DIALHOST], "
    "HTTPS when this server serves TLS, else HTTP; or http(s):// URLs). This server's own address may be in the list.",
)
@click.option(
    "--mesh-key-file",
    "--mesh-psk-file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="The region's mesh key: a file holding 64 hex digits (derper's --mesh-psk-file). Servers and trusted "
    "clients that log in with it may watch the connections and forward packets.",
)
def serve(
    listen: str, tls_cert: Path | None, tls_key: Path | None, key_file: Path | None, mesh_with: str, mesh_key_file: Path | None
) -> None:
    """Run a DERP relay server until interrupted (Ctrl-C or SIGTERM)."""
    import anyio

    from embedmesh.tailscale.derpmesh import parse_mesh_with
    from embedmesh.tailscale.derpserver import DerpServer, tls_context

    try:
        host, port = split_host_port(listen)
    except ValueError as exc:
        raise ConfigError(f"--listen {listen}: {exc}") from None
    if (tls_cert is None) != (tls_key is None):
        raise ConfigError("TLS needs both a certificate (--tls-cert) and its key (--tls-key)")
    context = tls_context(tls_cert, tls_key) if tls_cert is not None and tls_key is not None else None
    mesh_key = _read_mesh_key(mesh_key_file) if mesh_key_file is not None else None
    try:
        peers = parse_mesh_with(mesh_with, tls=context is not None)
    except ValueError as exc:
        raise ConfigError(f"--mesh-with: {exc}") from None
    if peers and mesh_key is None:
        raise ConfigError("--mesh-with needs the region's mesh key: give --mesh-key-file")
    server = DerpServer(_load_or_create_key(key_file), ssl_context=context, mesh_key=mesh_key, mesh_with=peers)

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            bound = await tg.start(server.serve, host, port)
            scheme = "https" if context is not None else "http"
            click.echo(f"DERP server on {scheme}://{join_host_port(host, bound)}/derp, key {server.public_key.to_text()}", err=False)
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    break
            tg.cancel_scope.cancel()

    anyio.run(main)

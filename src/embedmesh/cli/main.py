"""The ``embedmesh`` command."""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import sys
from pathlib import Path

import click

from embedmesh.errors import EmbedmeshError


@click.group()
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
def main(verbose: int) -> None:
    """embedmesh: a WireGuard mesh inside your Python process."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")


@main.command()
@click.option("--pings", default=5, show_default=True, help="How many pings alpha sends to beta.")
def demo(pings: int) -> None:
    """Start two in-process nodes on loopback and ping across WireGuard."""
    from embedmesh.cli.demo import main as run_demo

    run_demo(pings)


@main.command()
def genkey() -> None:
    """Print a new private key (base64, like `wg genkey`)."""
    from embedmesh.wireguard.crypto import generate_private_key

    click.echo(base64.b64encode(generate_private_key(os.urandom(32))).decode())


@main.command()
def pubkey() -> None:
    """Read a private key on stdin and print its public key (like `wg pubkey`)."""
    from embedmesh.config import decode_key
    from embedmesh.wireguard.crypto import public_key

    try:
        private = decode_key(sys.stdin.read().strip())
    except EmbedmeshError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(base64.b64encode(public_key(private)).decode())


@main.command()
@click.option(
    "--wireguard-config",
    "config_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    required=True,
    help="A wg-quick configuration file to join a plain WireGuard network with.",
)
@click.option("--listen-host", default=None, help="Bind the underlay UDP socket to this local address only.")
def up(config_path: Path, listen_host: str | None) -> None:
    """Run a node in the foreground until interrupted."""
    import anyio

    from embedmesh.node import Node

    async def run() -> None:
        try:
            node = Node(wireguard_config=config_path.read_text(), listen_host=listen_host)
        except EmbedmeshError as exc:
            raise click.ClickException(f"{config_path}: {exc}") from exc
        async with node:
            await node.up()
            click.echo(
                f"up: {node.public_key} on UDP {node.listen_port}, "
                f"addresses {', '.join(str(ip) for ip in node.ips)}; Ctrl-C to stop"
            )
            await anyio.sleep_forever()

    with contextlib.suppress(KeyboardInterrupt):
        anyio.run(run)


if __name__ == "__main__":
    main()

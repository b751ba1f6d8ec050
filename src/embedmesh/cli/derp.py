"""`embedmesh derp serve`: run a DERP relay server (see docs/derp.md)."""

from __future__ import annotations

import signal
from pathlib import Path

import click

from embedmesh.errors import ConfigError
from embedmesh.hostport import join_host_port, split_host_port


@click.group()
def derp() -> None:
    """DERP relays: Tailscale's relay protocol for nodes that cannot reach each other directly."""


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
    "--stun/--no-stun",
    default=True,
    show_default=True,
    help="Also run a STUN server (UDP) on the --listen host, as derper does, for netcheck.",
)
@click.option(
    "--stun-port",
    type=click.IntRange(0, 65535),
    default=None,
    help="The STUN server's UDP port (0: any free one). Default 3478, skipped with a warning when in use.",
)
def serve(
    listen: str, tls_cert: Path | None, tls_key: Path | None, key_file: Path | None, stun: bool, stun_port: int | None
) -> None:
    """Run a DERP relay server until interrupted (Ctrl-C or SIGTERM)."""
    import anyio

    from embedmesh.errors import AddressInUseError
    from embedmesh.tailscale.derpserver import DerpServer, load_or_create_server_key, tls_context
    from embedmesh.tailscale.stunserver import DEFAULT_PORT, StunServer

    try:
        host, port = split_host_port(listen)
    except ValueError as exc:
        raise ConfigError(f"--listen {listen}: {exc}") from None
    if (tls_cert is None) != (tls_key is None):
        raise ConfigError("TLS needs both a certificate (--tls-cert) and its key (--tls-key)")
    context = tls_context(tls_cert, tls_key) if tls_cert is not None and tls_key is not None else None
    server = DerpServer(load_or_create_server_key(key_file), ssl_context=context)

    async def main() -> None:
        # Signals first: a SIGTERM right after the banner must stop the server cleanly (exit 0).
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with anyio.create_task_group() as tg:
                bound = await tg.start(server.serve, host, port)
                scheme = "https" if context is not None else "http"
                click.echo(
                    f"DERP server on {scheme}://{join_host_port(host, bound)}/derp, key {server.public_key.to_text()}",
                    err=False,
                )
                if stun:
                    stun_server = StunServer()
                    try:
                        stun_bound = await tg.start(
                            stun_server.serve, host, DEFAULT_PORT if stun_port is None else stun_port
                        )
                        click.echo(f"STUN server on udp {join_host_port(host, stun_bound)}")
                    except AddressInUseError as exc:
                        if stun_port is not None:
                            raise
                        # The default port is a convenience: a second relay on one host still runs.
                        click.echo(f"warning: no STUN server: {exc} (give --stun-port to choose one)", err=True)
                async for _ in signals:
                    break
                tg.cancel_scope.cancel()

    anyio.run(main)

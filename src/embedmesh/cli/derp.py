"""`embedmesh derp serve`: run a DERP relay server (see docs/derp.md)."""

from __future__ import annotations

import math
import signal
from pathlib import Path
from urllib.parse import urlsplit

import click

from embedmesh.errors import ConfigError
from embedmesh.hostport import join_host_port, split_host_port


@click.group()
def derp() -> None:
    """DERP relays: Tailscale's relay protocol for nodes that cannot reach each other directly."""


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
@click.option(
    "--verify-client-url",
    metavar="URL",
    help="Admit only clients this admission controller allows (derper's protocol: POST "
    '{"NodePublic", "Source"}, answer {"Allow": true}); embedmesh control serves one at /derp/admit.',
)
@click.option(
    "--verify-client-url-fail-open",
    is_flag=True,
    help="Admit clients when the admission controller cannot be reached (default: refuse them).",
)
@click.option(
    "--per-client-rate-limit",
    type=click.FloatRange(min=0),
    default=0,
    show_default=True,
    metavar="BYTES/S",
    help="What one client may send, in bytes per second (0: no limit); past it the server reads it slower.",
)
@click.option(
    "--per-client-rate-burst",
    type=click.FloatRange(min=0),
    default=0,
    metavar="BYTES",
    help="The burst of --per-client-rate-limit, in bytes (at least one full packet, 65,568 bytes).",
)
@click.option(
    "--accept-connection-limit",
    type=click.FloatRange(min=0, min_open=True),
    default=math.inf,
    metavar="PER-SECOND",
    help="New connections per second; one over it is closed at once. Default: no limit.",
)
@click.option(
    "--accept-connection-burst",
    type=click.FloatRange(min=1),
    metavar="N",
    help="The burst of --accept-connection-limit (default: one second's worth).",
)
@click.option(
    "--restart-smear-ms",
    type=click.IntRange(min=0, max=60_000),
    default=1000,
    show_default=True,
    help="On SIGTERM/SIGINT clients are told to reconnect within this many ms, spread at random.",
)
@click.option(
    "--restart-try-for-ms",
    type=click.IntRange(min=0, max=60_000),
    default=5000,
    show_default=True,
    help="On SIGTERM/SIGINT clients are told to keep trying to reconnect this long.",
)
def serve(
    listen: str,
    tls_cert: Path | None,
    tls_key: Path | None,
    key_file: Path | None,
    stun: bool,
    stun_port: int | None,
    verify_client_url: str | None,
    verify_client_url_fail_open: bool,
    per_client_rate_limit: float,
    per_client_rate_burst: float,
    accept_connection_limit: float,
    accept_connection_burst: float | None,
    restart_smear_ms: int,
    restart_try_for_ms: int,
    mesh_with: str,
    mesh_key_file: Path | None,
) -> None:
    """Run a DERP relay server (and a STUN server beside it) until interrupted (Ctrl-C or SIGTERM).

    On SIGTERM or SIGINT it stops accepting, tells every client it is restarting (a Restarting
    frame), gives those frames a moment to go out, closes the connections and exits 0.
    """
    import anyio

    from embedmesh.errors import AddressInUseError
    from embedmesh.tailscale.derpadmit import url_admitter
    from embedmesh.tailscale.derpmesh import parse_mesh_with
    from embedmesh.tailscale.derpserver import DerpServer, load_or_create_server_key, tls_context
    from embedmesh.tailscale.stunserver import DEFAULT_PORT, StunServer

    try:
        host, port = split_host_port(listen)
    except ValueError as exc:
        raise ConfigError(f"--listen {listen}: {exc}") from None
    if (tls_cert is None) != (tls_key is None):
        raise ConfigError("TLS needs both a certificate (--tls-cert) and its key (--tls-key)")
    if verify_client_url is not None:
        parts = urlsplit(verify_client_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"--verify-client-url {verify_client_url}: give an http:// or https:// URL")
    if verify_client_url_fail_open and verify_client_url is None:
        raise ConfigError("--verify-client-url-fail-open needs --verify-client-url")
    context = tls_context(tls_cert, tls_key) if tls_cert is not None and tls_key is not None else None
    mesh_key = _read_mesh_key(mesh_key_file) if mesh_key_file is not None else None
    try:
        peers = parse_mesh_with(mesh_with, tls=context is not None)
    except ValueError as exc:
        raise ConfigError(f"--mesh-with: {exc}") from None
    if peers and mesh_key is None:
        raise ConfigError("--mesh-with needs the region's mesh key: give --mesh-key-file")
    server = DerpServer(
        load_or_create_server_key(key_file),
        ssl_context=context,
        admit=url_admitter(verify_client_url, fail_open=verify_client_url_fail_open) if verify_client_url else None,
        rate_limit=per_client_rate_limit,
        rate_burst=per_client_rate_burst,
        accept_rate=accept_connection_limit,
        accept_burst=accept_connection_burst,
        mesh_key=mesh_key,
        mesh_with=peers,
    )

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
                # serve() returns once the clients have heard Restarting and their connections closed.
                told = await server.shutdown(try_for_ms=restart_try_for_ms, smear_ms=restart_smear_ms)
                click.echo(f"DERP server stopping: told {told} client(s) to reconnect", err=True)
                tg.cancel_scope.cancel()  # the STUN server

    anyio.run(main)

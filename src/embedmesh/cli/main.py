"""The ``embedmesh`` command."""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import click

from embedmesh.errors import EmbedmeshError, ListenError
from embedmesh.hostport import join_host_port, split_host_port


class _Commands(click.Group):
    """The top-level group; `control`, `derp` and `netcheck` are imported only when used, so other
    commands start fast."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), "control", "derp", "netcheck"])

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name == "control":
            from embedmesh.cli.control import control

            return control
        if cmd_name == "derp":
            from embedmesh.cli.derp import derp

            return derp
        if cmd_name == "netcheck":
            from embedmesh.cli.netcheck import netcheck

            return netcheck
        return super().get_command(ctx, cmd_name)

    def invoke(self, ctx: click.Context) -> Any:
        # Every command path: an embedmesh error is one line on stderr and exit status 1, never a
        # traceback (including one raised inside a task group, which arrives as an ExceptionGroup).
        try:
            return super().invoke(ctx)
        except EmbedmeshError as exc:
            raise click.ClickException(str(exc)) from exc
        except BaseExceptionGroup as group:
            leaves = _leaves(group)
            if not all(isinstance(e, EmbedmeshError | click.ClickException) for e in leaves):
                raise
            messages = (e.format_message() if isinstance(e, click.ClickException) else str(e) for e in leaves)
            raise click.ClickException("; ".join(dict.fromkeys(messages))) from group


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    found: list[BaseException] = []
    for exc in group.exceptions:
        found.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return found


@click.group(cls=_Commands)
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
def main(verbose: int) -> None:
    """embedmesh: a WireGuard mesh inside your Python process."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")


@main.command()
@click.option("--pings", default=3, show_default=True, help="How many pings laptop sends to web.")
def demo(pings: int) -> None:
    """A complete tailnet on loopback: a coordination server and three nodes, one serving a web app."""
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


def _split_endpoint(text: str, what: str) -> tuple[str, int]:
    try:
        host, port = split_host_port(text if ":" in text else f":{text}")
    except ValueError as exc:
        raise click.BadParameter(f"{what}: {exc}") from None
    return host, port


@main.command()
@click.option(
    "--control-url", default=None, help="The coordination server to join, e.g. http://127.0.0.1:8080."
)
@click.option(
    "--auth-key",
    default=None,
    envvar="EMBEDMESH_AUTH_KEY",
    metavar="KEY|file:PATH",
    help="A pre-auth key; not needed to rejoin from --state-dir. Any user can read a command line "
    "(/proc/PID/cmdline), so keep the key out of it: file:PATH reads it from a file (chmod 600), "
    "or set EMBEDMESH_AUTH_KEY (which may also be file:PATH).",
)
@click.option("--hostname", default=None, help="The name to ask for in the tailnet (default: this host's).")
@click.option(
    "--ephemeral", is_flag=True, default=None, help="Delete the node when it logs out or disappears."
)
@click.option(
    "--tags", default="", help="Comma-separated tags to request, e.g. tag:ci (the auth key must allow them)."
)
@click.option(
    "--wireguard-config",
    "config_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Instead of a tailnet: join a plain WireGuard network from a wg-quick file.",
)
@click.option("--listen-host", default=None, help="Bind the underlay UDP socket to this local address only.")
@click.option("--listen-port", default=0, help="The underlay UDP port (default: any free port).")
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder for the node's keys (0600) and its local API socket (for `embedmesh status`/`ping`).",
)
@click.option(
    "--socks5",
    "socks5",
    default=None,
    metavar="HOST:PORT",
    help="Run a SOCKS5 proxy into the mesh on this local address, e.g. 127.0.0.1:1080.",
)
@click.option(
    "--forward",
    "forwards",
    multiple=True,
    metavar="LOCAL=PEER",
    help="Forward a local port to a peer's port, e.g. 127.0.0.1:5432=db:5432 (repeatable).",
)
@click.option(
    "--serve",
    "serves",
    multiple=True,
    metavar="PORT=LOCAL",
    help="Expose a local service on a mesh port, e.g. 80=127.0.0.1:8000 (repeatable).",
)
@click.option(
    "--dns",
    "dns_address",
    default=None,
    metavar="HOST:PORT",
    help="Also serve MagicDNS on this local address (UDP and TCP), e.g. 127.0.0.1:5353.",
)
@click.option(
    "--control-timeout",
    type=click.FloatRange(min=0),
    default=60.0,
    show_default=True,
    metavar="SECONDS",
    help="How long to keep retrying a coordination server that cannot be reached yet at start.",
)
@click.option(
    "--dns-forward-for-peers",
    is_flag=True,
    help="Let peers asking 100.100.100.100 resolve any name through this host's resolvers "
    "(default: tailnet names and split DNS only).",
)
def up(
    control_url: str | None,
    auth_key: str | None,
    hostname: str | None,
    ephemeral: bool | None,
    tags: str,
    config_path: Path | None,
    listen_host: str | None,
    listen_port: int,
    state_dir: Path | None,
    socks5: str | None,
    forwards: tuple[str, ...],
    serves: tuple[str, ...],
    dns_address: str | None,
    control_timeout: float,
    dns_forward_for_peers: bool,
) -> None:
    """Run a node in the foreground until stopped (Ctrl-C, SIGTERM, SIGHUP or `embedmesh down`;
    an ephemeral node then logs out, so it leaves the tailnet at once)."""
    import anyio

    from embedmesh.cli.lifecycle import Lifecycle, cli_error
    from embedmesh.node import Node
    from embedmesh.state import resolve_auth_key

    if (control_url is None) == (config_path is None):
        raise click.UsageError(
            "give either --control-url (join a tailnet) or --wireguard-config (plain WireGuard)"
        )
    if control_url is not None and "://" not in control_url:
        raise click.ClickException(
            f"--control-url {control_url} has no scheme: write --control-url http://{control_url} "
            "(or https:// for a server behind TLS)"
        )
    if auth_key:
        auth_key = resolve_auth_key(auth_key)
    forward_specs = []
    for spec in forwards:
        local, sep, remote = spec.partition("=")
        if not sep:
            raise click.BadParameter(f"--forward {spec!r}: expected LOCAL_HOST:PORT=PEER:PORT")
        forward_specs.append((_split_endpoint(local, "--forward"), remote))
    serve_specs = []
    for spec in serves:
        mesh_port, sep, local = spec.partition("=")
        if not sep or not mesh_port.isdigit():
            raise click.BadParameter(f"--serve {spec!r}: expected MESH_PORT=LOCAL_HOST:PORT")
        serve_specs.append((int(mesh_port), _split_endpoint(local, "--serve")))
    socks5_spec = _split_endpoint(socks5, "--socks5") if socks5 else None
    dns_spec = _split_endpoint(dns_address, "--dns") if dns_address else None

    async def run() -> None:
        try:
            if config_path is not None:
                node = Node(
                    wireguard_config=config_path.read_text(),
                    listen_host=listen_host,
                    listen_port=listen_port,
                    state_dir=state_dir,  # only for its lock: one node per state folder
                    dns_forward_for_peers=dns_forward_for_peers,
                )
            else:
                node = Node(
                    control_url=control_url,
                    auth_key=auth_key,
                    hostname=hostname,
                    state_dir=state_dir,
                    ephemeral=ephemeral,
                    tags=[t for t in tags.split(",") if t],
                    listen_host=listen_host,
                    listen_port=listen_port,
                    control_timeout=control_timeout,
                    dns_forward_for_peers=dns_forward_for_peers,
                )
        except EmbedmeshError as exc:
            raise click.ClickException(str(exc)) from exc
        lifecycle = Lifecycle(node)
        try:
            await lifecycle.run(
                lambda: _serve_node(
                    node,
                    lifecycle,
                    control_url,
                    state_dir,
                    dns_address,
                    dns_spec,
                    socks5_spec,
                    forward_specs,
                    serve_specs,
                )
            )
        except BaseException as exc:
            error = cli_error(exc)
            if error is None:
                raise
            raise error from None

    wording = _OperatorWording(state_dir)
    handlers = list(logging.getLogger().handlers)
    for handler in handlers:
        handler.addFilter(wording)
    try:
        with contextlib.suppress(KeyboardInterrupt):
            anyio.run(run)
    finally:
        for handler in handlers:
            handler.removeFilter(wording)


class _OperatorWording(logging.Filter):
    """Says the library's warnings about this node's standing to the operator who runs `up`.

    The control client words them for a programmer (``auth_key=``, ``up()``); a record that
    carries ``embedmesh_event`` is reworded here as what to run or whom to ask.
    """

    def __init__(self, state_dir: Path | None) -> None:
        super().__init__()
        self.state_dir = state_dir

    def filter(self, record: logging.LogRecord) -> bool:
        event = getattr(record, "embedmesh_event", None)
        node_id = getattr(record, "node_id", "ID")
        url = getattr(record, "control_url", "the control server")
        if event == "pending_approval":
            record.msg = (
                f"waiting for approval: ask the admin of {url} to run "
                f"`embedmesh control nodes approve {node_id}` (keys created with --preapproved skip this)"
            )
        elif event == "key_expired":
            state = f" --state-dir {self.state_dir}" if self.state_dir is not None else ""
            record.msg = (
                f"this node's key expired, so it is cut off from its peers: ask the admin of {url} to run "
                f"`embedmesh control nodes approve {node_id}`, or restart with a new key: "
                f"`embedmesh up --control-url {url}{state} --auth-key file:PATH`"
            )
        else:
            return True
        record.args = ()
        return True


async def _serve_node(
    node: Any,
    lifecycle: Any,
    control_url: str | None,
    state_dir: Path | None,
    dns_address: str | None,
    dns_spec: tuple[str, int] | None,
    socks5_spec: tuple[str, int] | None,
    forward_specs: list[tuple[tuple[str, int], str]],
    serve_specs: list[tuple[int, tuple[str, int]]],
) -> None:
    import anyio

    from embedmesh.control.errors import ApprovalRefusedError
    from embedmesh.localapi import serve_local_api

    async with anyio.create_task_group() as tg:
        if state_dir is not None:
            # Before up(): `status` and `status --wait` see a node that waits for approval.
            await tg.start(
                partial(
                    serve_local_api,
                    node,
                    state_dir,
                    waiting_for=lifecycle.waiting_for,
                    on_down=lifecycle.down,
                )
            )
            click.echo(f"local API: {state_dir / 'embedmesh.sock'}")
        try:
            await node.up()
        except ApprovalRefusedError:
            # The API's message speaks to a programmer (auth_key=); this one to the operator.
            url = control_url
            raise click.ClickException(
                f"an admin of {url} refused this node: ask them for an auth key "
                "(they run `embedmesh control authkey create`, --preapproved to skip approval), "
                f"then run `embedmesh up --control-url {url} --auth-key file:PATH` again"
            ) from None
        name = f"{node.fqdn} " if node.fqdn else ""
        click.echo(
            f"up: {name}{', '.join(str(ip) for ip in node.ips)} (key {node.public_key[:12]}…, "
            f"UDP {node.listen_port})"
        )
        if dns_spec is not None:
            try:
                host, port = await node.serve_dns(join_host_port(dns_spec[0] or "127.0.0.1", dns_spec[1]))
            except ListenError as exc:
                raise ListenError(exc.errno or 0, f"--dns {dns_address}: {exc}", exc.host, exc.port) from None
            click.echo(f"MagicDNS on {join_host_port(host, port)} (UDP and TCP)")
        await run_gateways(node, socks5_spec, forward_specs, serve_specs, on_ready=lifecycle.ready)


async def run_gateways(
    node: Any,
    socks5: tuple[str, int] | None,
    forwards: list[tuple[tuple[str, int], str]],
    serves: list[tuple[int, tuple[str, int]]],
    *,
    on_ready: Callable[[], None] | None = None,
) -> None:
    """Start the gateways of `embedmesh up`, call ``on_ready`` once they all listen, then run
    until cancelled."""
    import anyio
    import anyio.abc

    from embedmesh.gateway import listen_local
    from embedmesh.gateway.forward import forward_local, serve_local
    from embedmesh.gateway.socks5 import serve_socks5, tailnet_dialer

    opened: list[anyio.abc.Listener[anyio.abc.SocketStream]] = []

    async def listen(option: str, host: str, port: int) -> anyio.abc.Listener[anyio.abc.SocketStream]:
        try:
            opened.append(await listen_local(host, port))
        except ListenError as exc:  # one line naming the option, before anything is served
            for listener in opened:
                await listener.aclose()
            raise click.ClickException(f"{option} {join_host_port(host, port)}: {exc}") from None
        return opened[-1]

    # Every local port is opened before the task group, so that a port in use ends `up` with
    # one line rather than an exception group.
    socks5_listener = None
    if socks5 is not None:
        socks5_listener = await listen("--socks5", socks5[0] or "127.0.0.1", socks5[1])
    forward_listeners = [
        (await listen("--forward", host or "127.0.0.1", port), host or "127.0.0.1", port, remote)
        for (host, port), remote in forwards
    ]
    async with anyio.create_task_group() as tg:
        if socks5 is not None and socks5_listener is not None:
            host, port = socks5[0] or "127.0.0.1", socks5[1]
            tg.start_soon(serve_socks5, socks5_listener, tailnet_dialer(node))
            click.echo(f"SOCKS5 proxy on {join_host_port(host, port)}")
        for local_listener, host, port, remote in forward_listeners:

            async def dial_remote(remote: str = remote) -> anyio.abc.ByteStream:
                stream: anyio.abc.ByteStream = await node.dial("tcp", remote)
                return stream

            tg.start_soon(forward_local, local_listener, dial_remote, f"forward to {remote}")
            click.echo(f"forwarding {join_host_port(host, port)} to {remote}")
        for mesh_port, (host, port) in serves:
            mesh_listener = await node.listen("tcp", f":{mesh_port}")
            tg.start_soon(serve_local, mesh_listener, host or "127.0.0.1", port)
            click.echo(f"serving mesh port {mesh_port} from {join_host_port(host or '127.0.0.1', port)}")
        if on_ready is not None:
            on_ready()
        click.echo("Ctrl-C or SIGTERM to stop", err=True)
        await anyio.sleep_forever()


@main.command()
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="The state folder of the running node (as given to `embedmesh up`).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option(
    "--wait",
    is_flag=True,
    help="First wait until the node is ready: in its network, with every forward, proxy and DNS "
    "listener of `up` listening (exit 1 with the reason if --timeout passes first).",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0),
    default=60.0,
    show_default=True,
    metavar="SECONDS",
    help="How long --wait waits.",
)
def status(state_dir: Path, as_json: bool, wait: bool, timeout: float) -> None:
    """Show the running node and its peers."""
    import json

    from rich.console import Console
    from rich.table import Table

    from embedmesh.cli.lifecycle import read_status, wait_ready
    from embedmesh.node import describe_path

    data = wait_ready(state_dir, timeout) if wait else read_status(state_dir)
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    # Piped into a script or a log, lines are not cut to 80 columns (rich's default without a
    # terminal): an address or a "last seen" split over two lines is hard to grep.
    console = Console(width=None if sys.stdout.isatty() else 250)
    console.print(_status_header(data), highlight=False)
    table = Table()
    for column in ("peer", "address", "online", "path", "handshake", "rx", "tx"):
        table.add_column(column)
    for peer in sorted(data["peers"], key=lambda p: (p["name"] or "~", p["public_key"])):
        ago = peer["last_handshake_ago"]
        table.add_row(
            # Static mode has no names: the key is the only thing that tells its peers apart.
            peer["name"] or f"key {peer['public_key'][:12]}…",
            "\n".join(peer["addresses"] or peer["allowed_ips"]),
            _online(peer["online"], peer["last_seen"]),
            describe_path(peer["path"], peer["path_address"]),
            "no handshake yet" if ago is None else f"{_ago(ago)} ago",
            str(peer["rx_bytes"]),
            str(peer["tx_bytes"]),
        )
    console.print(table)


def _status_header(data: dict[str, Any]) -> str:
    """The node itself: name, FQDN and state in a tailnet (key prefix in static mode)."""
    who = data["name"] or f"key {data['public_key'][:12]}…"
    if data["fqdn"]:
        who += f" ({data['fqdn']})"
    parts = [f"[bold]{who}[/]"]
    if data["state"]:
        state = data["state"].replace("_", " ")
        if data["control_connected"] is False:
            state += ", control server not connected"
        parts.append(state)
    parts += [", ".join(data["addresses"]) or "no addresses", f"UDP {data['listen_port']}"]
    return "  ".join(parts)


def _ago(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.0f} h"
    return f"{seconds / 86400:.0f} d"


def _online(online: bool | None, last_seen: float | None) -> str:
    """Control's view of a peer: online, or when it was last seen ("-" in static mode)."""
    import time

    if online is None:
        return "-"
    if online:
        return "yes"
    if last_seen is None:
        return "no"
    return f"no, last seen {_ago(max(time.time() - last_seen, 0.0))} ago"


@main.command()
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="The state folder of the running node (as given to `embedmesh up`).",
)
@click.option(
    "--logout",
    is_flag=True,
    help="Also log out of the tailnet: the node's key expires, so joining again needs an auth key "
    "(an ephemeral node logs out and is deleted anyway).",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0),
    default=30.0,
    show_default=True,
    metavar="SECONDS",
    help="How long to wait for the node to close.",
)
def down(state_dir: Path, logout: bool, timeout: float) -> None:
    """Stop the node that `embedmesh up --state-dir` runs, and return once it has closed."""
    from embedmesh.cli.lifecycle import stop_node

    pid = stop_node(state_dir, logout, timeout)
    click.echo(f"stopped the node in {state_dir}" + (f" (PID {pid})" if pid is not None else ""))


@main.command()
@click.argument("peer")
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="The state folder of the running node (as given to `embedmesh up`).",
)
@click.option("-c", "--count", default=3, show_default=True)
@click.option("--timeout", default=5.0, show_default=True, help="Seconds to wait for each reply.")
def ping(peer: str, state_dir: Path, count: int, timeout: float) -> None:
    """Ping a peer over the mesh from the running node."""
    import anyio

    from embedmesh.localapi import NodeNotRunningError, request

    failures = 0
    for i in range(count):
        try:
            data = anyio.run(request, state_dir, "POST", "/v1/ping", {"peer": peer, "timeout": timeout})
        except NodeNotRunningError as exc:
            raise click.ClickException(str(exc)) from None
        except RuntimeError as exc:
            failures += 1
            click.echo(f"no reply from {peer}: {exc}")
            continue
        except (FileNotFoundError, OSError) as exc:
            raise click.ClickException(str(exc)) from exc
        click.echo(f"pong from {peer}: seq={i + 1} time={data['rtt'] * 1000:.2f} ms")
    if failures == count:
        raise SystemExit(1)


if __name__ == "__main__":
    main()

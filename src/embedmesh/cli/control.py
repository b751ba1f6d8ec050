"""``embedmesh control ...``: run the coordination server and administer it.

``serve`` writes ``server.json`` (its URL) and ``admin-token`` into the state directory; every admin
command takes the same ``--state-dir`` and reads both, so it needs no other configuration.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import re
import signal
import ssl
import sys
import urllib.parse
from pathlib import Path
from typing import Any

import click
import httpx
from rich.console import Console
from rich.table import Table

from embedmesh.errors import EmbedmeshError
from embedmesh.hostport import join_host_port

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 7 * 86400.0}
_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)([smhdw]?)")


def parse_duration(text: str) -> float | None:
    """``90s``, ``30m``, ``1h``, ``180d``, ``2w`` (bare numbers are seconds); ``0``/``never`` is None."""
    text = text.strip().lower()
    if text in ("0", "never", "none"):
        return None
    total = 0.0
    position = 0
    for match in _DURATION_RE.finditer(text):
        if match.start() != position:
            break
        total += float(match.group(1)) * _UNITS[match.group(2) or "s"]
        position = match.end()
    if position != len(text) or not text:
        raise click.BadParameter(f"{text!r} is not a duration such as 90s, 30m, 1h, 180d or never")
    return total


def _state_dir_option(function: Any) -> Any:
    return click.option(
        "--state-dir",
        type=click.Path(file_okay=False, path_type=Path),
        required=True,
        envvar="EMBEDMESH_CONTROL_STATE_DIR",
        help="The control server's state directory (also $EMBEDMESH_CONTROL_STATE_DIR).",
    )(function)


def _json_option(function: Any) -> Any:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")(function)


def _url_option(function: Any) -> Any:
    return click.option(
        "--url", default=None, help="Talk to this server URL instead of the one in <state-dir>/server.json."
    )(function)


@click.group()
def control() -> None:
    """The coordination server: serve a tailnet, and administer its keys and nodes."""


# ---------------------------------------------------------------------------------------------- serve


@control.command()
@click.option("--listen", default="127.0.0.1:8080", show_default=True, help="host:port to listen on.")
@_state_dir_option
@click.option(
    "--base-domain", default="mesh.internal", show_default=True, help="Nodes are <name>.<base-domain>."
)
@click.option(
    "--approval-required",
    is_flag=True,
    help="New nodes wait for `nodes approve` unless their key is pre-approved.",
)
@click.option("--key-expiry", default="180d", show_default=True, help="Node key lifetime (e.g. 90d; never).")
@click.option(
    "--ephemeral-timeout",
    default="60s",
    show_default=True,
    help="Delete ephemeral nodes this long after they drop.",
)
@click.option(
    "--first-request-timeout",
    default="5s",
    show_default=True,
    help="Close a connection that sends no complete request within this long.",
)
@click.option(
    "--max-connections",
    type=click.IntRange(min=1),
    default=None,
    help="Connections at once (default: the descriptor limit, ulimit -n, minus 64).",
)
@click.option(
    "--max-connections-per-source",
    type=click.IntRange(min=1),
    default=64,
    show_default=True,
    help="Connections one address (an IPv6 /64) may hold before its nodes have registered.",
)
@click.option(
    "--tls-cert",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    help="Serve HTTPS with this PEM certificate chain (with --tls-key).",
)
@click.option(
    "--tls-key",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    help="The certificate's PEM private key.",
)
@click.option(
    "--derp-map",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    help="More DERP regions (Tailscale's DERPMap JSON) for the nodes, e.g. of your derpers.",
)
@click.option(
    "--derp/--no-derp",
    "embedded_derp",
    default=True,
    show_default=True,
    help="Run a DERP relay in this process, published as region 999 \"embedmesh\".",
)
@click.option(
    "--derp-port",
    type=click.IntRange(min=0, max=65535),
    default=3340,
    show_default=True,
    help="TCP port of the embedded DERP relay (HTTPS, and plain HTTP for TS_DEBUG_USE_DERP_HTTP clients); 0: any.",
)
@click.option(
    "--derp-host",
    default=None,
    help="The name or address nodes reach the embedded relay at (default: the --listen host, or "
    "this machine's name when that is a wildcard). With --tls-cert it must be a name the certificate holds.",
)
@click.option(
    "--derp-verify-clients/--no-derp-verify-clients",
    default=True,
    show_default=True,
    help="The embedded relay serves only this tailnet's approved nodes (off: anyone who reaches it).",
)
@click.option(
    "--stun-port",
    type=click.IntRange(min=0, max=65535),
    default=3478,
    show_default=True,
    help="UDP port of the STUN server beside the embedded relay (0: any); the default port, when "
    "taken, is skipped with a warning.",
)
@click.option("--no-stun", is_flag=True, help="No STUN server beside the embedded relay.")
def serve(
    listen: str,
    state_dir: Path,
    base_domain: str,
    approval_required: bool,
    key_expiry: str,
    ephemeral_timeout: str,
    first_request_timeout: str,
    max_connections: int | None,
    max_connections_per_source: int,
    tls_cert: Path | None,
    tls_key: Path | None,
    derp_map: Path | None,
    embedded_derp: bool,
    derp_port: int,
    derp_host: str | None,
    stun_port: int,
    no_stun: bool,
    derp_verify_clients: bool,
) -> None:
    """Run the coordination server in the foreground."""
    import anyio
    import anyio.abc

    from embedmesh.control.server import ControlServer, ServerConfig

    host, sep, port_text = listen.rpartition(":")
    if not sep or not port_text.isdigit():
        raise click.BadParameter(f"{listen!r} is not host:port (e.g. 127.0.0.1:8080)", param_hint="--listen")
    host = host.strip("[]")
    reap = parse_duration(ephemeral_timeout)
    first_request = parse_duration(first_request_timeout)
    if first_request is None or first_request <= 0:
        raise click.BadParameter(
            "must be a positive duration (e.g. 5s)", param_hint="--first-request-timeout"
        )
    try:
        server = ControlServer(
            ServerConfig(
                state_dir=state_dir,
                base_domain=base_domain,
                approval_required=approval_required,
                key_expiry=parse_duration(key_expiry),
                ephemeral_timeout=60.0 if reap is None else reap,
                first_request_timeout=first_request,
                max_connections=max_connections,
                max_connections_per_source=max_connections_per_source,
                derp_map=derp_map,
                embedded_derp=embedded_derp,
                derp_port=derp_port,
                derp_host=derp_host,
                stun_port=None if no_stun else stun_port,
                stun_optional=stun_port == 3478,
                derp_verify_clients=derp_verify_clients,
                tls_cert=tls_cert,
                tls_key=tls_key,
            )
        )
    except (EmbedmeshError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc

    async def run() -> None:
        # SIGTERM (systemd, docker stop, CI runners) and SIGHUP stop the server as Ctrl-C does:
        # uvicorn closes the node streams, the store is closed, and the exit status is 0.
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
            async with anyio.create_task_group() as tg:

                async def serve_until_stopped(*, task_status: anyio.abc.TaskStatus[str]) -> None:
                    await server.serve(host, int(port_text), task_status=task_status)
                    tg.cancel_scope.cancel()  # stopped: no more signals to wait for

                url = await tg.start(serve_until_stopped)
                click.echo(f"control server on {url} (key {server.public_key_b64})")
                relay = server.embedded_derp
                if relay is not None:
                    stun = f", STUN on udp port {relay.stun_port}" if relay.stun_port > 0 else ", no STUN"
                    click.echo(
                        f"DERP relay (region 999 \"embedmesh\") on {join_host_port(relay.host, relay.port)}{stun}"
                    )
                click.echo(
                    f"state in {state_dir}; admin commands: embedmesh control ... --state-dir {state_dir}"
                )
                stopping = False
                async for signum in signals:
                    if stopping:  # a second signal while the streams drain: stop at once
                        tg.cancel_scope.cancel()
                        break
                    click.echo(f"{signal.Signals(signum).name}: stopping the control server")
                    server.shutdown()
                    stopping = True

    try:
        with contextlib.suppress(KeyboardInterrupt):
            anyio.run(run, backend="asyncio")
    except OSError as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        server.close()


# ---------------------------------------------------------------------------------------------- admin client


class AdminClient:
    """The admin API, located through the state directory."""

    def __init__(self, state_dir: Path, url: str | None = None) -> None:
        self.state_dir = state_dir
        info_path = state_dir / "server.json"
        token_path = state_dir / "admin-token"
        verify: ssl.SSLContext | bool = True
        with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
            cert = json.loads(info_path.read_text()).get("tls_cert")
            if cert:
                # The server's own certificate (maybe self-signed) is trusted for its URL.
                verify = ssl.create_default_context()
                verify.load_verify_locations(cert)
        if url is None:
            try:
                url = str(json.loads(info_path.read_text())["url"])
            except FileNotFoundError:
                raise click.ClickException(
                    f"no server.json in {state_dir}: start the server first with "
                    f"`embedmesh control serve --state-dir {state_dir}`"
                ) from None
            except (ValueError, KeyError, TypeError) as exc:
                raise click.ClickException(
                    f"{info_path} is damaged ({exc}): restart the server to rewrite it"
                ) from exc
        try:
            token = token_path.read_text().strip()
        except FileNotFoundError:
            raise click.ClickException(
                f"no admin-token in {state_dir}: is this the server's state directory?"
            ) from None
        except PermissionError:
            raise click.ClickException(
                f"cannot read {token_path}: run as the user that runs the server"
            ) from None
        self.url = url.rstrip("/")
        self._http = httpx.Client(
            base_url=self.url,
            headers={"authorization": f"Bearer {token}"},
            timeout=httpx.Timeout(10.0),
            verify=verify,
        )

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        try:
            response = self._http.request(method, f"/admin/v1{path}", json=body)
        except httpx.HTTPError as exc:
            raise click.ClickException(
                f"cannot reach the control server at {self.url} ({exc}): is "
                f"`embedmesh control serve --state-dir {self.state_dir}` running?"
            ) from exc
        try:
            payload = response.json()
        except ValueError:
            payload = None
        if response.status_code >= 400:
            message = (
                payload["error"]["message"]
                if isinstance(payload, dict) and isinstance(payload.get("error"), dict)
                else f"HTTP {response.status_code}: {response.text[:200]}"
            )
            raise click.ClickException(message)
        if not isinstance(payload, dict):
            raise click.ClickException(f"{self.url} did not answer JSON: is it an embedmesh control server?")
        return payload


def _console() -> Console:
    return Console(soft_wrap=False, width=max(120, Console().width))


def _when(timestamp: float | None, never: str = "never") -> str:
    if timestamp is None:
        return never
    return datetime.datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M")


def _print_json(value: object) -> None:
    click.echo(json.dumps(value, indent=2))


def _node_table(nodes: list[dict[str, Any]]) -> Table:
    table = Table(title=f"{len(nodes)} node{'s' if len(nodes) != 1 else ''}")
    for column in (
        "ID",
        "NAME",
        "ADDRESSES",
        "STATE",
        "ONLINE",
        "LAST SEEN",
        "USER",
        "TAGS",
        "EPHEMERAL",
        "KEY EXPIRY",
    ):
        table.add_column(column)
    for node in nodes:
        table.add_row(
            str(node["id"]),
            node["name"],
            "\n".join(node["addresses"]) or "-",
            node["state"].replace("_", " "),
            "yes" if node["online"] else "no",
            _when(node["last_seen"], "-"),
            node["user"],
            ",".join(node["tags"]) or "-",
            "yes" if node["ephemeral"] else "no",
            _when(node["key_expiry"]),
        )
    return table


def _key_table(keys: list[dict[str, Any]]) -> Table:
    table = Table(title=f"{len(keys)} auth key{'s' if len(keys) != 1 else ''}")
    for column in (
        "ID",
        "STATE",
        "REUSABLE",
        "EPHEMERAL",
        "PREAPPROVED",
        "USER",
        "TAGS",
        "USES",
        "EXPIRES",
        "CREATED",
    ):
        table.add_column(column)
    for key in keys:
        table.add_row(
            key["id"],
            key["state"],
            "yes" if key["reusable"] else "no",
            "yes" if key["ephemeral"] else "no",
            "yes" if key["preapproved"] else "no",
            key["user"],
            ",".join(key["tags"]) or "-",
            str(key["uses"]),
            _when(key["expires"]),
            _when(key["created"]),
        )
    return table


# ---------------------------------------------------------------------------------------------- authkey


@control.group()
def authkey() -> None:
    """Pre-auth keys that let nodes join."""


@authkey.command("create")
@_state_dir_option
@_url_option
@_json_option
@click.option("--reusable", is_flag=True, help="Any number of nodes may use the key (default: one node).")
@click.option("--ephemeral", is_flag=True, help="Nodes joining with it are deleted when they go away.")
@click.option("--preapproved", is_flag=True, help="Nodes joining with it skip admin approval.")
@click.option(
    "--tags",
    default="",
    help="Tags the key grants its nodes (the only ones they can carry), e.g. tag:ci,tag:web.",
)
@click.option("--expiry", default=None, help="The key stops working after this long (e.g. 1h, 7d).")
@click.option(
    "--user",
    default=None,
    help="The user its untagged nodes belong to (see `users list`; default: the default user).",
)
def authkey_create(
    state_dir: Path,
    url: str | None,
    as_json: bool,
    reusable: bool,
    ephemeral: bool,
    preapproved: bool,
    tags: str,
    expiry: str | None,
    user: str | None,
) -> None:
    """Create a key; the key itself is the last line printed (it is shown only once)."""
    body = {
        "reusable": reusable,
        "ephemeral": ephemeral,
        "preapproved": preapproved,
        "tags": [t.strip() for t in tags.split(",") if t.strip()],
        "expiry": None if expiry is None else parse_duration(expiry),
    }
    if user is not None:
        body["user"] = user
    result = AdminClient(state_dir, url).request("POST", "/authkeys", body)
    if as_json:
        _print_json(result)
        return
    info = result["authkey"]
    kinds = [k for k in ("reusable", "ephemeral", "preapproved") if info[k]] or ["one-off"]
    click.echo(
        f"auth key {info['id']} ({', '.join(kinds)}; user {info['user']}; "
        f"tags {','.join(info['tags']) or 'none'}; "
        f"expires {_when(info['expires'])}). Store it now, it is not shown again:",
        err=False,
    )
    click.echo(result["key"])


@authkey.command("list")
@_state_dir_option
@_url_option
@_json_option
def authkey_list(state_dir: Path, url: str | None, as_json: bool) -> None:
    """List keys (never their secrets)."""
    result = AdminClient(state_dir, url).request("GET", "/authkeys")
    if as_json:
        _print_json(result)
    else:
        _console().print(_key_table(result["authkeys"]))


@authkey.command("revoke")
@click.argument("key_id")
@_state_dir_option
@_url_option
@_json_option
def authkey_revoke(key_id: str, state_dir: Path, url: str | None, as_json: bool) -> None:
    """Revoke a key by its id (nodes that joined with it stay)."""
    if key_id.startswith("emk-"):
        key_id = key_id.split("-")[1]
    result = AdminClient(state_dir, url).request("POST", f"/authkeys/{key_id}/revoke")
    if as_json:
        _print_json(result)
    else:
        click.echo(f"auth key {key_id} revoked")


# ---------------------------------------------------------------------------------------------- nodes


@control.group()
def nodes() -> None:
    """The tailnet's nodes."""


@nodes.command("list")
@_state_dir_option
@_url_option
@_json_option
def nodes_list(state_dir: Path, url: str | None, as_json: bool) -> None:
    """List nodes with their addresses and state."""
    result = AdminClient(state_dir, url).request("GET", "/nodes")
    if as_json:
        _print_json(result)
    else:
        _console().print(_node_table(result["nodes"]))


def _node_action(name: str, verb: str, help_text: str) -> None:
    @nodes.command(name, help=help_text)
    @click.argument("node_id", type=int)
    @_state_dir_option
    @_url_option
    @_json_option
    def command(node_id: int, state_dir: Path, url: str | None, as_json: bool) -> None:
        result = AdminClient(state_dir, url).request("POST", f"/nodes/{node_id}/{name}")
        if as_json:
            _print_json(result)
        else:
            node = result["node"]
            click.echo(f"node {node['id']} {node['name']} {verb}; state: {node['state'].replace('_', ' ')}")


_node_action("approve", "approved", "Approve a pending node, or re-approve an expired one.")
_node_action("expire", "expired", "Expire a node's key now: it is cut off until it re-authenticates.")


@nodes.command("rename")
@click.argument("node_id", type=int)
@click.argument("new_name")
@_state_dir_option
@_url_option
@_json_option
def nodes_rename(node_id: int, new_name: str, state_dir: Path, url: str | None, as_json: bool) -> None:
    """Give a node another DNS name (peers see it at once)."""
    result = AdminClient(state_dir, url).request("POST", f"/nodes/{node_id}/rename", {"name": new_name})
    if as_json:
        _print_json(result)
    else:
        click.echo(f"node {node_id} is now {result['node']['fqdn']}")


@nodes.command("delete")
@click.argument("node_id", type=int)
@_state_dir_option
@_url_option
@_json_option
def nodes_delete(node_id: int, state_dir: Path, url: str | None, as_json: bool) -> None:
    """Delete a node (refuses it if it is waiting for approval); its address returns to the pool."""
    result = AdminClient(state_dir, url).request("DELETE", f"/nodes/{node_id}")
    if as_json:
        _print_json(result)
    else:
        click.echo(f"node {node_id} deleted")


@control.group()
def auth() -> None:
    """Interactive logins (a device that joined without an auth key shows an AuthURL)."""


@auth.command("register")
@click.argument("login")
@click.option("--user", default="default", show_default=True, help="The user the device joins as.")
@_state_dir_option
@_url_option
@_json_option
def auth_register(login: str, user: str, state_dir: Path, url: str | None, as_json: bool) -> None:
    """Complete the login LOGIN (the AuthURL the device shows, or its id): the device joins."""
    login_id = login.strip().rstrip("/").rsplit("/", 1)[-1]
    result = AdminClient(state_dir, url).request(
        "POST", f"/logins/{urllib.parse.quote(login_id, safe='')}/register", {"user": user}
    )
    if as_json:
        _print_json(result)
    else:
        node = result["node"]
        click.echo(
            f"node {node['id']} {node['name']} joined as {node['user']}; state: {node['state'].replace('_', ' ')}"
        )


@auth.command("list")
@_state_dir_option
@_url_option
@_json_option
def auth_list(state_dir: Path, url: str | None, as_json: bool) -> None:
    """List the logins waiting for an admin."""
    result = AdminClient(state_dir, url).request("GET", "/logins")
    if as_json:
        _print_json(result)
        return
    rows = result["logins"]
    table = Table(title=f"{len(rows)} login{'s' if len(rows) != 1 else ''} waiting")
    for column in ("ID", "HOSTNAME", "OS", "FROM", "SINCE"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            row["id"], row["hostname"], row["os"] or "-", row["source"] or "-", _when(row["created"])
        )
    _console().print(table)


@control.group()
def users() -> None:
    """Users: who a tailnet's untagged nodes belong to."""


@users.command("create")
@click.argument("name")
@click.option("--display-name", default=None, help="A longer name shown in maps (default: NAME).")
@_state_dir_option
@_url_option
@_json_option
def users_create(
    name: str, display_name: str | None, state_dir: Path, url: str | None, as_json: bool
) -> None:
    """Create a user; nodes join as it with keys from `authkey create --user NAME`."""
    body: dict[str, Any] = {"name": name}
    if display_name is not None:
        body["display_name"] = display_name
    result = AdminClient(state_dir, url).request("POST", "/users", body)
    if as_json:
        _print_json(result)
    else:
        click.echo(f"user {result['user']['id']} {result['user']['name']} created")


@users.command("list")
@_state_dir_option
@_url_option
@_json_option
def users_list(state_dir: Path, url: str | None, as_json: bool) -> None:
    """List users and how many nodes each owns."""
    result = AdminClient(state_dir, url).request("GET", "/users")
    if as_json:
        _print_json(result)
        return
    rows = result["users"]
    table = Table(title=f"{len(rows)} user{'s' if len(rows) != 1 else ''}")
    for column in ("ID", "NAME", "DISPLAY NAME", "NODES", "CREATED"):
        table.add_column(column)
    for user in rows:
        table.add_row(
            str(user["id"]),
            user["name"],
            user["display_name"],
            str(user["nodes"]),
            _when(user["created"] or None, "-"),
        )
    _console().print(table)


@users.command("delete")
@click.argument("name")
@_state_dir_option
@_url_option
@_json_option
def users_delete(name: str, state_dir: Path, url: str | None, as_json: bool) -> None:
    """Delete a user that owns no nodes and no usable auth keys."""
    result = AdminClient(state_dir, url).request("DELETE", f"/users/{urllib.parse.quote(name, safe='@+')}")
    if as_json:
        _print_json(result)
    else:
        click.echo(f"user {name} deleted")


@control.group()
def dns() -> None:
    """MagicDNS settings pushed to every node: extra records and split DNS."""


def _print_dns(document: dict[str, Any]) -> None:
    console = _console()
    console.print(
        f"base domain: [bold]{document['base_domain']}[/] (every node is <name>.{document['base_domain']})"
    )
    records = document["extra_records"]
    if records:
        table = Table(title="extra records")
        for column in ("name", "type", "value"):
            table.add_column(column)
        for name, rtype, value in records:
            table.add_row(name, rtype, value)
        console.print(table)
    else:
        console.print("no extra records")
    for domain, resolvers in document["split_dns"].items():
        console.print(f"split DNS: *.{domain} → {', '.join(resolvers)}")
    if not document["split_dns"]:
        console.print("no split-DNS routes")


@dns.command("show")
@_state_dir_option
@_url_option
@_json_option
def dns_show(state_dir: Path, url: str | None, as_json: bool) -> None:
    """Show the DNS settings."""
    result = AdminClient(state_dir, url).request("GET", "/dns")
    if as_json:
        _print_json(result)
    else:
        _print_dns(result["dns"])


@dns.command("set")
@click.option(
    "--record",
    "records",
    multiple=True,
    metavar="'NAME TYPE VALUE'",
    help="An extra record, e.g. 'printer A 192.168.1.9' (repeatable; replaces the current ones).",
)
@click.option(
    "--split-dns",
    "routes",
    multiple=True,
    metavar="DOMAIN=IP:PORT[,IP:PORT]",
    help="Send names under DOMAIN to these resolvers, e.g. corp.example=10.0.0.53:53 (repeatable).",
)
@_state_dir_option
@_url_option
@_json_option
def dns_set(
    records: tuple[str, ...], routes: tuple[str, ...], state_dir: Path, url: str | None, as_json: bool
) -> None:
    """Replace the extra records and split-DNS routes (nodes get them within one map update)."""
    extra = []
    for text in records:
        parts = text.split(None, 2)
        if len(parts) != 3:
            raise click.BadParameter(f"--record {text!r}: expected 'NAME TYPE VALUE'")
        extra.append([parts[0], parts[1].upper(), parts[2]])
    split: dict[str, list[str]] = {}
    for text in routes:
        domain, sep, resolvers = text.partition("=")
        if not sep or not domain or not resolvers:
            raise click.BadParameter(f"--split-dns {text!r}: expected DOMAIN=IP:PORT[,IP:PORT]")
        split[domain.strip(".").lower()] = [r.strip() for r in resolvers.split(",") if r.strip()]
    result = AdminClient(state_dir, url).request("PUT", "/dns", {"extra_records": extra, "split_dns": split})
    if as_json:
        _print_json(result)
    else:
        _print_dns(result["dns"])


if __name__ == "__main__":
    control(sys.argv[1:], prog_name="embedmesh control")

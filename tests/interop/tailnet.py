"""A tailnet of real Tailscale software in network namespaces: headscale, tailscaled, tsnet programs.

Built on :class:`netns.NetnsRig` (which removes every namespace, link and process it made on close).
Each :class:`TailnetRig` owns one *dead-end* namespace, ``hub``: every host of the test is a
namespace of its own with a veth into the hub, an address of 198.18.0.0/15 and a default route via
the hub's end.  The hub forwards between the hosts and has no other link, so the hosts reach each
other and nothing else: whatever a Tailscale binary tries to reach outside the test (log servers,
DERP maps, the host's DNS resolver) gets "network unreachable" from the hub and never leaves the
machine.  The default route matters: with loopback alone, tsnet and tailscaled see no network and
pause their control client ("control: setPaused(true)").

Every Tailscale process runs with ``TS_NO_LOGS_NO_SUPPORT=true`` (nothing is uploaded), tailscaled
with ``--tun=userspace-networking`` and its own ``--statedir`` and ``--socket`` in the rig's temp
folder.  DERP: headscale refuses to start with an empty DERP map, so :meth:`TailnetRig.headscale`
enables headscale's embedded DERP server on its own address, and the clients get
``TS_DEBUG_USE_DERP_HTTP=1`` (DERP over plain HTTP on the control port, as the server has no TLS).

The binaries come from :mod:`gopeers`; the fixtures in ``conftest.py`` build them (or skip/fail).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gopeers
import httpx
from netns import Namespace, NetnsRig, RigError, VethLink, wait_for

TS_ENV = {
    "TS_NO_LOGS_NO_SUPPORT": "true",  # no log upload, no support tooling
    "TS_DEBUG_USE_DERP_HTTP": "1",  # the test's DERP servers speak plain HTTP
}
# Variables that would send a child's traffic somewhere else (proxies) or change where it keeps state.
_DROP_ENV_PREFIXES = ("TS_", "http_proxy", "https_proxy", "all_proxy", "no_proxy")


@dataclass(frozen=True)
class TailscaleBins:
    """Paths of the Tailscale binaries (tailscale.com v1.102.5)."""

    tailscaled: Path
    tailscale: Path
    derper: Path


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for Tailscale processes: ours, minus proxies and TS_ knobs, plus TS_ENV."""
    env = {k: v for k, v in os.environ.items() if not k.lower().startswith(_DROP_ENV_PREFIXES)}
    env.update(TS_ENV)
    env.update(extra or {})
    return env


@dataclass(frozen=True)
class Host:
    """A namespace of the tailnet rig: reachable from every other host at ``ip``."""

    ns: Namespace
    ip: str
    name: str
    #: Its interface into the hub (for captures).
    ifname: str = ""


class TailnetRig:
    """Hosts behind one dead-end namespace, and the Tailscale processes on them."""

    def __init__(self, rig: NetnsRig) -> None:
        self.rig = rig
        self.hub = rig.add_namespace("hub")
        # The hub routes between the hosts' /30s; it has no link anywhere else.
        self.hub.run(["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])
        self.hosts: list[Host] = []
        self._root_link: VethLink | None = None

    @property
    def tmpdir(self) -> Path:
        return self.rig.tmpdir

    def add_host(self, name: str) -> Host:
        """A namespace with a veth into the hub, an address and a default route through it."""
        ns = self.rig.add_namespace(name)
        link = self.rig.veth_between(self.hub, ns)
        ns.ip("route", "add", "default", "via", link.a.ip)
        # No IPv6 on the host: no router advertisements, no link-local candidates to chase.
        ns.run(["sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1"])
        host = Host(ns, link.b.ip, name, link.b.ifname)
        self.hosts.append(host)
        if self._root_link is not None:
            self._route_from_root(host)
        return host

    def attach_root(self) -> str:
        """Let the test process itself (the root namespace) be a host: a veth from root into the
        hub, and a route from root to each host's address (no other: root sends nothing else into
        the rig, and the hub still has no route out). Returns the root end's address, which an
        in-process embedmesh Node binds its UDP socket to."""
        if self._root_link is None:
            self._root_link = self.rig.veth_to_root(self.hub)
            for host in self.hosts:
                self._route_from_root(host)
        return self._root_link.a.ip

    def _route_from_root(self, host: Host) -> None:
        assert self._root_link is not None
        self.rig.root.ip("route", "replace", f"{host.ip}/32", "via", self._root_link.b.ip)

    def state_dir(self, name: str) -> Path:
        """A fresh 0700 folder in the rig's temp folder (removed by the rig)."""
        path = self.tmpdir / f"{name}-{secrets.token_hex(3)}"
        path.mkdir(mode=0o700)
        return path

    # processes -----------------------------------------------------------------------------------

    def headscale(self, binary: Path, host: Host | None = None, *, base_domain: str = "ts.test") -> Headscale:
        """Start headscale (SQLite in a temp folder) on host's address, port 8080; wait until it
        answers.  A reusable pre-auth key is one create_authkey() away."""
        host = host or self.add_host("headscale")
        hs = Headscale(self, binary, host, base_domain)
        hs.start()
        return hs

    def tailscaled(
        self, bins: TailscaleBins, name: str, host: Host | None = None, *, derp_tls: bool = False
    ) -> Tailscaled:
        """Start tailscaled (userspace networking, a SOCKS5 server on 127.0.0.1:1055 of its
        namespace, UDP port 41641) in a host of its own; wait until its socket answers.
        ``derp_tls``: DERP over TLS, as by default (the rig's derper speaks plain HTTP)."""
        host = host or self.add_host(name)
        ts = Tailscaled(self, bins, name, host, derp_tls=derp_tls)
        ts.start()
        return ts

    def tsnet(
        self,
        binary: Path,
        name: str,
        control_url: str,
        authkey: str,
        *args: str,
        host: Host | None = None,
    ) -> TsnetPeer:
        """Start tests/interop/go/tsnetpeer as tailnet node `name` (extra flags in args, e.g.
        ``"-http", "80"``); it joins at once, wait_up() waits for it."""
        host = host or self.add_host(name)
        state = self.state_dir(name)
        argv = [str(binary), "-control", control_url, "-hostname", name, "-dir", str(state), *args]
        env = child_env({"TS_AUTHKEY": authkey})  # not in argv: `ps` shows argv
        # stdout (JSON events) and stderr (logs) share the rig's log file, so failures show both.
        proc = host.ns.popen(argv, log_name=f"tsnetpeer-{name}", env=env)
        return TsnetPeer(name, host, proc, Path(proc.log_path))  # type: ignore[attr-defined]


class Headscale:
    """A headscale server in a host of the rig (config, SQLite and keys in its state folder)."""

    port = 8080

    def __init__(self, trig: TailnetRig, binary: Path, host: Host, base_domain: str) -> None:
        self.trig = trig
        self.binary = binary
        self.host = host
        self.base_domain = base_domain
        self.dir = trig.state_dir("headscale")
        self.url = f"http://{host.ip}:{self.port}"
        self.config = self.dir / "config.yaml"
        self.process: subprocess.Popen[Any] | None = None
        self._user_id: int | None = None

    def _write_config(self) -> None:
        d, ip = self.dir, self.host.ip
        # Everything listens on the host's address or on its namespace's loopback.
        config = gopeers.headscale_config(
            d,
            server_url=self.url,
            listen=f"{ip}:{self.port}",
            ip=ip,
            metrics="127.0.0.1:9090",
            grpc="127.0.0.1:50443",
            stun=f"{ip}:3478",
            base_domain=self.base_domain,
        )
        self.config.write_text(json.dumps(config, indent=1))

    def start(self, timeout: float = 30.0) -> None:
        self._write_config()
        self.process = self.host.ns.popen(
            [str(self.binary), "--config", str(self.config), "serve"], log_name="headscale", env=child_env()
        )
        process = self.process

        def answering() -> bool:
            if process.poll() is not None:
                raise RigError(f"headscale exited with {process.returncode}:\n{self.log()}")
            probe = [
                "curl",
                "-sS",
                "-o",
                "/dev/null",
                "-m",
                "2",
                "-w",
                "%{http_code}",
                f"{self.url}/key?v=100",
            ]
            return self.host.ns.run(probe, check=False, env=child_env()).stdout.strip() == "200"

        wait_for(answering, timeout=timeout, interval=0.1, what="headscale to answer /key")
        wait_for(lambda: (self.dir / "headscale.sock").exists(), timeout=timeout, what="headscale's socket")

    def log(self) -> str:
        path = getattr(self.process, "log_path", None)
        return Path(path).read_text(errors="replace") if path else ""

    def cli(self, *args: str, timeout: float = 30.0) -> str:
        """`headscale --config C ARGS...` against the running server; its stdout (RigError on failure)."""
        argv = [str(self.binary), "--config", str(self.config), *args]
        return self.host.ns.run(argv, timeout=timeout, env=child_env()).stdout

    def cli_json(self, *args: str) -> Any:
        return json.loads(self.cli(*args, "--output", "json"))

    def user_id(self, name: str = "test") -> int:
        """The id of user `name`, created on first use."""
        for user in self.cli_json("users", "list") or []:
            if user.get("name") == name:
                return int(user["id"])
        created = self.cli_json("users", "create", name)
        return int(created["id"])

    def create_authkey(self, *, user: str = "test", reusable: bool = True, ephemeral: bool = False) -> str:
        """A pre-auth key of `user` (valid one hour)."""
        args = ["preauthkeys", "create", "--user", str(self.user_id(user)), "--expiration", "1h"]
        if reusable:
            args.append("--reusable")
        if ephemeral:
            args.append("--ephemeral")
        key = self.cli_json(*args)
        return str(key["key"])

    def nodes(self) -> list[dict[str, Any]]:
        """`headscale nodes list` as JSON objects."""
        return list(self.cli_json("nodes", "list") or [])


class Tailscaled:
    """A tailscaled (userspace networking) and its `tailscale` CLI, in a host of the rig."""

    socks5_port = 1055
    udp_port = 41641

    def __init__(self, trig: TailnetRig, bins: TailscaleBins, name: str, host: Host, *, derp_tls: bool = False) -> None:
        self.trig = trig
        self.bins = bins
        self.name = name
        self.host = host
        #: Speak TLS to DERP as Tailscale's clients do by default (no TS_DEBUG_USE_DERP_HTTP).
        self.derp_tls = derp_tls
        self.dir = trig.state_dir(f"tailscaled-{name}")
        self.socket = self.dir / "tailscaled.sock"
        self.process: subprocess.Popen[Any] | None = None

    def start(self, timeout: float = 20.0) -> None:
        argv = [
            str(self.bins.tailscaled),
            "--tun=userspace-networking",
            f"--statedir={self.dir}",
            f"--socket={self.socket}",
            f"--port={self.udp_port}",
            f"--socks5-server=127.0.0.1:{self.socks5_port}",
            "--no-logs-no-support",
        ]
        env = child_env()
        if self.derp_tls:
            env.pop("TS_DEBUG_USE_DERP_HTTP", None)
        self.process = self.host.ns.popen(argv, log_name=f"tailscaled-{self.name}", env=env)
        process = self.process

        def answering() -> bool:
            if process.poll() is not None:
                raise RigError(f"tailscaled {self.name} exited with {process.returncode}:\n{self.log()}")
            if not self.socket.exists():
                return False
            out = self.cli("status", "--json", check=False).stdout
            return '"BackendState"' in out

        wait_for(answering, timeout=timeout, interval=0.1, what=f"tailscaled {self.name}'s socket")

    def log(self) -> str:
        path = getattr(self.process, "log_path", None)
        return Path(path).read_text(errors="replace") if path else ""

    def cli(self, *args: str, check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """`tailscale --socket S ARGS...` in the host's namespace."""
        argv = [str(self.bins.tailscale), f"--socket={self.socket}", *args]
        return self.host.ns.run(argv, check=check, timeout=timeout, env=child_env())

    def up(self, login_server: str, authkey: str, *args: str, timeout: float = 60.0) -> None:
        """`tailscale up` with a pre-auth key; returns once the node is Running."""
        self.cli(
            "up",
            f"--login-server={login_server}",
            f"--authkey={authkey}",
            f"--hostname={self.name}",
            f"--timeout={int(timeout)}s",
            *args,
            timeout=timeout + 10,
        )

    def up_async(
        self, login_server: str, authkey: str, *args: str, timeout: float = 60.0
    ) -> Callable[[], None]:
        """Start `tailscale up` in the background; the returned function waits for it (RigError on
        failure), so several nodes can join at once."""
        argv = [
            str(self.bins.tailscale),
            f"--socket={self.socket}",
            "up",
            f"--login-server={login_server}",
            f"--authkey={authkey}",
            f"--hostname={self.name}",
            f"--timeout={int(timeout)}s",
            *args,
        ]
        proc = subprocess.Popen(
            self.host.ns.wrap(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=child_env(),
        )

        def wait() -> None:
            try:
                out, _ = proc.communicate(timeout=timeout + 10)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, _ = proc.communicate()
            if proc.returncode != 0:
                raise RigError(f"tailscale up on {self.name} failed (exit {proc.returncode}): {out}")

        return wait

    def status(self) -> dict[str, Any]:
        """`tailscale status --json`."""
        return json.loads(self.cli("status", "--json").stdout)  # type: ignore[no-any-return]

    def peer_names(self) -> set[str]:
        """The MagicDNS names (without the final dot) of the peers in this node's netmap."""
        peers = (self.status().get("Peer") or {}).values()
        return {str(p.get("DNSName", "")).rstrip(".") for p in peers}

    def wait_peers(self, names: set[str], timeout: float = 30.0) -> set[str]:
        """Wait until every name in names is a peer; all peer names then."""

        def seen() -> set[str]:
            current = self.peer_names()
            return current if current >= names else set()

        return wait_for(
            seen,
            timeout=timeout,
            interval=0.2,
            what=f"{self.name} to see {sorted(names)}",
        )

    def ipv4(self) -> str:
        ips = self.status()["Self"]["TailscaleIPs"]
        return next(str(ip) for ip in ips if ":" not in ip)

    def ping(self, target: str, *args: str, timeout: float = 30.0) -> str:
        """`tailscale ping TARGET` (disco, stops at the first direct pong); its output."""
        return self.cli("ping", "--timeout=5s", "--c=20", *args, target, timeout=timeout).stdout

    def ping_when_known(self, target: str, *args: str, attempts: int = 40) -> str:
        """`tailscale ping TARGET`, retried while tailscaled says "unknown peer": it puts a new
        peer into its engine a moment after its map has it."""
        for attempt in range(attempts):
            try:
                return self.ping(target, *args)
            except RigError as exc:
                if "unknown peer" not in str(exc) or attempt == attempts - 1:
                    raise
                time.sleep(0.5)
        raise AssertionError("unreachable")

    def curl(self, url: str, *, timeout: float = 20.0) -> str:
        """GET url through this tailscaled's SOCKS5 server (names resolved by tailscaled, so
        MagicDNS names work); the body."""
        argv = [
            "curl",
            "-sS",
            "--fail",
            "-m",
            str(int(timeout)),
            "--socks5-hostname",
            f"127.0.0.1:{self.socks5_port}",
            url,
        ]
        return self.host.ns.run(argv, timeout=timeout + 5, env=child_env()).stdout


@dataclass
class TsnetPeer:
    """A running tsnetpeer; its JSON events are read from stdout."""

    name: str
    host: Host
    process: subprocess.Popen[Any]
    log_path: Path

    def events(self) -> list[dict[str, Any]]:
        """The JSON event lines printed so far (log lines, which start with a date, are skipped)."""
        out: list[dict[str, Any]] = []
        with contextlib.suppress(OSError):
            for line in self.log_path.read_text(errors="replace").splitlines():
                if line.startswith('{"'):
                    with contextlib.suppress(ValueError):
                        out.append(json.loads(line))
        return out

    def wait_event(self, event: str, timeout: float = 60.0) -> dict[str, Any]:
        def found() -> dict[str, Any]:
            for e in self.events():
                if e.get("event") == event:
                    return e
            if self.process.poll() is not None:
                raise RigError(f"tsnetpeer {self.name} exited with {self.process.returncode}:\n{self.log()}")
            return {}  # falsy: not yet

        return wait_for(found, timeout=timeout, interval=0.1, what=f"tsnetpeer {self.name}: {event}")

    def wait_up(self, timeout: float = 60.0) -> dict[str, Any]:
        return self.wait_event("up", timeout)

    def log(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-6000:]
        return ""


@contextlib.asynccontextmanager
async def serving_node(
    control_url: str, auth_key: str, state_dir: Path, listen_host: str, app: Any, address: str = ":8080"
) -> AsyncIterator[Any]:
    """An embedmesh Node "py" in the tailnet, up, serving ``app`` on ``address`` until the block
    ends (the node is closed, and logs out if ephemeral, as it leaves)."""


    # The rig's DERP servers speak plain HTTP: the node follows Tailscale's knob, as tailscaled does.
    saved = os.environ.get("TS_DEBUG_USE_DERP_HTTP")
    os.environ["TS_DEBUG_USE_DERP_HTTP"] = "1"
    try:
        async with _serving_node(control_url, auth_key, state_dir, listen_host, app, address) as node:
            yield node
    finally:
        if saved is None:
            os.environ.pop("TS_DEBUG_USE_DERP_HTTP", None)
        else:
            os.environ["TS_DEBUG_USE_DERP_HTTP"] = saved


@contextlib.asynccontextmanager
async def _serving_node(
    control_url: str, auth_key: str, state_dir: Path, listen_host: str, app: Any, address: str
) -> AsyncIterator[Any]:
    import anyio

    import embedmesh

    async with (
        embedmesh.Node(
            control_url=control_url,
            hostname="py",
            auth_key=auth_key,
            state_dir=state_dir,
            listen_host=listen_host,
        ) as node,
        anyio.create_task_group() as tg,
    ):
        await node.up(timeout=30)
        tg.start_soon(node.serve_asgi, app, address)
        yield node
        tg.cancel_scope.cancel()


class EmbedmeshControl:
    """`embedmesh control serve` (and a derper, in its DERP map) in a host of the rig."""

    def __init__(self, tailnet: TailnetRig, bins: TailscaleBins, *flags: str, relays: str = "both") -> None:
        """``relays``: "both" (a derper as region 900 and the server's embedded relay, region
        999), "derper" (the derper only: ``--no-derp``) or "embedded" (the embedded one only)."""
        tailnet.attach_root()  # the test process talks to the admin API
        host = tailnet.add_host("control")
        self.host = host
        state = tailnet.state_dir("control")
        self.url = url = f"http://{host.ip}:8080"
        relay_flags: list[str] = []
        derp: subprocess.Popen[Any] | None = None
        if relays in ("both", "derper"):
            # Tailscale's client reaches Running only with a live DERP connection or live peers,
            # so the tailnet has a real derper (plain HTTP: the clients run with
            # TS_DEBUG_USE_DERP_HTTP=1).
            derp = host.ns.popen(
                [
                    str(bins.derper),
                    "-a",
                    f"{host.ip}:3340",
                    "-http-port",
                    "-1",
                    "-stun-port",
                    "3478",
                    "-c",
                    str(state / "derper.json"),
                ],
                log_name="derper",
                env=child_env(),
            )
            derp_map = state / "derp-map.json"
            derp_map.write_text(
                json.dumps(
                    {
                        "Regions": {
                            "900": {
                                "RegionID": 900,
                                "RegionCode": "test",
                                "RegionName": "the test's derper",
                                "Nodes": [
                                    {
                                        "Name": "900a",
                                        "RegionID": 900,
                                        "HostName": host.ip,
                                        "IPv4": host.ip,
                                        "DERPPort": 3340,
                                        "STUNPort": 3478,
                                        "InsecureForTests": True,
                                    }
                                ],
                            }
                        }
                    }
                )
            )
            relay_flags += ["--derp-map", str(derp_map)]
        if relays == "derper":
            relay_flags.append("--no-derp")
        else:
            # The embedded relay (region 999) beside the derper, which has 3340.
            relay_flags += ["--derp-port", "3341", "--stun-port", "3479"]
        server = host.ns.popen(
            [
                sys.executable,
                "-m",
                "embedmesh.cli.main",
                "control",
                "serve",
                "--listen",
                f"{host.ip}:8080",
                "--state-dir",
                str(state),
                *relay_flags,
                *flags,
            ],
            log_name="embedmesh-control",
            env=child_env(),
        )

        def answering() -> bool:
            if derp is not None and derp.poll() is not None:
                raise RigError(f"derper exited with {derp.returncode}")
            if server.poll() is not None:
                raise RigError(f"embedmesh control serve exited with {server.returncode}")
            try:
                return httpx.get(f"{url}/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(answering, timeout=20, interval=0.1, what="the embedmesh control server")
        token = (state / "admin-token").read_text().strip()
        self.admin = httpx.Client(
            base_url=f"{url}/admin/v1", headers={"authorization": f"Bearer {token}"}, timeout=10
        )

    def key(self, **options: object) -> str:
        return str(self.admin.post("/authkeys", json=options).json()["key"])

    def nodes(self) -> dict[str, dict[str, object]]:
        return {n["name"]: n for n in self.admin.get("/nodes").json()["nodes"]}

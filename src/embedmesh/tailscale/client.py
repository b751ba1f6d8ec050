"""A node's client of a Tailscale-protocol control server (headscale, Tailscale's, embedmesh's).

It does what Go's ``controlclient`` does for tailscaled and tsnet, on the transport of
:mod:`.noiseclient`: ``POST /machine/register`` (an auth key on first join; none on restarts,
where the server recognises the node key), then the ``/machine/map`` long poll, whose messages a
:class:`~.mapsession.MapSession` turns into the node's :class:`NetworkMap`. A broken stream is
reopened with backoff; endpoint changes go out as "lite" map requests; :meth:`logout` registers
with an expiry in the past, as ``tailscale logout`` does.

It has the surface of :class:`embedmesh.control.client.ControlClient`, so :class:`Node` drives
either one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import random
import ssl
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import anyio
import anyio.abc
import httpx

import embedmesh
from embedmesh.control.errors import (
    AuthKeyRequiredError,
    ControlError,
    ControlUnreachableError,
)
from embedmesh.control.netmap import NetworkMap, NodeState
from embedmesh.errors import NodeError
from embedmesh.tailscale import controlhttp, mapframe, tailcfg
from embedmesh.tailscale.errors import TailscaleProtocolError
from embedmesh.tailscale.keys import DiscoPublic, MachinePrivate, MachinePublic, NodePrivate
from embedmesh.tailscale.mapsession import MapSession
from embedmesh.tailscale.noiseclient import ControlConnection, connect_control, fetch_server_key

logger = logging.getLogger("embedmesh.control")

#: Go's client gives up on a map stream that is silent this long (servers keep-alive every ~50 s).
MAP_WATCHDOG = 120.0
#: What a logout's RegisterRequest carries as Expiry (as Go's client sends it).
LOGOUT_EXPIRY = 123.0
_RETRYABLE = (ControlUnreachableError, TailscaleProtocolError, OSError)


class TailscaleControlClient:
    """Registers a node with a Tailscale-protocol control server and follows its map."""

    def __init__(
        self,
        control_url: str,
        *,
        machine_key: bytes,
        node_key: bytes,
        disco_key: bytes,
        hostname: str,
        os_name: str | None = None,
        tags: Sequence[str] = (),
        ephemeral: bool = False,
        auth_key: str | None = None,
        state_dir: str | os.PathLike[str] | None = None,
        endpoints: Sequence[str] = (),
        on_netmap: Callable[[NetworkMap], None] | None = None,
        start_timeout: float = 0.0,
        reconnect_min: float = 0.5,
        reconnect_max: float = 30.0,
        rng: random.Random | None = None,
        ssl_context: ssl.SSLContext | None = None,
        capability_version: int = tailcfg.CAPABILITY_VERSION,
    ) -> None:
        self.control_url = control_url.rstrip("/")
        #: The capability version announced (Noise prologue, /key, every request): the Tailscale
        #: release this client claims to be; tests lower it to play an older client.
        self.capability_version = capability_version
        #: Trust for an https:// control URL (None: the system's CAs).
        self.ssl_context = ssl_context
        self._machine = MachinePrivate(machine_key)
        self._node = NodePrivate(node_key)
        self._disco = DiscoPublic(disco_key)
        self.hostname = hostname
        self.os_name = platform.system().lower() if os_name is None else os_name
        self.tags = tuple(tags)
        self.ephemeral = ephemeral
        self._auth_key = auth_key
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self.endpoints = tuple(endpoints)
        self.on_netmap = on_netmap
        self.start_timeout = start_timeout
        self.reconnect_min = reconnect_min
        self.reconnect_max = reconnect_max
        self._rng = rng or random.Random()
        self.node_id: int | None = None
        self.netmap: NetworkMap | None = None
        self.connected = False
        self.reconnects = 0
        self.error: ControlError | None = None
        self.logged_out = False
        #: The URL to open to log the node in, when the server asked for an interactive login.
        self.auth_url = ""
        self._changed = anyio.Event()
        self._conn: ControlConnection | None = None
        self._task_group: anyio.abc.TaskGroup | None = None
        self._closed = False
        self._session = MapSession()
        self._server_key: MachinePublic | None = None

    def __repr__(self) -> str:
        return f"TailscaleControlClient({self.control_url!r}, hostname={self.hostname!r}, node_id={self.node_id})"

    # ------------------------------------------------------------------ the surface Node uses

    @property
    def state(self) -> NodeState | None:
        return None if self.netmap is None else self.netmap.state

    @property
    def waiting_for_approval(self) -> bool:
        return self.state is NodeState.PENDING_APPROVAL or (self.netmap is None and bool(self.auth_url))

    async def __aenter__(self) -> TailscaleControlClient:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Register and receive the first map, then keep the stream up in the background."""
        if self._task_group is not None:
            raise NodeError("the control client is already started")
        await self._wait_for_server()
        self._task_group = anyio.create_task_group()
        await self._task_group.__aenter__()
        self._task_group.start_soon(self._run)
        try:
            # The first map, or an interactive login to wait for (the caller shows its URL).
            while self.netmap is None and not self.auth_url:
                if self.error is not None:
                    raise self.error
                await self._changed.wait()
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._task_group is not None:
            self._task_group.cancel_scope.cancel()
            await self._task_group.__aexit__(None, None, None)
            self._task_group = None
        self.connected = False
        self._notify()

    async def update_endpoints(self, endpoints: Sequence[str]) -> None:
        """Report new underlay endpoints (a "lite" map request: no stream, no peers)."""
        new = tuple(endpoints)
        if new == self.endpoints:
            return
        self.endpoints = new
        conn = self._conn
        if conn is not None:
            with contextlib.suppress(*_RETRYABLE):
                await conn.request("POST", "/machine/map", self._map_request(stream=False))

    async def logout(self, timeout: float = 10.0) -> None:
        """Leave the tailnet (the server expires the node key; an ephemeral node is deleted)."""
        conn = self._conn
        if conn is None:
            raise NodeError("not connected to the control server: cannot log out now")
        body = tailcfg.register_request(
            self._node.public(),
            hostinfo=self._hostinfo(),
            expiry=LOGOUT_EXPIRY,
            ephemeral=self.ephemeral,
            version=self.capability_version,
        )
        with anyio.fail_after(timeout):
            await conn.request("POST", "/machine/register", body)
        self.logged_out = True
        await self.close()

    async def wait_for_netmap(
        self, predicate: Callable[[NetworkMap], bool] | None = None, timeout: float | None = None
    ) -> NetworkMap:
        with anyio.fail_after(timeout):
            while True:
                if self.error is not None:
                    raise self.error
                changed = self._changed
                netmap = self.netmap
                if netmap is not None and (predicate is None or predicate(netmap)):
                    return netmap
                if self._closed:
                    raise NodeError("the control client is closed")
                await changed.wait()

    async def wait_for_approval(self, timeout: float | None = None) -> NetworkMap:
        return await self.wait_for_netmap(lambda m: m.state is NodeState.AUTHORIZED, timeout)

    # ------------------------------------------------------------------ internals

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    def _hostinfo(self) -> dict[str, object]:
        return tailcfg.hostinfo(
            self.hostname, self.os_name, version=f"embedmesh-{embedmesh.__version__}", request_tags=self.tags
        )

    def _map_request(self, *, stream: bool) -> bytes:
        return tailcfg.map_request(
            self._node.public(),
            self._disco,
            hostinfo=self._hostinfo(),
            endpoints=self.endpoints,
            stream=stream,
            omit_peers=not stream,
            version=self.capability_version,
        )

    async def _wait_for_server(self) -> None:
        """Retry ``/key`` with backoff for :attr:`start_timeout` seconds (server starting too)."""
        deadline = time.monotonic() + self.start_timeout
        backoff = self.reconnect_min
        while True:
            try:
                self._server_key = await fetch_server_key(
                    self.control_url, self.capability_version, ssl_context=self.ssl_context, timeout=10
                )
                return
            except ControlUnreachableError as exc:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise
                logger.warning("waiting for the control server at %s (%s)", self.control_url, exc)
                await anyio.sleep(min(backoff, remaining))
                backoff = min(backoff * 2, self.reconnect_max)

    async def _run(self) -> None:
        backoff = self.reconnect_min
        while not self._closed:
            try:
                # The server's key, once fetched, is kept for reconnects (as Go's client caches it).
                async with connect_control(
                    self.control_url,
                    self._machine,
                    self.capability_version,
                    server_key=self._server_key,
                    ssl_context=self.ssl_context,
                ) as conn:
                    self._conn = conn
                    await self._register(conn)
                    backoff = self.reconnect_min
                    await self._poll(conn)
            except ControlError as exc:
                if not isinstance(exc, ControlUnreachableError):
                    self.error = exc
                    self._notify()
                    return
                logger.info("control connection lost (%s); reconnecting", exc)
            except (TailscaleProtocolError, OSError) as exc:
                logger.info("control connection lost (%s: %s); reconnecting", type(exc).__name__, exc)
            finally:
                self._conn = None
                if self.connected:
                    self.connected = False
                    self._notify()
            self.reconnects += 1
            await anyio.sleep(backoff * (0.5 + self._rng.random() / 2))
            backoff = min(backoff * 2, self.reconnect_max)

    async def _register(self, conn: ControlConnection) -> None:
        # A known node (the server knows its node key) registers without a key; a new one uses
        # the auth key. The server's answer says which case it is.
        attempts: list[str | None] = [None] if self._registered_before() else []
        if self._auth_key is not None:
            attempts.append(self._auth_key)
        if not attempts:
            attempts = [None]
        for auth_key in attempts:
            body = tailcfg.register_request(
                self._node.public(),
                hostinfo=self._hostinfo(),
                auth_key=auth_key,
                ephemeral=self.ephemeral,
                version=self.capability_version,
            )
            reply = await conn.request("POST", "/machine/register", body)
            if reply.status != 200:
                raise AuthKeyRequiredError(
                    f"the control server refused the registration: HTTP {reply.status}: "
                    f"{reply.body.decode('utf-8', 'replace').strip()[:300]}"
                )
            answer = tailcfg.parse_register_response(reply.body)
            if answer.error:
                raise AuthKeyRequiredError(f"the control server refused the registration: {answer.error}")
            if answer.machine_authorized:
                self._remember_registration()
                self.auth_url = ""
                return
            if answer.auth_url:
                self.auth_url = answer.auth_url
        if self.auth_url:
            logger.warning("to log this node in, open %s", self.auth_url)
            self._notify()
            # Wait for the login: Go's client re-registers with Followup, which blocks until then.
            body = tailcfg.register_request(
                self._node.public(),
                hostinfo=self._hostinfo(),
                followup=self.auth_url,
                ephemeral=self.ephemeral,
                version=self.capability_version,
            )
            reply = await conn.request("POST", "/machine/register", body)
            answer = tailcfg.parse_register_response(reply.body)
            if answer.error or not answer.machine_authorized:
                raise AuthKeyRequiredError(answer.error or "the login did not authorize this node")
            self._remember_registration()
            self.auth_url = ""

    def _registration_marker(self) -> Path | None:
        return None if self.state_dir is None else self.state_dir / "tailscale-registered"

    def _registered_before(self) -> bool:
        marker = self._registration_marker()
        return marker is not None and marker.exists() and marker.read_text().strip() == self.control_url

    def _remember_registration(self) -> None:
        marker = self._registration_marker()
        if marker is not None and not self._registered_before():
            fd = os.open(marker, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(self.control_url + "\n")

    async def _poll(self, conn: ControlConnection) -> None:
        self._session = MapSession()
        reader = mapframe.MapStreamReader(compressed=True)
        async with conn.stream("POST", "/machine/map", self._map_request(stream=True)) as response:
            if response.status != 200:
                raise TailscaleProtocolError(
                    f"the control server refused the map request: HTTP {response.status}"
                )
            chunks = response.__aiter__()
            while True:
                with anyio.fail_after(MAP_WATCHDOG):
                    try:
                        chunk = await chunks.__anext__()
                    except StopAsyncIteration:
                        raise TailscaleProtocolError("the control server ended the map stream") from None
                for body in reader.receive_data(chunk):
                    self._handle(tailcfg.parse_map_response(body))

    def _handle(self, message: tailcfg.MapResponse) -> None:
        now = time.time()
        if not self._session.apply(message, now):
            return
        netmap = self._session.network_map(now)
        self.node_id = netmap.self_node.id
        first = self.netmap is None
        self.netmap = netmap
        if not self.connected:
            self.connected = True
        if first:
            logger.info("in the tailnet as %s (%d peers)", netmap.self_node.fqdn, len(netmap.peers))
        if self.on_netmap is not None:
            self.on_netmap(netmap)
        self._notify()


async def speaks_tailscale(url: str, timeout: float = 5.0) -> bool:
    """Whether a node should use Tailscale's protocol with ``url``: its ``/key`` has a Noise key
    and no embedmesh protocol version (embedmesh's server speaks both; its nodes keep its own)."""
    try:
        async with httpx.AsyncClient(timeout=timeout, trust_env=False) as http:
            reply = await http.get(url.rstrip("/") + controlhttp.key_path(tailcfg.CAPABILITY_VERSION))
        if reply.status_code != 200 or b'"protocol_version"' in reply.content:
            return False
        controlhttp.parse_key_response(reply.content)
    except (httpx.HTTPError, TailscaleProtocolError):
        return False
    return True

"""A node's control client: Tailscale's control protocol, to any Tailscale-protocol server.

It does what Go's ``controlclient`` does for tailscaled and tsnet, on the transport of
:mod:`.noiseclient`, and it is the only control client embedmesh has: embedmesh's own server,
headscale and Tailscale's service all speak this protocol::

    async with TailscaleControlClient(url, machine_key=..., node_key=..., disco_key=...,
                                      hostname="web", auth_key=key, state_dir=path) as client:
        await client.wait_for_approval()
        async for netmap in client.netmaps():
            ...

Entering the context fetches the server's key (``GET /key``), pins it on first use in
``state_dir``, registers (``POST /machine/register``: the auth key on first join; none on
restarts, where the server knows the node key) and receives the first map of the
``/machine/map`` long poll, whose messages a :class:`~.mapsession.MapSession` turns into the
node's :class:`NetworkMap`. A server that asks for an interactive login makes :attr:`auth_url` the
URL to open; the client waits for the login in the background.

Afterwards the client keeps the stream up and reopens it with exponential backoff whenever it
breaks (the last map stays valid meanwhile); endpoint changes go out as "lite" map requests;
:meth:`logout` registers with an expiry in the past, as ``tailscale logout`` does. Refusals raise
the :mod:`embedmesh.control.errors` class that explains them (a bad, used, expired or revoked auth
key, an unreachable server, a changed server key); embedmesh's server names the class in an
``EmbedmeshError`` field, other servers' refusals are :class:`AuthKeyRequiredError`. Errors that
retrying cannot fix (the node was deleted, its approval refused) end the client: :attr:`error`
holds them, and :meth:`wait_for_approval`, :meth:`wait_for_netmap` and :meth:`netmaps` raise them.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import platform
import random
import ssl
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import anyio
import anyio.abc

import embedmesh
from embedmesh.control.errors import (
    AuthKeyRequiredError,
    ControlError,
    ControlUnreachableError,
    ProtocolVersionError,
    ServerKeyChangedError,
    error_from_code,
)
from embedmesh.control.messages import parse_endpoint
from embedmesh.control.netmap import NetworkMap, NodeState
from embedmesh.control.store import create_private_file
from embedmesh.control.url import split_url
from embedmesh.errors import NodeError
from embedmesh.tailscale import mapframe, tailcfg
from embedmesh.tailscale.errors import TailscaleProtocolError
from embedmesh.tailscale.keys import DiscoPublic, MachinePrivate, MachinePublic, NodePrivate
from embedmesh.tailscale.mapsession import MapSession
from embedmesh.tailscale.noiseclient import (
    ControlConnection,
    ControlKeyStatusError,
    connect_control,
    fetch_server_key,
)

logger = logging.getLogger("embedmesh.control.client")

#: Go's client gives up on a map stream that is silent this long (servers keep-alive every ~50 s).
MAP_WATCHDOG = 120.0
#: What a logout's RegisterRequest carries as Expiry (as Go's client sends it).
LOGOUT_EXPIRY = 123.0
#: The file in ``state_dir`` that pins the control server's key (trust on first use).
PIN_FILE = "control-server.json"
#: The file in ``state_dir`` that says this node registered with a server (restarts need no key).
REGISTERED_FILE = "tailscale-registered"
_RETRYABLE = (ControlUnreachableError, TailscaleProtocolError, OSError)


class TailscaleControlClient:
    """A node's membership in a tailnet, kept alive against a Tailscale-protocol control server."""

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
        connect_timeout: float = 15.0,
        reconnect_min: float = 0.5,
        reconnect_max: float = 30.0,
        rng: random.Random | None = None,
        ssl_context: ssl.SSLContext | None = None,
        capability_version: int = tailcfg.CAPABILITY_VERSION,
    ) -> None:
        split_url(control_url)  # a ConfigError that says what to write, before anything starts
        for key, name in ((machine_key, "machine_key"), (node_key, "node_key"), (disco_key, "disco_key")):
            if len(key) != 32:
                raise ValueError(f"{name} must be 32 bytes")
        for endpoint in endpoints:
            parse_endpoint(endpoint)
        self.control_url = control_url.rstrip("/")
        #: The capability version announced (Noise prologue, /key, every request): the Tailscale
        #: release this client claims to be; tests lower it to play an older client.
        self.capability_version = capability_version
        #: Trust for an https:// control URL (None: the system's CAs).
        self.ssl_context = ssl_context
        self._machine = MachinePrivate(machine_key)
        self._node = NodePrivate(node_key)
        self._disco = DiscoPublic(disco_key)
        #: The public halves (raw 32 bytes), as the server's admin API lists them.
        self.machine_public_key = self._machine.public().raw
        self.node_public_key = self._node.public().raw
        self.hostname = hostname
        self.os_name = platform.system().lower() if os_name is None else os_name
        self.tags = tuple(tags)
        self.ephemeral = ephemeral
        self._auth_key = auth_key
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self.endpoints = tuple(endpoints)
        #: The home DERP region reported in Hostinfo.NetInfo (0: none yet).
        self.preferred_derp = 0
        self.on_netmap = on_netmap
        #: How long :meth:`start` keeps retrying a server it cannot reach (0: fail at once).
        self.start_timeout = start_timeout
        #: The bound on connecting and registering once.
        self.connect_timeout = connect_timeout
        self.reconnect_min = reconnect_min
        self.reconnect_max = reconnect_max
        self._rng = rng or random.Random()
        #: The server's Noise key once known (pinned).
        self.server_key: MachinePublic | None = None
        self.node_id: int | None = None
        #: The latest network map (None until the first one arrives).
        self.netmap: NetworkMap | None = None
        #: Whether a map stream is up right now.
        self.connected = False
        #: How many times the client reconnected after losing the stream.
        self.reconnects = 0
        #: The error that ended the client, if any.
        self.error: ControlError | None = None
        self.logged_out = False
        #: The URL to open to log the node in, when the server asked for an interactive login.
        self.auth_url = ""
        self._changed = anyio.Event()
        self._conn: ControlConnection | None = None
        self._connection_scope: anyio.CancelScope | None = None
        self._task_group: anyio.abc.TaskGroup | None = None
        self._closed = False
        self._registered = False
        self._started = False
        self._start_deadline = 0.0
        self._session = MapSession()
        self._announced_state: NodeState | None = None

    def __repr__(self) -> str:
        state = self.state.value if self.state else None
        return (
            f"TailscaleControlClient({self.control_url!r}, hostname={self.hostname!r}, node_id={self.node_id}, "
            f"state={state}, connected={self.connected})"
        )

    # ------------------------------------------------------------------ public surface

    @property
    def state(self) -> NodeState | None:
        """AUTHORIZED, PENDING_APPROVAL or KEY_EXPIRED (None before the first map)."""
        return None if self.netmap is None else self.netmap.state

    @property
    def waiting_for_approval(self) -> bool:
        """Whether the node waits for an admin: its approval, or an interactive login."""
        return self.state is NodeState.PENDING_APPROVAL or (self.netmap is None and bool(self.auth_url))

    async def __aenter__(self) -> TailscaleControlClient:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Register and receive the first map (or the server's login URL), then keep the stream up
        in the background."""
        if self._task_group is not None:
            raise NodeError("the control client is already started")
        self._start_deadline = time.monotonic() + self.start_timeout
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
        self._started = True

    async def close(self) -> None:
        """Stop the stream (the node stays registered; see :meth:`logout`)."""
        if self._closed:
            return
        self._closed = True
        if self._task_group is not None:
            self._task_group.cancel_scope.cancel()
            await self._task_group.__aexit__(None, None, None)
            self._task_group = None
        self.connected = False
        self._notify()

    @property
    def derp_map(self) -> object | None:
        """The DERP map of the latest network map, as the server sent it (Tailscale's DERPMap
        JSON, decoded with Go's field matching; :func:`~embedmesh.tailscale.derpmap.parse_derp_map`
        reads it), or None before one came."""
        return self._session.derp_map

    async def update_endpoints(self, endpoints: Sequence[str], *, preferred_derp: int | None = None) -> None:
        """Report new underlay endpoints (``"ip:port"``) and home DERP region: a "lite" map
        request, no stream (nothing is sent when neither changed)."""
        for endpoint in endpoints:
            parse_endpoint(endpoint)
        new = tuple(endpoints)
        derp = self.preferred_derp if preferred_derp is None else preferred_derp
        if new == self.endpoints and derp == self.preferred_derp:
            return
        self.endpoints = new
        self.preferred_derp = derp
        conn = self._conn
        if conn is not None:
            try:
                with anyio.fail_after(self.connect_timeout):
                    await conn.request("POST", "/machine/map", self._map_request(stream=False))
            except (*_RETRYABLE, TimeoutError) as exc:
                # The next map request (after a reconnect) carries them.
                logger.debug("endpoint update not sent (%s); it goes with the next map request", exc)

    async def logout(self, timeout: float = 10.0) -> None:
        """Leave the tailnet: an ephemeral node is deleted at once; another has its key expired."""
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
            await self._register_once(conn, body)
        self.logged_out = True
        await self.close()

    async def reauthenticate(self, auth_key: str) -> None:
        """Register again with a new auth key (after the node key expired); reconnects the stream."""
        self._auth_key = auth_key
        if self._connection_scope is not None:
            self._connection_scope.cancel()
        await self.wait_for_netmap(lambda m: m.state is NodeState.AUTHORIZED)

    async def wait_for_netmap(
        self, predicate: Callable[[NetworkMap], bool] | None = None, timeout: float | None = None
    ) -> NetworkMap:
        """The current map once ``predicate`` holds for it (any map if no predicate)."""
        with anyio.fail_after(timeout):
            while True:
                self._raise_if_ended()
                changed = self._changed
                netmap = self.netmap
                if netmap is not None and (predicate is None or predicate(netmap)):
                    return netmap
                await changed.wait()

    async def wait_for_approval(self, timeout: float | None = None) -> NetworkMap:
        """Return once the node is in the tailnet (at once if it needed no approval)."""
        return await self.wait_for_netmap(lambda m: m.state is NodeState.AUTHORIZED, timeout)

    async def netmaps(self) -> AsyncIterator[NetworkMap]:
        """Each new map as it arrives (a slow consumer skips to the latest)."""
        seen: NetworkMap | None = None
        while True:
            self._raise_if_ended()
            changed = self._changed
            if self.netmap is not None and self.netmap is not seen:
                seen = self.netmap
                yield seen
                continue
            await changed.wait()

    # ------------------------------------------------------------------ internals

    def _raise_if_ended(self) -> None:
        if self.error is not None:
            raise self.error
        if self._closed:
            raise NodeError("the control client is closed")

    def _notify(self) -> None:
        changed, self._changed = self._changed, anyio.Event()
        changed.set()

    def _hostinfo(self) -> dict[str, object]:
        return tailcfg.hostinfo(
            self.hostname,
            self.os_name,
            version=f"embedmesh-{embedmesh.__version__}",
            request_tags=self.tags,
            preferred_derp=self.preferred_derp,
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
        """Fetch and pin the server's key, retrying with backoff for :attr:`start_timeout` seconds
        while the server cannot be reached (it may be starting along with this node)."""
        deadline = time.monotonic() + self.start_timeout
        backoff = self.reconnect_min
        announced = False
        while True:
            try:
                key = await self._fetch_key()
                break
            except (ControlUnreachableError, TailscaleProtocolError) as exc:
                remaining = deadline - time.monotonic()
                # A server that answers but not with a key will not start to; a proxy in front
                # of one that is still starting answers 502/503/504.
                if isinstance(exc, ControlKeyStatusError):
                    retry = exc.status >= 500
                else:
                    retry = isinstance(exc, ControlUnreachableError)
                if not retry or remaining <= 0:
                    waited = f" for {self.start_timeout:g} s" if self.start_timeout > 0 and retry else ""
                    raise ControlUnreachableError(
                        f"cannot reach the control server at {self.control_url}{waited} ({exc}); is "
                        "`embedmesh control serve` (or headscale) running there, and is the URL right?"
                    ) from exc
                if not announced:
                    announced = True
                    logger.warning(
                        "waiting for the control server at %s (%s); retrying for up to %.0f s",
                        self.control_url,
                        exc,
                        remaining,
                    )
                await anyio.sleep(min(backoff * (0.5 + self._rng.random() / 2), remaining))
                backoff = min(backoff * 2, self.reconnect_max)
        self._pin(key)

    async def _fetch_key(self) -> MachinePublic:
        return await fetch_server_key(
            self.control_url, self.capability_version, ssl_context=self.ssl_context, timeout=self.connect_timeout
        )

    def _pin(self, key: MachinePublic) -> None:
        """Trust on first use: remember the key; refuse a different one later."""
        new = base64.b64encode(key.raw).decode()
        if self.server_key is not None and self.server_key != key:
            old = base64.b64encode(self.server_key.raw).decode()
            raise ServerKeyChangedError(
                f"control server key changed from {old} to {new} while this node was running"
            )
        if self.state_dir is not None:
            path = self.state_dir / PIN_FILE
            if path.exists():
                try:
                    pinned = json.loads(path.read_text())["public_key"]
                except (ValueError, KeyError, TypeError) as exc:
                    raise ServerKeyChangedError(
                        f"{path} is damaged: delete it to pin the server key again"
                    ) from exc
                if pinned != new:
                    raise ServerKeyChangedError(
                        f"control server key changed from {pinned} to {new}; if you rotated it on purpose, "
                        f"delete {path}"
                    )
            else:
                self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
                record = {"control_url": self.control_url, "public_key": new}
                create_private_file(path, json.dumps(record, indent=2).encode() + b"\n")
                logger.info("pinned control server key %s in %s", key.to_text(), path)
        self.server_key = key

    async def _run(self) -> None:
        """Connect, register, poll; reconnect with backoff until closed or a fatal error."""
        backoff = self.reconnect_min
        while not self._closed:
            started = time.monotonic()
            try:
                with anyio.CancelScope() as scope:
                    self._connection_scope = scope
                    await self._connection()
            except ControlError as exc:
                if not isinstance(exc, ControlUnreachableError):
                    # Everything retryable is caught below: refused, deleted, a bad key... A
                    # refusal while starting is start()'s exception, for the caller to report.
                    if self._started:
                        logger.error("control client stopped: %s", exc)
                    self.error = exc
                    self._notify()
                    return
                if self._give_up_starting(exc):
                    return
                logger.info("control connection lost (%s); reconnecting", exc)
            except (TailscaleProtocolError, OSError, TimeoutError) as exc:
                if self._give_up_starting(exc):
                    return
                logger.info("control connection lost (%s: %s); reconnecting", type(exc).__name__, exc)
            finally:
                self._connection_scope = None
                self._conn = None
                if self.connected:
                    self.connected = False
                    self._notify()
            if self._closed:
                return
            if time.monotonic() - started > 10 * self.reconnect_max:
                backoff = self.reconnect_min
            self.reconnects += 1
            await anyio.sleep(backoff * (0.5 + self._rng.random() / 2))
            backoff = min(backoff * 2, self.reconnect_max)

    def _give_up_starting(self, exc: BaseException) -> bool:
        """While :meth:`start` waits for the first map, a broken connection is retried only for
        :attr:`start_timeout` seconds; then start() raises."""
        if self._started or time.monotonic() < self._start_deadline:
            return False
        self.error = ControlUnreachableError(
            f"lost the control server at {self.control_url} while joining ({type(exc).__name__}: {exc}); "
            "is it running, and is the URL right?"
        )
        self._notify()
        return True

    async def _connection(self) -> None:
        if self.reconnects:
            # The server may have been replaced while we were away: a different key fails the
            # pin (ServerKeyChangedError) instead of failing Noise handshakes forever.
            self._pin(await self._fetch_key())
        # connect_control bounds its own connect and handshake.
        async with connect_control(
            self.control_url,
            self._machine,
            self.capability_version,
            server_key=self.server_key,
            ssl_context=self.ssl_context,
            timeout=self.connect_timeout,
        ) as conn:
            self._conn = conn
            await self._register(conn)
            await self._poll(conn)

    async def _register_once(self, conn: ControlConnection, body: bytes) -> tailcfg.RegisterResponse:
        reply = await conn.request("POST", "/machine/register", body)
        if reply.status != 200:
            text = reply.body.decode("utf-8", "replace").strip()[:300]
            if reply.status == 400 and "version" in text:
                raise ProtocolVersionError(f"the control server refused this client's version: {text}")
            raise ControlError(f"the control server refused the registration: HTTP {reply.status}: {text}")
        answer = tailcfg.parse_register_response(reply.body)
        if answer.error:
            if answer.error_code:
                raise error_from_code(answer.error_code, answer.error)
            raise AuthKeyRequiredError(f"the control server refused the registration: {answer.error}")
        return answer

    async def _register(self, conn: ControlConnection) -> None:
        # A known node (the server knows its node key) registers without a key; a new one, or an
        # expired one, uses the auth key. The server's answer says which case it is.
        if self._registered or self._registered_before() or self._auth_key is None:
            keyless = tailcfg.register_request(
                self._node.public(),
                hostinfo=self._hostinfo(),
                ephemeral=self.ephemeral,
                version=self.capability_version,
            )
            with anyio.fail_after(self.connect_timeout):
                answer = await self._register_once(conn, keyless)
            wants_auth = answer.node_key_expired or (bool(answer.auth_url) and not answer.machine_authorized)
            if not wants_auth or self._auth_key is None:
                await self._registered_as(conn, answer)
                return
        body = tailcfg.register_request(
            self._node.public(),
            hostinfo=self._hostinfo(),
            auth_key=self._auth_key,
            ephemeral=self.ephemeral,
            version=self.capability_version,
        )
        with anyio.fail_after(self.connect_timeout):
            answer = await self._register_once(conn, body)
        # The key is spent on this server; the node key is enough from now on.
        self._auth_key = None
        await self._registered_as(conn, answer)

    async def _registered_as(self, conn: ControlConnection, answer: tailcfg.RegisterResponse) -> None:
        if answer.auth_url and not answer.machine_authorized:
            answer = await self._wait_for_login(conn, answer.auth_url)
        # Registered (maybe waiting for approval, maybe expired: the map says which).
        if answer.machine_authorized:
            state = "authorized"
        else:
            state = "key expired" if answer.node_key_expired else "waiting for approval"
        logger.info(
            "registered with %s as %s (%s)", self.control_url, answer.login_name or "a tagged node", state
        )
        self._registered = True
        self._remember_registration()
        self.auth_url = ""

    async def _wait_for_login(self, conn: ControlConnection, auth_url: str) -> tailcfg.RegisterResponse:
        self.auth_url = auth_url
        logger.warning(
            "to log this node in, open %s", auth_url, extra={"embedmesh_event": "login", "url": auth_url}
        )
        self._notify()
        while True:
            # Go's client re-registers with Followup, which the server holds until the login is
            # done (or answers with the same URL after a while: then ask again).
            body = tailcfg.register_request(
                self._node.public(),
                hostinfo=self._hostinfo(),
                followup=auth_url,
                ephemeral=self.ephemeral,
                version=self.capability_version,
            )
            answer = await self._register_once(conn, body)
            if answer.machine_authorized:
                return answer
            if not answer.auth_url:
                raise AuthKeyRequiredError("the login did not authorize this node")
            if answer.auth_url != auth_url:
                auth_url = self.auth_url = answer.auth_url
                self._notify()

    def _registration_marker(self) -> Path | None:
        return None if self.state_dir is None else self.state_dir / REGISTERED_FILE

    def _registered_before(self) -> bool:
        marker = self._registration_marker()
        if marker is None:
            return False
        if marker.exists():
            return marker.read_text().strip() == self.control_url
        # A node from before embedmesh spoke Tailscale's protocol pinned its server (the same key):
        # it is known there by its node key, and re-registers once without a key.
        pin = self.state_dir / PIN_FILE if self.state_dir is not None else None
        if pin is not None and pin.exists():
            try:
                return bool(json.loads(pin.read_text()).get("control_url") == self.control_url)
            except (ValueError, AttributeError):
                return False
        return False

    def _remember_registration(self) -> None:
        marker = self._registration_marker()
        if marker is not None and not (marker.exists() and marker.read_text().strip() == self.control_url):
            marker.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
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
        if message.embedmesh_error is not None:
            code, text = message.embedmesh_error
            raise error_from_code(code, text)
        now = time.time()
        if not self._session.apply(message, now):
            return
        netmap = self._session.network_map(now)
        self.node_id = netmap.self_node.id
        self.netmap = netmap
        if not self.connected:
            self.connected = True
        self._announce(netmap)
        if self.on_netmap is not None:
            self.on_netmap(netmap)
        self._notify()

    def _announce(self, netmap: NetworkMap) -> None:
        state = netmap.state
        if state is self._announced_state:
            return
        self._announced_state = state
        # Worded for the programmer whose application logs this; ``embedmesh_event`` lets the
        # CLI say it to an operator instead (embedmesh.cli.main).
        node_id = netmap.self_node.id
        event = {"embedmesh_event": state.value, "node_id": node_id, "control_url": self.control_url}
        if state is NodeState.PENDING_APPROVAL:
            logger.warning(
                "node %d waits for an admin of %s to approve it; up()/wait_for_approval() return once "
                "approved (on an embedmesh server the admin runs `embedmesh control nodes approve %d`; "
                "auth keys created with --preapproved skip this)",
                node_id,
                self.control_url,
                node_id,
                extra=event,
            )
        elif state is NodeState.KEY_EXPIRED:
            logger.warning(
                "node key expired (node %d): cut off from its peers until it re-authenticates; start the "
                "node again with a new auth_key= and the same state_dir (or call reauthenticate()), or "
                "the admin renews it (`embedmesh control nodes approve %d` on an embedmesh server)",
                node_id,
                node_id,
                extra=event,
            )
        else:
            logger.info("in the tailnet as %s (%d peers)", netmap.self_node.fqdn, len(netmap.peers))

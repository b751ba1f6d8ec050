"""The node's control client: joins a tailnet through a coordination server and follows its map.

The protocol lives in :class:`~embedmesh.control.protocol.ClientSession` (sans-IO); this module is
the anyio driver around it, so it runs on asyncio and on trio::

    async with ControlClient(url, machine_key=..., node_key=..., disco_key=..., hostname="web",
                             auth_key=key, state_dir=path) as client:
        await client.wait_for_approval()
        async for netmap in client.netmaps():
            ...

Entering the context fetches and pins the server key, connects, registers and receives the first
map; it raises the error that explains a refusal (bad, used, expired or revoked auth key, an
unreachable server, a changed server key). Afterwards the client keeps a stream open, applies map
deltas, pings the server, and reconnects with exponential backoff whenever the stream breaks (the
last map stays valid meanwhile). Errors that retrying cannot fix (the node was deleted, approval
refused, server key changed) end the client: :attr:`error` holds them, and :meth:`wait_for_approval`,
:meth:`wait_for_netmap` and :meth:`netmaps` raise them.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import platform
import random
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import ClassVar, Self

import anyio
import anyio.abc

from embedmesh.control.errors import (
    ControlError,
    ControlProtocolError,
    ControlUnreachableError,
    HandshakeRejectedError,
    NetmapDesyncError,
    ProtocolVersionError,
    ServerKeyChangedError,
    error_from_code,
)
from embedmesh.control.messages import (
    ClientMessage,
    DeltaMessage,
    EndpointsUpdate,
    ErrorMessage,
    FullMap,
    LoggedOut,
    LogoutRequest,
    Ping,
    Pong,
    RegisterRequest,
    RegisterResponse,
    ServerMessage,
    decode_key,
    parse_endpoint,
)
from embedmesh.control.netmap import NetworkMap, NodeState
from embedmesh.control.noise import MAX_FRAME_SIZE, PROTOCOL_VERSION
from embedmesh.control.protocol import ClientSession
from embedmesh.control.store import create_private_file
from embedmesh.control.websocket import HTTPStatusError, WebSocket, WebSocketClosed, http_get_json, split_url
from embedmesh.errors import NodeError
from embedmesh.wireguard.crypto import generate_private_key, public_key

logger = logging.getLogger("embedmesh.control.client")

PIN_FILE = "control-server.json"
CONTROL_PATH = "/control/v1"

#: Errors after which reconnecting cannot help.
_RETRYABLE = (
    OSError,
    anyio.EndOfStream,
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    ControlProtocolError,
    ControlUnreachableError,
    HandshakeRejectedError,
    TimeoutError,
)


class _Connection:
    """One live stream: the WebSocket, its Noise session and the registration answer."""

    def __init__(self, ws: WebSocket, session: ClientSession, registered: RegisterResponse) -> None:
        self.ws = ws
        self.session = session
        self.registered = registered
        # Encrypting and sending happen under one lock: the nonce is implicit, so frames must
        # leave in the order their counters were drawn.
        self._lock = anyio.Lock()

    async def send(self, message: ClientMessage) -> None:
        async with self._lock:
            await self.ws.send(self.session.send(message))


class ControlClient:
    """A node's membership in a tailnet, kept alive against a coordination server."""

    #: Last handshake timestamp per machine key in this process (strictly increasing; the server
    #: refuses a timestamp it has seen, which also catches two clients sharing one machine key).
    _last_timestamps: ClassVar[dict[bytes, int]] = {}

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
        ping_interval: float = 15.0,
        connect_timeout: float = 10.0,
        reconnect_min: float = 0.5,
        reconnect_max: float = 30.0,
        rng: random.Random | None = None,
        start_timeout: float = 0.0,
    ) -> None:
        split_url(control_url)  # validates
        for key, name in ((machine_key, "machine_key"), (node_key, "node_key"), (disco_key, "disco_key")):
            if len(key) != 32:
                raise ValueError(f"{name} must be 32 bytes")
        for endpoint in endpoints:
            parse_endpoint(endpoint)
        self.control_url = control_url.rstrip("/")
        self._machine_key = machine_key
        self._node_key = node_key
        self.machine_public_key = public_key(machine_key)
        self.node_public_key = public_key(node_key)
        self.disco_key = disco_key
        self.hostname = hostname
        self.os_name = platform.system().lower() if os_name is None else os_name
        self.tags = tuple(tags)
        self.ephemeral = ephemeral
        self._auth_key = auth_key
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self.endpoints: tuple[str, ...] = tuple(endpoints)
        self.on_netmap = on_netmap
        self.ping_interval = ping_interval
        self.connect_timeout = connect_timeout
        self.reconnect_min = reconnect_min
        self.reconnect_max = reconnect_max
        self._rng = rng or random.Random()
        #: How long :meth:`start` keeps retrying a server it cannot connect to (0: fail at once).
        self.start_timeout = start_timeout

        #: The server's static public key once known (pinned).
        self.server_public_key: bytes | None = None
        self.node_id: int | None = None
        #: The latest network map (None until the first one arrives).
        self.netmap: NetworkMap | None = None
        #: Whether a control stream is up right now.
        self.connected = False
        #: How many times the client reconnected after losing the stream.
        self.reconnects = 0
        #: The error that ended the client, if any.
        self.error: ControlError | None = None
        self.logged_out = False
        self._changed = anyio.Event()
        self._conn: _Connection | None = None
        self._task_group: anyio.abc.TaskGroup | None = None
        self._closed = False
        self._logout_done: anyio.Event | None = None
        self._reconnect_now = anyio.Event()
        self._announced_state: NodeState | None = None

    def __repr__(self) -> str:
        return (
            f"ControlClient({self.control_url!r}, hostname={self.hostname!r}, node_id={self.node_id}, "
            f"state={self.state.value if self.state else None}, connected={self.connected})"
        )

    # ------------------------------------------------------------------ public surface

    @property
    def state(self) -> NodeState | None:
        """AUTHORIZED, PENDING_APPROVAL or KEY_EXPIRED (None before the first map)."""
        return None if self.netmap is None else self.netmap.state

    @property
    def waiting_for_approval(self) -> bool:
        return self.state is NodeState.PENDING_APPROVAL

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def start(self) -> None:
        """Register and receive the first map, then keep the stream up in the background."""
        if self._task_group is not None:
            raise NodeError("ControlClient already started")
        conn = await self._open_first()
        try:
            await self._receive_first_map(conn)
        except BaseException:
            await conn.ws.aclose()
            raise
        self._task_group = anyio.create_task_group()
        await self._task_group.__aenter__()
        self._task_group.start_soon(self._run, conn)

    async def _open_first(self) -> _Connection:
        """The first connection, retried with exponential backoff for :attr:`start_timeout` seconds
        while the server cannot be reached (it may be starting along with this node)."""
        deadline = time.monotonic() + self.start_timeout
        backoff = self.reconnect_min
        announced = False
        while True:
            try:
                return await self._open(first=True)
            except _RETRYABLE as exc:
                if isinstance(exc, ControlError) and not isinstance(
                    exc, ControlProtocolError | ControlUnreachableError
                ):
                    raise
                # A server that answers but is not an embedmesh control server will not become
                # one; a proxy in front of one that is still starting answers 502/503/504.
                cause = exc.__cause__
                retry = not isinstance(exc, ControlUnreachableError | ControlProtocolError) or (
                    isinstance(cause, HTTPStatusError) and cause.status >= 500
                )
                remaining = deadline - time.monotonic()
                if not retry or remaining <= 0:
                    waited = f" for {self.start_timeout:g} s" if self.start_timeout > 0 and retry else ""
                    raise ControlUnreachableError(
                        f"cannot reach the control server at {self.control_url}{waited} "
                        f"({type(exc).__name__}: {exc}); is `embedmesh control serve` running there, "
                        "and is the URL right?"
                    ) from exc
                if not announced:
                    announced = True
                    what = "known node" if self._auth_key is None else "first registration"
                    logger.warning(
                        "waiting for the control server at %s (%s: %s); retrying for up to %.0f s (%s)",
                        self.control_url,
                        type(exc).__name__,
                        exc,
                        remaining,
                        what,
                    )
                else:
                    logger.debug("control server still unreachable (%s: %s)", type(exc).__name__, exc)
                delay = min(backoff * (0.5 + self._rng.random() / 2), remaining)
                backoff = min(backoff * 2, self.reconnect_max)
                await anyio.sleep(delay)

    async def close(self) -> None:
        """Stop the stream (the node stays registered; see :meth:`logout`)."""
        if self._closed:
            return
        self._closed = True
        if self._task_group is not None:
            self._task_group.cancel_scope.cancel()
            await self._task_group.__aexit__(None, None, None)
        if self._conn is not None:
            await self._conn.ws.aclose()
            self._conn = None
        self.connected = False
        self._notify()

    async def update_endpoints(self, endpoints: Sequence[str]) -> None:
        """Report the node's underlay endpoints (``"ip:port"``); peers get them as a delta."""
        for endpoint in endpoints:
            parse_endpoint(endpoint)
        new = tuple(endpoints)
        if new == self.endpoints:
            return
        self.endpoints = new
        conn = self._conn
        if conn is not None:
            try:
                await conn.send(EndpointsUpdate(new))
            except _RETRYABLE as exc:
                # The reconnect will carry them in its register message.
                logger.debug("endpoint update not sent (%s); it goes with the next registration", exc)

    async def logout(self, timeout: float = 10.0) -> None:
        """Leave the tailnet: an ephemeral node is deleted at once; another has its key expired."""
        conn = self._conn
        if conn is None:
            raise NodeError("not connected to the control server: cannot log out now")
        self._logout_done = anyio.Event()
        await conn.send(LogoutRequest())
        with anyio.fail_after(timeout):
            await self._logout_done.wait()
        await self.close()

    async def reauthenticate(self, auth_key: str) -> None:
        """Register again with a new auth key (after the node key expired); reconnects the stream."""
        self._auth_key = auth_key
        self._reconnect_now.set()
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
        """Return once an admin approved the node (at once if it needed no approval)."""
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

    def _timestamp(self) -> int:
        last = self._last_timestamps.get(self.machine_public_key, 0)
        stamp = max(time.time_ns(), last + 1)
        self._last_timestamps[self.machine_public_key] = stamp
        return stamp

    async def _fetch_server_key(self) -> bytes:
        try:
            info = await http_get_json(self.control_url, "/key")
        except HTTPStatusError as exc:
            raise ControlUnreachableError(
                f"{self.control_url}/key answered HTTP {exc.status}: is this an embedmesh control server?"
            ) from exc
        except ValueError as exc:
            raise ControlUnreachableError(
                f"{self.control_url}/key did not answer JSON: is this an embedmesh control server?"
            ) from exc
        try:
            version = info["protocol_version"]
            key = decode_key(info["public_key"], "public_key")
        except (ValueError, KeyError, TypeError) as exc:
            raise ControlUnreachableError(
                f"{self.control_url}/key did not return a control server key: is this an embedmesh control server?"
            ) from exc
        if version != PROTOCOL_VERSION:
            raise ProtocolVersionError(
                f"the control server speaks protocol version {version}, this node {PROTOCOL_VERSION}: "
                "upgrade the older side"
            )
        return key

    def _pin(self, key: bytes) -> None:
        """Trust on first use: remember the key; refuse a different one later."""
        new = base64.b64encode(key).decode()
        if self.state_dir is None:
            if self.server_public_key is not None and self.server_public_key != key:
                old = base64.b64encode(self.server_public_key).decode()
                raise ServerKeyChangedError(
                    f"control server key changed from {old} to {new} while this node was running"
                )
            self.server_public_key = key
            return
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
                    f"control server key changed from {pinned} to {new}; if you rotated it on purpose, delete {path}"
                )
        else:
            self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            record = {"control_url": self.control_url, "public_key": new}
            create_private_file(path, json.dumps(record, indent=2).encode() + b"\n")
            logger.info("pinned control server key %s in %s", new, path)
        self.server_public_key = key

    async def _open(self, *, first: bool) -> _Connection:
        """Fetch and check the server key, connect, handshake, register."""
        with anyio.fail_after(self.connect_timeout):
            self._pin(await self._fetch_server_key())
            assert self.server_public_key is not None
            ws = await WebSocket.connect(self.control_url, CONTROL_PATH, max_message_size=MAX_FRAME_SIZE)
        try:
            session = ClientSession(
                self._machine_key, self.server_public_key, generate_private_key(os.urandom(32))
            )
            with anyio.fail_after(self.connect_timeout):
                await ws.send(session.initiation(self._timestamp()))
                try:
                    session.receive_response(await ws.receive())
                except ControlProtocolError as exc:
                    raise ServerKeyChangedError(
                        "the control server could not prove it holds the key it announced "
                        "(a different server answers at this URL?)"
                    ) from exc
                request = RegisterRequest(
                    node_key=self.node_public_key,
                    disco_key=self.disco_key,
                    hostname=self.hostname,
                    os=self.os_name,
                    tags=self.tags,
                    ephemeral=self.ephemeral,
                    auth_key=self._auth_key,
                    endpoints=self.endpoints,
                )
                await ws.send(session.send(request))
                answer = session.receive(await ws.receive())
            if isinstance(answer, ErrorMessage):
                raise error_from_code(answer.code, answer.message)
            if not isinstance(answer, RegisterResponse):
                raise ControlProtocolError(f"expected a registration answer, got {type(answer).__name__}")
        except BaseException:
            await ws.aclose()
            raise
        # Once registered, the key is spent; the stored node key is enough from now on.
        self._auth_key = None
        self.node_id = answer.node_id
        if first or answer.state is not NodeState.AUTHORIZED:
            logger.info(
                "registered with %s as node %d (%s)", self.control_url, answer.node_id, answer.state.value
            )
        return _Connection(ws, session, answer)

    async def _receive_first_map(self, conn: _Connection) -> None:
        self._conn = conn
        with anyio.fail_after(self.connect_timeout):
            while self.netmap is None:
                self._handle(conn, conn.session.receive(await conn.ws.receive()))
        self.connected = True
        self._notify()

    def _handle(self, conn: _Connection, message: ServerMessage) -> None:
        if isinstance(message, FullMap):
            self._set_netmap(message.netmap)
        elif isinstance(message, DeltaMessage):
            if self.netmap is None:
                raise NetmapDesyncError("delta before the first full map")
            self._set_netmap(self.netmap.apply(message.delta))
        elif isinstance(message, Pong):
            pass
        elif isinstance(message, LoggedOut):
            self.logged_out = True
            if self._logout_done is not None:
                self._logout_done.set()
        elif isinstance(message, ErrorMessage):
            raise error_from_code(message.code, message.message)
        else:
            raise ControlProtocolError("registration answer in the middle of a stream")

    def _set_netmap(self, netmap: NetworkMap) -> None:
        self.netmap = netmap
        state = netmap.state
        if state is not self._announced_state:
            self._announced_state = state
            # Worded for the programmer whose application logs this; ``embedmesh_event`` lets
            # the CLI say it to an operator instead (embedmesh.cli.main).
            node_id = netmap.self_node.id
            event = {"embedmesh_event": state.value, "node_id": node_id, "control_url": self.control_url}
            if state is NodeState.PENDING_APPROVAL:
                logger.warning(
                    "node %d waits for an admin of %s to approve it; up()/wait_for_approval() return "
                    "once approved (the admin runs `embedmesh control nodes approve %d`; auth keys "
                    "created with --preapproved skip this)",
                    node_id,
                    self.control_url,
                    node_id,
                    extra=event,
                )
            elif state is NodeState.KEY_EXPIRED:
                logger.warning(
                    "node key expired (node %d): cut off from its peers until it re-authenticates; "
                    "start the node again with a new auth_key= and the same state_dir (or call "
                    "ControlClient.reauthenticate()), or the admin renews it with "
                    "`embedmesh control nodes approve %d`",
                    node_id,
                    node_id,
                    extra=event,
                )
            else:
                logger.info("in the tailnet as %s (%d peers)", netmap.self_node.fqdn, len(netmap.peers))
        if self.on_netmap is not None:
            self.on_netmap(netmap)
        self._notify()

    async def _run(self, conn: _Connection) -> None:
        """Stream, and reconnect with backoff until closed or a fatal error."""
        backoff = self.reconnect_min
        while True:
            started = time.monotonic()
            try:
                await self._stream(conn)
                if self.logged_out:
                    return
                logger.info("control stream ended; reconnecting")
            except _RETRYABLE as exc:
                logger.info("control stream lost (%s: %s); reconnecting", type(exc).__name__, exc)
            except ControlError as exc:
                # Everything retryable was caught above: deleted, refused, replaced, bad key...
                logger.error("control client stopped: %s", exc)
                self.error = exc
                self.connected = False
                self._notify()
                return
            finally:
                self.connected = False
                self._conn = None
                await conn.ws.aclose()
            if time.monotonic() - started > 10 * self.reconnect_max:
                backoff = self.reconnect_min
            while True:
                delay = backoff * (0.5 + self._rng.random() / 2)
                backoff = min(backoff * 2, self.reconnect_max)
                with anyio.move_on_after(delay):
                    await self._reconnect_now.wait()
                self._reconnect_now = anyio.Event()
                try:
                    conn = await self._open(first=False)
                    break
                except _RETRYABLE as exc:
                    logger.debug("reconnect failed (%s: %s)", type(exc).__name__, exc)
                except ControlError as exc:
                    logger.error("control client stopped: %s", exc)
                    self.error = exc
                    self._notify()
                    return
            self.reconnects += 1
            backoff = self.reconnect_min

    async def _stream(self, conn: _Connection) -> None:
        self._conn = conn
        self.connected = True
        self._notify()
        error: Exception | None = None
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._pinger, conn)
            tg.start_soon(self._watch_reconnect, conn)
            # Errors leave the task group as themselves, not wrapped in an exception group (trio
            # wraps whatever the body raises).
            try:
                while True:
                    with anyio.fail_after(self.ping_interval * 3):
                        frame = await conn.ws.receive()
                    self._handle(conn, conn.session.receive(frame))
            except WebSocketClosed as exc:
                if not self.logged_out:
                    error = exc
            except Exception as exc:
                error = exc
            finally:
                tg.cancel_scope.cancel()
        if error is not None:
            raise error

    async def _watch_reconnect(self, conn: _Connection) -> None:
        await self._reconnect_now.wait()
        await conn.ws.aclose()

    async def _pinger(self, conn: _Connection) -> None:
        ping_id = 0
        while True:
            await anyio.sleep(self.ping_interval)
            ping_id += 1
            try:
                await conn.send(Ping(ping_id))
            except _RETRYABLE:
                return

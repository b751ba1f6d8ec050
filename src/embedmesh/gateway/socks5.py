"""A SOCKS5 proxy (RFC 1928) whose CONNECT requests are dialled into the mesh.

The protocol part is a small sans-IO parser over a byte buffer (:class:`Socks5Handshake`); the
server feeds it from a local TCP stream, asks its ``dial`` callable for a mesh stream and relays.
Only the CONNECT command and the "no authentication" method are offered: the proxy listens on
loopback for programs on the same host, as ``tailscale up --socks5-server`` does.

Every way a client's request can end (a method or command we do not offer, a failed CONNECT, a
client that stops talking) closes the client's socket, after the reply RFC 1928 prescribes:
``05 FF`` for no acceptable method, the §6 reply codes for a refused request.
:func:`tailnet_dialer` is the ``dial`` of ``embedmesh up --socks5``: it reaches tailnet peers
only, and resolves names only in the tailnet, so the proxy never becomes a way into the host's
own network (loopback, LAN) or a way to make the host's resolvers look names up.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anyio
import anyio.abc

from embedmesh.dns.resolver import Recursion
from embedmesh.errors import ParseError
from embedmesh.gateway.pipe import pipe
from embedmesh.hostport import join_host_port

if TYPE_CHECKING:
    from embedmesh.node import Node

logger = logging.getLogger("embedmesh.socks5")

VERSION = 5
METHOD_NO_AUTH = 0
METHOD_NONE_ACCEPTABLE = 0xFF
CMD_CONNECT = 1
ATYP_IPV4 = 1
ATYP_DOMAIN = 3
ATYP_IPV6 = 4
# Reply codes (RFC 1928 §6).
REPLY_SUCCEEDED = 0
REPLY_GENERAL_FAILURE = 1
REPLY_NOT_ALLOWED = 2
REPLY_NETWORK_UNREACHABLE = 3
REPLY_HOST_UNREACHABLE = 4
REPLY_CONNECTION_REFUSED = 5
REPLY_TTL_EXPIRED = 6
REPLY_COMMAND_NOT_SUPPORTED = 7
REPLY_ADDRESS_TYPE_NOT_SUPPORTED = 8

#: A client that has not finished its greeting and request after this long is disconnected.
HANDSHAKE_TIMEOUT = 10.0

Dial = Callable[[str, int], Awaitable[anyio.abc.ByteStream]]


@dataclass(frozen=True, slots=True)
class ConnectRequest:
    """What the client asked for: a host (IP literal or name) and a port."""

    host: str
    port: int


class Socks5Handshake:
    """The server side of the SOCKS5 greeting and request, fed bytes as they arrive.

    It ends in one of three ways: :attr:`request` (a CONNECT to dial), :attr:`refusal` (a reply
    code to send before closing) or :attr:`method_refused` (``05 FF`` is in the bytes
    :meth:`feed` returned; close after sending them).
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._greeted = False
        self.request: ConnectRequest | None = None
        #: A reply code to send before closing, when the request is one we refuse.
        self.refusal: int | None = None
        #: The client offered no method we accept; it has been told so (``05 FF``).
        self.method_refused = False

    @property
    def finished(self) -> bool:
        """Whether the handshake reached its end (a request, a refusal or a refused method)."""
        return self.request is not None or self.refusal is not None or self.method_refused

    def feed(self, data: bytes) -> bytes:
        """Consume ``data``; return bytes to send back. Raises ParseError on a protocol violation."""
        if self.finished:
            return b""
        self._buffer += data
        out = b""
        if not self._greeted:
            if len(self._buffer) < 2:
                return out
            version, count = self._buffer[0], self._buffer[1]
            if version != VERSION:
                raise ParseError(f"not a SOCKS5 client (version byte {version})")
            if len(self._buffer) < 2 + count:
                return out
            methods = self._buffer[2 : 2 + count]
            del self._buffer[: 2 + count]
            self._greeted = True
            if METHOD_NO_AUTH not in methods:
                # RFC 1928 §3: X'FF' tells the client no offered method is acceptable; it must
                # then close, and so do we.
                self.method_refused = True
                return bytes([VERSION, METHOD_NONE_ACCEPTABLE])
            out += bytes([VERSION, METHOD_NO_AUTH])
        parsed = self._parse_request()
        if parsed is not None:
            command, request = parsed
            if command != CMD_CONNECT:
                self.refusal = REPLY_COMMAND_NOT_SUPPORTED
            elif request is None:
                self.refusal = REPLY_ADDRESS_TYPE_NOT_SUPPORTED
            else:
                self.request = request
        return out

    def _parse_request(self) -> tuple[int, ConnectRequest | None] | None:
        buf = self._buffer
        if len(buf) < 5:
            return None
        version, command, _reserved, atyp = buf[0], buf[1], buf[2], buf[3]
        if version != VERSION:
            raise ParseError(f"bad SOCKS5 request version {version}")
        if atyp == ATYP_IPV4:
            end = 4 + 4
            if len(buf) < end + 2:
                return None
            host = str(ipaddress.IPv4Address(bytes(buf[4:end])))
        elif atyp == ATYP_IPV6:
            end = 4 + 16
            if len(buf) < end + 2:
                return None
            host = str(ipaddress.IPv6Address(bytes(buf[4:end])))
        elif atyp == ATYP_DOMAIN:
            length = buf[4]
            end = 5 + length
            if len(buf) < end + 2:
                return None
            try:
                host = bytes(buf[5:end]).decode("ascii")
            except UnicodeDecodeError:
                raise ParseError("SOCKS5 domain name is not ASCII") from None
            if not host:
                raise ParseError("empty SOCKS5 domain name")
        else:
            return (command, None)
        port = struct.unpack_from("!H", buf, end)[0]
        del buf[: end + 2]
        return command, ConnectRequest(host, port)


def reply(code: int, bound: tuple[str, int] = ("0.0.0.0", 0)) -> bytes:
    """A SOCKS5 reply with the bound address (IPv4 or IPv6 literal)."""
    address = ipaddress.ip_address(bound[0].split("%")[0])
    atyp = ATYP_IPV4 if address.version == 4 else ATYP_IPV6
    return bytes([VERSION, code, 0, atyp]) + address.packed + struct.pack("!H", bound[1])


_ERRNO_REPLIES = {
    errno.ENETUNREACH: REPLY_NETWORK_UNREACHABLE,
    errno.EHOSTUNREACH: REPLY_HOST_UNREACHABLE,
    errno.ECONNREFUSED: REPLY_CONNECTION_REFUSED,
    errno.ETIMEDOUT: REPLY_TTL_EXPIRED,
}


def reply_code_for(exc: BaseException) -> int:
    """The RFC 1928 reply code for a failed CONNECT: refused (05) for a closed port, TTL expired
    (06) when the peer never answered, host unreachable (04) for a name that is not in the tailnet
    or an address that no peer routes, network unreachable (03) as the OS would say it."""
    if isinstance(exc, ConnectionRefusedError):
        return REPLY_CONNECTION_REFUSED
    if isinstance(exc, TimeoutError):
        return REPLY_TTL_EXPIRED
    if isinstance(exc, LookupError):
        return REPLY_HOST_UNREACHABLE
    if isinstance(exc, OSError) and exc.errno in _ERRNO_REPLIES:
        return _ERRNO_REPLIES[exc.errno]
    return REPLY_GENERAL_FAILURE


async def _send(client: anyio.abc.ByteStream, data: bytes) -> bool:
    """Send to the client; False when it is already gone (its trouble, not the server's)."""
    try:
        await client.send(data)
    except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
        return False
    return True


async def handle_client(
    client: anyio.abc.ByteStream, dial: Dial, *, handshake_timeout: float = HANDSHAKE_TIMEOUT
) -> None:
    """Serve one SOCKS5 client connection, and close it whichever way the request ends."""
    async with client:
        handshake = Socks5Handshake()
        try:
            with anyio.fail_after(handshake_timeout):
                while not handshake.finished:
                    answer = handshake.feed(await client.receive())
                    if answer and not await _send(client, answer):
                        return
        except (
            ParseError,
            TimeoutError,
            anyio.EndOfStream,
            anyio.BrokenResourceError,
            anyio.ClosedResourceError,
        ) as exc:
            logger.debug("SOCKS5 handshake failed: %s", exc)
            return
        if handshake.method_refused:
            logger.debug("SOCKS5 client offered no acceptable method")
            return
        request = handshake.request
        if request is None:
            await _send(client, reply(handshake.refusal or REPLY_GENERAL_FAILURE))
            return
        try:
            upstream = await dial(request.host, request.port)
        except Exception as exc:  # whatever the dial raises, the client gets a reply and a close
            logger.info("SOCKS5 CONNECT %s:%d failed: %s", request.host, request.port, exc)
            await _send(client, reply(reply_code_for(exc)))
            return
        async with upstream:
            local = upstream.extra(anyio.abc.SocketAttribute.local_address, ("0.0.0.0", 0))
            if await _send(client, reply(REPLY_SUCCEEDED, (str(local[0]), int(local[1])))):
                await pipe(client, upstream)


async def serve_socks5(
    listener: anyio.abc.Listener[anyio.abc.SocketStream],
    dial: Dial,
    *,
    handshake_timeout: float = HANDSHAKE_TIMEOUT,
) -> None:
    """Accept SOCKS5 clients on ``listener`` until cancelled."""

    async def handle(stream: anyio.abc.SocketStream) -> None:
        await handle_client(stream, dial, handshake_timeout=handshake_timeout)

    await listener.serve(handle)


def tailnet_dialer(node: Node, *, timeout: float = 30.0) -> Dial:
    """The ``dial`` of a SOCKS5 proxy into ``node``'s tailnet, and nowhere else.

    A name is looked up as a peer's question to MagicDNS would be: the tailnet's names, its extra
    records and its split-DNS routes, never the host's resolvers, so a client cannot probe the
    host's DNS through the proxy. An address must be one that a peer routes; anything else
    (loopback, the LAN, the internet without an exit node) fails at once with "host unreachable"
    rather than after a timeout, and is never dialled on the host network.
    """

    async def dial(host: str, port: int) -> anyio.abc.ByteStream:
        try:
            ipaddress.ip_address(host.split("%")[0])
        except ValueError:
            addresses = [str(a) for a in await node.dns.resolve(host, recursion=Recursion.ROUTES)]
        else:
            addresses = [host]
        unreachable: OSError | None = None
        for address in addresses:
            try:
                stream: anyio.abc.ByteStream = await node.dial(
                    "tcp", join_host_port(address, port), timeout=timeout
                )
            except OSError as exc:
                if exc.errno != errno.EHOSTUNREACH:
                    raise
                unreachable = exc  # maybe a peer routes the name's other address
                continue
            return stream
        assert unreachable is not None  # resolve() returns at least one address or raises
        raise unreachable

    return dial

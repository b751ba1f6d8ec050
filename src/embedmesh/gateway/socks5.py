"""A SOCKS5 proxy (RFC 1928) whose CONNECT requests are dialled into the mesh.

The protocol part is a small sans-IO parser over a byte buffer (:class:`Socks5Handshake`); the
server feeds it from a local TCP stream, asks its ``dial`` callable for a mesh stream and relays.
Only the CONNECT command and the "no authentication" method are offered: the proxy listens on
loopback for programs on the same host, as ``tailscale up --socks5-server`` does.
"""

from __future__ import annotations

import ipaddress
import logging
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import anyio
import anyio.abc

from embedmesh.errors import ParseError
from embedmesh.gateway.pipe import pipe

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
REPLY_NETWORK_UNREACHABLE = 3
REPLY_HOST_UNREACHABLE = 4
REPLY_CONNECTION_REFUSED = 5
REPLY_TTL_EXPIRED = 6
REPLY_COMMAND_NOT_SUPPORTED = 7
REPLY_ADDRESS_TYPE_NOT_SUPPORTED = 8

Dial = Callable[[str, int], Awaitable[anyio.abc.ByteStream]]


@dataclass(frozen=True, slots=True)
class ConnectRequest:
    """What the client asked for: a host (IP literal or name) and a port."""

    host: str
    port: int


class Socks5Handshake:
    """The server side of the SOCKS5 greeting and request, fed bytes as they arrive."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._greeted = False
        self.request: ConnectRequest | None = None
        #: A reply code to send before closing, when the request is one we refuse.
        self.refusal: int | None = None

    def feed(self, data: bytes) -> bytes:
        """Consume ``data``; return bytes to send back. Raises ParseError on a protocol violation."""
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
                out += bytes([VERSION, METHOD_NONE_ACCEPTABLE])
                raise ParseError("the client offers no method we accept (only 'no authentication')")
            out += bytes([VERSION, METHOD_NO_AUTH])
        if self.request is None and self.refusal is None:
            parsed = self._parse_request()
            if parsed is not None:
                command, request = parsed
                if command != CMD_CONNECT:
                    self.refusal = REPLY_COMMAND_NOT_SUPPORTED
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
            self.refusal = REPLY_ADDRESS_TYPE_NOT_SUPPORTED
            return (command, None)
        port = struct.unpack_from("!H", buf, end)[0]
        del buf[: end + 2]
        return command, ConnectRequest(host, port)


def reply(code: int, bound: tuple[str, int] = ("0.0.0.0", 0)) -> bytes:
    """A SOCKS5 reply with the bound address (IPv4 or IPv6 literal)."""
    address = ipaddress.ip_address(bound[0])
    atyp = ATYP_IPV4 if address.version == 4 else ATYP_IPV6
    return bytes([VERSION, code, 0, atyp]) + address.packed + struct.pack("!H", bound[1])


def _reply_code_for(exc: BaseException) -> int:
    if isinstance(exc, ConnectionRefusedError):
        return REPLY_CONNECTION_REFUSED
    if isinstance(exc, TimeoutError):
        return REPLY_HOST_UNREACHABLE
    if isinstance(exc, LookupError | ValueError):
        return REPLY_HOST_UNREACHABLE
    return REPLY_GENERAL_FAILURE


async def handle_client(client: anyio.abc.ByteStream, dial: Dial, *, handshake_timeout: float = 10.0) -> None:
    """Serve one SOCKS5 client connection."""
    handshake = Socks5Handshake()
    try:
        with anyio.fail_after(handshake_timeout):
            while handshake.request is None and handshake.refusal is None:
                data = await client.receive()
                answer = handshake.feed(data)
                if answer:
                    await client.send(answer)
    except (ParseError, TimeoutError, anyio.EndOfStream, anyio.BrokenResourceError) as exc:
        logger.debug("SOCKS5 handshake failed: %s", exc)
        return
    if handshake.refusal is not None or handshake.request is None:
        await client.send(reply(handshake.refusal or REPLY_GENERAL_FAILURE))
        return
    request = handshake.request
    try:
        upstream = await dial(request.host, request.port)
    except Exception as exc:
        logger.info("SOCKS5 CONNECT %s:%d failed: %s", request.host, request.port, exc)
        await client.send(reply(_reply_code_for(exc)))
        return
    async with upstream:
        local = upstream.extra(anyio.abc.SocketAttribute.local_address, ("0.0.0.0", 0))
        await client.send(reply(REPLY_SUCCEEDED, (str(local[0]), int(local[1]))))
        await pipe(client, upstream)


async def serve_socks5(
    listener: anyio.abc.Listener[anyio.abc.SocketStream],
    dial: Dial,
) -> None:
    """Accept SOCKS5 clients on ``listener`` until cancelled."""

    async def handle(stream: anyio.abc.SocketStream) -> None:
        await handle_client(stream, dial)

    await listener.serve(handle)

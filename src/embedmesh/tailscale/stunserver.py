"""A STUN server: answers Binding requests with the address they came from (XOR-MAPPED-ADDRESS).

What DERP servers run beside the relay on UDP 3478, so that nodes learn their public address and
the latency to each region (Tailscale's ``net/stunserver``). Two layers:

- :class:`StunResponder`, sans-IO: a datagram and its source in, the answer (or None) out; junk
  is dropped and counted by reason in :attr:`StunResponder.counters`;
- :class:`StunServer`, an anyio UDP socket in front of it::

      server = StunServer()
      async with anyio.create_task_group() as tg:
          port = await tg.start(server.serve, "127.0.0.1", 3478)

By default any well-formed Binding request is answered (a STUN client of any make can use the
server); ``tailscale_only=True`` answers only requests with SOFTWARE "tailnode" and a
FINGERPRINT, as derper does. The answer is 32 bytes (IPv4) or 44 (IPv6) for a request of at least
20, so the server is no useful amplifier.
"""

from __future__ import annotations

import logging
from collections import Counter

import anyio
import anyio.abc

from embedmesh.errors import ListenError
from embedmesh.tailscale import stun

log = logging.getLogger(__name__)

#: The port STUN servers listen on (RFC 8489; derper's default).
DEFAULT_PORT = 3478


class StunResponder:
    """Answers Binding requests, sans-IO. :attr:`counters` has ``success``, ``ipv4``/``ipv6`` (the
    families answered) and a ``drop_<reason>`` for every dropped datagram (``drop_not_stun``,
    ``drop_malformed``, ``drop_bad_fingerprint``, ``drop_wrong_type``, ``drop_not_tailscale``)."""

    def __init__(self, *, tailscale_only: bool = False) -> None:
        self.tailscale_only = tailscale_only
        self.counters: Counter[str] = Counter()

    def answer(
        self, data: bytes | bytearray | memoryview, source: tuple[str | stun.IPAddress, int]
    ) -> bytes | None:
        """The response to send back to ``source`` (IP, port), or None to drop the datagram."""
        try:
            request = stun.parse_binding_request(data)
        except stun.StunError as exc:
            self.counters["drop_" + exc.reason] += 1
            return None
        if self.tailscale_only and not request.from_tailscale:
            self.counters["drop_not_tailscale"] += 1
            return None
        try:
            response = stun.binding_response(request.txid, source)
        except ValueError:  # not an IP source (cannot come from a UDP socket, but never crash)
            self.counters["drop_bad_source"] += 1
            return None
        self.counters["success"] += 1
        # The response is 32 bytes for an IPv4 source (an IPv4-mapped one too) and 44 for IPv6.
        self.counters["ipv4" if len(response) == 32 else "ipv6"] += 1
        return response


class StunServer:
    """A STUN server on one UDP socket (see the module docstring)."""

    def __init__(self, responder: StunResponder | None = None) -> None:
        self.responder = responder if responder is not None else StunResponder()
        self.port: int | None = None

    @property
    def counters(self) -> Counter[str]:
        """The responder's counters plus ``write_error`` for answers the socket refused."""
        return self.responder.counters

    async def serve(
        self,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        *,
        task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on ``host:port`` (0 picks a free port; ``"::"`` serves IPv6 and, on a dual-stack
        host, IPv4 too) and answer until cancelled. ``task_status.started`` reports the bound port.
        Raises :class:`~embedmesh.errors.ListenError` when the port cannot be opened."""
        try:
            sock = await anyio.create_udp_socket(local_host=host, local_port=port)
        except OSError as exc:
            raise ListenError.from_os_error(exc, host, port) from None
        async with sock:
            self.port = int(sock.extra(anyio.abc.SocketAttribute.local_port))
            task_status.started(self.port)
            answer = self.responder.answer
            while True:
                try:
                    data, source = await sock.receive()
                except OSError as exc:  # an ICMP error from an earlier answer: read on
                    self.counters["read_error"] += 1
                    log.debug("STUN read: %s", exc)
                    continue
                response = answer(data, (source[0], source[1]))
                if response is None:
                    continue
                try:
                    await sock.sendto(response, source[0], source[1])
                except OSError:
                    self.counters["write_error"] += 1


__all__ = ["DEFAULT_PORT", "StunResponder", "StunServer"]

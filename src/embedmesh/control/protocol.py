"""The control session, sans-IO: the Noise handshake plus typed messages, on both sides.

These objects turn frames (bytes of one WebSocket message) into messages and back; the anyio client
and the Starlette server move the frames. Once any frame fails to parse or authenticate, the session
is dead (every later call raises), so a caller can only close the connection.
"""

from __future__ import annotations

from embedmesh.control.errors import ControlProtocolError, HandshakeRejectedError
from embedmesh.control.messages import (
    ClientMessage,
    ServerMessage,
    dumps,
    encode_client_message,
    encode_server_message,
    loads,
    parse_client_message,
    parse_server_message,
)
from embedmesh.control.noise import (
    PROTOCOL_VERSION,
    Initiation,
    InitiatorHandshake,
    ResponderHandshake,
    TransportKeys,
    read_transport_frame,
    transport_frame,
)

#: How far a handshake timestamp may be from the server's clock (seconds).
MAX_CLOCK_SKEW = 120.0


def check_handshake_freshness(timestamp_ns: int, now: float) -> None:
    """Reject a timestamp more than :data:`MAX_CLOCK_SKEW` from ``now`` (Unix seconds)."""
    skew = timestamp_ns / 1e9 - now
    if abs(skew) > MAX_CLOCK_SKEW:
        raise HandshakeRejectedError(
            f"handshake timestamp is {skew:+.0f} s off the server's clock (more than "
            f"{MAX_CLOCK_SKEW:.0f} s): fix the clock of the node or of the server (NTP)"
        )


class ClientSession:
    """The node's end of one control connection."""

    def __init__(self, machine_private: bytes, server_public: bytes, ephemeral_private: bytes) -> None:
        self._handshake: InitiatorHandshake | None = InitiatorHandshake(
            machine_private, server_public, ephemeral_private
        )
        self._keys: TransportKeys | None = None
        self.server_version = 0

    def __repr__(self) -> str:
        return f"ClientSession(established={self.established})"

    @property
    def established(self) -> bool:
        return self._keys is not None

    def initiation(self, timestamp_ns: int) -> bytes:
        if self._handshake is None:
            raise ControlProtocolError("handshake already finished")
        return self._handshake.create_initiation(timestamp_ns)

    def receive_response(self, frame: bytes | memoryview) -> None:
        if self._handshake is None:
            raise ControlProtocolError("handshake already finished")
        handshake, self._handshake = self._handshake, None
        payload, self._keys = handshake.read_response(frame)
        info = loads(payload)
        version = info.get("version")
        if not isinstance(version, int) or isinstance(version, bool):
            raise ControlProtocolError("handshake response lacks the server's protocol version")
        self.server_version = version

    def _require_keys(self) -> TransportKeys:
        if self._keys is None:
            raise ControlProtocolError("control session not established")
        return self._keys

    def send(self, message: ClientMessage) -> bytes:
        return transport_frame(self._require_keys(), encode_client_message(message))

    def receive(self, frame: bytes | memoryview) -> ServerMessage:
        return parse_server_message(read_transport_frame(self._require_keys(), frame))


class ServerSession:
    """The server's end of one control connection."""

    def __init__(self, server_private: bytes) -> None:
        self._handshake: ResponderHandshake | None = ResponderHandshake(server_private)
        self._keys: TransportKeys | None = None
        self.initiation: Initiation | None = None

    def __repr__(self) -> str:
        return f"ServerSession(established={self._keys is not None})"

    def receive_initiation(self, frame: bytes | memoryview) -> Initiation:
        """Authenticate the node's machine key; the caller still checks the timestamp."""
        if self._handshake is None or self.initiation is not None:
            raise ControlProtocolError("handshake initiation already received")
        self.initiation = self._handshake.read_initiation(frame)
        return self.initiation

    def respond(self, ephemeral_private: bytes) -> bytes:
        if self._handshake is None or self.initiation is None:
            raise ControlProtocolError("no handshake initiation to respond to")
        handshake, self._handshake = self._handshake, None
        frame, self._keys = handshake.create_response(ephemeral_private, dumps({"version": PROTOCOL_VERSION}))
        return frame

    def _require_keys(self) -> TransportKeys:
        if self._keys is None:
            raise ControlProtocolError("control session not established")
        return self._keys

    def send(self, message: ServerMessage) -> bytes:
        return transport_frame(self._require_keys(), encode_server_message(message))

    def send_encoded(self, payload: bytes) -> bytes:
        """Frame a message the caller already encoded (shared delta and map fragments)."""
        return transport_frame(self._require_keys(), payload)

    def receive(self, frame: bytes | memoryview) -> ClientMessage:
        return parse_client_message(read_transport_frame(self._require_keys(), frame))
